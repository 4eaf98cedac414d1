"""API keys and the key file.

A caller sends ``<key_id>.<secret>`` in the metadata ``x-api-key``. The key file (YAML)
holds only a salted hash of each secret::

    keys:
      - {id: dev, tenant: default, scopes: [analyze, embed, admin],
         hash: "sha256$<salt_hex>$<digest_hex>"}   # digest = sha256(salt + secret)

With mutual TLS (``tls_client_ca_file``), the same file maps client certificates to a
tenant and scopes, by the certificate's subject common name (``cn``), a DNS name (``dns``)
or a URI (``uri``, a SPIFFE ID for instance) of its subject alternative names::

    certificates:
      - {id: tagger, uri: "spiffe://example.org/ns/shop/sa/tagger", tenant: shop,
         scopes: [analyze]}
      - {id: batch, dns: batch.internal.example, tenant: acme, scopes: [analyze, embed]}
      - {id: legacy, cn: client-1, tenant: acme, scopes: [analyze]}

Names are compared exactly (DNS names without regard to case); no wildcards. The first
entry, in file order, whose name the certificate carries maps it
(:mod:`fashionserve.gateway.auth.certificates` reads the peer's names).

Every field is required and checked when the file is read: an entry without scopes or a
tenant, or with a malformed hash or name, refuses the whole file with its line named (at
start the gateway does not start; on a live reload the previous file stays in force),
rather than granting every scope, joining a shared quota, or failing that key's calls later.

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
from fashionserve.gateway.auth.identity import SCOPES, TENANT, UNKNOWN_KEY_ID, Identity, PeerNames
from fashionserve.gateway.auth.watched import WatchedFile
from fashionserve.gateway.failures import Unauthenticated

API_KEY_HEADER = "x-api-key"
HASH_SCHEME = "sha256"
# Longer keys are refused unread: no legitimate key comes near this.
_MAX_API_KEY_CHARS = 256
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH = re.compile(rf"{HASH_SCHEME}\$(?:[0-9a-f]{{2}})+\$[0-9a-f]{{64}}")
# What a certificate entry may name: a common name (at most 64 characters, RFC 5280's
# upper bound, no control characters), a DNS name, or an absolute URI without spaces.
CERTIFICATE_NAMES: dict[str, re.Pattern[str]] = {
    "cn": re.compile(r"[^\x00-\x1f\x7f]{1,64}"),
    "dns": re.compile(
        r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    ),
    "uri": re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]{1,2000}"),
}
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


@dataclass(frozen=True)
class CertificateRecord:
    """One entry of the key file's ``certificates``: which client certificates map to a
    tenant and scopes. ``kind`` is ``cn``, ``dns`` or ``uri``; ``name`` the value to match."""

    id: str
    tenant: str
    scopes: frozenset[str]
    kind: str
    name: str

    def to_dict(self) -> dict[str, Any]:
        """The entry as written to the key file."""
        ordered = [s for s in SCOPES if s in self.scopes]
        return {"id": self.id, self.kind: self.name, "tenant": self.tenant, "scopes": ordered}

    def matches(self, peer: PeerNames) -> bool:
        """Whether the client certificate ``peer`` carries this entry's name."""
        if self.kind == "cn":
            return self.name in peer.common_names
        if self.kind == "dns":
            return self.name.lower() in (d.lower() for d in peer.dns_names)
        return self.name in peer.uris


@dataclass(frozen=True)
class KeyFile:
    """What a key file holds: API keys, and client certificates mapped to tenants."""

    keys: list[KeyRecord]
    certificates: list[CertificateRecord]


def read_keys_file(path: Path) -> list[KeyRecord]:
    """The API keys of a key file (:func:`parse_key_file` reads the certificates too)."""
    return parse_key_file(path).keys


