"""What one load generator process records, and how the records of several are merged.

Latencies go into HdrHistograms (microseconds, three significant figures), so that a
percentile of the merged histogram is the percentile of all requests, not an average of
per-process percentiles. Each process ships its histograms encoded (compressed, base64)
to the parent, which decodes and adds them (:func:`merge_payloads`).

Every latency is measured from the request's *scheduled* send time. In a closed loop that
is the moment the caller sent it; in an open loop it is the arrival time the schedule
fixed in advance, so a request the generator (or a queue in front of it) sent late still
carries the wait it suffered: no coordinated omission.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 300_000_000
"""Latencies are tracked from 1 µs to 5 minutes; longer ones are clamped (and a request
timeout is far below that anyway)."""

SIGNIFICANT_FIGURES = 3
SECOND_FIGURES = 2
"""Per-second histograms keep two significant figures: 1% resolution is plenty for a time
series plot, and each costs ~20 KiB instead of ~200 KiB (a 10-minute soak has 600)."""

OK = "OK"

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99_9", 99.9),
)
"""The reported percentiles: JSON key and percentile."""


def new_histogram(figures: int = SIGNIFICANT_FIGURES) -> HdrHistogram:
    """An empty latency histogram in microseconds."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, figures)


def to_micros(seconds: float) -> int:
    """``seconds`` as whole microseconds, clamped to the trackable range."""
    return min(HIGHEST_US, max(LOWEST_US, round(seconds * 1e6)))


def _encode(hist: HdrHistogram) -> str:
    return hist.encode().decode("ascii")


def _decode_into(hist: HdrHistogram, encoded: str) -> None:
    hist.decode_and_add(encoded.encode("ascii"))


@dataclass
class SecondBucket:
    """The requests that completed during one second of the measured window."""

    ok: int = 0
    errors: int = 0
    latency: HdrHistogram = field(default_factory=lambda: new_histogram(SECOND_FIGURES))


class Recorder:
    """Counts and latencies of the measured (post-warm-up) requests of one run.

    Times are ``time.monotonic()`` seconds, which on Linux is one clock for every process
    of the machine, so processes started together share ``measure_start``.
    """

    def __init__(self, measure_start: float) -> None:
        self.measure_start = measure_start
        self.latency = new_histogram()
        self.send_lag = new_histogram(SECOND_FIGURES)
        self.errors: Counter[str] = Counter()
        self.seconds: dict[int, SecondBucket] = {}
        self.ok = 0
        self.garments = 0
        self.first_done: float | None = None
        self.last_done: float | None = None

    @property
    def total(self) -> int:
        """Measured requests, successful or not."""
        return self.ok + sum(self.errors.values())

    def record(
        self, scheduled: float, sent: float, done: float, code: str, garments: int = 0
    ) -> int:
        """Record one request; returns its latency in microseconds (from ``scheduled``).

        ``code`` is ``"OK"`` or a gRPC status code name. Only successful requests enter
        the latency histogram; failures are counted by code (a fast error must not make
        the service look fast).
        """
        latency_us = to_micros(done - scheduled)
        second = max(0, int(done - self.measure_start))
        bucket = self.seconds.get(second)
        if bucket is None:
            bucket = self.seconds[second] = SecondBucket()
        if code == OK:
            self.ok += 1
            self.garments += garments
            self.latency.record_value(latency_us)
            bucket.ok += 1
            bucket.latency.record_value(latency_us)
        else:
            self.errors[code] += 1
            bucket.errors += 1
        self.send_lag.record_value(to_micros(max(0.0, sent - scheduled)))
        self.first_done = done if self.first_done is None else min(self.first_done, done)
        self.last_done = done if self.last_done is None else max(self.last_done, done)
        return latency_us

    # ----------------------------------------------------------------- shipping, merging
    def to_payload(self) -> dict[str, Any]:
        """A picklable, JSON-able form for sending to the parent process."""
        return {
            "measure_start": self.measure_start,
            "latency": _encode(self.latency),
            "send_lag": _encode(self.send_lag),
            "errors": dict(self.errors),
            "ok": self.ok,
            "garments": self.garments,
            "first_done": self.first_done,
            "last_done": self.last_done,
            "seconds": {
                str(s): {"ok": b.ok, "errors": b.errors, "latency": _encode(b.latency)}
                for s, b in self.seconds.items()
            },
        }

    def add_payload(self, payload: dict[str, Any]) -> None:
        """Add another recorder's :meth:`to_payload` into this one."""
        _decode_into(self.latency, payload["latency"])
        _decode_into(self.send_lag, payload["send_lag"])
        self.errors.update(payload["errors"])
        self.ok += int(payload["ok"])
        self.garments += int(payload["garments"])
        for key, b in payload["seconds"].items():
            bucket = self.seconds.setdefault(int(key), SecondBucket())
            bucket.ok += int(b["ok"])
            bucket.errors += int(b["errors"])
            _decode_into(bucket.latency, b["latency"])
        for name, pick in (("first_done", min), ("last_done", max)):
            theirs = payload[name]
            if theirs is not None:
                mine = getattr(self, name)
                setattr(self, name, theirs if mine is None else pick(mine, theirs))

    # --------------------------------------------------------------------- figures
    def elapsed(self) -> float:
        """Seconds from the start of the measured window to the last measured completion."""
        if self.last_done is None:
            return 0.0
        return max(self.last_done - self.measure_start, 1e-9)

    def throughput(self) -> float:
        """Successful requests per second over the measured window."""
        elapsed = self.elapsed()
        return self.ok / elapsed if elapsed > 0 else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        """Percentiles, mean, min and max of successful requests, in milliseconds."""
        return histogram_ms(self.latency)

    def timeseries(self) -> list[dict[str, Any]]:
        """One row per second of the measured window: completions, errors, p50/p90/p99.

        ``covered`` is the fraction of the second inside the window (less than 1 for the
        last one) and ``ok_rps`` the completions divided by it."""
        if not self.seconds:
            return []
        rows = []
        last = max(self.seconds)
        for second in range(last + 1):
            bucket = self.seconds.get(second, SecondBucket())
            figures = histogram_ms(bucket.latency)
            # The last second is usually cut short by the end of the run.
            covered = min(1.0, max(self.elapsed() - second, 1e-3)) if second == last else 1.0
            rows.append(
                {
                    "second": second,
                    "covered": round(covered, 3),
                    "ok": bucket.ok,
                    "errors": bucket.errors,
                    "ok_rps": bucket.ok / covered,
                    "p50_ms": figures["p50"],
                    "p90_ms": figures["p90"],
                    "p99_ms": figures["p99"],
                }
            )
        return rows


def histogram_ms(hist: HdrHistogram) -> dict[str, float | None]:
    """The reported percentiles of a microsecond histogram, in ms (``None`` when empty)."""
    keys = [k for k, _ in PERCENTILES] + ["max", "min", "mean"]
    if hist.get_total_count() == 0:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {
        key: hist.get_value_at_percentile(pct) / 1000.0 for key, pct in PERCENTILES
    }
    out["max"] = hist.get_max_value() / 1000.0
    out["min"] = hist.get_min_value() / 1000.0
    out["mean"] = hist.get_mean_value() / 1000.0
    return out


def merge_payloads(payloads: list[dict[str, Any]]) -> Recorder:
    """One recorder holding the requests of every payload (all share ``measure_start``)."""
    if not payloads:
        raise ValueError("no payloads to merge")
    merged = Recorder(payloads[0]["measure_start"])
    for payload in payloads:
        merged.add_payload(payload)
    return merged
