"""The stack under test: ``fashionserve serve`` started as a process (or one already
running), a second gateway with micro-batching off, the naive reference server and the
Ray Serve reference.

Each is a process of the ``fashionserve`` command, started on a free port; its ready file
says where it listens, and the work directory (:mod:`fashionserve.stack`) where its
settings and checkpoints are.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fashionserve.loadtest.bench.settings import BenchError
from fashionserve.loadtest.generator import clock
from fashionserve.stack import Workdir, resolve_checkpoints

STACK_READY_TIMEOUT = 900.0
"""Seconds ``fashionserve serve`` may take (it trains the demo models when none exist)."""


@dataclass
class Stack:
    """The services under test and how to reach them."""

    gateway: str
    api_key: str | None
    triton: str
    pids: dict[str, int]
    gateway_config: Path | None
    checkpoints: Path | None
    repository: Path | None = None
    started_seconds: float = 0.0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _python_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fashionserve.cli", *args]


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
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
    wd = Workdir(workdir.resolve())
    try:
        info = json.loads(_wait_file(ready, proc, STACK_READY_TIMEOUT, log))
        gateway_settings = yaml.safe_load(wd.gateway_config.read_text())
        triton_pid = _child_named(proc.pid, "tritonserver")
        if triton_pid is None:
            raise BenchError("could not find the tritonserver process started by serve")
        checkpoints, complete = resolve_checkpoints(None, wd)
    except BaseException:
        stop(proc)
        raise
    return Stack(
        gateway=info["address"],
        api_key=info.get("api_key"),
        triton=gateway_settings["triton_urls"][0],
        pids={"gateway": proc.pid, "triton": triton_pid},
        gateway_config=wd.gateway_config,
        checkpoints=checkpoints if complete else None,
        repository=wd.repository,
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
        stop(proc, grace=20)


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
        stop(proc, grace=20)


def gateway_batching(stack: Stack) -> tuple[int, int]:
    """The gateway's ``max_batch_size`` and ``max_queue_delay_microseconds``."""
    from fashionserve.gateway.settings import load_settings

    # Only the batcher's fields are read: auth off so that a settings file without its
    # key file (a gateway given --api-keys-file) still loads.
    settings = load_settings(stack.gateway_config, auth_enabled=False)
    return settings.max_batch_size, settings.max_queue_delay_microseconds


@contextlib.contextmanager
def ray_server(stack: Stack, logs: Path, cores: int, replicas: int) -> Iterator[tuple[str, int]]:
    """The Ray Serve reference (``fashionserve loadtest ray-server``) serving the stack's
    model repository with the gateway's batching, on a free port; yields ``(address, pid)``."""
    if stack.repository is None:
        raise BenchError("the model repository is not known: pass --repository")
    batch, delay_us = gateway_batching(stack)
    ready = logs / "ray-ready.txt"
    ready.unlink(missing_ok=True)
    log = logs / "ray.log"
    proc = _spawn(
        _python_cli(
            "loadtest",
            "ray-server",
            "--repository",
            str(stack.repository),
            "--cores",
            str(cores),
            "--replicas",
            str(replicas),
            "--max-batch-size",
            str(batch),
            "--max-queue-delay-microseconds",
            str(delay_us),
            "--ready-file",
            str(ready),
        ),
        log,
    )
    try:
        yield _wait_file(ready, proc, 300, log), proc.pid
    finally:
        stop(proc, grace=60)
