"""Per-tenant quotas and global overload bounds: admit a call's images, or refuse at once.

Everything is counted in images, not calls: an ensemble call's cost grows with the images
in it, so a tenant sending BatchAnalyze calls of 16 images must not get 16 times the share
of one sending Analyze calls. A call is admitted whole or refused whole (never half a batch).

Per tenant (``tenant_quota``, with ``tenant_quotas`` overrides):

* a token bucket: ``burst_images`` tokens, refilled at ``images_per_second``; a call of n
  images takes n tokens (TENANT_RATE_LIMITED when there are fewer);
* ``max_concurrent_images`` admitted and not yet answered (TENANT_CONCURRENCY_LIMITED);
* ``max_streams_per_tenant`` StreamAnalyze calls open at once (TENANT_STREAM_LIMITED): a
  stream holds a call slot while it waits for requests, so a tenant's open streams, idle or
  not, must not take every slot of ``max_concurrent_rpcs``.

For the whole gateway: ``max_images_in_flight`` admitted and not yet answered, and
``max_queued_images`` waiting in the batcher for a batch slot (GATEWAY_OVERLOADED).

A refusal is RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo``: for the bucket, the time
until enough tokens have refilled; for the concurrency and overload bounds, the recent mean
time an admitted call took (when a slot is likely to be free again). Nothing waits: a caller
past a limit learns it at once, and the gateway holds no queue of refused work, so memory
stays bounded by the limits whatever callers do. Nothing here knows about gRPC.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fashionserve.gateway.failures import ResourceExhausted
from fashionserve.gateway.settings import GatewaySettings, TenantQuota

log = logging.getLogger(__name__)

# Bounds of the retry delay suggested for the concurrency and overload limits (seconds).
_MIN_RETRY = 0.05
_MAX_RETRY = 10.0
# Weight of the newest call in the running mean of call durations.
_EWMA_WEIGHT = 0.1
# Idle tenants (nothing in flight, bucket full) are forgotten once this many are tracked,
# so a stream of distinct tenant names cannot grow the table without bound.
_PRUNE_AT = 1024


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
    quota: TenantQuota
    bucket: TokenBucket
    in_flight: int = 0
    streams: int = 0


class Admission:
    """Admits calls against the quotas and bounds of ``settings``.

    ``queued()`` says how many images wait in the batcher for a slot. Use as::

        with admission.admit(tenant, n_images):
            ...serve the call...
    """

    def __init__(
        self,
        settings: GatewaySettings,
        queued: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._queued = queued
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self.in_flight = 0
        self._mean_call_seconds = _MIN_RETRY

    def _tenant(self, name: str, now: float) -> _Tenant:
        state = self._tenants.get(name)
        if state is None:
            if len(self._tenants) >= _PRUNE_AT:
                self._prune(now)
            quota = self.settings.quota_for(name)
            state = _Tenant(quota, TokenBucket(quota.images_per_second, quota.burst_images, now))
            self._tenants[name] = state
        return state

    def _prune(self, now: float) -> None:
        idle = [
            n
            for n, t in self._tenants.items()
            if not t.in_flight and not t.streams and t.bucket.full(now)
        ]
        for name in idle:
            del self._tenants[name]

    def _busy_retry(self) -> float:
        return min(_MAX_RETRY, max(_MIN_RETRY, self._mean_call_seconds))

    def _refuse(
        self, reason: str, message: str, tenant: str, images: int, limit: str, delay: float
    ) -> ResourceExhausted:
        log.info(
            "refused %d image(s) of tenant %s: %s (%s), retry in %.3f s",
            images,
            tenant,
            reason,
            limit,
            delay,
        )
        return ResourceExhausted(
            reason,
            f"{message}; retry in {delay:.3f} s",
            {
                "tenant": tenant,
                "limit": limit,
                "images": images,
                "retryDelayMs": max(1, round(delay * 1000)),
            },
            retry_delay=delay,
        )

    @contextmanager
    def admit(self, tenant: str, images: int) -> Iterator[None]:
        """Hold ``images`` of ``tenant`` for the ``with`` block, or raise RESOURCE_EXHAUSTED
        (with a retry delay) at once if any limit would be passed. Refused calls spend
        nothing."""
        now = self._clock()
        state = self._tenant(tenant, now)
        quota, settings = state.quota, self.settings
        if self.in_flight + images > settings.max_images_in_flight:
            raise self._refuse(
                "GATEWAY_OVERLOADED",
                f"the gateway is serving {self.in_flight} images, its limit is "
                f"{settings.max_images_in_flight}",
                tenant,
                images,
                "max_images_in_flight",
                self._busy_retry(),
            )
        queued = self._queued()
        if queued + images > settings.max_queued_images:
            raise self._refuse(
                "GATEWAY_OVERLOADED",
                f"{queued} images are waiting for the model, the limit is "
                f"{settings.max_queued_images}",
                tenant,
                images,
                "max_queued_images",
                self._busy_retry(),
            )
        if state.in_flight + images > quota.max_concurrent_images:
            raise self._refuse(
                "TENANT_CONCURRENCY_LIMITED",
                f"tenant {tenant!r} has {state.in_flight} images in flight, its limit is "
                f"{quota.max_concurrent_images}",
                tenant,
                images,
                "max_concurrent_images",
                self._busy_retry(),
            )
        wait = state.bucket.wait_for(images, now)
        if wait > 0:
            raise self._refuse(
                "TENANT_RATE_LIMITED",
                f"tenant {tenant!r} is over its rate of {quota.images_per_second:g} images/s "
                f"(burst {quota.burst_images})",
                tenant,
                images,
                "images_per_second",
                wait,
            )
        state.bucket.take(images)
        state.in_flight += images
        self.in_flight += images
        try:
            yield
        finally:
            state.in_flight -= images
            self.in_flight -= images
            took = self._clock() - now
            self._mean_call_seconds += _EWMA_WEIGHT * (took - self._mean_call_seconds)

    @contextmanager
    def open_stream(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s ``max_streams_per_tenant`` stream slots for the ``with``
        block, or raise RESOURCE_EXHAUSTED (TENANT_STREAM_LIMITED) at once."""
        state = self._tenant(tenant, self._clock())
        limit = self.settings.max_streams_per_tenant
        if state.streams >= limit:
            log.info("refused a stream of tenant %s: %d open, the limit", tenant, state.streams)
            raise ResourceExhausted(
                "TENANT_STREAM_LIMITED",
                f"tenant {tenant!r} has {state.streams} streams open, its limit is {limit}; "
                "send more requests on the streams it has",
                {"tenant": tenant, "limit": "max_streams_per_tenant", "maxStreams": limit},
            )
        state.streams += 1
        try:
            yield
        finally:
            state.streams -= 1
