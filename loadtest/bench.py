"""The standard benchmark (``make bench``): every claim measured as a ratio in one run.

On the embedded default stack (``fashionserve serve``: Triton from the nvidia-pytriton
wheel with the python-ort repository, and the gateway), with the same images and the
same generator settings throughout, it measures

1. the gateway against Triton's ensemble called directly, at equal concurrency: the
   throughput ratio, and the p50 latency the gateway adds (under load, and with one
   caller, where it is pure overhead);
2. the gateway with its micro-batching off (a second gateway, same settings file,
   ``max_batch_size: 1``) against the default, with more callers than batch slots;
3. fashionserve against the naive server (the same models in PyTorch, one request at a
   time) at equal concurrency;
4. a capacity search: the highest open-loop rate meeting a p99 target, and the curve of
   latency against offered load;
5. a soak at half that capacity, recording the gateway's and Triton's memory;

and writes ``BENCHMARKS.md`` (machine, versions, commands, results, plots, and for each
target whether it was met). The CPU used by each server process tree during each run is
recorded too: on a machine with two cores, where the CPU went is the profile that
explains a ratio.

The results go into a named section of ``BENCHMARKS.md`` (``cpu-default`` here,
``gpu-<flavour>`` from ``scripts/gpu_bench.sh``), so runs on other hosts add sections
instead of overwriting each other. An already running stack (a GPU host) is measured
with ``--gateway/--triton/--api-key`` instead of starting one.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fashionserve.loadtest.generator import LoadSpec, clock, run_load
from fashionserve.loadtest.memory import cpu_snapshot
from fashionserve.loadtest.report import (
    SUMMARY_HEADER,
    callers,
    markdown_table,
    memory_table,
    plot_latency_vs_load,
    plot_memory,
    plot_timeseries,
    result_to_dict,
    summary_row,
)
from fashionserve.loadtest.targets import TargetSpec

TARGETS = {
    "gateway_throughput_ratio": 0.9,
    "gateway_added_p50_ms": 2.0,
    "naive_throughput_ratio": 3.0,
    "memory_growth_pct": 5.0,
}
"""The targets of issue 5, checked and reported in BENCHMARKS.md."""

STACK_READY_TIMEOUT = 900.0
"""Seconds ``fashionserve serve`` may take (it trains the demo models when none exist)."""


class BenchError(RuntimeError):
    """The benchmark could not set up what it measures."""


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
    progress: bool = True
    command: str = ""


@dataclass
class Stack:
    """The services under test and how to reach them."""

    gateway: str
    api_key: str | None
    triton: str
    pids: dict[str, int]
    gateway_config: Path | None
    checkpoints: Path | None
    started_seconds: float = 0.0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- processes we start
def _python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fashionserve.cli", *args]


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def _stop(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> str:
    """Wait for a ready file written by ``proc``; its text."""
    deadline = clock() + timeout
    while clock() < deadline:
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise BenchError(f"{log.stem} exited with status {proc.returncode}:\n{tail}")
        time.sleep(0.25)
    raise BenchError(f"{path} did not appear within {timeout:.0f} s (log: {log})")


def wait_serving(address: str, timeout: float = 120.0) -> None:
    """Wait until the gRPC health service at ``address`` reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = clock() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while clock() < deadline:
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.25)
    raise BenchError(f"{address} did not report SERVING within {timeout:.0f} s")


def _child_named(pid: int, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.find("(") + 1 : stat.rfind(")")]
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            if ppid == pid and comm == name:
                return int(entry.name)
    return None


def start_default_stack(workdir: Path, logs: Path) -> Stack:
    """``fashionserve serve`` on a free port; returns once its gateway is SERVING."""
    ready = logs / "serve-ready.json"
    ready.unlink(missing_ok=True)
    log = logs / "serve.log"
    started = clock()
    proc = _spawn(
        _python_cli("serve", "--workdir", str(workdir), "--port", "0", "--ready-file", str(ready)),
        log,
    )
    try:
        info = json.loads(_wait_file(ready, proc, STACK_READY_TIMEOUT, log))
        import yaml

        config = workdir / "gateway.yaml"
        gateway_settings = yaml.safe_load(config.read_text())
        triton_pid = _child_named(proc.pid, "tritonserver")
        if triton_pid is None:
            raise BenchError("could not find the tritonserver process started by serve")
        from fashionserve.stack import Workdir, resolve_checkpoints

        checkpoints, complete = resolve_checkpoints(None, Workdir(workdir.resolve()))
    except BaseException:
        _stop(proc)
        raise
    return Stack(
        gateway=info["address"],
        api_key=info.get("api_key"),
        triton=gateway_settings["triton_urls"][0],
        pids={"gateway": proc.pid, "triton": triton_pid},
        gateway_config=config,
        checkpoints=checkpoints if complete else None,
        started_seconds=clock() - started,
        processes=[proc],
    )


