"""How a command joins the ``fashionserve`` command line: the one registration helper.

Each module of :mod:`fashionserve.cli` adds its commands with ``add_commands(subparsers)``,
registering each one with :func:`add_command` (and a group of commands, such as ``repo``,
with :func:`add_group`). A command's handler returns the exit status; an error it raises
on purpose (:class:`fashionserve.errors.Error`) is printed by :func:`fashionserve.cli.main`
and exits with the command's ``error_status``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]
"""Runs a command with its parsed flags; returns the exit status."""


def add_command(
    subparsers: Any,
    name: str,
    handler: Handler,
    help: str,
    *,
    description: str | None = None,
    error_status: int = 1,
) -> argparse.ArgumentParser:
    """Add the command ``name`` to ``subparsers``; returns its parser, for its flags.

    ``error_status`` is the exit status when ``handler`` raises a
    :class:`fashionserve.errors.Error`: 1 (the work failed) unless the command's users
    already rely on another (2, as for argparse's own errors, where an error means "what
    you gave cannot be run").
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description or help
    )
    parser.set_defaults(handler=handler, error_status=error_status)
    return parser


def add_group(subparsers: Any, name: str, help: str, description: str | None = None) -> Any:
    """Add the group of commands ``name`` (``fashionserve NAME COMMAND``); returns its
    subparsers, for :func:`add_command`."""
    group = subparsers.add_parser(name, help=help, description=description or help)
    return group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
