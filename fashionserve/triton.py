"""Start and stop the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 (NGC 24.10), its python backend and one python-backend stub
per Python version. Triton wants them laid out as a server tree with the stub beside the
backend, so :func:`prepare_runtime` copies the tree once into a writable cache directory;
:class:`TritonServer` then runs it with the wheel's libraries on ``LD_LIBRARY_PATH`` and this
virtualenv's ``bin/`` first on ``PATH``, so the stubs import this environment's numpy,
onnxruntime and fashionserve.

Triton runs in its own session (process group). Stopping sends SIGTERM to Triton (it
unloads the models, which ends the stubs and frees their shared memory), waits, then
SIGKILLs whatever is left of the group and removes any python-backend shared-memory region
this server created (each server gets its own region prefix, so only its regions are
touched).

:class:`TritonSupervisor` keeps one running: when it dies it is restarted, after a backoff,
on the same gRPC port (where its clients connect), and after too many failures in a window
it gives up with the causes (``fashionserve serve``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Literal

from fashionserve.errors import Error, ErrorKind

log = logging.getLogger(__name__)

ModelControlMode = Literal["none", "explicit"]

STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
_MARKER = ".fashionserve-runtime-complete"


# Error lines Triton prints on every CPU-only start; they are not why a start failed.
_HARMLESS_ERRORS = ("CudaDriverHelper has not been initialized",)
_ERROR_LINE = re.compile(r"^E\d{4} [\d:.]+ +\d+ (?P<where>\S+)\] (?P<text>.*)$")


class TritonError(Error):
    """Triton could not be prepared, did not start, or died.

    ``errors`` holds the error lines Triton logged (first line of each), ``log_tail`` its
    last lines; both are in the message.
    """

    kind = ErrorKind.UNAVAILABLE
    reason = "TRITON_FAILED"

    def __init__(
        self, message: str, log_tail: Sequence[str] = (), errors: Sequence[str] = ()
    ) -> None:
        self.log_tail = list(log_tail)
        self.errors = list(errors)
        if self.errors:
            message += "\n--- errors Triton logged ---\n" + "\n".join(self.errors)
        if self.log_tail:
            message += "\n--- last lines of the Triton log ---\n" + "\n".join(self.log_tail)
        super().__init__(message)


def _error_summary(line: str) -> str | None:
    """The gist of a Triton error log line (``E1122 ... file.cc:123] "text"``), else None."""
    match = _ERROR_LINE.match(line)
    if match is None:
        return None
    text = match.group("text").strip().strip('"')
    if any(h in text for h in _HARMLESS_ERRORS):
        return None
    text = text.split("\\n")[0]  # Triton escapes the traceback's newlines as \n
    return text if len(text) <= 400 else text[:400] + "..."


# --------------------------------------------------------------------------- runtime
def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise TritonError("nvidia-pytriton is not installed: it carries tritonserver") from exc
    return Path(pytriton.__file__).resolve().parent


def wheel_paths() -> tuple[Path, Path]:
    """``(tritonserver tree, nvidia_pytriton.libs)`` inside the installed wheel."""
    root = _pytriton_root()
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def _pytriton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-pytriton")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def default_runtime_dir() -> Path:
    """``$FASHIONSERVE_TRITON_HOME``, else ``~/.cache/fashionserve/triton-<wheel>-py<X.Y>``."""
    env = os.environ.get("FASHIONSERVE_TRITON_HOME")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache / "fashionserve" / f"triton-{_pytriton_version()}-py{py}"


def prepare_runtime(runtime_dir: Path | None = None) -> Path:
    """A runnable Triton tree (``bin/``, ``backends/python/`` with the stub, ``caches/``).

    Copied from the wheel once and reused; built in a temporary sibling and renamed into
    place so concurrent callers (parallel test sessions) never see half a tree.
    """
    target = Path(runtime_dir) if runtime_dir is not None else default_runtime_dir()
    if (target / _MARKER).is_file():
        return target
    tree, _ = wheel_paths()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tree / "python_backend_stubs" / py / STUB_NAME
    if not (tree / "bin" / "tritonserver").is_file():
        raise TritonError(f"no tritonserver binary in {tree}: is nvidia-pytriton installed?")
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no python-backend stub for Python {py} ({stub})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        work = staging / "tree"
        shutil.copytree(
            tree, work, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__")
        )
        shutil.copy2(stub, work / "backends" / "python" / STUB_NAME)
        (work / _MARKER).write_text(f"nvidia-pytriton {_pytriton_version()}, python {py}\n")
        try:
            work.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # lost a race to a complete copy: fine
                shutil.rmtree(target, ignore_errors=True)
                work.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared Triton runtime in %s", target)
    return target


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def shm_regions(prefix: str) -> list[Path]:
    """Python-backend shared-memory regions in /dev/shm whose name starts with ``prefix``."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux SIGTERM Triton when the thread that started it dies.

    libc's ``prctl`` is looked up here, in the parent: between fork and exec the child may
    only run code that takes no lock another thread could hold (no dlopen, no imports).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


