"""Capture of served results: records as ``active select`` reads them, sampling per
tenant, rotation, and a stalled writer that drops (and counts) instead of holding requests."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from fashionserve.ensemble import Garment
from fashionserve.gateway.capture import (
    Capture,
    DirectorySink,
    Pending,
    category_uncertainty,
    read_capture,
)
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.served_state import ServedModel
from fashionserve.gateway.settings import CaptureSettings, load_settings
from fashionserve.gateway.telemetry import Metrics
from fashionserve.taxonomy import Taxonomy, load_taxonomy

TAXONOMY = load_taxonomy()
MODELS = (ServedModel("tagger", "3", "ab" * 32),)


def pending(taxonomy: Taxonomy, image: bytes = b"jpeg bytes", request_id: str = "r1") -> Pending:
    rng = np.random.default_rng(0)
    garment = Garment(
        box=(10.0, 20.0, 110.0, 220.0),
        score=0.9,
        detector_class=0,
        logits=rng.normal(size=taxonomy.num_logits).astype(np.float32),
        embedding=np.full(8, 1 / np.sqrt(8), np.float32),
    )
    return Pending(request_id, "shop", 1_700_000_000_000, image, ImageOutput(320, 240, [garment]),
                   taxonomy, MODELS)  # fmt: skip


class StalledSink:
    """A sink whose writes wait until released: a filesystem that has stopped answering."""

    def __init__(self, inner: DirectorySink) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, name: str, table: pa.Table) -> str:
        self.entered.set()
        assert self.release.wait(30)
        return self.inner.write(name, table)


def test_capture_is_off_unless_a_directory_is_set() -> None:
    settings = load_settings(auth_enabled=False)
    assert settings.capture.directory is None
    assert Capture.from_settings(settings.capture, Metrics().capture_records) is None
    with pytest.raises(ValidationError, match="rate of tenant 'acme'"):
        load_settings(auth_enabled=False, capture={"tenant_sample_rates": {"acme": 2}})


def test_a_record_holds_what_selection_needs(tmp_path: Path) -> None:
    metrics = Metrics()
    settings = CaptureSettings(directory=str(tmp_path), sample_rate=1.0)
    capture = Capture.from_settings(settings, metrics.capture_records)
    assert capture is not None
    capture.start()
    item = pending(TAXONOMY)
    assert capture.offer(item)
    capture.close()

    (record,) = read_capture(tmp_path)
    assert record["request_id"] == "r1" and record["tenant"] == "shop"
    assert record["image_sha256"] == hashlib.sha256(b"jpeg bytes").hexdigest()
    assert record["image"] is None  # image bytes only when configured
    assert record["models"] == [{"name": "tagger", "version": "3"}]
    assert record["taxonomy_hash"] == TAXONOMY.hash
    (garment,) = record["garments"]
    assert garment["box"] == {"x_min": 10.0, "y_min": 20.0, "x_max": 110.0, "y_max": 220.0}
    assert len(garment["embedding"]) == 8
    tables = {(p["table"], p["label"]) for p in garment["probabilities"]}
    assert ("category:", "top") in tables and ("colour", "red") in tables
    expected = category_uncertainty(
        TAXONOMY, TAXONOMY.probabilities(item.output.garments[0].logits)
    )
    assert garment["category"] == expected.category
    assert garment["margin"] == pytest.approx(expected.margin, abs=1e-6)
    assert garment["entropy"] == pytest.approx(expected.entropy, abs=1e-6)
    assert metrics.value("fashionserve_capture_records_total", outcome="written") == 1


def test_image_bytes_are_kept_only_when_configured(tmp_path: Path) -> None:
    settings = CaptureSettings(directory=str(tmp_path), include_images=True)
    capture = Capture.from_settings(settings, Metrics().capture_records)
    assert capture is not None
    capture.start()
    capture.offer(pending(TAXONOMY, image=b"the photo"))
    capture.close()
    assert read_capture(tmp_path)[0]["image"] == b"the photo"


def test_uncertainty_is_zero_margin_and_full_entropy_for_a_coin_toss() -> None:
    unsure = category_uncertainty(TAXONOMY, TAXONOMY.probabilities(np.zeros(TAXONOMY.num_logits)))
    # Uniform at each level is not uniform over leaves (tops have 4 children, the others
    # 3), but the two best leaves tie: nothing to choose between them.
    assert unsure.margin == pytest.approx(0.0, abs=1e-9)
    assert unsure.entropy > 0.95
    logits = np.zeros(TAXONOMY.num_logits)
    for seg in TAXONOMY.layout:
        if seg.kind == "category" and seg.owner in ("", "bottom"):
            logits[seg.start + seg.labels.index("bottom" if seg.owner == "" else "skirt")] = 20
    sure = category_uncertainty(TAXONOMY, TAXONOMY.probabilities(logits))
    assert sure.category == "skirt"
    assert sure.margin > 0.99 and sure.entropy < 0.01


def test_sampling_follows_the_tenant_rate(tmp_path: Path) -> None:
    settings = CaptureSettings(
        directory=str(tmp_path), sample_rate=1.0, tenant_sample_rates={"quiet": 0.0}
    )
    capture = Capture.from_settings(settings, Metrics().capture_records)
    assert capture is not None
    assert all(capture.sampled("shop") for _ in range(100))
    assert not any(capture.sampled("quiet") for _ in range(100))


def test_a_file_is_written_when_its_first_record_is_old_enough(tmp_path: Path) -> None:
    settings = CaptureSettings(directory=str(tmp_path), max_file_seconds=0.05)
    capture = Capture.from_settings(settings, Metrics().capture_records)
    assert capture is not None
    capture.start()
    try:
        capture.offer(pending(TAXONOMY))
        deadline = time.monotonic() + 30
        while not read_capture(tmp_path):  # written while the gateway runs, not at close
            assert time.monotonic() < deadline, "no capture file was written"
            time.sleep(0.02)
        capture.offer(pending(TAXONOMY, request_id="r2"))
    finally:
        capture.close()
    assert [r["request_id"] for r in read_capture(tmp_path)] == ["r1", "r2"]
    assert len(list(tmp_path.glob("capture-*.parquet"))) == 2


def test_a_stalled_writer_drops_records_and_counts_them_without_waiting(tmp_path: Path) -> None:
    metrics = Metrics()
    settings = CaptureSettings(directory=str(tmp_path), max_queued_records=2, max_file_bytes=1)
    sink = StalledSink(DirectorySink(str(tmp_path)))
    capture = Capture(settings, metrics.capture_records, sink)
    capture.start()
    capture.offer(pending(TAXONOMY, request_id="first"))
    assert sink.entered.wait(30)  # the writer is stuck writing the first record
    # The request path only queues: with the writer stuck, each offer returns at once,
    # queued while there is room, dropped after.
    outcomes = [capture.offer(pending(TAXONOMY, request_id=f"r{i}")) for i in range(5)]
    assert outcomes == [True, True, False, False, False]
    assert metrics.value("fashionserve_capture_records_total", outcome="dropped") == 3
    sink.release.set()
    capture.close()
    assert sorted(r["request_id"] for r in read_capture(tmp_path)) == ["first", "r0", "r1"]
    assert metrics.value("fashionserve_capture_records_total", outcome="written") == 3
