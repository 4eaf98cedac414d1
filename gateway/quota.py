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

Where the tenants' buckets and images in flight are kept is a :class:`TenantStore`: in
this process (:class:`LocalTenantStore`, the default), or on a Redis/Valkey server shared by
every replica (:class:`~fashionserve.gateway.quota_backend.SharedTenantStore`, with
``quota_backend_url``), so that a tenant's limit does not multiply with the replicas. While
that server cannot be reached, ``quota_backend_failure_policy`` decides: ``open`` admits
against this replica's own store, ``closed`` refuses (UNAVAILABLE). Streams and the
gateway-wide bounds protect this replica's own slots and memory, so they stay local.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from fashionserve.gateway.failures import ResourceExhausted, Unavailable
from fashionserve.gateway.quota_backend import SharedTenantStore
from fashionserve.gateway.quota_store import (
    LocalTenantStore,
    QuotaBackendError,
    Refusal,
    TenantStore,
)
from fashionserve.gateway.settings import GatewaySettings, TenantQuota

log = logging.getLogger(__name__)

# Bounds of the retry delay suggested for the concurrency and overload limits (seconds).
_MIN_RETRY = 0.05
_MAX_RETRY = 10.0
# Weight of the newest call in the running mean of call durations.
_EWMA_WEIGHT = 0.1
# After a quota backend failure, calls go straight to the failure policy for this long, so
# that a backend that does not answer costs one timeout a second, not one per call.
BACKEND_RETRY_SECONDS = 1.0


class Admission:
    """Admits calls against the quotas and bounds of ``settings``.

    ``queued()`` says how many images wait in the batcher for a slot; ``on_backend_error``
    is told of each failure of the shared quota backend (a metric). Use as::

        async with admission.admit(tenant, n_images):
            ...serve the call...
    """

    def __init__(
        self,
        settings: GatewaySettings,
        queued: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        on_backend_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._queued = queued
        self._clock = clock
        self._on_backend_error = on_backend_error
        self.local = LocalTenantStore(clock)
        self.shared: SharedTenantStore | None = None
        if settings.quota_backend_url is not None:
            self.shared = SharedTenantStore.from_settings(settings, self._backend_failed)
        self._backend_down_until = float("-inf")
        self._streams: dict[str, int] = {}
        self.in_flight = 0
        self._mean_call_seconds = _MIN_RETRY

    async def close(self) -> None:
        """Close the connection to the shared quota backend, if any."""
        if self.shared is not None:
            await self.shared.close()

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

    def _backend_failed(self, exc: Exception) -> None:
        """Count a failure of the shared backend and leave it alone for a while."""
        self._on_backend_error()
        if self._clock() >= self._backend_down_until:
            log.warning(
                "the quota backend failed (%s): calls are %s for %.0f s, then it is tried again",
                exc or type(exc).__name__,
                "admitted against this replica's own quotas"
                if self.settings.quota_backend_failure_policy == "open"
                else "refused",
                BACKEND_RETRY_SECONDS,
            )
        self._backend_down_until = self._clock() + BACKEND_RETRY_SECONDS

    async def _acquire(
        self, tenant: str, quota: TenantQuota, images: int
    ) -> tuple[TenantStore, str | Refusal]:
        """The store that decided and its decision, following the failure policy."""
        if self.shared is None:
            return self.local, await self.local.acquire(tenant, quota, images)
        if self._clock() >= self._backend_down_until:
            try:
                return self.shared, await self.shared.acquire(tenant, quota, images)
            except QuotaBackendError as exc:
                self._backend_failed(exc)
        if self.settings.quota_backend_failure_policy == "closed":
            raise Unavailable(
                "QUOTA_BACKEND_UNAVAILABLE",
                "the shared quota backend cannot be reached and this gateway refuses calls "
                "it cannot count (quota_backend_failure_policy: closed); retry later",
                {"tenant": tenant},
            )
        return self.local, await self.local.acquire(tenant, quota, images)

    @asynccontextmanager
    async def admit(self, tenant: str, images: int) -> AsyncIterator[None]:
        """Hold ``images`` of ``tenant`` for the ``async with`` block, or raise
        RESOURCE_EXHAUSTED (with a retry delay) at once if any limit would be passed, or
        UNAVAILABLE when the shared backend is down and the policy is ``closed``. Refused
        calls spend nothing."""
        now = self._clock()
        settings = self.settings
        quota = settings.quota_for(tenant)
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
        # Counted before the store is awaited, so that calls admitted meanwhile see them.
        self.in_flight += images
        try:
            store, lease = await self._acquire(tenant, quota, images)
        except BaseException:
            self.in_flight -= images
            raise
        if isinstance(lease, Refusal):
            self.in_flight -= images
            if lease.limit == "max_concurrent_images":
                raise self._refuse(
                    "TENANT_CONCURRENCY_LIMITED",
                    f"tenant {tenant!r} has {lease.in_flight} images in flight, its limit is "
                    f"{quota.max_concurrent_images}",
                    tenant,
                    images,
                    "max_concurrent_images",
                    self._busy_retry(),
                )
            raise self._refuse(
                "TENANT_RATE_LIMITED",
                f"tenant {tenant!r} is over its rate of {quota.images_per_second:g} images/s "
                f"(burst {quota.burst_images})",
                tenant,
                images,
                "images_per_second",
                lease.wait,
            )
        try:
            yield
        finally:
            self.in_flight -= images
            took = self._clock() - now
            self._mean_call_seconds += _EWMA_WEIGHT * (took - self._mean_call_seconds)
            try:
                await store.release(tenant, images, lease)
            except QuotaBackendError as exc:  # the lease expires on the backend by itself
                self._backend_failed(exc)

    @contextmanager
    def open_stream(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s ``max_streams_per_tenant`` stream slots for the ``with``
        block, or raise RESOURCE_EXHAUSTED (TENANT_STREAM_LIMITED) at once. Counted per
        replica: a stream holds one of this replica's call slots."""
        open_now = self._streams.get(tenant, 0)
        limit = self.settings.max_streams_per_tenant
        if open_now >= limit:
            log.info("refused a stream of tenant %s: %d open, the limit", tenant, open_now)
            raise ResourceExhausted(
                "TENANT_STREAM_LIMITED",
                f"tenant {tenant!r} has {open_now} streams open, its limit is {limit}; "
                "send more requests on the streams it has",
                {"tenant": tenant, "limit": "max_streams_per_tenant", "maxStreams": limit},
            )
        self._streams[tenant] = open_now + 1
        try:
            yield
        finally:
            self._streams[tenant] -= 1
            if not self._streams[tenant]:
                del self._streams[tenant]
