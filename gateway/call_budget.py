"""Calls open at once, counted in budgets by kind, so that one kind cannot take another's slots.

gRPC's own ``maximum_concurrent_rpcs`` counts every call alike: anonymous health ``Watch``
and reflection streams could fill it, and then the readiness probe and authenticated calls
would be refused. :class:`CallBudgetInterceptor` counts each port's calls in three budgets,
chosen by method:

* the analysis service's calls: ``max_concurrent_rpcs``;
* health ``Check``: :data:`HEALTH_CHECKS_AT_ONCE` (each is answered at once from memory);
* the streams that need no credentials, health ``Watch`` and reflection:
  ``max_anonymous_streams``.

A call past its budget is refused at once, before its request is read, with
RESOURCE_EXHAUSTED (TOO_MANY_CALLS, the ``limit`` metadata naming the setting). A slot is
held until gRPC has finished the call, however it ends (answered, failed, cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from fashionserve.gateway.errors import abort
from fashionserve.gateway.failures import ResourceExhausted
from fashionserve.gateway.handlers import SERVICE_PREFIX, refusing_handler
from fashionserve.gateway.settings import GatewaySettings

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_CHECKS_AT_ONCE = 64
"""Health checks open at once per port: a probe is answered in microseconds, so this many
only fill up under a flood, which must not take the other budgets' slots either."""
# The delay suggested to a refused caller (a google.rpc.RetryInfo): calls end quickly.
RETRY_DELAY_SECONDS = 0.1


@dataclass
class Budget:
    """At most ``limit`` calls open at once; ``setting`` names where the limit comes from."""

    setting: str
    limit: int
    open: int = 0


class CallBudgetInterceptor(grpc.aio.ServerInterceptor):
    """Counts one port's open calls in the budgets of ``settings``; refuses those past it.

    Place it after :class:`fashionserve.gateway.errors.ErrorInterceptor` and before the
    authentication interceptor, so that a refused call is never authenticated nor read.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.service = Budget("max_concurrent_rpcs", settings.max_concurrent_rpcs)
        self.health_checks = Budget("health_checks", HEALTH_CHECKS_AT_ONCE)
        self.anonymous_streams = Budget("max_anonymous_streams", settings.max_anonymous_streams)

    def budget_for(self, method: str) -> Budget:
        """The budget a call of ``method`` counts against."""
        if method.startswith(SERVICE_PREFIX):
            return self.service
        if method == HEALTH_CHECK_METHOD:
            return self.health_checks
        return self.anonymous_streams

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Take a slot of the call's budget for the whole call, or refuse the call."""
        budget = self.budget_for(handler_call_details.method)
        if budget.open >= budget.limit:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            refusal = ResourceExhausted(
                "TOO_MANY_CALLS",
                f"the gateway has {budget.open} such calls open, its limit is {budget.limit}",
                {"limit": budget.setting, "maxCalls": budget.limit},
                retry_delay=RETRY_DELAY_SECONDS,
            )

            async def refuse(context: grpc.aio.ServicerContext) -> None:
                # abort, not raise: health and reflection calls are not mapped by the
                # error interceptor, and a refusal must read the same on every method.
                await abort(context, refusal)

            return refusing_handler(handler, refuse)
        # grpc.aio runs the interceptors inside the call's own task, which ends when gRPC
        # has finished the call: the one moment to give the slot back that no path skips
        # (a call cancelled while its request is received never reaches its handler).
        task = asyncio.current_task()
        assert task is not None, "grpc.aio runs interceptors inside the call's task"
        budget.open += 1

        def release(_: asyncio.Task[object]) -> None:
            budget.open -= 1

        task.add_done_callback(release)
        return await continuation(handler_call_details)
