"""TLS for the listening port, optionally mutual (the connection is authenticated; the
caller's identity still comes from its key or token)."""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fashionserve.gateway.settings import GatewaySettings


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
