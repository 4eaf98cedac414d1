"""The client certificate of a call over mutual TLS: the names it carries.

gRPC verifies the certificate against ``tls_client_ca_file`` during the handshake and hands
the call the certificate itself (``x509_pem_cert`` in the call's auth context); its names
are read here with ``cryptography`` rather than from gRPC's own summary properties, whose
set and spelling vary across gRPC releases. The key file's ``certificates`` entries map
these names to a tenant (:class:`~fashionserve.gateway.auth.keys.KeyStore`).
"""

from __future__ import annotations

import functools

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from fashionserve.gateway.auth.identity import PeerNames

_PEM_CERT = "x509_pem_cert"


def peer_names(context: grpc.aio.ServicerContext) -> PeerNames | None:
    """The names of the caller's verified client certificate; None without one (plaintext,
    or TLS that does not ask for client certificates)."""
    pem = context.auth_context().get(_PEM_CERT)
    return names_of(bytes(pem[0])) if pem else None


# A connection's calls all present the same certificate: parse it once, not per call.
@functools.lru_cache(maxsize=1024)
def names_of(pem: bytes) -> PeerNames:
    """The subject common names and the DNS and URI alternative names of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    common = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PeerNames(common)
    return PeerNames(
        common,
        tuple(san.get_values_for_type(x509.DNSName)),
        tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
    )
