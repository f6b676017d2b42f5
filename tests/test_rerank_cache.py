"""The rerank cache: float16 copies of the catalog's vectors that a reranking index reads its
candidates from, trusted only while they mirror the catalog."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipdex.search.catalog.database import NewItem
from clipdex.search.index.import_vectors import import_vectors
from clipdex.search.index.rerank_cache import CACHE_FILE, HEADER_BYTES
from clipdex.search.index.vectors import IndexSpec
from clipdex.search.library import Library
from test_import_vectors import clip_retrieval_folder
from test_index_types import clustered, fill

RERANKING = IndexSpec("ivf", "IVF8,PQ8x4", {"nprobe": 8}, pinned=True, rerank=10)


class CatalogReads:
    """Counts the catalog's reads of vectors by id (the rerank's slow path)."""

    def __init__(self, library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[int] = []
        catalog = library.catalog
        original = catalog.iter_vectors

        def counted(ids: Any = None, *args: Any, **kwargs: Any) -> Any:
            if ids is not None:
                self.ids.extend(int(i) for i in ids)
            return original(ids, *args, **kwargs)

        monkeypatch.setattr(catalog, "iter_vectors", counted)


def reranked_library(library: Library) -> tuple[np.ndarray, np.ndarray]:
    ids, vectors = fill(library)
    library.rebuild_vectors(RERANKING)
    return ids, vectors


def scores_of(library: Library, query: np.ndarray) -> dict[int, float]:
    return {hit.id: hit.score for hit in library.search(vector=query, k=10)}


def header(library: Library) -> dict[str, Any]:
    return json.loads((library.path / CACHE_FILE).read_bytes()[:HEADER_BYTES])


def test_searches_read_their_candidates_from_the_cache(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors = reranked_library(library)
    assert header(library)["generation"] == library.catalog.generation()
    reads = CatalogReads(library, monkeypatch)
    query = clustered(1, seed=7)[0]
    found = scores_of(library, query)
    assert len(found) == 10 and reads.ids == []
    halves = vectors.astype(np.float16).astype(np.float32)
    rows = np.searchsorted(ids, list(found))
    np.testing.assert_allclose(list(found.values()), halves[rows] @ query, atol=1e-5)


def test_commits_are_mirrored_new_items_and_vectors_changed_under_their_id(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors = reranked_library(library)
    fresh = clustered(5, seed=11)
    changed = clustered(1, seed=12)[0]
    with library.writer() as writer:
        new_ids = writer.commit(items=[NewItem("text", vector, text=f"new {i}", source="/new.txt", source_key=str(i))
                                       for i, vector in enumerate(fresh)])
        writer.commit(items=[NewItem("text", changed, id=int(ids[0]), text="changed", source="/corpus.txt", source_key="0")])
    cache = library.store.rerank_cache
    assert header(library)["generation"] == library.catalog.generation()
    found_ids, found, missing = cache.read([*new_ids, int(ids[0])])
    assert missing.size == 0
    expected = np.vstack([fresh, changed[None, :]]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(found[np.argsort(np.argsort([*new_ids, int(ids[0])]))], expected)
    reads = CatalogReads(library, monkeypatch)
    assert scores_of(library, changed)[int(ids[0])] == pytest.approx(1.0, abs=1e-3) and reads.ids == []


def test_a_commit_the_cache_missed_leaves_it_untrusted_until_the_writer_writes_it_again(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit made past the store (as by a writer killed before it mirrored its commit): the
    rows may be stale, so the catalog answers, exactly, until the next commit rewrites the cache."""
    ids, vectors = reranked_library(library)
    changed = clustered(1, seed=13)[0]
    library.catalog.commit_batch([NewItem("text", changed, id=int(ids[1]), text="changed", source="/corpus.txt", source_key="1")], [], [])
    reads = CatalogReads(library, monkeypatch)
    found = scores_of(library, changed)
    assert found[int(ids[1])] == pytest.approx(float(changed @ changed), abs=1e-6)  # the catalog's float32, not a stale row
    assert reads.ids
    with library.writer() as writer:  # the next commit finds the cache behind and writes it again
        writer.commit(items=[NewItem("text", clustered(1, seed=14)[0], text="more", source="/more.txt", source_key="0")])
    assert header(library)["generation"] == library.catalog.generation()
    reads.ids.clear()
    assert scores_of(library, changed)[int(ids[1])] == pytest.approx(1.0, abs=1e-3) and reads.ids == []


