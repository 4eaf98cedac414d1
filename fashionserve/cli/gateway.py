"""The ``fashionserve gateway`` and ``fashionserve keys create`` commands.

Only argparse and the key scopes (a module free of gRPC) are imported at module level:
``fashionserve --help`` must stay fast, so the gateway's heavy imports (grpc, tritonclient)
happen when the command runs. Exit status of ``gateway``: 2 when its settings cannot be used
(as argparse's own errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fashionserve.cli.command import add_command, add_group
from fashionserve.gateway.auth.identity import SCOPES


def add_commands(subparsers: Any) -> None:
    """Add ``gateway`` and ``keys create`` to the ``fashionserve`` command line."""
    p = add_command(
        subparsers,
        "gateway",
        _gateway,
        "run the gRPC gateway in front of Triton",
        description="Run the gRPC gateway (fashion.v1.FashionAnalysisService) in front of "
        "Triton. Settings come from FASHIONSERVE_GATEWAY_* environment variables, then the "
        "--config YAML file, then these flags (flags win).",
        error_status=2,  # every error before serving is a setting that cannot be used
    )
    p.add_argument(
        "--config",
        type=Path,
        help="settings YAML file (default: $FASHIONSERVE_GATEWAY_CONFIG, if set)",
    )
    p.add_argument("--listen-address", metavar="HOST:PORT", help="default 127.0.0.1:50051")
    p.add_argument(
        "--triton-url",
        dest="triton_urls",
        action="append",
        metavar="HOST:PORT",
        help="a Triton server (repeat for several; dns:///HOST:PORT for every address the "
        "name resolves to); default localhost:8001",
    )
    p.add_argument("--api-keys-file", type=Path, help="API key file (`fashionserve keys create`)")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="turn API-key authentication off: local development only",
    )
    p.add_argument("--taxonomy-file", type=Path, help="taxonomy YAML (default: the packaged one)")
    p.add_argument("--max-batch-size", type=int, help="images per ensemble call (default 8)")
    p.add_argument(
        "--max-queue-delay-microseconds",
        type=int,
        help="how long a batch waits to fill (default 0: only while every slot is busy)",
    )
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (0 picks one; default: off)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help='write {"address": "HOST:PORT", "port": N, "metrics_port": M or null} here '
        "once listening",
    )

    keys = add_group(subparsers, "keys", "API keys")
    k = add_command(
        keys,
        "create",
        _keys_create,
        "create an API key and append its hash to a key file",
        description="Create an API key, print it once, and append its salted hash to the "
        "key file (created with mode 0600 if missing). The key cannot be shown again.",
    )
    k.add_argument("--id", required=True, help="key id (A-Z a-z 0-9 _ -), shown in logs")
    k.add_argument("--tenant", default="default", help="tenant the key belongs to")
    k.add_argument(
        "--scopes",
        nargs="+",
        choices=SCOPES,
        default=list(SCOPES),
        help="what the key may do (default: all)",
    )
    k.add_argument("--file", type=Path, required=True, help="the key file")


def _gateway(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from fashionserve.gateway.server import configure_logging, serve
    from fashionserve.gateway.settings import SettingsError, load_settings

    flags: dict[str, Any] = {
        "listen_address": args.listen_address,
        "triton_urls": args.triton_urls,
        "api_keys_file": args.api_keys_file,
        "taxonomy_file": args.taxonomy_file,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_microseconds": args.max_queue_delay_microseconds,
        "log_format": args.log_format,
        "metrics_port": args.metrics_port,
    }
    if args.no_auth:
        flags["auth_enabled"] = False
    try:
        settings = load_settings(args.config, **flags)
    except ValidationError as exc:  # pydantic's, not ours: say it as a settings error
        raise SettingsError(f"invalid gateway settings:\n{_describe(exc)}") from exc
    configure_logging(settings.log_format, verbose=bool(getattr(args, "verbose", False)))
    return serve(settings, ready_file=args.ready_file)


def _describe(exc: Any) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "settings"
        lines.append(f"  - {where}: {error.get('msg')}")
    return "\n".join(lines)


def _keys_create(args: argparse.Namespace) -> int:
    from fashionserve.gateway.auth.keys import create_key

    key = create_key(args.file, args.id, tenant=args.tenant, scopes=args.scopes)
    print(key)  # stdout holds the key alone, for scripts
    print(
        f"API key {args.id!r} created; its hash was added to {args.file}. "
        "Store the key now: it cannot be shown again.",
        file=sys.stderr,
    )
    return 0
