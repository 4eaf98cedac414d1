"""What each image carries: the package's dependencies split into a base and extras, and the
lock files that pin every package of each image with its hashes.

The gateway image installs the base only (``docker/gateway.lock``): the gateway, the client
library, the command line and bulk tagging must run without Triton, ONNX Runtime, PyTorch
or the load-test harness's plotting. The Triton image installs the ``triton`` extra
(``docker/triton.lock``). ``make lock`` writes both locks from pyproject.toml's pins; these
tests check, without a network, that the locks still agree with those pins.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Each image's lock, and the extras it installs.
LOCKS: dict[str, list[str]] = {"gateway": [], "triton": ["triton"]}

# Packages the gateway image must not carry, and the modules they would bring.
NOT_IN_THE_GATEWAY = {
    "nvidia-pytriton": "pytriton",
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
    "matplotlib": "matplotlib",
    "hdrhistogram": "hdrh",
    "torch": "torch",
}

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>\S+)$")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` requirements (markers and all)."""
    found: dict[str, str] = {}
    for requirement in requirements:
        match = _PIN.match(requirement.split(";")[0].strip())
        if match:
            found[canonical(match["name"])] = match["version"]
    return found


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, hashes)`` of ``docker/<name>.lock``."""
    text = (REPO / "docker" / f"{name}.lock").read_text()
    # One requirement per logical line: continuations end with a backslash.
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    locked: dict[str, tuple[str, list[str]]] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *hashes = line.split(" --hash=")
        match = _PIN.match(requirement.split(";")[0].strip())
        assert match, f"{name}.lock: not a pinned requirement: {line}"
        locked[canonical(match["name"])] = (match["version"], [h.strip() for h in hashes])
    return locked


def expected_pins(extras: list[str]) -> dict[str, str]:
    """The pins of the base dependencies and of ``extras``."""
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return pins(requirements)


@pytest.mark.parametrize("lock", LOCKS)
def test_locks_agree_with_the_pins_of_pyproject(lock: str) -> None:
    locked = read_lock(lock)
    for name, version in expected_pins(LOCKS[lock]).items():
        assert name in locked, f"{lock}.lock lacks {name}: run make lock"
        assert locked[name][0] == version, (
            f"{lock}.lock has {name}=={locked[name][0]}, pyproject.toml {version}: run make lock"
        )
    # The build backend is locked too: the images build the package without isolation.
    assert "setuptools" in locked


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_package_has_hashes(lock: str) -> None:
    for name, (_, hashes) in read_lock(lock).items():
        assert hashes, f"{lock}.lock: {name} has no hash (pip --require-hashes refuses it)"
        for digest in hashes:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{lock}.lock: {name} {digest}"


def test_the_gateway_lock_carries_no_triton_onnxruntime_or_plots() -> None:
    locked = read_lock("gateway")
    assert not set(NOT_IN_THE_GATEWAY) & set(locked)
    # ...and those packages are not base dependencies: an extra brings each of them.
    base = pins(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in NOT_IN_THE_GATEWAY:
        assert name not in base
        assert any(name in pins(requirements) for requirements in extras.values()), name


def test_dev_installs_every_extra_but_the_peers() -> None:
    # `make test` and `make serve` install .[dev]: it must bring what the other extras bring,
    # except the benchmark's peers (Ray Serve), which only `make bench` installs.
    extras = set(PYPROJECT["project"]["optional-dependencies"]) - {"dev", "peers"}
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    [self_reference] = [r for r in dev if r.startswith("fashionserve[")]
    assert set(self_reference.removeprefix("fashionserve[").removesuffix("]").split(",")) == extras


@pytest.mark.parametrize(
    "modules",
    [
        ["fashionserve.gateway.server"],
        [
            "fashionserve.clients",
            "fashionserve.clients.aio_client",
            "fashionserve.clients.sync_client",
        ],
        ["fashionserve.cli"],
    ],
    ids=["gateway", "clients", "cli"],
)
def test_the_gateway_image_code_imports_none_of_the_extras(modules: list[str]) -> None:
    # A fresh interpreter: this one has imported everything the other tests needed.
    code = f"import sys\nimport {', '.join(modules)}\nprint('\\n'.join(sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    imported = {name.split(".")[0] for name in proc.stdout.split()}
    forbidden = set(NOT_IN_THE_GATEWAY.values()) | {"tritonserver"}
    assert not imported & forbidden, f"{modules} imported {sorted(imported & forbidden)}"