def test_rows_torn_or_missing_are_read_from_the_catalog(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors = reranked_library(library)
    cache = library.store.rerank_cache
    torn, hole = int(ids[2]), int(ids[3])
    with open(library.path / CACHE_FILE, "r+b") as handle:  # half a row, as a crash mid-write leaves it; and a hole
        handle.seek(HEADER_BYTES + torn * cache.row_bytes + cache.row_bytes // 2)
        handle.write(bytes(cache.row_bytes // 2))
        handle.seek(HEADER_BYTES + hole * cache.row_bytes)
        handle.write(bytes(cache.row_bytes))
    found_ids, _, missing = cache.read(ids[:10])
    assert sorted(missing.tolist()) == sorted([torn, hole]) and len(found_ids) == 8
    reads = CatalogReads(library, monkeypatch)
    assert scores_of(library, vectors[2])[torn] == pytest.approx(float(vectors[2] @ vectors[2]), abs=1e-6)
    assert torn in reads.ids


@pytest.mark.parametrize("change", ["restored catalog", "another library", "another dimension"])
def test_a_cache_of_another_history_is_not_trusted(library: Library, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    reranked_library(library)
    path = library.path / CACHE_FILE
    recorded = header(library)
    recorded.update({"restored catalog": {"generation": recorded["generation"] + 5},  # ids past a backup may be given again
                     "another library": {"library": recorded["library"] + 1},
                     "another dimension": {"dim": recorded["dim"] * 2}}[change])
    with open(path, "r+b") as handle:
        handle.write(json.dumps(recorded).encode().ljust(HEADER_BYTES, b" "))
    reads = CatalogReads(library, monkeypatch)
    query = clustered(1, seed=8)[0]
    scores_of(library, query)
    assert reads.ids  # every candidate from the catalog
    library.rebuild_vectors()  # the writer writes it again
    assert header(library)["generation"] == library.catalog.generation()


def test_an_index_that_does_not_rerank_has_no_cache(library: Library) -> None:
    reranked_library(library)
    assert (library.path / CACHE_FILE).exists()
    library.rebuild_vectors(IndexSpec("ivf", "IVF8,Flat", pinned=True))
    assert not (library.path / CACHE_FILE).exists()
    with library.writer() as writer:
        writer.commit(items=[NewItem("text", clustered(1, seed=9)[0], text="x", source="/x.txt", source_key="0")])
    assert not (library.path / CACHE_FILE).exists()


def test_a_read_only_reader_never_writes_the_cache(library: Library, tiny_model: Any) -> None:
    reranked_library(library)
    path = library.path / CACHE_FILE
    before = path.read_bytes()
    reader = Library.open(library.path, device="cpu")
    try:
        found = {hit.id for hit in reader.search(vector=clustered(1, seed=10)[0], k=10)}
        assert found == set(scores_of(library, clustered(1, seed=10)[0]))
    finally:
        reader.close()
    assert path.read_bytes() == before


def test_an_import_writes_the_cache_as_its_rows_go_in(other_library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.index.rerank_cache import RerankCache

    fills: list[int] = []
    original = RerankCache.fill
    monkeypatch.setattr(RerankCache, "fill", lambda self, catalog, generation: (fills.append(generation), original(self, catalog, generation)))
    folder = clip_retrieval_folder(tmp_path / "e", count=500)
    import_vectors(other_library, [folder], memory_budget=10_000)
    assert other_library.vectors.spec.reranks_codes
    assert len(fills) == 1  # the empty library's header only: the rows came with the import
    ids, vectors = other_library.catalog.all_vectors()
    found_ids, found, missing = other_library.store.rerank_cache.read(ids)
    assert missing.size == 0 and header(other_library)["generation"] == other_library.catalog.generation()
    np.testing.assert_array_equal(found, vectors.astype(np.float16).astype(np.float32))
    # importing the files again with other vectors replaces the items under their ids: the cache is written again
    np.save(folder / "img_emb" / "img_emb_0.npy", np.load(folder / "img_emb" / "img_emb_0.npy")[::-1].copy())
    import_vectors(other_library, [folder], memory_budget=10_000)
    ids, vectors = other_library.catalog.all_vectors()
    found_ids, found, missing = other_library.store.rerank_cache.read(ids)
    assert missing.size == 0 and len(fills) == 2
    np.testing.assert_array_equal(found, vectors.astype(np.float16).astype(np.float32))


@pytest.fixture
def other_library(tmp_path: Path, tiny_model: Any) -> Library:
    lib = Library.open(tmp_path / "other-library", model=tiny_model, create=True, device="cpu")
    yield lib
    lib.close()


def test_a_full_disk_costs_the_cache_not_the_commit(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    reranked_library(library)

    def full(*args: Any) -> int:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr("clipdex.search.index.rerank_cache.os.pwrite", full)
    with library.writer() as writer:
        new = writer.commit(items=[NewItem("text", clustered(1, seed=15)[0], text="y", source="/y.txt", source_key="0")])
    assert library.catalog.get_items(new) and not (library.path / CACHE_FILE).exists()
    assert new[0] in scores_of(library, clustered(1, seed=15)[0])
