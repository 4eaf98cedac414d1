"""The asyncio client: :class:`AsyncFashionClient`, the same API as the sync one, awaited.

Example::

    from fashionserve.clients import AsyncFashionClient

    async with AsyncFashionClient("localhost:50051", api_key="dev.abc...") as client:
        result = await client.analyze("photo.jpg")
        async for entry in client.stream_analyze((str(i), p) for i, p in enumerate(paths)):
            print(entry.request_id, entry.result)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

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


class AsyncFashionClient:
    """An asyncio client of ``fashion.v1.FashionAnalysisService`` (grpc.aio).

    Takes the same arguments as :class:`~clients.sync_client.FashionClient` and returns the
    same types; create it inside the event loop that uses it. Every failed call raises
    :class:`~clients.errors.FashionServeError`.
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
            grpc.aio.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
        self._stub = pb_grpc.FashionAnalysisServiceStub(self._channel)

    # ---------------------------------------------------------------------- lifecycle
    async def close(self) -> None:
        """Close the channel; calls in progress are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncFashionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------------------- calls
    async def analyze(
        self,
        image: ImageInput,
        options: AnalyzeOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> ImageResult:
        """Find the garments in one image (encoded bytes or a file path)."""
        response = await self._unary(
            self._stub.Analyze, analyze_request(image, options), timeout, pb.AnalyzeResponse
        )
        return image_result_from_proto(response.result)

    async def batch_analyze(
        self,
        images: Sequence[ImageInput],
        options: AnalyzeOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[BatchEntry]:
        """Analyse several images in one call: one entry per image, in order."""
        response = await self._unary(
            self._stub.BatchAnalyze,
            batch_request(images, options),
            timeout,
            pb.BatchAnalyzeResponse,
        )
        return [batch_entry_from_proto(e) for e in response.entries]

    async def stream_analyze(
        self,
        requests: Iterable[StreamItem] | AsyncIterable[StreamItem],
        options: AnalyzeOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEntry]:
        """Stream images in, results out; see :meth:`FashionClient.stream_analyze`.

        ``requests`` may be a plain or an async iterable; it is read as the server asks
        for more. Leaving the ``async for`` early cancels the call.
        """
        source: Any
        if isinstance(requests, AsyncIterable):
            source = _async_stream_requests(requests, options)
        else:
            source = stream_requests(requests, options)
        call = self._stub.StreamAnalyze(source, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield stream_entry_from_proto(response)
        except grpc.aio.AioRpcError as err:
            raise FashionServeError.from_rpc_error(err) from None
        finally:
            call.cancel()  # a no-op once the call has finished

    async def get_taxonomy(self, *, timeout: float | None = None) -> TaxonomyInfo:
        """The taxonomy the served models decode with."""
        response = await self._unary(
            self._stub.GetTaxonomy, pb.GetTaxonomyRequest(), timeout, pb.GetTaxonomyResponse
        )
        return taxonomy_from_proto(response)

    async def search_similar(
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
        response = await self._unary(
            self._stub.SearchSimilar, request, timeout, pb.SearchSimilarResponse
        )
        return search_result_from_proto(response)

    async def get_serving_info(self, *, timeout: float | None = None) -> ServingInfo:
        """The served model versions, taxonomy identity and the limits callers must respect."""
        response = await self._unary(
            self._stub.GetServingInfo,
            pb.GetServingInfoRequest(),
            timeout,
            pb.GetServingInfoResponse,
        )
        return serving_info_from_proto(response)

    # ------------------------------------------------------------------------ helpers
    async def _unary(
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
                response: T = await method(
                    request, timeout=state.remaining(), metadata=self._metadata
                )
                return response
            except grpc.aio.AioRpcError as err:
                failure = FashionServeError.from_rpc_error(err, state.attempts)
                delay = state.next_delay(failure.code, failure.retry_delay)
                if delay is None:
                    raise failure from None
                await asyncio.sleep(delay)


async def _async_stream_requests(
    items: AsyncIterable[StreamItem], options: AnalyzeOptions | None
) -> AsyncIterator[pb.StreamAnalyzeRequest]:
    async for item in items:
        for request in stream_requests((item,), options):
            yield request
