"""The taxonomy: a tree of categories plus groups of attribute tags.

It fixes three things the rest of the system relies on:

* the tagger's logit layout, derived deterministically from the tree and the groups
  (:attr:`Taxonomy.layout`), so a training run and the serving gateway agree on which
  logit means what;
* a content hash (:attr:`Taxonomy.hash`) that travels with every exported tagger, so the
  gateway can refuse to decode with a taxonomy that does not match the served model;
* the coarse-to-fine decoding of a logit row into a category path and tags
  (:meth:`Taxonomy.decode`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from fashionserve.errors import InvalidInput

DEFAULT_THRESHOLDS: dict[str, float] = {"category": 0.5, "exclusive": 0.3, "independent": 0.5}
"""Decision thresholds used for labels that `thresholds` does not name. A category's is on
its probability given its parent: 0.5 descends only to a child more likely than all its
siblings together."""

SegmentKind = Literal["category", "exclusive", "independent"]


class TaxonomyError(InvalidInput, ValueError):
    """A taxonomy file is invalid. ``problems`` lists every problem with its location.

    Also a ValueError: readers of a served taxonomy document catch it with the JSON errors.
    """

    reason = "TAXONOMY_INVALID"

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid taxonomy {source}: {len(self.problems)} problem(s)\n{listing}")


@dataclass(frozen=True)
class CategoryNode:
    name: str
    parent: str | None
    children: tuple[str, ...]
    path: tuple[str, ...]


@dataclass(frozen=True)
class TagGroup:
    name: str
    exclusive: bool
    labels: tuple[str, ...]
    applies_to: tuple[str, ...] | None  # None: applies to every category


@dataclass(frozen=True)
class Segment:
    """A contiguous block of tagger logits.

    ``category`` segments are one softmax over the children of ``owner`` (``""`` is the
    root, whose children are the top-level categories); ``exclusive`` segments are one
    softmax over a tag group; ``independent`` segments are one sigmoid per label.
    """

    kind: SegmentKind
    owner: str
    labels: tuple[str, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class ScoredLabel:
    name: str
    probability: float


@dataclass
class Decoded:
    """The decoding of one logit row.

    ``category_path`` runs from the top level down as far as the model was confident;
    each entry's probability is the product of the conditional probabilities along the
    path. ``tags`` maps each applicable group to the labels that passed their thresholds.
    ``tables`` holds every segment's full probability table (owner -> label -> p).
    """

    category_path: list[ScoredLabel]
    tags: dict[str, list[ScoredLabel]]
    tables: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def leaf(self) -> str | None:
        return self.category_path[-1].name if self.category_path else None


class Taxonomy:
    """A validated taxonomy. Build with :func:`load_taxonomy` or :meth:`from_dict`."""

    def __init__(
        self,
        version: str,
        nodes: dict[str, CategoryNode],
        roots: tuple[str, ...],
        groups: tuple[TagGroup, ...],
        thresholds: dict[str, float],
        raw: dict[str, Any],
    ) -> None:
        self.version = version
        self.nodes = nodes
        self.roots = roots
        self.groups = groups
        self.thresholds = thresholds
        self._raw = raw
        self.layout = _derive_layout(roots, nodes, groups)
        self.num_logits = self.layout[-1].stop if self.layout else 0
        self.hash = hashlib.sha256(
            json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Taxonomy:
        """Validate ``data`` (the parsed YAML) and build the taxonomy.

        Raises :class:`TaxonomyError` listing every problem found, each with its location.
        """
        return _parse(data, source)

    def to_dict(self) -> dict[str, Any]:
        """The canonical form: what is hashed, shipped in checkpoints and served."""
        return json.loads(json.dumps(self._raw))

    # ------------------------------------------------------------------- structure
    @property
    def leaves(self) -> list[str]:
        """Leaf categories in layout order."""
        return [n for n in self._walk() if not self.nodes[n].children]

    def _walk(self) -> Iterable[str]:
        stack = list(reversed(self.roots))
        while stack:
            name = stack.pop()
            yield name
            stack.extend(reversed(self.nodes[name].children))

    def path(self, category: str) -> tuple[str, ...]:
        return self.nodes[category].path

    def group(self, name: str) -> TagGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def group_applies(self, group: TagGroup, path: Sequence[str]) -> bool:
        """Whether ``group`` applies to a garment whose category path is ``path``."""
        return group.applies_to is None or any(c in group.applies_to for c in path)

    def threshold(self, kind: SegmentKind, label: str, group: str | None = None) -> float:
        key = label if group is None else f"{group}/{label}"
        return self.thresholds.get(key, DEFAULT_THRESHOLDS[kind])

    def threshold_keys(self) -> list[tuple[str, SegmentKind]]:
        """Every decision's threshold key and kind: each category (``"shirt"``), parents
        first in layout order, then each tag label (``"colour/red"``)."""
        keys: list[tuple[str, SegmentKind]] = []
        for seg in self.layout:
            if seg.kind == "category":
                keys.extend((label, "category") for label in seg.labels)
            else:
                keys.extend((f"{seg.owner}/{label}", seg.kind) for label in seg.labels)
        return keys

    def with_thresholds(self, thresholds: Mapping[str, float]) -> Taxonomy:
        """This taxonomy deciding with ``thresholds`` (a calibrated set, keyed like the
        file's ``thresholds``) in place of its own. Its document and hash stay those of the
        taxonomy: they describe the tagger's logits, which a threshold set does not change.
        """
        known = dict(self.threshold_keys())
        unknown = sorted(set(thresholds) - set(known))
        if unknown:
            raise TaxonomyError(
                "thresholds", [f"{k}: not a category or tag label" for k in unknown]
            )
        decided = Taxonomy(self.version, self.nodes, self.roots, self.groups, {}, self._raw)
        decided.thresholds = {**self.thresholds, **{k: float(v) for k, v in thresholds.items()}}
        return decided

    # -------------------------------------------------------------------- training
    def encode_targets(
        self, category_path: Sequence[str], tags: Mapping[str, str | Sequence[str] | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets for one garment, in logit layout.

        Returns ``(target, mask)`` as float32 arrays of length :attr:`num_logits`. For a
        softmax segment the target is one-hot and the mask is 1 on the whole segment when
        the segment is on the garment's path (or its group applies); otherwise 0. For an
        independent group the target is multi-hot and the mask is 1 where the group applies.
        """
        target = np.zeros(self.num_logits, np.float32)
        mask = np.zeros(self.num_logits, np.float32)
        path = list(category_path)
        for seg in self.layout:
            if seg.kind == "category":
                owners = ["", *path[:-1]]
                if seg.owner in owners:
                    child = path[owners.index(seg.owner)]
                    target[seg.start + seg.labels.index(child)] = 1.0
                    mask[seg.start : seg.stop] = 1.0
                continue
            group = self.group(seg.owner)
            value = tags.get(seg.owner)
            if not self.group_applies(group, path) or value is None:
                continue
            chosen = [value] if isinstance(value, str) else list(value)
            for label in chosen:
                target[seg.start + seg.labels.index(label)] = 1.0
            mask[seg.start : seg.stop] = 1.0
        return target, mask

    # -------------------------------------------------------------------- decoding
    def probabilities(self, logits: np.ndarray) -> dict[str, dict[str, float]]:
        """Per segment, label -> probability (softmax or sigmoid as the layout says)."""
        row = np.asarray(logits, np.float64)
        if row.shape != (self.num_logits,):
            raise ValueError(f"expected {self.num_logits} logits, got shape {row.shape}")
        tables: dict[str, dict[str, float]] = {}
        for seg in self.layout:
            z = row[seg.start : seg.stop]
            if seg.kind == "independent":
                p = 1.0 / (1.0 + np.exp(-z))
            else:
                e = np.exp(z - z.max())
                p = e / e.sum()
            key = f"category:{seg.owner}" if seg.kind == "category" else seg.owner
            tables[key] = {label: float(v) for label, v in zip(seg.labels, p, strict=True)}
        return tables

    def decode(self, logits: np.ndarray, full_tables: bool = False) -> Decoded:
        """Coarse-to-fine decoding of one garment's logits.

        The category descends from the root while the best child's conditional
        probability (given its parent) reaches that child's threshold: each level is one
        decision, taken only where its parent passed, so a threshold calibrated on the
        garments that reach a parent means the same at serving time. Each entry of the path
        reports its path probability (the product of conditionals). A tag group is decoded
        only where it applies to the decoded path; an exclusive group yields at most its
        best label, an independent group every label that passes its own threshold.
        """
        return self.decide(self.probabilities(logits), full_tables)

    def decide(
        self, tables: Mapping[str, Mapping[str, float]], full_tables: bool = False
    ) -> Decoded:
        """:meth:`decode` from the probability tables :meth:`probabilities` gives (or a
        caller received with ``include_probability_tables``)."""
        path: list[ScoredLabel] = []
        owner, p_path = "", 1.0
        while True:
            table = tables.get(f"category:{owner}")
            if not table:
                break
            best = max(table, key=table.__getitem__)
            if table[best] < self.threshold("category", best):
                break
            p = p_path * table[best]
            path.append(ScoredLabel(best, p))
            owner, p_path = best, p
        names = [s.name for s in path]
        tags: dict[str, list[ScoredLabel]] = {}
        for group in self.groups:
            # A group for every garment (colour, pattern) is decided even when no category
            # passed its threshold: a colour needs no category. A scoped one (sleeve) needs
            # the decoded path to reach its scope.
            if not self.group_applies(group, names):
                continue
            table = tables[group.name]
            if group.exclusive:
                best = max(table, key=table.__getitem__)
                kept = (
                    [best] if table[best] >= self.threshold("exclusive", best, group.name) else []
                )
            else:
                kept = [
                    lbl
                    for lbl in group.labels
                    if table[lbl] >= self.threshold("independent", lbl, group.name)
                ]
            tags[group.name] = [ScoredLabel(lbl, table[lbl]) for lbl in kept]
        return Decoded(path, tags, {k: dict(v) for k, v in tables.items()} if full_tables else {})


def _derive_layout(
    roots: tuple[str, ...], nodes: dict[str, CategoryNode], groups: tuple[TagGroup, ...]
) -> list[Segment]:
    """Category softmaxes breadth-first from the root, then the tag groups in file order."""
    segments: list[Segment] = []
    offset = 0
    queue: list[tuple[str, tuple[str, ...]]] = [("", roots)]
    while queue:
        owner, children = queue.pop(0)
        segments.append(Segment("category", owner, children, offset, offset + len(children)))
        offset += len(children)
        queue.extend((c, nodes[c].children) for c in children if nodes[c].children)
    for g in groups:
        kind: SegmentKind = "exclusive" if g.exclusive else "independent"
        segments.append(Segment(kind, g.name, g.labels, offset, offset + len(g.labels)))
        offset += len(g.labels)
    return segments


def _parse(data: Any, source: str) -> Taxonomy:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise TaxonomyError(source, ["<root>: expected a mapping"])
    unknown = set(data) - {"version", "categories", "tag_groups", "thresholds"}
    problems += [f"{k}: unknown key" for k in sorted(unknown)]

    version = data.get("version")
    if not isinstance(version, str) or not version:
        problems.append("version: expected a non-empty string")
        version = ""

    nodes: dict[str, CategoryNode] = {}
    where: dict[str, str] = {}

    def add_nodes(items: Any, loc: str, parent: CategoryNode | None) -> tuple[str, ...]:
        if not isinstance(items, list) or not items:
            problems.append(f"{loc}: expected a non-empty list")
            return ()
        names: list[str] = []
        for i, item in enumerate(items):
            here = f"{loc}[{i}]"
            if isinstance(item, str):
                name, kids = item, None
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                name, kids = item["name"], item.get("children")
                extra = set(item) - {"name", "children"}
                problems.extend(f"{here}.{k}: unknown key" for k in sorted(extra))
            else:
                problems.append(f"{here}: expected a name or a mapping with 'name'")
                continue
            if not name.strip():
                problems.append(f"{here}: empty category name")
                continue
            if name in where:
                problems.append(
                    f"{here}: duplicate category name {name!r} (first at {where[name]})"
                )
                continue
            where[name] = here
            path = (*parent.path, name) if parent else (name,)
            node = CategoryNode(name, parent.name if parent else None, (), path)
            nodes[name] = node
            if kids is not None:
                children = add_nodes(kids, f"{here}.children", node)
                nodes[name] = CategoryNode(name, node.parent, children, path)
            names.append(name)
        return tuple(names)

    roots = add_nodes(data.get("categories"), "categories", None)

    groups: list[TagGroup] = []
    raw_groups = data.get("tag_groups", [])
    if not isinstance(raw_groups, list):
        problems.append("tag_groups: expected a list")
        raw_groups = []
    seen_groups: dict[str, str] = {}
    for i, g in enumerate(raw_groups):
        here = f"tag_groups[{i}]"
        if not isinstance(g, dict):
            problems.append(f"{here}: expected a mapping")
            continue
        extra = set(g) - {"name", "exclusive", "labels", "applies_to"}
        problems.extend(f"{here}.{k}: unknown key" for k in sorted(extra))
        name = g.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{here}.name: expected a non-empty string")
            continue
        if name in seen_groups:
            problems.append(f"{here}.name: duplicate group {name!r} (first at {seen_groups[name]})")
            continue
        seen_groups[name] = here
        exclusive = g.get("exclusive", False)
        if not isinstance(exclusive, bool):
            problems.append(f"{here}.exclusive: expected true or false")
            exclusive = False
        labels = g.get("labels")
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) for x in labels)
        ):
            problems.append(f"{here}.labels: expected a non-empty list of names")
            labels = []
        for j, label in enumerate(labels):
            if labels.index(label) != j:
                problems.append(f"{here}.labels[{j}]: duplicate label {label!r} in group {name!r}")
        applies = g.get("applies_to")
        if applies is not None:
            if not isinstance(applies, list) or not all(isinstance(x, str) for x in applies):
                problems.append(f"{here}.applies_to: expected a list of category names")
                applies = []
            for j, cat in enumerate(applies):
                if cat not in where:
                    problems.append(f"{here}.applies_to[{j}]: unknown category {cat!r}")
        groups.append(
            TagGroup(
                name,
                exclusive,
                tuple(dict.fromkeys(labels)),
                tuple(applies) if applies is not None else None,
            )
        )

    thresholds: dict[str, float] = {}
    raw_thresholds = data.get("thresholds") or {}
    if not isinstance(raw_thresholds, dict):
        problems.append("thresholds: expected a mapping of label to probability")
        raw_thresholds = {}
    by_group = {g.name: g for g in groups}
    for key, value in raw_thresholds.items():
        here = f"thresholds.{key}"
        if isinstance(key, str) and "/" in key:
            gname, _, label = key.partition("/")
            if gname not in by_group:
                problems.append(f"{here}: unknown tag group {gname!r}")
            elif label not in by_group[gname].labels:
                problems.append(f"{here}: unknown label {label!r} in group {gname!r}")
        elif key not in where:
            problems.append(f"{here}: unknown category {key!r} (tags are named 'group/label')")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0.0 <= value <= 1.0
            or math.isnan(value)
        ):
            problems.append(f"{here}: expected a probability in [0, 1], got {value!r}")
        else:
            thresholds[str(key)] = float(value)

    if problems:
        raise TaxonomyError(source, problems)

    def node_dict(name: str) -> Any:
        kids = nodes[name].children
        return {"name": name, "children": [node_dict(c) for c in kids]} if kids else name

    raw = {
        "version": version,
        "categories": [node_dict(r) for r in roots],
        "tag_groups": [
            {
                "name": g.name,
                "exclusive": g.exclusive,
                "labels": list(g.labels),
                "applies_to": list(g.applies_to) if g.applies_to is not None else None,
            }
            for g in groups
        ],
        "thresholds": dict(sorted(thresholds.items())),
    }
    return Taxonomy(version, nodes, roots, tuple(groups), thresholds, raw)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and validate a taxonomy YAML file; the packaged default when ``path`` is None."""
    if path is None:
        text = resources.files("fashionserve").joinpath("taxonomy.yaml").read_text()
        source = "fashionserve/taxonomy.yaml"
    else:
        text = Path(path).read_text()
        source = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TaxonomyError(source, [f"not valid YAML: {exc}"]) from exc
    return Taxonomy.from_dict(data, source)
