"""The ``fashionserve`` command line: one way to register a command, one place for errors."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashionserve.cli import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, path: str = "fashionserve"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``(path, parser)`` of every runnable command (a parser without subcommands)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_command_has_a_handler_and_an_error_status() -> None:
    commands = dict(_commands(build_parser()))
    assert {"fashionserve serve", "fashionserve analyze", "fashionserve loadtest bench"} <= set(
        commands
    )
    for path, parser in commands.items():
        handler = parser.get_default("handler")
        assert callable(handler), path
        assert parser.get_default("error_status") in (1, 2), path


def test_an_error_is_printed_once_with_the_commands_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # loadtest: 2, it could not run (as argparse's own errors).
    assert main(["loadtest", "soak", "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: a soak needs at least one --watch NAME=PID\n"
    assert main(["loadtest", "run", "--images", str(tmp_path / "none.jpg")]) == 2
    assert "error: no such image file or directory" in capsys.readouterr().err
    # serve: 1, the stack could not be built.
    missing = tmp_path / "missing"
    args = ["serve", "--port", "0", "--workdir", str(tmp_path / "var"), "--checkpoints"]
    assert main([*args, str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: --checkpoints {missing} lacks one of detector, tagger, embedder (.pt)"
    )


def test_a_bad_flag_value_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "image.jpg", "--min-score", "1.5"])
    assert exit_info.value.code == 2
