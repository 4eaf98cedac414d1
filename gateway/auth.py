"""Who is calling: API keys, JWT bearer tokens, mutual TLS, and the interceptor.

**API keys.** A caller sends ``<key_id>.<secret>`` in the metadata ``x-api-key``. The key
file (YAML) holds only a salted hash of each secret::

    keys:
      - {id: dev, tenant: default, scopes: [analyze, embed, admin],
         hash: "sha256$<salt_hex>$<digest_hex>"}   # digest = sha256(salt + secret)

Secrets are 256-bit random strings, so one round of salted SHA-256 is enough (no
password-style stretching is needed against guessing) and comparisons use
``hmac.compare_digest``.

**Bearer tokens.** With ``jwks_file`` set, a caller may instead send
``authorization: Bearer <jwt>``: signed RS256 or ES256 (``none`` and HS* are refused, so a
public key can never be used as a shared secret) by a key of the JWKS, with the configured
``iss`` and ``aud``, an ``exp`` (and ``nbf`` if present) checked with ``jwt_leeway_seconds``
of clock skew. Scopes come from ``scope`` (space-separated) or ``scp`` (a list); the tenant
from the claim named by ``jwt_tenant_claim`` (default ``tenant``), which must be present.
A call carrying both an API key and a token is refused: which one counts would be a guess.

**Mutual TLS** (optional, :func:`server_credentials`) authenticates the connection; the
caller's identity still comes from its key or token.

The key file and the JWKS are re-read when they change (rotation without restart).
:class:`AuthInterceptor` rejects a call before the servicer runs and puts the caller's
:class:`Identity` in :data:`identity_var` for the rest of the call. Health checks and
reflection need no credentials (probes and tools cannot send one; neither reveals anything
secret). Each denial is logged with the key id, token subject or tenant; secrets and
tokens never are.

(grpc ``examples/python/auth/async_customized_auth_server.py``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fashionserve.gateway.errors import (
    SERVICE_PREFIX,
    PermissionDenied,
    Unauthenticated,
    metadata_value,
    request_id_var,
    wrap_handler,
)
from fashionserve.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
JWT_ALGORITHMS = ("RS256", "ES256")
"""The only signature algorithms accepted: asymmetric, so the JWKS holds no secret."""
# Longer credentials are refused unread: no legitimate key or token comes near these.
_MAX_API_KEY_CHARS = 256
_MAX_TOKEN_CHARS = 8192
_LOGGABLE = re.compile(r"^[A-Za-z0-9_.@:/+-]{1,128}$")
SCOPES: tuple[str, ...] = ("analyze", "embed", "admin")
"""``analyze``: the analysis RPCs; ``embed``: embeddings in results; ``admin``: reserved."""
HASH_SCHEME = "sha256"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SALT_BYTES = 16
_SECRET_BYTES = 32  # 256 bits
# How often (seconds) a request may trigger a check of a watched file's modification time.
_RELOAD_CHECK_SECONDS = 1.0

METHOD_SCOPES: dict[str, str] = {
    "/fashion.v1.FashionAnalysisService/Analyze": "analyze",
    "/fashion.v1.FashionAnalysisService/BatchAnalyze": "analyze",
    "/fashion.v1.FashionAnalysisService/StreamAnalyze": "analyze",
}
"""The scope each method needs beyond a valid key (GetTaxonomy and GetServingInfo need none)."""


@dataclass(frozen=True)
class Identity:
    """Who is calling: the API key id (``jwt:<sub>`` for a bearer token), its tenant and
    its scopes."""

    key_id: str
    tenant: str
    scopes: frozenset[str]


LOCAL_IDENTITY = Identity("local", "default", frozenset(SCOPES))
"""The identity of every call when authentication is turned off."""

identity_var: ContextVar[Identity | None] = ContextVar("identity", default=None)
"""The caller of the current request, set by :class:`AuthInterceptor`."""


def current_identity() -> Identity | None:
    """The caller of the request being served (None outside a request)."""
    return identity_var.get()


def require_scope(scope: str) -> None:
    """Raise PERMISSION_DENIED (reason MISSING_SCOPE) unless the caller has ``scope``."""
    identity = identity_var.get()
    if identity is None or scope not in identity.scopes:
        key_id = identity.key_id if identity else "-"
        tenant = identity.tenant if identity else "-"
        raise PermissionDenied(
            "MISSING_SCOPE",
            f"the caller {key_id!r} lacks the {scope!r} scope this call needs",
            {"scope": scope, "keyId": key_id, "tenant": tenant},
        )


def loggable(value: object) -> str:
    """``value`` if it is a short plain identifier, else ``?``: caller-supplied text goes
    into logs only when it cannot forge a line or smuggle a secret-sized blob."""
    text = str(value)
    return text if _LOGGABLE.match(text) else "?"


# ---------------------------------------------------------------------- hashing
def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """``sha256$<salt_hex>$<digest_hex>`` with digest = sha256(salt + secret)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.sha256(salt + secret.encode()).hexdigest()
    return f"{HASH_SCHEME}${salt.hex()}${digest}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches the stored hash (constant-time comparison)."""
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    if scheme != HASH_SCHEME:
        return False
    digest = hashlib.sha256(salt + secret.encode()).hexdigest()
    return hmac.compare_digest(digest, digest_hex)


