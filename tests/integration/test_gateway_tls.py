"""TLS as callers meet it: a real ``fashionserve gateway`` process serving TLS (mutual TLS in
one, a renewed certificate in the other) in front of real Triton (the conftest's oracle
models), called with ``fashionserve analyze`` and the client library.

Certificates are made here with ``cryptography``: a test CA, a server certificate for
127.0.0.1, a client certificate, and a second CA that re-issues the server certificate
(a renewal that a client can tell apart from the original).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Gateway, Oracle, start_gateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from fashionserve.cli import main as cli_main
from fashionserve.clients import FashionClient, FashionServeError, StreamRequest
from fashionserve.gateway.auth.keys import create_key
from fashionserve.triton import TritonServer

REMOTE = "192.0.2.7:50051"
"""A documentation address (TEST-NET-1): a refusal there comes before any connection."""


class Authority:
    """A CA that writes PEM files: its own certificate and the leaves it issues."""

    def __init__(self, root: Path, name: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = root / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, public: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
        )

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        """``(certificate, key)`` files of a leaf: for the IP address ``name`` when
        ``server``, else a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._builder(subject, key.public_key())
        if server:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))])
            builder = builder.add_extension(san, critical=False)
        cert_file, key_file = self.root / f"{name}.pem", self.root / f"{name}.key"
        cert_file.write_bytes(
            builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file


def secured(gateway: Gateway, ca: Path, client: tuple[Path, Path] | None = None) -> Gateway:
    """The gateway with its test channel over TLS (its health checks and calls use it)."""
    cert, key = (p.read_bytes() for p in client) if client else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key, cert)
    gateway.channel.close()
    return dataclasses.replace(gateway, channel=grpc.secure_channel(gateway.address, credentials))


@pytest.fixture(scope="module")
def scene(oracle: Oracle) -> bytes:
    return oracle.scene(320, 240, [((20, 20, 160, 200), 0)])


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"), "test CA")


@pytest.fixture(scope="module")
def mutual(
    own_triton: TritonServer, authority: Authority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, tuple[Path, Path]]]:
    """A gateway that admits only clients with a certificate from ``authority``, and one."""
    cert, key = authority.issue("127.0.0.1", server=True)
    client = authority.issue("client-1", server=False)
    gateway = start_gateway(
        own_triton.grpc_url,
        tmp_path_factory.mktemp("mutual"),
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_client_ca_file=str(authority.ca),
    )
    gateway = secured(gateway, authority.ca, client)
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway, client
    finally:
        gateway.stop()


