"""``fashionserve serve``: the whole stack on localhost, from a fresh clone, in one command.

On the first run it builds what it needs under the work directory (its layout is
:mod:`fashionserve.stack`'s), showing each step:

1. checkpoints: the committed demo checkpoints (``checkpoints/``), or, when they are
   absent, a synthetic data set rendered and the three models trained on it;
2. the model repository: each checkpoint exported (ONNX, parity-checked) and the
   ``fashion_pipeline`` ensemble assembled, only when missing or when a checkpoint changed
   (its sha256 differs from the one in the served version's manifest);
3. a development API key (its hash in ``keys.yaml``, the key itself in ``dev-api-key``,
   both readable by their owner only) and a sample image;

then starts Triton (loopback only, chosen free ports) and the gateway in this process,
waits until the gateway's health service reports SERVING, and prints one ready line.
Later runs reuse everything, so they are ready in the time Triton takes to load.

Triton is supervised (:class:`~fashionserve.triton.TritonSupervisor`): when it dies, the
cause (exit code or signal) is logged and it is restarted with backoff on the same port;
meanwhile the gateway reports NOT_SERVING and refuses calls with UNAVAILABLE, then serves
again once Triton is back. After too many failures in a window the stack stops with the
causes and Triton's last lines, and exits non-zero.

Ctrl-C or SIGTERM stops the gateway (in-flight calls get ``shutdown_grace_seconds``), then
Triton and its python-backend processes; the ready file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fashionserve.clients.security import API_KEY_ENV  # what `fashionserve analyze` reads
from fashionserve.ensemble import MODEL_KINDS, MODEL_NAME
from fashionserve.errors import Error, FailedPrecondition
from fashionserve.search_index import index_root
from fashionserve.stack import COMMITTED_CHECKPOINTS, Workdir, resolve_checkpoints

if TYPE_CHECKING:
    from fashionserve.data.reader import Sample
    from fashionserve.model_repository.settings import RepositorySettings
    from fashionserve.triton import TritonSupervisor

DEV_KEY_ID = "dev"
READY_TIMEOUT = 300.0  # seconds for Triton to load every model and the gateway to report it


class ServeError(FailedPrecondition):
    """The stack could not be built or started; the message says what to do."""

    reason = "SERVE_FAILED"


@dataclass(frozen=True)
class ServeOptions:
    """What ``fashionserve serve`` is asked for (its flags, with the same defaults)."""

    workdir: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 50051
    ready_file: Path | None = None
    checkpoints: Path | None = None
    train_images: int = 6000
    train_budget: float = 1.0
    ready_timeout: float = READY_TIMEOUT


class _StopRequested(Exception):
    """SIGTERM or SIGINT arrived while building or starting."""


class Progress:
    """Numbered steps with their durations, on stderr."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        """A step; the yielded function adds a detail line to it."""
        self.n += 1
        started = time.monotonic()
        _say(f"[{self.n}/{self.total}] {title}")
        yield lambda detail: _say(f"      {detail}")
        _say(f"      done in {time.monotonic() - started:.1f}s")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ build phases


def train_checkpoints(
    wd: Workdir, images: int, budget: float, detail: Callable[[str], None]
) -> None:
    """Render the synthetic data set (if not already there) and train what is missing."""
    from fashionserve.data.writer import synthesize
    from fashionserve.taxonomy import load_taxonomy
    from fashionserve.train import train_all

    if not (wd.data / "train" / "labels.json").is_file():
        detail(f"rendering {images} synthetic training images into {wd.data}")
        synthesize(wd.data, images=images, seed=0, taxonomy=load_taxonomy())
    missing: list[str] = [m for m in MODEL_KINDS if not (wd.checkpoints / f"{m}.pt").is_file()]
    detail(f"training {', '.join(missing)} (budget {budget}) into {wd.checkpoints}")
    train_all(wd.data, wd.checkpoints, seed=0, models=missing, budget=budget)


def stale_models(checkpoints: Path, repository: Path) -> dict[str, str]:
    """Models whose newest served version was not exported from the current checkpoint.

    Returns ``{model: why}``; compares each checkpoint's sha256 with the
    ``source_checkpoint.sha256`` of the newest version's manifest.
    """
    from fashionserve.checkpoint import file_sha256
    from fashionserve.repository import published_versions, read_manifest

    stale: dict[str, str] = {}
    for model in MODEL_KINDS:
        sha = file_sha256(checkpoints / f"{model}.pt")
        newest = max(published_versions(repository / model), default=None)
        if newest is None:
            stale[model] = "not exported yet"
            continue
        manifest = read_manifest(repository / model / str(newest))
        source = manifest.source_checkpoint if manifest is not None else None
        served_sha = source.sha256 if source is not None else None
        if served_sha != sha:
            stale[model] = f"checkpoint changed ({str(served_sha)[:12]} -> {sha[:12]})"
    return stale


def repository_settings() -> RepositorySettings:
    """The ensemble settings ``serve`` uses: the defaults, python-ort (embedded Triton)."""
    from fashionserve.model_repository.settings import RepositorySettings

    return RepositorySettings.model_validate({"flavour": "python-ort"})


def builder_fingerprint() -> str:
    """A hash of the code ``build_repository`` copies into a repository (python models,
    config templates): after an update of that code the ensemble is assembled again."""
    import hashlib

    from fashionserve import model_repository

    root = Path(model_repository.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".pbtxt")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ensure_repository(checkpoints: Path, wd: Workdir, detail: Callable[[str], None]) -> bool:
    """Export stale models and (re)assemble the ensemble when needed; True if it did work."""
    from fashionserve.model_repository.build import build_repository

    settings = repository_settings()
    stale = stale_models(checkpoints, wd.repository)
    state = _read_json(wd.state)
    wanted = {
        "repository_settings": settings.model_dump(mode="json"),
        "builder": builder_fingerprint(),
    }
    assembled = (wd.repository / MODEL_NAME / "config.pbtxt").is_file()
    if not stale and assembled and all(state.get(k) == v for k, v in wanted.items()):
        detail(f"up to date: {wd.repository}")
        return False
    from fashionserve.export.exporter import export_checkpoint

    try:
        wd.repository.mkdir(parents=True, exist_ok=True)
        for model, why in stale.items():
            detail(f"exporting {model}: {why}")
            export_checkpoint(checkpoints / f"{model}.pt", wd.repository, echo=None)
        detail("assembling the fashion_pipeline ensemble")
        build_repository(wd.repository, settings)
    except Error as exc:  # a checkpoint, an export or the ensemble: say which step failed
        raise ServeError(f"cannot build the model repository: {exc}") from exc
    _write_json(wd.state, {**state, **wanted})
    return True


def ensure_api_key(wd: Workdir) -> str:
    """The development API key: reused while it still matches the keys file, else new."""
    from fashionserve.gateway.auth.keys import (
        KeyFileError,
        create_key,
        read_keys_file,
        verify_secret,
    )

    with contextlib.suppress(OSError, KeyFileError, ValueError):
        key = wd.key_file.read_text().strip()
        key_id, secret = key.split(".", 1)
        records = {r.id: r for r in read_keys_file(wd.keys_file)}
        if key_id in records and verify_secret(secret, records[key_id].hash):
            return key
    # No usable pair: start both files over so the keys file holds only this key.
    wd.keys_file.unlink(missing_ok=True)
    key = create_key(wd.keys_file, DEV_KEY_ID, tenant="dev")
    _write_private(wd.key_file, key + "\n")
    return key


def ensure_sample(wd: Workdir) -> Path:
    """A synthetic street scene to try the service on (rendered once, a few seconds)."""
    if wd.sample.is_file():
        return wd.sample
    _write_atomic(wd.sample, showcase_scene(seed=7).image, mode=0o644)
    return wd.sample


def showcase_scene(seed: int) -> Sample:
    """A synthetic val scene to show, with its ground truth: one with several garments (up
    to three), large ones first, from the smallest data set the renderer accepts."""
    from fashionserve.data.dataset import render_samples

    def showcase(sample: Sample) -> tuple[int, float]:
        area = sum(g.bbox[2] * g.bbox[3] for g in sample.garments)
        return min(len(sample.garments), 3), area / (sample.width * sample.height)

    return max(render_samples(12, seed, splits=("val",)), key=showcase)


def write_gateway_config(wd: Workdir, listen: str, triton_url: str, max_batch_size: int) -> Path:
    """The gateway's YAML config for this stack (also usable with ``fashionserve gateway``)."""
    import yaml

    doc = {
        "listen_address": listen,
        "triton_urls": [triton_url],
        "auth_enabled": True,
        "api_keys_file": str(wd.keys_file.resolve()),
        "max_batch_size": max_batch_size,
        # Where `fashionserve catalog build --repository <the model repository>` publishes.
        "search_index_dir": str(index_root(wd.repository).resolve()),
    }
    text = "# Written by `fashionserve serve` on each start.\n" + yaml.safe_dump(doc)
    _write_atomic(wd.gateway_config, text.encode(), mode=0o644)
    return wd.gateway_config