# ---------------------------------------------------------------------- key file
class KeyFileError(ValueError):
    """The key file is unreadable or invalid."""


@dataclass(frozen=True)
class KeyRecord:
    """One entry of the key file."""

    id: str
    tenant: str
    scopes: frozenset[str]
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """The entry as written to the key file."""
        ordered = [s for s in SCOPES if s in self.scopes]
        return {"id": self.id, "tenant": self.tenant, "scopes": ordered, "hash": self.hash}


def read_keys_file(path: Path) -> list[KeyRecord]:
    """Parse and validate a key file; a missing file raises :class:`KeyFileError`."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise KeyFileError(f"API key file {path} is not valid YAML: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise KeyFileError(f"API key file {path}: expected a mapping with a 'keys' list")
    records: list[KeyRecord] = []
    problems: list[str] = []
    for i, entry in enumerate(data.get("keys") or []):
        here = f"keys[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{here}: expected a mapping")
            continue
        key_id, tenant = entry.get("id"), entry.get("tenant", "default")
        scopes, hashed = entry.get("scopes", list(SCOPES)), entry.get("hash")
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            problems.append(f"{here}.id: expected 1-64 of A-Z a-z 0-9 _ -")
            continue
        if any(r.id == key_id for r in records):
            problems.append(f"{here}.id: duplicate key id {key_id!r}")
        if not isinstance(tenant, str) or not tenant:
            problems.append(f"{here}.tenant: expected a non-empty string")
        if not isinstance(scopes, list) or any(s not in SCOPES for s in scopes):
            problems.append(f"{here}.scopes: expected a list of {list(SCOPES)}")
            scopes = []
        if not isinstance(hashed, str) or hashed.count("$") != 2:
            problems.append(f"{here}.hash: expected 'sha256$<salt_hex>$<digest_hex>'")
            continue
        records.append(KeyRecord(key_id, str(tenant), frozenset(scopes), hashed))
    if problems:
        raise KeyFileError(f"API key file {path}: " + "; ".join(problems))
    return records


def write_keys_file(path: Path, records: Iterable[KeyRecord]) -> None:
    """Write the key file atomically, readable by its owner only."""
    text = (
        "# fashionserve API keys: salted hashes only (`fashionserve keys create`).\n"
        + yaml.safe_dump({"keys": [r.to_dict() for r in records]}, sort_keys=False)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_key(
    path: Path, key_id: str, tenant: str = "default", scopes: Iterable[str] = SCOPES
) -> str:
    """Create a key, append its hash to the key file (created if missing) and return the
    full key ``<key_id>.<secret>``: the only time the secret exists in clear."""
    if not _KEY_ID.match(key_id):
        raise KeyFileError(f"invalid key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
    scope_set = frozenset(scopes)
    unknown = sorted(scope_set - set(SCOPES))
    if unknown:
        raise KeyFileError(f"unknown scope(s) {unknown}: choose from {list(SCOPES)}")
    records = read_keys_file(path) if path.exists() else []
    if any(r.id == key_id for r in records):
        raise KeyFileError(f"key id {key_id!r} already exists in {path}")
    secret = secrets.token_urlsafe(_SECRET_BYTES)  # base64url: never contains "."
    records.append(KeyRecord(key_id, tenant, scope_set, hash_secret(secret)))
    write_keys_file(path, records)
    return f"{key_id}.{secret}"


class _WatchedFile:
    """A file re-read when its modification time or size changes. A file that became
    invalid or vanished is reported and ignored: what was loaded stays in force."""

    what = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.reload_if_changed(force=True)

    def _load(self) -> int:
        """Parse the file and take its contents into use; return how many entries."""
        raise NotImplementedError

    def maybe_reload(self) -> None:
        """Check the file at most every ``_RELOAD_CHECK_SECONDS`` (called per request)."""
        if time.monotonic() - self._checked > _RELOAD_CHECK_SECONDS:
            self.reload_if_changed()

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the file if it changed; at start (``force``) any problem raises."""
        self._checked = time.monotonic()
        try:
            st = self.path.stat()
        except OSError as exc:
            if force:
                raise self._error(f"cannot read {self.what} {self.path}: {exc.strerror}") from exc
            log.error("%s %s is gone; keeping what was loaded", self.what, self.path)
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return False
        try:
            count = self._load()
        except ValueError:
            if force:
                raise
            log.exception(
                "%s %s changed but is invalid; keeping the previous one", self.what, self.path
            )
            return False
        self._stamp = stamp
        log.info(
            "loaded %d entr%s from %s %s", count, "y" if count == 1 else "ies", self.what, self.path
        )
        return True

    def _error(self, message: str) -> ValueError:
        return ValueError(message)


