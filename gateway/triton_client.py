"""The transport: the gateway's calls to the ensemble on one Triton server, over
``tritonclient.grpc.aio``. Transport failures become the gateway's domain errors here;
what Triton said, and where, is logged, never answered.

Two jobs:

* :meth:`EnsembleClient.infer`: one ensemble call for a batch of images, returning one
  outcome per image. When the ensemble refuses the call because of one image (its
  preprocess step names the image and the reason, see
  :func:`fashionserve.ensemble.parse_rejection`), that image alone fails and the others
  are sent again without it; a refusal that names no image is narrowed down by sending the
  images one by one. So one bad image fails only itself.
* :meth:`EnsembleClient.status`: what Triton reports, for the health service and
  GetServingInfo: liveness, the ensemble's readiness and its config, whose steps name the
  versions served (one source of truth, also where the gateway does not share a disk with
  Triton). :mod:`fashionserve.gateway.served_state` interprets it.

gRPC's default 4 MiB message limit is too small for a batch of photos: the channel's send
and receive limits are raised explicitly to fit ``max_batch_size`` images of
``max_image_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from fashionserve import ensemble
from fashionserve.gateway.failures import (
    DeadlineExceeded,
    GatewayError,
    InternalError,
    InvalidArgument,
    Unavailable,
    batch_requests_var,
    internal_error,
)
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.telemetry import trace_headers

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Reasons the preprocess step gives for an image that is the caller's fault.
IMAGE_REASONS = frozenset(
    {"EMPTY_IMAGE", "NOT_AN_IMAGE", "UNSUPPORTED_FORMAT", "TOO_MANY_PIXELS", "CORRUPT_IMAGE"}
)
_STATUS_TIMEOUT = 2.0  # seconds; a readiness probe must not hang the health loop
INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
"""The reason of a call that was sent and not answered in time (by the request timeout or
by the caller's shorter deadline): the endpoint pool counts these against the server."""


@dataclass(frozen=True)
class EnsembleStatus:
    """What Triton reports about the ensemble: ``config`` (its model config) when it is
    live and ready, else ``problem``, why not.
    :func:`fashionserve.gateway.served_state.assess` reads it."""

    problem: str = ""
    config: model_config_pb2.ModelConfig | None = None


def channel_args(max_batch_size: int, max_image_bytes: int) -> list[tuple[str, Any]]:
    """Channel options for the Triton connection: message limits sized for a full batch,
    and a short reconnect backoff so a restarted Triton is noticed within seconds (gRPC's
    default backoff grows to two minutes)."""
    limit = min(ensemble.GRPC_MAX_MESSAGE_BYTES, max_batch_size * max_image_bytes + 16 * MIB)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class EnsembleClient:
    """The ensemble ``fashion_pipeline`` on one Triton server."""

    def __init__(
        self,
        url: str,
        *,
        max_batch_size: int,
        max_image_bytes: int,
        request_timeout_seconds: float,
        model_name: str = ensemble.MODEL_NAME,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.timeout = request_timeout_seconds
        self._client = aioclient.InferenceServerClient(
            url, channel_args=channel_args(max_batch_size, max_image_bytes)
        )
        self._outputs = [grpcclient.InferRequestedOutput(name) for name in ensemble.OUTPUTS]
        # Set from the ensemble's config by the endpoint pool's probes; 0 until known.
        self.max_images_per_request = 0

    async def close(self) -> None:
        """Close the channel."""
        await self._client.close()

    # --------------------------------------------------------------------- infer
    async def infer(
        self, images: Sequence[bytes], deadline: float | None = None
    ) -> list[ImageOutput | GatewayError]:
        """Run ``images`` through the ensemble; one outcome per image, in order.

        Every call to Triton is bounded by the request timeout and by ``deadline``
        (``time.monotonic()`` seconds, the latest deadline of the batch's callers), so
        the caller's deadline travels to Triton as the call's gRPC deadline; none starts
        after it. An image the ensemble refuses becomes an :class:`InvalidArgument` in its
        place. Raises :class:`GatewayError` (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL) when
        the call fails for every image alike.
        """
        cap = self.max_images_per_request or len(images)
        if len(images) <= cap:
            return await self._infer_isolating(list(images), deadline)
        # A batch larger than the ensemble accepts: split it rather than fail it.
        chunks = [list(images[i : i + cap]) for i in range(0, len(images), cap)]
        parts = await asyncio.gather(*(self._infer_isolating(c, deadline) for c in chunks))
        return [outcome for part in parts for outcome in part]

    async def _infer_isolating(
        self, images: list[bytes], deadline: float | None
    ) -> list[ImageOutput | GatewayError]:
        outcomes: list[ImageOutput | GatewayError | None] = [None] * len(images)
        pending = list(range(len(images)))
        while pending:
            try:
                outputs = await self._infer_once([images[i] for i in pending], deadline)
            except _Rejected as rejected:
                rej = rejected.rejection
                if rej.index is not None and 0 <= rej.index < len(pending):
                    outcomes[pending.pop(rej.index)] = rejected.as_error()
                    continue  # the others again, without the bad one
                if len(pending) == 1:
                    outcomes[pending[0]] = rejected.as_error()
                    break
                for i in pending:  # no image named: find out one by one
                    outcomes[i] = (await self._infer_isolating([images[i]], deadline))[0]
                break
            except InternalError as exc:
                # A step that crashed on one odd image fails the whole call with no image
                # named: with several images, narrow it down one by one.
                if len(pending) == 1 or exc.reason != "INFERENCE_FAILED":
                    raise
                for i in pending:
                    try:
                        outcomes[i] = (await self._infer_isolating([images[i]], deadline))[0]
                    except InternalError as single:
                        outcomes[i] = single
                break
            for i, output in zip(pending, outputs, strict=True):
                outcomes[i] = output
            break
        return [o if o is not None else internal_error() for o in outcomes]

    async def _infer_once(self, images: list[bytes], deadline: float | None) -> list[ImageOutput]:
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded(
                    "DEADLINE_EXCEEDED", "the call's deadline passed before inference"
                )
        inputs = ensemble.make_infer_inputs(images)
        try:
            result = await self._client.infer(
                self.model_name,
                inputs,
                outputs=self._outputs,
                client_timeout=timeout,
                # W3C traceparent of the batch's span: a Triton with tracing joins the trace.
                headers=trace_headers(),
            )
        except InferenceServerException as exc:
            raise self._map_error(exc, len(images), timeout) from exc
        try:
            arrays = {name: result.as_numpy(name) for name in ensemble.OUTPUTS}
            per_image = ensemble.parse_outputs(arrays, len(images))
            sizes = np.asarray(arrays[ensemble.IMAGE_SIZES]).reshape(-1, 2)
            if sizes.shape[0] != len(images):
                raise ValueError(f"{sizes.shape[0]} image sizes for {len(images)} images")
        except Exception as exc:
            log.error("the ensemble's outputs do not match its contract: %s", exc)
            raise InternalError(
                "BAD_MODEL_OUTPUT", "the served models returned outputs that do not match"
            ) from exc
        return [
            ImageOutput(int(w), int(h), garments)
            for (w, h), garments in zip(sizes.tolist(), per_image, strict=True)
        ]

    def _map_error(self, exc: InferenceServerException, n_images: int, timeout: float) -> Exception:
        """The gateway's error for a failed call. Its message and metadata name neither this
        server nor Triton's text (callers need not learn the fleet's layout): both are
        logged here, with the ids of the requests the call carried."""
        text = str(exc.message() or exc)
        status = str(exc.status() or "")
        rejection = ensemble.parse_rejection(text)
        if rejection is not None:
            return _Rejected(rejection, text)
        error: GatewayError
        if status.endswith("UNAVAILABLE"):
            error = Unavailable(
                "TRITON_UNAVAILABLE", "the inference server cannot be reached; retry later"
            )
        elif status.endswith("DEADLINE_EXCEEDED"):
            error = DeadlineExceeded(
                INFERENCE_TIMEOUT,
                f"the inference server did not answer within {timeout:.3g} s",
                {"timeoutSeconds": f"{timeout:.3g}"},
            )
        elif "unknown model" in text or "is not ready" in text or "not found" in text:
            error = Unavailable(
                "MODEL_NOT_READY", f"the model {self.model_name} is not loaded; retry later"
            )
        else:
            error = InternalError(
                "INFERENCE_FAILED", "the inference server failed to run the models"
            )
        log.log(
            logging.ERROR if isinstance(error, InternalError) else logging.WARNING,
            "ensemble call to Triton %s for %d image(s) of requests %s failed (%s): %s %s",
            self.url,
            n_images,
            batch_requests_var.get(),
            error.reason,
            status,
            text,
        )
        return error

    # ------------------------------------------------------------------ status
    async def status(self) -> EnsembleStatus:
        """What Triton reports now; never raises (a failure is a ``problem``)."""
        try:
            # Live, not ready: with --strict-readiness a server is "not ready" while any
            # model (re)loads, and a rollout reloads models while the ensemble serves.
            if not await self._client.is_server_live(client_timeout=_STATUS_TIMEOUT):
                return EnsembleStatus("Triton is not live")
            if not await self._client.is_model_ready(
                self.model_name, client_timeout=_STATUS_TIMEOUT
            ):
                return EnsembleStatus(f"model {self.model_name} is not ready")
            config = await self._client.get_model_config(
                self.model_name, client_timeout=_STATUS_TIMEOUT
            )
        except InferenceServerException as exc:
            return EnsembleStatus(f"Triton at {self.url}: {exc.message() or exc}")
        except Exception as exc:  # a probe must never kill the health loop
            return EnsembleStatus(f"Triton at {self.url}: {type(exc).__name__}: {exc}")
        return EnsembleStatus(config=config.config)


class _Rejected(Exception):
    """The ensemble refused a call; carries the parsed rejection."""

    def __init__(self, rejection: ensemble.Rejection, raw: str) -> None:
        super().__init__(raw)
        self.rejection = rejection

    def as_error(self) -> GatewayError:
        """The refusal as the error of the one image it concerns."""
        rej = self.rejection
        if rej.reason in IMAGE_REASONS:
            return InvalidArgument(rej.reason, rej.message or "the image was refused")
        log.error("the ensemble refused a call of requests %s: %s", batch_requests_var.get(), self)
        return internal_error()
