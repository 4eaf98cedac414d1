"""What ``fashionserve loadtest bench`` is asked to measure, and its one error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fashionserve.errors import Error, ErrorKind


class BenchError(Error):
    """The benchmark could not set up what it measures."""

    kind = ErrorKind.UNAVAILABLE
    reason = "BENCHMARK_FAILED"


@dataclass(frozen=True)
class BenchSettings:
    """What ``fashionserve loadtest bench`` measures and where it writes."""

    output: Path = Path("BENCHMARKS.md")
    assets: Path = Path("benchmarks")
    section: str = "cpu-default"
    workdir: Path = Path("var")
    duration: float = 30.0
    warmup: float = 3.0
    stack_warmup: float = 10.0
    concurrency: int = 8
    batching_concurrency: int = 32
    processes: int = 2
    soak_duration: float = 600.0
    capacity_p99_ms: float | None = None
    capacity_steps: int = 8
    flavour: str = "python-ort"
    skip: tuple[str, ...] = ()
    gateway: str | None = None
    api_key: str | None = None
    triton: str | None = None
    gateway_config: Path | None = None
    checkpoints: Path | None = None
    watch: tuple[tuple[str, int], ...] = ()
    images: tuple[Path, ...] = ()
    phone_images: int = 16
    repository: Path | None = None
    ray_cores: int = 2
    ray_replicas: int = 4
    progress: bool = True
    command: str = ""
