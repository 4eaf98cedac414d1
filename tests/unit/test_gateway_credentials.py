"""Bearer tokens (JWT against a JWKS), the API-key/token choice, TLS and mutual TLS (with
the client library, a certificate renewed while the gateway runs, and client certificates
mapped to tenants by the key file).

Keys and certificates are generated here with ``cryptography``; tokens are signed with
PyJWT, the same library a caller's identity provider would use. The TLS tests start the
real gateway in-process on port 0 and talk to it over a real socket; nothing needs Triton.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fashionserve.clients import AsyncFashionClient, FashionClient, FashionServeError
from fashionserve.gateway.auth.identity import UNKNOWN_KEY_ID
from fashionserve.gateway.auth.interceptor import Authenticator
from fashionserve.gateway.auth.keys import (
    KeyFileError,
    KeyStore,
    create_key,
    parse_key_file,
    read_keys_file,
)
from fashionserve.gateway.auth.tls import TlsFileError
from fashionserve.gateway.auth.tokens import JwksError, TokenVerifier
from fashionserve.gateway.failures import Unauthenticated
from fashionserve.gateway.server import create_server
from fashionserve.gateway.settings import load_settings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

ISSUER = "https://idp.example"
AUDIENCE = "fashionserve"
Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# ------------------------------------------------------------------ an identity provider
@dataclass
class Issuer:
    """Signing keys by kid, the JWKS that publishes them, and a token minter."""

    keys: dict[str, Key]

    @classmethod
    def new(cls) -> Issuer:
        return cls(
            {
                "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                "ec": ec.generate_private_key(ec.SECP256R1()),
            }
        )

    def jwks(self) -> dict[str, Any]:
        entries = []
        for kid, key in self.keys.items():
            public = key.public_key()
            if isinstance(public, rsa.RSAPublicKey):
                entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
            else:
                entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
            entries.append({**entry, "kid": kid, "use": "sig"})
        return {"keys": entries}

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, kid: str = "rsa", key: Key | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-1", "tenant": "acme"}
        body |= {"exp": now + 300, "scope": "analyze embed"}
        body |= claims
        body = {k: v for k, v in body.items() if v is not None}
        algorithm = "RS256" if kid == "rsa" else "ES256"
        return jwt.encode(body, key or self.keys[kid], algorithm=algorithm, headers={"kid": kid})


def hs256_with_public_key(issuer: Issuer) -> str:
    """The classic confusion attack: HMAC-sign with the published RSA key as the secret."""
    public = (
        issuer.keys["rsa"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "kid": "rsa"}).encode())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "tenant": "acme", "exp": int(time.time()) + 300}
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


@pytest.fixture
def issuer() -> Issuer:
    return Issuer.new()


@pytest.fixture
def verifier(issuer: Issuer, tmp_path: Path) -> TokenVerifier:
    return TokenVerifier(
        issuer.write(tmp_path / "jwks.json"),
        issuer=ISSUER,
        audience=AUDIENCE,
        leeway=30,
        tenant_claim="tenant",
        max_lifetime=3600,
    )


def bearer(token: str) -> str:
    return f"Bearer {token}"


# ------------------------------------------------------------------------- tokens
def test_rs256_and_es256_tokens_give_tenant_and_scopes(
    issuer: Issuer, verifier: TokenVerifier
) -> None:
    identity = verifier.authenticate(bearer(issuer.token("rsa")))
    assert (identity.key_id, identity.tenant) == ("jwt:svc-1", "acme")
    assert identity.scopes == frozenset({"analyze", "embed"})
    # scp as a list; scopes of other services are ignored.
    token = issuer.token("ec", scope=None, scp=["analyze", "billing:read"], tenant="beta")
    identity = verifier.authenticate(bearer(token))
    assert (identity.tenant, identity.scopes) == ("beta", frozenset({"analyze"}))
    # Inside the leeway an expired token still passes (clock skew), past it not.
    verifier.authenticate(bearer(issuer.token(exp=int(time.time()) - 10)))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("not yet valid", "TOKEN_NOT_YET_VALID"),
        ("wrong audience", "TOKEN_AUDIENCE_INVALID"),
        ("wrong issuer", "TOKEN_ISSUER_INVALID"),
        ("no exp", "TOKEN_CLAIM_MISSING"),
        ("no tenant", "TOKEN_CLAIM_MISSING"),
        ("signed by another key", "TOKEN_SIGNATURE_INVALID"),
        ("tampered", "TOKEN_SIGNATURE_INVALID"),
        ("unknown kid", "TOKEN_KEY_UNKNOWN"),
        ("alg none", "TOKEN_ALGORITHM_REFUSED"),
        ("HS256 with the public key", "TOKEN_ALGORITHM_REFUSED"),
        ("not a JWT", "TOKEN_MALFORMED"),
        ("Basic scheme", "TOKEN_MALFORMED"),
        ("huge", "TOKEN_MALFORMED"),
    ],
)
def test_bad_tokens_are_unauthenticated_with_the_reason(
    issuer: Issuer, verifier: TokenVerifier, case: str, reason: str
) -> None:
    now = int(time.time())
    good = issuer.token()
    header_b64, payload_b64, sig = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**payload, "tenant": "victim"}).encode())
    values = {
        "expired": bearer(issuer.token(exp=now - 60)),
        "not yet valid": bearer(issuer.token(nbf=now + 120)),
        "wrong audience": bearer(issuer.token(aud="someone-else")),
        "wrong issuer": bearer(issuer.token(iss="https://evil.example")),
        "no exp": bearer(issuer.token(exp=None)),
        "no tenant": bearer(issuer.token(tenant=None)),
        "signed by another key": bearer(
            issuer.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        ),
        "tampered": bearer(f"{header_b64}.{forged.rstrip(b'=').decode()}.{sig}"),
        "unknown kid": bearer(jwt.encode(payload, issuer.keys["rsa"], "RS256", {"kid": "x"})),
        "alg none": bearer(jwt.encode(payload, "", algorithm="none", headers={"kid": "rsa"})),
        "HS256 with the public key": bearer(hs256_with_public_key(issuer)),
        "not a JWT": bearer("not-a-jwt"),
        "Basic scheme": f"Basic {good}",
        "huge": bearer("a" * 9000),
    }
    with pytest.raises(Unauthenticated) as info:
        verifier.authenticate(values[case])
    assert info.value.reason == reason
    assert info.value.metadata["header"] == "authorization"
    # Who the token names is reported only when its signature checked out: a forged
    # token cannot put a tenant of its choosing into the log.
    authentic = case in {"expired", "not yet valid", "wrong audience", "wrong issuer", "no exp"}
    assert info.value.metadata.get("tenant") == ("acme" if authentic else None)
    assert good not in str(info.value) and good not in str(info.value.metadata)


@pytest.mark.parametrize(
    ("claims_now", "reason"),
    [
        (lambda: {"tenant": "acme\nforged log line"}, "TOKEN_CLAIM_INVALID"),
        (lambda: {"tenant": "acme\n"}, "TOKEN_CLAIM_INVALID"),  # a regex "$" would let it pass
        (lambda: {"tenant": "t" * 65}, "TOKEN_CLAIM_INVALID"),  # an unbounded metric label
        (lambda: {"tenant": ["acme"]}, "TOKEN_CLAIM_INVALID"),
        (lambda: {"exp": str(int(time.time()) + 300)}, "TOKEN_CLAIM_INVALID"),  # numeric string
        (lambda: {"iat": str(int(time.time()))}, "TOKEN_CLAIM_INVALID"),
        (lambda: {"exp": int(time.time()) + 7200}, "TOKEN_LIFETIME_TOO_LONG"),  # over 3600 s
        (lambda: {"iat": int(time.time()) - 7000}, "TOKEN_LIFETIME_TOO_LONG"),  # exp - iat > 3600
        (lambda: {"exp": int(time.time()) + 10 * 365 * 86400}, "TOKEN_LIFETIME_TOO_LONG"),
    ],
)
def test_signed_tokens_with_unsafe_claims_are_refused(
    issuer: Issuer,
    verifier: TokenVerifier,
    claims_now: Callable[[], dict[str, Any]],
    reason: str,
) -> None:
    # The times are taken when the test runs, not when pytest collects it: a suite that
    # reaches this test more than 300 s after collection made "exp + 300" an expired token.
    claims = claims_now()
    with pytest.raises(Unauthenticated) as info:
        verifier.authenticate(bearer(issuer.token(**claims)))
    assert info.value.reason == reason
    assert "\n" not in str(info.value) and "\n" not in str(info.value.metadata)
    # Inside the bound a token passes, with iat or without.
    now = int(time.time())
    verifier.authenticate(bearer(issuer.token(iat=now - 60, exp=now + 3000)))
    verifier.authenticate(bearer(issuer.token(tenant="team-a.eu_1", exp=now + 3500)))
    # A subject that could forge a log line is named as "?".
    assert verifier.authenticate(bearer(issuer.token(sub="svc\n"))).key_id == "jwt:?"


def test_an_unknown_kid_is_not_repeated(issuer: Issuer, verifier: TokenVerifier) -> None:
    payload = {"iss": ISSUER, "aud": AUDIENCE, "tenant": "acme", "exp": int(time.time()) + 60}
    secret = "Sup3rS3cretInTheKidHeader"
    token = jwt.encode(payload, issuer.keys["rsa"], "RS256", {"kid": secret})
    with pytest.raises(Unauthenticated) as info:
        verifier.authenticate(bearer(token))
    assert info.value.reason == "TOKEN_KEY_UNKNOWN"
    assert info.value.metadata["kid"] == UNKNOWN_KEY_ID
    assert secret not in str(info.value)
    with pytest.raises(Unauthenticated) as info:
        verifier.authenticate(bearer(issuer.token(exp=int(time.time()) - 60)))
    assert info.value.metadata["kid"] == "rsa"  # a kid of the JWKS is named


def test_jwks_with_private_symmetric_or_unsupported_keys_is_refused(
    issuer: Issuer, tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    rsa_key = issuer.keys["rsa"]
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    p384 = json.loads(
        jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key())
    )
    for keys, message in [
        ([private], "private or symmetric"),
        ([{"kty": "oct", "k": "c2VjcmV0"}], "private or symmetric"),
        ([p384], "EC P-256"),
        ([{**issuer.jwks()["keys"][0], "alg": "RS512"}], "RS512"),
        ([], "non-empty 'keys'"),
    ]:
        path.write_text(json.dumps({"keys": keys}))
        with pytest.raises(JwksError, match=message):
            TokenVerifier(
                path,
                issuer=ISSUER,
                audience=AUDIENCE,
                leeway=0,
                tenant_claim="t",
                max_lifetime=3600,
            )


def test_a_rotated_jwks_is_picked_up_without_restart(
    issuer: Issuer, verifier: TokenVerifier
) -> None:
    old_token = issuer.token()
    rotated = Issuer.new()
    rotated.write(verifier.path)
    os.utime(verifier.path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime
    verifier._checked = 0.0  # the file is looked at once a second at most
    verifier.authenticate(bearer(rotated.token()))
    with pytest.raises(Unauthenticated) as info:
        verifier.authenticate(bearer(old_token))
    assert info.value.reason == "TOKEN_SIGNATURE_INVALID"
    # A JWKS broken later is reported and ignored: the loaded keys stay in force.
    verifier.path.write_text("{not json")
    verifier._checked = 0.0
    verifier.authenticate(bearer(rotated.token()))


# ----------------------------------------------------------------- key or token
def test_key_or_token_but_not_both(issuer: Issuer, verifier: TokenVerifier, tmp_path: Path) -> None:
    key = create_key(tmp_path / "keys.yaml", "dev", tenant="acme")
    both = Authenticator(KeyStore(tmp_path / "keys.yaml"), verifier)
    assert both.authenticate(key, None).key_id == "dev"
    assert both.authenticate(None, bearer(issuer.token())).key_id == "jwt:svc-1"
    cases = [
        (both, key, bearer(issuer.token()), "CREDENTIALS_AMBIGUOUS"),
        (both, None, None, "CREDENTIALS_MISSING"),
        (
            Authenticator(KeyStore(tmp_path / "keys.yaml"), None),
            None,
            "Bearer x",
            "TOKEN_NOT_ACCEPTED",
        ),
        (Authenticator(None, verifier), key, None, "API_KEY_NOT_ACCEPTED"),
        (Authenticator(None, verifier), None, None, "CREDENTIALS_MISSING"),
    ]
    for authenticator, api_key, authorization, reason in cases:
        with pytest.raises(Unauthenticated) as info:
            authenticator.authenticate(api_key, authorization)
        assert info.value.reason == reason


def test_jwt_settings_are_checked_together(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="jwt_issuer and jwt_audience"):
        load_settings(jwks_file=tmp_path / "jwks.json")
    s = load_settings(jwks_file=tmp_path / "j.json", jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    assert s.auth_enabled and s.api_keys_file is None  # tokens alone are enough
    with pytest.raises(ValidationError, match="tls_cert_file and tls_key_file"):
        load_settings(auth_enabled=False, tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="needs tls_cert_file"):
        load_settings(auth_enabled=False, tls_client_ca_file=tmp_path / "ca.pem")


# ------------------------------------------------------------------- mutual TLS
@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1 and client certificates, as PEM."""

    root: Path

    def __post_init__(self) -> None:
        self.ca_key, self.ca_cert = self._authority("test CA")
        server_key, server_cert = self._leaf("127.0.0.1", self.ca_key, self.ca_cert, server=True)
        self.server_cert = self._write("server.pem", server_cert)
        self.server_key = self._write("server.key", server_key)
        self.ca = self._write("ca.pem", self.ca_cert.public_bytes(serialization.Encoding.PEM))
        self.client = self._leaf("client-1", self.ca_key, self.ca_cert, server=False)
        rogue_key, rogue_cert = self._authority("rogue CA")
        self.rogue_client = self._leaf("client-1", rogue_key, rogue_cert, server=False)

    def _write(self, name: str, pem: bytes) -> Path:
        path = self.root / name
        path.write_bytes(pem)
        return path

    @staticmethod
    def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def _authority(self, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            self._builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def client_with(
        self, name: str, dns: tuple[str, ...] = (), uris: tuple[str, ...] = ()
    ) -> tuple[bytes, bytes]:
        """``(key, certificate)`` PEM of a client certificate from the CA with common name
        ``name`` and these DNS and URI subject alternative names."""
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        return self._leaf(name, self.ca_key, self.ca_cert, server=False, sans=sans)

    def _leaf(
        self,
        name: str,
        ca_key: ec.EllipticCurvePrivateKey,
        ca: x509.Certificate,
        server: bool,
        sans: list[x509.GeneralName] | None = None,
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._builder(subject, ca.subject, key.public_key())
        if server:
            sans = [x509.IPAddress(ipaddress.ip_address(name))]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return self._pem_key(key), cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public: Any) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
        )

    def channel(self, port: int, client: tuple[bytes, bytes] | None) -> grpc.aio.Channel:
        key, cert = client if client else (None, None)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(), private_key=key, certificate_chain=cert
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@asynccontextmanager
async def tls_gateway(tmp_path: Path, pki: Pki, **tls: Any) -> AsyncIterator[tuple[int, str]]:
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "dev")
    settings = load_settings(
        listen_address="127.0.0.1:0",
        api_keys_file=keys,
        health_check_interval_seconds=5,
        **{"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, **tls},
    )
    server, port = await create_server(settings)
    await server.start()
    try:
        yield port, key
    finally:
        await server.stop(0)


async def taxonomy_over(channel: grpc.aio.Channel, key: str) -> str | grpc.StatusCode:
    """The taxonomy version, or the status code the call failed with."""
    async with channel:
        stub = pb_grpc.FashionAnalysisServiceStub(channel)
        try:
            reply = await stub.GetTaxonomy(
                pb.GetTaxonomyRequest(), metadata=(("x-api-key", key),), timeout=10
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
        return str(reply.version)


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    tmp_path: Path, pki: Pki
) -> None:
    async def run() -> None:
        async with tls_gateway(tmp_path, pki, tls_client_ca_file=pki.ca) as (port, key):
            assert isinstance(await taxonomy_over(pki.channel(port, pki.client), key), str)
            unavailable = grpc.StatusCode.UNAVAILABLE  # the handshake fails
            assert await taxonomy_over(pki.channel(port, None), key) == unavailable
            assert await taxonomy_over(pki.channel(port, pki.rogue_client), key) == unavailable
            plain = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            assert await taxonomy_over(plain, key) == unavailable

    asyncio.run(asyncio.wait_for(run(), 60))


def test_tls_without_a_client_ca_needs_no_client_certificate(tmp_path: Path, pki: Pki) -> None:
    async def run() -> None:
        async with tls_gateway(tmp_path, pki) as (port, key):
            assert isinstance(await taxonomy_over(pki.channel(port, None), key), str)

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_tls_key_that_does_not_match_the_certificate_stops_the_start(
    tmp_path: Path, pki: Pki
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(pki.client[0])

    async def run() -> None:
        with pytest.raises(TlsFileError, match="is not the key of"):
            async with tls_gateway(tmp_path, pki, tls_key_file=other):
                pass

    asyncio.run(run())


def test_the_client_library_speaks_tls_and_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    client_key, client_cert = pki.root / "client.key", pki.root / "client.pem"
    client_key.write_bytes(pki.client[0])
    client_cert.write_bytes(pki.client[1])

    async def run() -> None:
        async with tls_gateway(tmp_path, pki, tls_client_ca_file=pki.ca) as (port, key):
            address = f"127.0.0.1:{port}"

            def sync_call(mutual: bool) -> str:
                client = FashionClient(
                    address,
                    key,
                    retries=0,
                    ca_file=pki.ca,
                    cert_file=client_cert if mutual else None,
                    key_file=client_key if mutual else None,
                )
                with client:
                    return client.get_taxonomy().version

            assert await asyncio.to_thread(sync_call, True)
            with pytest.raises(FashionServeError) as info:
                await asyncio.to_thread(sync_call, False)  # no client certificate
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            async with AsyncFashionClient(
                address, key, ca_file=pki.ca, cert_file=client_cert, key_file=client_key
            ) as aio_client:
                assert (await aio_client.get_taxonomy()).version

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_renewed_certificate_is_served_without_a_restart_or_a_dropped_connection(
    tmp_path: Path, pki: Pki
) -> None:
    (tmp_path / "renewed").mkdir()
    renewed = Pki(tmp_path / "renewed")  # re-issued by another CA: clients tell them apart

    def renew(name: str) -> None:
        """Replace one file at once, as cert-manager's Secret update does."""
        staged = pki.root / f".{name}.new"
        staged.write_bytes((renewed.root / name).read_bytes())
        os.replace(staged, pki.root / name)

    async def run() -> None:
        async with tls_gateway(tmp_path, pki) as (port, key):
            before = pki.channel(port, None)  # a connection opened before the renewal
            stub = pb_grpc.FashionAnalysisServiceStub(before)
            metadata = (("x-api-key", key),)
            await stub.GetTaxonomy(pb.GetTaxonomyRequest(), metadata=metadata, timeout=10)
            # Half a renewal (a new key, the old certificate) is refused: the certificate
            # in use stays.
            renew("server.key")
            await asyncio.sleep(1.2)  # the files are looked at once a second at most
            assert isinstance(await taxonomy_over(pki.channel(port, None), key), str)
            renew("server.pem")
            await asyncio.sleep(1.2)
            # New connections get the renewed certificate...
            assert isinstance(await taxonomy_over(renewed.channel(port, None), key), str)
            unavailable = grpc.StatusCode.UNAVAILABLE
            assert await taxonomy_over(pki.channel(port, None), key) == unavailable
            # ...while the connection opened before keeps serving calls.
            await stub.GetTaxonomy(pb.GetTaxonomyRequest(), metadata=metadata, timeout=10)
            await before.close()

    asyncio.run(asyncio.wait_for(run(), 60))


# ------------------------------------------------- client certificates mapped to tenants
SPIFFE_ID = "spiffe://example.org/ns/shop/sa/tagger"
MAPPINGS = f"""certificates:
  - {{id: tagger, uri: "{SPIFFE_ID}", tenant: shop, scopes: [analyze]}}
  - {{id: batch, dns: Batch.Internal.Example, tenant: acme, scopes: [analyze, embed]}}
  - {{id: legacy, cn: client-1, tenant: default, scopes: [analyze, embed]}}
"""


def test_the_key_file_maps_certificates_and_keeps_them_when_a_key_is_added(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.yaml"
    create_key(path, "dev")
    path.write_text(path.read_text() + MAPPINGS)
    create_key(path, "ci", tenant="acme")  # rewrites the file: the mappings stay
    loaded = parse_key_file(path)
    assert [k.id for k in loaded.keys] == [k.id for k in read_keys_file(path)] == ["dev", "ci"]
    assert [(c.id, c.kind, c.name, c.tenant) for c in loaded.certificates] == [
        ("tagger", "uri", SPIFFE_ID, "shop"),
        ("batch", "dns", "Batch.Internal.Example", "acme"),
        ("legacy", "cn", "client-1", "default"),
    ]
    assert loaded.certificates[0].scopes == frozenset({"analyze"})


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{id: c, tenant: acme, scopes: [analyze]}", "expected exactly one of cn, dns, uri"),
        ("{id: c, cn: a, dns: a.example, tenant: acme, scopes: [analyze]}", "exactly one"),
        ("{id: c, uri: 'spiffe://x/a b', tenant: acme, scopes: [analyze]}", "uri: not a valid"),
        ("{id: c, dns: 'a..example', tenant: acme, scopes: [analyze]}", "dns: not a valid"),
        ("{id: c, cn: client-1, tenant: acme, scopes: [analyze]}", "mapped twice"),
        ("{id: c, cn: other, scopes: [analyze]}", "tenant"),  # no tenant: no shared quota
        ("{id: c, cn: other, tenant: acme}", "scopes"),  # not every scope
        ("{id: legacy, cn: other, tenant: acme, scopes: [analyze]}", "duplicate id"),
    ],
)
def test_a_certificate_entry_that_would_fail_open_refuses_the_file_naming_its_line(
    tmp_path: Path, entry: str, problem: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys: []\ncertificates:\n"
        "  - {id: legacy, cn: client-1, tenant: acme, scopes: [analyze]}\n"
        f"  - {entry}\n"
    )
    with pytest.raises(KeyFileError, match=rf"certificates\[1\] \(line 4\).*{problem}"):
        KeyStore(path)  # at start: the gateway does not start


Peer = tuple[bytes, bytes] | None


def test_a_client_certificate_maps_to_its_tenant_and_scopes(tmp_path: Path, pki: Pki) -> None:
    """Over mutual TLS: the certificate alone identifies a mapped caller; an unmapped one
    needs a key; a key must agree with the tenant of the certificate it comes with."""
    spiffe = pki.client_with("tagger-7f9c", uris=(SPIFFE_ID,))
    batch = pki.client_with("batch", dns=("batch.internal.example",))
    unmapped = pki.client_with("client-9", dns=("unknown.example",))

    async def analyze(
        port: int, client: Peer, key: str | None = None, embeddings: bool = False
    ) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        """An Analyze of an empty image: EMPTY_IMAGE (INVALID_ARGUMENT) once admitted."""
        request = pb.AnalyzeRequest(
            image=pb.Image(data=b""),
            options=pb.AnalyzeOptions(include_embeddings=embeddings),
        )
        async with pki.channel(port, client) as channel:
            stub = pb_grpc.FashionAnalysisServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Analyze(
                    request, metadata=(("x-api-key", key),) if key else (), timeout=10
                )
        return info.value.code(), *error_info(info.value)

    async def run() -> None:
        async with tls_gateway(tmp_path, pki, tls_client_ca_file=pki.ca) as (port, key):
            keys = tmp_path / "keys.yaml"
            acme_key = create_key(keys, "acme-reader", tenant="acme", scopes=["analyze"])
            keys.write_text(keys.read_text() + MAPPINGS)
            await asyncio.sleep(1.2)  # the key file is looked at once a second at most
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            # The certificate alone: its tenant and scopes.
            assert (await analyze(port, spiffe))[:2] == (invalid, "EMPTY_IMAGE")
            code, reason, meta = await analyze(port, spiffe, embeddings=True)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE")
            assert (meta["tenant"], meta["keyId"]) == ("shop", "cert:tagger")
            assert (await analyze(port, batch, embeddings=True))[:2] == (invalid, "EMPTY_IMAGE")
            # A certificate mapped to no tenant, without a key: refused, its names said.
            code, reason, meta = await analyze(port, unmapped)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "CERTIFICATE_NOT_MAPPED")
            assert meta["certificate"] == "CN=client-9, DNS:unknown.example"
            # ... with a key: the key counts, as without mappings.
            assert (await analyze(port, unmapped, key))[:2] == (invalid, "EMPTY_IMAGE")
            # A key of another tenant than its certificate's: refused.
            code, reason, meta = await analyze(port, spiffe, key)
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "TENANT_MISMATCH")
            assert (meta["tenant"], meta["certificateTenant"]) == ("default", "shop")
            # The same tenant: the scopes both grant (the key has no embed).
            code, reason, meta = await analyze(port, batch, acme_key, embeddings=True)
            assert (code, reason, meta["keyId"]) == (
                grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE", "acme-reader"
            )  # fmt: skip
            # Refused before the request is read: a body that does not parse is not seen.
            async with pki.channel(port, unmapped) as channel:
                raw = channel.unary_unary(
                    "/fashion.v1.FashionAnalysisService/Analyze",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw(b"\xff\xff not a protobuf", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Streams are identified the same way.
            async with pki.channel(port, spiffe) as channel:
                stub = pb_grpc.FashionAnalysisServiceStub(channel)
                call = stub.StreamAnalyze(
                    iter([pb.StreamAnalyzeRequest(request_id="a", image=pb.Image(data=b""))])
                )
                replies = [r async for r in call]
                assert [r.request_id for r in replies] == ["a"]
            # Mappings are re-read with the file: removed, the certificate is refused.
            keys.write_text(keys.read_text().split("certificates:")[0] + "certificates: []\n")
            await asyncio.sleep(1.2)
            code, reason, _ = await analyze(port, spiffe)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")

    asyncio.run(asyncio.wait_for(run(), 60))


def error_info(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The reason and metadata of a call's ``ErrorInfo``."""
    status = rpc_status.from_call(err)
    assert status is not None and len(status.details) == 1
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason, dict(info.metadata)
