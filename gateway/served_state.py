"""What Triton serves, as the gateway understands it, and whether the gateway can serve.

:func:`assess` reads one endpoint's :class:`~fashionserve.gateway.triton_client.EnsembleStatus`
(what Triton reports) into a :class:`ServedState`: the served model versions, the facts
``fashionserve repo build`` records in the ensemble's config ``parameters`` (taxonomy hash
and version, score floor, caps, and ``<model>_sha256`` artifact hashes when the repository
records them), the taxonomy the served tagger was exported with when the ensemble publishes
it, and the verdict: :attr:`ServedState.problem`, why the gateway cannot serve through it
("" when it can). The verdict is computed here, once per probe; the endpoint pool admits
by it and the serving monitor reports it.

:class:`ServedModel` has a namesake in the client library (``fashionserve.clients.types``):
the same facts as GetServingInfo returns them, kept apart because the client may import
only the protos.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from fashionserve import ensemble
from fashionserve import thresholds as threshold_sets
from fashionserve.gateway.triton_client import EnsembleStatus
from fashionserve.taxonomy import Taxonomy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One model of the ensemble as served."""

    name: str
    version: str
    artifact_sha256: str


@dataclass(frozen=True)
class ServedState:
    """What one Triton endpoint serves right now, as far as the gateway can tell, and
    ``problem``: why the gateway cannot serve through it ("" when it can)."""

    ready: bool
    problem: str = ""
    taxonomy_hash: str = ""
    taxonomy_version: str = ""
    models: tuple[ServedModel, ...] = ()
    min_score: float = 0.0
    max_images_per_request: int = 0
    max_crops_per_image: int = 0
    embedding_dimension: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    # The served tagger's own taxonomy, when the ensemble publishes it (verified against
    # taxonomy_hash): the gateway decodes with it, so a rollout that adds labels needs no
    # gateway restart. It decides with the served tagger version's calibrated threshold set
    # when the ensemble publishes one (``thresholds``), with its own thresholds otherwise.
    taxonomy: Taxonomy | None = None
    thresholds: threshold_sets.ThresholdSet | None = None

    @property
    def versions(self) -> str:
        """The served model versions as one string (``detector:1,tagger:2,embedder:1``):
        endpoints that agree on it answer alike; a stream keeps to the one it started on."""
        return ",".join(f"{m.name}:{m.version}" for m in self.models)


def assess(status: EnsembleStatus, taxonomy: Taxonomy) -> ServedState:
    """The served state of one endpoint, with the verdict for a gateway decoding with
    ``taxonomy``."""
    if status.config is None:
        return ServedState(False, status.problem)
    state = served_state_from_config(status.config)
    return replace(state, problem=serving_problem(state, taxonomy))


def serving_problem(state: ServedState, taxonomy: Taxonomy) -> str:
    """Why the ensemble described by ``state`` cannot serve with ``taxonomy`` ("" if it can):
    Triton not ready, or the served tagger exported with another taxonomy that the
    ensemble does not publish (its logits cannot be decoded)."""
    if not state.ready:
        return state.problem
    if state.taxonomy is None and state.taxonomy_hash != taxonomy.hash:
        return (
            f"the served tagger was exported with taxonomy "
            f"{state.taxonomy_version or '?'} (hash {state.taxonomy_hash[:12] or 'unknown'}), "
            f"the gateway decodes with {taxonomy.version} (hash {taxonomy.hash[:12]})"
        )
    return ""


def served_state_from_config(config: Any) -> ServedState:
    """Read the facts ``fashionserve repo build`` records in the ensemble's config.

    Each step names the exact version it calls: that one is served. (The repository index
    is not read: it belongs to Triton's model-repository protocol, which loads models too
    in explicit mode, so a deployment restricts it to administrators.) An artifact hash is
    reported only for the version it was recorded for.
    """
    params = {k: v.string_value for k, v in config.parameters.items()}

    def number(key: str, kind: type[int] | type[float]) -> Any:
        try:
            return kind(params.get(key, "0"))
        except ValueError:
            return kind(0)

    embedding_dim = 0
    for output in config.output:
        if output.name == ensemble.EMBEDDINGS and len(output.dims) >= 1:
            embedding_dim = max(int(output.dims[-1]), 0)
    # A step at -1 (a repository built before steps named their version) calls the newest
    # loaded version, which the build recorded.
    pinned = {
        s.model_name: str(s.model_version)
        for s in config.ensemble_scheduling.step
        if s.model_version > 0
    }
    models: list[ServedModel] = []
    for name in ensemble.MODEL_KINDS:  # the exported models: their versions are reported
        built = params.get(f"{name}_version", "")
        served = pinned.get(name, built)
        sha = params.get(f"{name}_sha256", "") if served == built else ""
        models.append(ServedModel(name, served, sha))
    # The recorded taxonomy hash is that of the tagger version the ensemble was built with;
    # if Triton serves another version, what its logits mean is unknown: no hash.
    tagger = next(m for m in models if m.name == ensemble.TAGGER)
    recorded_tagger = params.get("tagger_version", tagger.version)
    taxonomy_hash = params.get("taxonomy_hash", "") if tagger.version == recorded_tagger else ""
    taxonomy = _published_taxonomy(params.get("taxonomy_document", ""), taxonomy_hash)
    thresholds = None
    if taxonomy is not None and params.get("thresholds_document"):
        try:
            thresholds, taxonomy = threshold_sets.applied(
                params["thresholds_document"], taxonomy, params.get("thresholds_hash", "")
            )
        except threshold_sets.ThresholdsError as exc:
            # Deciding with other thresholds than the served version's would change what
            # callers count without telling them: this endpoint does not serve.
            return ServedState(False, f"the served threshold set cannot be used: {exc}")
    return ServedState(
        taxonomy=taxonomy,
        thresholds=thresholds,
        ready=True,
        taxonomy_hash=taxonomy_hash,
        taxonomy_version=params.get("taxonomy_version", ""),
        models=tuple(models),
        min_score=number("min_score", float),
        max_images_per_request=number("max_images_per_request", int),
        max_crops_per_image=number("max_crops_per_image", int),
        embedding_dimension=embedding_dim,
        parameters=params,
    )


def _published_taxonomy(document: str, expected_hash: str) -> Taxonomy | None:
    """The taxonomy the ensemble publishes, if it parses and hashes to ``expected_hash``."""
    if not document or not expected_hash:
        return None
    try:
        taxonomy = Taxonomy.from_dict(json.loads(document), source="the served ensemble")
    except (ValueError, TypeError) as exc:  # TaxonomyError is a ValueError
        log.error("the served ensemble's taxonomy_document is invalid: %s", exc)
        return None
    if taxonomy.hash != expected_hash:
        log.error(
            "the served ensemble's taxonomy_document hashes to %s, not to its taxonomy_hash %s",
            taxonomy.hash[:12],
            expected_hash[:12],
        )
        return None
    return taxonomy
