"""Bearer tokens: JWTs verified against a JWKS file.

With ``jwks_file`` set, a caller may send ``authorization: Bearer <jwt>``: signed RS256 or
ES256 (``none`` and HS* are refused, so a public key can never be used as a shared secret)
by a key of the JWKS, with the configured ``iss`` and ``aud``, an ``exp`` (and ``nbf`` if
present) checked with ``jwt_leeway_seconds`` of clock skew. Scopes come from ``scope``
(space-separated) or ``scp`` (a list); the tenant from the claim named by
``jwt_tenant_claim`` (default ``tenant``), which must be present and a plain name
(:data:`~fashionserve.gateway.auth.identity.TENANT`: it becomes a log field and a metric
label). The time claims must be numbers (not numeric strings), and a token may live at
most ``jwt_max_lifetime_seconds`` (``exp`` minus ``iat``, or minus now without ``iat``),
so that a token minted to last for years is refused. The JWKS is re-read when it changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt

from fashionserve.errors import InvalidInput
from fashionserve.gateway.auth.identity import SCOPES, TENANT, UNKNOWN_KEY_ID, Identity, loggable
from fashionserve.gateway.auth.watched import WatchedFile
from fashionserve.gateway.failures import Unauthenticated

AUTHORIZATION_HEADER = "authorization"
JWT_ALGORITHMS = ("RS256", "ES256")
"""The only signature algorithms accepted: asymmetric, so the JWKS holds no secret."""
# Longer tokens are refused unread: no legitimate token comes near this.
_MAX_TOKEN_CHARS = 8192
# The NumericDate claims (RFC 7519): PyJWT takes "1700000000" (a string) for a number.
_TIME_CLAIMS = ("exp", "nbf", "iat")


class JwksError(InvalidInput):
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


class TokenVerifier(WatchedFile):
    """Verifies bearer JWTs against the keys of a JWKS file (re-read when it changes)."""

    what = "JWKS file"
    error = JwksError

    def __init__(
        self,
        path: Path,
        *,
        issuer: str,
        audience: str,
        leeway: float,
        tenant_claim: str,
        max_lifetime: float,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.tenant_claim = tenant_claim
        self.max_lifetime = max_lifetime
        self._keys: dict[str, jwt.PyJWK] = {}
        super().__init__(path)

    def _load(self) -> int:
        self._keys = read_jwks_file(self.path)
        return len(self._keys)

    def authenticate(self, authorization: str) -> Identity:
        """The identity of an ``authorization`` metadata value, or UNAUTHENTICATED."""
        self.maybe_reload()
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS:
            raise token_error(
                "TOKEN_MALFORMED", "expected 'authorization: Bearer <jwt>' (a JWT under 8 KiB)"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise token_error("TOKEN_MALFORMED", "the bearer token is not a JWT") from None
        kid, alg = header.get("kid", ""), header.get("alg")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None and not kid and len(self._keys) == 1:
            key = next(iter(self._keys.values()))
        # The kid only when it names a key of the JWKS: else it is caller text, possibly
        # a secret sent in the wrong place.
        where = {"kid": kid if key is not None else UNKNOWN_KEY_ID} if kid else {}
        if alg not in JWT_ALGORITHMS:
            raise token_error(
                "TOKEN_ALGORITHM_REFUSED",
                f"token algorithm {loggable(alg)!r} is refused; accepted: {', '.join(JWT_ALGORITHMS)}",
                where,
            )
        if key is None:
            raise token_error("TOKEN_KEY_UNKNOWN", "no key of the JWKS has the token's kid", where)
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
        named = {**where, "subject": subject}
        tenant = claims.get(self.tenant_claim)
        if tenant is None or tenant == "":
            raise token_error(
                "TOKEN_CLAIM_MISSING",
                f"the token lacks the {self.tenant_claim!r} claim naming the tenant",
                named,
            )
        if not isinstance(tenant, str) or not TENANT.fullmatch(tenant):
            raise token_error(
                "TOKEN_CLAIM_INVALID",
                f"the token's {self.tenant_claim!r} claim is not a tenant name "
                "(1-64 of A-Z a-z 0-9 . _ -)",
                named,
            )
        self._check_times(claims, {**named, "tenant": tenant})
        return Identity(f"jwt:{subject}", tenant, _scopes_of(claims))

    def _check_times(self, claims: dict[str, Any], named: dict[str, str]) -> None:
        """Refuse time claims that are not numbers and a lifetime over the bound."""
        for claim in _TIME_CLAIMS:
            value = claims.get(claim)
            if claim in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise token_error(
                    "TOKEN_CLAIM_INVALID", f"the token's {claim!r} claim is not a number", named
                )
        issued = claims.get("iat", time.time())
        if claims["exp"] - issued > self.max_lifetime:
            raise token_error(
                "TOKEN_LIFETIME_TOO_LONG",
                f"the token lives longer than the {self.max_lifetime:.0f} s this gateway "
                "accepts (jwt_max_lifetime_seconds)",
                named,
            )

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
                return token_error(reason, message, {**where, **self._named_in(token, key)})
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return token_error(
                "TOKEN_ALGORITHM_REFUSED", "the token's algorithm is not its key's", where
            )
        return token_error(
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


def token_error(
    reason: str, message: str, metadata: dict[str, str] | None = None
) -> Unauthenticated:
    """The UNAUTHENTICATED error of a refused token (its metadata names the header)."""
    return Unauthenticated(reason, message, {"header": AUTHORIZATION_HEADER, **(metadata or {})})
