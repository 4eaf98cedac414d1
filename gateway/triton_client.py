"""The gateway's calls to Triton, over ``tritonclient.grpc.aio``.

Two jobs:

* :meth:`TritonPipeline.infer`: one ensemble call for a batch of images, returning one
  outcome per image. When the ensemble refuses the call because of one image (its
  preprocess step names the image and the reason, see
  :func:`fashionserve.ensemble.parse_rejection`), that image alone fails and the others
  are sent again without it; a refusal that names no image is narrowed down by sending the
  images one by one. So one bad image fails only itself.
* :meth:`TritonPipeline.describe`: readiness and what is served, for the health service and
  GetServingInfo. Everything comes from Triton itself (one source of truth, also where the
  gateway does not share a disk with Triton): readiness from the server and the ensemble,
  loaded versions from the repository index, and the facts ``fashionserve repo build``
  records in the ensemble's config ``parameters`` (taxonomy hash and version, score floor,
  caps, and ``<model>_sha256`` artifact hashes when the repository records them).

gRPC's default 4 MiB message limit is too small for a batch of photos: the channel's send
and receive limits are raised explicitly to fit ``max_batch_size`` images of
``max_image_bytes``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from fashionserve import ensemble
from fashionserve.gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    InternalError,
    InvalidArgument,
    Unavailable,
    internal_error,
)
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.telemetry import trace_headers
from fashionserve.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GRPC_MAX_MESSAGE = 2**31 - 1
# Reasons the preprocess step gives for an image that is the caller's fault.
IMAGE_REASONS = frozenset(
    {"EMPTY_IMAGE", "NOT_AN_IMAGE", "UNSUPPORTED_FORMAT", "TOO_MANY_PIXELS", "CORRUPT_IMAGE"}
)
PIPELINE_MODELS: tuple[str, ...] = ("detector", "tagger", "embedder")
"""The exported models whose versions GetServingInfo reports."""
_STATUS_TIMEOUT = 2.0  # seconds; a readiness probe must not hang the health loop


@dataclass(frozen=True)
class ServedModel:
    """One model of the pipeline as served."""

    name: str
    version: str
    artifact_sha256: str


@dataclass(frozen=True)
class ServedState:
    """What Triton serves right now, as far as the gateway can tell."""

    ready: bool
    problem: str = ""
    taxonomy_hash: str = ""
    taxonomy_version: str = ""
    models: tuple[ServedModel, ...] = ()
    min_score: float = 0.0
    max_images_per_request: int = 0
    max_crops_per_image: int = 0
    embedding_dimension: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    # The served tagger's own taxonomy, when the ensemble publishes it (verified against
    # taxonomy_hash): the gateway decodes with it, so a rollout that adds labels needs no
    # gateway restart.
    taxonomy: Taxonomy | None = None


def serving_problem(state: ServedState, taxonomy: Taxonomy) -> str:
    """Why the pipeline described by ``state`` cannot serve with ``taxonomy`` ("" if it can):
    Triton not ready, or the served tagger exported with another taxonomy that the
    ensemble does not publish (its logits cannot be decoded)."""
    if not state.ready:
        return state.problem
    if state.taxonomy is None and state.taxonomy_hash != taxonomy.hash:
        return (
            f"the served tagger was exported with taxonomy "
            f"{state.taxonomy_version or '?'} (hash {state.taxonomy_hash[:12] or 'unknown'}), "
            f"the gateway decodes with {taxonomy.version} (hash {taxonomy.hash[:12]})"
        )
    return ""


def channel_args(max_batch_size: int, max_image_bytes: int) -> list[tuple[str, Any]]:
    """Channel options for the Triton connection: message limits sized for a full batch,
    and a short reconnect backoff so a restarted Triton is noticed within seconds (gRPC's
    default backoff grows to two minutes)."""
    limit = min(GRPC_MAX_MESSAGE, max_batch_size * max_image_bytes + 16 * MIB)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class TritonPipeline:
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
        # Learned from the ensemble's config; 0 until known.
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
        text = str(exc.message() or exc)
        status = str(exc.status() or "")
        rejection = ensemble.parse_rejection(text)
        if rejection is not None:
            return _Rejected(rejection, text)
        if status.endswith("UNAVAILABLE"):
            return Unavailable(
                "TRITON_UNAVAILABLE",
                "the inference server cannot be reached; retry later",
                {"tritonUrl": self.url},
            )
        if status.endswith("DEADLINE_EXCEEDED"):
            return DeadlineExceeded(
                "INFERENCE_TIMEOUT",
                f"the inference server did not answer within {timeout:.3g} s",
                {"timeoutSeconds": f"{timeout:.3g}"},
            )
        if "unknown model" in text or "is not ready" in text or "not found" in text:
            return Unavailable(
                "MODEL_NOT_READY", f"the model {self.model_name} is not loaded; retry later"
            )
        log.error("ensemble call for %d image(s) failed: %s %s", n_images, status, text)
        return InternalError("INFERENCE_FAILED", "the inference server failed to run the models")

    # ------------------------------------------------------------------ describe
    async def describe(self) -> ServedState:
        """Readiness plus the served facts; never raises (a failure is ``ready=False``)."""
        try:
            # Live, not ready: with --strict-readiness a server is "not ready" while any
            # model (re)loads, and a rollout reloads models while the ensemble serves.
            if not await self._client.is_server_live(client_timeout=_STATUS_TIMEOUT):
                return ServedState(False, "Triton is not live")
            if not await self._client.is_model_ready(
                self.model_name, client_timeout=_STATUS_TIMEOUT
            ):
                return ServedState(False, f"model {self.model_name} is not ready")
            config = await self._client.get_model_config(
                self.model_name, client_timeout=_STATUS_TIMEOUT
            )
            index = await self._client.get_model_repository_index(client_timeout=_STATUS_TIMEOUT)
        except InferenceServerException as exc:
            return ServedState(False, f"Triton at {self.url}: {exc.message() or exc}")
        except Exception as exc:  # a probe must never kill the health loop
            return ServedState(False, f"Triton at {self.url}: {type(exc).__name__}: {exc}")
        loaded: dict[str, list[str]] = {}
        for model in index.models:
            if model.state == "READY":
                loaded.setdefault(model.name, []).append(model.version)
        state = served_state_from_config(config.config, loaded)
        if state.max_images_per_request:
            self.max_images_per_request = state.max_images_per_request
        return state


def served_state_from_config(
    config: Any, loaded: dict[str, list[str]] | None = None
) -> ServedState:
    """Read the facts ``fashionserve repo build`` records in the ensemble's config.

    ``loaded`` (model name -> versions Triton reports READY in its repository index) says
    which version is actually served; the version recorded at build time is the fallback.
    An artifact hash is reported only for the version it was recorded for.
    """
    params = {k: v.string_value for k, v in config.parameters.items()}

    def number(key: str, kind: type[int] | type[float]) -> Any:
        try:
            return kind(params.get(key, "0"))
        except ValueError:
            return kind(0)

    embedding_dim = 0
    for output in config.output:
        if output.name == ensemble.EMBEDDINGS and len(output.dims) >= 1:
            embedding_dim = max(int(output.dims[-1]), 0)
    # `repo build` pins each step to an exact version: that is the one served. A step at
    # -1 (a repository built before pinning) uses the newest loaded version.
    pinned = {
        s.model_name: str(s.model_version)
        for s in config.ensemble_scheduling.step
        if s.model_version > 0
    }
    models: list[ServedModel] = []
    for name in PIPELINE_MODELS:
        built = params.get(f"{name}_version", "")
        versions = (loaded or {}).get(name) or ([built] if built else [])
        newest = max(versions, key=lambda v: int(v) if v.isdigit() else -1, default="")
        served = pinned.get(name, newest)
        sha = params.get(f"{name}_sha256", "") if served == built else ""
        models.append(ServedModel(name, served, sha))
    # The recorded taxonomy hash is that of the tagger version the ensemble was built with;
    # if Triton serves another version, what its logits mean is unknown: no hash.
    tagger = next(m for m in models if m.name == "tagger")
    recorded_tagger = params.get("tagger_version", tagger.version)
    taxonomy_hash = params.get("taxonomy_hash", "") if tagger.version == recorded_tagger else ""
    return ServedState(
        taxonomy=_published_taxonomy(params.get("taxonomy_document", ""), taxonomy_hash),
        ready=True,
        taxonomy_hash=taxonomy_hash,
        taxonomy_version=params.get("taxonomy_version", ""),
        models=tuple(models),
        min_score=number("min_score", float),
        max_images_per_request=number("max_images_per_request", int),
        max_crops_per_image=number("max_crops_per_image", int),
        embedding_dimension=embedding_dim,
        parameters=params,
    )


def _published_taxonomy(document: str, expected_hash: str) -> Taxonomy | None:
    """The taxonomy the ensemble publishes, if it parses and hashes to ``expected_hash``."""
    if not document or not expected_hash:
        return None
    try:
        taxonomy = Taxonomy.from_dict(json.loads(document), source="the served ensemble")
    except (ValueError, TypeError) as exc:  # TaxonomyError is a ValueError
        log.error("the served ensemble's taxonomy_document is invalid: %s", exc)
        return None
    if taxonomy.hash != expected_hash:
        log.error(
            "the served ensemble's taxonomy_document hashes to %s, not to its taxonomy_hash %s",
            taxonomy.hash[:12],
            expected_hash[:12],
        )
        return None
    return taxonomy


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
        log.error("the ensemble refused a call: %s", self)
        return internal_error()
