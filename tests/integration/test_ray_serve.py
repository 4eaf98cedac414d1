"""The Ray Serve reference of the benchmark does fashionserve's work (issue 16 item 3).

Against the trained demo models: the gateway in front of Triton, and the reference
(``fashionserve loadtest ray-server``, started as the benchmark starts it) serving the
same repository through Ray Serve's gRPC proxy, find the same garments with the same top
categories in small images and in phone photos (EXIF orientations, 12 MP JPEGs, WebP).
Skipped where Ray is not installed: ``make test`` stays free of it, ``make bench``
installs the ``peers`` extra and runs this first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Gateway, start_gateway

from fashionserve.loadtest.bench.runs import check_equal_work
from fashionserve.loadtest.bench.stack import Stack, ray_server
from fashionserve.loadtest.images import phone_photos, synthetic_images
from fashionserve.loadtest.targets import TargetSpec
from fashionserve.model_repository.build import BuiltRepository
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc
from fashionserve.triton import TritonServer

# Nothing imported above needs Ray: the reference runs as its own process.
pytest.importorskip("ray.serve", reason="the Ray Serve reference needs `pip install '.[peers]'`")

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway taking phone photos (the tests' default limits are small)."""
    gw = start_gateway(
        triton.grpc_url,
        tmp_path_factory.mktemp("ray-gateway"),
        max_image_bytes=20 * MIB,
        max_image_pixels=50_000_000,
        max_message_bytes=64 * MIB,
        max_batch_size=8,
        max_queue_delay_microseconds=0,
    )
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def reference(
    gateway: Gateway, trained_repository: BuiltRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The Ray Serve reference's address, started with the gateway's batching."""
    logs = tmp_path_factory.mktemp("ray-logs")
    stack = Stack(
        gateway=gateway.address,
        api_key=gateway.key,
        triton="",
        pids={},
        gateway_config=gateway.log.parent / "gateway.yaml",  # its batching: 8, no wait
        checkpoints=None,
        repository=Path(trained_repository.path),
    )
    with ray_server(stack, logs, cores=2, replicas=1) as (address, _pid):
        yield address


def test_ray_serve_finds_the_same_garments_and_top_categories(gateway: Gateway, reference: str):
    small, photos = synthetic_images(4), phone_photos(4)
    found = sum(len(gateway.analyze(data).garments) for data in small)
    assert found > 0  # two empty answers would agree too
    check_equal_work(
        TargetSpec("gateway", gateway.address, api_key=gateway.key),
        TargetSpec("ray", reference),
        small + photos,
    )


def test_a_bad_image_is_refused_as_invalid_through_the_proxy(reference: str):
    with grpc.insecure_channel(reference) as channel:
        stub = pb_grpc.FashionAnalysisServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Analyze(pb.AnalyzeRequest(image=pb.Image(data=b"not an image")), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NOT_AN_IMAGE" in (caught.value.details() or "")
