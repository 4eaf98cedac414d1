"""HdrHistogram recording and the merge of several generator processes' records."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from fashionserve.loadtest.recorder import Recorder, merge_payloads


def fill(rec: Recorder, latencies_ms: list[float], start: float, code: str = "OK") -> None:
    """Record requests completing one after another from ``start``."""
    done = start
    for ms in latencies_ms:
        done += 0.01
        rec.record(done - ms / 1000, done - ms / 1000, done, code, garments=2)


def test_merged_percentiles_are_those_of_all_requests_not_an_average():
    rng = random.Random(1)
    fast = [rng.uniform(5, 10) for _ in range(900)]  # process A: fast requests
    slow = [rng.uniform(100, 200) for _ in range(100)]  # process B: a slow tail
    a, b, whole = Recorder(0.0), Recorder(0.0), Recorder(0.0)
    fill(a, fast, 0.0)
    fill(b, slow, 0.0)
    fill(whole, fast + slow, 0.0)

    # Through pickle and JSON, as across the process boundary and into result.json.
    payloads = [json.loads(json.dumps(pickle.loads(pickle.dumps(r.to_payload())))) for r in (a, b)]
    merged = merge_payloads(payloads)

    assert merged.ok == 1000
    assert merged.garments == 2000
    for key in ("p50", "p90", "p99", "p99_9", "max", "min"):
        assert merged.latency_ms()[key] == pytest.approx(whole.latency_ms()[key], rel=1e-3)
    # p99 falls in the slow tail (10% of requests); averaging per-process p99s would not.
    p50, p99 = merged.latency_ms()["p50"], merged.latency_ms()["p99"]
    assert p50 is not None and p99 is not None
    assert 100 <= p99 <= 200
    assert p50 < 10


def test_merge_keeps_errors_by_code_and_the_time_series():
    a, b = Recorder(100.0), Recorder(100.0)
    a.record(100.2, 100.2, 100.5, "OK")
    a.record(100.2, 100.2, 101.5, "UNAVAILABLE")
    b.record(100.1, 100.1, 100.7, "OK")
    b.record(101.0, 101.0, 102.2, "DEADLINE_EXCEEDED")
    b.record(101.0, 101.0, 102.3, "UNAVAILABLE")
    merged = merge_payloads([a.to_payload(), b.to_payload()])

    assert merged.ok == 2
    assert dict(merged.errors) == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}
    assert merged.total == 5
    assert merged.first_done == pytest.approx(100.5)
    assert merged.last_done == pytest.approx(102.3)
    series = merged.timeseries()
    assert [(r["second"], r["ok"], r["errors"]) for r in series] == [
        (0, 2, 0),
        (1, 0, 1),
        (2, 0, 2),
    ]
    assert series[0]["p50_ms"] == pytest.approx(300, rel=0.02)
    assert series[1]["p50_ms"] is None  # no successful request that second
    # Throughput: successful requests over the window from measure start to last answer.
    assert merged.throughput() == pytest.approx(2 / 2.3)


def test_failures_do_not_enter_the_latency_histogram():
    rec = Recorder(0.0)
    rec.record(0.0, 0.0, 0.001, "UNAVAILABLE")  # a fast error must not look like speed
    rec.record(0.0, 0.0, 0.2, "OK")
    assert rec.latency_ms()["min"] == pytest.approx(200, rel=1e-3)
    assert rec.latency.get_total_count() == 1


def test_empty_recorder_reports_no_latency():
    rec = Recorder(0.0)
    assert rec.latency_ms()["p99"] is None
    assert rec.throughput() == 0.0
    assert rec.timeseries() == []
