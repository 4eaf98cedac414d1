"""A synthetic data set: its plan (the catalog, and which products each image of each split
shows) and its samples rendered in memory.

The catalog has two parts: the *training products*, the only ones ``train`` shows, and the
*new products*, which only the held-out splits show, so that every figure measured on them
is a figure on products the models never saw (as every product a user sends is).

Splits:

* ``train``: ``images`` cluttered scenes with 0 to 4 garments (about 8% empty), every
  training product at least ``MIN_TRAIN_OCCURRENCES`` times, ``TRAIN_OCCURRENCES`` on
  average;
* ``val``: the same kind of scenes showing new products (model selection, calibration);
* ``test``: more such scenes of new products, other draws (the quality figures, and the
  recall reached at calibrated thresholds);
* ``query``: one "street" scene per new product, with that product and maybe one more;
* ``gallery``: one "shop" image per new product (alone, centred, plain light background);
* ``seen``: scenes of training products, for diagnosis only (how much of a figure is
  memorisation), never a quality figure.

:func:`render_samples` is the one way to get a few labelled synthetic images without
writing a data set (load-test images, warm-up and parity inputs, the ``serve`` sample):
the same bytes and labels that :func:`fashionserve.data.writer.synthesize` would write for
that seed and size, rendered only for the splits asked, as they are consumed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from fashionserve.data.catalog import CannotRender, Product, check_taxonomy, make_catalog
from fashionserve.data.reader import GroundTruth, Sample
from fashionserve.data.scenes import SPLITS, Scene, SceneSpec, Studio, render_scene
from fashionserve.taxonomy import Taxonomy, load_taxonomy

EMPTY_FRACTION = 0.08
"""Share of train and val scenes with no garment (negatives for the detector)."""

MIN_TRAIN_OCCURRENCES = 3
"""Every training product appears at least this many times in train."""

TRAIN_OCCURRENCES = 4
"""Training products appear this many times in train on average."""

MIN_NEW_PRODUCTS = 60
"""The held-out catalog (val, test, query, gallery) has at least this many products."""


@dataclass(frozen=True)
class Plan:
    """What a data set holds before any pixel is drawn: its catalog and its scenes."""

    seed: int
    products: tuple[Product, ...]
    scenes: tuple[SceneSpec, ...]
    trend: str | None = None  # a key of catalog.TRENDS the products were drawn with


def plan_data_set(images: int, seed: int, taxonomy: Taxonomy, trend: str | None = None) -> Plan:
    """The plan of the data set with ``images`` train scenes for ``seed`` and ``taxonomy``.

    The catalog holds about a quarter as many training products as train shows garments,
    and ``max(MIN_NEW_PRODUCTS, images // 15)`` new products; val and test hold
    ``max(20, images // 10)`` scenes each, seen ``max(20, images // 20)``. Raises
    :class:`CannotRender` when the taxonomy names
    categories or tags the renderer cannot draw, or when ``images`` is too small for every
    category to appear. ``trend``: see :func:`fashionserve.data.catalog.make_catalog`.
    """
    check_taxonomy(taxonomy)
    products, scenes = _plan(images, seed, taxonomy, trend)
    return Plan(seed, tuple(products), tuple(scenes), trend)


def render_planned(
    plan: Plan, splits: Iterable[str] = SPLITS, workers: int = 1
) -> Iterator[Sample]:
    """The samples of ``splits`` (in that order, each by index), rendered in this process
    or in a pool of ``workers`` processes: byte-identical either way."""
    wanted = list(splits)
    return render_specs(
        plan, [s for split in wanted for s in plan.scenes if s.split == split], workers
    )


def render_specs(plan: Plan, scenes: list[SceneSpec], workers: int = 1) -> Iterator[Sample]:
    """The samples of ``scenes`` (some of ``plan``'s), in that order."""
    by_id = {p.id: p for p in plan.products}
    if workers <= 1:
        studio = Studio(plan.seed, dict(by_id))
        for spec in scenes:
            yield _labelled(render_scene(studio, spec), by_id)
        return
    # fork where available: spawn would re-import the caller's __main__, which breaks
    # scripts without a main guard. Workers use no thread pools (no BLAS), so forking is
    # safe even after a progress bar has started its monitor thread.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    ctx = get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(plan.seed, plan.products)) as pool:
        for scene in pool.imap(_render_in_worker, scenes, chunksize=8):
            yield _labelled(scene, by_id)


def render_samples(
    images: int,
    seed: int,
    *,
    splits: Iterable[str] = SPLITS,
    taxonomy: Taxonomy | None = None,
) -> Iterator[Sample]:
    """The samples of ``splits`` of the data set ``images``/``seed`` (default taxonomy: the
    packaged one), rendered in memory one at a time as they are consumed."""
    return render_planned(plan_data_set(images, seed, taxonomy or load_taxonomy()), splits)


def _labelled(scene: Scene, products: dict[int, Product]) -> Sample:
    spec = scene.spec
    return Sample(
        split=spec.split,
        index=spec.index,
        file_name=f"{spec.index:06d}.jpg",
        width=scene.width,
        height=scene.height,
        image=scene.jpeg,
        garments=tuple(
            GroundTruth(
                bbox=bbox,
                category_path=products[pid].path,
                # A deep, JSON-plain copy: a caller may change it without touching the catalog.
                tags=json.loads(json.dumps(products[pid].tags)),
                product_id=pid,
            )
            for pid, bbox in scene.garments
        ),
    )


_STUDIO: Studio | None = None  # a pool worker's own


def _init_worker(seed: int, products: tuple[Product, ...]) -> None:
    global _STUDIO
    _STUDIO = Studio(seed, {p.id: p for p in products})


def _render_in_worker(spec: SceneSpec) -> Scene:
    assert _STUDIO is not None, "worker not initialised"
    return render_scene(_STUDIO, spec)


def _garment_counts(rng: np.random.Generator, n: int) -> list[int]:
    counts = rng.choice([1, 2, 3, 4], size=n, p=[0.3, 0.32, 0.22, 0.16])
    empty = rng.random(n) < EMPTY_FRACTION
    return [0 if e else int(c) for c, e in zip(counts, empty, strict=True)]


def _assign(
    rng: np.random.Generator, counts: list[int], slots: list[int], ids: list[int]
) -> list[tuple[int, ...]]:
    """Deal product ids (``slots``, then uniform draws from ``ids``) into images, no repeats
    per image."""
    total = sum(counts)
    fill = [int(i) for i in rng.choice(ids, max(0, total - len(slots)))]
    pool = [*slots, *fill][:total]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    images: list[list[int]] = []
    pos = 0
    for c in counts:
        images.append(pool[pos : pos + c])
        pos += c
    # Swap away duplicates within an image (a scene shows two different products).
    for i, ids in enumerate(images):
        for a in range(len(ids)):
            if ids.count(ids[a]) == 1:
                continue
            for _ in range(200):
                j = int(rng.integers(0, len(images)))
                if not images[j] or j == i:
                    continue
                b = int(rng.integers(0, len(images[j])))
                if images[j][b] not in ids and ids[a] not in images[j]:
                    ids[a], images[j][b] = images[j][b], ids[a]
                    break
    return [tuple(ids) for ids in images]


def _plan(
    images: int, seed: int, taxonomy: Taxonomy, trend: str | None
) -> tuple[list[Product], list[SceneSpec]]:
    rng = np.random.default_rng([seed, 0, 0])
    n_leaves = len(taxonomy.leaves)
    counts = _garment_counts(rng, images)
    # As many training products as the scenes can show about TRAIN_OCCURRENCES times each:
    # the models must learn categories and tags from many looks, not a few products.
    n_train = max(n_leaves, sum(counts) // TRAIN_OCCURRENCES)
    needed = n_train * MIN_TRAIN_OCCURRENCES
    for i in rng.permutation(images):
        if sum(counts) >= needed:
            break
        counts[i] = 4
    if sum(counts) < needed:
        raise CannotRender(
            f"{images} train images are too few to show {n_leaves} products "
            f"{MIN_TRAIN_OCCURRENCES} times each; use at least {math.ceil(needed / 4)}"
        )
    n_new = max(MIN_NEW_PRODUCTS, images // 15)
    # Leaves come in turn in the catalog, so the last n_new products cover every leaf.
    products = make_catalog(taxonomy, n_train + n_new, seed, trend)
    train_ids = [p.id for p in products[:n_train]]
    new_products = products[n_train:]
    new_ids = [p.id for p in new_products]
    tasks: list[SceneSpec] = []
    train_slots = [pid for pid in train_ids for _ in range(MIN_TRAIN_OCCURRENCES)]
    for i, prods in enumerate(_assign(rng, counts, train_slots, train_ids)):
        tasks.append(SceneSpec("train", i + 1, "scene", prods))

    n_held_out = max(20, images // 10)
    tasks += _scenes("val", n_held_out, new_products, taxonomy, rng)
    tasks += _scenes("test", n_held_out, new_products, taxonomy, rng)
    tasks += _scenes("seen", max(20, images // 20), products[:n_train], taxonomy, rng)

    order = rng.permutation(len(new_ids))
    for i, k in enumerate(order):
        pid = new_ids[k]
        shown: tuple[int, ...] = (pid,)
        if rng.random() < 0.4:
            other = int(rng.choice(new_ids))
            if other != pid:
                shown = (pid, other) if rng.random() < 0.5 else (other, pid)
        tasks.append(SceneSpec("query", i + 1, "street", shown))
    for i, pid in enumerate(new_ids):
        tasks.append(SceneSpec("gallery", i + 1, "shop", (pid,)))
    return products, tasks


def _scenes(
    split: str, n: int, products: list[Product], taxonomy: Taxonomy, rng: np.random.Generator
) -> list[SceneSpec]:
    """``n`` cluttered scenes of ``products``, every leaf shown at least once."""
    counts = _garment_counts(rng, n)
    while sum(counts) < len(taxonomy.leaves):
        counts[int(rng.integers(0, n))] = 4
    by_leaf = {leaf: [p.id for p in products if p.leaf == leaf] for leaf in taxonomy.leaves}
    slots = [int(rng.choice(by_leaf[leaf])) for leaf in taxonomy.leaves]
    ids = [p.id for p in products]
    return [
        SceneSpec(split, i + 1, "scene", prods)
        for i, prods in enumerate(_assign(rng, counts, slots, ids))
    ]
