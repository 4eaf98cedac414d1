"""Names and defaults shared by the CLI and the targets (no heavy imports: the CLI's
``--help`` must stay fast)."""

from __future__ import annotations

from typing import Literal

TargetKind = Literal["gateway", "triton", "naive", "ray"]
TARGET_KINDS: tuple[TargetKind, ...] = ("gateway", "triton", "naive", "ray")

DEFAULT_ADDRESSES: dict[TargetKind, str] = {
    "gateway": "127.0.0.1:50051",
    "triton": "127.0.0.1:8001",
    "naive": "127.0.0.1:50061",
    "ray": "127.0.0.1:9000",
}
"""Where each target listens by default: the gateway's and Triton's standard ports, and
the naive server's own, Ray Serve's gRPC proxy's."""
