"""``fashionserve evaluate``: quality measured through the served ensemble, never PyTorch.

Every image of the data set's scene split (``test`` by default: products the models never
saw), ``query`` and ``gallery`` splits is sent, encoded as stored, to ``fashion_pipeline`` on a running Triton, in requests of several images; the
answers are scored against the labels with :mod:`fashionserve.metrics`, the way training's
own validation scores the PyTorch models (``fashionserve.train.validation``), so the two can be
compared: a gap means serving differs from training (a coordinate, crop or taxonomy bug).

* detection: mAP@0.5 over the garments the ensemble returns (after its score floor and cap);
* category and exclusive-tag accuracy: logits decoded with ``Taxonomy.decode``, over the
  ground-truth garments a returned garment matches at IoU >= 0.5;
* retrieval: each query garment (ground truth matched at IoU >= 0.5) ranks the gallery (the
  returned garment that best overlaps each gallery image's ground truth) by embedding;
  Acc@k counts unmatched query garments as misses.

``--triton`` scores the ensemble's raw outputs, decoding the tagger logits here;
``--gateway`` scores what a caller of the public API gets (through the client library): the
gateway's micro-batching, validation and taxonomy decoding included. Both feed the same
scoring code, so any gap between the two figures is lost in the gateway.

Decisions use the thresholds in effect: the calibrated set the served tagger version carries
(published in the ensemble's parameters, and by the gateway in GetTaxonomy), else the
taxonomy's own; ``thresholds=`` (a ``thresholds.yaml``) replaces them. ``report=DIR`` adds
the per-class report of one split (:func:`write_report`), and :func:`run_calibration` is
``fashionserve calibrate``: both work on every matched garment's probability tables
(:mod:`fashionserve.calibration`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fashionserve import calibration, ensemble, metrics
from fashionserve import thresholds as threshold_sets
from fashionserve.errors import FailedPrecondition
from fashionserve.taxonomy import Decoded, ScoredLabel, Taxonomy, load_taxonomy

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient

    from fashionserve.clients.security import ChannelSecurity
    from fashionserve.clients.types import GarmentResult

InferFn = Callable[[list[bytes]], list[list[Any]]]
"""Encoded images in; per image, the garments found."""

MATCH_IOU = 0.5
DEFAULT_BATCH = 8
CONCURRENT_REQUESTS = 2  # keeps Triton's preprocess busy while the models run


class EvaluationError(FailedPrecondition):
    """The evaluation cannot run: Triton or the gateway unreachable, data missing, taxonomy
    mismatch, an image refused."""

    reason = "EVALUATION_FAILED"


@dataclass
class DecodedGarment:
    """A garment as the gateway returns it, shaped for the evaluation's scoring.

    It has the fields of ``fashionserve.ensemble.Garment`` that scoring reads, except that
    ``decoded`` replaces the logits: the gateway has already decoded them.
    """

    box: tuple[float, float, float, float]
    score: float
    detector_class: int  # index into Taxonomy.roots
    decoded: Decoded
    embedding: np.ndarray = field(repr=False)
    tables: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)


Found = ensemble.Garment | DecodedGarment
"""A garment found in one image: through Triton it carries logits, decoded here; through
the gateway it comes decoded, so the gateway's decoding is what is scored."""


