"""The ``fashionserve`` command line: one entry point, one subcommand per job.

Each module here adds the commands of one area with ``add_commands(subparsers)``, each
command registered with :func:`fashionserve.cli.command.add_command`:

* :mod:`~fashionserve.cli.models`: ``data synth``, ``train``, ``export``, ``repo``,
  ``triton``, ``evaluate``;
* :mod:`~fashionserve.cli.serve`: ``serve``, the whole stack on localhost;
* :mod:`~fashionserve.cli.gateway`: ``gateway`` and ``keys create``;
* :mod:`~fashionserve.cli.analyze`: ``analyze``, a caller of the gateway;
* :mod:`~fashionserve.cli.search`: ``catalog build|versions|pin`` and ``search`` (visual search);
* :mod:`~fashionserve.cli.loadtest`: ``loadtest run|soak|capacity|naive-server|bench``;
* :mod:`fashionserve.bulk.cli`: ``batch run|status``, bulk tagging through the gateway;
* :mod:`~fashionserve.cli.active`: ``active select|experiment``, active learning.

A command's handler calls the component that does the work and returns the exit status.
Errors are caught here, once: an :class:`fashionserve.errors.Error` (every error raised on
purpose), a client that refused to be created (the client library's ``ClientSetupError``:
credentials that would go in plaintext to another machine) and a failed call of the client
library (its ``FashionServeError``; both stand apart: the client library imports nothing of
the server) print ``error: <message>`` on stderr and exit non-zero. Only argparse is imported before a command runs, so that
``fashionserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fashionserve.bulk import cli as batch
from fashionserve.cli import active, analyze, gateway, loadtest, models, search, serve
from fashionserve.clients.errors import ClientSetupError, FashionServeError
from fashionserve.errors import Error


def build_parser() -> argparse.ArgumentParser:
    """The ``fashionserve`` parser with every command."""
    parser = argparse.ArgumentParser(
        prog="fashionserve", description="Fashion image analysis served on NVIDIA Triton."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (models, analyze, search, serve, gateway, loadtest, batch, active):
        area.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = args.handler(args)
    except (Error, ClientSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(args.error_status)
    except FashionServeError as exc:  # a call to the gateway failed
        where = f"{args.gateway}: " if getattr(args, "gateway", None) else ""
        print(f"error: {where}{exc}", file=sys.stderr)
        hint = analyze.HINTS.get(exc.code_name)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 1
    return status
