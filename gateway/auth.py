"""API-key authentication: the key file, and the interceptor that checks every call.

A caller sends ``<key_id>.<secret>`` in the metadata ``x-api-key``. The key file (YAML)
holds only a salted hash of each secret::

    keys:
      - {id: dev, tenant: default, scopes: [analyze, embed, admin],
         hash: "sha256$<salt_hex>$<digest_hex>"}   # digest = sha256(salt + secret)

Secrets are 256-bit random strings, so one round of salted SHA-256 is enough (no
password-style stretching is needed against guessing) and comparisons use
``hmac.compare_digest``. :class:`AuthInterceptor` rejects a call before the servicer runs
and puts the caller's :class:`Identity` in :data:`identity_var` for the rest of the call.
Health checks and reflection need no key (probes and tools cannot send one; neither
reveals anything secret). Secrets are never logged: only key ids are.

(grpc ``examples/python/auth/async_customized_auth_server.py``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
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
import yaml

from gateway.errors import (
    SERVICE_PREFIX,
    PermissionDenied,
    Unauthenticated,
    metadata_value,
    wrap_handler,
)

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
SCOPES: tuple[str, ...] = ("analyze", "embed", "admin")
"""``analyze``: the analysis RPCs; ``embed``: embeddings in results; ``admin``: reserved."""
HASH_SCHEME = "sha256"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SALT_BYTES = 16
_SECRET_BYTES = 32  # 256 bits
# How often (seconds) a request may trigger a check of the key file's modification time.
_RELOAD_CHECK_SECONDS = 1.0

METHOD_SCOPES: dict[str, str] = {
    "/fashion.v1.FashionAnalysisService/Analyze": "analyze",
    "/fashion.v1.FashionAnalysisService/BatchAnalyze": "analyze",
    "/fashion.v1.FashionAnalysisService/StreamAnalyze": "analyze",
}
"""The scope each method needs beyond a valid key (GetTaxonomy and GetServingInfo need none)."""


@dataclass(frozen=True)
class Identity:
    """Who is calling: the key id, its tenant and its scopes."""

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
        raise PermissionDenied(
            "MISSING_SCOPE",
            f"the API key {key_id!r} lacks the {scope!r} scope this call needs",
            {"scope": scope, "keyId": key_id},
        )


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


class KeyStore:
    """The keys of a key file, re-read when the file changes (rotation without restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.reload_if_changed(force=True)

    def __len__(self) -> int:
        return len(self._records)

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the file if its modification time or size changed. A file that became
        invalid is reported and ignored: the previous keys stay in force."""
        self._checked = time.monotonic()
        try:
            st = self.path.stat()
        except OSError as exc:
            if force:
                raise KeyFileError(f"cannot read API key file {self.path}: {exc.strerror}") from exc
            log.error("API key file %s is gone; keeping the keys already loaded", self.path)
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return False
        try:
            records = read_keys_file(self.path)
        except KeyFileError:
            if force:
                raise
            log.exception("API key file changed but is invalid; keeping the previous keys")
            return False
        self._records = {r.id: r for r in records}
        self._stamp = stamp
        log.info("loaded %d API key(s) from %s", len(records), self.path)
        return True

    def authenticate(self, presented: str | None) -> Identity:
        """The identity of ``presented`` (``<key_id>.<secret>``), or UNAUTHENTICATED."""
        if time.monotonic() - self._checked > _RELOAD_CHECK_SECONDS:
            self.reload_if_changed()
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
        if not dot:
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
                {"header": API_KEY_HEADER},
            )
        return Identity(record.id, record.tenant, record.scopes)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key of every call of our service before its handler runs.

    With ``store=None`` (auth turned off) every call runs as :data:`LOCAL_IDENTITY`.
    Place it after :class:`gateway.errors.ErrorInterceptor`, which maps its rejections.
    """

    def __init__(self, store: KeyStore | None) -> None:
        self.store = store

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
            if self.store is None:
                identity = LOCAL_IDENTITY
            else:
                identity = self.store.authenticate(
                    metadata_value(handler_call_details, API_KEY_HEADER)
                )
            # Shared with the handler: one contextvars.Context per call (grpc.aio's
            # ServerInterceptor contract).
            identity_var.set(identity)
            if method in METHOD_SCOPES:
                require_scope(METHOD_SCOPES[method])
        except (Unauthenticated, PermissionDenied) as exc:
            rejection = exc

            async def reject(context: grpc.aio.ServicerContext) -> None:
                raise rejection

            # The handler is replaced by one that fails before the servicer is called.
            return wrap_handler(handler, before=reject)
        return handler