@dataclass
class LabelledImage:
    """One image of a split: its file and its ground-truth garments."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # [m, 4] x1, y1, x2, y2
    annotations: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LabelledSplit:
    name: str
    info: dict[str, Any]
    images: list[LabelledImage]

    @property
    def garments(self) -> int:
        return sum(len(img.annotations) for img in self.images)


def load_labels(data: Path, split: str) -> LabelledSplit:
    """``data/<split>/labels.json`` (COCO-style, as ``data synth`` writes it)."""
    root = Path(data) / split
    labels_path = root / "labels.json"
    if not labels_path.is_file():
        raise EvaluationError(f"{labels_path} is missing: is {data} a `data synth` directory?")
    labels = json.loads(labels_path.read_text())
    by_id: dict[int, list[dict[str, Any]]] = {}
    for ann in labels.get("annotations", []):
        by_id.setdefault(int(ann["image_id"]), []).append(ann)
    images = []
    for entry in labels["images"]:
        anns = by_id.get(int(entry["id"]), [])
        boxes = np.array(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float64
        ).reshape(-1, 4)
        images.append(
            LabelledImage(
                root / "images" / entry["file_name"],
                int(entry["width"]),
                int(entry["height"]),
                boxes,
                anns,
            )
        )
    return LabelledSplit(split, dict(labels.get("info", {})), images)


# ------------------------------------------------------------------------ inference
def analyse(
    infer: InferFn,
    paths: Sequence[Path],
    batch: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Found]]:
    """Every image through ``infer`` (the ensemble or the gateway), ``batch`` images per
    request, in order."""
    chunks = [list(paths[i : i + batch]) for i in range(0, len(paths), batch)]
    done = 0

    def run(chunk: list[Path]) -> list[list[Found]]:
        return infer([p.read_bytes() for p in chunk])

    results: list[list[Found]] = []
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        for garments in pool.map(run, chunks):
            results.extend(garments)
            done += len(garments)
            if progress is not None:
                progress(done, len(paths))
    return results


def _detections(garments: Sequence[Found]) -> metrics.Detections:
    boxes = np.array([g.box for g in garments], np.float64).reshape(-1, 4)
    scores = np.array([g.score for g in garments], np.float64)
    classes = np.array([g.detector_class for g in garments], np.int64)
    return boxes, scores, classes


# ------------------------------------------------------------------------- scoring
def _decoded(found: Found, taxonomy: Taxonomy) -> Decoded:
    """Through Triton: the logits decoded with ``taxonomy``; through the gateway: its own
    decoding."""
    if isinstance(found, ensemble.Garment):
        return taxonomy.decode(found.logits)
    return found.decoded


def _tables(found: Found, taxonomy: Taxonomy) -> dict[str, dict[str, float]]:
    if isinstance(found, ensemble.Garment):
        return taxonomy.probabilities(found.logits)
    if not found.tables:
        raise EvaluationError("the report needs probability tables: ask for them")
    return found.tables


def observations(
    split: LabelledSplit, answers: Sequence[Sequence[Found]], taxonomy: Taxonomy
) -> list[calibration.Observation]:
    """Each ground-truth garment a returned garment matches at IoU >= 0.5: the matched
    garment's probability tables with the garment's true path and tags."""
    out = []
    for img, garments in zip(split.images, answers, strict=True):
        boxes, scores, _ = _detections(garments)
        match = metrics.match_detections(boxes, scores, img.boxes, iou=MATCH_IOU)
        for ann, p in zip(img.annotations, match, strict=True):
            if p >= 0:
                out.append(
                    calibration.Observation(
                        _tables(garments[p], taxonomy),
                        list(ann["category_path"]),
                        dict(ann.get("tags", {})),
                    )
                )
    return out


def score_scenes(
    split: LabelledSplit, answers: Sequence[Sequence[Found]], taxonomy: Taxonomy
) -> dict[str, Any]:
    """Detection mAP@0.5, leaf-category and exclusive-tag accuracy on matched garments."""
    roots = list(taxonomy.roots)
    predictions = [_detections(a) for a in answers]
    truth = [
        (img.boxes, np.array([roots.index(a["category_path"][0]) for a in img.annotations]))
        for img in split.images
    ]
    det = metrics.detection_map50(predictions, truth, len(roots))
    pred_leaf: list[str | None] = []
    true_leaf: list[str] = []
    pred_tags: list[dict[str, str | None]] = []
    true_tags: list[dict[str, Any]] = []
    exclusive = [g.name for g in taxonomy.groups if g.exclusive]
    for img, garments, (boxes, scores, _) in zip(split.images, answers, predictions, strict=True):
        match = metrics.match_detections(boxes, scores, img.boxes, iou=MATCH_IOU)
        for ann, p in zip(img.annotations, match, strict=True):
            if p < 0:
                continue
            decoded = _decoded(garments[p], taxonomy)
            pred_leaf.append(decoded.leaf)
            true_leaf.append(ann["category_path"][-1])
            pred_tags.append({k: (v[0].name if v else None) for k, v in decoded.tags.items()})
            true_tags.append({k: v for k, v in ann.get("tags", {}).items() if k in exclusive})
    tags = metrics.exclusive_tag_accuracy(pred_tags, true_tags, exclusive)
    return {
        "detector_map50": det["map50"],
        "ap50_per_class": dict(zip(roots, det["ap"], strict=True)),
        "category_accuracy": metrics.category_accuracy(pred_leaf, true_leaf),
        "tag_accuracy": tags["overall"],
        "tag_accuracy_per_group": {k: v for k, v in tags.items() if k != "overall"},
        "scene_split": split.name,
        "scene_images": len(split.images),
        "scene_garments": split.garments,
        "scene_matched_garments": len(true_leaf),
        "scene_detections": sum(len(a) for a in answers),
    }


def score_retrieval(
    query: LabelledSplit,
    query_answers: Sequence[Sequence[Found]],
    gallery: LabelledSplit,
    gallery_answers: Sequence[Sequence[Found]],
) -> dict[str, Any]:
    """Acc@1 and Acc@10 of query garments against the gallery; unmatched queries miss."""
    g_emb, g_ids = [], []
    for img, garments in zip(gallery.images, gallery_answers, strict=True):
        if not garments or not img.annotations:
            continue
        boxes, _, _ = _detections(garments)
        for ann, gt_box in zip(img.annotations, img.boxes, strict=True):
            overlaps = metrics.box_iou(gt_box[None], boxes)[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] > 0:
                g_emb.append(garments[best].embedding)
                g_ids.append(int(ann["product_id"]))
    q_emb, q_ids, total = [], [], 0
    for img, garments in zip(query.images, query_answers, strict=True):
        boxes, scores, _ = _detections(garments)
        match = metrics.match_detections(boxes, scores, img.boxes, iou=MATCH_IOU)
        for ann, p in zip(img.annotations, match, strict=True):
            total += 1
            if p >= 0:
                q_emb.append(garments[p].embedding)
                q_ids.append(int(ann["product_id"]))
    counts = {
        "query_garments": total,
        "query_matched": len(q_ids),
        "gallery_images": len(gallery.images),
        "gallery_items": len(g_ids),
    }
    if not q_emb or not g_emb:
        return {"retrieval_acc1": math.nan, "retrieval_acc10": math.nan, **counts}
    acc = metrics.retrieval_accuracy(np.stack(q_emb), q_ids, np.stack(g_emb), g_ids, ks=(1, 10))
    found = len(q_ids) / total
    return {
        "retrieval_acc1": acc["acc@1"] * found,
        "retrieval_acc10": acc["acc@10"] * found,
        **counts,
    }


def search_retrieval(
    query: LabelledSplit,
    query_answers: Sequence[Sequence[Found]],
    address: str,
    api_key: str | None,
    security: ChannelSecurity | None = None,
) -> dict[str, Any]:
    """Acc@1 and Acc@10 of query garments through the gateway's SearchSimilar: each
    matched query garment's embedding searched in the served index (which must hold the
    gallery: ``fashionserve catalog build --images DATA/gallery``); unmatched queries miss.
    """
    from fashionserve.clients import ChannelSecurity, FashionClient, FashionServeError

    hits = {1: 0, 10: 0}
    total = 0
    with FashionClient(address, api_key, **asdict(security or ChannelSecurity())) as client:
        try:
            index = client.get_serving_info().search_index
            if index is None:
                raise EvaluationError(
                    f"the gateway at {address} serves no search index: build one from the "
                    "gallery split (fashionserve catalog build --images DATA/gallery)"
                )
            for img, garments in zip(query.images, query_answers, strict=True):
                boxes, scores, _ = _detections(garments)
                match = metrics.match_detections(boxes, scores, img.boxes, iou=MATCH_IOU)
                for ann, p in zip(img.annotations, match, strict=True):
                    total += 1
                    if p < 0:
                        continue
                    found = client.search_similar(list(map(float, garments[p].embedding)), k=10)
                    ranked = [m.product_id for m in found.matches]
                    truth = str(ann["product_id"])
                    hits[1] += ranked[:1] == [truth]
                    hits[10] += truth in ranked
        except FashionServeError as exc:
            raise EvaluationError(f"SearchSimilar failed at {address}: {exc}") from exc
    return {
        "search_acc1": hits[1] / max(total, 1),
        "search_acc10": hits[10] / max(total, 1),
        "search_index": {"version": index.version, "size": index.size, "kind": index.kind},
    }


# ------------------------------------------------------------------------- command
def resolve_taxonomy(
    data: Path, splits: Sequence[LabelledSplit], served: dict[str, str]
) -> Taxonomy:
    """The data set's taxonomy (``data/taxonomy.yaml``, else the packaged default), checked
    against the hash the data was labelled with and the hash of the served tagger."""
    own = Path(data) / "taxonomy.yaml"
    taxonomy = load_taxonomy(own if own.is_file() else None)
    for split in splits:
        labelled = split.info.get("taxonomy_hash")
        if labelled and labelled != taxonomy.hash:
            raise EvaluationError(
                f"{split.name} was labelled with taxonomy {labelled[:12]} "
                f"(version {split.info.get('taxonomy_version')}), not {taxonomy.hash[:12]} "
                f"({taxonomy.version}): put the data set's taxonomy in {own}"
            )
    served_hash = served.get("taxonomy_hash")
    if served_hash and served_hash != taxonomy.hash:
        raise EvaluationError(
            f"the served tagger was trained on taxonomy {served_hash[:12]} "
            f"(version {served.get('taxonomy_version')}), the data uses {taxonomy.hash[:12]} "
            f"({taxonomy.version}): its logits cannot be decoded with this taxonomy"
        )
    return taxonomy


def _connect(triton: str) -> tuple[grpcclient.InferenceServerClient, dict[str, str]]:
    from tritonclient.utils import InferenceServerException

    client = ensemble.connect(triton)
    try:
        ready = client.is_server_ready() and client.is_model_ready(ensemble.MODEL_NAME)
    except InferenceServerException as exc:
        raise EvaluationError(f"Triton at {triton} is not reachable: {exc}") from exc
    if not ready:
        raise EvaluationError(f"Triton at {triton} is up but {ensemble.MODEL_NAME} is not ready")
    return client, ensemble.pipeline_parameters(client)


# ------------------------------------------------------------------- through the gateway
def decoded_garment(g: GarmentResult, roots: Sequence[str]) -> DecodedGarment:
    """Convert one gateway garment; ``roots`` (the top-level categories, in taxonomy
    order) turns its detector class name back into the index the scoring expects."""
    if g.embedding is None:
        raise EvaluationError("the evaluation needs embeddings: ask for include_embeddings")
    tables = {t.name: {s.name: s.probability for s in t.labels} for t in g.probability_tables}
    return DecodedGarment(
        box=g.box.as_tuple(),
        score=g.detector_score,
        detector_class=list(roots).index(g.detector_class),
        decoded=Decoded(
            category_path=[ScoredLabel(s.name, s.probability) for s in g.category_path],
            tags={
                t.group: [ScoredLabel(s.name, s.probability) for s in t.labels]
                for t in g.tag_groups
            },
        ),
        embedding=np.asarray(g.embedding, np.float32),
        tables=tables,
    )


def gateway_backend(
    address: str,
    api_key: str | None,
    timeout: float = 300.0,
    security: ChannelSecurity | None = None,
) -> tuple[InferFn, dict[str, str]]:
    """``(infer, served)`` for evaluating through the gateway at ``address``, a caller of
    the public API (the client library), over the channel ``security`` says (default:
    plaintext).

    ``served`` mirrors the ensemble parameters the Triton backend reports (taxonomy
    version and hash, ``max_images_per_request`` = the gateway's BatchAnalyze limit,
    model versions and artifact hashes, the threshold set in effect); ``infer`` sends one
    ``BatchAnalyze`` call (thread-safe) and raises :class:`EvaluationError` naming the
    image if any image of it fails.
    """
    from fashionserve.clients import (
        AnalyzeOptions,
        ChannelSecurity,
        FashionClient,
        FashionServeError,
    )

    tls = asdict(security or ChannelSecurity())
    client = FashionClient(address, api_key, timeout=timeout, **tls)
    try:
        info = client.get_serving_info()
        served_taxonomy = client.get_taxonomy()
        roots = served_taxonomy.roots
    except FashionServeError as exc:
        client.close()
        raise EvaluationError(f"the gateway at {address} cannot be used: {exc}") from exc
    served = {
        "taxonomy_version": info.taxonomy_version,
        "taxonomy_hash": info.taxonomy_hash,
        "max_images_per_request": str(info.limits.max_images_per_batch),
        "gateway_version": info.gateway_version,
        **{f"{m.name}_version": m.version for m in info.models},
        **{f"{m.name}_sha256": m.artifact_sha256 for m in info.models},
        SERVED_THRESHOLDS: json.dumps(served_taxonomy.threshold_values),
    }
    if info.threshold_set is not None:
        served["thresholds_name"] = info.threshold_set.name
        served["thresholds_hash"] = info.threshold_set.hash
    # Server defaults for score floor and cap: the same as the ensemble applies. The
    # probability tables feed the per-class report and calibration.
    options = AnalyzeOptions(include_embeddings=True, include_probability_tables=True)

    def infer(images: list[bytes]) -> list[list[Any]]:
        try:
            entries = client.batch_analyze(images, options)
        except FashionServeError as exc:
            raise EvaluationError(f"BatchAnalyze failed at {address}: {exc}") from exc
        out: list[list[Any]] = []
        for i, entry in enumerate(entries):
            if entry.error is not None:
                raise EvaluationError(f"image {i} of a batch failed: {entry.error}")
            assert entry.result is not None
            out.append([decoded_garment(g, roots) for g in entry.result.garments])
        return out

    return infer, served


SERVED_THRESHOLDS = "thresholds_in_effect"
"""Key of ``served`` (through the gateway): the thresholds GetTaxonomy reports, as JSON."""


@dataclass
class Backend:
    """How images reach the served ensemble: ``infer`` and what is served."""

    infer: InferFn
    served: dict[str, str]

    @property
    def batch_limit(self) -> int | None:
        limit = self.served.get("max_images_per_request")
        return int(limit) if limit else None


def connect_backend(
    triton: str | None,
    gateway: str | None,
    api_key: str | None = None,
    security: ChannelSecurity | None = None,
) -> Backend:
    """Through Triton's ensemble (``triton``) or the gateway's public API (``gateway``)."""
    if gateway is not None:
        return Backend(*gateway_backend(gateway, api_key, security=security))
    if triton is not None:
        client, served = _connect(triton)

        def infer(images: list[bytes]) -> list[list[Any]]:
            return list(ensemble.infer(client, images, timeout=300.0))

        return Backend(infer, served)
    raise EvaluationError("evaluate through Triton (triton=...) or the gateway (gateway=...)")


def thresholds_in_effect(
    taxonomy: Taxonomy, served: dict[str, str], thresholds: Path | None = None
) -> tuple[Taxonomy, dict[str, str]]:
    """``taxonomy`` deciding with the thresholds in effect, and which they are: the file
    ``thresholds``, else the set the served tagger version carries (the ensemble publishes
    its document; the gateway reports its values), else the taxonomy's own."""
    if thresholds is not None:
        chosen = threshold_sets.load(thresholds)
        return chosen.apply(taxonomy), {
            "source": str(thresholds),
            "name": chosen.name,
            "hash": chosen.hash,
        }
    if served.get("thresholds_document"):
        try:
            chosen, decided = threshold_sets.applied(
                served["thresholds_document"], taxonomy, served.get("thresholds_hash", "")
            )
        except threshold_sets.ThresholdsError as exc:
            raise EvaluationError(f"the served threshold set cannot be used: {exc}") from exc
        return decided, {"source": "served", "name": chosen.name, "hash": chosen.hash}
    identity = {
        "name": served.get("thresholds_name", ""),
        "hash": served.get("thresholds_hash", ""),
    }
    if served.get(SERVED_THRESHOLDS):
        values = json.loads(served[SERVED_THRESHOLDS])
        return taxonomy.with_thresholds(values), {"source": "served", **identity}
    return taxonomy, {"source": "taxonomy", "name": "", "hash": ""}