@contextlib.contextmanager
def extra_gateway(stack: Stack, logs: Path, **overrides: Any) -> Iterator[tuple[str, int]]:
    """A second gateway (``fashionserve gateway``) with the stack's settings file and
    ``overrides`` as flags (e.g. ``max_batch_size=1``); yields ``(address, pid)``."""
    ready = logs / "gateway-extra-ready.json"
    ready.unlink(missing_ok=True)
    command = ["gateway", "--listen-address", "127.0.0.1:0", "--ready-file", str(ready)]
    if stack.gateway_config is not None:
        command += ["--config", str(stack.gateway_config)]
    else:
        command += ["--triton-url", stack.triton]
        if stack.api_key is None:
            command.append("--no-auth")
    for key, value in overrides.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    log = logs / "gateway-extra.log"
    proc = _spawn(_python_cli(*command), log)
    try:
        address = json.loads(_wait_file(ready, proc, 120, log))["address"]
        wait_serving(address)
        yield address, proc.pid
    finally:
        _stop(proc, grace=20)


@contextlib.contextmanager
def naive_server(checkpoints: Path, logs: Path) -> Iterator[tuple[str, int]]:
    """The naive reference server on a free port; yields ``(address, pid)``."""
    ready = logs / "naive-ready.txt"
    ready.unlink(missing_ok=True)
    log = logs / "naive.log"
    proc = _spawn(
        _python_cli(
            "loadtest",
            "naive-server",
            "--checkpoints",
            str(checkpoints),
            "--listen-address",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ),
        log,
    )
    try:
        yield _wait_file(ready, proc, 180, log), proc.pid
    finally:
        _stop(proc, grace=20)


# --------------------------------------------------------------------------- measuring
@dataclass
class Bench:
    """One benchmark session: settings, the stack, the images and what was measured."""

    settings: BenchSettings
    stack: Stack
    images: list[bytes]
    triton_version: str = "unknown"
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)

    def measure(
        self,
        key: str,
        label: str,
        target: TargetSpec,
        load: LoadSpec,
        pids: Mapping[str, int],
        watch: Mapping[str, int] | None = None,
        watch_interval: float = 5.0,
    ) -> dict[str, Any]:
        """Run one load test, with the CPU each server process tree used meanwhile."""
        _say(f"{label}: {_describe(load)}")
        before, t0 = cpu_snapshot(pids), clock()
        result = run_load(
            target,
            load,
            self.images,
            label=label,
            progress=self.settings.progress,
            watch=watch,
            watch_interval=watch_interval,
        )
        wall = clock() - t0
        after = cpu_snapshot(pids)
        data = result_to_dict(result)
        data["extra"]["server_cpu_cores"] = {
            name: round((after[name] - before[name]) / wall, 3) for name in pids
        }
        lat = data["latency_ms"]
        _say(
            f"{label}: {data['throughput_rps']:.2f} req/s, p50 {_ms(lat['p50'])}, p99 "
            f"{_ms(lat['p99'])}, errors {data['requests']['errors']}"
        )
        self.runs[key] = data
        self.commands[key] = _equivalent_command(target, load)
        return data


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _describe(load: LoadSpec) -> str:
    shape = (
        f"closed loop, {callers(load.concurrency)}"
        if load.mode == "closed"
        else f"open loop, {load.rate:.2f} req/s ({load.arrival})"
    )
    return f"{shape}, {load.duration:g} s after {load.warmup:g} s warm-up"


def _equivalent_command(target: TargetSpec, load: LoadSpec) -> str:
    args = ["fashionserve", "loadtest", "run", "--target", target.kind, "--address", target.address]
    if target.api_key:
        args += ["--api-key", "$FASHIONSERVE_API_KEY"]
    if load.mode == "closed":
        args += ["--concurrency", str(load.concurrency)]
    else:
        args += ["--rate", f"{load.rate:.2f}", "--arrival", load.arrival]
    args += [
        "--duration",
        f"{load.duration:g}",
        "--warmup",
        f"{load.warmup:g}",
        "--processes",
        str(load.processes),
    ]
    return " ".join(args)


