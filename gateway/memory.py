"""The memory the gateway process may use, which its limits on callers are derived from.

Callers choose how much the gateway holds: every open call may receive a message of up to
``max_message_bytes``, every admitted image holds up to ``max_image_bytes``. So that no mix
of callers can push the process past its memory (a container killed for memory drops every
call), each of the two products may take at most :data:`CALLER_SHARE` of
:func:`process_memory_bytes`: the settings derive their defaults from it and refuse
explicit values that do not fit.
"""

from __future__ import annotations

import os
from pathlib import Path

CALLER_SHARE = 0.5
"""The share of the process's memory that received messages may take, and, apart, admitted
images (the rest: the interpreter, the taxonomy, results, gRPC's own buffers)."""

# cgroup v2, then v1: the container's limit ("max", or a huge v1 number, when unlimited).
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def process_memory_bytes() -> int:
    """The memory this process may use: its cgroup's limit (a container's), else the
    machine's physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(int(text), physical)
    return physical


def caller_budget_bytes(memory_limit_bytes: int | None) -> int:
    """Bytes received messages (and, apart, admitted images) may take: :data:`CALLER_SHARE`
    of ``memory_limit_bytes``, or of :func:`process_memory_bytes` when it is None."""
    memory = process_memory_bytes() if memory_limit_bytes is None else memory_limit_bytes
    return int(memory * CALLER_SHARE)
