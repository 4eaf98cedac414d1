"""Bulk daily tagging: ``fashionserve batch run|status`` (issue 12).

A client of the gateway's public API that tags a whole day of images exactly once:

* :mod:`.sources` lists the input (a directory, a manifest, a CSV or Parquet file; local,
  ``file://``, or object storage through fsspec), streamed, and reads each image;
* :mod:`.journal` is the SQLite journal inside the output directory: the listed ids, the
  committed part files and the ids each holds; its commit is the point of truth;
* :mod:`.output` owns the output format (Parquet parts, ``_SUCCESS``, ``summary.json``);
* :mod:`.runner` calls the gateway with bounded concurrency and commits parts;
* :mod:`.cli` adds the ``batch`` command.
"""
