"""What callers import to use the fashion analysis service.

* :class:`FashionClient` (blocking) and :class:`AsyncFashionClient` (asyncio): the same
  methods, ``analyze``, ``batch_analyze``, ``stream_analyze``, ``get_taxonomy`` and
  ``get_serving_info``, returning the typed results of :mod:`clients.types`;
* :class:`FashionServeError`: every failed call, with its status code, reason and metadata;
* :class:`RetryPolicy`: how UNAVAILABLE is retried.

The package imports grpc only when one of these names is first used, so that commands
which never call the service (``fashionserve data synth``...) do not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.aio_client import AsyncFashionClient
    from clients.errors import FashionServeError
    from clients.retry import RetryPolicy
    from clients.sync_client import FashionClient
    from clients.types import (
        AnalyzeOptions,
        BatchEntry,
        Box,
        GarmentResult,
        ImageResult,
        ItemError,
        Limits,
        ScoredLabel,
        ServedModel,
        ServingInfo,
        StreamEntry,
        StreamRequest,
        TagGroupResult,
        TaxonomyInfo,
    )

_MODULES: dict[str, str] = {
    "AnalyzeOptions": "clients.types",
    "AsyncFashionClient": "clients.aio_client",
    "BatchEntry": "clients.types",
    "Box": "clients.types",
    "FashionClient": "clients.sync_client",
    "FashionServeError": "clients.errors",
    "GarmentResult": "clients.types",
    "ImageResult": "clients.types",
    "ItemError": "clients.types",
    "Limits": "clients.types",
    "RetryPolicy": "clients.retry",
    "ScoredLabel": "clients.types",
    "ServedModel": "clients.types",
    "ServingInfo": "clients.types",
    "StreamEntry": "clients.types",
    "StreamRequest": "clients.types",
    "TagGroupResult": "clients.types",
    "TaxonomyInfo": "clients.types",
}

__all__ = [
    "AnalyzeOptions",
    "AsyncFashionClient",
    "BatchEntry",
    "Box",
    "FashionClient",
    "FashionServeError",
    "GarmentResult",
    "ImageResult",
    "ItemError",
    "Limits",
    "RetryPolicy",
    "ScoredLabel",
    "ServedModel",
    "ServingInfo",
    "StreamEntry",
    "StreamRequest",
    "TagGroupResult",
    "TaxonomyInfo",
]


def __getattr__(name: str) -> Any:
    """Import the public names lazily (PEP 562)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
