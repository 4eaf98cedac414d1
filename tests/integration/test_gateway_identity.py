"""Identity and quotas as callers meet them: a real ``fashionserve gateway`` process in front
of real Triton (the conftest's oracle models), API keys and JWT bearer tokens over loopback.

One gateway serves the whole module, with:

* API keys for three tenants (``throttled`` and ``retrying`` with small quotas, ``roomy``
  with the default) and a key lacking the ``analyze`` scope;
* a JWKS with an RSA (RS256) and an EC (ES256) key of a test identity provider.

The last test reads the gateway's log of everything the module did: the denials are there
with key ids and tenants, and no key secret or token is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from conftest import Gateway, Oracle, start_gateway
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from fashionserve.cli import main as cli_main
from fashionserve.clients import FashionClient, FashionServeError
from fashionserve.gateway.auth.keys import create_key
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

ISSUER = "https://idp.test"
AUDIENCE = "fashionserve-it"
RATE = {"throttled": 0.2, "retrying": 0.5}  # images per second; burst 8 for both
MISPLACED_SECRET = "Sup3rS3cretSentAsTheKeyId"
NARROW = {"images_per_second": 1000, "burst_images": 1000, "max_concurrent_images": 8}


@dataclass
class Secured:
    """The gateway, its API keys by id, and every token handed out (for the log check)."""

    gateway: Gateway
    keys: dict[str, str]
    signing: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]
    tokens: list[str] = field(default_factory=list)

    def token(self, kid: str = "rsa", signer: Any = None, **claims: Any) -> str:
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "batch-job"}
        body |= {"tenant": "roomy", "scope": "analyze", "exp": int(time.time()) + 300}
        body |= claims
        algorithm = "RS256" if kid == "rsa" else "ES256"
        token = jwt.encode(body, signer or self.signing[kid], algorithm, {"kid": kid})
        self.tokens.append(token)
        return token

    def call(self, method: str, request: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
        return getattr(self.gateway.stub, method)(request, metadata=metadata, timeout=30)


def details(err: grpc.RpcError) -> tuple[str, float | None]:
    """The ErrorInfo reason and the RetryInfo delay (None without one)."""
    status = rpc_status.from_call(err)
    assert status is not None
    reason, delay = "", None
    for detail in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, delay


@pytest.fixture(scope="module")
def secured(
    own_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("identity")
    keys_file = root / "keys.yaml"
    keys = {
        "alpha": create_key(keys_file, "alpha", tenant="throttled"),
        "retrier": create_key(keys_file, "retrier", tenant="retrying"),
        "beta": create_key(keys_file, "beta", tenant="roomy"),
        "gamma": create_key(keys_file, "gamma", tenant="narrow"),
        "reader": create_key(keys_file, "reader", tenant="roomy", scopes=["admin"]),
    }
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec"},
    ]
    (root / "jwks.json").write_text(json.dumps({"keys": jwks}))
    gateway = start_gateway(
        own_triton.grpc_url,
        root,
        jwks_file=str(root / "jwks.json"),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        tenant_quotas={
            **{t: {"images_per_second": r, "burst_images": 8} for t, r in RATE.items()},
            "narrow": NARROW,
        },
    )
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield Secured(gateway, {**keys, "tests": gateway.key}, {"rsa": rsa_key, "ec": ec_key})
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def scene(oracle: Oracle) -> bytes:
    return oracle.scene(320, 240, [((20, 20, 160, 200), 0)])


def with_key(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def with_token(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ------------------------------------------------------------------------- quotas
def test_a_tenant_over_its_quota_is_throttled_at_once_while_another_is_served(
    secured: Secured, scene: bytes
) -> None:
    batch = pb.BatchAnalyzeRequest(images=[pb.Image(data=scene)] * 8)
    one = pb.AnalyzeRequest(image=pb.Image(data=scene))
    alpha = with_key(secured.keys["alpha"])
    reply = secured.call("BatchAnalyze", batch, alpha)  # the whole burst: 8 images
    assert all(e.HasField("result") for e in reply.entries)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        secured.call("Analyze", one, alpha)
    assert time.monotonic() - started < 1.0  # refused at once, not queued
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, delay = details(info.value)
    assert reason == "TENANT_RATE_LIMITED"
    assert delay is not None and 0 < delay <= 1 / RATE["throttled"]
    # Another tenant, and a token of that tenant, are served meanwhile.
    assert secured.call("Analyze", one, with_key(secured.keys["beta"])).result.garments
    assert secured.call("Analyze", one, with_token(secured.token())).result.garments
    # A stream of the throttled tenant gets the refusal per item; the stream goes on.
    requests = [pb.StreamAnalyzeRequest(request_id="s1", image=pb.Image(data=scene))]
    (answer,) = secured.gateway.stub.StreamAnalyze(iter(requests), metadata=alpha, timeout=30)
    assert answer.error.reason == "TENANT_RATE_LIMITED"
    assert int(answer.error.metadata["retryDelayMs"]) > 0


def test_a_tenant_at_its_concurrency_limit_is_refused_until_its_calls_end(
    secured: Secured, scene: bytes
) -> None:
    batch = pb.BatchAnalyzeRequest(images=[pb.Image(data=scene)] * 8)
    gamma = with_key(secured.keys["gamma"])
    calls = [
        secured.gateway.stub.BatchAnalyze.future(batch, metadata=gamma, timeout=30)
        for _ in range(2)
    ]
    outcomes: list[int | str] = []
    for call in calls:
        try:
            outcomes.append(len(call.result().entries))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            reason, delay = details(err)
            outcomes.append(reason)
            assert delay is not None and delay > 0
    # 8 images in flight at most: one batch served, the other refused while it ran.
    assert sorted(outcomes, key=str) == [8, "TENANT_CONCURRENCY_LIMITED"]
    assert len(secured.call("BatchAnalyze", batch, gamma).entries) == 8  # free again


def test_the_client_waits_as_the_gateway_says_then_succeeds(secured: Secured, scene: bytes) -> None:
    refusals = "refused 1 image(s) of tenant retrying"
    with FashionClient(secured.gateway.address, api_key=secured.keys["retrier"]) as client:
        client.batch_analyze([scene] * 8)  # empties the bucket: the next image needs 2 s
        assert refusals not in secured.gateway.log.read_text()
        # Refused first; its own backoff (3 retries within 0.7 s) would give up before the
        # bucket refills: only waiting the RetryInfo delay gets the call through.
        assert client.analyze(scene).garments
        assert refusals in secured.gateway.log.read_text()
    alpha = FashionClient(secured.gateway.address, api_key=secured.keys["alpha"], retries=0)
    with alpha, pytest.raises(FashionServeError) as info:
        alpha.analyze(scene)
    assert info.value.reason == "TENANT_RATE_LIMITED"
    assert info.value.retry_delay is not None and info.value.retry_delay > 0


# ------------------------------------------------------------------------ identity
def test_valid_rs256_and_es256_tokens_are_served(
    secured: Secured, scene: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = pb.AnalyzeRequest(image=pb.Image(data=scene))
    assert secured.call("Analyze", request, with_token(secured.token("rsa"))).result.garments
    address = secured.gateway.address
    with FashionClient(address, bearer_token=secured.token("ec")) as client:
        assert client.analyze(scene).garments
    with pytest.raises(ValueError, match="not both"):
        FashionClient(address, secured.keys["beta"], bearer_token=secured.token())
    photo = tmp_path / "scene.jpg"
    photo.write_bytes(scene)
    argv = ["analyze", str(photo), "--gateway", address, "--token", secured.token(), "--json"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["images"][0]["garments"]
    info = secured.call(
        "GetServingInfo", pb.GetServingInfoRequest(), with_token(secured.token("ec"))
    )
    assert info.taxonomy_hash


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("wrongly signed", "TOKEN_SIGNATURE_INVALID"),
        ("wrong audience", "TOKEN_AUDIENCE_INVALID"),
        ("key and token together", "CREDENTIALS_AMBIGUOUS"),
        ("wrong key secret", "API_KEY_INVALID"),
        ("a secret where the key id goes", "API_KEY_INVALID"),
        ("a tenant forging a log line", "TOKEN_CLAIM_INVALID"),
        ("a token for a year", "TOKEN_LIFETIME_TOO_LONG"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    secured: Secured, scene: bytes, case: str, reason: str
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    metadata = {
        "expired": lambda: with_token(secured.token(exp=int(time.time()) - 3600)),
        "wrongly signed": lambda: with_token(secured.token(signer=stranger)),
        "wrong audience": lambda: with_token(secured.token(aud="another-service")),
        "key and token together": lambda: (
            *with_key(secured.keys["beta"]),
            *with_token(secured.token()),
        ),
        "wrong key secret": lambda: with_key("beta.not-the-secret"),
        "a secret where the key id goes": lambda: with_key(f"{MISPLACED_SECRET}.x"),
        "a tenant forging a log line": lambda: with_token(
            secured.token(tenant="roomy\nFORGED denied request")
        ),
        "a token for a year": lambda: with_token(secured.token(exp=int(time.time()) + 365 * 86400)),
    }[case]()
    with pytest.raises(grpc.RpcError) as info:
        secured.call("Analyze", pb.AnalyzeRequest(image=pb.Image(data=scene)), metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details(info.value) == (reason, None)


def test_valid_credentials_without_the_scope_are_permission_denied(
    secured: Secured, scene: bytes
) -> None:
    request = pb.AnalyzeRequest(image=pb.Image(data=scene))
    for metadata in (with_key(secured.keys["reader"]), with_token(secured.token(scope="admin"))):
        with pytest.raises(grpc.RpcError) as info:
            secured.call("Analyze", request, metadata)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert details(info.value) == ("MISSING_SCOPE", None)
    # Embeddings need the embed scope: a token with analyze alone may not have them.
    with_embeddings = pb.AnalyzeRequest(
        image=pb.Image(data=scene), options=pb.AnalyzeOptions(include_embeddings=True)
    )
    with pytest.raises(grpc.RpcError) as info:
        secured.call("Analyze", with_embeddings, with_token(secured.token()))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = secured.call(
        "Analyze", with_embeddings, with_token(secured.token(scope="analyze embed"))
    )
    assert reply.result.garments[0].embedding


def test_the_log_names_who_was_refused_and_holds_no_secret_or_token(secured: Secured) -> None:
    """Runs last: the log of every call above."""
    log = secured.gateway.log.read_text()
    assert "denied request" in log and "PERMISSION_DENIED MISSING_SCOPE (keyId=reader" in log
    assert "UNAUTHENTICATED TOKEN_EXPIRED (tenant=roomy subject=batch-job kid=rsa)" in log
    assert "UNAUTHENTICATED API_KEY_INVALID (keyId=beta)" in log
    assert "of tenant throttled: TENANT_RATE_LIMITED" in log
    assert len(secured.tokens) >= 8
    for key in secured.keys.values():
        assert key.partition(".")[2] not in log
    for token in secured.tokens:
        _, payload, signature = token.split(".")
        assert payload not in log and signature not in log
    assert "not-the-secret" not in log
    # A key id is logged only when it names a key; a forged tenant never is.
    assert MISPLACED_SECRET not in log and "API_KEY_INVALID (keyId=<unknown>)" in log
    assert "FORGED" not in log
