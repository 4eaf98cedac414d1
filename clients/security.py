"""How a client's channel is secured: TLS (optionally mutual), or plaintext.

:class:`ChannelSecurity` holds the options the clients take as keyword arguments (``tls``,
``ca_file``, ``cert_file`` and ``key_file``, ``allow_plaintext_credentials``) and the
command line's flags (:func:`add_flags`: ``--tls``, ``--ca``, ``--cert``, ``--key``,
``--insecure-plaintext``). An API key or a bearer token is sent in plaintext only to a
loopback address (``127.0.0.0/8``, ``::1``, ``localhost``, a Unix socket) unless the caller
allows it explicitly: anywhere else whoever sees the traffic could replay it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fashionserve.clients.errors import ClientSetupError

if TYPE_CHECKING:  # grpc is imported when a channel is made: the command line's flags are cheap
    import grpc

GATEWAY_ENV = "FASHIONSERVE_GATEWAY"
API_KEY_ENV = "FASHIONSERVE_API_KEY"
DEFAULT_GATEWAY = "127.0.0.1:50051"
"""Where every command that calls the gateway finds it and its API key by default."""

# Name-resolver prefixes of a gRPC target (https://grpc.github.io/grpc/core/md_doc_naming.html).
_LOCAL_SCHEMES = ("unix:", "unix-abstract:")
_NETWORK_SCHEMES = ("dns:///", "ipv4:", "ipv6:")


def is_loopback(address: str) -> bool:
    """Whether a gRPC target (``HOST:PORT``, ``[V6]:PORT``, ``dns:///HOST:PORT``,
    ``unix:PATH``...) names this machine only."""
    if address.startswith(_LOCAL_SCHEMES):
        return True
    target = address
    for scheme in _NETWORK_SCHEMES:
        target = target.removeprefix(scheme)
    if target.startswith("["):  # [V6]:PORT
        host = target[1 : target.find("]")]
    elif target.count(":") == 1:  # HOST:PORT
        host = target.split(":")[0]
    else:  # a bare host, or a bare IPv6 address
        host = target
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS or plaintext, as the clients' keyword arguments of the same names say.

    ``tls`` connects with TLS, verifying the server against the system's roots or
    ``ca_file``; ``cert_file`` and ``key_file`` (together) present a client certificate
    (mutual TLS). Any file implies TLS. ``allow_plaintext_credentials`` lets a plaintext
    channel carry credentials to a non-loopback address.
    """

    tls: bool = False
    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    allow_plaintext_credentials: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ClientSetupError(
                "a client certificate and its key go together: give both or neither"
            )

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is TLS."""
        return self.tls or any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))

    def credentials(self, address: str, sends_secret: bool) -> grpc.ChannelCredentials | None:
        """The channel credentials for ``address`` (None: plaintext).

        Raises :class:`ClientSetupError` when ``sends_secret`` (the calls carry an API key
        or a token) would go in plaintext to a non-loopback address without
        ``allow_plaintext_credentials``, or when a file cannot be read.
        """
        self.check(address, sends_secret)
        if not self.uses_tls:
            return None
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA"),
            private_key=_read(self.key_file, "client key"),
            certificate_chain=_read(self.cert_file, "client certificate"),
        )

    def check(self, address: str, sends_secret: bool) -> None:
        """Raise :class:`ClientSetupError` when ``sends_secret`` would go in plaintext to a
        non-loopback ``address`` without ``allow_plaintext_credentials``."""
        if (
            sends_secret
            and not self.uses_tls
            and not self.allow_plaintext_credentials
            and not is_loopback(address)
        ):
            raise ClientSetupError(
                f"refusing to send an API key or token in plaintext to {address}, which is "
                "not a loopback address: connect with TLS (--tls, --ca FILE; tls=True, "
                "ca_file=...), or allow plaintext explicitly (--insecure-plaintext; "
                "allow_plaintext_credentials=True) on a network you trust"
            )


def _read(path: str | os.PathLike[str] | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientSetupError(f"cannot read the {what} file {path}: {exc.strerror}") from exc


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--gateway`` and ``--api-key``, defaulting to :data:`GATEWAY_ENV` and
    :data:`API_KEY_ENV`, to a command that calls the gateway."""
    parser.add_argument(
        "--gateway",
        default=os.environ.get(GATEWAY_ENV, DEFAULT_GATEWAY),
        metavar="HOST:PORT",
        help=f"gateway address (env {GATEWAY_ENV}; default {DEFAULT_GATEWAY})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        metavar="KEY",
        help=f"API key, <key_id>.<secret> (env {API_KEY_ENV})",
    )


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the channel flags to a command that calls the gateway."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS (implied by --ca, --cert, --key)"
    )
    group.add_argument(
        "--ca", type=Path, metavar="FILE", help="PEM CA to verify the gateway (default: system)"
    )
    group.add_argument(
        "--cert", type=Path, metavar="FILE", help="PEM client certificate (mutual TLS)"
    )
    group.add_argument("--key", type=Path, metavar="FILE", help="PEM key of --cert")
    group.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="send the API key or token without TLS to a non-loopback address",
    )


def from_flags(args: argparse.Namespace) -> ChannelSecurity:
    """The :class:`ChannelSecurity` of the flags :func:`add_flags` added."""
    return ChannelSecurity(
        tls=args.tls,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        allow_plaintext_credentials=args.insecure_plaintext,
    )
