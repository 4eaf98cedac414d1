"""Where Triton's time went, per model and per image, from its statistics API.

Triton counts, per model, the time each execution spent gathering its inputs
(``compute_input``), running (``compute_infer``) and returning its outputs
(``compute_output``). Its ``batch_stats`` hold these per execution (``inference_stats``
would count a batch's time once per request in it), so summing them over the batch sizes
gives the model's time, which divided by the images the pipeline handled meanwhile (the
detector's ``inference_count``: one per image) is the time per image. On a machine with
fewer cores than busy model processes these are wall times, waiting for a core included.
"""

from __future__ import annotations

from typing import Any

from fashionserve.ensemble import CROP, PREPROCESS

STEPS = (PREPROCESS, "detector", CROP, "tagger", "embedder")
"""The ensemble's models in pipeline order."""

PHASES = ("compute_input", "compute_infer", "compute_output")


def snapshot(url: str) -> dict[str, dict[str, int]]:
    """Each pipeline model's cumulative compute nanoseconds per phase, and its
    ``inference_count``, now (all versions summed)."""
    from fashionserve.ensemble import connect

    client = connect(url)
    try:
        stats: dict[str, Any] = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    return parse(stats)


def parse(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    """:func:`snapshot` from Triton's statistics as JSON (uint64 fields are strings)."""
    out: dict[str, dict[str, int]] = {}
    for model in stats.get("model_stats", []):
        if model.get("name") not in STEPS:
            continue
        totals = out.setdefault(model["name"], dict.fromkeys((*PHASES, "inference_count"), 0))
        totals["inference_count"] += int(model.get("inference_count", 0))
        for batch in model.get("batch_stats", []):
            for phase in PHASES:
                totals[phase] += int(batch.get(phase, {}).get("ns", 0))
    return out


def per_image(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """Milliseconds per image of each model and phase between two snapshots, with the
    number of images (``{"images": 0}`` when none went through)."""
    images = after.get("detector", {}).get("inference_count", 0) - before.get("detector", {}).get(
        "inference_count", 0
    )
    if images <= 0:
        return {"images": 0, "models": {}}
    models: dict[str, dict[str, float]] = {}
    for name in STEPS:
        if name not in after:
            continue
        was = before.get(name, {})
        ms = {phase: (after[name][phase] - was.get(phase, 0)) / images / 1e6 for phase in PHASES}
        ms["total"] = sum(ms.values())
        models[name] = {k: round(v, 3) for k, v in ms.items()}
    return {"images": images, "models": models}
