"""TLS for the listening port, optionally mutual (the connection is authenticated; the
caller's identity still comes from its key or token).

The certificate, its key and the client CA are re-read when one of them changes
(cert-manager renews a certificate by rewriting its Secret's files): gRPC asks
:meth:`ServerCertificates.fetch` for the configuration at every new connection's handshake,
so new connections get the renewed certificate while open ones, and the calls on them,
carry on with the one they started with.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fashionserve.errors import InvalidInput
from fashionserve.gateway.auth.watched import WatchedFile
from fashionserve.gateway.settings import GatewaySettings


class TlsFileError(InvalidInput):
    """A TLS certificate, key or CA file is unreadable or invalid."""


class ServerCertificates(WatchedFile):
    """The port's certificate chain and key, and the client CA for mutual TLS, checked
    (PEM, the key matching the certificate) and re-read together when one changes."""

    what = "TLS certificate"
    error = TlsFileError

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self.configuration: grpc.ServerCertificateConfiguration | None = None
        super().__init__(cert_file, key_file, *([client_ca_file] if client_ca_file else []))

    def _load(self) -> int:
        cert = _read(self.cert_file, "tls_cert_file")
        key = _read(self.key_file, "tls_key_file")
        try:
            chain = x509.load_pem_x509_certificates(cert)
        except ValueError as exc:
            raise TlsFileError(f"tls_cert_file {self.cert_file}: not a PEM certificate") from exc
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise TlsFileError(
                f"tls_key_file {self.key_file}: not an unencrypted PEM private key"
            ) from exc
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if private.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(
            der, spki
        ):
            raise TlsFileError(f"tls_key_file {self.key_file} is not the key of {self.cert_file}")
        ca = None
        if self.client_ca_file is not None:
            ca = _read(self.client_ca_file, "tls_client_ca_file")
            try:
                x509.load_pem_x509_certificates(ca)
            except ValueError as exc:
                raise TlsFileError(
                    f"tls_client_ca_file {self.client_ca_file}: not PEM certificates"
                ) from exc
        self.configuration = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca
        )
        return len(chain)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher, called at each handshake: the new
        configuration when the files changed (and are valid), else None (keep the one in
        use)."""
        return self.configuration if self.maybe_reload() else None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port (None: plaintext), re-read when the files
    change. With ``tls_client_ca_file`` every client must present a certificate that CA
    signed.

    The files are checked here so that a mistake stops the gateway at start with the file
    named, not every handshake later; a mistake in a renewal is logged and the certificate
    in use stays.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    certificates = ServerCertificates(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    assert certificates.configuration is not None  # loaded by the constructor, or raised
    return grpc.dynamic_ssl_server_credentials(
        certificates.configuration,
        certificates.fetch,  # the credentials keep it, and with it the watched files
        require_client_authentication=settings.tls_client_ca_file is not None,
    )
