"""Checkpoint to artifacts: ONNX export, parity proof, atomic publication.

* :mod:`fashionserve.export.exporter` — ``export_checkpoint`` (the ``fashionserve export`` command):
  checkpoint -> ONNX (dynamic batch) -> checks -> parity -> new model version.
* :mod:`fashionserve.export.parity` — runners (PyTorch, ONNX Runtime) and the reusable comparison of two
  runners on the same real inputs, with per-output tolerances.
* :mod:`fashionserve.export.publish` — numbered versions published atomically (staged, then renamed in).

Nothing is imported here, so ``import export`` stays cheap (PyTorch loads on first use).
"""
