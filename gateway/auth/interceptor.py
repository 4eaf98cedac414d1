"""The authentication interceptor: API keys, bearer tokens, client certificates.

:class:`Authenticator` turns a call's metadata (and, over mutual TLS, its client
certificate) into an :class:`Identity`; a call carrying both an API key and a token is
refused (which one counts would be a guess). With mutual TLS and a key file that maps
certificates (its ``certificates`` entries):

* a call with no key or token is the tenant its certificate maps to, and is refused
  (UNAUTHENTICATED, CERTIFICATE_NOT_MAPPED) when the certificate maps to none;
* a call with a key or token whose certificate is mapped must be of the same tenant
  (else PERMISSION_DENIED, TENANT_MISMATCH), and gets the scopes both grant: a stolen key
  cannot leave the tenant of the workload whose certificate it travels with;
* a key or token over a certificate that is not mapped counts alone, as without mapping.

:class:`AuthInterceptor` rejects a call before its request is read, and otherwise puts the
caller's identity in :data:`~fashionserve.gateway.auth.identity.identity_var` for the rest
of the call. Health checks and reflection need no credentials (probes and tools cannot send
one; neither reveals anything secret). Each denial is logged with the key id (only one that
names a known key), token subject, certificate names or tenant; secrets and tokens never
are.

(grpc ``examples/python/auth/async_customized_auth_server.py``.)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fashionserve.gateway.auth.certificates import peer_names
from fashionserve.gateway.auth.identity import (
    LOCAL_IDENTITY,
    Identity,
    PeerNames,
    identity_var,
    require_scope,
)
from fashionserve.gateway.auth.keys import API_KEY_HEADER, KeyStore
from fashionserve.gateway.auth.tokens import AUTHORIZATION_HEADER, TokenVerifier, token_error
from fashionserve.gateway.failures import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    request_id_var,
)
from fashionserve.gateway.handlers import SERVICE_PREFIX, metadata_value, refusing_handler
from fashionserve.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

METHOD_SCOPES: dict[str, str] = {
    "/fashion.v1.FashionAnalysisService/Analyze": "analyze",
    "/fashion.v1.FashionAnalysisService/BatchAnalyze": "analyze",
    "/fashion.v1.FashionAnalysisService/StreamAnalyze": "analyze",
    "/fashion.v1.FashionAnalysisService/SearchSimilar": "search",
}
"""The scope each method needs beyond a valid key (GetTaxonomy and GetServingInfo need none)."""


class Authenticator:
    """API keys, bearer tokens, or both, and client certificates over mutual TLS: turns a
    call's credentials into an :class:`Identity`."""

    def __init__(
        self, keys: KeyStore | None, tokens: TokenVerifier | None, mutual_tls: bool = False
    ) -> None:
        if keys is None and tokens is None:
            raise ValueError("an Authenticator needs API keys, a JWKS, or both")
        self.keys = keys
        self.tokens = tokens
        self.mutual_tls = mutual_tls

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Authenticator:
        """Load the key file and the JWKS the settings name (either may be absent)."""
        keys = KeyStore(settings.api_keys_file) if settings.api_keys_file else None
        if keys is not None and not len(keys) and settings.jwks_file is None:
            log.warning("API key file %s holds no key: every call will be refused", keys.path)
        mutual_tls = settings.tls_client_ca_file is not None
        if keys is not None and keys.maps_certificates() and not mutual_tls:
            log.warning(
                "API key file %s maps client certificates, but the gateway does not ask for "
                "them (tls_client_ca_file is unset): those entries are ignored",
                keys.path,
            )
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
        return cls(keys, tokens, mutual_tls)

    def maps_certificates(self) -> bool:
        """Whether calls are identified by their client certificate too (mutual TLS and a
        key file, as it is now, with ``certificates`` entries)."""
        return self.mutual_tls and self.keys is not None and self.keys.maps_certificates()

    def authenticate_call(
        self, api_key: str | None, authorization: str | None, peer: PeerNames | None
    ) -> Identity:
        """The caller's identity from its metadata and its client certificate ``peer``
        (the precedence is in this module's docstring)."""
        mapped = None
        if peer is not None and self.keys is not None:
            mapped = self.keys.certificate_identity(peer)
        if not api_key and not authorization and peer is not None:
            if mapped is not None:
                return mapped
            raise Unauthenticated(
                "CERTIFICATE_NOT_MAPPED",
                f"the client certificate ({peer.describe()}) maps to no tenant: add its name "
                f"to the key file's 'certificates', or send an API key in '{API_KEY_HEADER}' "
                f"or '{AUTHORIZATION_HEADER}: Bearer <jwt>' metadata",
                {"certificate": peer.describe()},
            )
        identity = self.authenticate(api_key, authorization)
        if mapped is None:
            return identity
        if identity.tenant != mapped.tenant:
            raise PermissionDenied(
                "TENANT_MISMATCH",
                f"the credential's tenant {identity.tenant!r} is not the tenant "
                f"{mapped.tenant!r} the client certificate maps to",
                {
                    "keyId": identity.key_id,
                    "tenant": identity.tenant,
                    "certificateTenant": mapped.tenant,
                    "certificate": peer.describe() if peer else "-",
                },
            )
        return Identity(identity.key_id, identity.tenant, identity.scopes & mapped.scopes)

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
        authenticator = self.authenticator
        api_key = metadata_value(handler_call_details, API_KEY_HEADER)
        authorization = metadata_value(handler_call_details, AUTHORIZATION_HEADER)
        if authenticator is not None and authenticator.maps_certificates():
            # The client certificate is known only to the call's context, inside the
            # handler: the handler is gated instead, still before the request is read.
            async def admit(context: grpc.aio.ServicerContext) -> None:
                _admit(
                    method,
                    lambda: authenticator.authenticate_call(
                        api_key, authorization, peer_names(context)
                    ),
                )

            return gated_handler(handler, admit)
        try:
            # Shared with the handler: one contextvars.Context per call (grpc.aio's
            # ServerInterceptor contract).
            _admit(
                method,
                lambda: (
                    LOCAL_IDENTITY
                    if authenticator is None
                    else authenticator.authenticate(api_key, authorization)
                ),
            )
        except (Unauthenticated, PermissionDenied) as exc:
            rejection = exc

            async def reject(context: grpc.aio.ServicerContext) -> None:
                raise rejection

            # Refused before a byte of the request is read: a caller without valid
            # credentials costs no more than its headers, whatever body it sends.
            return refusing_handler(handler, reject)
        return handler


