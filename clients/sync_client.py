"""The blocking client: :class:`FashionClient`.

Example::

    from fashionserve.clients import AnalyzeOptions, FashionClient

    with FashionClient("localhost:50051", api_key="dev.abc...") as client:
        result = client.analyze("photo.jpg", AnalyzeOptions(include_embeddings=True))
        for garment in result.garments:
            print(garment.category, garment.box, garment.tags)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from fashionserve.clients._call import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TIMEOUT,
    ImageInput,
    StreamItem,
    analyze_request,
    batch_request,
    call_metadata,
    channel_options,
    search_request,
    stream_requests,
)
from fashionserve.clients.errors import FashionServeError
from fashionserve.clients.retry import RetryPolicy
from fashionserve.clients.security import ChannelSecurity
from fashionserve.clients.types import (
    AnalyzeOptions,
    BatchEntry,
    Box,
    ImageResult,
    SearchResult,
    ServingInfo,
    StreamEntry,
    TaxonomyInfo,
    batch_entry_from_proto,
    image_result_from_proto,
    search_result_from_proto,
    serving_info_from_proto,
    stream_entry_from_proto,
    taxonomy_from_proto,
)
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

T = TypeVar("T")


class FashionClient:
    """A blocking client of ``fashion.v1.FashionAnalysisService``.

    Args:
        address: the gateway, ``HOST:PORT``.
        api_key: sent as ``x-api-key`` metadata on every call (``<key_id>.<secret>``).
        bearer_token: a JWT sent as ``authorization: Bearer <jwt>`` instead of an API key.
        timeout: the default deadline of a unary call in seconds, retries included; each
            method also takes its own ``timeout``. Streams have no default deadline.
        retries: how many times a call that failed with UNAVAILABLE is retried, with
            exponential backoff and jitter, within its deadline.
        retry_policy: a full policy instead of ``retries``.
        tls: connect with TLS, verifying the gateway against the system's roots or
            ``ca_file`` (a PEM CA bundle); any of the files below implies it.
        cert_file, key_file: a PEM client certificate and its key, for mutual TLS.
        allow_plaintext_credentials: without TLS, an API key or a token is sent only to a
            loopback address (``127.0.0.0/8``, ``::1``, ``localhost``): elsewhere the client
            refuses to be created (:class:`~clients.errors.ClientSetupError`) unless this
            is set.
        credentials: channel credentials of your own, instead of the TLS options above.
        max_message_bytes: the largest message sent or received (both gRPC defaults, 4 MiB,
            are raised to the gateway's default, 64 MiB).

    Every failed call raises :class:`~clients.errors.FashionServeError`. The client is
    thread-safe; close it (or use it as a context manager) to release the channel.
    """

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        bearer_token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = 3,
        retry_policy: RetryPolicy | None = None,
        tls: bool = False,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        allow_plaintext_credentials: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry_policy = retry_policy or RetryPolicy.with_retries(retries)
        self._metadata = call_metadata(api_key, bearer_token)
        if credentials is None:
            security = ChannelSecurity(
                tls, ca_file, cert_file, key_file, allow_plaintext_credentials
            )
            credentials = security.credentials(address, sends_secret=bool(self._metadata))
        options = channel_options(max_message_bytes)
        self._channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(address, options=options)
        )
        self._stub = pb_grpc.FashionAnalysisServiceStub(self._channel)

    # ---------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> FashionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------- calls
    def analyze(
        self,
        image: ImageInput,
        options: AnalyzeOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> ImageResult:
        """Find the garments in one image (encoded bytes or a file path)."""
        response = self._unary(
            self._stub.Analyze, analyze_request(image, options), timeout, pb.AnalyzeResponse
        )
        return image_result_from_proto(response.result)

    def batch_analyze(
        self,
        images: Sequence[ImageInput],
        options: AnalyzeOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[BatchEntry]:
        """Analyse several images in one call: one entry per image, in order.

        An image that cannot be analysed fails only its own entry (``entry.error``); the
        number of images must not exceed ``get_serving_info().limits.max_images_per_batch``.
        """
        response = self._unary(
            self._stub.BatchAnalyze,
            batch_request(images, options),
            timeout,
            pb.BatchAnalyzeResponse,
        )
        return [batch_entry_from_proto(e) for e in response.entries]

    def stream_analyze(
        self,
        requests: Iterable[StreamItem],
        options: AnalyzeOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[StreamEntry]:
        """Stream images in, results out, for bulk work.

        ``requests`` is read lazily as the server asks for more (flow control), so it may
        be an endless generator. Results arrive as they are ready, possibly out of order;
        match them by ``request_id``. ``options`` apply to requests that carry none.
        ``timeout`` bounds the whole stream (default: no deadline); streams are not retried,
        because the requests already consumed cannot be replayed. Stopping the iteration
        early cancels the call.
        """
        call = self._stub.StreamAnalyze(
            stream_requests(requests, options), timeout=timeout, metadata=self._metadata
        )
        try:
            for response in call:
                yield stream_entry_from_proto(response)
        except grpc.RpcError as err:
            raise FashionServeError.from_rpc_error(err) from None
        finally:
            call.cancel()  # a no-op once the call has finished

    def get_taxonomy(self, *, timeout: float | None = None) -> TaxonomyInfo:
        """The taxonomy the served models decode with."""
        response = self._unary(
            self._stub.GetTaxonomy, pb.GetTaxonomyRequest(), timeout, pb.GetTaxonomyResponse
        )
        return taxonomy_from_proto(response)

    def search_similar(
        self,
        query: ImageInput | Sequence[float],
        k: int = 10,
        *,
        garment_index: int | None = None,
        box: Box | None = None,
        filter: Mapping[str, str] | None = None,
        include_metadata: bool = False,
        timeout: float | None = None,
    ) -> SearchResult:
        """Visual search: the ``k`` catalog products most like a garment, best first.

        ``query`` is an image (bytes or a path: its garment ``garment_index``, or the one
        overlapping ``box`` most, else the highest-scored) or an embedding (floats, of
        ``limits.embedding_dimension``). ``filter`` keeps entries whose metadata equal
        every value (``{"category": "top"}``); ``include_metadata`` returns it.
        """
        request = search_request(
            query,
            k,
            garment_index=garment_index,
            box=box,
            filter=filter,
            include_metadata=include_metadata,
        )
        response = self._unary(self._stub.SearchSimilar, request, timeout, pb.SearchSimilarResponse)
        return search_result_from_proto(response)

    def get_serving_info(self, *, timeout: float | None = None) -> ServingInfo:
        """The served model versions, taxonomy identity and the limits callers must respect."""
        response = self._unary(
            self._stub.GetServingInfo,
            pb.GetServingInfoRequest(),
            timeout,
            pb.GetServingInfoResponse,
        )
        return serving_info_from_proto(response)

    # ------------------------------------------------------------------------ helpers
    def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout: float | None,
        response_type: type[T],
    ) -> T:
        """Call ``method`` with retries (:mod:`fashionserve.clients.retry`) inside one overall deadline."""
        state = self.retry_policy.start(timeout if timeout is not None else self.timeout)
        while True:
            try:
                response: T = method(request, timeout=state.remaining(), metadata=self._metadata)
                return response
            except grpc.RpcError as err:
                failure = FashionServeError.from_rpc_error(err, state.attempts)
                delay = state.next_delay(failure.code, failure.retry_delay)
                if delay is None:
                    raise failure from None
                time.sleep(delay)
