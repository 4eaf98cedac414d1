"""API keys and the key file.

A caller sends ``<key_id>.<secret>`` in the metadata ``x-api-key``. The key file (YAML)
holds only a salted hash of each secret::

    keys:
      - {id: dev, tenant: default, scopes: [analyze, embed, admin],
         hash: "sha256$<salt_hex>$<digest_hex>"}   # digest = sha256(salt + secret)

Every field is required and checked when the file is read: an entry without scopes or a
tenant, or with a malformed hash, refuses the whole file with its line named (at start the
gateway does not start; on a live reload the previous file stays in force), rather than
granting every scope, joining a shared quota, or failing that key's calls later.

Secrets are 256-bit random strings, so one round of salted SHA-256 is enough (no
password-style stretching is needed against guessing) and comparisons use
``hmac.compare_digest``. :func:`create_key` backs ``fashionserve keys create``;
:class:`KeyStore` re-reads the file when it changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fashionserve.errors import InvalidInput
from fashionserve.gateway.auth.identity import SCOPES, TENANT, UNKNOWN_KEY_ID, Identity
from fashionserve.gateway.auth.watched import WatchedFile
from fashionserve.gateway.failures import Unauthenticated

API_KEY_HEADER = "x-api-key"
HASH_SCHEME = "sha256"
# Longer keys are refused unread: no legitimate key comes near this.
_MAX_API_KEY_CHARS = 256
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH = re.compile(rf"{HASH_SCHEME}\$(?:[0-9a-f]{{2}})+\$[0-9a-f]{{64}}")
_SALT_BYTES = 16
_SECRET_BYTES = 32  # 256 bits


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
class KeyFileError(InvalidInput):
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
    """Parse and validate a key file; a missing file raises :class:`KeyFileError`.

    Every entry must name its key id, its tenant, a non-empty list of known scopes and a
    well-formed hash: nothing is defaulted, so a forgotten field refuses the file (naming
    the entry and its line) instead of granting every scope or a shared tenant.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc.strerror}") from exc
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data: Any = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise KeyFileError(f"API key file {path} is not valid YAML: {exc}") from exc
    data = data or {}
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise KeyFileError(f"API key file {path}: expected a mapping with a 'keys' list")
    lines = _entry_lines(root)
    records: list[KeyRecord] = []
    problems: list[str] = []
    for i, entry in enumerate(data.get("keys") or []):
        here = f"keys[{i}] (line {lines[i]})" if i < len(lines) else f"keys[{i}]"
        found = len(problems)
        if not isinstance(entry, dict):
            problems.append(f"{here}: expected a mapping")
            continue
        key_id, tenant = entry.get("id"), entry.get("tenant")
        scopes, hashed = entry.get("scopes", []), entry.get("hash")
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            problems.append(f"{here} id: expected 1-64 of A-Z a-z 0-9 _ -")
            continue
        if any(r.id == key_id for r in records):
            problems.append(f"{here} id: duplicate key id {key_id!r}")
        if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
            problems.append(f"{here} tenant: expected 1-64 of A-Z a-z 0-9 . _ -")
        if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
            problems.append(f"{here} scopes: expected a non-empty list of {list(SCOPES)}")
        if not isinstance(hashed, str) or not _HASH.fullmatch(hashed):
            problems.append(f"{here} hash: expected 'sha256$<salt_hex>$<64 hex digits>'")
        if len(problems) == found:
            records.append(KeyRecord(key_id, str(tenant), frozenset(scopes), str(hashed)))
    if problems:
        raise KeyFileError(f"API key file {path}: " + "; ".join(problems))
    return records


def _entry_lines(root: yaml.Node | None) -> list[int]:
    """The line (1-based) where each entry of the ``keys`` list starts."""
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "keys" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


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
    if not _KEY_ID.fullmatch(key_id):
        raise KeyFileError(f"invalid key id {key_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
    if not TENANT.fullmatch(tenant):
        raise KeyFileError(f"invalid tenant {tenant!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    scope_set = frozenset(scopes)
    unknown = sorted(scope_set - set(SCOPES))
    if unknown:
        raise KeyFileError(f"unknown scope(s) {unknown}: choose from {list(SCOPES)}")
    if not scope_set:
        raise KeyFileError(f"a key needs at least one scope of {list(SCOPES)}")
    records = read_keys_file(path) if path.exists() else []
    if any(r.id == key_id for r in records):
        raise KeyFileError(f"key id {key_id!r} already exists in {path}")
    secret = secrets.token_urlsafe(_SECRET_BYTES)  # base64url: never contains "."
    records.append(KeyRecord(key_id, tenant, scope_set, hash_secret(secret)))
    write_keys_file(path, records)
    return f"{key_id}.{secret}"


class KeyStore(WatchedFile):
    """The keys of a key file, re-read when the file changes (rotation without restart)."""

    what = "API key file"
    error = KeyFileError

    def __init__(self, path: Path) -> None:
        self._records: dict[str, KeyRecord] = {}
        super().__init__(path)

    def __len__(self) -> int:
        return len(self._records)

    def _load(self) -> int:
        records = read_keys_file(self.path)
        self._records = {r.id: r for r in records}
        return len(records)

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
                # The id only when it names a key: else it may be a misplaced secret.
                {"header": API_KEY_HEADER, "keyId": key_id if record else UNKNOWN_KEY_ID},
            )
        return Identity(record.id, record.tenant, record.scopes)
