"""Credentials files re-read when they change: key and certificate rotation without a
restart."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fashionserve.errors import Error

log = logging.getLogger(__name__)

# How often (seconds) a request may trigger a check of a watched file's modification time.
_RELOAD_CHECK_SECONDS = 1.0


class WatchedFile:
    """A file (or files read together, such as a certificate and its key) re-read when a
    modification time or size changes. Files that became invalid or vanished are reported
    and ignored: what was loaded stays in force."""

    what = "file"
    error: type[Error] = Error
    """What a problem with the file raises (at start) or is logged as (later)."""

    def __init__(self, path: Path, *more: Path) -> None:
        self.path = path
        self.paths = (path, *more)
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._checked = 0.0
        self.reload_if_changed(force=True)

    def _load(self) -> int:
        """Parse the files and take their contents into use; return how many entries."""
        raise NotImplementedError

    def maybe_reload(self) -> bool:
        """Check the files at most every ``_RELOAD_CHECK_SECONDS`` (called per request or
        connection); whether they were re-read."""
        if time.monotonic() - self._checked > _RELOAD_CHECK_SECONDS:
            return self.reload_if_changed()
        return False

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the files if one changed; at start (``force``) any problem raises."""
        self._checked = time.monotonic()
        stamps = []
        for path in self.paths:
            try:
                st = path.stat()
            except OSError as exc:
                if force:
                    raise self.error(f"cannot read {self.what} {path}: {exc.strerror}") from exc
                log.error("%s %s is gone; keeping what was loaded", self.what, path)
                return False
            stamps.append((st.st_mtime_ns, st.st_size))
        stamp = tuple(stamps)
        if stamp == self._stamp and not force:
            return False
        try:
            count = self._load()
        except Error:
            if force:
                raise
            log.exception(
                "%s %s changed but is invalid; keeping the previous one", self.what, self.path
            )
            return False
        self._stamp = stamp
        log.info(
            "loaded %d entr%s from %s %s", count, "y" if count == 1 else "ies", self.what, self.path
        )
        return True
