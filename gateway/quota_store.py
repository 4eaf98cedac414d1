"""Where tenants' quotas are kept: the :class:`TenantStore` interface and its in-process
implementation (the shared one is :mod:`fashionserve.gateway.quota_backend`).

A store answers one question atomically: may ``tenant`` take ``images`` tokens from its
bucket and hold ``images`` more in flight? Both or neither. :mod:`.quota` asks it and turns
a :class:`Refusal` into the caller's error.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fashionserve.gateway.settings import TenantQuota

# Idle tenants (nothing in flight, bucket full) are forgotten once this many are tracked,
# so a stream of distinct tenant names cannot grow the table without bound.
_PRUNE_AT = 1024


@dataclass(frozen=True)
class Refusal:
    """Why a store refused a tenant's images: ``limit`` was reached with ``in_flight``
    images held; for the rate, ``wait`` seconds until enough tokens have refilled."""

    limit: Literal["max_concurrent_images", "images_per_second"]
    in_flight: int
    wait: float = 0.0


class QuotaBackendError(Exception):
    """The shared quota backend failed or did not answer in time."""


class TenantStore(ABC):
    """Where each tenant's token bucket and images in flight are kept."""

    @abstractmethod
    async def acquire(self, tenant: str, quota: TenantQuota, images: int) -> str | Refusal:
        """Take ``images`` tokens and hold ``images`` in flight for ``tenant``, both or
        neither; returns the lease to :meth:`release`, or why not. Raises
        :class:`QuotaBackendError` when the store cannot decide."""

    @abstractmethod
    async def release(self, tenant: str, images: int, lease: str) -> None:
        """Give back the images held under ``lease`` (their tokens stay spent)."""


class TokenBucket:
    """``burst`` tokens at most, refilled continuously at ``rate`` per second."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last update."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait_for(self, n: int, now: float) -> float:
        """Seconds until ``n`` tokens are available (0: now)."""
        self.refill(now)
        return max(0.0, (n - self.tokens) / self.rate)

    def take(self, n: int) -> None:
        """Spend ``n`` tokens (after :meth:`wait_for` returned 0)."""
        self.tokens -= n

    def full(self, now: float) -> bool:
        """Whether the bucket is back to ``burst`` (an idle tenant)."""
        self.refill(now)
        return self.tokens >= self.burst


@dataclass
class _Tenant:
    bucket: TokenBucket
    in_flight: int = 0


class LocalTenantStore(TenantStore):
    """The tenants of this process alone, in memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.tenants: dict[str, _Tenant] = {}

    async def acquire(self, tenant: str, quota: TenantQuota, images: int) -> str | Refusal:
        now = self._clock()
        state = self.tenants.get(tenant)
        if state is None:
            if len(self.tenants) >= _PRUNE_AT:
                self._prune(now)
            state = _Tenant(TokenBucket(quota.images_per_second, quota.burst_images, now))
            self.tenants[tenant] = state
        if state.in_flight + images > quota.max_concurrent_images:
            return Refusal("max_concurrent_images", state.in_flight)
        wait = state.bucket.wait_for(images, now)
        if wait > 0:
            return Refusal("images_per_second", state.in_flight, wait)
        state.bucket.take(images)
        state.in_flight += images
        return ""

    async def release(self, tenant: str, images: int, lease: str) -> None:
        self.tenants[tenant].in_flight -= images

    def _prune(self, now: float) -> None:
        idle = [n for n, t in self.tenants.items() if not t.in_flight and t.bucket.full(now)]
        for name in idle:
            del self.tenants[name]
