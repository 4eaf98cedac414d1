"""Parity: do two runtimes compute the same model on the same real inputs?

A *runner* is anything that maps named input arrays to named output arrays (PyTorch eager,
ONNX Runtime, a TensorRT engine). :func:`check_parity` feeds a reference runner
and a candidate runner the same batches and measures each output against its tolerance;
the tolerances per model kind come from :func:`default_checks`. Export uses PyTorch as the
reference and ONNX Runtime as the candidate; the TensorRT build reuses the same function
with ONNX Runtime as the reference (:func:`engine_checks`).

The inputs are real: garment images rendered by the seeded synthetic generator (or read
from a data set directory), passed through exactly the preprocessing serving uses
(:func:`fashionserve.imaging.letterbox` for the detector, :func:`square_crop` around the
ground-truth boxes for the tagger and embedder). Random noise would exercise none of the
activations a real image does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fashionserve.data.reader import Sample, read_split
from fashionserve.errors import FailedPrecondition
from fashionserve.imaging import decode_image, letterbox, square_crop

if TYPE_CHECKING:
    import torch

Arrays = dict[str, np.ndarray]

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8)
# Fixed seed of the rendered parity set: every export of every model sees the same images.
PARITY_SEED = 20261
# The smallest train split the generator renders (every category must appear).
SYNTH_MIN_IMAGES = 8
# The synthetic splits read for parity inputs, in order of preference.
PARITY_SPLITS = ("val", "train", "query", "gallery")


class ParityError(FailedPrecondition):
    """An output of the candidate runtime diverged from the reference beyond its tolerance
    (the export is refused: nothing is published until the runtimes agree).

    ``rows`` holds every measurement, failed ones included.
    """

    reason = "PARITY_FAILED"

    def __init__(self, message: str, rows: Sequence[ParityRow] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


# ------------------------------------------------------------------------------ runners
class Runner(Protocol):
    """One runtime executing one model: named inputs in, named outputs out."""

    name: str

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Arrays: ...


class TorchRunner:
    """PyTorch eager execution of a module in eval mode, on CPU."""

    def __init__(
        self,
        module: torch.nn.Module,
        input_names: Sequence[str],
        output_names: Sequence[str],
        name: str = "pytorch",
    ) -> None:
        self.module = module.eval()
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.name = name

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if len(outs) != len(self.output_names):
            raise ParityError(
                f"{self.name}: the module returned {len(outs)} outputs, "
                f"expected {len(self.output_names)} ({', '.join(self.output_names)})"
            )
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, outs, strict=True)}


class OnnxRuntimeRunner:
    """ONNX Runtime on CPU, with the default (full) graph optimisation serving uses."""

    def __init__(self, model: Path, name: str = "onnxruntime-cpu") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self.session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = name

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        feeds = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        values = self.session.run(self.output_names, feeds)
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}


class TensorRTRunner:
    """A serialized engine executed on CUDA device 0 (a parity runner).

    Device buffers are PyTorch CUDA tensors, so no other CUDA binding is needed.
    """

    def __init__(self, engine_path: Path, name: str | None = None) -> None:
        import torch

        from fashionserve.export.tensorrt import TensorRTError, import_tensorrt

        trt = import_tensorrt()
        self._torch = torch
        self._trt = trt
        self.name = name or f"tensorrt-{trt.__version__}"
        self.engine_path = engine_path
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fashionserve.export.tensorrt import TensorRTError

        torch, trt = self._torch, self._trt
        keep: list[Any] = []  # device buffers must outlive the execution
        for name in self.inputs:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            tensor = torch.from_numpy(np.ascontiguousarray(inputs[name], dtype=dtype)).cuda()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs: dict[str, Any] = {}
        for name in self.outputs:
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = torch.from_numpy(np.empty(shape, dtype)).cuda()
            outputs[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"{self.name}: engine execution failed")
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in outputs.items()}


# -------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Measurement:
    """One figure from comparing one batch: ``value`` against ``tolerance``.

    ``higher_is_better`` metrics (cosine similarity) pass when ``value >= tolerance``; the
    others (differences, mismatch counts) when ``value <= tolerance``.
    """

    output: str
    metric: str
    value: float
    tolerance: float
    higher_is_better: bool = False
    # Non-empty: an informational count, summed over batches and reported as a note
    # ("<total> <note>"), never failing.
    note: str = ""

    @property
    def passed(self) -> bool:
        return _passes(self.value, self.tolerance, self.higher_is_better)


def _passes(value: float, tolerance: float, higher_is_better: bool) -> bool:
    # NaN compares False both ways: a NaN anywhere fails.
    return value >= tolerance if higher_is_better else value <= tolerance


def _show(value: float, higher_is_better: bool) -> str:
    # Similarities sit just below 1: show enough digits to see how far below.
    return f"{value:.6f}" if higher_is_better else f"{value:.3g}"


@dataclass
class ParityRow:
    """The worst value of one (output, metric) over every batch compared."""

    output: str
    metric: str
    value: float
    tolerance: float
    higher_is_better: bool
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return _passes(self.value, self.tolerance, self.higher_is_better)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": _json_float(self.value),
            "tolerance": self.tolerance,
            "passed": self.passed,
            "batch_sizes": list(self.batch_sizes),
        }


@dataclass
class ParityReport:
    """All rows of one reference-vs-candidate comparison."""

    reference: str
    candidate: str
    rows: list[ParityRow]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def table(self) -> str:
        """A fixed-width table: output, metric, value, tolerance, pass/fail."""
        header = ("output", "metric", "value", "tolerance", "batches", "result")
        lines = [
            (
                r.output,
                r.metric,
                _show(r.value, r.higher_is_better),
                ("≥ " if r.higher_is_better else "≤ ") + f"{r.tolerance:g}",
                ",".join(str(b) for b in r.batch_sizes),
                "pass" if r.passed else "FAIL",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

        title = f"parity: {self.candidate} vs {self.reference}"
        out = [title, fmt(header), fmt(["-" * w for w in widths])]
        out += [fmt(row) for row in lines]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def raise_for_failure(self) -> None:
        """Raise :class:`ParityError` naming every output that diverged, and by how much."""
        failed = [r for r in self.rows if not r.passed]
        if not failed:
            return
        what = "; ".join(
            f"{r.output}: {r.metric} {_show(r.value, r.higher_is_better)} "
            f"({'below' if r.higher_is_better else 'over'} tolerance {r.tolerance:g}, "
            f"batch sizes {','.join(str(b) for b in r.batch_sizes)})"
            for r in failed
        )
        raise ParityError(
            f"{self.candidate} diverges from {self.reference}: {what}", rows=self.rows
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "passed": self.passed,
            "outputs": {r.output: r.to_dict() for r in self.rows},
            "notes": list(self.notes),
        }


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


Comparator = Callable[[Arrays, Arrays], list[Measurement]]


# --------------------------------------------------------------------------- comparators
def _shapes(output: str, ref: np.ndarray, cand: np.ndarray) -> None:
    if ref.shape != cand.shape:
        raise ParityError(
            f"{output}: shape {tuple(cand.shape)} differs from the reference {tuple(ref.shape)}"
        )


def max_abs(output: str, tolerance: float) -> Comparator:
    """Largest absolute element-wise difference of ``output``."""

    def compare(ref: Arrays, cand: Arrays) -> list[Measurement]:
        a, b = ref[output], cand[output]
        _shapes(output, a, b)
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        value = float(np.max(diff)) if diff.size else 0.0
        if np.isnan(diff).any():
            value = math.nan
        return [Measurement(output, "max_abs", value, tolerance)]

    return compare


def min_cosine(output: str, tolerance: float) -> Comparator:
    """Smallest row-wise cosine similarity of ``output`` (vectors along the last axis)."""

    def compare(ref: Arrays, cand: Arrays) -> list[Measurement]:
        a, b = ref[output].astype(np.float64), cand[output].astype(np.float64)
        _shapes(output, a, b)
        a = a.reshape(-1, a.shape[-1])
        b = b.reshape(-1, b.shape[-1])
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)
        value = float(np.min(cos)) if cos.size else 1.0
        if np.isnan(cos).any():
            value = math.nan
        return [Measurement(output, "min_cosine", value, tolerance, higher_is_better=True)]

    return compare


# Scores closer than this are treated as tied whatever the measured noise: a few hundred
# float32 ulps at scores near 1 (observed PyTorch/ONNX Runtime differences are ~1e-7).
TIE_FLOOR = 1e-6
# Measured score noise is multiplied by this to bound how far apart two scores can be and
# still come out of TopK in either order.
TIE_FACTOR = 4.0
# A detection swapped in at the top-K cut is another heatmap cell (a stride apart) or
# another class; boxes this close are the same detection.
SWAP_MIN_BOX_PX = 1.0


def detections(
    box_tolerance: float = 0.05, score_tolerance: float = 1e-3, class_mismatches: int = 0
) -> Comparator:
    """Compare detector outputs ``boxes`` ``[B,K,4]``, ``scores`` ``[B,K]``, ``classes`` ``[B,K]``.

    TopK over near-equal scores may order them differently in two runtimes (and a
    detection whose score ties the K-th one may be in one top-K but not the other), so a
    position-by-position comparison of boxes and classes would report false failures.
    Instead:

    * scores are compared position by position: both lists are sorted descending, so the
      k-th largest value is the same whatever order ties came out in;
    * per image, the score noise ``δ`` (largest positional score difference) sets a tie
      gap ``max(TIE_FACTOR * δ, TIE_FLOOR)``; positions whose reference scores lie within
      that gap of each other (chained) form a tie group, the only places where the two
      runtimes can legitimately disagree on order. Inside a group, reference and candidate
      detections are paired by nearest box (same class first), then compared; a group of
      one is a plain positional comparison;
    * in the last group, a pair that is clearly two different detections (another class,
      or boxes ``SWAP_MIN_BOX_PX`` apart) is excused (and counted) only when both its
      scores tie the K-th score: each may sit just outside the other runtime's top K.

    The gap follows the measured noise, not ``score_tolerance``: an untrained detector
    has all its top-K scores within 1e-3 of each other, and a gap that wide would let
    every box go unchecked.
    """

    def compare(ref: Arrays, cand: Arrays) -> list[Measurement]:
        for name in ("boxes", "scores", "classes"):
            _shapes(name, ref[name], cand[name])
        r_boxes, c_boxes = ref["boxes"].astype(np.float64), cand["boxes"].astype(np.float64)
        r_scores, c_scores = ref["scores"].astype(np.float64), cand["scores"].astype(np.float64)
        r_cls, c_cls = ref["classes"].astype(np.int64), cand["classes"].astype(np.int64)
        score_diff = np.abs(r_scores - c_scores)
        score_value = float(score_diff.max()) if score_diff.size else 0.0
        if np.isnan(score_diff).any():
            score_value = math.nan

        box_value, mismatches, excused, grouped = 0.0, 0, 0, 0
        batch, k = r_scores.shape
        for b in range(batch):
            if k == 0:
                continue
            noise = float(np.nan_to_num(score_diff[b], nan=0.0).max())
            tie_gap = max(TIE_FACTOR * noise, TIE_FLOOR)
            cut_r, cut_c = r_scores[b, -1], c_scores[b, -1]
            for start, stop in _tie_groups(r_scores[b], tie_gap):
                last = stop == k
                if stop - start > 1:
                    grouped += stop - start
                for i, j in _pair_by_box(
                    r_boxes[b, start:stop],
                    r_cls[b, start:stop],
                    c_boxes[b, start:stop],
                    c_cls[b, start:stop],
                ):
                    i, j = i + start, j + start
                    d = float(np.max(np.abs(r_boxes[b, i] - c_boxes[b, j])))
                    differs = bool(r_cls[b, i] != c_cls[b, j])
                    at_cut = (r_scores[b, i] - cut_r <= tie_gap) and (
                        c_scores[b, j] - cut_c <= tie_gap
                    )
                    # Only a clearly different detection (another class, or a box a
                    # pixel or more away: another heatmap cell) can be a top-K swap; a
                    # box slightly off is a numerical divergence and is not excused.
                    other = differs or not d < SWAP_MIN_BOX_PX
                    if last and at_cut and other:
                        excused += 1
                        continue
                    box_value = max(box_value, d) if not math.isnan(d) else math.nan
                    mismatches += int(differs)
        return [
            Measurement("boxes", "max_abs_px", box_value, box_tolerance),
            Measurement("scores", "max_abs", score_value, score_tolerance),
            Measurement("classes", "mismatches", float(mismatches), float(class_mismatches)),
            Measurement(
                "detections",
                "in_tie_groups",
                float(grouped),
                math.inf,
                note="detection(s) paired by box within score ties "
                "(TopK may emit equal scores in either order)",
            ),
            Measurement(
                "detections",
                "excused_at_cut",
                float(excused),
                math.inf,
                note="detection(s) excused: tied with the K-th score, swapped across the top-K cut",
            ),
        ]

    return compare


def _tie_groups(scores: np.ndarray, gap: float) -> Iterable[tuple[int, int]]:
    """Runs of positions ``[start, stop)`` of a descending score list whose consecutive
    gaps are at most ``gap``."""
    start = 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or not scores[i - 1] - scores[i] <= gap:
            yield start, i
            start = i


def _pair_by_box(
    r_boxes: np.ndarray, r_cls: np.ndarray, c_boxes: np.ndarray, c_cls: np.ndarray
) -> list[tuple[int, int]]:
    """Greedy one-to-one pairing by smallest box difference, same-class pairs first.

    Same-class first matters because the detector's size and offset heads are
    class-agnostic: two classes peaking at one cell give identical boxes.
    """
    n = len(r_boxes)
    if n == 1:
        return [(0, 0)]
    cost = np.abs(r_boxes[:, None, :] - c_boxes[None, :, :]).max(axis=2)
    cost = np.nan_to_num(cost, nan=np.inf) + 1e9 * (r_cls[:, None] != c_cls[None, :])
    pairs: list[tuple[int, int]] = []
    for flat in np.argsort(cost, axis=None, kind="stable"):
        i, j = divmod(int(flat), n)
        if cost[i, j] == np.inf or any(i == p or j == q for p, q in pairs):
            continue
        pairs.append((i, j))
        if len(pairs) == n:
            break
    return pairs


def default_checks(kind: str) -> list[Comparator]:
    """The per-output tolerances export enforces for a model kind.

    boxes: 0.05 canvas pixels; scores and tagger logits: 1e-3 absolute; classes: exact
    (outside score ties); embeddings: cosine similarity of at least 0.9999 per row.
    """
    if kind == "detector":
        return [detections(box_tolerance=0.05, score_tolerance=1e-3, class_mismatches=0)]
    if kind == "tagger":
        return [max_abs("logits", 1e-3)]
    if kind == "embedder":
        return [min_cosine("embedding", 0.9999)]
    raise ValueError(f"unknown model kind {kind!r}")


# TensorRT against ONNX Runtime: FP16 halves the mantissa, and even an FP32 engine may use
# TF32 tensor cores (10-bit mantissa inputs) for convolutions on Ampere and newer.
_ENGINE_TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"box_px": 0.5, "score": 5e-3, "logit": 1e-2, "cosine": 0.9995},
    "fp16": {"box_px": 2.0, "score": 2e-2, "logit": 5e-2, "cosine": 0.998},
}


def engine_checks(kind: str, precision: str) -> list[Comparator]:
    """The tolerances of a TensorRT engine against ONNX Runtime on the same inputs.

    Classes stay exact outside score ties (the tie groups follow the measured noise).
    """
    tol = _ENGINE_TOLERANCES[precision]
    if kind == "detector":
        return [detections(tol["box_px"], tol["score"], class_mismatches=0)]
    if kind == "tagger":
        return [max_abs("logits", tol["logit"])]
    if kind == "embedder":
        return [min_cosine("embedding", tol["cosine"])]
    raise ValueError(f"unknown model kind {kind!r}")


def check_parity(
    reference: Runner,
    candidate: Runner,
    batches: Sequence[Mapping[str, np.ndarray]],
    checks: Sequence[Comparator],
) -> ParityReport:
    """Run both runners on every batch and report the worst value per (output, metric).

    Does not raise on divergence (call :meth:`ParityReport.raise_for_failure`); raises
    :class:`ParityError` only when the outputs cannot be compared at all (shape mismatch).
    """
    rows: dict[tuple[str, str], ParityRow] = {}
    counts: dict[str, float] = {}
    for feeds in batches:
        batch_size = int(next(iter(feeds.values())).shape[0])
        ref_out, cand_out = reference(feeds), candidate(feeds)
        for check in checks:
            for m in check(ref_out, cand_out):
                if m.note:
                    counts[m.note] = counts.get(m.note, 0.0) + m.value
                    continue
                row = rows.setdefault(
                    (m.output, m.metric),
                    ParityRow(
                        m.output,
                        m.metric,
                        math.inf if m.higher_is_better else -math.inf,
                        m.tolerance,
                        m.higher_is_better,
                    ),
                )
                row.value = _worse(row.value, m.value, m.higher_is_better)
                row.tolerance = m.tolerance
                if batch_size not in row.batch_sizes:
                    row.batch_sizes.append(batch_size)
    notes = [f"{total:g} {note}" for note, total in counts.items()]
    return ParityReport(reference.name, candidate.name, list(rows.values()), notes)


def _worse(a: float, b: float, higher_is_better: bool) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return min(a, b) if higher_is_better else max(a, b)


# --------------------------------------------------------------------------- real inputs
@dataclass
class ParityInputs:
    """Preprocessed samples ``[N, 3, S, S]`` float32 (0..255) and where they came from."""

    samples: np.ndarray
    source: dict[str, Any]

    def batches(self, input_name: str, sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The first ``size`` samples for each batch size."""
        if max(sizes) > len(self.samples):
            raise ValueError(f"only {len(self.samples)} parity samples for batch {max(sizes)}")
        return [{input_name: np.ascontiguousarray(self.samples[:n])} for n in sizes]


