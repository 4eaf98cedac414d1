"""``fashionserve batch run|status``: the command line of bulk tagging.

Exit status of ``batch run``: 0 when every input has a row (``_SUCCESS`` written), 1 on an
error (:func:`fashionserve.cli.main` prints it; what was committed stays, and the same
command resumes), 130 when stopped by SIGINT or SIGTERM after committing what was in
flight. ``batch status``: 0, or 1 when ``--output`` holds no journal.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fashionserve.bulk.defaults import CONCURRENCY, PART_ROWS
from fashionserve.bulk.sources import Shard
from fashionserve.clients import security
from fashionserve.errors import Error

INTERRUPTED = 130


def add_commands(subparsers: Any) -> None:
    """Add ``batch run`` and ``batch status`` to the ``fashionserve`` subcommands."""
    batch = subparsers.add_parser(
        "batch", help="bulk tagging: a directory or manifest to Parquet, exactly once"
    ).add_subparsers(dest="batch_command", required=True, metavar="COMMAND")

    p = batch.add_parser(
        "run",
        help="tag every input image through the gateway (resumes a killed run)",
        description="Tag every input image through the gateway into a Parquet dataset, "
        "exactly once: run the same command again to resume after a crash or a kill.",
    )
    p.set_defaults(handler=_run, error_status=1)
    p.add_argument(
        "--input",
        required=True,
        metavar="SRC",
        help="a directory, a manifest (one path or URI a line), or a CSV or Parquet file "
        "with a uri column and an optional id column; s3:// gs:// need the cloud extra",
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output directory")
    security.add_gateway_flags(p)
    security.add_flags(p)
    p.add_argument(
        "--shard",
        type=_shard,
        default=Shard(),
        metavar="I/N",
        help="process the I-th of N deterministic shards of the input (default 0/1)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        default=CONCURRENCY,
        metavar="C",
        help=f"Analyze calls in flight (default {CONCURRENCY})",
    )
    p.add_argument(
        "--include-embeddings", action="store_true", help="store each garment's embedding"
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="analyse again the images marked failed"
    )
    p.add_argument(
        "--part-rows",
        type=_positive,
        default=PART_ROWS,
        metavar="N",
        help=f"rows per part file (default {PART_ROWS}): a kill redoes at most this many images",
    )

    p = batch.add_parser(
        "status",
        help="progress of a run, from its journal (also while it runs)",
        description="Show a run's progress from the journal in its output directory.",
    )
    p.set_defaults(handler=_status, error_status=1)
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--json", action="store_true", help="print JSON")


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except Error as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def _run(args: argparse.Namespace) -> int:
    from fashionserve.bulk.runner import RunOptions, run_batch

    options = RunOptions(
        input=args.input,
        output=args.output,
        gateway=args.gateway,
        api_key=args.api_key,
        security=security.from_flags(args),
        shard=args.shard,
        concurrency=args.concurrency,
        include_embeddings=args.include_embeddings,
        retry_failed=args.retry_failed,
        part_rows=args.part_rows,
    )
    try:
        result = run_batch(options)
    except KeyboardInterrupt:  # Ctrl-C before tagging began (while listing): nothing to commit
        print("stopped before tagging began; run the same command to start", file=sys.stderr)
        return INTERRUPTED
    if result.interrupted:
        print(
            f"stopped: {result.tagged} images committed; run the same command to resume",
            file=sys.stderr,
        )
        return INTERRUPTED
    print(f"complete: {args.output} ({result.tagged} images tagged by this run)", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from fashionserve.bulk.status import read_status

    status = read_status(args.output)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
    else:
        print(status.format())
    return 0
