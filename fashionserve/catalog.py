"""``fashionserve catalog build``: a catalog's images embedded by the served pipeline, indexed.

The catalog (``--images SRC``) is one of:

* a manifest file, ``.csv``, ``.parquet`` or ``.jsonl``: a ``product_id`` column, an
  ``image`` column (a file path, relative to the manifest's folder) and any other columns,
  kept as the entries' metadata (as strings);
* a ``fashionserve data synth`` split folder (``labels.json`` beside ``images/``): each
  image's product id and top-level category from its labels (the largest garment's);
* a folder of images: each file's name without its extension is its product id.

Every image goes through the served pipeline, through the gateway's public API
(``--gateway``, a key with the ``embed`` scope) or straight to Triton's ensemble
(``--triton``), exactly as a query will. Of the garments found, the one with the highest
detector score is indexed: a shop image shows one product, and it is the one the detector is
surest of (``SearchSimilar`` picks the same garment of a query image unless told otherwise).
An image where nothing is found is skipped and counted. The ``category`` metadata is the
catalog's own when it has the column, else the indexed garment's detector class (a top-level
category), so that searches can always filter by category.

The vectors are indexed and published with :func:`fashionserve.search_index.publish` as the
next version of ``<repository>/embedder/search_index``, the manifest recording the embedder
version and artifact sha256 the pipeline reported: the gateway serves it only while that
embedder is served.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fashionserve import search_index
from fashionserve.errors import InvalidInput
from fashionserve.evaluate import DEFAULT_BATCH, analyse, connect_backend
from fashionserve.repository import published_versions
from fashionserve.search_index import PRODUCT_ID, EmbedderRef
from fashionserve.taxonomy import Taxonomy, load_taxonomy

if TYPE_CHECKING:
    from fashionserve.clients.security import ChannelSecurity

IMAGE = "image"
CATEGORY = "category"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class CatalogError(InvalidInput):
    """The catalog source cannot be read as a catalog."""

    reason = "INVALID_CATALOG"


@dataclass
class Catalog:
    """The entries to index: image paths, product ids and metadata columns."""

    images: list[Path]
    product_ids: list[str]
    metadata: dict[str, list[str]] = field(default_factory=dict)
    kind: str = ""


def read_catalog(source: Path) -> Catalog:
    """The catalog ``source`` describes (a manifest, a data synth split or a folder)."""
    source = Path(source)
    if source.is_dir():
        if (source / "labels.json").is_file():
            return _labelled_split(source)
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise CatalogError(f"{source} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return Catalog(images, [p.stem for p in images], kind="folder")
    if not source.is_file():
        raise CatalogError(f"{source} does not exist")
    return _manifest(source)


def _labelled_split(root: Path) -> Catalog:
    labels = json.loads((root / "labels.json").read_text())
    garments: dict[int, dict[str, Any]] = {}
    for ann in labels.get("annotations", []):
        best = garments.get(ann["image_id"])
        if best is None or ann["area"] > best["area"]:
            garments[ann["image_id"]] = ann
    images, ids, categories = [], [], []
    for entry in labels["images"]:
        ann = garments.get(entry["id"])
        if ann is None:
            continue
        images.append(root / "images" / entry["file_name"])
        ids.append(str(ann["product_id"]))
        categories.append(str(ann["category_path"][0]))
    return Catalog(images, ids, {CATEGORY: categories}, kind="data synth split")


def _manifest(path: Path) -> Catalog:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    readers: dict[str, Callable[[Path], pa.Table]] = {
        ".csv": lambda p: pa_csv.read_csv(p),
        ".parquet": lambda p: pq.read_table(p),
        ".jsonl": lambda p: pa_json.read_json(p),
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CatalogError(f"{path}: a manifest is .csv, .parquet or .jsonl")
    try:
        table = reader(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogError(f"{path} cannot be read: {exc}") from exc
    missing = [c for c in (PRODUCT_ID, IMAGE) if c not in table.column_names]
    if missing:
        raise CatalogError(f"{path} lacks the column(s) {', '.join(missing)}")
    rows = table.to_pylist()
    images = [path.parent / str(r[IMAGE]) for r in rows]
    absent = [str(p) for p in images if not p.is_file()]
    if absent:
        raise CatalogError(f"{path}: {len(absent)} image(s) not found, first {absent[0]}")
    columns = [c for c in table.column_names if c not in (PRODUCT_ID, IMAGE)]
    metadata = {c: ["" if r[c] is None else str(r[c]) for r in rows] for c in columns}
    return Catalog(images, [str(r[PRODUCT_ID]) for r in rows], metadata, kind="manifest")


def _taxonomy(served: dict[str, str]) -> Taxonomy:
    document = served.get("taxonomy_document")
    if document:
        return Taxonomy.from_dict(json.loads(document), source="the served ensemble")
    return load_taxonomy()


def build_catalog(
    source: Path,
    repository: Path,
    *,
    triton: str | None = None,
    gateway: str | None = None,
    api_key: str | None = None,
    security: ChannelSecurity | None = None,
    batch_size: int = DEFAULT_BATCH,
    echo: Callable[[str], None] = print,
) -> Path:
    """Embed ``source``'s images through the served pipeline and publish their index in
    ``repository``; returns the version folder."""
    catalog = read_catalog(source)
    backend = connect_backend(triton, gateway, api_key, security)
    served = backend.served
    embedder = EmbedderRef(served.get("embedder_version", ""), served.get("embedder_sha256", ""))
    if not embedder.version:
        raise CatalogError("the served pipeline does not report its embedder version")
    roots = _taxonomy(served).roots
    batch = max(1, min(batch_size, backend.batch_limit or batch_size))
    echo(
        f"embedding {len(catalog.images)} catalog images ({catalog.kind}) with {embedder.describe()}"
    )
    started = time.monotonic()
    answers = analyse(backend.infer, catalog.images, batch)
    seconds = time.monotonic() - started
    keep: list[int] = []
    vectors: list[np.ndarray] = []
    detected: list[str] = []
    for i, garments in enumerate(answers):
        if not garments:
            continue
        best = max(garments, key=lambda g: g.score)
        keep.append(i)
        vectors.append(np.asarray(best.embedding, np.float32))
        detected.append(roots[best.detector_class])
    skipped = len(answers) - len(keep)
    if not keep:
        raise CatalogError(f"no garment was found in any of the {len(answers)} catalog images")
    metadata = {name: [values[i] for i in keep] for name, values in catalog.metadata.items()}
    metadata.setdefault(CATEGORY, detected)
    published = search_index.publish(
        search_index.index_root(repository),
        np.stack(vectors),
        [catalog.product_ids[i] for i in keep],
        metadata,
        embedder,
        source={
            "catalog": str(source),
            "kind": catalog.kind,
            "images": len(answers),
            "skipped_no_garment": skipped,
            "garment": "highest detector score",
            "through": f"gateway {gateway}" if gateway else f"triton {triton}",
        },
    )
    manifest = search_index.read_manifest(published)
    echo(
        f"embedded in {seconds:.1f}s; published search index version {manifest.version} "
        f"({manifest.count} vectors, {manifest.kind}) at {published}"
        + (f"; {skipped} image(s) without a garment skipped" if skipped else "")
    )
    return published


def describe_versions(repository: Path) -> list[str]:
    """One line per published index version, the served one marked."""
    root = search_index.index_root(repository)
    served = search_index.served_version(root)
    lines = []
    for version in published_versions(root):
        m = search_index.read_manifest(root / str(version))
        mark = "*" if version == served else " "
        lines.append(
            f"{mark} {version:>4}  {m.count:>9} vectors  {m.kind:<5}  {m.embedder.describe()}  "
            f"{m.created}"
        )
    return lines
