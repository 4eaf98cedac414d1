"""Whether the gateway can serve, kept up to date: the health service and every request
consult :class:`ServingMonitor`, so the gateway never decodes logits with a taxonomy other
than the one the served tagger was exported with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fashionserve.gateway.endpoints import EndpointPool
from fashionserve.gateway.failures import Unavailable, request_id_var
from fashionserve.gateway.served_state import ServedState
from fashionserve.taxonomy import Taxonomy
from fashionserve.thresholds import ThresholdSet

log = logging.getLogger(__name__)

# Taxonomies of recently served taggers kept for decoding results still in flight.
_RECENT_TAXONOMIES = 4
# A request that finds the gateway not serving re-checks Triton at most this often.
_RECHECK_SECONDS = 0.5


class ServingMonitor:
    """Whether the gateway can serve: at least one Triton endpoint the pool admits (its
    served state has no problem, :mod:`fashionserve.gateway.served_state` gives the
    verdict, and its canary inference passed). :meth:`run`
    re-checks every endpoint every ``interval`` seconds and reports changes to
    ``on_change(serving)``."""

    def __init__(
        self,
        pool: EndpointPool,
        taxonomy: Taxonomy,
        interval: float,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.taxonomy = taxonomy
        self.interval = interval
        self.on_change = on_change
        self.state = ServedState(False, "not checked yet")
        self.serving = False
        self.problem = "not checked yet"
        self._refreshing: asyncio.Task[bool] | None = None
        self._last_refresh = 0.0
        # Taxonomies served lately, newest last: results of a tagger version that was just
        # switched away from may still arrive, and are decoded with its own taxonomy.
        self._recent: dict[str, Taxonomy] = {}

    @property
    def served_taxonomy(self) -> Taxonomy:
        """The taxonomy callers get results in: the served tagger's own when the ensemble
        publishes it (a rollout that adds labels needs no gateway restart), else the
        gateway's ``taxonomy_file``, which then must match the served hash."""
        return self.state.taxonomy or self.taxonomy

    @property
    def served_thresholds(self) -> ThresholdSet | None:
        """The calibrated threshold set :attr:`served_taxonomy` decides with (``None``: the
        taxonomy's own thresholds). It comes with the served tagger version, so a rollout
        or a rollback switches it without a gateway restart."""
        return self.state.thresholds if self.state.taxonomy is not None else None

    def decoding_taxonomy(self, width: int) -> Taxonomy | None:
        """The taxonomy whose logit layout is ``width`` wide: the served one first, then
        those of the other endpoints and of recent versions (a rollout in progress)."""
        endpoint_states = [e.state for e in self.pool.endpoints.values()]
        candidates = [
            self.served_taxonomy,
            *(s.taxonomy for s in endpoint_states if s.taxonomy is not None),
            *reversed(self._recent.values()),
        ]
        return next((t for t in candidates if t.num_logits == width), None)

    async def refresh(self) -> bool:
        """Check Triton now (concurrent callers share one check); return ``serving``."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> bool:
        self._last_refresh = time.monotonic()
        state = await self.pool.describe()
        problem = state.problem
        serving = not problem
        before = self.served_taxonomy
        if state.thresholds is not None and (
            self.served_thresholds is None or state.thresholds.hash != self.served_thresholds.hash
        ):
            log.info(
                "deciding with threshold set %s (%s)",
                state.thresholds.name,
                state.thresholds.hash[:12],
            )
        if state.taxonomy is not None and state.taxonomy.hash != before.hash:
            log.info(
                "decoding with the served taxonomy %s (%s), was %s (%s)",
                state.taxonomy.version,
                state.taxonomy.hash[:12],
                before.version,
                before.hash[:12],
            )
        if state.taxonomy is not None:
            self._recent.pop(state.taxonomy.hash, None)
            self._recent[state.taxonomy.hash] = state.taxonomy
            while len(self._recent) > _RECENT_TAXONOMIES:
                self._recent.pop(next(iter(self._recent)))
        self.state = state
        changed = serving != self.serving or problem != self.problem
        self.serving, self.problem = serving, problem
        if changed:
            if serving:
                log.info(
                    "gateway SERVING (Triton %s: %d endpoint(s) ready, taxonomy matches)",
                    self.pool.url,
                    len(self.pool.admitted),
                )
            else:
                log.warning("gateway NOT_SERVING: %s", problem)
            if self.on_change is not None:
                await self.on_change(serving)
        return serving

    async def run(self) -> None:
        """Re-check forever (cancel to stop)."""
        while True:
            try:
                await self.refresh()
            except Exception:  # the monitor must survive anything a check throws
                log.exception("serving check failed")
            await asyncio.sleep(self.interval)

    async def require_serving(self) -> None:
        """Raise UNAVAILABLE unless serving (re-checking at most every half second).

        The caller is told only that; why (which Triton, what it said) is logged with the
        request id: callers need not learn the fleet's layout."""
        if self.serving:
            return
        if time.monotonic() - self._last_refresh >= _RECHECK_SECONDS and await self.refresh():
            return
        self.check_taxonomy()
        log.info("request %s refused, not serving: %s", request_id_var.get(), self.problem)
        raise Unavailable("NOT_SERVING", "the pipeline is not serving; retry later")

    def check_taxonomy(self) -> None:
        """Raise UNAVAILABLE (TAXONOMY_MISMATCH) if the served tagger is known to have been
        exported with another taxonomy than the gateway's, one the ensemble does not
        publish: its logits cannot be decoded."""
        if (
            self.state.ready
            and self.state.taxonomy is None
            and self.state.taxonomy_hash != self.taxonomy.hash
        ):
            raise Unavailable(
                "TAXONOMY_MISMATCH",
                self.problem,
                {
                    "servedTaxonomyHash": self.state.taxonomy_hash,
                    "gatewayTaxonomyHash": self.taxonomy.hash,
                },
            )
