"""Calibrated threshold sets: the one owner of the ``thresholds.yaml`` format.

``fashionserve calibrate`` writes a set; ``fashionserve repo thresholds publish`` publishes
it into a tagger version (its manifest carries the document and its hash); the gateway
decodes with the set of the served tagger version. A set names the taxonomy it was
calibrated for (version and hash): it is refused with any other.

Keys are the taxonomy's threshold keys: a category by name (``"shirt"``, compared with its
probability given its parent), a tag as ``"group/label"`` (``"colour/red"``). Every decision
of the taxonomy has an entry; ``calibrated: false`` marks one that kept the default (too
little support on the calibration split).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fashionserve.errors import InvalidInput
from fashionserve.taxonomy import Taxonomy, TaxonomyError

FORMAT: Literal["fashionserve-thresholds"] = "fashionserve-thresholds"
SCHEMA_VERSION: Literal[1] = 1


class ThresholdsError(InvalidInput):
    """A threshold set is not valid, or not for the taxonomy it is used with."""

    reason = "THRESHOLDS_INVALID"


class Interval(BaseModel):
    """A confidence interval (Wilson score, 95%) on a proportion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float = Field(ge=0.0, le=1.0)
    high: float = Field(ge=0.0, le=1.0)


class LabelThreshold(BaseModel):
    """One decision's threshold and what calibration measured at it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(ge=0.0, le=1.0, description="decide yes at or above this")
    calibrated: bool = Field(description="false: too little support, the default was kept")
    target_recall: float = Field(ge=0.0, le=1.0)
    support: int = Field(ge=0, description="positives on the calibration split")
    recall: float | None = Field(default=None, ge=0.0, le=1.0)
    recall_interval: Interval | None = None
    precision: float | None = Field(default=None, ge=0.0, le=1.0)
    precision_interval: Interval | None = None
    note: str = Field(default="", description="why a target was not met, or kept the default")


class ThresholdSet(BaseModel):
    """A versioned, validated set of decision thresholds for one taxonomy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fashionserve-thresholds"] = FORMAT
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1, max_length=128, description="a name people refer to it by")
    taxonomy_version: str = Field(min_length=1)
    taxonomy_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str = ""
    calibration: dict[str, Any] = Field(
        default_factory=dict,
        description="provenance: data, split, served tagger version and artifact hash, "
        "minimum support, target recall",
    )
    thresholds: dict[str, LabelThreshold]

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON: what manifests, the ensemble and GetTaxonomy name."""
        return hashlib.sha256(canonical_json(self).encode()).hexdigest()

    @property
    def values(self) -> dict[str, float]:
        """Key -> threshold, as :meth:`Taxonomy.with_thresholds` takes them."""
        return {k: v.threshold for k, v in self.thresholds.items()}

    @property
    def tagger_sha256(self) -> str:
        """The artifact hash of the tagger the set was calibrated on ("" if unknown)."""
        return str(self.calibration.get("tagger_sha256", ""))

    def apply(self, taxonomy: Taxonomy) -> Taxonomy:
        """``taxonomy`` deciding with this set; refused for another taxonomy."""
        check_for(self, taxonomy)
        return taxonomy.with_thresholds(self.values)


def canonical_json(thresholds: ThresholdSet) -> str:
    """The set as compact JSON with sorted keys (what is hashed and published)."""
    return json.dumps(thresholds.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def check_for(thresholds: ThresholdSet, taxonomy: Taxonomy) -> None:
    """Raise :class:`ThresholdsError` unless the set was made for ``taxonomy`` and names
    exactly its decisions."""
    if thresholds.taxonomy_hash != taxonomy.hash:
        raise ThresholdsError(
            f"threshold set {thresholds.name!r} is for taxonomy {thresholds.taxonomy_version} "
            f"({thresholds.taxonomy_hash[:12]}), not {taxonomy.version} ({taxonomy.hash[:12]})"
        )
    keys = {k for k, _ in taxonomy.threshold_keys()}
    missing, unknown = (
        sorted(keys - set(thresholds.thresholds)),
        sorted(set(thresholds.thresholds) - keys),
    )
    if missing or unknown:
        raise ThresholdsError(
            f"threshold set {thresholds.name!r} does not match its taxonomy: "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )


def from_dict(doc: Any, source: str = "thresholds") -> ThresholdSet:
    """Validate a parsed document; errors name ``source`` and each bad field."""
    try:
        return ThresholdSet.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ThresholdsError(f"{source} is not a valid threshold set: {problems}") from exc


def load(path: str | Path) -> ThresholdSet:
    """Read and validate a ``thresholds.yaml`` (YAML or JSON)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ThresholdsError(f"cannot read threshold set {path}: {exc}") from exc
    return from_dict(doc, str(path))


def save(thresholds: ThresholdSet, path: str | Path) -> Path:
    """Write ``thresholds`` as YAML (keys in the taxonomy's order), replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(thresholds.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
    return path


def applied(document: str, taxonomy: Taxonomy, expected_hash: str) -> tuple[ThresholdSet, Taxonomy]:
    """A published set (canonical JSON ``document``) checked against ``expected_hash`` and
    applied to ``taxonomy``. Raises :class:`ThresholdsError` or :class:`TaxonomyError`."""
    try:
        doc = json.loads(document)
    except ValueError as exc:
        raise ThresholdsError(f"the published threshold set is not JSON: {exc}") from exc
    thresholds = from_dict(doc, "the published threshold set")
    if thresholds.hash != expected_hash:
        raise ThresholdsError(
            f"the published threshold set hashes to {thresholds.hash[:12]}, "
            f"not {expected_hash[:12]}"
        )
    try:
        return thresholds, thresholds.apply(taxonomy)
    except TaxonomyError as exc:
        raise ThresholdsError(str(exc)) from exc
