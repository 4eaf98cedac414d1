"""Several Triton servers behind one gateway: the endpoint pool.

:class:`EndpointPool` spreads ensemble calls over a list of Triton targets. A target is
either ``host:port`` (one endpoint; gRPC resolves the name itself) or ``dns:///host:port``
(every address the name resolves to is an endpoint, re-resolved every
``triton_dns_refresh_seconds``: a Kubernetes headless Service lists its ready pods that way).

* **Readiness.** :meth:`EndpointPool.describe` probes every endpoint at once
  (:meth:`EnsembleClient.status`, read by :func:`~fashionserve.gateway.served_state.assess`).
  An endpoint whose served state has no ``problem`` (ready, with a tagger whose taxonomy the
  gateway can decode) and that takes no calls yet is admitted only once a **canary** passes:
  one real inference of a tiny image through the ensemble, since a Triton can pass every
  status probe while its models hang. Failed canaries are spaced by an exponential backoff
  (``triton_canary_backoff_seconds``, doubling up to :data:`MAX_CANARY_BACKOFF_SECONDS`).
  The serving monitor calls :meth:`~EndpointPool.describe`, so probes run every
  ``health_check_interval_seconds``, and reports the verdict of the state it returns.
* **Pick.** Least outstanding calls; among equals, the one picked longest ago (round robin
  among ties, so an endpoint just admitted does not get most first attempts). Triton
  servers are rarely equal (GPU types differ, a pod is warming up, one is busy with another
  tenant): a slow one keeps its calls longer, so least-outstanding sends it less, where
  round robin would keep queueing on it. The gateway sees every call it makes, so the
  count is exact.
* **Ejection.** A call that fails because of the endpoint takes it out: UNAVAILABLE at once,
  and ``triton_eject_after_timeouts`` calls in a row that were sent and not answered in
  time, whoever set the deadline (a hung Triton looks the same to a caller with a short
  deadline). It comes back through a canary, the first one ``triton_canary_backoff_seconds``
  after the ejection.
* **Versions.** During a rollout over several servers some serve the new model versions
  and some the old (:attr:`ServedState.versions`, as their last probe saw it). A call may
  name the versions it must be answered by (a stream's, see
  :meth:`EndpointPool.preferred_versions`): it goes only to endpoints serving them, and
  fails with UNAVAILABLE (SERVED_VERSION_CHANGED) once none does.
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
from functools import cache
from io import BytesIO

from PIL import Image

from fashionserve.gateway.failures import (
    DeadlineExceeded,
    GatewayError,
    Unavailable,
    batch_requests_var,
)
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.served_state import ServedState, assess
from fashionserve.gateway.settings import DNS_SCHEME
from fashionserve.gateway.triton_client import INFERENCE_TIMEOUT, EnsembleClient
from fashionserve.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Tries of one batch in all (the first and two retries), as gRPC's default retry policy."""
CANARY_TIMEOUT_SECONDS = 5.0
"""Longest a canary may take (or ``request_timeout_seconds``, when shorter): a tiny image
that takes longer finds the server too slow to take calls. The probes of every endpoint
wait for it, so it also bounds how long one hung server can delay the health checks."""
MAX_CANARY_BACKOFF_SECONDS = 60.0
"""The backoff between failed canaries doubles up to this (or the configured first wait)."""

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> ["ip:port", ...]``."""


@cache
def canary_image() -> bytes:
    """The canary's image: a 64x64 grey JPEG, a real image for every step of the ensemble
    (decoded, letterboxed, run through the detector) that costs a server next to nothing."""
    buffer = BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()


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
    """One Triton server: its client, what the last probe found, its calls in flight and
    the record that ejection and re-admission keep."""

    def __init__(self, address: str, client: EnsembleClient, canary_backoff: float) -> None:
        self.address = address
        self.client = client
        self.state = ServedState(False, "not checked yet")
        self.problem = "not checked yet"
        self.admitted = False
        self.outstanding = 0
        self.timeouts = 0  # calls in a row sent to it and not answered in time
        # Bumped by each ejection: a probe (and canary) that began before it must not re-admit.
        self.ejections = 0
        self.next_canary = 0.0  # time.monotonic() before which no canary is sent
        self.canary_backoff = canary_backoff  # the wait after its next ejection or failed canary
        self.last_picked = -1  # the pick's sequence number: ties go to the oldest
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
        eject_after_timeouts: int,
        canary_backoff_seconds: float,
        resolver: Resolver = resolve_dns,
    ) -> None:
        self.targets = tuple(targets)
        self.taxonomy = taxonomy
        self.request_timeout = request_timeout_seconds
        self.budget = retry_budget
        self.dns_refresh = dns_refresh_seconds
        self.eject_after_timeouts = eject_after_timeouts
        self.canary_backoff = canary_backoff_seconds
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
            self.endpoints[address] = Endpoint(address, self._connect(address), self.canary_backoff)

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
        the caller can say so), else not serving with each endpoint's problem.
        """
        await self._resolve()
        endpoints = list(self.endpoints.values())
        await asyncio.gather(*(self._probe(e) for e in endpoints))
        admitted = [e for e in endpoints if e.admitted]
        if admitted:
            return admitted[0].state
        mismatched = [e for e in endpoints if e.state.ready and e.state.problem]
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
        endpoint.state = state
        problem = state.problem
        if not problem and not endpoint.admitted:
            problem = await self._canary(endpoint)
        if endpoint.ejections != ejections:
            return  # a call failed meanwhile: _eject said why, a later probe decides
        if problem and endpoint.admitted:
            log.warning("Triton endpoint %s taken out: %s", endpoint.address, problem)
        elif not problem and not endpoint.admitted:
            log.info(
                "Triton endpoint %s is serving (its canary inference passed)", endpoint.address
            )
        endpoint.admitted, endpoint.problem = not problem, problem

    async def _canary(self, endpoint: Endpoint) -> str:
        """Run the canary on a ready endpoint that takes no calls; "" when it passed, else
        why the endpoint stays out. Waits out the backoff of the last failed one."""
        started = time.monotonic()
        if started < endpoint.next_canary:
            return "waiting to send a canary inference"
        deadline = started + min(self.request_timeout, CANARY_TIMEOUT_SECONDS)
        try:
            outcome = (await endpoint.client.infer([canary_image()], deadline))[0]
        except GatewayError as exc:
            outcome = exc
        if not isinstance(outcome, GatewayError):
            endpoint.canary_backoff = self.canary_backoff
            return ""
        wait = self._back_off(endpoint)
        log.warning(
            "Triton endpoint %s failed its canary inference (%s %s); the next in %.3g s",
            endpoint.address,
            outcome.reason,
            outcome.message,
            wait,
        )
        return f"its canary inference failed: {outcome.reason}"

    def _back_off(self, endpoint: Endpoint) -> float:
        """Hold the next canary back by the endpoint's backoff, and double it; the wait."""
        wait = endpoint.canary_backoff
        endpoint.next_canary = time.monotonic() + wait
        cap = max(MAX_CANARY_BACKOFF_SECONDS, self.canary_backoff)
        endpoint.canary_backoff = min(2 * wait, cap)
        return wait

    def _count_failure(self, endpoint: Endpoint, error: GatewayError) -> None:
        """Eject on UNAVAILABLE, or on the configured number of timeouts in a row; an
        answer, even an error, ends a run of timeouts."""
        if isinstance(error, Unavailable):
            self._eject(endpoint, f"a call failed: {error.reason}")
        elif error.reason == INFERENCE_TIMEOUT:
            endpoint.timeouts += 1
            if endpoint.timeouts >= self.eject_after_timeouts:
                self._eject(endpoint, f"{endpoint.timeouts} calls in a row timed out")
        elif not isinstance(error, DeadlineExceeded):  # not sent: says nothing either way
            endpoint.timeouts = 0

    def _eject(self, endpoint: Endpoint, why: str) -> None:
        endpoint.ejections += 1
        endpoint.timeouts = 0
        if endpoint.admitted:
            log.warning(
                "Triton endpoint %s taken out (requests %s): %s; back once a canary "
                "inference passes",
                endpoint.address,
                batch_requests_var.get(),
                why,
            )
            self._back_off(endpoint)
        endpoint.admitted = False
        endpoint.problem = why

    # ------------------------------------------------------------------ inference
    def preferred_versions(self) -> str | None:
        """The model versions most admitted endpoints serve (the newest probe's among
        equals), what a new stream keeps to; None when none is admitted."""
        counts: dict[str, int] = {}
        for endpoint in self.admitted:
            counts[endpoint.state.versions] = counts.get(endpoint.state.versions, 0) + 1
        return max(counts, key=counts.__getitem__, default=None)

    def _serving(self, versions: str | None) -> list[Endpoint]:
        admitted = self.admitted
        return (
            admitted if versions is None else [e for e in admitted if e.state.versions == versions]
        )

    def _pick(self, tried: set[str], versions: str | None) -> Endpoint | None:
        candidates = [e for e in self._serving(versions) if e.address not in tried]
        if not candidates:
            return None
        endpoint = min(candidates, key=lambda e: (e.outstanding, e.last_picked))
        endpoint.last_picked = next(self._turn)
        return endpoint

    async def infer(
        self, images: Sequence[bytes], deadline: float | None = None, versions: str | None = None
    ) -> list[ImageOutput | GatewayError]:
        """Run ``images`` on an admitted endpoint, retrying elsewhere on its failure.

        ``deadline`` (``time.monotonic()`` seconds) bounds every attempt; no attempt starts
        after it. ``versions``: only endpoints serving these model versions (see
        :meth:`preferred_versions`). Raises :class:`Unavailable` when no endpoint serves
        (SERVED_VERSION_CHANGED when some serve, but other versions), else the last
        attempt's error.
        """
        self.budget.earn()
        tried: set[str] = set()
        while True:
            endpoint = self._pick(tried, versions)
            if endpoint is None and not tried and self.admitted:
                raise Unavailable(
                    "SERVED_VERSION_CHANGED",
                    "the model versions this stream started on are no longer served; open "
                    "a new stream",
                    {"streamVersions": versions or ""},
                )
            if endpoint is None:
                # No addresses in the error: callers need not learn the fleet's layout.
                raise Unavailable(
                    "NO_TRITON_SERVING", "no inference server is serving; retry later"
                )
            tried.add(endpoint.address)
            try:
                with endpoint.busy():
                    outcomes = await endpoint.client.infer(images, deadline)
                endpoint.timeouts = 0
                return outcomes
            except GatewayError as exc:
                self._count_failure(endpoint, exc)
                retriable = isinstance(exc, Unavailable | DeadlineExceeded)
                if not retriable or not self._may_retry(tried, deadline, versions):
                    raise
                log.info("retrying a batch of %d on another endpoint: %s", len(images), exc.reason)
            finally:
                if endpoint.retired and not endpoint.outstanding:
                    await endpoint.client.close()

    def _may_retry(self, tried: set[str], deadline: float | None, versions: str | None) -> bool:
        if len(tried) >= MAX_ATTEMPTS:
            return False
        if deadline is not None and deadline <= time.monotonic():
            return False
        if not any(e.address not in tried for e in self._serving(versions)):
            return False
        return self.budget.spend()
