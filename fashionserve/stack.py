"""The local stack's work directory: where ``fashionserve serve`` keeps what it builds.

``serve`` builds what is missing there (checkpoints, the model repository, a development
key, a sample image) and starts Triton and the gateway from it; the benchmark starts
``serve`` and then reads from the same directory where things are (the gateway's settings,
the checkpoints served). This module is that shared layout, and the rule that picks the
checkpoints, so neither application imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fashionserve.ensemble import MODEL_KINDS
from fashionserve.errors import InvalidInput

COMMITTED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
"""The demo checkpoints committed with the repository."""


@dataclass(frozen=True)
class Workdir:
    """The files ``serve`` keeps under its work directory."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def repository(self) -> Path:
        return self.root / "model_repository"

    @property
    def keys_file(self) -> Path:
        return self.root / "keys.yaml"

    @property
    def key_file(self) -> Path:
        return self.root / "dev-api-key"

    @property
    def gateway_config(self) -> Path:
        return self.root / "gateway.yaml"

    @property
    def state(self) -> Path:
        return self.root / "serve-state.json"

    @property
    def sample(self) -> Path:
        return self.root / "sample.jpg"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def resolve_checkpoints(requested: Path | None, wd: Workdir) -> tuple[Path, bool]:
    """``(directory, complete)``: where the checkpoints are, or will be trained.

    ``requested`` (``--checkpoints``) must hold all three; otherwise the committed demo
    checkpoints, else those trained under the work directory, else (incomplete) the work
    directory where they are to be trained.
    """
    if requested is not None:
        if not all((requested / f"{m}.pt").is_file() for m in MODEL_KINDS):
            raise InvalidInput(
                f"--checkpoints {requested} lacks one of {', '.join(MODEL_KINDS)} (.pt)"
            )
        return requested, True
    for candidate in (COMMITTED_CHECKPOINTS, wd.checkpoints):
        if all((candidate / f"{m}.pt").is_file() for m in MODEL_KINDS):
            return candidate, True
    return wd.checkpoints, False
