"""API keys: the key file, hashing, and the interceptor on the real gateway server.

The server tests start the real gateway in-process on port 0, pointed at a Triton address
where nothing listens: auth, validation and health answer without Triton.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from fashionserve.cli import main as cli_main
from fashionserve.gateway.auth.identity import UNKNOWN_KEY_ID
from fashionserve.gateway.auth.keys import (
    KeyFileError,
    KeyStore,
    create_key,
    hash_secret,
    read_keys_file,
    verify_secret,
)
from fashionserve.gateway.failures import Unauthenticated
from fashionserve.gateway.server import create_server
from fashionserve.gateway.settings import load_settings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=60))

    return run


# --------------------------------------------------------------------- hashing
def test_hash_is_salted_and_verifies() -> None:
    a, b = hash_secret("s3cret"), hash_secret("s3cret")
    assert a != b  # different salts
    assert a.startswith("sha256$") and "s3cret" not in a
    assert verify_secret("s3cret", a) and verify_secret("s3cret", b)
    assert not verify_secret("s3cret!", a)
    assert not verify_secret("s3cret", "md5$00$00")
    assert not verify_secret("s3cret", "garbage")


# -------------------------------------------------------------------- key file
def test_create_key_stores_only_a_hash_readable_by_owner(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "dev", tenant="acme", scopes=["analyze"])
    key_id, _, secret = key.partition(".")
    assert key_id == "dev" and len(secret) >= 43  # 256 random bits
    text = path.read_text()
    assert secret not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (record,) = read_keys_file(path)
    assert (record.id, record.tenant, record.scopes) == ("dev", "acme", frozenset({"analyze"}))
    create_key(path, "ci")
    assert [r.id for r in read_keys_file(path)] == ["dev", "ci"]


@pytest.mark.parametrize(
    ("key_id", "scopes", "message"),
    [
        ("dev", ["analyze"], "already exists"),
        ("bad.id", ["analyze"], "invalid key id"),
        ("new", ["root"], "unknown scope"),
        ("new", [], "at least one scope"),
    ],
)
def test_create_key_refusals(tmp_path: Path, key_id: str, scopes: list[str], message: str) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "dev")
    with pytest.raises(KeyFileError, match=message):
        create_key(path, key_id, scopes=scopes)
    with pytest.raises(KeyFileError, match="invalid tenant"):
        create_key(path, "new", tenant="acme\nforged")


def test_keys_create_command_prints_the_key_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.yaml"
    assert (
        cli_main(
            ["keys", "create", "--id", "dev", "--scopes", "analyze", "embed", "--file", str(path)]
        )
        == 0
    )
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("dev.") and "\n" not in key  # stdout: the key alone, for scripts
    assert "cannot be shown again" in err
    store = KeyStore(path)
    assert store.authenticate(key).scopes == frozenset({"analyze", "embed"})
    assert cli_main(["keys", "create", "--id", "dev", "--file", str(path)]) == 1


def test_store_authenticates_and_refuses(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "dev", tenant="acme")
    store = KeyStore(path)
    identity = store.authenticate(key)
    assert (identity.key_id, identity.tenant) == ("dev", "acme")
    for presented, reason in [
        (None, "API_KEY_MISSING"),
        ("", "API_KEY_MISSING"),
        ("dev.wrong-secret", "API_KEY_INVALID"),
        ("nobody." + key.partition(".")[2], "API_KEY_INVALID"),
        (key.partition(".")[2], "API_KEY_INVALID"),  # secret without its id
    ]:
        with pytest.raises(Unauthenticated) as info:
            store.authenticate(presented)
        assert info.value.reason == reason


def test_store_picks_up_a_new_key_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "dev")
    store = KeyStore(path)
    new_key = create_key(path, "ci")
    store._checked = 0.0  # the file's mtime is checked at most once a second
    assert store.authenticate(new_key).key_id == "ci"


def test_invalid_key_file_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {id: dev, hash: nothex}\n")
    with pytest.raises(KeyFileError, match="hash"):
        KeyStore(path)
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore(tmp_path / "missing.yaml")


GOOD_HASH = hash_secret("s3cret")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (f"{{id: b, tenant: acme, hash: '{GOOD_HASH}'}}", "scopes"),  # not every scope
        (f"{{id: b, tenant: acme, scopes: [], hash: '{GOOD_HASH}'}}", "scopes"),
        (f"{{id: b, tenant: acme, scopes: [root], hash: '{GOOD_HASH}'}}", "scopes"),
        (f"{{id: b, scopes: [analyze], hash: '{GOOD_HASH}'}}", "tenant"),  # no shared quota
        (f"{{id: b, tenant: 'a b', scopes: [analyze], hash: '{GOOD_HASH}'}}", "tenant"),
        ("{id: b, tenant: acme, scopes: [analyze], hash: 'sha256$00$zz'}", "hash"),
        ("{id: b, tenant: acme, scopes: [analyze], hash: 'sha256$0011$abc'}", "hash"),
        (f"{{id: b, tenant: acme, scopes: [analyze], hash: '{GOOD_HASH}é'}}", "hash"),
        (f"{{id: b, tenant: acme, scopes: [analyze], hash: 'md5{GOOD_HASH[6:]}'}}", "hash"),
    ],
)
def test_a_key_file_entry_that_would_fail_open_refuses_the_file_naming_its_line(
    tmp_path: Path, entry: str, problem: str
) -> None:
    path = tmp_path / "keys.yaml"
    good = f"{{id: a, tenant: acme, scopes: [analyze], hash: '{GOOD_HASH}'}}"
    path.write_text(f"# keys\nkeys:\n  - {good}\n  - {entry}\n")
    with pytest.raises(KeyFileError, match=rf"keys\[1\] \(line 4\) {problem}:"):
        read_keys_file(path)
    with pytest.raises(KeyFileError, match="line 4"):
        KeyStore(path)  # at start: the gateway does not start


def test_a_bad_key_file_on_reload_keeps_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "dev")
    store = KeyStore(path)
    path.write_text(path.read_text().replace("tenant: default", "tenant: ''"))
    store._checked = 0.0  # the file's mtime is checked at most once a second
    with caplog.at_level(logging.ERROR):
        assert store.authenticate(key).tenant == "default"
    assert "invalid; keeping the previous one" in caplog.text
    assert "tenant" in caplog.text


def test_only_a_known_key_id_is_named_in_a_refusal(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "dev")
    store = KeyStore(path)
    with pytest.raises(Unauthenticated) as info:
        store.authenticate("dev.wrong-secret")
    assert info.value.metadata["keyId"] == "dev"
    # A secret pasted where the id goes (before the first dot) is never repeated.
    with pytest.raises(Unauthenticated) as info:
        store.authenticate("TopSecretValue42.more")
    assert info.value.metadata["keyId"] == UNKNOWN_KEY_ID


# ------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[grpc.aio.Channel]:
    settings = load_settings(
        listen_address="127.0.0.1:0",
        triton_urls=[f"127.0.0.1:{_free_port()}"],  # nothing listens there
        health_check_interval_seconds=0.2,
        **overrides,
    )
    server, port = await create_server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None and len(status.details) == 1
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason


@aio
async def test_server_refuses_missing_and_wrong_keys_before_the_servicer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "dev")
    with caplog.at_level(logging.DEBUG):
        async with gateway(api_keys_file=keys) as channel:
            stub = pb_grpc.FashionAnalysisServiceStub(channel)
            empty = pb.AnalyzeRequest(image=pb.Image(data=b""))
            for metadata, reason in [
                ((), "API_KEY_MISSING"),
                ((("x-api-key", "dev.not-the-secret"),), "API_KEY_INVALID"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Analyze(empty, metadata=metadata)
                # An empty image would be INVALID_ARGUMENT: the servicer never ran.
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert reason_of(info.value) == reason
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Analyze(empty, metadata=(("x-api-key", key),))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # past auth
            assert reason_of(info.value) == "EMPTY_IMAGE"
            taxonomy = await stub.GetTaxonomy(
                pb.GetTaxonomyRequest(), metadata=(("x-api-key", key),)
            )
            assert taxonomy.version
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert key.partition(".")[2] not in logged and "not-the-secret" not in logged


@aio
async def test_a_secret_sent_as_the_key_id_never_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys.yaml"
    create_key(keys, "dev")
    secret = "Sup3rS3cretPastedInTheIdPosition"
    with caplog.at_level(logging.DEBUG):
        async with gateway(api_keys_file=keys) as channel:
            stub = pb_grpc.FashionAnalysisServiceStub(channel)
            for presented in (f"{secret}.rest", "dev.wrong"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetTaxonomy(
                        pb.GetTaxonomyRequest(), metadata=(("x-api-key", presented),)
                    )
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert secret not in logged
    assert f"keyId={UNKNOWN_KEY_ID}" in logged and "keyId=dev" in logged


@aio
async def test_scopes_are_enforced(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    reader = create_key(keys, "reader", scopes=["admin"])
    analyst = create_key(keys, "analyst", scopes=["analyze"])
    async with gateway(api_keys_file=keys) as channel:
        stub = pb_grpc.FashionAnalysisServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Analyze(pb.AnalyzeRequest(), metadata=(("x-api-key", reader),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert reason_of(info.value) == "MISSING_SCOPE"
        await stub.GetServingInfo(pb.GetServingInfoRequest(), metadata=(("x-api-key", reader),))
        request = pb.AnalyzeRequest(options=pb.AnalyzeOptions(include_embeddings=True))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Analyze(request, metadata=(("x-api-key", analyst),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "embed" in (info.value.details() or "")


@aio
async def test_health_and_reflection_need_no_key_and_health_is_not_serving_without_triton(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.yaml"
    create_key(keys, "dev")
    async with gateway(api_keys_file=keys) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fashion.v1.FashionAnalysisService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in call for s in r.list_services_response.service]
        assert "fashion.v1.FashionAnalysisService" in names


@aio
async def test_no_auth_is_loud_and_analysis_without_triton_is_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    with caplog.at_level(logging.WARNING):
        async with gateway(auth_enabled=False) as channel:
            stub = pb_grpc.FashionAnalysisServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Analyze(pb.AnalyzeRequest(image=pb.Image(data=buf.getvalue())))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert reason_of(info.value) == "NOT_SERVING"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("AUTHENTICATION IS OFF" in w for w in warnings)


@aio
async def test_second_gateway_on_the_same_port_fails(tmp_path: Path) -> None:
    first = load_settings(listen_address="127.0.0.1:0", auth_enabled=False)
    server, port = await create_server(first)
    await server.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            await create_server(
                load_settings(listen_address=f"127.0.0.1:{port}", auth_enabled=False)
            )
    finally:
        await server.stop(0)
