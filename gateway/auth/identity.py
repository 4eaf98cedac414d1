"""Who is calling: the :class:`Identity` of a call, the scopes, and where it is kept.

The authentication interceptor puts the caller's identity in :data:`identity_var`; the rest
of the call (the analyzer, telemetry, logs) reads it from there. Nothing here knows gRPC.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass

from fashionserve.gateway.failures import PermissionDenied

SCOPES: tuple[str, ...] = ("analyze", "embed", "search", "admin")
"""``analyze``: the analysis RPCs; ``embed``: embeddings in results; ``search``:
SearchSimilar (visual search); ``admin``: reserved."""
TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What a tenant name may be, from a key file or a token: it becomes a log field and a
Prometheus label value, so it can neither forge a log line nor grow without bound."""
UNKNOWN_KEY_ID = "<unknown>"
"""Logged in place of a key id that names no key: what a caller sends there may be a
secret pasted in the wrong place."""
_LOGGABLE = re.compile(r"[A-Za-z0-9_.@:/+-]{1,128}")


@dataclass(frozen=True)
class Identity:
    """Who is calling: the API key id (``jwt:<sub>`` for a bearer token), its tenant and
    its scopes."""

    key_id: str
    tenant: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class PeerNames:
    """The names a client certificate (verified against the client CA) carries: its
    subject's common names and its subject alternative names of DNS and URI type."""

    common_names: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()

    def describe(self) -> str:
        """The names, for an error message or a log line (each made :func:`loggable`)."""
        parts = [
            *(f"CN={loggable(n)}" for n in self.common_names),
            *(f"DNS:{loggable(n)}" for n in self.dns_names),
            *(f"URI:{loggable(n)}" for n in self.uris),
        ]
        return ", ".join(parts) or "no subject name"


LOCAL_IDENTITY = Identity("local", "default", frozenset(SCOPES))
"""The identity of every call when authentication is turned off."""

identity_var: ContextVar[Identity | None] = ContextVar("identity", default=None)
"""The caller of the current request, set by
:class:`fashionserve.gateway.auth.interceptor.AuthInterceptor`."""


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
    return text if _LOGGABLE.fullmatch(text) else "?"
