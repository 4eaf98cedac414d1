"""The authentication interceptor: API keys, bearer tokens, or both.

:class:`Authenticator` turns a call's metadata into an :class:`Identity`; a call carrying
both an API key and a token is refused (which one counts would be a guess).
:class:`AuthInterceptor` rejects a call from its metadata alone, before its request is read,
and otherwise puts the caller's identity in
:data:`~fashionserve.gateway.auth.identity.identity_var` for the rest of the call. Health
checks and reflection need no credentials (probes and tools cannot send one; neither
reveals anything secret). Each denial is logged with the key id (only one that names a
known key), token subject or tenant; secrets and tokens never are.

(grpc ``examples/python/auth/async_customized_auth_server.py``.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from fashionserve.gateway.auth.identity import (
    LOCAL_IDENTITY,
    Identity,
    identity_var,
    require_scope,
)
from fashionserve.gateway.auth.keys import API_KEY_HEADER, KeyStore
from fashionserve.gateway.auth.tokens import AUTHORIZATION_HEADER, TokenVerifier, token_error
from fashionserve.gateway.failures import PermissionDenied, Unauthenticated, request_id_var
from fashionserve.gateway.handlers import SERVICE_PREFIX, metadata_value, refusing_handler
from fashionserve.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

METHOD_SCOPES: dict[str, str] = {
    "/fashion.v1.FashionAnalysisService/Analyze": "analyze",
    "/fashion.v1.FashionAnalysisService/BatchAnalyze": "analyze",
    "/fashion.v1.FashionAnalysisService/StreamAnalyze": "analyze",
}
"""The scope each method needs beyond a valid key (GetTaxonomy and GetServingInfo need none)."""


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
                max_lifetime=settings.jwt_max_lifetime_seconds,
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
            raise token_error(
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
                exc.kind.name,
                exc.reason,
                who or "no identity",
            )

            async def reject(context: grpc.aio.ServicerContext) -> None:
                raise rejection

            # Refused before a byte of the request is read: a caller without valid
            # credentials costs no more than its headers, whatever body it sends.
            return refusing_handler(handler, reject)
        return handler
