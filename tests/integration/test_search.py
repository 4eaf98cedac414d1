"""Visual search end to end: a catalog embedded through real Triton (the oracle models:
an embedding is the garment's mean colour), published, served by a real gateway process,
searched over gRPC; the index's binding to the served embedder version."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ORACLE_DIM, Gateway, Oracle, error_reason, start_gateway
from grpc_health.v1 import health_pb2

from fashionserve import search_index
from fashionserve.catalog import build_catalog
from fashionserve.clients import FashionClient, FashionServeError
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

# One product per oracle colour, each alone on a shop image; categories of our own.
PRODUCTS = {0: ("red-coat", "coat"), 1: ("green-top", "top"), 2: ("blue-top", "top")}


def _scene(oracle: Oracle, colour: int) -> bytes:
    return oracle.scene(320, 240, [((60, 40, 260, 200), colour)])


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory, own_triton: TritonServer, oracle: Oracle
) -> Path:
    """A repository holding search index version 1, built from a CSV manifest."""
    root = tmp_path_factory.mktemp("catalog")
    rows = []
    for colour, (product, category) in PRODUCTS.items():
        image = root / f"{product}.jpg"
        image.write_bytes(_scene(oracle, colour))
        rows.append(
            {"product_id": product, "image": image.name, "category": category, "shop": "s1"}
        )
    manifest = root / "catalog.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    repo = root / "repository"
    build_catalog(manifest, repo, triton=own_triton.grpc_url, echo=lambda _: None)
    return repo


@pytest.fixture(scope="module")
def search_gw(
    own_triton: TritonServer, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start_gateway(
        own_triton.grpc_url,
        tmp_path_factory.mktemp("search-gw"),
        search_index_dir=str(search_index.index_root(repository)),
        search_index_check_seconds=0.2,
        max_search_k=5,
    )
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway
    finally:
        gateway.stop()


def _client(gw: Gateway) -> FashionClient:
    return FashionClient(gw.address, gw.key, timeout=30)


def test_the_catalog_is_published_with_the_served_embedder(repository: Path) -> None:
    root = search_index.index_root(repository)
    manifest = search_index.read_manifest(root / "1")
    assert manifest.count == len(PRODUCTS)
    assert manifest.dimension == ORACLE_DIM
    assert manifest.kind == "flat"
    assert manifest.embedder.version == "1" and len(manifest.embedder.artifact_sha256) == 64
    assert manifest.metadata_columns == ("category", "shop")


def test_an_image_finds_its_product_first(search_gw: Gateway, oracle: Oracle) -> None:
    with _client(search_gw) as client:
        for colour, (product, _) in PRODUCTS.items():
            result = client.search_similar(_scene(oracle, colour), k=3, include_metadata=True)
            assert result.matches[0].product_id == product
            assert result.matches[0].score == pytest.approx(1.0, abs=1e-3)
            assert [m.score for m in result.matches] == sorted(
                (m.score for m in result.matches), reverse=True
            )
            assert result.query_garment is not None and result.query_garment.embedding is None
        assert result.index.version == 1 and result.index.size == len(PRODUCTS)


def test_filters_and_metadata(search_gw: Gateway, oracle: Oracle) -> None:
    with _client(search_gw) as client:
        red = _scene(oracle, 0)
        tops = client.search_similar(red, k=5, filter={"category": "top"}, include_metadata=True)
        assert {m.product_id for m in tops.matches} == {"green-top", "blue-top"}
        assert all(m.metadata == {"category": "top", "shop": "s1"} for m in tops.matches)
        bare = client.search_similar(red, k=5)
        assert len(bare.matches) == len(PRODUCTS) and bare.matches[0].metadata == {}
        assert client.search_similar(red, k=5, filter={"category": "shoe"}).matches == ()


def test_an_embedding_query(search_gw: Gateway, oracle: Oracle) -> None:
    with _client(search_gw) as client:
        from fashionserve.clients import AnalyzeOptions

        garment = client.analyze(_scene(oracle, 2), AnalyzeOptions(include_embeddings=True))
        assert garment.garments[0].embedding is not None
        result = client.search_similar(list(garment.garments[0].embedding), k=1)
        assert [m.product_id for m in result.matches] == ["blue-top"]
        assert result.query_garment is None


def test_serving_info_reports_the_index(search_gw: Gateway) -> None:
    with _client(search_gw) as client:
        info = client.get_serving_info()
    assert info.search_index is not None
    assert (info.search_index.version, info.search_index.size) == (1, len(PRODUCTS))
    assert info.search_index.metadata_keys == ("category", "shop")
    assert info.limits.max_search_k == 5


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (pb.SearchSimilarRequest(k=0, embedding=pb.EmbeddingQuery(values=[1.0] * ORACLE_DIM)), "INVALID_K"),
        (pb.SearchSimilarRequest(k=6, embedding=pb.EmbeddingQuery(values=[1.0] * ORACLE_DIM)), "INVALID_K"),
        (pb.SearchSimilarRequest(k=3), "NO_QUERY"),
        (pb.SearchSimilarRequest(k=3, embedding=pb.EmbeddingQuery(values=[1.0] * 5)), "WRONG_EMBEDDING_DIMENSION"),
        (pb.SearchSimilarRequest(k=3, embedding=pb.EmbeddingQuery(values=[0.0] * ORACLE_DIM)), "BAD_EMBEDDING"),
        (
            pb.SearchSimilarRequest(
                k=3, embedding=pb.EmbeddingQuery(values=[1.0] * ORACLE_DIM), filter={"brand": "x"}
            ),
            "UNKNOWN_FILTER_KEY",
        ),
    ],
)  # fmt: skip
def test_bad_queries_are_invalid_argument(
    search_gw: Gateway, request_: pb.SearchSimilarRequest, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        search_gw.stub.SearchSimilar(request_, metadata=search_gw.auth, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == reason


def test_an_unknown_garment_index_is_invalid_argument(search_gw: Gateway, oracle: Oracle) -> None:
    with _client(search_gw) as client, pytest.raises(FashionServeError) as caught:
        client.search_similar(_scene(oracle, 1), k=3, garment_index=4)
    assert caught.value.code_name == "INVALID_ARGUMENT"
    assert caught.value.reason == "GARMENT_NOT_FOUND"


def _wait_for(check: Callable[[], None], timeout: float = 15.0) -> None:
    """Retry ``check`` until it passes: the gateway re-reads the index folder on its own clock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except (AssertionError, FashionServeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_an_index_of_another_embedder_version_is_refused(
    search_gw: Gateway, repository: Path, oracle: Oracle
) -> None:
    """A newer index built with another embedder replaces the served one without a
    restart, and searches fail naming both versions until the good one is pinned."""
    root = search_index.index_root(repository)
    loaded = search_index.SearchIndex.load(root / "1")
    vectors = loaded.index.reconstruct_n(0, loaded.size)
    search_index.publish(
        root, vectors, list(loaded.product_ids), {}, search_index.EmbedderRef("7", "ab" * 32)
    )
    image = _scene(oracle, 1)
    with _client(search_gw) as client:

        def refused() -> None:
            try:
                client.search_similar(image, k=1)
            except FashionServeError as err:
                assert err.code_name == "FAILED_PRECONDITION"
                assert err.reason == "SEARCH_INDEX_EMBEDDER_MISMATCH"
                assert err.metadata["indexEmbedderVersion"] == "7"
                assert err.metadata["servedEmbedderVersion"] == "1"
                assert "version 7" in err.message and "version 1" in err.message
            else:
                raise AssertionError("a search with the stale index succeeded")

        _wait_for(refused)
        assert "rebuild it" in search_gw.log.read_text()
        search_index.pin(root, 1)

        def served_again() -> None:
            assert client.search_similar(image, k=1).matches[0].product_id == "green-top"

        _wait_for(served_again)
