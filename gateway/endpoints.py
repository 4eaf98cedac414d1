"""Several Triton servers behind one gateway: the endpoint pool.

:class:`EndpointPool` spreads ensemble calls over a list of Triton targets. A target is
either ``host:port`` (one endpoint; gRPC resolves the name itself) or ``dns:///host:port``
(every address the name resolves to is an endpoint, re-resolved every
``triton_dns_refresh_seconds``: a Kubernetes headless Service lists its ready pods that way).

* **Readiness.** :meth:`EndpointPool.describe` probes every endpoint at once
  (:meth:`EnsembleClient.status`, read by :func:`~fashionserve.gateway.served_state.assess`)
  and admits those whose served state has no ``problem``: ready, with a tagger whose
  taxonomy the gateway can decode. The serving monitor calls it, so probes run every
  ``health_check_interval_seconds``, and reports the verdict of the state it returns.
* **Pick.** Least outstanding calls, ties taken in turn. Triton servers are rarely equal (GPU
  types differ, a pod is warming up, one is busy with another tenant): a slow one keeps its
  calls longer, so least-outstanding sends it less, where round robin would keep queueing on
  it. The gateway sees every call it makes, so the count is exact.
* **Ejection.** A call that fails because of the endpoint (UNAVAILABLE, or the configured
  request timeout ran out) takes the endpoint out at once; it comes back when a probe that
  started after the failure finds it ready.
* **Retry.** Such a failed call is tried again on another admitted endpoint, at most
  :data:`MAX_ATTEMPTS` in all, only while the batch's deadline leaves time, and only while
  the :class:`RetryBudget` allows: retries stay a fraction of calls, so a fleet in trouble is
  not hit with twice the load (gRPC retry throttling, Envoy retry budgets). Inference reads
  only, so running a batch twice is harmless. Errors of the images themselves
  (INVALID_ARGUMENT) and INTERNAL errors are not retried: another server would say the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

from fashionserve.gateway.failures import DeadlineExceeded, GatewayError, Unavailable
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.served_state import ServedState, assess
from fashionserve.gateway.settings import DNS_SCHEME
from fashionserve.gateway.triton_client import EnsembleClient
from fashionserve.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Tries of one batch in all (the first and two retries), as gRPC's default retry policy."""

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> ["ip:port", ...]``."""


def split_target(target: str) -> tuple[str, int, bool]:
    """``(host, port, resolve)`` of a target; ``resolve`` for ``dns:///host:port``."""
    resolve = target.startswith(DNS_SCHEME)
    host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
    return host.strip("[]"), int(port), resolve


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every TCP address ``host`` resolves to, as ``ip:port`` (IPv6 in brackets), sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = set()
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        addresses.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(addresses)


class RetryBudget:
    """A token bucket that keeps retries to ``ratio`` of calls.

    Every first attempt earns ``ratio`` of a token, up to ``burst`` tokens; a retry spends a
    whole one. The bucket starts full, so a quiet gateway can still retry ``burst`` times;
    under a sustained outage retries settle at ``ratio`` of calls.
    """

    def __init__(self, ratio: float, burst: int) -> None:
        # Thousandths of a token, in integers as gRPC counts them: five calls at 0.2 must
        # make a whole token, which float sums can miss.
        self._earned = round(ratio * 1000)
        self._capacity = burst * 1000
        self._tokens = self._capacity

    def earn(self) -> None:
        """Record a first attempt."""
        self._tokens = min(self._capacity, self._tokens + self._earned)

    def spend(self) -> bool:
        """Take a token for a retry; False when the budget is spent."""
        if self._tokens < 1000:
            return False
        self._tokens -= 1000
        return True


