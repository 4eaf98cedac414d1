"""The journal of a bulk run: ``DIR/_journal.sqlite``, the point of truth of what is done.

SQLite in WAL mode, so ``batch status`` reads it while a run writes it. It holds:

* ``inputs``: the input of this shard as listed (seq, id, uri), written once per output
  directory while the input is streamed, so a resumed run neither lists again nor holds
  the input in memory, and duplicate ids are found with an index instead of a set;
* ``parts``: the part files committed, with their row counts;
* ``results``: which part holds each id, and its status.

A part is committed by one transaction that names the part and all its ids: a part file
on disk that the journal does not name was never committed, and the next run deletes it.
An id with a row in ``results`` is never analysed again (except ``--retry-failed``, which
rewrites the parts holding failures without them, in one transaction per part).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fashionserve.bulk.errors import DuplicateIds, OutputFormatError, OutputMismatch
from fashionserve.bulk.sources import InputItem

JOURNAL_FILE = "_journal.sqlite"
JOURNAL_VERSION = "1"
_INSERT_BATCH = 10_000
_PAGE = 1_000
_NAMED_DUPLICATES = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, uri TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT PRIMARY KEY, rows INTEGER NOT NULL, committed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, part TEXT NOT NULL, status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_part ON results (part);
"""


@dataclass(frozen=True)
class RunConfig:
    """What an output directory was made by; a run with another config is refused."""

    input: str
    shard: str
    include_embeddings: bool

    def as_meta(self) -> dict[str, str]:
        return {
            "journal_version": JOURNAL_VERSION,
            "input": self.input,
            "shard": self.shard,
            "include_embeddings": str(int(self.include_embeddings)),
        }


@dataclass(frozen=True)
class Progress:
    """What the journal says of a run (``batch status``)."""

    input: str
    shard: str
    listed: bool
    total: int
    """Inputs of this shard (so far, while the listing is not finished)."""
    done: int
    ok: int
    failed: dict[str, int]
    parts: int
    run_started_at: float | None
    done_at_run_start: int
    last_commit_at: float | None

    @property
    def remaining(self) -> int:
        return self.total - self.done

    @property
    def rate(self) -> float | None:
        """Images per second committed by the latest run, if it committed anything."""
        if self.run_started_at is None or self.last_commit_at is None:
            return None
        tagged = self.done - self.done_at_run_start
        elapsed = self.last_commit_at - self.run_started_at
        return tagged / elapsed if tagged > 0 and elapsed > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        return self.remaining / rate if rate and self.listed else None