# -------------------------------------------------------------------------------- run


def run(options: ServeOptions) -> int:
    """Run ``fashionserve serve``; returns the exit status, or raises :class:`ServeError`
    (or the error of the step that failed) when the stack cannot be built or started."""
    wd = Workdir(options.workdir.resolve())
    ready_file: Path | None = options.ready_file.resolve() if options.ready_file else None
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)  # never leave a stale "ready" from a past run
    previous = _raise_on_signals()
    supervisor: TritonSupervisor | None = None
    started = time.monotonic()
    try:
        check_port_free(options.host, options.port)
        wd.root.mkdir(parents=True, exist_ok=True)
        progress = Progress(total=4)
        api_key, sample = _build(options, wd, progress)
        with progress.step("starting Triton and the gateway") as detail:
            supervisor = _start_triton(wd, options.ready_timeout, detail)
        # From here the asyncio loop owns SIGINT/SIGTERM.
        _restore_signals(previous)
        return asyncio.run(
            _serve_gateway(options, wd, supervisor, api_key, sample, ready_file, started)
        )
    except _StopRequested:
        _say("stopped before the stack was ready")
        return 0
    finally:
        _restore_signals(previous)
        if supervisor is not None:
            _say("stopping Triton")
            supervisor.server.stop()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def _build(options: ServeOptions, wd: Workdir, progress: Progress) -> tuple[str, Path]:
    """Steps 1-3: checkpoints, repository, key and sample; returns ``(api_key, sample)``.

    What the build steps print (export parity tables, data set summaries) goes to stderr
    with the progress: stdout carries the ready line alone, for scripts.
    """
    with contextlib.redirect_stdout(sys.stderr):
        checkpoints, complete = resolve_checkpoints(options.checkpoints, wd)
        with progress.step("checkpoints") as detail:
            if complete:
                detail(f"using {_rel(checkpoints)}")
            else:
                detail(f"no checkpoints in {_rel(COMMITTED_CHECKPOINTS)}: training demo models")
                train_checkpoints(wd, options.train_images, options.train_budget, detail)
        with progress.step("model repository") as detail:
            ensure_repository(checkpoints, wd, detail)
        with progress.step("API key and sample image") as detail:
            api_key = ensure_api_key(wd)
            sample = ensure_sample(wd)
            detail(f"keys {_rel(wd.keys_file)}, sample {_rel(sample)}")
    return api_key, sample