class Endpoint:
    """One Triton server: its client, what the last probe found, and its calls in flight."""

    def __init__(self, address: str, client: EnsembleClient) -> None:
        self.address = address
        self.client = client
        self.state = ServedState(False, "not checked yet")
        self.problem = "not checked yet"
        self.admitted = False
        self.outstanding = 0
        # Bumped by each ejection: a probe that began before it must not re-admit.
        self.ejections = 0
        self.retired = False  # gone from DNS; closed once its calls are done

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count a call in flight for the pick policy."""
        self.outstanding += 1
        try:
            yield
        finally:
            self.outstanding -= 1


class EndpointPool:
    """The ensemble on several Triton servers, as one backend for the batcher."""

    def __init__(
        self,
        targets: Sequence[str],
        taxonomy: Taxonomy,
        connect: Callable[[str], EnsembleClient],
        *,
        request_timeout_seconds: float,
        retry_budget: RetryBudget,
        dns_refresh_seconds: float,
        resolver: Resolver = resolve_dns,
    ) -> None:
        self.targets = tuple(targets)
        self.taxonomy = taxonomy
        self.request_timeout = request_timeout_seconds
        self.budget = retry_budget
        self.dns_refresh = dns_refresh_seconds
        self._connect = connect
        self._resolver = resolver
        self._next_resolve = 0.0
        self._turn = itertools.count()
        self.endpoints: dict[str, Endpoint] = {}
        for target in self.targets:
            if not split_target(target)[2]:
                self._add(target)

    @property
    def url(self) -> str:
        """The targets, for logs."""
        return ", ".join(self.targets)

    @property
    def admitted(self) -> list[Endpoint]:
        """Endpoints that take calls now."""
        return [e for e in self.endpoints.values() if e.admitted and not e.retired]

    def _add(self, address: str) -> None:
        if address not in self.endpoints:
            self.endpoints[address] = Endpoint(address, self._connect(address))

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(*(e.client.close() for e in self.endpoints.values()))
        self.endpoints.clear()

    # ------------------------------------------------------------------ discovery
    async def _resolve(self) -> None:
        """Re-resolve the ``dns:///`` targets when due; a failed lookup keeps what was known."""
        now = time.monotonic()
        if now < self._next_resolve:
            return
        self._next_resolve = now + self.dns_refresh
        wanted = {t for t in self.targets if not split_target(t)[2]}
        failed = False
        for target in self.targets:
            host, port, resolve = split_target(target)
            if not resolve:
                continue
            try:
                wanted.update(await self._resolver(host, port))
            except OSError as exc:
                log.warning("cannot resolve %s (keeping the known endpoints): %s", target, exc)
                failed = True
        for address in sorted(wanted - self.endpoints.keys()):
            log.info("Triton endpoint %s added", address)
            self._add(address)
        for address, endpoint in list(self.endpoints.items()):
            if address not in wanted and not failed:
                log.info("Triton endpoint %s is gone from DNS: removed", address)
                endpoint.retired = True
                del self.endpoints[address]
                if not endpoint.outstanding:
                    await endpoint.client.close()

    # ------------------------------------------------------------------ readiness
    async def describe(self) -> ServedState:
        """Probe every endpoint, admit those that can serve; the state of one that does.

        With none serving: the state of one that is ready but serves another taxonomy (so
        the caller can say so), else not ready with each endpoint's problem.
        """
        await self._resolve()
        endpoints = list(self.endpoints.values())
        await asyncio.gather(*(self._probe(e) for e in endpoints))
        admitted = [e for e in endpoints if e.admitted]
        if admitted:
            return admitted[0].state
        mismatched = [e for e in endpoints if e.state.ready]
        if mismatched:
            return mismatched[0].state
        if not endpoints:
            return ServedState(False, f"no Triton endpoint: {self.url} resolved to no address")
        return ServedState(False, "; ".join(f"{e.address}: {e.problem}" for e in endpoints))

    async def _probe(self, endpoint: Endpoint) -> None:
        ejections = endpoint.ejections
        state = assess(await endpoint.client.status(), self.taxonomy)
        if state.max_images_per_request:
            endpoint.client.max_images_per_request = state.max_images_per_request
        problem = state.problem
        endpoint.state, endpoint.problem = state, problem
        admit = not problem and endpoint.ejections == ejections
        if admit != endpoint.admitted:
            if admit:
                log.info("Triton endpoint %s is serving", endpoint.address)
            else:
                log.warning("Triton endpoint %s taken out: %s", endpoint.address, problem)
        endpoint.admitted = admit

    def _eject(self, endpoint: Endpoint, error: GatewayError) -> None:
        endpoint.ejections += 1
        if endpoint.admitted:
            log.warning(
                "Triton endpoint %s taken out after a failed call: %s %s",
                endpoint.address,
                error.reason,
                error.message,
            )
        endpoint.admitted = False
        endpoint.problem = f"a call failed: {error.reason}"

    # ------------------------------------------------------------------ inference
    def _pick(self, tried: set[str]) -> Endpoint | None:
        candidates = [e for e in self.admitted if e.address not in tried]
        if not candidates:
            return None
        turn = next(self._turn) % len(candidates)
        rotated = candidates[turn:] + candidates[:turn]  # ties in turn
        return min(rotated, key=lambda e: e.outstanding)

    async def infer(
        self, images: Sequence[bytes], deadline: float | None = None
    ) -> list[ImageOutput | GatewayError]:
        """Run ``images`` on an admitted endpoint, retrying elsewhere on its failure.

        ``deadline`` (``time.monotonic()`` seconds) bounds every attempt; no attempt starts
        after it. Raises :class:`Unavailable` when no endpoint serves, else the last
        attempt's error.
        """
        self.budget.earn()
        tried: set[str] = set()
        while True:
            endpoint = self._pick(tried)
            if endpoint is None:
                # No addresses in the error: callers need not learn the fleet's layout.
                raise Unavailable(
                    "NO_TRITON_SERVING", "no inference server is serving; retry later"
                )
            tried.add(endpoint.address)
            started = time.monotonic()
            # The caller's deadline, when it is the shorter: a timeout then says nothing
            # about the endpoint.
            caller_limited = deadline is not None and deadline - started < self.request_timeout
            try:
                with endpoint.busy():
                    return await endpoint.client.infer(images, deadline)
            except (Unavailable, DeadlineExceeded) as exc:
                if isinstance(exc, Unavailable) or not caller_limited:
                    self._eject(endpoint, exc)
                if not self._may_retry(tried, deadline):
                    raise
                log.info("retrying a batch of %d on another endpoint: %s", len(images), exc.reason)
            finally:
                if endpoint.retired and not endpoint.outstanding:
                    await endpoint.client.close()

    def _may_retry(self, tried: set[str], deadline: float | None) -> bool:
        if len(tried) >= MAX_ATTEMPTS:
            return False
        if deadline is not None and deadline <= time.monotonic():
            return False
        if not any(e.address not in tried for e in self.admitted):
            return False
        return self.budget.spend()
