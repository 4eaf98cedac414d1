"""When and how long to wait before retrying a call: shared by the sync and asyncio clients.

Only UNAVAILABLE is retried by default: it means the request did not reach a gateway that
could serve it (a restart, a connection reset, a load balancer draining a pod), and every
fashion.v1 call is read-only, so sending it again is safe. RESOURCE_EXHAUSTED is retried
when the gateway said when (a ``google.rpc.RetryInfo``: a quota or overload refusal), and
never sooner than that; without one (a message too large) it is final. Waits grow exponentially with
jitter so that many clients cut off together do not come back together, and no wait ever
runs past the call's deadline: the deadline bounds the whole call, retries included.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    The wait before retry ``n`` (``n`` = 1, 2, ...) is drawn uniformly from
    ``[(1 - jitter) * b, b]`` with ``b = min(max_backoff, initial_backoff * multiplier**(n-1))``.
    ``max_attempts`` counts the first attempt: 1 disables retries.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retryable: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")

    @classmethod
    def with_retries(cls, retries: int) -> RetryPolicy:
        """The default policy allowing ``retries`` retries after the first attempt."""
        return cls(max_attempts=max(0, retries) + 1)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        draw = (rng or random).random()
        return ceiling * (1 - self.jitter * draw)

    def start(
        self, timeout: float | None, clock: Callable[[], float] = time.monotonic
    ) -> RetryState:
        """Begin one call whose deadline is ``timeout`` seconds from now (``None``: none)."""
        return RetryState(self, None if timeout is None else clock() + timeout, clock)


class RetryState:
    """The retry bookkeeping of one call.

    Usage (the asyncio client awaits ``asyncio.sleep`` instead)::

        state = policy.start(timeout)
        while True:
            try:
                return stub.Method(request, timeout=state.remaining())
            except grpc.RpcError as err:
                failure = FashionServeError.from_rpc_error(err, state.attempts)
                delay = state.next_delay(failure.code, failure.retry_delay)
                if delay is None:
                    raise failure
                time.sleep(delay)
    """

    def __init__(
        self, policy: RetryPolicy, deadline: float | None, clock: Callable[[], float]
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.attempts = 1
        self._clock = clock

    def remaining(self) -> float | None:
        """Seconds left until the deadline, for the next attempt's own timeout."""
        if self.deadline is None:
            return None
        # grpc treats a timeout of 0 as "already expired", which is what we want here.
        return max(0.0, self.deadline - self._clock())

    def next_delay(
        self, code: grpc.StatusCode | None, retry_after: float | None = None
    ) -> float | None:
        """How long to wait before the next attempt, or ``None`` to give up now.

        ``retry_after`` is the server's ``RetryInfo`` delay, if it sent one: it makes
        RESOURCE_EXHAUSTED retryable and is the least wait. Gives up when ``code`` is not
        retryable, when the attempts are used up, or when the wait would end at or past the
        deadline (the next attempt would have no time left).
        """
        told = retry_after is not None and code == grpc.StatusCode.RESOURCE_EXHAUSTED
        if not (told or code in self.policy.retryable):
            return None
        if self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.attempts)
        if told and retry_after is not None:
            delay = max(delay, retry_after)
        left = self.remaining()
        if left is not None and delay >= left:
            return None
        self.attempts += 1
        return delay