def _run_splits(
    backend: Backend,
    splits: Sequence[LabelledSplit],
    batch: int,
    echo: Callable[[str], None],
) -> dict[str, list[list[Found]]]:
    answers: dict[str, list[list[Found]]] = {}
    for split in splits:
        t0 = time.monotonic()
        answers[split.name] = analyse(backend.infer, [img.path for img in split.images], batch)
        seconds = time.monotonic() - t0
        echo(
            f"  {split.name}: {len(split.images)} images in {seconds:.1f}s "
            f"({len(split.images) / max(seconds, 1e-9):.1f} images/s)"
        )
    return answers


def default_split(data: Path, preferred: str) -> str:
    """``preferred`` when the data set has it, else ``val`` (data sets made before the
    ``test`` split existed)."""
    return preferred if (Path(data) / preferred / "labels.json").is_file() else "val"


def evaluate(
    data: Path,
    triton: str | None = None,
    json_out: Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    echo: Callable[[str], None] = print,
    *,
    gateway: str | None = None,
    api_key: str | None = None,
    security: ChannelSecurity | None = None,
    report: Path | None = None,
    split: str | None = None,
    thresholds: Path | None = None,
    search: bool = False,
) -> dict[str, Any]:
    """Score the served ensemble on ``data``'s scene split, query and gallery.

    Prints a table and returns (and writes to ``json_out``, if given) ``detector_map50``,
    ``category_accuracy``, ``tag_accuracy``, ``retrieval_acc1``, ``retrieval_acc10`` (when the
    data set has query and gallery), the
    counts behind them and throughput figures. Decisions use the thresholds in effect
    (:func:`thresholds_in_effect`). ``report``: also write the per-class report of
    the scene split into that directory. ``split``: the scene split the detector, category
    and tag figures (and the report) come from; default ``test`` (new products), else
    ``val`` for data sets made before ``test`` existed; ``seen`` measures the training
    products, for diagnosis. ``search`` (through the gateway): also ``search_acc1`` and
    ``search_acc10``, the query garments searched through SearchSimilar in the served
    index, which must be built from the gallery split (:func:`search_retrieval`).
    """
    if search and gateway is None:
        raise EvaluationError("search accuracy is measured through the gateway (gateway=...)")
    backend = connect_backend(triton, gateway, api_key, security)
    served = backend.served
    batch = max(1, min(batch_size, backend.batch_limit or batch_size))
    scenes = load_labels(data, split or default_split(data, "test"))
    # A calibration set may hold scenes only (`data synth --splits val,test`): no retrieval.
    retrieval = all((Path(data) / s / "labels.json").is_file() for s in ("query", "gallery"))
    splits = [scenes, *(load_labels(data, s) for s in ("query", "gallery") if retrieval)]
    taxonomy = resolve_taxonomy(data, splits, served)
    decide, in_effect = thresholds_in_effect(taxonomy, served, thresholds)

    started = time.monotonic()
    answers = _run_splits(backend, splits, batch, echo)
    elapsed = time.monotonic() - started
    images = sum(len(s.images) for s in splits)
    if thresholds is not None:  # the gateway decoded with its own: decide with the file's
        for garments in answers.values():
            for image in garments:
                for g in image:
                    if isinstance(g, DecodedGarment):
                        g.decoded = decide.decide(g.tables)

    result: dict[str, Any] = {}
    result.update(score_scenes(scenes, answers[scenes.name], decide))
    if retrieval:
        query, gallery = splits[1:]
        result.update(score_retrieval(query, answers["query"], gallery, answers["gallery"]))
    if search and gateway is not None:
        result.update(search_retrieval(query, answers["query"], gateway, api_key, security))
    result.update(
        {
            "images": images,
            "seconds": round(elapsed, 2),
            "images_per_second": round(images / max(elapsed, 1e-9), 2),
            "request_batch": batch,
            "triton": triton,
            "gateway": gateway,
            "served": {k: v for k, v in served.items() if k != SERVED_THRESHOLDS},
            "taxonomy": {"version": taxonomy.version, "hash": taxonomy.hash},
            "thresholds": in_effect,
        }
    )
    result = _finite(result)
    echo(format_table(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        echo(f"wrote {json_out}")
    if report is not None:
        floor = float(served.get("min_score") or 0.0)
        rows = write_report(
            report,
            scenes,
            answers[scenes.name],
            decide,
            {
                "data": str(data),
                "split": scenes.name,
                "through": f"gateway {gateway}" if gateway else f"triton {triton}",
                "thresholds": in_effect,
                "detector_floor": floor,
                "taxonomy": {"version": taxonomy.version, "hash": taxonomy.hash},
            },
            floor,
        )
        result["report"] = rows
        echo(f"wrote the per-class report of {scenes.name} to {report}")
    return result


def write_report(
    out: Path,
    split: LabelledSplit,
    answers: Sequence[Sequence[Found]],
    taxonomy: Taxonomy,
    meta: dict[str, Any],
    detector_floor: float,
) -> list[dict[str, Any]]:
    """``out/report.json``, ``out/report.md`` and PR curves (``out/pr-*.png``) for every
    detector class, category (at its level, and end to end) and tag label of ``split``,
    at the thresholds ``taxonomy`` decides with (the detector's: its served floor)."""
    obs = observations(split, answers, taxonomy)
    roots = list(taxonomy.roots)
    curves = calibration.detector_curves(
        [_detections(a) for a in answers],
        [
            (img.boxes, np.array([roots.index(a["category_path"][0]) for a in img.annotations]))
            for img in split.images
        ],
        roots,
    )
    rows = calibration.class_report(obs, taxonomy, curves, detector_floor)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "images": len(split.images), "matched_garments": len(obs), "classes": rows}
    (out / "report.json").write_text(json.dumps(_finite(doc), indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(doc))
    plot_curves(out, obs, taxonomy, curves, detector_floor)
    return rows


def report_markdown(doc: dict[str, Any]) -> str:
    """The report as one Markdown table, its data and thresholds named above it."""

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    def interval(value: Any) -> str:
        return "-" if not value else f"[{value[0]:.2f}, {value[1]:.2f}]"

    thresholds = doc["thresholds"]
    lines = [
        f"# Per-class report: {doc['data']}, split `{doc['split']}`",
        "",
        f"Through {doc['through']}; {doc['images']} images, {doc['matched_garments']} "
        f"garments matched at IoU >= 0.5. Thresholds: {thresholds.get('name') or 'the '}"
        f"{'' if thresholds.get('name') else 'taxonomy defaults'} "
        f"({thresholds.get('source')}{', ' + thresholds['hash'][:12] if thresholds.get('hash') else ''}); "
        f"detector score floor {doc['detector_floor']}. A category's precision and recall are "
        "at its level (garments that reached its parent); end to end counts every garment of "
        "it. Intervals: 95% Wilson.",
        "",
        "| kind | class | threshold | support | precision | 95% CI | recall | 95% CI "
        "| recall end to end | AP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["classes"]:
        lines.append(
            f"| {r['kind']} | {r['name']} | {r['threshold']:.3f} | {r['support']} "
            f"| {num(r['precision'])} | {interval(r['precision_interval'])} "
            f"| {num(r['recall'])} | {interval(r['recall_interval'])} "
            f"| {num(r.get('recall_end_to_end'))} | {num(r['ap'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(
    out: Path,
    obs: Sequence[calibration.Observation],
    taxonomy: Taxonomy,
    curves: Sequence[calibration.DetectorCurve],
    detector_floor: float,
) -> None:
    """One PNG per decision block (detector, each category level, each tag group): the
    precision-recall curve of each class, its operating point marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display where reports are made
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    def figure(title: str) -> Any:
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
        return fig, ax

    fig, ax = figure("detector classes (IoU 0.5)")
    for c in curves:
        if c.num_gt == 0 or len(c.scores) == 0:
            continue
        tp = np.cumsum(c.true_positive)
        recall, precision = tp / c.num_gt, tp / np.arange(1, len(tp) + 1)
        (line,) = ax.plot(recall, precision, label=c.name)
        at = int((c.scores >= detector_floor).sum()) - 1
        if at >= 0:
            ax.plot(recall[at], precision[at], "o", color=line.get_color())
    ax.legend(fontsize="small")
    fig.savefig(out / "pr-detector.png", dpi=90)
    plt.close(fig)

    blocks = [
        (
            seg,
            [
                seg_label if seg.kind == "category" else f"{seg.owner}/{seg_label}"
                for seg_label in seg.labels
            ],
        )
        for seg in taxonomy.layout
    ]
    found = calibration.decisions(obs, taxonomy)
    for seg, keys in blocks:
        name = f"category-{seg.owner or 'root'}" if seg.kind == "category" else f"tag-{seg.owner}"
        fig, ax = figure(
            f"categories under {seg.owner or 'the root'}"
            if seg.kind == "category"
            else f"tag group {seg.owner}"
        )
        for key in keys:
            d = found[key]
            if d.support == 0:
                continue
            precision, recall, _ = precision_recall_curve(d.y_true, d.score)
            (line,) = ax.plot(recall, precision, label=key.rpartition("/")[2])
            group, _, label = key.rpartition("/")
            point = calibration.counts_at(d, taxonomy.threshold(d.kind, label, group or None))
            if point.recall is not None and point.precision is not None:
                ax.plot(point.recall, point.precision, "o", color=line.get_color())
        ax.legend(fontsize="small")
        fig.savefig(out / f"pr-{name}.png", dpi=90)
        plt.close(fig)


def run_calibration(
    data: Path,
    out: Path,
    target_recall: float,
    *,
    triton: str | None = None,
    gateway: str | None = None,
    api_key: str | None = None,
    security: ChannelSecurity | None = None,
    split: str = "val",
    targets: dict[str, float] | None = None,
    name: str | None = None,
    min_support: int = calibration.MIN_SUPPORT,
    batch_size: int = DEFAULT_BATCH,
    echo: Callable[[str], None] = print,
) -> threshold_sets.ThresholdSet:
    """``fashionserve calibrate``: run ``split`` of ``data`` through the served ensemble,
    calibrate every category and tag label to its target recall
    (:func:`fashionserve.calibration.calibrate`) and write the set to ``out``.

    Calibration starts from the taxonomy's own thresholds, whatever set is served, so the
    result depends only on the served tagger's probabilities and the data.
    """
    backend = connect_backend(triton, gateway, api_key, security)
    labelled = load_labels(data, split)
    taxonomy = resolve_taxonomy(data, [labelled], backend.served)
    batch = max(1, min(batch_size, backend.batch_limit or batch_size))
    answers = _run_splits(backend, [labelled], batch, echo)[split]
    obs = observations(labelled, answers, taxonomy)
    try:
        result = calibration.calibrate(obs, taxonomy, target_recall, targets, min_support)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from exc
    served = backend.served
    made = result.threshold_set(
        taxonomy,
        name or f"recall{target_recall:.2f}-{datetime.now(UTC):%Y%m%dT%H%MZ}",
        {
            "data": str(data),
            "split": split,
            "images": len(labelled.images),
            "garments": len(obs),
            "target_recall": target_recall,
            "targets": dict(targets or {}),
            "through": f"gateway {gateway}" if gateway else f"triton {triton}",
            "tagger_version": served.get("tagger_version", ""),
            "tagger_sha256": served.get("tagger_sha256", ""),
        },
    )
    threshold_sets.save(made, out)
    echo(format_calibration(made))
    echo(f"wrote {out} ({made.name}, {made.hash[:12]})")
    return made


def format_calibration(made: threshold_sets.ThresholdSet) -> str:
    """One line per decision: threshold, support, recall and precision with intervals."""

    def pct(value: float | None, ci: threshold_sets.Interval | None) -> str:
        if value is None:
            return "-"
        return f"{value:.3f} [{ci.low:.2f}, {ci.high:.2f}]" if ci else f"{value:.3f}"

    header = (
        "class",
        "target",
        "threshold",
        "support",
        "recall [95% CI]",
        "precision [95% CI]",
        "note",
    )
    rows = [
        (
            key,
            f"{t.target_recall:.2f}",
            f"{t.threshold:.3f}",
            str(t.support),
            pct(t.recall, t.recall_interval),
            pct(t.precision, t.precision_interval),
            ("" if t.calibrated else "DEFAULT ") + t.note,
        )
        for key, t in made.thresholds.items()
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def format_table(result: dict[str, Any]) -> str:
    """The headline figures as a small aligned table."""

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    rows = [
        (
            "detector mAP@0.5",
            fmt(result.get("detector_map50")),
            f"{result.get('scene_split')}: {result.get('scene_images')} images, "
            f"{result.get('scene_garments')} garments",
        ),
        (
            "category accuracy",
            fmt(result.get("category_accuracy")),
            f"{result.get('scene_matched_garments')} matched garments",
        ),
        ("exclusive-tag accuracy", fmt(result.get("tag_accuracy")), "same garments"),
        (
            "retrieval Acc@1",
            fmt(result.get("retrieval_acc1")),
            f"{result.get('query_garments')} query garments "
            f"({result.get('query_matched')} matched), {result.get('gallery_items')} gallery",
        ),
        ("retrieval Acc@10", fmt(result.get("retrieval_acc10")), ""),
    ]
    if "search_acc1" in result:
        index = result.get("search_index", {})
        rows += [
            (
                "SearchSimilar Acc@1",
                fmt(result["search_acc1"]),
                f"same queries, served index v{index.get('version')} ({index.get('size')} items)",
            ),
            ("SearchSimilar Acc@10", fmt(result["search_acc10"]), ""),
        ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  value  over", f"{'-' * width}  -----  ----"]
    lines += [f"{name.ljust(width)}  {value:>5}  {over}".rstrip() for name, value, over in rows]
    lines.append(
        f"{result.get('images')} images in {result.get('seconds')}s "
        f"({result.get('images_per_second')} images/s, {result.get('request_batch')} per request)"
    )
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN (a metric with nothing to measure) becomes None, so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
