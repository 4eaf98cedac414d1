"""The load-test harness against a real gateway in front of a real Triton.

The gateway runs as its own process (``fashionserve gateway``, API keys on) in front of
the session's Triton serving the trained demo models; the harness is driven the way a
user drives it: ``fashionserve loadtest run`` on the command line, and the Python API for
the open-loop overload check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fashionserve.loadtest.generator import LoadSpec, run_load
from fashionserve.loadtest.images import synthetic_images
from fashionserve.loadtest.report import result_to_dict
from fashionserve.loadtest.targets import TargetSpec
from fashionserve.triton import TritonServer

FASHIONSERVE = [sys.executable, "-m", "fashionserve.cli"]


@dataclass(frozen=True)
class Gateway:
    address: str
    api_key: str


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """``fashionserve gateway`` on a free port with one API key, in front of ``triton``."""
    from fashionserve.gateway.auth.keys import create_key

    root = tmp_path_factory.mktemp("loadtest-gateway")
    key = create_key(root / "keys.yaml", "loadtest", tenant="test")
    # The overload test measures a backlog; load shedding (the default bounds answer
    # RESOURCE_EXHAUSTED past 512 queued images or 1024 open calls) would cut it short,
    # so the bounds here are wide enough for every request offered to be queued. The
    # test's images are small: 1 MiB messages let 8192 calls fit a 16 GiB machine.
    config = root / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "max_message_bytes": 1024 * 1024,
                "max_image_bytes": 1024 * 1024,
                "max_queued_images": 100_000,
                "max_images_in_flight": 8192,
                "max_concurrent_rpcs": 8192,
                # One connection carries every call: more streams than calls, or calls
                # started as others end are refused (REFUSED_STREAM, UNAVAILABLE).
                "max_streams_per_connection": 10_000,
                "tenant_quota": {
                    "images_per_second": 100_000,
                    "burst_images": 100_000,
                    "max_concurrent_images": 100_000,
                },
            }
        )
    )
    ready = root / "ready.json"
    log = root / "gateway.log"
    command = [
        *FASHIONSERVE,
        "gateway",
        "--config",
        str(config),
        "--listen-address",
        "127.0.0.1:0",
        "--triton-url",
        triton.grpc_url,
        "--api-keys-file",
        str(root / "keys.yaml"),
        "--ready-file",
        str(ready),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the gateway did not start:\n{log.read_text()}")
            time.sleep(0.1)
        address = json.loads(ready.read_text())["address"]
        from fashionserve.loadtest.bench.stack import wait_serving

        wait_serving(address, timeout=60)
        yield Gateway(address, key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of eight synthetic street scenes."""
    directory = tmp_path_factory.mktemp("loadtest-images")
    for i, data in enumerate(synthetic_images(8)):
        (directory / f"{i:02d}.jpg").write_bytes(data)
    return directory


def loadtest(
    gateway: Gateway, images: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [
        *FASHIONSERVE,
        "loadtest",
        "run",
        "--target",
        "gateway",
        "--address",
        gateway.address,
        "--api-key",
        gateway.api_key,
        "--images",
        str(images),
        "--no-progress",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_closed_loop_run_reports_plausible_figures(gateway, images, tmp_path):
    out = tmp_path / "report"
    done = loadtest(
        gateway,
        images,
        "--concurrency",
        "4",
        "--requests",
        "40",
        "--warmup",
        "1",
        "--processes",
        "2",
        "--slo-p99-ms",
        "60000",
        "--slo-error-rate",
        "0",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SLO met" in done.stdout
    data = json.loads((out / "result.json").read_text())
    assert data["requests"] == {"measured": 40, "ok": 40, "errors": 0}
    assert data["errors_by_code"] == {}
    assert data["throughput_rps"] > 0
    lat = data["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    # 40 requests at a few per second cannot take less than 40 service times / 4 callers.
    assert data["measured_seconds"] >= 40 * lat["min"] / 1000 / 4 * 0.9
    assert sum(row["ok"] for row in data["timeseries"]) == 40
    assert data["garments_per_request"] > 0  # the scenes have garments and they were found
    assert data["generator"]["processes"] == 2
    assert data["generator"]["cpu_seconds"] > 0
    assert "| gateway | closed, 4 callers | 40 | 0 |" in (out / "summary.md").read_text()
    assert (out / "timeseries.png").read_bytes()[:4] == b"\x89PNG"


def test_slo_mode_fails_on_an_impossible_target(gateway, images):
    done = loadtest(
        gateway,
        images,
        "--concurrency",
        "2",
        "--requests",
        "6",
        "--warmup",
        "0",
        "--processes",
        "1",
        "--slo-p99-ms",
        "0.001",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "SLO missed: p99 latency" in done.stderr


def test_wrong_api_key_shows_as_errors_by_status_code(gateway, images):
    bad = Gateway(gateway.address, gateway.api_key.split(".")[0] + ".not-the-secret")
    done = loadtest(
        bad,
        images,
        "--concurrency",
        "1",
        "--requests",
        "3",
        "--warmup",
        "0",
        "--processes",
        "1",
        "--json",
        "--slo-error-rate",
        "0",
    )
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["errors_by_code"] == {"UNAUTHENTICATED": 3}
    assert data["latency_ms"]["p50"] is None


def test_open_loop_latency_grows_beyond_capacity(gateway, images):
    """Offered 3x what the service can do, the backlog shows as latency (no coordinated
    omission); at 0.3x, requests wait for little more than their own service time."""
    from fashionserve.loadtest.images import load_images

    target = TargetSpec("gateway", gateway.address, api_key=gateway.api_key)
    pictures = load_images([images])
    # The gateway batches, so its capacity grows with the requests in flight: probe it
    # with enough of them to fill its batches, or "3x capacity" is not beyond capacity.
    probe = run_load(
        target,
        LoadSpec(mode="closed", concurrency=32, duration=3.0, warmup=1.0, processes=1),
        pictures,
        progress=False,
    )
    capacity = probe.recorder.throughput()
    assert capacity > 0

    def open_loop(factor: float) -> dict:
        load = LoadSpec(
            mode="open",
            rate=factor * capacity,
            arrival="constant",
            duration=4.0,
            warmup=0.5,
            processes=1,
            timeout=60.0,
        )
        return result_to_dict(run_load(target, load, pictures, progress=False))

    light = open_loop(0.3)
    time.sleep(1.0)
    heavy = open_loop(3.0)

    assert light["requests"]["errors"] == 0 and heavy["requests"]["errors"] == 0
    # Every request offered was answered; heavy load cannot beat the service's capacity.
    assert light["requests"]["ok"] >= int(0.3 * capacity * 4.0)
    assert heavy["requests"]["ok"] >= int(3.0 * capacity * 4.0)
    assert heavy["throughput_rps"] < 1.6 * capacity
    # ~8 s of backlog builds up over 4 s at 3x: p99 far above the light-load p99.
    assert heavy["latency_ms"]["p99"] > 4 * light["latency_ms"]["p99"]
    assert heavy["latency_ms"]["p99"] > 1000
