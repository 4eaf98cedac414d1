"""The reference networks and :func:`build_model`, the registry checkpoints are rebuilt with.

A checkpoint names its architecture (``arch``) and hyper-parameters (``arch_params``);
:func:`build_model` maps them back to a module. A new architecture registers here under a
new name, so older checkpoints keep loading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fashionserve.taxonomy import Taxonomy

Builder = Callable[[dict[str, Any], Taxonomy], nn.Module]


def _detector(params: dict[str, Any], taxonomy: Taxonomy) -> nn.Module:
    from fashionserve.models.detector import build_detector

    params = {"num_classes": len(taxonomy.roots), **params}
    if params["num_classes"] != len(taxonomy.roots):
        raise ValueError(
            f"detector has {params['num_classes']} classes, the taxonomy "
            f"{len(taxonomy.roots)} top-level categories"
        )
    return build_detector(params)


def _tagger(params: dict[str, Any], taxonomy: Taxonomy) -> nn.Module:
    from fashionserve.models.tagger import build_tagger

    return build_tagger(params, taxonomy)


def _embedder(params: dict[str, Any], taxonomy: Taxonomy) -> nn.Module:
    from fashionserve.models.embedder import build_embedder

    return build_embedder(params)


REGISTRY: dict[tuple[str, str], Builder] = {
    ("detector", "centernet-small"): _detector,
    ("tagger", "resnet-tagger-small"): _tagger,
    ("embedder", "bnneck-small"): _embedder,
}
"""``(kind, arch) -> builder``."""

DEFAULT_ARCH: dict[str, str] = {
    "detector": "centernet-small",
    "tagger": "resnet-tagger-small",
    "embedder": "bnneck-small",
}


def build_model(kind: str, arch: str, arch_params: dict[str, Any], taxonomy: Taxonomy) -> nn.Module:
    """A freshly initialised module for ``(kind, arch)`` with ``arch_params``.

    Its ``forward`` returns the contract outputs: detector ``(boxes, scores, classes)``,
    tagger ``logits``, embedder ``embedding``. Raises ``ValueError`` for an unknown
    architecture or parameters that do not fit the taxonomy.
    """
    try:
        builder = REGISTRY[(kind, arch)]
    except KeyError:
        known = ", ".join(f"{k}/{a}" for k, a in REGISTRY)
        raise ValueError(f"unknown architecture {kind}/{arch} (known: {known})") from None
    return builder(dict(arch_params), taxonomy)
