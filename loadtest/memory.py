"""Memory of the processes under test, sampled from ``/proc`` while a load test runs.

A watched process counts together with all its descendants: Triton's python-backend
models each run in a ``triton_python_backend_stub`` child process, and a leak there is a
leak of the service. A descendant that is watched under its own name (Triton, started by
the process that also runs the gateway) is counted there only. RSS is summed over the tree; shared pages are counted once per
process, which inflates the level but not the growth the soak is about.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashionserve.errors import InvalidInput

PROC = Path("/proc")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process exited while we looked
            continue
        # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(
    pid: int,
    exclude: Collection[int] = (),
    children: Mapping[int, list[int]] | None = None,
) -> list[int]:
    """``pid`` and every descendant alive now, leaving out the subtrees rooted at
    ``exclude`` (processes watched under their own name)."""
    if children is None:
        children = _children_map()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(c for c in children.get(current, []) if c not in exclude)
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process in bytes (0 if it is gone)."""
    try:
        resident_pages = int((PROC / str(pid) / "statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * PAGE_SIZE


def tree_rss_bytes(
    pid: int, exclude: Collection[int] = (), children: Mapping[int, list[int]] | None = None
) -> tuple[int, int]:
    """Summed RSS of ``pid`` and its descendants (see :func:`process_tree`), and how many
    processes that is."""
    tree = process_tree(pid, exclude, children)
    return sum(rss_bytes(p) for p in tree), len(tree)


@dataclass
class Series:
    """The samples of one watched process tree: ``(monotonic time, bytes, processes)``."""

    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)


class MemoryWatcher:
    """Samples the RSS of named process trees every ``interval`` seconds.

    The caller drives it (:meth:`maybe_sample` from its progress loop), so no thread
    competes with the load generator for the interpreter.
    """

    def __init__(self, groups: Mapping[str, int], interval: float = 5.0) -> None:
        if interval <= 0:
            raise InvalidInput("interval must be > 0")
        for name, pid in groups.items():
            if not (PROC / str(pid)).exists():
                raise InvalidInput(f"cannot watch {name}: no process {pid}")
        self.interval = interval
        self.series = {name: Series(pid) for name, pid in groups.items()}
        self._next = 0.0

    def maybe_sample(self, now: float) -> None:
        """Sample if ``interval`` has passed since the last sample."""
        if now >= self._next:
            self.sample(now)

    def sample(self, now: float) -> None:
        """Record every group's RSS now."""
        children = _children_map()
        roots = {s.pid for s in self.series.values()}
        for series in self.series.values():
            # A watched process inside another's tree (Triton started by `serve`) is
            # counted under its own name only.
            total, count = tree_rss_bytes(series.pid, roots - {series.pid}, children)
            series.samples.append((now, total, count))
        self._next = now + self.interval

    def report(self, measure_start: float) -> dict[str, Any]:
        """Growth per group over the measured window (see :func:`growth`)."""
        return {
            name: growth(s.samples, measure_start) | {"pid": s.pid}
            for name, s in self.series.items()
        }


def growth(samples: list[tuple[float, int, int]], measure_start: float) -> dict[str, Any]:
    """Memory growth of one series over the measured window.

    The baseline is the median of the first 10% of the measured samples and the final
    level the median of the last 10% (at least one sample each): medians, so one sample
    taken mid-allocation does not decide a soak. Samples taken during warm-up are kept
    for the plot but not used.
    """
    measured = [s for s in samples if s[0] >= measure_start] or samples
    mib = 1024.0 * 1024.0
    out: dict[str, Any] = {
        "samples": [
            {"t": round(t - measure_start, 3), "rss_mib": round(b / mib, 2), "processes": n}
            for t, b, n in samples
        ]
    }
    if not measured:
        return out | {"baseline_mib": None, "final_mib": None, "peak_mib": None, "growth_pct": None}
    window = max(1, len(measured) // 10)
    baseline = statistics.median(b for _, b, _ in measured[:window])
    final = statistics.median(b for _, b, _ in measured[-window:])
    return out | {
        "baseline_mib": round(baseline / mib, 2),
        "final_mib": round(final / mib, 2),
        "peak_mib": round(max(b for _, b, _ in measured) / mib, 2),
        "growth_pct": round(100.0 * (final - baseline) / baseline, 3) if baseline else None,
    }


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds one process has used so far (0 if it is gone)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    # After the command name: state is field 0, utime field 11, stime field 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(
    pid: int, exclude: Collection[int] = (), children: Mapping[int, list[int]] | None = None
) -> float:
    """CPU seconds used so far by ``pid`` and its living descendants (see
    :func:`process_tree`); a descendant that exited no longer counts."""
    return sum(cpu_seconds(p) for p in process_tree(pid, exclude, children))


def cpu_snapshot(groups: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds of each named process tree now, each watched tree counted once."""
    children = _children_map()
    roots = set(groups.values())
    return {name: tree_cpu_seconds(pid, roots - {pid}, children) for name, pid in groups.items()}