def parity_inputs(
    kind: str,
    size: int,
    count: int,
    data: Path | None = None,
    seed: int = PARITY_SEED,
) -> ParityInputs:
    """``count`` real, preprocessed model inputs for a model ``kind``.

    With ``data`` (a ``data synth`` directory or one split of it), read its images;
    otherwise render a small fixed-seed set with the synthetic generator, in memory.
    Detector inputs are letterboxed images; tagger/embedder inputs are square crops around
    the ground-truth garment boxes.
    """
    labelled: Iterable[Sample]
    if data is not None:
        labelled = (
            sample
            for split in _splits(Path(data))
            for sample in read_split(split.parent, split.name).samples
        )
        return _inputs_from(kind, size, count, labelled, {"data": str(Path(data).resolve())})

    from fashionserve.data.dataset import render_samples

    # The packaged taxonomy, not the checkpoint's: the pixels are what matters, and the
    # renderer knows how to draw the categories it ships with.
    labelled = render_samples(max(SYNTH_MIN_IMAGES, count), seed, splits=PARITY_SPLITS)
    return _inputs_from(kind, size, count, labelled, {"synthetic": {"seed": seed}})


def _splits(data: Path) -> list[Path]:
    if (data / "labels.json").is_file():
        return [data]
    found = [data / s for s in PARITY_SPLITS if (data / s / "labels.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{data}: no labels.json (expected a `data synth` directory)")
    return found


def _inputs_from(
    kind: str, size: int, count: int, labelled: Iterable[Sample], source: dict[str, Any]
) -> ParityInputs:
    samples: list[np.ndarray] = []
    used: list[str] = []
    for sample in labelled:
        if len(samples) >= count:
            break
        if sample.split not in used:
            used.append(sample.split)
        # decode_image: the decoding (EXIF, colour modes) the serving preprocess uses.
        image = decode_image(sample.image)
        if kind == "detector":
            samples.append(letterbox(image, size)[0])
            continue
        for garment in sample.garments:
            samples.append(square_crop(image, garment.box, size))
    samples = samples[:count]
    if len(samples) < count:
        raise ValueError(f"{source}: only {len(samples)} {kind} inputs, {count} needed")
    stacked = np.stack(samples).transpose(0, 3, 1, 2).astype(np.float32)
    source = {**source, "splits": used, "count": len(samples)}
    return ParityInputs(np.ascontiguousarray(stacked), source)