class KeyStore(_WatchedFile):
    """The keys of a key file, re-read when the file changes (rotation without restart)."""

    what = "API key file"

    def __init__(self, path: Path) -> None:
        self._records: dict[str, KeyRecord] = {}
        super().__init__(path)

    def __len__(self) -> int:
        return len(self._records)

    def _load(self) -> int:
        records = read_keys_file(self.path)
        self._records = {r.id: r for r in records}
        return len(records)

    def _error(self, message: str) -> ValueError:
        return KeyFileError(message)

    def authenticate(self, presented: str | None) -> Identity:
        """The identity of ``presented`` (``<key_id>.<secret>``), or UNAUTHENTICATED."""
        self.maybe_reload()
        if not presented:
            raise Unauthenticated(
                "API_KEY_MISSING",
                f"this call needs an API key in the '{API_KEY_HEADER}' metadata",
                {"header": API_KEY_HEADER},
            )
        key_id, dot, secret = presented.strip().partition(".")
        record = self._records.get(key_id) if dot else None
        # Hash even for an unknown id so a caller cannot tell ids apart by timing.
        ok = verify_secret(secret, record.hash if record else hash_secret("", b"\0" * 16))
        if not dot or len(presented) > _MAX_API_KEY_CHARS:
            raise Unauthenticated(
                "API_KEY_INVALID",
                "the API key is malformed: expected '<key_id>.<secret>' as printed by "
                "`fashionserve keys create`",
                {"header": API_KEY_HEADER},
            )
        if record is None or not ok:
            raise Unauthenticated(
                "API_KEY_INVALID",
                "the API key is not valid: unknown key id or wrong secret",
                {"header": API_KEY_HEADER, "keyId": loggable(key_id)},
            )
        return Identity(record.id, record.tenant, record.scopes)