def run_bench(settings: BenchSettings) -> int:
    """Run the benchmark and write BENCHMARKS.md; 0 when it completed (targets missed
    are reported in the file, not as a failure: the benchmark's job is to tell)."""
    started = clock()
    logs = Path(tempfile.mkdtemp(prefix="fashionserve-bench-"))
    stack: Stack | None = None
    try:
        if settings.gateway and settings.triton:
            stack = Stack(
                gateway=settings.gateway,
                api_key=settings.api_key,
                triton=settings.triton,
                pids=dict(settings.watch),
                gateway_config=settings.gateway_config,
                checkpoints=settings.checkpoints,
            )
            wait_serving(stack.gateway, timeout=600)  # Triton may still be loading engines
        else:
            _say(f"starting the default stack (fashionserve serve --workdir {settings.workdir})")
            stack = start_default_stack(settings.workdir, logs)
            _say(f"stack ready in {stack.started_seconds:.0f} s: gateway {stack.gateway}")
            if settings.checkpoints is not None:
                stack.checkpoints = settings.checkpoints
        images = _bench_images(settings)
        bench = Bench(settings, stack, images, triton_version=triton_version(stack.triton))
        _measure_all(bench, logs)
        elapsed = clock() - started
        _say(f"measured in {elapsed / 60:.1f} min; writing {settings.output}")
        write_benchmarks(bench, elapsed)
    except BenchError as exc:
        _say(f"error: {exc} (logs in {logs})")
        return 1
    finally:
        if stack is not None:
            for proc in stack.processes:
                _stop(proc)
    shutil.rmtree(logs, ignore_errors=True)
    return 0


def _bench_images(settings: BenchSettings) -> list[bytes]:
    from fashionserve.loadtest.images import load_images, synthetic_images

    if settings.images:
        return load_images(list(settings.images), limit=16)
    return synthetic_images(16)


def _measure_all(bench: Bench, logs: Path) -> None:
    s, stack = bench.settings, bench.stack
    base = LoadSpec(
        mode="closed",
        concurrency=s.concurrency,
        duration=s.duration,
        warmup=s.warmup,
        processes=s.processes,
    )
    one = replace(base, concurrency=1, duration=max(5.0, s.duration / 2))
    gateway = TargetSpec("gateway", stack.gateway, api_key=stack.api_key)
    triton = TargetSpec("triton", stack.triton)
    servers = stack.pids

    # The first requests after a start are slow (ONNX Runtime sessions, allocators, gRPC
    # channels): warm both paths once, unrecorded, so the first measured run is not
    # penalised for going first.
    _say(f"warming the stack up for {s.stack_warmup:g} s (not measured)")
    warm = replace(base, duration=max(1.0, s.stack_warmup / 2), warmup=0.0)
    run_load(gateway, warm, bench.images, label="warm-up", progress=s.progress)
    if "triton" not in s.skip:
        run_load(triton, warm, bench.images, label="warm-up", progress=s.progress)

    bench.measure("gateway", f"gateway, {s.concurrency} callers", gateway, base, servers)
    if "triton" not in s.skip:
        bench.measure("triton", f"direct Triton, {s.concurrency} callers", triton, base, servers)
        bench.measure("gateway_1", "gateway, 1 caller", gateway, one, servers)
        bench.measure("triton_1", "direct Triton, 1 caller", triton, one, servers)
    if "batching" not in s.skip:
        # Batches form only while callers outnumber the gateway's batch slots: compare on
        # and off where they do, both at the same (higher) concurrency.
        crowd = replace(base, concurrency=s.batching_concurrency)
        bench.measure(
            "gateway_batched", f"gateway, {crowd.concurrency} callers", gateway, crowd, servers
        )
        if "triton" not in s.skip:
            bench.measure(
                "triton_crowd",
                f"direct Triton, {crowd.concurrency} callers",
                triton,
                crowd,
                servers,
            )
        with extra_gateway(stack, logs, max_batch_size=1) as (address, pid):
            bench.measure(
                "gateway_unbatched",
                f"gateway, micro-batching off, {crowd.concurrency} callers",
                replace(gateway, address=address),
                crowd,
                {**servers, "gateway": pid},
            )
    if "naive" not in s.skip:
        if stack.checkpoints is None:
            _say("no checkpoints known: skipping the naive server (pass --checkpoints)")
        else:
            with naive_server(stack.checkpoints, logs) as (address, pid):
                bench.measure(
                    "naive",
                    f"naive server, {s.concurrency} callers",
                    TargetSpec("naive", address),
                    base,
                    {**servers, "naive": pid},
                )
    capacity = 0.0
    if "capacity" not in s.skip:
        capacity = _capacity(bench, gateway)
    if "soak" not in s.skip and s.soak_duration > 0:
        warmup = min(30.0, max(s.warmup, 0.05 * s.soak_duration))
        soak = (
            LoadSpec(mode="open", rate=capacity / 2, duration=s.soak_duration, warmup=warmup)
            if capacity > 0
            else LoadSpec(mode="closed", concurrency=2, duration=s.soak_duration, warmup=warmup)
        )
        soak = replace(soak, processes=s.processes)
        bench.measure(
            "soak",
            "soak",
            gateway,
            soak,
            servers,
            watch=servers or None,
            watch_interval=max(1.0, min(5.0, s.soak_duration / 60)),
        )


