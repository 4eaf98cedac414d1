"""Taxonomy compatibility: may a new model version replace the served one?

Callers store and count the labels the service returns (category paths, tag groups and
their labels, detector classes). A new version may **add** labels: callers that do not know
them yet ignore them. It must not **remove or rename** one (a rename is a removal plus an
addition to the caller), move a category under another parent (its path changes), reorder
the detector's classes (their indices change) or turn an exclusive tag group into an
independent one or back (one label per garment becomes several, or the reverse). Those
break callers; a rollout that does any of them is refused unless forced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fashionserve.errors import FailedPrecondition
from fashionserve.repository import TaxonomyRef
from fashionserve.taxonomy import Taxonomy


class IncompatibleTaxonomy(FailedPrecondition):
    """The new version's taxonomy breaks callers of the served one (see ``report``)."""

    reason = "INCOMPATIBLE_TAXONOMY"

    def __init__(self, message: str, report: TaxonomyChanges) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class TaxonomyChanges:
    """What changes for a caller when ``new`` replaces ``old``."""

    breaking: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return not self.breaking

    def summary(self) -> str:
        lines = [f"breaks callers: {b}" for b in self.breaking]
        lines += [f"adds: {a}" for a in self.added]
        return "\n".join(lines) or "no label changes"


def compare_taxonomies(old: Taxonomy, new: Taxonomy) -> TaxonomyChanges:
    """Every label-level change from ``old`` to ``new``, split into breaking and added."""
    changes = TaxonomyChanges()
    old_paths = {name: old.path(name) for name in old.nodes}
    new_paths = {name: new.path(name) for name in new.nodes}
    for name, path in old_paths.items():
        if name not in new_paths:
            renamed = _same_place(path, old_paths, new_paths)
            what = f" (renamed to {renamed!r}?)" if renamed else ""
            changes.breaking.append(f"category {'/'.join(path)!r} removed{what}")
        elif new_paths[name] != path:
            changes.breaking.append(
                f"category {name!r} moved: {'/'.join(path)} -> {'/'.join(new_paths[name])}"
            )
    changes.added += [
        f"category {'/'.join(p)!r}" for n, p in new_paths.items() if n not in old_paths
    ]

    new_groups = {g.name: g for g in new.groups}
    for group in old.groups:
        if group.name not in new_groups:
            changes.breaking.append(f"tag group {group.name!r} removed")
            continue
        ng = new_groups[group.name]
        if ng.exclusive != group.exclusive:
            changes.breaking.append(
                f"tag group {group.name!r} changed from "
                f"{'exclusive' if group.exclusive else 'independent'} to "
                f"{'exclusive' if ng.exclusive else 'independent'}"
            )
        gone = [label for label in group.labels if label not in ng.labels]
        new_labels = [label for label in ng.labels if label not in group.labels]
        for label in gone:
            hint = _renamed_label(label, group.labels, ng.labels)
            what = f" (renamed to {hint!r}?)" if hint else ""
            changes.breaking.append(f"tag {group.name}/{label!r} removed{what}")
        changes.added += [f"tag {group.name}/{label!r}" for label in new_labels]
    old_group_names = {g.name for g in old.groups}
    changes.added += [f"tag group {g.name!r}" for g in new.groups if g.name not in old_group_names]

    # The detector's class index refers to the top-level categories in order.
    roots_old, roots_new = list(old.roots), list(new.roots)
    if roots_new[: len(roots_old)] != roots_old:
        changes.breaking.append(
            f"detector classes reordered or replaced: {roots_old} -> {roots_new} "
            "(new top-level categories must be appended)"
        )
    return changes


def check_compatible(
    model: str,
    served_version: int | None,
    served: TaxonomyRef | None,
    candidate: TaxonomyRef | None,
    force: bool = False,
) -> TaxonomyChanges | None:
    """Compare the taxonomies two versions of ``model`` record in their manifests; raise
    :class:`IncompatibleTaxonomy` when ``candidate`` breaks callers of ``served`` and
    ``force`` is off.

    Returns ``None`` when there is nothing to compare (a version without a taxonomy, or one
    recording neither a taxonomy document nor detector classes: only the tagger's manifest
    carries the document, the detector's carries its class list).
    """
    if served is None or candidate is None:
        return None
    if served.document is not None and candidate.document is not None:
        changes = compare_taxonomies(served.document, candidate.document)
    elif served.classes is not None and candidate.classes is not None:
        old_classes, new_classes = list(served.classes), list(candidate.classes)
        changes = TaxonomyChanges()
        if new_classes[: len(old_classes)] != old_classes:
            changes.breaking.append(
                f"detector classes reordered or replaced: {old_classes} -> {new_classes} "
                "(new classes must be appended)"
            )
        changes.added += [f"detector class {c!r}" for c in new_classes[len(old_classes) :]]
    else:
        return None
    if changes.breaking and not force:
        raise IncompatibleTaxonomy(
            f"{model}: the new version's taxonomy breaks callers of the served version "
            f"{served_version}: "
            + "; ".join(changes.breaking)
            + " (use --force to roll it out anyway)",
            changes,
        )
    return changes


def _same_place(
    path: tuple[str, ...], old: Mapping[str, tuple[str, ...]], new: Mapping[str, tuple[str, ...]]
) -> str | None:
    """The one new category under the same parent that the old one could have become."""
    parent = path[:-1]
    added = [n for n, p in new.items() if n not in old and p[:-1] == parent]
    return added[0] if len(added) == 1 else None


def _renamed_label(
    label: str, old: tuple[str, ...] | list[str], new: tuple[str, ...] | list[str]
) -> str | None:
    index = list(old).index(label)
    if index < len(new) and new[index] not in old:
        return str(new[index])
    return None
