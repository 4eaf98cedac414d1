"""``fashionserve serve`` as a user runs it, then ``fashionserve analyze`` against it.

Starts the real stack (Triton from the nvidia-pytriton wheel, the gateway) as a subprocess
in a fresh work directory with the committed demo checkpoints, waits for the ready file,
analyses a rendered synthetic scene through the command line, kills its Triton and sees
it restarted, stops it with Ctrl-C (SIGINT) and checks nothing is left running; then
starts it again on the same work directory and checks the second start is faster and under
a minute; finally starts it once more and makes Triton unable to start again, so that
the stack gives up.

The tests of this module run in order and share the first server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from fashionserve.clients import FashionClient, FashionServeError

REPO_ROOT = Path(__file__).resolve().parents[2]
# The committed demo checkpoints, or $FASHIONSERVE_CHECKPOINTS (as in conftest.py).
CHECKPOINTS = Path(os.environ.get("FASHIONSERVE_CHECKPOINTS") or REPO_ROOT / "checkpoints")
FASHIONSERVE = [sys.executable, "-m", "fashionserve.cli"]
FIRST_START_TIMEOUT = 540.0  # export of three models with parity checks, then Triton
SECOND_START_LIMIT = 60.0  # what the README promises
BACK_AFTER_KILL_LIMIT = 30.0  # from Triton's death to answers again (README)

pytestmark = pytest.mark.skipif(
    not all((CHECKPOINTS / f"{m}.pt").is_file() for m in ("detector", "tagger", "embedder")),
    reason=f"no trained checkpoints in {CHECKPOINTS} (commit checkpoints/*.pt or set "
    "FASHIONSERVE_CHECKPOINTS)",
)


@dataclass
class Stack:
    """One running ``fashionserve serve``."""

    process: subprocess.Popen[bytes]
    workdir: Path
    ready_file: Path
    stdout: Path
    stderr: Path
    address: str
    api_key: str
    seconds_to_ready: float

    def output(self) -> str:
        return self.stdout.read_text() + "\n--- stderr ---\n" + self.stderr.read_text()


def start_stack(workdir: Path, timeout: float, tag: str) -> Stack:
    """Start ``fashionserve serve`` and wait for its ready file."""
    ready_file = workdir.parent / f"ready-{tag}.json"
    stdout, stderr = workdir.parent / f"serve-{tag}.out", workdir.parent / f"serve-{tag}.err"
    command = [
        *FASHIONSERVE,
        "serve",
        "--workdir",
        str(workdir),
        "--port",
        "0",
        "--ready-file",
        str(ready_file),
        "--checkpoints",
        str(CHECKPOINTS),
    ]
    started = time.monotonic()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO_ROOT)
    while not ready_file.is_file():
        if process.poll() is not None:
            raise AssertionError(
                f"serve exited with {process.returncode} before ready:\n"
                + stdout.read_text()
                + stderr.read_text()
            )
        if time.monotonic() - started > timeout:
            stop(process)
            raise AssertionError(f"serve not ready after {timeout:.0f}s:\n{stderr.read_text()}")
        time.sleep(0.2)
    seconds = time.monotonic() - started
    ready = json.loads(ready_file.read_text())
    assert set(ready) == {"address", "api_key"}
    assert ready_file.stat().st_mode & 0o077 == 0, "the ready file holds a key: owner only"
    return Stack(
        process,
        workdir,
        ready_file,
        stdout,
        stderr,
        ready["address"],
        ready["api_key"],
        seconds,
    )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 60) -> int:
    """Signal ``process`` and wait for it; kill it if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (Triton and its stubs name
    the model repository under the work directory on theirs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def triton_pid(workdir: Path) -> int:
    """The pid of the ``tritonserver`` serving the stack's model repository."""
    (found,) = [
        line
        for line in processes_mentioning(str(workdir / "model_repository"))
        if line.split(": ", 1)[1].split(" ", 1)[0].endswith("/bin/tritonserver")
    ]
    return int(found.split(":", 1)[0])


def health(address: str) -> int:
    """The gateway's overall health status (an error while the call fails)."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


def assert_nothing_left(stack: Stack) -> None:
    leftovers = processes_mentioning(str(stack.workdir / "model_repository"))
    assert not leftovers, f"processes left running after the stack stopped: {leftovers}"
    shm = Path("/dev/shm")
    if shm.is_dir():
        regions = [
            p.name for p in shm.iterdir() if p.name.startswith(f"fashionserve-{stack.process.pid}-")
        ]
        assert not regions, f"shared-memory regions left behind: {regions}"
    assert not stack.ready_file.exists(), "the ready file outlived the server"


def assert_clean_exit(stack: Stack, sig: int) -> None:
    code = stop(stack.process, sig)
    assert code == 0, stack.output()
    assert_nothing_left(stack)


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FASHIONSERVE, "analyze", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )


def scene_with_truth() -> tuple[bytes, list[list[float]]]:
    """A synthetic scene (not the one serve wrote) and its ground-truth boxes x1,y1,x2,y2."""
    from fashionserve.serve import showcase_scene

    sample = showcase_scene(seed=12345)
    assert sample.garments, "the busiest val scene has garments"
    return sample.image, [list(g.box) for g in sample.garments]


def iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve") / "var"


@pytest.fixture(scope="module")
def first(workdir: Path) -> Iterator[Stack]:
    stack = start_stack(workdir, FIRST_START_TIMEOUT, "first")
    yield stack
    if stack.process.poll() is None:
        stop(stack.process)


def test_first_start_prints_one_ready_line(first: Stack) -> None:
    lines = [line for line in first.stdout.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, first.output()
    line = lines[0]
    assert first.address in line and first.api_key in line
    # The hint reads the key from its file into the environment: never on a command line.
    key = r'FASHIONSERVE_API_KEY="\$\(cat \S+dev-api-key\)"'
    hint = key + r" \S+ analyze \S+sample\.jpg --gateway \S+"
    assert re.search(hint, line), line
    assert "--api-key" not in line
    assert re.fullmatch(r"127\.0\.0\.1:\d+", first.address)
    # Progress went to stderr, numbered.
    assert "[1/4]" in first.stderr.read_text()
    print(f"first start ready in {first.seconds_to_ready:.1f}s")


def test_analyze_a_rendered_scene_as_json_and_drawn(first: Stack, tmp_path: Path) -> None:
    rendered, truth = scene_with_truth()
    image = tmp_path / "scene.jpg"
    image.write_bytes(rendered)
    drawn = tmp_path / "drawn"
    done = analyze(
        str(image),
        str(first.workdir / "sample.jpg"),
        "--gateway",
        first.address,
        "--api-key",
        first.api_key,
        "--json",
        "--draw",
        str(drawn),
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [i["image"] for i in doc["images"]] == [str(image), str(first.workdir / "sample.jpg")]
    for result in doc["images"]:
        assert result["garments"], f"no garment found in {result['image']}"
        with Image.open(result["image"]) as img:
            assert (result["width"], result["height"]) == img.size
        for g in result["garments"]:
            x1, y1, x2, y2 = (g["box"][k] for k in ("x_min", "y_min", "x_max", "y_max"))
            assert 0 <= x1 < x2 <= result["width"] and 0 <= y1 < y2 <= result["height"]
            # A garment whose top-level category is below its threshold has an empty path.
            assert [c["name"] for c in g["category_path"][:1]] in (
                [],
                ["top"],
                ["bottom"],
                ["full-body"],
            )
        assert any(g["category_path"] for g in result["garments"]), result
    # The boxes are where the garments are, in the original image's pixels.
    found = [
        [g["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")]
        for g in doc["images"][0]["garments"]
    ]
    assert any(iou(t, f) >= 0.5 for t in truth for f in found), (truth, found)
    with Image.open(drawn / "scene.png") as out, Image.open(image) as src:
        assert out.format == "PNG" and out.size == src.size
    assert (drawn / "sample.png").is_file()

    # The default output is a table naming each garment's category path.
    table = analyze(str(image), "--gateway", first.address, "--api-key", first.api_key)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["image", "#", "box"]
    assert any(root in table.stdout for root in ("top", "bottom", "full-body"))


def test_analyze_with_a_wrong_key_fails_with_code_and_reason(first: Stack) -> None:
    key_id = first.api_key.split(".", 1)[0]
    sample = str(first.workdir / "sample.jpg")
    env = {**os.environ, "FASHIONSERVE_GATEWAY": first.address}
    for key in (f"{key_id}.not-the-secret", "nobody.abc"):
        done = analyze(sample, "--api-key", key, env=env)
        assert done.returncode != 0
        assert re.search(r"UNAUTHENTICATED \([A-Z][A-Z_]+\)", done.stderr), done.stderr
    env.pop("FASHIONSERVE_API_KEY", None)
    done = analyze(sample, env=env)  # no key at all
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stderr


def test_evaluate_through_the_gateway_matches_triton(first: Stack, tmp_path: Path) -> None:
    """The same evaluation through the public API and straight through Triton: the
    gateway's validation, micro-batching and taxonomy decoding lose nothing."""
    import yaml

    from fashionserve.data.writer import synthesize
    from fashionserve.evaluate import evaluate
    from fashionserve.taxonomy import load_taxonomy

    data = tmp_path / "data"
    synthesize(data, images=12, seed=4242, taxonomy=load_taxonomy(), workers=1, progress=False)
    triton_url = yaml.safe_load((first.workdir / "gateway.yaml").read_text())["triton_urls"][0]
    quiet = lambda _: None  # noqa: E731
    direct = evaluate(data, triton=triton_url, echo=quiet)
    through = evaluate(data, gateway=first.address, api_key=first.api_key, echo=quiet)
    for key in ("detector_map50", "retrieval_acc1", "retrieval_acc10"):
        assert through[key] == pytest.approx(direct[key], abs=1e-6), key
    for key in ("category_accuracy", "tag_accuracy"):
        # Probabilities cross the API as float32: only a tie at a threshold could differ.
        assert through[key] == pytest.approx(direct[key], abs=0.02), key
    assert through["scene_detections"] == direct["scene_detections"]


def test_a_killed_triton_is_restarted_and_analyze_answers_again(first: Stack) -> None:
    sample = (first.workdir / "sample.jpg").read_bytes()
    killed = triton_pid(first.workdir)
    os.kill(killed, signal.SIGKILL)
    died = time.monotonic()
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    refusals: set[str] = set()  # status codes of the calls refused meanwhile
    seen_not_serving = False
    with FashionClient(first.address, first.api_key, retries=0, timeout=10) as client:
        while True:
            elapsed = time.monotonic() - died
            assert elapsed < BACK_AFTER_KILL_LIMIT, (
                f"no answer {elapsed:.0f}s after Triton was killed:\n{first.output()}"
            )
            assert first.process.poll() is None, first.output()
            seen_not_serving = seen_not_serving or health(first.address) == not_serving
            try:
                result = client.analyze(sample)
            except FashionServeError as exc:
                refusals.add(exc.code_name)
                time.sleep(0.2)
                continue
            if seen_not_serving:
                break
    print(f"Analyze answered again {time.monotonic() - died:.1f}s after Triton was killed")
    assert result.garments
    assert seen_not_serving, "the gateway never reported NOT_SERVING"
    assert refusals == {"UNAVAILABLE"}, refusals  # what a client retries
    assert health(first.address) == health_pb2.HealthCheckResponse.SERVING
    assert triton_pid(first.workdir) != killed
    log = first.stderr.read_text()
    assert f"Triton (pid {killed}) stopped: signal SIGKILL; restarting it in 1s" in log
    assert "Triton is back after restart 1" in log


def test_sigint_stops_everything(first: Stack) -> None:
    assert_clean_exit(first, signal.SIGINT)


def test_second_start_reuses_the_build_and_is_ready_faster(first: Stack, workdir: Path) -> None:
    assert first.process.poll() is not None, "the first server must be stopped by now"
    second = start_stack(workdir, SECOND_START_LIMIT + 60, "second")
    try:
        print(f"first start {first.seconds_to_ready:.1f}s, second {second.seconds_to_ready:.1f}s")
        assert second.api_key == first.api_key, "the development key is reused"
        assert second.seconds_to_ready < first.seconds_to_ready
        assert second.seconds_to_ready < SECOND_START_LIMIT
        assert "up to date" in second.stderr.read_text()
        done = analyze(
            str(workdir / "sample.jpg"), "--gateway", second.address, "--api-key", second.api_key
        )
        assert done.returncode == 0, done.stderr
    finally:
        assert_clean_exit(second, signal.SIGTERM)


def test_a_triton_that_cannot_start_again_stops_the_stack(workdir: Path) -> None:
    stack = start_stack(workdir, SECOND_START_LIMIT + 60, "third")
    repository = workdir / "model_repository"
    aside = workdir / "model_repository.aside"
    try:
        # The repository replaced by one whose only model's config does not parse: each
        # restart of Triton fails in a second or two.
        repository.rename(aside)
        (repository / "broken").mkdir(parents=True)
        (repository / "broken" / "config.pbtxt").write_text("this is { not a model config\n")
        os.kill(triton_pid(workdir), signal.SIGKILL)
        code = stack.process.wait(timeout=120)
        err = stack.stderr.read_text()
        assert code != 0, stack.output()
        assert "stopped: signal SIGKILL; restarting it in 1s" in err
        assert "stopped: exit code 1 (Poll failed for model directory 'broken'" in err
        assert "error: the stack stops: Triton failed 4 times within 300s" in err, err
        assert "giving up after 3 restart(s)" in err
        assert_nothing_left(stack)
    finally:
        if stack.process.poll() is None:
            stop(stack.process)
        if aside.is_dir():
            shutil.rmtree(repository, ignore_errors=True)
            aside.rename(repository)
