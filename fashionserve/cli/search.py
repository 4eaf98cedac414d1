"""Visual search commands: ``catalog build|versions|pin`` and ``search``.

``catalog build`` embeds a catalog through the served pipeline and publishes its search
index (:mod:`fashionserve.catalog`); ``catalog versions`` lists the published indexes,
``catalog pin`` chooses the one the gateway serves. ``search IMAGE`` asks the gateway's
``SearchSimilar`` for the catalog products most like the image's garment.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fashionserve.cli.analyze import TOKEN_ENV, _read
from fashionserve.cli.command import add_command, add_group
from fashionserve.clients import security
from fashionserve.errors import InvalidInput


def add_commands(subparsers: Any) -> None:
    """Add ``catalog`` and ``search`` to the ``fashionserve`` command line."""
    group = add_group(subparsers, "catalog", "the catalog's search index (visual search)")
    p = add_command(
        group,
        "build",
        _build,
        "embed a catalog's images through the served pipeline and publish its search index",
    )
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        metavar="SRC",
        help="a manifest (.csv, .parquet, .jsonl: product_id, image, metadata columns), a "
        "`data synth` split folder, or a folder of images (product id = file name)",
    )
    p.add_argument(
        "--repository",
        type=Path,
        required=True,
        metavar="REPO",
        help="the model repository (the index goes to REPO/embedder/search_index/<N>)",
    )
    through = p.add_mutually_exclusive_group(required=True)
    through.add_argument("--triton", metavar="HOST:PORT", help="Triton gRPC address")
    through.add_argument(
        "--gateway", metavar="HOST:PORT", help="gateway address (a key with the embed scope)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(security.API_KEY_ENV),
        help=f"with --gateway (env {security.API_KEY_ENV})",
    )
    security.add_flags(p)

    p = add_command(group, "versions", _versions, "list the published search indexes")
    p.add_argument("--repository", type=Path, required=True, metavar="REPO")

    p = add_command(
        group, "pin", _pin, "serve this search index version whatever is published later"
    )
    p.add_argument("--repository", type=Path, required=True, metavar="REPO")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("version", type=int, nargs="?", help="the version to serve")
    which.add_argument("--newest", action="store_true", help="remove the pin: serve the newest")

    p = add_command(
        subparsers,
        "search",
        _search,
        "find the catalog products most like an image's garment",
        error_status=2,
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="an image file")
    security.add_gateway_flags(p)
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        metavar="JWT",
        help=f"bearer token (JWT) instead of an API key (env {TOKEN_ENV})",
    )
    security.add_flags(p)
    p.add_argument("--k", type=int, default=10, help="how many matches (default 10)")
    p.add_argument("--category", help="only products of this category (metadata filter)")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only products whose metadata KEY equals VALUE (repeatable)",
    )
    p.add_argument(
        "--garment", type=int, metavar="N", help="the image's Nth garment (default: the surest)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds, retries included")


def _build(args: argparse.Namespace) -> int:
    from fashionserve.catalog import build_catalog

    build_catalog(
        args.images,
        args.repository,
        triton=args.triton,
        gateway=args.gateway,
        api_key=args.api_key,
        security=security.from_flags(args),
    )
    return 0


def _versions(args: argparse.Namespace) -> int:
    from fashionserve.catalog import describe_versions

    lines = describe_versions(args.repository)
    print("\n".join(lines) if lines else f"no search index in {args.repository}")
    return 0


def _pin(args: argparse.Namespace) -> int:
    from fashionserve import search_index

    root = search_index.index_root(args.repository)
    search_index.pin(root, None if args.newest else args.version)
    served = search_index.served_version(root)
    print(f"the gateway serves search index version {served} (within search_index_check_seconds)")
    return 0


def _filter(args: argparse.Namespace) -> dict[str, str]:
    where: dict[str, str] = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--where {item!r}: expected KEY=VALUE")
        where[key] = value
    if args.category:
        where["category"] = args.category
    return where


def _search(args: argparse.Namespace) -> int:
    from fashionserve.clients import FashionClient
    from fashionserve.clients.types import to_jsonable

    if args.api_key and args.token:
        raise InvalidInput("pass --api-key or --token, not both")
    data = _read(args.image)
    where = _filter(args)
    with FashionClient(
        args.gateway,
        args.api_key,
        bearer_token=args.token,
        timeout=args.timeout,
        **asdict(security.from_flags(args)),
    ) as client:
        result = client.search_similar(
            data, args.k, garment_index=args.garment, filter=where, include_metadata=True
        )
    if args.json:
        print(json.dumps(to_jsonable(result), indent=2))
        return 0
    index = result.index
    print(
        f"search index version {index.version} ({index.size} products, {index.kind}), "
        f"embedder version {index.embedder_version}"
    )
    if result.query_garment is not None:
        g = result.query_garment
        path = "/".join(s.name for s in g.category_path) or g.detector_class
        print(f"query garment: {path} (score {g.detector_score:.2f}) at {g.box.as_tuple()}")
    if not result.matches:
        print("no match")
    for rank, match in enumerate(result.matches, 1):
        extra = ", ".join(f"{k}={v}" for k, v in sorted(match.metadata.items()))
        print(f"{rank:>3}. {match.product_id:<24} {match.score:.4f}  {extra}")
    return 0