# ---------------------------------------------------------------------------- server
class TritonServer:
    """A ``tritonserver`` process serving one model repository.

    Use as a context manager (``with TritonServer(repo) as server: ...``) or call
    :meth:`start` and :meth:`stop`. Ports given as 0 are chosen free before start.
    ``grpc_url``/``http_url`` give ``host:port`` for clients.

    ``log_file`` receives Triton's whole log; with ``echo`` each line is also written to
    stderr prefixed with ``log_prefix``. ``kill_with_parent`` asks Linux to SIGTERM Triton
    if the thread that started it dies (keep it for tests and the CLI; turn it off when
    starting from a short-lived worker thread). ``model_control_mode="explicit"`` lets a
    rollout reload models in the running server (``fashionserve repo versions --triton``).
    """

    def __init__(
        self,
        repository: Path,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        host: str = "127.0.0.1",
        runtime_dir: Path | None = None,
        log_file: Path | None = None,
        echo: bool = False,
        log_prefix: str = "[triton] ",
        ready_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        kill_with_parent: bool = True,
        model_control_mode: ModelControlMode = "none",
    ) -> None:
        self.repository = Path(repository).resolve()
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.runtime_dir = runtime_dir
        self.log_file = log_file
        self.echo = echo
        self.log_prefix = log_prefix
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self.kill_with_parent = kill_with_parent
        self.model_control_mode = model_control_mode
        # Unique per server so stop() can tell its own shared-memory regions from others'.
        self.shm_prefix = f"fashionserve-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at: float | None = None
        self.startup_seconds: float | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._errors: collections.deque[str] = collections.deque(maxlen=20)
        self._reader: threading.Thread | None = None
        self._log_handle: IO[str] | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def grpc_url(self) -> str:
        """``host:port`` of the KServe v2 gRPC endpoint."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log_tail(self, lines: int = 40) -> list[str]:
        """The last ``lines`` lines Triton wrote."""
        return list(self._tail)[-lines:]

    def errors(self) -> list[str]:
        """The error lines Triton logged so far (gist of each, harmless CPU ones left out)."""
        return list(self._errors)

    def command(self, runtime: Path) -> list[str]:
        """The ``tritonserver`` command line."""
        return [
            str(runtime / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={runtime / 'backends'}",
            f"--cache-directory={runtime / 'caches'}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            # Not ready until every model is: a client never meets a half-loaded ensemble.
            "--strict-readiness=true",
            # none (the default): no model loading over the API, Triton runs model code
            # unsandboxed. explicit: `fashionserve repo versions --triton` reloads models
            # to roll a version out; every model is loaded at start.
            f"--model-control-mode={self.model_control_mode}",
            *(["--load-model=*"] if self.model_control_mode == "explicit" else []),
            "--exit-on-error=true",
            # Configs are generated complete; do not let backends guess.
            "--disable-auto-complete-config",
            "--log-verbose=0",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout) - 5)}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """Triton's environment: wheel libraries, this virtualenv first on PATH."""
        env = dict(os.environ)
        _, libs = wheel_paths()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def respawn(self) -> TritonServer:
        """A new, unstarted server like this one, for a restart: the same repository,
        options, log file and gRPC port (where its clients connect); HTTP and metrics ports
        chosen afresh, so that a port the dead server's connections still hold cannot stop
        the restart."""
        return TritonServer(
            self.repository,
            grpc_port=self.grpc_port,
            host=self.host,
            runtime_dir=self.runtime_dir,
            log_file=self.log_file,
            echo=self.echo,
            log_prefix=self.log_prefix,
            ready_timeout=self.ready_timeout,
            stop_timeout=self.stop_timeout,
            extra_args=self.extra_args,
            kill_with_parent=self.kill_with_parent,
            model_control_mode=self.model_control_mode,
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> TritonServer:
        """Start Triton and wait until it reports ready; raises :class:`TritonError`."""
        self.launch()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.mark_ready()
        return self

    def mark_ready(self) -> None:
        """Record (and log) the time from launch to ready."""
        assert self.launched_at is not None
        self.startup_seconds = time.monotonic() - self.launched_at
        log.info(
            "Triton ready in %.1fs: grpc %s, http %s, metrics %s",
            self.startup_seconds,
            self.grpc_url,
            self.http_url,
            self.metrics_port,
        )

    def launch(self) -> None:
        """Start the ``tritonserver`` process without waiting for it to be ready."""
        if self.process is not None:
            raise TritonError("this TritonServer is already started")
        if not (self.repository.is_dir()):
            raise TritonError(f"model repository {self.repository} does not exist")
        runtime = prepare_runtime(self.runtime_dir)
        bind = self.host if self.host not in ("", "0.0.0.0") else "0.0.0.0"
        for attr in ("grpc_port", "http_port", "metrics_port"):
            if getattr(self, attr) == 0:
                setattr(self, attr, free_port(bind))
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.log_file, "a", encoding="utf-8")  # noqa: SIM115
        cmd = self.command(runtime)
        log.info("starting Triton: %s", " ".join(cmd))
        self.launched_at = time.monotonic()
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=str(runtime),
            start_new_session=True,
            preexec_fn=_parent_death_signal() if self.kill_with_parent else None,
        )
        self._reader = threading.Thread(target=self._pump, name="triton-log", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        """Copy Triton's output to the tail buffer, the log file and (with echo) stderr."""
        assert self.process is not None and self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self._tail.append(line)
            summary = _error_summary(line)
            if summary is not None:
                self._errors.append(summary)
            if self._log_handle is not None:
                with contextlib.suppress(ValueError):
                    self._log_handle.write(line + "\n")
                    self._log_handle.flush()
            if self.echo:
                with contextlib.suppress(ValueError, OSError):
                    print(f"{self.log_prefix}{line}", file=sys.stderr, flush=True)

    def is_ready(self, timeout: float = 2.0) -> bool:
        """Whether Triton answers ``/v2/health/ready`` with 200 (every model loaded)."""
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float) -> None:
        """Poll readiness; raise early with the log tail if Triton exits meanwhile."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise TritonError(
                    f"tritonserver exited with code {code} before it was ready "
                    f"(repository {self.repository})",
                    self.log_tail(15),
                    self.errors(),
                )
            if self.is_ready(timeout=1.0):
                return
            if time.monotonic() > deadline:
                raise TritonError(
                    f"tritonserver was not ready after {timeout:.0f}s (repository {self.repository})",
                    self.log_tail(15),
                    self.errors(),
                )
            time.sleep(0.2)

    def stop(self) -> int | None:
        """Stop Triton and everything it started; returns its exit code (None if never run).

        SIGTERM to Triton, up to ``stop_timeout`` seconds for it to unload, then SIGKILL
        to its whole process group (stubs included); finally remove any shared-memory
        region with this server's prefix that a killed stub could not release.
        """
        proc = self.process
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("Triton did not stop within %.0fs: killing it", self.stop_timeout)
                self._kill_group()
                code = proc.wait(timeout=10)
            # Stubs stop on their own once Triton unloads them; give them a moment. (Those
            # of a Triton that died by itself have nobody to unload them: killed at once.)
            self._wait_group_gone(proc.pid, timeout=5.0)
        self._kill_group()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        for region in shm_regions(self.shm_prefix):
            with contextlib.suppress(OSError):
                region.unlink()
                log.warning("removed leftover shared-memory region %s", region)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def group_pids(self) -> list[int]:
        """Live processes of Triton's process group (Triton and its stubs)."""
        if self.process is None:
            return []
        return _group_members(self.process.pid)

    def _kill_group(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _wait_group_gone(self, pgid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def exit_cause(code: int) -> str:
    """How a process ended, from its return code: ``exit code 1`` or ``signal SIGKILL``."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ------------------------------------------------------------------------ supervision
@dataclass(frozen=True)
class RestartPolicy:
    """When a supervised Triton is restarted, and when the supervisor gives up.

    Each failure (a death, or a restart that does not become ready) waits
    ``first_backoff_seconds``, doubled for each other failure within ``window_seconds``
    (at most ``max_backoff_seconds``), before the next start; more than ``max_restarts``
    failures within the window give up: a Triton that cannot stay up needs a person, not
    a loop.
    """

    max_restarts: int = 3
    window_seconds: float = 300.0
    first_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the next start, after ``failures`` in the window."""
        return min(self.max_backoff_seconds, self.first_backoff_seconds * 2 ** (failures - 1))


class TritonSupervisor:
    """Keeps a started :class:`TritonServer` running, from an asyncio loop.

    :meth:`run` watches the process; when it dies, the cause (exit code or signal) is
    logged and a :meth:`TritonServer.respawn` of it is started after the policy's backoff.
    ``server`` is always the current one (stop it when done). Processes are started from
    the loop's thread, so that Triton's parent-death signal stays tied to a thread that
    lives as long as the supervisor.
    """

    def __init__(self, server: TritonServer, policy: RestartPolicy | None = None) -> None:
        self.server = server
        self.policy = policy or RestartPolicy()
        self.restarts = 0
        self._failures: collections.deque[float] = collections.deque()

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until ``stop`` is set; raise :class:`TritonError` on giving up."""
        while not await _stopped(stop, 0.5):
            process = self.server.process
            code = process.poll() if process is not None else None
            if code is not None:
                await self._restart(exit_cause(code), stop)

    async def _restart(self, cause: str, stop: asyncio.Event) -> None:
        """Restart after ``cause`` until a server is ready, ``stop`` is set, or giving up."""
        while True:
            now = time.monotonic()
            self._failures.append(now)
            while now - self._failures[0] > self.policy.window_seconds:
                self._failures.popleft()
            failures = len(self._failures)
            dead = self.server
            await asyncio.to_thread(dead.stop)  # its stubs, shared memory and log handle
            if failures > self.policy.max_restarts:
                raise TritonError(
                    f"Triton failed {failures} times within {self.policy.window_seconds:.0f}s "
                    f"(last: {cause}); giving up after {self.restarts} restart(s)",
                    dead.log_tail(15),
                    dead.errors(),
                )
            delay = self.policy.backoff(failures)
            log.warning(
                "Triton (pid %s) stopped: %s; restarting it in %.0fs (failure %d of %d "
                "allowed within %.0fs)",
                dead.pid,
                cause,
                delay,
                failures,
                self.policy.max_restarts,
                self.policy.window_seconds,
            )
            if await _stopped(stop, delay):
                return
            self.server = dead.respawn()
            self.restarts += 1
            try:
                self.server.launch()
            except TritonError as exc:
                cause = str(exc).splitlines()[0]
                continue
            problem = await self._wait_ready(stop)
            if problem is None:
                if not stop.is_set():
                    self.server.mark_ready()
                    log.warning(
                        "Triton is back after restart %d (pid %s): ready in %.1fs",
                        self.restarts,
                        self.server.pid,
                        self.server.startup_seconds or 0.0,
                    )
                return
            cause = problem

    async def _wait_ready(self, stop: asyncio.Event) -> str | None:
        """None once the new server is ready (or on stop), else why it is not."""
        server = self.server
        assert server.process is not None
        deadline = time.monotonic() + server.ready_timeout
        while not stop.is_set():
            code = server.process.poll()
            if code is not None:
                errors = server.errors()
                return exit_cause(code) + (f" ({errors[-1]})" if errors else "")
            if await asyncio.to_thread(server.is_ready, 1.0):
                return None
            if time.monotonic() > deadline:
                return f"not ready after {server.ready_timeout:.0f}s"
            await _stopped(stop, 0.2)
        return None


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop``; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


def _group_members(pgid: int) -> list[int]:
    """PIDs (not zombies) whose process group is ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


# ------------------------------------------------------------------------ foreground
def run_triton(
    repository: Path,
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    ready_timeout: float = 120.0,
    host: str = "127.0.0.1",
    model_control_mode: ModelControlMode = "none",
) -> int:
    """Serve ``repository`` in the foreground until Ctrl-C or SIGTERM; return an exit code.

    Triton's log goes to stderr prefixed with ``[triton]``. Returns 0 after a requested
    stop, Triton's own exit code if it stopped by itself; raises :class:`TritonError` if
    it did not start.
    ``host`` is the listening address; Triton has no authentication, so it stays on
    loopback unless a deployment puts a gateway in front of it.
    """
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        log.info("received %s: stopping Triton", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(
        repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=host,
        echo=True,
        ready_timeout=ready_timeout,
        model_control_mode=model_control_mode,
    )
    try:
        server.start()
        print(
            f"Triton ready: grpc {server.grpc_url}, http {server.http_url}, "
            f"metrics {server.metrics_url} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        assert server.process is not None
        while not stop_requested.is_set() and server.process.poll() is None:
            stop_requested.wait(0.5)
        exited_by_itself = not stop_requested.is_set()
        code = server.stop()
        if exited_by_itself:
            print(f"error: Triton exited by itself with code {code}", file=sys.stderr)
            return code if code else 1
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def serving(repository: Path, **kwargs: object) -> Iterator[TritonServer]:
    """``with serving(repo) as server:`` — a started :class:`TritonServer`, always stopped."""
    server = TritonServer(repository, **kwargs)  # type: ignore[arg-type]
    with server:
        yield server