def _start_triton(wd: Workdir, timeout: float, detail: Callable[[str], None]) -> TritonSupervisor:
    from fashionserve.triton import TritonServer, TritonSupervisor

    log = wd.logs / "triton.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")  # this run's log only
    server = TritonServer(wd.repository, log_file=log, ready_timeout=timeout)
    detail(f"Triton loading the models (log: {_rel(log)})")
    server.start()
    detail(
        f"Triton ready in {server.startup_seconds or 0:.1f}s on {server.grpc_url} "
        f"(pid {server.pid})"
    )
    return TritonSupervisor(server)


async def _serve_gateway(
    options: ServeOptions,
    wd: Workdir,
    supervisor: TritonSupervisor,
    api_key: str,
    sample: Path,
    ready_file: Path | None,
    started: float,
) -> int:
    """Run the gateway, with Triton supervised, until a signal (returns 0); raises
    :class:`ServeError` when it cannot start, does not become ready, or Triton fails more
    often than the supervisor's policy allows."""
    from fashionserve.gateway.server import create_server
    from fashionserve.gateway.settings import load_settings
    from fashionserve.triton import TritonError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = write_gateway_config(
        wd,
        f"{options.host}:{options.port}",
        supervisor.server.grpc_url,
        max_batch_size=min(8, repository_settings().max_images_per_request),
    )
    settings = load_settings(config)
    try:
        server, port = await create_server(settings)
    except OSError as exc:  # the port is taken
        raise ServeError(f"the gateway {exc}") from exc
    await server.start()
    address = f"{options.host}:{port}"
    supervision = asyncio.create_task(supervisor.run(stop), name="triton-supervisor")
    try:
        if not await _wait_serving(address, stop, supervision, options.ready_timeout):
            if supervision.done():
                supervision.result()  # raises why the supervisor gave up
            if stop.is_set():
                return 0
            raise ServeError(
                "the gateway did not report SERVING in time; Triton log tail:\n"
                + "\n".join(supervisor.server.log_tail(20))
            )
        if ready_file is not None:
            _write_atomic(
                ready_file,
                json.dumps({"address": address, "api_key": api_key}).encode(),
                mode=0o600,
            )
        ready = _ready_line(address, api_key, wd.key_file, sample, time.monotonic() - started)
        print(ready, flush=True)
        await supervision  # until a signal sets stop, or the supervisor gives up
        _say("stopping the gateway")
        return 0
    except TritonError as exc:
        raise ServeError(f"the stack stops: {exc}") from exc
    finally:
        supervision.cancel()
        with contextlib.suppress(asyncio.CancelledError, TritonError):
            await supervision
        await server.stop()


