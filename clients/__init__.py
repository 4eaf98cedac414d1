"""What callers import to use the fashion analysis service.

* :class:`FashionClient` (blocking) and :class:`AsyncFashionClient` (asyncio): the same
  methods, ``analyze``, ``batch_analyze``, ``stream_analyze``, ``search_similar``,
  ``get_taxonomy`` and ``get_serving_info``, returning the typed results of
  :mod:`fashionserve.clients.types`;
* :class:`FashionServeError`: every failed call, with its status code, reason and metadata;
* :class:`ChannelSecurity`: TLS (optionally mutual) or plaintext, as the clients' keyword
  arguments say; :class:`ClientSetupError` when a client would send credentials in
  plaintext to another machine;
* :class:`RetryPolicy`: how UNAVAILABLE is retried.

The package imports grpc only when one of these names is first used, so that commands
which never call the service (``fashionserve data synth``...) do not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fashionserve.clients.aio_client import AsyncFashionClient
    from fashionserve.clients.errors import ClientSetupError, FashionServeError
    from fashionserve.clients.retry import RetryPolicy
    from fashionserve.clients.security import ChannelSecurity
    from fashionserve.clients.sync_client import FashionClient
    from fashionserve.clients.types import (
        AnalyzeOptions,
        BatchEntry,
        Box,
        DecisionThreshold,
        GarmentResult,
        ImageResult,
        ItemError,
        Limits,
        ScoredLabel,
        SearchIndexInfo,
        SearchMatch,
        SearchResult,
        ServedModel,
        ServingInfo,
        StreamEntry,
        StreamRequest,
        TagGroupResult,
        TaxonomyInfo,
        ThresholdSetInfo,
    )

_MODULES: dict[str, str] = {
    "AnalyzeOptions": "fashionserve.clients.types",
    "AsyncFashionClient": "fashionserve.clients.aio_client",
    "BatchEntry": "fashionserve.clients.types",
    "Box": "fashionserve.clients.types",
    "ChannelSecurity": "fashionserve.clients.security",
    "ClientSetupError": "fashionserve.clients.errors",
    "DecisionThreshold": "fashionserve.clients.types",
    "FashionClient": "fashionserve.clients.sync_client",
    "FashionServeError": "fashionserve.clients.errors",
    "GarmentResult": "fashionserve.clients.types",
    "ImageResult": "fashionserve.clients.types",
    "ItemError": "fashionserve.clients.types",
    "Limits": "fashionserve.clients.types",
    "RetryPolicy": "fashionserve.clients.retry",
    "SearchIndexInfo": "fashionserve.clients.types",
    "SearchMatch": "fashionserve.clients.types",
    "SearchResult": "fashionserve.clients.types",
    "ScoredLabel": "fashionserve.clients.types",
    "ServedModel": "fashionserve.clients.types",
    "ServingInfo": "fashionserve.clients.types",
    "StreamEntry": "fashionserve.clients.types",
    "StreamRequest": "fashionserve.clients.types",
    "TagGroupResult": "fashionserve.clients.types",
    "TaxonomyInfo": "fashionserve.clients.types",
    "ThresholdSetInfo": "fashionserve.clients.types",
}

__all__ = [
    "AnalyzeOptions",
    "AsyncFashionClient",
    "BatchEntry",
    "Box",
    "ChannelSecurity",
    "ClientSetupError",
    "DecisionThreshold",
    "FashionClient",
    "FashionServeError",
    "GarmentResult",
    "ImageResult",
    "ItemError",
    "Limits",
    "RetryPolicy",
    "ScoredLabel",
    "SearchIndexInfo",
    "SearchMatch",
    "SearchResult",
    "ServedModel",
    "ServingInfo",
    "StreamEntry",
    "StreamRequest",
    "TagGroupResult",
    "TaxonomyInfo",
    "ThresholdSetInfo",
]


def __getattr__(name: str) -> Any:
    """Import the public names lazily (PEP 562)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
