"""What the load generator calls: the gateway, Triton's ensemble directly, the naive server,
or the Ray Serve reference.

Every target sends the same encoded images and does what a real caller of that endpoint
must do with the answer (the direct-Triton target deserialises the output tensors and
splits them per image, as the gateway does), so ratios between targets compare like with
like. Calls are asynchronous (``grpc.aio`` / ``tritonclient.grpc.aio``) so that one
process can keep hundreds of requests in flight for an open-loop schedule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from fashionserve.clients.security import ChannelSecurity
from fashionserve.ensemble import MODEL_NAME
from fashionserve.loadtest.defaults import TARGET_KINDS, TargetKind
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""gRPC's 4 MiB default is too small for full-size photos; raised on the client side."""

API_KEY_HEADER = "x-api-key"

CLIENT_ERROR = "CLIENT_ERROR"
"""Status recorded when the call failed inside the generator rather than with a gRPC code."""


@dataclass(frozen=True)
class TargetSpec:
    """Where and how to send requests; picklable, so each generator process opens its own.

    ``api_key`` is ``<key_id>.<secret>`` for the gateway (ignored by the others);
    ``security`` says how the gateway's or the naive server's channel is secured, and
    refuses (here, before any generator process starts) to send the key in plaintext to
    another machine unless allowed.
    ``include_embeddings`` asks the gateway and the naive server for embeddings, which
    Triton's ensemble always returns, so every target ships the same work back.
    """

    kind: TargetKind
    address: str
    api_key: str | None = None
    include_embeddings: bool = True
    model_name: str = MODEL_NAME
    security: ChannelSecurity = field(default_factory=ChannelSecurity)

    def __post_init__(self) -> None:
        self.security.check(self.address, sends_secret=bool(self.api_key))

    def describe(self) -> dict[str, Any]:
        """JSON-able description for reports (the API key is never included)."""
        return {
            "kind": self.kind,
            "address": self.address,
            "authenticated": bool(self.api_key),
            "tls": self.security.uses_tls,
            "include_embeddings": self.include_embeddings,
        }


@dataclass(frozen=True)
class Outcome:
    """The result of one call: ``"OK"`` or a gRPC status code name, and garments found."""

    code: str
    garments: int = 0


class Target(Protocol):
    """An endpoint the generator can call."""

    async def wait_ready(self, timeout: float) -> None:
        """Return once the connection is up; raise ``TimeoutError`` otherwise."""

    async def call(self, image_index: int, timeout: float) -> Outcome:
        """Analyse image ``image_index`` (of the images given at open) once."""

    async def close(self) -> None:
        """Release the connection."""


def status_name(exc: BaseException) -> str:
    """The gRPC status code name of a failed call (``CLIENT_ERROR`` when there is none)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "DEADLINE_EXCEEDED"
    status = getattr(exc, "status", None)
    if callable(status):  # tritonclient's InferenceServerException: "StatusCode.UNAVAILABLE"
        text = status()
        if isinstance(text, str) and text:
            return text.rsplit(".", 1)[-1]
    return CLIENT_ERROR


class AnalysisServiceTarget:
    """``FashionAnalysisService.Analyze`` over gRPC: the gateway, the naive server or the
    Ray Serve reference (through Ray's gRPC proxy)."""

    def __init__(self, spec: TargetSpec, images: Sequence[bytes]) -> None:
        limits = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        credentials = spec.security.credentials(spec.address, sends_secret=bool(spec.api_key))
        self._channel = (
            grpc.aio.secure_channel(spec.address, credentials, options=limits)
            if credentials is not None
            else grpc.aio.insecure_channel(spec.address, options=limits)
        )
        self._stub = pb_grpc.FashionAnalysisServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            ((API_KEY_HEADER, spec.api_key),) if spec.api_key else ()
        )
        options = pb.AnalyzeOptions(include_embeddings=spec.include_embeddings)
        # Built once: the generator should spend its CPU on sending, not on building.
        self._requests = [
            pb.AnalyzeRequest(image=pb.Image(data=data), options=options) for data in images
        ]

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def call(self, image_index: int, timeout: float) -> Outcome:
        request = self._requests[image_index % len(self._requests)]
        try:
            response = await self._stub.Analyze(
                request, metadata=self._metadata, timeout=max(timeout, 1e-3)
            )
        except Exception as exc:
            return Outcome(status_name(exc))
        return Outcome("OK", len(response.result.garments))

    async def close(self) -> None:
        await self._channel.close()


class TritonTarget:
    """The ``fashion_pipeline`` ensemble called directly with ``tritonclient.grpc.aio``."""

    def __init__(self, spec: TargetSpec, images: Sequence[bytes]) -> None:
        import tritonclient.grpc.aio as grpcclient

        from fashionserve import ensemble

        self._ensemble = ensemble
        self._model = spec.model_name
        self._client = grpcclient.InferenceServerClient(
            spec.address, channel_args=ensemble.GRPC_CHANNEL_ARGS
        )
        self._outputs = [grpcclient.InferRequestedOutput(name) for name in ensemble.OUTPUTS]
        self._inputs = []
        for data in images:
            tensor = grpcclient.InferInput(ensemble.IMAGE_BYTES, [1], "BYTES")
            tensor.set_data_from_numpy(ensemble.build_inputs([data]))
            self._inputs.append([tensor])

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                if await self._client.is_model_ready(self._model):
                    return
            except Exception:  # not listening yet: keep polling until the deadline
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"model {self._model} not ready within {timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def call(self, image_index: int, timeout: float) -> Outcome:
        inputs = self._inputs[image_index % len(self._inputs)]
        try:
            result = await self._client.infer(
                self._model,
                inputs,
                outputs=self._outputs,
                client_timeout=max(timeout, 1e-3),
            )
            arrays = {name: result.as_numpy(name) for name in self._ensemble.OUTPUTS}
            garments = self._ensemble.parse_outputs(arrays, 1)
        except Exception as exc:
            return Outcome(status_name(exc))
        return Outcome("OK", len(garments[0]))

    async def close(self) -> None:
        await self._client.close()


def open_target(spec: TargetSpec, images: Sequence[bytes]) -> Target:
    """A connected-on-demand target for ``spec`` sending ``images`` round robin."""
    if not images:
        raise ValueError("no images to send")
    if spec.kind == "triton":
        return TritonTarget(spec, images)
    if spec.kind in ("gateway", "naive", "ray"):
        return AnalysisServiceTarget(spec, images)
    raise ValueError(f"unknown target kind {spec.kind!r} (known: {', '.join(TARGET_KINDS)})")