def _capacity(bench: Bench, gateway: TargetSpec) -> float:
    from fashionserve.loadtest.capacity import find_capacity

    s = bench.settings
    target = s.capacity_p99_ms
    if target is None:
        # Relative to the service's own latency: its p50 with one caller, times five.
        single = bench.runs.get("gateway_1") or bench.runs["gateway"]
        target = max(100.0, 5 * (single["latency_ms"]["p50"] or 20.0))
    start = bench.runs["gateway"]["throughput_rps"] or None
    _say(f"capacity search: p99 <= {target:.0f} ms, from {start or 0:.1f} req/s")
    found = find_capacity(
        gateway,
        bench.images,
        target,
        start_rate=start,
        step_duration=5.0,
        warmup=1.0,
        processes=s.processes,
        max_steps=s.capacity_steps,
        progress=s.progress,
    )
    bench.runs["capacity"] = found.to_dict()
    bench.runs["capacity_steps"] = {"steps": found.steps}
    _say(f"capacity: {found.best_rate:.2f} req/s at p99 <= {target:.0f} ms")
    return found.best_rate


# ---------------------------------------------------------------------------- writing
def machine_info() -> dict[str, Any]:
    """The host: CPU model and count, memory, OS, GPUs (when ``nvidia-smi`` is present)."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus,
    }


VERSIONED = (
    "fashionserve",
    "nvidia-pytriton",
    "tritonclient",
    "grpcio",
    "onnxruntime",
    "torch",
    "numpy",
    "hdrhistogram",
)


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_commit() -> str:
    source = Path(__file__).resolve().parents[1]  # the checkout being measured
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=source,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=source,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def triton_version(url: str) -> str:
    """The version Triton reports in its server metadata (``unknown`` if it does not)."""
    from fashionserve.ensemble import connect

    try:
        client = connect(url)
        try:
            return str(client.get_server_metadata().version)
        finally:
            client.close()
    except Exception:  # a benchmark still runs without this detail
        return "unknown"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(runs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The comparisons of the issue, each with its target and verdict."""
    rows: list[dict[str, Any]] = []

    def tput(key: str) -> float | None:
        return runs[key]["throughput_rps"] if key in runs else None

    def p50(key: str) -> float | None:
        return runs[key]["latency_ms"]["p50"] if key in runs else None

    def add(name: str, value: float | None, unit: str, target: str, met: bool | None) -> None:
        rows.append(
            {"comparison": name, "value": value, "unit": unit, "target": target, "met": met}
        )

    for gateway_key, triton_key, who in (
        ("gateway", "triton", ""),
        ("gateway_batched", "triton_crowd", ", more callers than batch slots"),
    ):
        ratio = _ratio(tput(gateway_key), tput(triton_key))
        add(
            f"gateway / direct Triton throughput{who}",
            ratio,
            "x",
            f">= {TARGETS['gateway_throughput_ratio']}x",
            None if ratio is None else ratio >= TARGETS["gateway_throughput_ratio"],
        )
    for key, who in (("_1", "1 caller"), ("", "same concurrency")):
        g, t = p50("gateway" + key), p50("triton" + key)
        added = g - t if g is not None and t is not None else None
        add(
            f"gateway added p50 latency, {who}",
            added,
            "ms",
            f"<= {TARGETS['gateway_added_p50_ms']:g} ms",
            None if added is None else added <= TARGETS["gateway_added_p50_ms"],
        )
    ratio = _ratio(tput("gateway"), tput("naive"))
    add(
        "fashionserve / naive server throughput",
        ratio,
        "x",
        f">= {TARGETS['naive_throughput_ratio']:g}x",
        None if ratio is None else ratio >= TARGETS["naive_throughput_ratio"],
    )
    add(
        "micro-batching on / off throughput",
        _ratio(tput("gateway_batched"), tput("gateway_unbatched")),
        "x",
        "measured",
        None,
    )
    if "gateway_unbatched" in runs and "gateway_batched" in runs:
        on, off = p50("gateway_batched"), p50("gateway_unbatched")
        add(
            "micro-batching on - off p50 latency",
            on - off if on is not None and off is not None else None,
            "ms",
            "measured",
            None,
        )
    if "capacity" in runs:
        cap = runs["capacity"]
        add(
            f"capacity at p99 <= {cap['p99_target_ms']:.0f} ms (open loop)",
            cap["capacity_rps"],
            "req/s",
            "measured",
            None,
        )
    for name, m in ((runs.get("soak") or {}).get("memory") or {}).items():
        growth = m.get("growth_pct")
        add(
            f"{name} memory growth over the soak",
            growth,
            "%",
            f"< {TARGETS['memory_growth_pct']:g}%",
            None if growth is None else growth < TARGETS["memory_growth_pct"],
        )
    return rows


