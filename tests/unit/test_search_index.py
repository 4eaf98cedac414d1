"""The search index format: publish, load, search, filters, and its embedder binding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fashionserve import search_index
from fashionserve.search_index import EmbedderRef, SearchIndex, SearchIndexError, SearchInputError

EMBEDDER = EmbedderRef("3", "c" * 64)


def _catalog(n: int = 200, d: int = 16) -> tuple[np.ndarray, list[str], dict[str, list[str]]]:
    vectors = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    ids = [f"p{i}" for i in range(n)]
    return vectors, ids, {"category": ["top" if i % 2 else "bottom" for i in range(n)]}


def test_published_versions_are_numbered_and_served_newest_or_pinned(tmp_path: Path) -> None:
    root = search_index.index_root(tmp_path)
    vectors, ids, meta = _catalog()
    first = search_index.publish(root, vectors, ids, meta, EMBEDDER)
    second = search_index.publish(root, vectors[:10], ids[:10], {}, EMBEDDER)
    assert (first.name, second.name) == ("1", "2")
    assert root == tmp_path / "embedder" / "search_index"
    assert search_index.served_version(root) == 2
    search_index.pin(root, 1)
    assert search_index.served_version(root) == 1
    with pytest.raises(SearchIndexError):
        search_index.pin(root, 9)
    manifest = search_index.read_manifest(first)
    assert (manifest.count, manifest.dimension, manifest.kind) == (200, 16, "flat")
    assert manifest.embedder == EMBEDDER
    assert manifest.metadata_columns == ("category",)
    assert not list(root.glob(".staging-*"))


def test_each_vector_finds_itself_first(tmp_path: Path) -> None:
    vectors, ids, meta = _catalog()
    index = SearchIndex.load(search_index.publish(tmp_path, vectors, ids, meta, EMBEDDER))
    found = index.search(vectors[:20] * 3.0, k=5)  # any length: queries are normalised
    assert [m[0].product_id for m in found] == ids[:20]
    assert all(m[0].score == pytest.approx(1.0, abs=1e-5) for m in found)


def test_a_large_catalog_gets_an_approximate_index(tmp_path: Path) -> None:
    assert search_index.choose_kind(search_index.EXACT_MAX_VECTORS - 1) == "flat"
    assert search_index.choose_kind(search_index.EXACT_MAX_VECTORS) == "hnsw"
    vectors, ids, meta = _catalog(500)
    path = search_index.publish(tmp_path, vectors, ids, meta, EMBEDDER, kind="hnsw")
    index = SearchIndex.load(path)
    assert index.manifest.params["m"] == search_index.HNSW_M
    assert index.search(vectors[7], k=1)[0][0].product_id == "p7"


def test_a_filter_keeps_only_equal_metadata(tmp_path: Path) -> None:
    vectors, ids, meta = _catalog()
    index = SearchIndex.load(search_index.publish(tmp_path, vectors, ids, meta, EMBEDDER))
    (tops,) = index.search(vectors[0], k=10, where={"category": "top"}, include_metadata=True)
    assert len(tops) == 10 and all(m.metadata == {"category": "top"} for m in tops)
    assert index.search(vectors[0], k=10, where={"category": "hat"}) == [[]]
    with pytest.raises(SearchInputError) as caught:
        index.search(vectors[0], k=10, where={"colour": "red"})
    assert caught.value.reason == "UNKNOWN_FILTER_KEY"


def test_bad_queries_are_refused(tmp_path: Path) -> None:
    vectors, ids, meta = _catalog()
    index = SearchIndex.load(search_index.publish(tmp_path, vectors, ids, meta, EMBEDDER))
    for query, reason in (
        (np.ones(15), "WRONG_EMBEDDING_DIMENSION"),
        (np.zeros(16), "BAD_EMBEDDING"),
        (np.full(16, np.nan), "BAD_EMBEDDING"),
    ):
        with pytest.raises(SearchInputError) as caught:
            index.search(query, k=3)
        assert caught.value.reason == reason


def test_a_tampered_index_file_is_refused(tmp_path: Path) -> None:
    vectors, ids, meta = _catalog()
    path = search_index.publish(tmp_path, vectors, ids, meta, EMBEDDER)
    with (path / search_index.INDEX_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(SearchIndexError, match="sha256"):
        SearchIndex.load(path)


def test_an_index_answers_only_for_its_embedder() -> None:
    assert EMBEDDER.matches(EmbedderRef("3", "c" * 64))
    assert EMBEDDER.matches(EmbedderRef("3", ""))  # a served hash unknown: the version decides
    assert not EMBEDDER.matches(EmbedderRef("4", "c" * 64))
    assert not EMBEDDER.matches(EmbedderRef("3", "d" * 64))  # same number, other weights


def test_an_inconsistent_catalog_is_refused(tmp_path: Path) -> None:
    vectors, ids, meta = _catalog()
    with pytest.raises(SearchInputError):
        search_index.publish(tmp_path, vectors, ids[:-1], meta, EMBEDDER)
    with pytest.raises(SearchInputError):
        search_index.publish(tmp_path, vectors, ids, {"product_id": ids}, EMBEDDER)
    assert not (tmp_path / "1").exists()


def test_serving_another_embedder_says_the_index_must_be_rebuilt(tmp_path: Path) -> None:
    assert search_index.rebuild_notice(tmp_path, "4") is None  # no index: nothing to say
    vectors, ids, meta = _catalog()
    search_index.publish(search_index.index_root(tmp_path), vectors, ids, meta, EMBEDDER)
    assert search_index.rebuild_notice(tmp_path, "3") is None
    notice = search_index.rebuild_notice(tmp_path, "4")
    assert notice is not None
    assert "embedder version 3" in notice and "rebuilt with embedder version 4" in notice