# ---------------------------------------------------------------------- bearer tokens
class JwksError(ValueError):
    """The JWKS file is unreadable or holds no usable public signing key."""


def read_jwks_file(path: Path) -> dict[str, jwt.PyJWK]:
    """The public signing keys of a JWKS file, by ``kid`` (``""`` for a key without one).

    Only RSA (RS256) and P-256 EC (ES256) public keys are accepted; a private key, a
    symmetric key, another curve or algorithm, or a duplicate ``kid`` is an error.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise JwksError(f"cannot read JWKS file {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JwksError(f"JWKS file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise JwksError(f"JWKS file {path}: expected an object with a non-empty 'keys' list")
    keys: dict[str, jwt.PyJWK] = {}
    for i, entry in enumerate(data["keys"]):
        here = f"JWKS file {path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise JwksError(f"{here}: expected an object")
        kid = entry.get("kid", "")
        if not isinstance(kid, str):
            raise JwksError(f"{here}.kid: expected a string")
        if "d" in entry or entry.get("kty") == "oct":
            raise JwksError(
                f"{here}: holds private or symmetric key material; publish only public keys"
            )
        if entry.get("use", "sig") != "sig":
            raise JwksError(f"{here}.use: expected 'sig'")
        if entry.get("kty") == "RSA":
            algorithm = "RS256"
        elif entry.get("kty") == "EC" and entry.get("crv") == "P-256":
            algorithm = "ES256"
        else:
            raise JwksError(f"{here}: expected an RSA key (RS256) or an EC P-256 key (ES256)")
        if entry.get("alg", algorithm) != algorithm:
            raise JwksError(
                f"{here}.alg: {entry.get('alg')!r} is not accepted for this key; use {algorithm}"
            )
        if kid in keys:
            raise JwksError(f"{here}.kid: duplicate kid {kid!r}")
        try:
            keys[kid] = jwt.PyJWK(entry, algorithm)
        except jwt.PyJWTError as exc:
            raise JwksError(f"{here}: not a valid key: {exc}") from exc
    return keys


def _scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """``scope`` (space-separated, RFC 8693) or ``scp`` (a list); unknown scopes are ignored:
    a token from a shared identity provider carries scopes of other services too."""
    raw = claims.get("scope", claims.get("scp", ""))
    names = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return frozenset(n for n in names if n in SCOPES)


class TokenVerifier(_WatchedFile):
    """Verifies bearer JWTs against the keys of a JWKS file (re-read when it changes)."""

    what = "JWKS file"

    def __init__(
        self, path: Path, *, issuer: str, audience: str, leeway: float, tenant_claim: str
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.tenant_claim = tenant_claim
        self._keys: dict[str, jwt.PyJWK] = {}
        super().__init__(path)

    def _load(self) -> int:
        self._keys = read_jwks_file(self.path)
        return len(self._keys)

    def _error(self, message: str) -> ValueError:
        return JwksError(message)

    def authenticate(self, authorization: str) -> Identity:
        """The identity of an ``authorization`` metadata value, or UNAUTHENTICATED."""
        self.maybe_reload()
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS:
            raise _token_error(
                "TOKEN_MALFORMED", "expected 'authorization: Bearer <jwt>' (a JWT under 8 KiB)"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _token_error("TOKEN_MALFORMED", "the bearer token is not a JWT") from None
        kid, alg = header.get("kid", ""), header.get("alg")
        where = {"kid": loggable(kid)} if kid else {}
        if alg not in JWT_ALGORITHMS:
            raise _token_error(
                "TOKEN_ALGORITHM_REFUSED",
                f"token algorithm {loggable(alg)!r} is refused; accepted: {', '.join(JWT_ALGORITHMS)}",
                where,
            )
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None and not kid and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        if key is None:
            raise _token_error("TOKEN_KEY_UNKNOWN", "no key of the JWKS has the token's kid", where)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],  # the key's own: never the token's choice
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise self._refusal(exc, token, key, where) from None
        subject = loggable(claims.get("sub", "-"))
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise _token_error(
                "TOKEN_CLAIM_MISSING",
                f"the token lacks the {self.tenant_claim!r} claim naming the tenant",
                {**where, "subject": subject},
            )
        return Identity(f"jwt:{subject}", tenant, _scopes_of(claims))

    def _refusal(
        self, exc: jwt.PyJWTError, token: str, key: jwt.PyJWK, where: dict[str, str]
    ) -> Unauthenticated:
        """The UNAUTHENTICATED error for what ``jwt.decode`` raised."""
        claim = getattr(exc, "claim", "?")
        claim_problems: list[tuple[type[jwt.PyJWTError], str, str]] = [
            (jwt.ExpiredSignatureError, "TOKEN_EXPIRED", "the token has expired"),
            (jwt.ImmatureSignatureError, "TOKEN_NOT_YET_VALID", "the token is not valid yet"),
            (
                jwt.InvalidAudienceError,
                "TOKEN_AUDIENCE_INVALID",
                f"the token's audience is not {self.audience!r}",
            ),
            (
                jwt.InvalidIssuerError,
                "TOKEN_ISSUER_INVALID",
                f"the token's issuer is not {self.issuer!r}",
            ),
            (jwt.MissingRequiredClaimError, "TOKEN_CLAIM_MISSING", f"the token lacks {claim!r}"),
        ]
        for kind, reason, message in claim_problems:
            if isinstance(exc, kind):
                # PyJWT checks claims only once the signature is good: the token is
                # authentic, so the subject and tenant it names are worth logging.
                return _token_error(reason, message, {**where, **self._named_in(token, key)})
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return _token_error(
                "TOKEN_ALGORITHM_REFUSED", "the token's algorithm is not its key's", where
            )
        return _token_error(
            "TOKEN_SIGNATURE_INVALID", "the token's signature or encoding is not valid", where
        )

    def _named_in(self, token: str, key: jwt.PyJWK) -> dict[str, str]:
        """Subject and tenant of a token whose signature is good but claims are not."""
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError:
            return {}
        named = {"subject": claims.get("sub"), "tenant": claims.get(self.tenant_claim)}
        return {k: loggable(v) for k, v in named.items() if v is not None}


def _token_error(
    reason: str, message: str, metadata: dict[str, str] | None = None
) -> Unauthenticated:
    return Unauthenticated(reason, message, {"header": AUTHORIZATION_HEADER, **(metadata or {})})


# ---------------------------------------------------------------------- both
class Authenticator:
    """API keys, bearer tokens, or both: turns a call's metadata into an :class:`Identity`."""

    def __init__(self, keys: KeyStore | None, tokens: TokenVerifier | None) -> None:
        if keys is None and tokens is None:
            raise ValueError("an Authenticator needs API keys, a JWKS, or both")
        self.keys = keys
        self.tokens = tokens

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Authenticator:
        """Load the key file and the JWKS the settings name (either may be absent)."""
        keys = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
        if keys is not None and not len(keys) and settings.jwks_file is None:
            log.warning("API key file %s holds no key: every call will be refused", keys.path)
        tokens = None
        if settings.jwks_file is not None:
            assert settings.jwt_issuer and settings.jwt_audience  # the settings model checks
            tokens = TokenVerifier(
                settings.jwks_file,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway=settings.jwt_leeway_seconds,
                tenant_claim=settings.jwt_tenant_claim,
            )
        return cls(keys, tokens)

    def authenticate(self, api_key: str | None, authorization: str | None) -> Identity:
        """The caller's identity from its ``x-api-key`` or ``authorization`` metadata."""
        if api_key and authorization:
            raise Unauthenticated(
                "CREDENTIALS_AMBIGUOUS",
                f"send either '{API_KEY_HEADER}' or '{AUTHORIZATION_HEADER}', not both",
                {"header": f"{API_KEY_HEADER},{AUTHORIZATION_HEADER}"},
            )
        if authorization:
            if self.tokens is None:
                raise Unauthenticated(
                    "TOKEN_NOT_ACCEPTED",
                    f"this gateway does not take bearer tokens; send an API key in "
                    f"'{API_KEY_HEADER}'",
                    {"header": AUTHORIZATION_HEADER},
                )
            return self.tokens.authenticate(authorization)
        if self.keys is None:
            if api_key:
                raise Unauthenticated(
                    "API_KEY_NOT_ACCEPTED",
                    f"this gateway does not take API keys; send "
                    f"'{AUTHORIZATION_HEADER}: Bearer <jwt>'",
                    {"header": API_KEY_HEADER},
                )
            raise _token_error(
                "CREDENTIALS_MISSING",
                f"this call needs '{AUTHORIZATION_HEADER}: Bearer <jwt>' metadata",
            )
        if not api_key and self.tokens is not None:
            raise Unauthenticated(
                "CREDENTIALS_MISSING",
                f"this call needs an API key in '{API_KEY_HEADER}' or "
                f"'{AUTHORIZATION_HEADER}: Bearer <jwt>' metadata",
                {"header": f"{API_KEY_HEADER},{AUTHORIZATION_HEADER}"},
            )
        return self.keys.authenticate(api_key)