def _admit(method: str, identify: Callable[[], Identity]) -> None:
    """Set the caller's identity for the call and check the method's scope, or log the
    denial and raise it."""
    try:
        identity = identify()
        identity_var.set(identity)
        if method in METHOD_SCOPES:
            require_scope(METHOD_SCOPES[method])
    except (Unauthenticated, PermissionDenied) as exc:
        # Who was refused, as far as it is known: never the secret or the token.
        who = " ".join(
            f"{k}={exc.metadata[k]}"
            for k in ("keyId", "tenant", "subject", "kid", "certificate")
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
        raise


def gated_handler(
    handler: grpc.RpcMethodHandler,
    admit: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` that awaits ``admit(context)`` before it reads a byte of the
    request, then runs the method's own behaviour.

    Like :func:`~fashionserve.gateway.handlers.refusing_handler`, it takes the requests as
    a stream (gRPC then holds no more of a refused call's body than the HTTP/2
    flow-control window); a unary method's one request is read from that stream once
    ``admit`` has returned.
    """
    behavior: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    streams_in = handler.request_streaming

    async def requests_for(requests: AsyncIterator[Any]) -> Any:
        if streams_in:
            return requests
        async for request in requests:
            return request
        raise InvalidArgument("MALFORMED_REQUEST", "the call ended before its request")

    if handler.response_streaming and inspect.isasyncgenfunction(behavior):

        async def gated_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await admit(context)
            async for response in behavior(await requests_for(requests), context):
                yield response

        gated: Callable[..., Any] = gated_stream
    else:

        async def gated_call(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            await admit(context)
            return await behavior(await requests_for(requests), context)

        gated = gated_call
    factory = (
        grpc.stream_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.stream_unary_rpc_method_handler
    )
    return factory(
        gated,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