def _headline_table(rows: list[dict[str, Any]]) -> str:
    def value(row: dict[str, Any]) -> str:
        v = row["value"]
        if v is None:
            return "not measured"
        return f"{v:.2f}{row['unit']}" if row["unit"] == "x" else f"{v:.2f} {row['unit']}"

    verdict = {True: "met", False: "**missed**", None: "-"}
    return markdown_table(
        ("comparison", "measured", "target", "verdict"),
        [[r["comparison"], value(r), r["target"], verdict[r["met"]]] for r in rows],
    )


def _cpu_profile(runs: Mapping[str, Any], key: str) -> str:
    run = runs.get(key)
    if not run:
        return ""
    cores = run["extra"].get("server_cpu_cores", {})
    parts = [f"{name} {value:.2f}" for name, value in cores.items()]
    parts.append(f"load generator {run['generator']['cores_used'] or 0:.2f}")
    return (
        f"`{run['label']}`: " + ", ".join(parts) + f" cores of {run['generator']['machine_cores']}"
    )


def _misses(rows: list[dict[str, Any]], runs: Mapping[str, Any]) -> list[str]:
    notes = []
    for row in rows:
        if row["met"] is not False:
            continue
        name = row["comparison"]
        if name.startswith("gateway /") or name.startswith("gateway added"):
            keys = ["gateway", "triton"] + (["gateway_1", "triton_1"] if "1 caller" in name else [])
        elif name.startswith("fashionserve / naive"):
            keys = ["gateway", "naive"]
        else:
            keys = ["soak"]
        profile = "; ".join(p for p in (_cpu_profile(runs, k) for k in keys) if p)
        notes.append(
            f"- **{name}** missed its target ({row['target']}). CPU used meanwhile: {profile}."
        )
    return notes


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def write_benchmarks(bench: Bench, elapsed: float) -> Path:
    """Write plots and JSON under ``assets/<section>/`` and the section of BENCHMARKS.md."""
    s = bench.settings
    assets = s.assets / s.section
    assets.mkdir(parents=True, exist_ok=True)
    runs = bench.runs
    (assets / "results.json").write_text(
        json.dumps({k: _slim(v) for k, v in runs.items()}, indent=2) + "\n"
    )
    plots: list[tuple[str, Path]] = []
    if "gateway" in runs:
        plots.append(
            (
                "Gateway under closed-loop load: latency percentiles and throughput per second",
                plot_timeseries(runs["gateway"], assets / "gateway_timeseries.png"),
            )
        )
    if "capacity_steps" in runs and runs["capacity_steps"]["steps"]:
        plots.append(
            (
                "Latency against offered load (capacity search steps, open loop)",
                plot_latency_vs_load(
                    runs["capacity_steps"]["steps"],
                    assets / "latency_vs_load.png",
                    runs["capacity"]["p99_target_ms"],
                ),
            )
        )
    soak = runs.get("soak")
    if soak is not None:
        plots.append(
            ("Soak: latency and throughput", plot_timeseries(soak, assets / "soak_timeseries.png"))
        )
        if soak.get("memory"):
            plots.append(("Soak: memory", plot_memory(soak["memory"], assets / "soak_memory.png")))

    rows = headline(runs)
    table_runs = [r for k, r in runs.items() if k not in ("capacity", "capacity_steps")]
    header = (*SUMMARY_HEADER, "server CPU (cores)", "generator CPU (cores)")
    table = markdown_table(
        header,
        [
            [
                *summary_row(r),
                ", ".join(
                    f"{k} {v:.2f}" for k, v in r["extra"].get("server_cpu_cores", {}).items()
                ),
                r["generator"]["cores_used"],
            ]
            for r in table_runs
        ],
    )
    machine, vers = machine_info(), versions()
    base = s.output.parent
    lines = [
        f"## {s.section}: {s.flavour} repository flavour",
        "",
        f"Measured {datetime.now(UTC).isoformat(timespec='minutes')} in {elapsed / 60:.1f} min "
        f"at commit {_git_commit()}.",
        "",
        "### Headline",
        "",
        _headline_table(rows),
        "",
    ]
    misses = _misses(rows, runs)
    if misses:
        lines += [
            "Targets missed, with where the CPU went during the runs concerned (server "
            "process trees and the load generator, in cores busy on average):",
            "",
            *misses,
            "",
        ]
    lines += [
        "### Machine and versions",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores; memory {machine['memory_gib']} GiB",
        f"- GPU: {', '.join(machine['gpus']) or 'none'}",
        f"- OS: {machine['os']}; Python {machine['python']}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- Triton server {bench.triton_version}; model repository flavour {s.flavour}",
        "",
        "### Results",
        "",
        f"Same {len(bench.images)} synthetic street scenes for every target, sent round "
        f"robin; {s.processes} load generator processes; latencies from each request's "
        "scheduled send time (HdrHistogram). Closed loop unless stated. The server CPU "
        "column is the CPU each process tree used during the run (warm-up included), in "
        "cores busy on average.",
        "",
        table,
        "",
    ]
    if "capacity" in runs:
        cap = runs["capacity"]
        steps = sorted(runs["capacity_steps"]["steps"], key=lambda r: r["offered_rps"])
        lines += [
            f"Capacity search (open loop, Poisson arrivals, 5 s steps): the highest rate with "
            f"p99 <= {cap['p99_target_ms']:.0f} ms and under 1% errors is "
            f"**{cap['capacity_rps']:.2f} req/s**.",
            "",
            markdown_table(
                ("offered (req/s)", "achieved (req/s)", "p50 (ms)", "p99 (ms)", "errors", "meets"),
                [
                    [
                        r["offered_rps"],
                        r["throughput_rps"],
                        r["latency_ms"]["p50"],
                        r["latency_ms"]["p99"],
                        r["requests"]["errors"],
                        "yes" if r["extra"]["meets"] else "no",
                    ]
                    for r in steps
                ],
            ),
            "",
        ]
    if soak is not None and soak.get("memory"):
        lines += [
            f"Soak: {_describe_dict(soak['load'])}; RSS of each process tree sampled from "
            "/proc (Triton with its python-backend stub processes), growth from the median "
            "of the first tenth of the measured window to the median of the last tenth.",
            "",
            memory_table(soak["memory"]),
            "",
        ]
    lines += ["### Plots", ""]
    for title, path in plots:
        lines += [f"![{title}]({_rel(path, base)})", ""]
    lines += [
        "### Commands",
        "",
        "```sh",
        s.command or "make bench",
        "# each row on its own (API key from the stack's ready file or `fashionserve keys create`):",
        *(bench.commands[k] for k in bench.commands),
        "```",
        "",
        f"Raw figures: [{_rel(assets / 'results.json', base)}]({_rel(assets / 'results.json', base)}).",
    ]
    write_section(s.output, s.section, "\n".join(lines))
    return s.output


def _describe_dict(load: dict[str, Any]) -> str:
    if load["mode"] == "closed":
        return f"closed loop of {callers(load['concurrency'])} for {load['duration']:g} s"
    return f"open loop at {load['rate']:.2f} req/s for {load['duration']:g} s"


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "histogram"}


PREAMBLE = """# Benchmarks

Measured by `make bench` (`fashionserve loadtest bench`): the gateway against Triton's
ensemble called directly, the gateway's micro-batching on and off, fashionserve against a
naive PyTorch server, a capacity search and a memory soak, all in one run on one machine,
so each claim is a ratio. `scripts/gpu_bench.sh` adds a section measured on a GPU host.
Each section below is rewritten by the run that produced it.
"""


def write_section(path: Path, section: str, body: str) -> None:
    """Put ``body`` in ``path`` between the markers of ``section``, keeping other sections."""
    begin, end = f"<!-- bench:{section} begin -->", f"<!-- bench:{section} end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else PREAMBLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
