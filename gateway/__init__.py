"""The fashionserve gateway: the gRPC service in front of the Triton ensemble.

A request goes down one line: servicer (protobuf in and out) -> analyzer (domain) ->
batched inference (awaited) -> endpoint pool -> Triton transport. By file:

* ``settings.py``: the one validated settings model (environment, YAML file, flags);
* ``memory.py``: the process's memory, which the limits on callers are derived from;
* ``server.py``: the grpc.aio server with health, reflection and the interceptors, and
  the health-only server of ``health_port``;
* ``call_budget.py``: calls open at once, in budgets by kind (service, checks, anonymous
  streams);
* ``auth/``: who is calling: API keys, bearer tokens, TLS and the auth interceptor;
* ``errors.py``: the interceptor that maps error kinds to gRPC statuses (one table);
* ``handlers.py``: the gRPC handler wrapping the interceptors share;
* ``telemetry.py``: traces, Prometheus metrics and request context on log lines;
* ``servicer.py``: the thin protobuf <-> domain layer;
* ``core.py``: the analyzer: validate, admit, infer, decode, free of gRPC;
* ``failures.py``: the gateway's domain errors (a transport-free kind each);
* ``validation.py``: header-only checks of each image and of the request options;
* ``quota.py``: admission: per-tenant rate, concurrency and stream limits, queue shedding;
* ``quota_store.py``: where tenant quotas are kept: the interface, in this process;
* ``quota_backend.py``: tenant quotas shared by the replicas on a Redis/Valkey server;
* ``results.py``: taxonomy decoding of the ensemble's outputs into per-garment results;
* ``inference.py``: the batched inference path (micro-batcher to endpoint pool);
* ``batcher.py``: micro-batching of concurrent requests into one backend call;
* ``monitor.py``: whether the gateway can serve, re-checked in the background;
* ``served_state.py``: what Triton serves and the verdict whether the gateway can serve;
* ``endpoints.py``: several Triton servers: readiness, pick, ejection, retries;
* ``triton_client.py``: the transport: ``tritonclient.grpc.aio`` calls to the ensemble.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("fashionserve")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
