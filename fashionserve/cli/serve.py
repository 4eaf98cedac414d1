"""``fashionserve serve``: build what is missing, then run Triton and the gateway.

The flags map one to one onto :class:`fashionserve.serve.ServeOptions`, whose defaults
they show; ``make serve`` runs the command with none.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fashionserve.cli.command import add_command
from fashionserve.serve import ServeOptions

CHECKPOINTS_ENV = "FASHIONSERVE_CHECKPOINTS"
DEFAULTS = ServeOptions()


def add_commands(subparsers: Any) -> None:
    """Add ``serve`` to the ``fashionserve`` command line."""
    parser = add_command(
        subparsers, "serve", _serve, "build what is missing, then run Triton and the gateway"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULTS.workdir,
        help=f"where built artefacts, keys and logs live (default: ./{DEFAULTS.workdir})",
    )
    parser.add_argument("--host", default=DEFAULTS.host, help="gateway listen host")
    parser.add_argument(
        "--port", type=int, default=DEFAULTS.port, help="gateway port (0 picks a free one)"
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help='once ready, write {"address": "HOST:PORT", "api_key": "..."} here (for scripts)',
    )
    env_checkpoints = os.environ.get(CHECKPOINTS_ENV)
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=Path(env_checkpoints) if env_checkpoints else None,
        help=f"directory with detector.pt, tagger.pt, embedder.pt (env {CHECKPOINTS_ENV}; "
        "default: the committed demo checkpoints, else ones trained under the workdir)",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=DEFAULTS.train_images,
        help="train-split size when no checkpoints exist and they must be trained",
    )
    parser.add_argument(
        "--train-budget",
        type=float,
        default=DEFAULTS.train_budget,
        help="fraction of the standard training schedule when training is needed",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULTS.ready_timeout,
        help="seconds to wait for ready",
    )


def _serve(args: argparse.Namespace) -> int:
    from fashionserve.serve import run

    return run(
        ServeOptions(
            workdir=args.workdir,
            host=args.host,
            port=args.port,
            ready_file=args.ready_file,
            checkpoints=args.checkpoints,
            train_images=args.train_images,
            train_budget=args.train_budget,
            ready_timeout=args.ready_timeout,
        )
    )