async def _wait_serving(
    address: str, stop: asyncio.Event, supervision: asyncio.Task[None], timeout: float
) -> bool:
    """Poll the gateway's health service until SERVING; False on stop, the supervisor
    giving up, or timeout."""
    import grpc.aio
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set() and time.monotonic() < deadline:
            if supervision.done():
                return False
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.25)
    return False


def _ready_line(address: str, api_key: str, key_file: Path, sample: Path, seconds: float) -> str:
    # The hint passes the key in the environment, read from its file: on the command line
    # `ps` and the shell's history would see it.
    try_it = f'{API_KEY_ENV}="$(cat {shlex.quote(_rel(key_file))})" ' + shlex.join(
        [_command_name(), "analyze", _rel(sample), "--gateway", address]
    )
    return (
        f"fashionserve ready in {seconds:.0f}s: gateway {address}, API key {api_key}; "
        f"try: {try_it}   (Ctrl-C stops)"
    )


def _command_name() -> str:
    """How to run this ``fashionserve`` from the shell: plain if on PATH, else its path."""
    import shutil

    local = Path(sys.executable).parent / "fashionserve"
    on_path = shutil.which("fashionserve")
    if on_path is not None and (not local.is_file() or Path(on_path).resolve() == local.resolve()):
        return "fashionserve"
    return _rel(local) if local.is_file() else "fashionserve"


# -------------------------------------------------------------------------- utilities


def check_port_free(host: str, port: int) -> None:
    """Fail fast, before minutes of building, when the gateway's port is taken."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {host}:{port} ({exc.strerror}): is another `fashionserve "
                "serve` running? Stop it, or pick another --port"
            ) from exc


def _raise_on_signals() -> dict[int, Any]:
    """Turn SIGINT/SIGTERM into :class:`_StopRequested` during the blocking phases."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when inside it (shorter to copy)."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), 0o644)


def _write_private(path: Path, text: str) -> None:
    _write_atomic(path, text.encode(), mode=0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` aside and rename it in, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