# ---------------------------------------------------------------------- mutual TLS
def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port (None: plaintext). With
    ``tls_client_ca_file`` every client must present a certificate that CA signed.

    The files are checked here (PEM, key matching the certificate) so that a mistake stops
    the gateway at start with the file named, not every handshake later.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise OSError(f"cannot read {what} {path}: {exc.strerror}") from exc

    cert = read(settings.tls_cert_file, "tls_cert_file")
    key = read(settings.tls_key_file, "tls_key_file")
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError as exc:
        raise OSError(f"tls_cert_file {settings.tls_cert_file}: not a PEM certificate") from exc
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise OSError(
            f"tls_key_file {settings.tls_key_file}: not an unencrypted PEM private key"
        ) from exc
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise OSError(
            f"tls_key_file {settings.tls_key_file} is not the key of {settings.tls_cert_file}"
        )
    ca = None
    if settings.tls_client_ca_file is not None:
        ca = read(settings.tls_client_ca_file, "tls_client_ca_file")
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise OSError(
                f"tls_client_ca_file {settings.tls_client_ca_file}: not PEM certificates"
            ) from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call of our service before its handler runs.

    With ``authenticator=None`` (auth turned off) every call runs as :data:`LOCAL_IDENTITY`.
    Place it after :class:`fashionserve.gateway.errors.ErrorInterceptor`, which maps its rejections.
    """

    def __init__(self, authenticator: Authenticator | None) -> None:
        self.authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Authenticate, then run the handler with the identity set, or refuse it."""
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        try:
            if self.authenticator is None:
                identity = LOCAL_IDENTITY
            else:
                identity = self.authenticator.authenticate(
                    metadata_value(handler_call_details, API_KEY_HEADER),
                    metadata_value(handler_call_details, AUTHORIZATION_HEADER),
                )
            # Shared with the handler: one contextvars.Context per call (grpc.aio's
            # ServerInterceptor contract).
            identity_var.set(identity)
            if method in METHOD_SCOPES:
                require_scope(METHOD_SCOPES[method])
        except (Unauthenticated, PermissionDenied) as exc:
            rejection = exc
            # Who was refused, as far as it is known: never the secret or the token.
            who = " ".join(
                f"{k}={exc.metadata[k]}"
                for k in ("keyId", "tenant", "subject", "kid")
                if k in exc.metadata
            )
            log.warning(
                "denied request %s %s: %s %s (%s)",
                request_id_var.get(),
                method,
                exc.code.name,
                exc.reason,
                who or "no identity",
            )

            async def reject(context: grpc.aio.ServicerContext) -> None:
                raise rejection

            # The handler is replaced by one that fails before the servicer is called.
            return wrap_handler(handler, before=reject)
        return handler
