"""The fashionserve gateway: the gRPC service in front of the Triton ensemble.

Where things happen, by file:

* ``settings.py``: the one validated settings model (environment, YAML file, flags);
* ``auth.py``: API-key authentication (an interceptor) and the key file;
* ``errors.py``: the domain error base class and its one mapping to ``google.rpc.Status``;
* ``validation.py``: header-only checks of each image and of the request options;
* ``batcher.py``: micro-batching of concurrent requests into one ensemble call;
* ``triton_client.py``: the ``tritonclient.grpc.aio`` calls to the ensemble and its models;
* ``results.py``: taxonomy decoding of the ensemble's outputs into per-garment results;
* ``core.py``: the request flow (validate, batch, decode) and the serving state;
* ``servicer.py``: the thin protobuf <-> domain layer;
* ``server.py``: the grpc.aio server with health, reflection and the interceptors;
* ``cli.py``: the ``fashionserve gateway`` and ``fashionserve keys create`` commands.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("fashionserve")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