class Journal:
    """One output directory's journal (one writer: the run; any number of readers)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    @classmethod
    def open(cls, output: Path, config: RunConfig) -> Journal:
        """Open (creating) the journal of ``output`` for a run of ``config``.

        Raises :class:`OutputMismatch` when ``output`` was made by another input, shard or
        embedding choice: rows of two runs must never mix.
        """
        output.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(output / JOURNAL_FILE, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut, not just a kill
        db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")  # readers see all or nothing
        journal = cls(db)
        meta = journal._meta()
        wanted = config.as_meta()
        if "input" in meta:
            differs = [k for k, v in wanted.items() if meta.get(k) != v]
            if differs:
                raise OutputMismatch(
                    f"{output} holds the output of another run ("
                    + ", ".join(f"{k} {meta.get(k)!r}, not {wanted[k]!r}" for k in differs)
                    + "): use another --output",
                    metadata={"output": output},
                )
        else:
            with journal._transaction():
                journal._set_meta(wanted)
        return journal

    @classmethod
    def open_read_only(cls, output: Path) -> Journal:
        """Open for reading, also while a run writes (``batch status``)."""
        path = output / JOURNAL_FILE
        if not path.is_file():
            raise OutputFormatError(f"{output}: no bulk journal there ({JOURNAL_FILE})")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            db.close()  # the run has just created the file, not yet its tables
            raise OutputFormatError(f"{output}: the bulk journal is being created")
        return cls(db)

    def close(self) -> None:
        self._db.close()

    # --------------------------------------------------------------------------- meta
    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def _set_meta(self, values: dict[str, str]) -> None:
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            values.items(),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # ------------------------------------------------------------------------ listing
    @property
    def listed(self) -> bool:
        return self._meta().get("listed") == "1"

    def record_inputs(self, items: Iterable[InputItem]) -> int:
        """Record the listing of this shard, once: streamed in, then checked for duplicates.

        Raises :class:`DuplicateIds` naming the first duplicated ids (the listing is then
        not kept: fix the input and run again). Returns the number of inputs.
        """
        self._db.execute("DROP INDEX IF EXISTS inputs_id")
        self._db.execute("DELETE FROM inputs")
        batch: list[tuple[str, str]] = []
        for item in items:
            batch.append((item.id, item.uri))
            if len(batch) >= _INSERT_BATCH:
                self._insert_inputs(batch)
                batch = []
        self._insert_inputs(batch)
        self._db.execute("CREATE INDEX inputs_id ON inputs (id)")
        duplicates = self._db.execute(
            "SELECT id, COUNT(*) FROM inputs GROUP BY id HAVING COUNT(*) > 1 ORDER BY id"
        )
        named = duplicates.fetchmany(_NAMED_DUPLICATES)
        if named:
            more = len(duplicates.fetchall())
            listed = ", ".join(f"{item_id!r} ({count}x)" for item_id, count in named)
            tail = f" and {more} more" if more else ""
            raise DuplicateIds(
                f"the input names some ids more than once: {listed}{tail}; nothing was tagged",
                metadata={"duplicates": len(named) + more},
            )
        total: int = self._db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0]
        with self._transaction():
            self._set_meta({"listed": "1"})
        return total

    def _insert_inputs(self, batch: list[tuple[str, str]]) -> None:
        with self._transaction():
            self._db.executemany("INSERT INTO inputs (id, uri) VALUES (?, ?)", batch)

    def pending(self) -> Iterator[InputItem]:
        """The inputs without a committed row, in input order, a page at a time.

        Paged by ``seq`` rather than one open cursor, so commits can run in between.
        """
        after = 0
        while True:
            page = self._db.execute(
                "SELECT seq, id, uri FROM inputs i WHERE seq > ? AND NOT EXISTS "
                "(SELECT 1 FROM results r WHERE r.id = i.id) ORDER BY seq LIMIT ?",
                (after, _PAGE),
            ).fetchall()
            if not page:
                return
            for seq, item_id, uri in page:
                after = seq
                yield InputItem(item_id, uri)

    def pending_count(self) -> int:
        count: int = self._db.execute(
            "SELECT COUNT(*) FROM inputs i WHERE NOT EXISTS "
            "(SELECT 1 FROM results r WHERE r.id = i.id)"
        ).fetchone()[0]
        return count

    # -------------------------------------------------------------------------- parts
    def part_names(self) -> set[str]:
        return {name for (name,) in self._db.execute("SELECT name FROM parts")}

    def commit_part(self, name: str, rows: Iterable[tuple[str, str]]) -> None:
        """Record part ``name`` holding ``rows`` (id, status): the point of truth."""
        rows = list(rows)
        with self._transaction():
            self._db.execute(
                "INSERT INTO parts (name, rows, committed_at) VALUES (?, ?, ?)",
                (name, len(rows), time.time()),
            )
            self._db.executemany(
                "INSERT INTO results (id, part, status) VALUES (?, ?, ?)",
                ((item_id, name, status) for item_id, status in rows),
            )

    def parts_with_failures(self, ok: str) -> list[str]:
        """The parts holding a row whose status is not ``ok``."""
        return [
            name
            for (name,) in self._db.execute(
                "SELECT DISTINCT part FROM results WHERE status != ? ORDER BY part", (ok,)
            )
        ]

    def replace_part(self, old: str, new: str | None, kept: int, ok: str) -> None:
        """Forget the failed rows of part ``old``: its ``ok`` rows (``kept`` of them) now
        live in part ``new`` (``None`` when there are none), its other ids are pending."""
        with self._transaction():
            self._db.execute("DELETE FROM results WHERE part = ? AND status != ?", (old, ok))
            self._db.execute("DELETE FROM parts WHERE name = ?", (old,))
            if new is not None:
                self._db.execute(
                    "INSERT INTO parts (name, rows, committed_at) VALUES (?, ?, ?)",
                    (new, kept, time.time()),
                )
                self._db.execute("UPDATE results SET part = ? WHERE part = ?", (new, old))

    # ----------------------------------------------------------------------- progress
    def start_run(self) -> None:
        """Mark the start of a run, for the rate ``batch status`` shows."""
        done = self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        with self._transaction():
            self._set_meta({"run_started_at": repr(time.time()), "done_at_run_start": str(done)})

    def progress(self, ok: str) -> Progress:
        meta = self._meta()
        by_status = dict(self._db.execute("SELECT status, COUNT(*) FROM results GROUP BY status"))
        total, last = self._db.execute(
            "SELECT (SELECT COUNT(*) FROM inputs), (SELECT MAX(committed_at) FROM parts)"
        ).fetchone()
        parts = self._db.execute("SELECT COUNT(*) FROM parts").fetchone()[0]
        started = meta.get("run_started_at")
        return Progress(
            input=meta.get("input", ""),
            shard=meta.get("shard", ""),
            listed=meta.get("listed") == "1",
            total=total,
            done=sum(by_status.values()),
            ok=by_status.pop(ok, 0),
            failed=dict(sorted(by_status.items())),
            parts=parts,
            run_started_at=float(started) if started else None,
            done_at_run_start=int(meta.get("done_at_run_start", "0")),
            last_commit_at=last,
        )


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on an exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
