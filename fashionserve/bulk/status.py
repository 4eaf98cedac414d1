"""``batch status``: a run's progress as its journal records it, also while it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fashionserve.bulk.journal import Journal
from fashionserve.bulk.output import OK, SUCCESS_FILE


@dataclass(frozen=True)
class Status:
    """What ``batch status`` shows (and prints as JSON with ``--json``)."""

    output: str
    input: str
    shard: str
    listed: bool
    """Whether the input is fully listed (``total`` is final)."""
    total: int
    done: int
    ok: int
    failed: dict[str, int]
    """Images per failure reason."""
    parts: int
    images_per_second: float | None
    """Committed by the latest run, over its time so far."""
    eta_seconds: float | None
    complete: bool
    """``_SUCCESS`` is written: every input has a row."""

    def format(self) -> str:
        """The readable form."""
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        total = str(self.total) if self.listed else f"{self.total} listed so far"
        lines = [
            f"output:  {self.output}",
            f"input:   {self.input} (shard {self.shard})",
            f"done:    {self.done} of {total}{share} in {self.parts} parts",
            f"ok:      {self.ok}",
            "failed:  "
            + (
                f"{sum(self.failed.values())} ("
                + ", ".join(f"{reason} {n}" for reason, n in self.failed.items())
                + ")"
                if self.failed
                else "0"
            ),
        ]
        if self.complete:
            lines.append("state:   complete (_SUCCESS)")
        else:
            rate = f"{self.images_per_second:.1f} images/s" if self.images_per_second else "-"
            eta = _duration(self.eta_seconds) if self.eta_seconds is not None else "-"
            lines.append(f"rate:    {rate}, ETA {eta}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def read_status(output: Path) -> Status:
    """Read the journal of ``output`` (read-only: a run may be writing it)."""
    journal = Journal.open_read_only(output)
    try:
        progress = journal.progress(OK)
    finally:
        journal.close()
    rate = progress.rate
    return Status(
        output=str(output),
        input=progress.input,
        shard=progress.shard,
        listed=progress.listed,
        total=progress.total,
        done=progress.done,
        ok=progress.ok,
        failed=progress.failed,
        parts=progress.parts,
        images_per_second=round(rate, 2) if rate else None,
        eta_seconds=round(progress.eta_seconds, 1) if progress.eta_seconds is not None else None,
        complete=(output / SUCCESS_FILE).exists(),
    )