def parse_key_file(path: Path) -> KeyFile:
    """Parse and validate a key file; a missing file raises :class:`KeyFileError`.

    Every entry must name its id, its tenant, a non-empty list of known scopes, and a
    well-formed hash (a key) or exactly one name (a certificate): nothing is defaulted, so
    a forgotten field refuses the file (naming the entry and its line) instead of granting
    every scope or a shared tenant.
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
    if not isinstance(data, dict) or any(
        not isinstance(data.get(section, []), list | None) for section in ("keys", "certificates")
    ):
        raise KeyFileError(
            f"API key file {path}: expected a mapping with a 'keys' list (and optionally "
            "a 'certificates' list)"
        )
    problems: list[str] = []
    keys: list[KeyRecord] = []
    certificates: list[CertificateRecord] = []
    for section in ("keys", "certificates"):
        lines = _entry_lines(root, section)
        for i, entry in enumerate(data.get(section) or []):
            here = f"{section}[{i}] (line {lines[i]})" if i < len(lines) else f"{section}[{i}]"
            found = len(problems)
            if not isinstance(entry, dict):
                problems.append(f"{here}: expected a mapping")
                continue
            entry_id, tenant, scopes = entry.get("id"), entry.get("tenant"), entry.get("scopes", [])
            if not isinstance(entry_id, str) or not _KEY_ID.fullmatch(entry_id):
                problems.append(f"{here} id: expected 1-64 of A-Z a-z 0-9 _ -")
                continue
            taken = keys if section == "keys" else certificates
            if any(r.id == entry_id for r in taken):
                problems.append(f"{here} id: duplicate id {entry_id!r}")
            if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
                problems.append(f"{here} tenant: expected 1-64 of A-Z a-z 0-9 . _ -")
            if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
                problems.append(f"{here} scopes: expected a non-empty list of {list(SCOPES)}")
            if section == "keys":
                hashed = entry.get("hash")
                if not isinstance(hashed, str) or not _HASH.fullmatch(hashed):
                    problems.append(f"{here} hash: expected 'sha256$<salt_hex>$<64 hex digits>'")
                if len(problems) == found:
                    keys.append(KeyRecord(entry_id, str(tenant), frozenset(scopes), str(hashed)))
                continue
            named = [k for k in CERTIFICATE_NAMES if k in entry]
            if len(named) != 1:
                problems.append(f"{here}: expected exactly one of {', '.join(CERTIFICATE_NAMES)}")
                continue
            kind, name = named[0], entry[named[0]]
            if not isinstance(name, str) or not CERTIFICATE_NAMES[kind].fullmatch(name):
                problems.append(f"{here} {kind}: not a valid {_NAME_WHAT[kind]}")
            elif any(c.kind == kind and c.name == name for c in certificates):
                problems.append(f"{here} {kind}: {name!r} is mapped twice")
            if len(problems) == found:
                certificates.append(
                    CertificateRecord(entry_id, str(tenant), frozenset(scopes), kind, str(name))
                )
    if problems:
        raise KeyFileError(f"API key file {path}: " + "; ".join(problems))
    return KeyFile(keys, certificates)


_NAME_WHAT = {
    "cn": "common name (1-64 characters, no control characters)",
    "dns": "DNS name",
    "uri": "URI (scheme:rest, no spaces)",
}


def _entry_lines(root: yaml.Node | None, section: str) -> list[int]:
    """The line (1-based) where each entry of the ``section`` list starts."""
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == section and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def write_keys_file(
    path: Path, records: Iterable[KeyRecord], certificates: Iterable[CertificateRecord] = ()
) -> None:
    """Write the key file atomically, readable by its owner only."""
    doc: dict[str, Any] = {"keys": [r.to_dict() for r in records]}
    mapped = [c.to_dict() for c in certificates]
    if mapped:
        doc["certificates"] = mapped
    text = (
        "# fashionserve API keys: salted hashes only (`fashionserve keys create`).\n"
        + yaml.safe_dump(doc, sort_keys=False)
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
    current = parse_key_file(path) if path.exists() else KeyFile([], [])
    if any(r.id == key_id for r in current.keys):
        raise KeyFileError(f"key id {key_id!r} already exists in {path}")
    secret = secrets.token_urlsafe(_SECRET_BYTES)  # base64url: never contains "."
    records = [*current.keys, KeyRecord(key_id, tenant, scope_set, hash_secret(secret))]
    write_keys_file(path, records, current.certificates)
    return f"{key_id}.{secret}"


class KeyStore(WatchedFile):
    """The keys and certificate mappings of a key file, re-read when the file changes
    (rotation without restart)."""

    what = "API key file"
    error = KeyFileError

    def __init__(self, path: Path) -> None:
        self._records: dict[str, KeyRecord] = {}
        self._certificates: list[CertificateRecord] = []
        super().__init__(path)

    def __len__(self) -> int:
        return len(self._records) + len(self._certificates)

    def _load(self) -> int:
        loaded = parse_key_file(self.path)
        self._records = {r.id: r for r in loaded.keys}
        self._certificates = loaded.certificates
        return len(loaded.keys) + len(loaded.certificates)

    def maps_certificates(self) -> bool:
        """Whether the file (re-read if it changed) maps any client certificate."""
        self.maybe_reload()
        return bool(self._certificates)

    def certificate_identity(self, peer: PeerNames) -> Identity | None:
        """The identity the first matching ``certificates`` entry gives ``peer``, if any."""
        record = next((c for c in self._certificates if c.matches(peer)), None)
        if record is None:
            return None
        return Identity(f"cert:{record.id}", record.tenant, record.scopes)

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