def test_analyze_over_mutual_tls_from_the_command_line(
    mutual: tuple[Gateway, tuple[Path, Path]],
    authority: Authority,
    scene: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, (client_cert, client_key) = mutual
    image = tmp_path / "scene.jpg"
    image.write_bytes(scene)
    monkeypatch.setenv("FASHIONSERVE_API_KEY", gateway.key)
    tls = ["--gateway", gateway.address, "--ca", str(authority.ca)]
    mutual_tls = [*tls, "--cert", str(client_cert), "--key", str(client_key)]
    assert cli_main(["analyze", str(image), *mutual_tls, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"][0]["garments"], doc
    # Without a client certificate, or without TLS, the handshake fails.
    for flags in (tls, ["--gateway", gateway.address]):
        assert cli_main(["analyze", str(image), *flags, "--timeout", "5"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
    # Credentials in plaintext to another machine: refused before connecting, named.
    assert cli_main(["analyze", str(image), "--gateway", REMOTE]) == 2
    err = capsys.readouterr().err
    assert f"in plaintext to {REMOTE}" in err and "--insecure-plaintext" in err
    assert gateway.process.poll() is None


def test_a_mapped_client_certificate_is_a_tenant_without_a_key(
    mutual: tuple[Gateway, tuple[Path, Path]],
    authority: Authority,
    scene: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, (client_cert, client_key) = mutual
    image = tmp_path / "scene.jpg"
    image.write_bytes(scene)
    monkeypatch.delenv("FASHIONSERVE_API_KEY", raising=False)
    flags = ["--gateway", gateway.address, "--ca", str(authority.ca)]
    flags += ["--cert", str(client_cert), "--key", str(client_key), "--timeout", "10"]
    # Not mapped yet: the certificate opens the connection, but no call.
    assert cli_main(["analyze", str(image), *flags]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED (API_KEY_MISSING)" in err
    # Mapped in the key file (re-read while the gateway runs): answers, with no key.
    keys = gateway.log.parent / "keys.yaml"
    mapping = (
        "certificates:\n  - {id: client-1, cn: client-1, tenant: default, scopes: [analyze]}\n"
    )
    keys.write_text(keys.read_text() + mapping)
    deadline = time.monotonic() + 10
    while cli_main(["analyze", str(image), *flags, "--json"]) != 0:
        # The file is looked at once a second at most.
        assert "API_KEY_MISSING" in capsys.readouterr().err
        assert time.monotonic() < deadline, "the mapping was not picked up"
        time.sleep(0.5)
    doc = json.loads(capsys.readouterr().out)
    assert doc["images"][0]["garments"], doc
    assert "keyId=cert:client-1" not in gateway.log.read_text()  # it was never refused
    # A key of another tenant with that certificate: refused, both tenants named.
    other = create_key(keys, "other", tenant="acme")
    time.sleep(1.2)
    assert cli_main(["analyze", str(image), *flags, "--api-key", other]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED (TENANT_MISMATCH)" in err and "'acme'" in err, err


def test_a_renewed_certificate_is_served_without_dropping_a_call(
    own_triton: TritonServer, scene: bytes, tmp_path: Path
) -> None:
    authority = Authority(tmp_path / "original", "original CA")
    cert, key = authority.issue("127.0.0.1", server=True)
    gateway = start_gateway(
        own_triton.grpc_url, tmp_path / "gw", tls_cert_file=str(cert), tls_key_file=str(key)
    )
    gateway = secured(gateway, authority.ca)
    renewer = Authority(tmp_path / "renewer", "renewing CA")
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        release = threading.Event()

        def requests() -> Iterator[StreamRequest]:
            yield StreamRequest("before", scene)
            release.wait(60)  # the stream stays open across the renewal
            yield StreamRequest("after", scene)

        with FashionClient(gateway.address, gateway.key, ca_file=authority.ca) as old:
            stream = old.stream_analyze(requests())
            first = next(stream)
            assert first.request_id == "before" and first.result is not None
            # The renewal, as cert-manager writes it: each file replaced at once.
            renewed_cert, renewed_key = renewer.issue("127.0.0.1", server=True)
            os.replace(renewed_key, key)
            os.replace(renewed_cert, cert)
            # New connections get the renewed certificate (the files are looked at once
            # a second at most, at a handshake)...
            deadline = time.monotonic() + 10
            while True:
                with FashionClient(gateway.address, gateway.key, ca_file=renewer.ca) as new:
                    try:
                        assert new.analyze(scene).garments
                        break
                    except FashionServeError as exc:
                        assert exc.code_name == "UNAVAILABLE"
                        assert time.monotonic() < deadline, "the renewed certificate is not served"
                time.sleep(0.2)
            with (
                FashionClient(gateway.address, gateway.key, ca_file=authority.ca) as stale,
                pytest.raises(FashionServeError) as info,
            ):
                stale.get_taxonomy(timeout=5)
            assert info.value.code_name == "UNAVAILABLE"
            # ...while the call in flight on the connection made before completes.
            release.set()
            rest = list(stream)
            assert [e.request_id for e in rest] == ["after"] and rest[0].result is not None
            assert old.analyze(scene).garments
        # Loaded at start, then once more on renewal.
        assert gateway.log.read_text().count("loaded 1 entry from TLS certificate") >= 2
    finally:
        gateway.stop()
