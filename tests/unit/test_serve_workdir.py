"""What ``fashionserve serve`` keeps in its work directory between runs (nothing started)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from fashionserve.cli.serve import add_commands
from fashionserve.gateway.auth.keys import read_keys_file, verify_secret
from fashionserve.serve import ServeError, check_port_free, ensure_api_key
from fashionserve.stack import Workdir


def test_development_key_is_private_reused_and_verifiable(tmp_path: Path) -> None:
    wd = Workdir(tmp_path)
    key = ensure_api_key(wd)
    key_id, secret = key.split(".", 1)
    assert key_id == "dev" and len(secret) >= 40  # 256 random bits, base64url
    for path in (wd.key_file, wd.keys_file):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert secret not in wd.keys_file.read_text(), "the keys file holds a hash only"
    (record,) = read_keys_file(wd.keys_file)
    assert record.id == "dev" and verify_secret(secret, record.hash)

    assert ensure_api_key(wd) == key, "a second run reuses the key"


def test_a_key_that_no_longer_matches_is_replaced(tmp_path: Path) -> None:
    wd = Workdir(tmp_path)
    first = ensure_api_key(wd)
    wd.keys_file.unlink()  # someone deleted the hashes: the stored key is useless
    second = ensure_api_key(wd)
    assert second != first
    (record,) = read_keys_file(wd.keys_file)
    assert verify_secret(second.split(".", 1)[1], record.hash)
    wd.key_file.write_text("garbage\n")
    third = ensure_api_key(wd)
    assert third not in (first, second)
    assert [r.id for r in read_keys_file(wd.keys_file)] == ["dev"]


def test_a_taken_port_is_reported_before_anything_is_built() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"127.0.0.1:{port}.*--port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", 0)  # port 0: the OS picks one, never taken


def test_defaults_match_make_serve() -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.workdir) == ("127.0.0.1", 50051, Path("var"))
    assert args.ready_file is None
