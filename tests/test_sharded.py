"""Big libraries in bounded memory: inverted files built in shards spilled to disk, the import's
spool when the index falls behind, and `optimize` streaming the catalog instead of loading it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
import pytest

import clipdex.search.index.choice as choice
import clipdex.search.index.import_vectors as import_module
import clipdex.search.index.optimize as optimize_module
import clipdex.search.index.sharded as sharded
from clipdex.search.catalog.database import NewItem
from clipdex.search.index.choice import build_index_from
from clipdex.search.index.corpus import ArrayCorpus, CatalogCorpus
from clipdex.search.index.import_vectors import import_vectors
from clipdex.search.index.optimize import exact_evaluation, exact_evaluations, optimize_library
from clipdex.search.index.vectors import INDEX_FILE, IndexSpec, VectorIndex
from clipdex.search.library import Library
from test_import_vectors import clip_retrieval_folder, unit
from test_query_kinds import clustered

DIM = 32


class Source:
    """A catalog's `ids` and `iter_vectors`, over arrays, in chunks of `chunk` rows."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, chunk: int = 250) -> None:
        self._ids, self._vectors, self._chunk = ids, vectors, chunk

    def ids(self, kind: str = "any") -> np.ndarray:
        return self._ids

    def iter_vectors(self, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = np.arange(len(self._ids)) if ids is None else np.searchsorted(self._ids, np.asarray(sorted(ids), dtype=np.int64))
        for start in range(0, len(rows), self._chunk):
            part = rows[start : start + self._chunk]
            yield self._ids[part], self._vectors[part]


def saved_bytes(index: VectorIndex, folder: Path) -> bytes:
    folder.mkdir()
    index.save(folder, 1)
    return (folder / INDEX_FILE).read_bytes()


@pytest.mark.parametrize("factory", ["IVF16,SQ8", "IVF16,PQ8x4", "IVF16,Flat", "IVF16,PQ16x4fsr"])
def test_an_index_built_in_shards_is_the_one_built_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str) -> None:
    ids, vectors = np.arange(2000, dtype=np.int64) * 2 + 5, clustered(2000)
    source = Source(ids, vectors)
    in_memory = build_index_from(DIM, IndexSpec("ivf", factory), source, resolve=False)
    spills: list[int] = []
    original = sharded.SpilledShard.__init__
    monkeypatch.setattr(sharded.SpilledShard, "__init__", lambda self, *args: spills.append(1) or original(self, *args))
    monkeypatch.setattr(sharded, "SHARD_BYTES", 3000)  # a shard for each chunk of 250 vectors
    scratch = tmp_path / "library"
    scratch.mkdir()
    built = build_index_from(DIM, IndexSpec("ivf", factory), source, resolve=False, scratch=scratch)
    # every IVF but fast-scan codes is mapped; FAISS reads block lists into memory, when first used
    assert len(spills) >= 4 and built.mapped is not built.fast_scan and built.backing is not None
    assert list(scratch.iterdir()) == []  # shards and the merged file's name gone; the map and `backing` hold it
    assert saved_bytes(built, tmp_path / "a") == saved_bytes(in_memory, tmp_path / "b")  # byte for byte
    assert (built._index is None) is built.fast_scan and built.ntotal == 2000  # saved without reading it
    queries = clustered(20, seed=3)
    for breadth in (1, 4, 16):
        assert np.array_equal(built.search_with(queries, 10, breadth)[1], in_memory.search_with(queries, 10, breadth)[1])
    built.add(np.array([1], np.int64), clustered(1, seed=4))  # a write copies the map into memory
    assert not built.mapped and built.backing is None and built.ntotal == 2001
    assert built.search_with(clustered(1, seed=4), 1, 16)[1][0, 0] == 1


def test_many_lists_are_trained_and_filled_in_two_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """From `TWO_LEVEL_MIN_LISTS` lists on, the centroids are trained in two levels and a vector's
    list is found through groups of centroids: nearly always the nearest centroid's list, and a
    search as good as over one k-means's lists, filled exactly."""
    import clipdex.search.index.vectors as vectors_module

    ids, vectors = np.arange(4000, dtype=np.int64) + 1, clustered(4000)
    exact = build_index_from(DIM, IndexSpec("ivf", "IVF64,Flat"), Source(ids, vectors), resolve=False)
    monkeypatch.setattr(vectors_module, "TWO_LEVEL_MIN_LISTS", 64)
    grouped = build_index_from(DIM, IndexSpec("ivf", "IVF64,Flat"), Source(ids, vectors), resolve=False)
    assert grouped._groups is not None and exact._groups is None and grouped.ntotal == 4000
    centroids = [faiss.extract_index_ivf(index.index).quantizer.reconstruct_n(0, 64) for index in (exact, grouped)]
    assert not np.allclose(centroids[0], centroids[1])  # trained otherwise
    assert np.allclose(np.linalg.norm(centroids[1], axis=1), 1.0, atol=1e-4)  # spherical, as FAISS's for inner products

    def lists_of(index: VectorIndex) -> np.ndarray:
        ivf = faiss.extract_index_ivf(index.index)
        found = np.zeros(4001, np.int64)
        for number in range(ivf.nlist):
            size = ivf.invlists.list_size(number)
            if size:
                found[faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size)] = number
        return found[1:]

    nearest = np.argmax(vectors @ centroids[1].T, axis=1)
    assert np.mean(lists_of(grouped) == nearest) >= 0.97
    queries = clustered(50, seed=5)
    truth = exact.search_with(queries, 10, 64)[1]
    for breadth in (8, 64):
        found = grouped.search_with(queries, 10, breadth)[1]
        recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found, truth)])
        assert recall >= (0.99 if breadth == 64 else 0.8)


def lists_content(index: VectorIndex) -> list[tuple[list[int], bytes]]:
    """Each inverted list's ids and codes (fast-scan codes unpacked: their blocks' padding is no content)."""
    from clipdex.search.index.fastscan import Packer, unpacked_codes

    ivf = faiss.extract_index_ivf(index.index)
    packer = Packer(ivf)
    return [(faiss.rev_swig_ptr(ivf.invlists.get_ids(j), ivf.invlists.list_size(j)).tolist() if ivf.invlists.list_size(j) else [],
             unpacked_codes(ivf, packer, j)) for j in range(ivf.nlist)]


def test_fast_scan_codes_added_to_lists_found_in_two_levels_are_faiss_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS's own add of fast-scan codes assigns every vector its list by comparing it with every
    centroid; given the lists (the two-level assignment), clipdex encodes and packs the codes itself,
    a list at a time and onto partly filled blocks: the lists hold what FAISS's add would have put there."""
    import clipdex.search.index.vectors as vectors_module
    from clipdex.search.index.fastscan import add_assigned

    ids, vectors = np.arange(3000, dtype=np.int64) * 3 + 1, clustered(3000)
    spec = IndexSpec("ivf", "IVF64,PQ16x4fsr")
    faiss_added = build_index_from(DIM, spec, Source(ids, vectors), resolve=False)
    ours = VectorIndex(DIM, spec, faiss.deserialize_index(faiss.serialize_index(faiss_added.index)))
    ivf = faiss.extract_index_ivf(ours.index)
    ivf.reset()
    for start, stop in ((0, 77), (77, 1500), (1500, 3000)):  # the later chunks land on blocks left partly full
        chunk = np.ascontiguousarray(vectors[start:stop])
        add_assigned(ivf, ids[start:stop], chunk, ivf.quantizer.assign(chunk, 1).ravel().astype(np.int64))
    assert ours.ntotal == 3000 and lists_content(ours) == lists_content(faiss_added)
    queries = clustered(30, seed=6)
    assert np.array_equal(ours.search_with(queries, 10, 8)[1], faiss_added.search_with(queries, 10, 8)[1])
    monkeypatch.setattr(vectors_module, "TWO_LEVEL_MIN_LISTS", 64)  # the build's own adds go through the groups
    grouped = build_index_from(DIM, spec, Source(ids, vectors), resolve=False)
    assert grouped._groups is not None and grouped.ntotal == 3000
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = grouped.search_with(queries, 40, 64)[1]  # candidates, as a rerank takes them
    assert np.mean([len(np.intersect1d(ids[t], f)) / 10 for t, f in zip(truth, found)]) >= 0.95


@pytest.mark.parametrize("merge", [False, True])
def test_fast_scan_lists_filled_to_a_multiple_of_their_block_bytes_take_more(merge: bool) -> None:
    """FAISS 1.15's `add_entries` on block lists copies whole blocks, past both ends, when a list
    already holds a multiple of `block_size` entries (bytes, 512 here): `append` (adds, and the Ray
    merge's `merge_into`) steps around it, and the list holds what FAISS's own add puts there."""
    from clipdex.search.index.fastscan import add_assigned, merge_into

    vectors = unit(1100, seed=11)
    ids = np.arange(1100, dtype=np.int64) + 1
    spec = IndexSpec("ivf", "IVF1,PQ16x4fsr")
    reference = build_index_from(DIM, spec, Source(ids, vectors), resolve=False)
    ours = VectorIndex(DIM, spec, faiss.deserialize_index(faiss.serialize_index(reference.index)))
    ivf = faiss.extract_index_ivf(ours.index)
    ivf.reset()
    lists = np.zeros(1100, np.int64)
    for start, stop in ((0, 512), (512, 513), (513, 1024), (1024, 1100)):  # the list at 512 and 1,024 entries
        if merge and start:
            part = faiss.deserialize_index(faiss.serialize_index(ours.index))
            faiss.extract_index_ivf(part).reset()
            add_assigned(faiss.extract_index_ivf(part), ids[start:stop], np.ascontiguousarray(vectors[start:stop]), lists[start:stop])
            merge_into(ivf, faiss.extract_index_ivf(part))
        else:
            add_assigned(ivf, ids[start:stop], np.ascontiguousarray(vectors[start:stop]), lists[start:stop])
    assert ours.ntotal == 1100 and lists_content(ours) == lists_content(reference)


def test_a_small_build_is_not_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharded, "SHARD_BYTES", 10**9)
    ids, vectors = np.arange(500, dtype=np.int64) + 1, clustered(500)
    built = build_index_from(DIM, IndexSpec("ivf", "IVF8,SQ8"), Source(ids, vectors), resolve=False, scratch=tmp_path)
    assert not built.mapped and built.backing is None and built.ntotal == 500


def test_a_read_only_scratch_builds_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharded, "SHARD_BYTES", 300 * 40)
    ids, vectors = np.arange(1000, dtype=np.int64) + 1, clustered(1000)
    built = build_index_from(DIM, IndexSpec("ivf", "IVF8,SQ8"), Source(ids, vectors), resolve=False, scratch=tmp_path / "missing")
    assert not built.mapped and built.ntotal == 1000


def test_exact_neighbours_streamed_in_chunks_are_those_of_all_vectors_at_once() -> None:
    ids, vectors = np.arange(3000, dtype=np.int64) * 3 + 1, clustered(3000)
    queries, own = vectors[[5, 77, 1500]], ids[[5, 77, 1500]]
    texts = clustered(7, seed=9)
    streamed = exact_evaluations({"image": (queries, own), "text": (texts, None)}, Source(ids, vectors, chunk=128).iter_vectors())
    for name, (these, own_ids) in {"image": (queries, own), "text": (texts, None)}.items():
        whole = exact_evaluation(these, ids, vectors, own_ids)
        assert np.array_equal(streamed[name].truth, whole.truth)
        np.testing.assert_allclose(streamed[name].best_cosine, whole.best_cosine, atol=1e-6)
    assert not np.isin(own, streamed["image"].truth).any()  # a query's own item is never its own neighbour


def test_optimize_streams_the_catalog_and_tunes_as_from_memory(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """`clipdex optimize` never loads every vector: it reads the catalog a chunk at a time, and
    its held-out queries and exact neighbours are those of the vectors in memory."""
    monkeypatch.setattr(optimize_module, "MEASURE_SECONDS", 0.05)
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 100)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 200)
    vectors = clustered(1500)
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vector, path=f"/photos/{i}.jpg") for i, vector in enumerate(vectors)])

    def everything(*args: object) -> None:
        raise AssertionError("optimize loaded every vector")

    monkeypatch.setattr(library.catalog, "all_vectors", everything)
    report = optimize_library(library, target_recall=0.9)
    assert report.target_met and report.index_type == "ivf" and library.vectors.ntotal == 1500
    assert report.exact_queries_per_second > 0
    ids = np.sort(library.catalog.ids())
    corpus, in_memory = CatalogCorpus(library.catalog, DIM), ArrayCorpus(ids, vectors[ids - ids.min()])
    rows = np.array([3, 500, 1499])
    assert np.array_equal(corpus.rows(rows), in_memory.rows(rows))


@pytest.mark.parametrize("fast_scan", [False, True])
def test_an_import_falling_behind_spools_its_chunks_and_builds_in_shards(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_scan: bool
) -> None:
    """The quantizer trains slowly: the chunks that arrive meanwhile wait in a spool file, not in
    memory, and the inverted file grows in shards on disk; the index is the one a rebuild makes,
    and nothing is left in the library's folder. A fast-scan index (read into memory whole) is
    saved from its merged file and read only when first searched: the import never holds it."""
    if fast_scan:  # what 512-d libraries get under a budget, scaled down to 32-d and 800 vectors
        monkeypatch.setattr(choice, "PQ_SUBQUANTIZERS", (4,))
        monkeypatch.setattr(choice, "PQ_MIN_TRAINING", 100)
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 10)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 20)
    monkeypatch.setattr(import_module.StreamedIndex, "MAX_PENDING", 1)
    monkeypatch.setattr(sharded, "SHARD_BYTES", 100 * (DIM + 8))
    train = VectorIndex.train

    def slow_train(self: VectorIndex, vectors: np.ndarray) -> None:
        time.sleep(1.0)
        train(self, vectors)

    monkeypatch.setattr(VectorIndex, "train", slow_train)
    spooled: list[tuple[int, str]] = []
    write_spool = import_module.StreamedIndex._write_spool
    monkeypatch.setattr(import_module.StreamedIndex, "_write_spool",
                        lambda self, ids, vectors: spooled.append((len(ids), vectors.dtype.name)) or write_spool(self, ids, vectors))
    budget = 800 * ((DIM // 4 if fast_scan else DIM) + 8) + 64 * DIM * 4  # fast-scan or SQ8 codes
    report = import_vectors(library, [clip_retrieval_folder(tmp_path / "e", count=400)], batch_size=32, memory_budget=budget)
    streamed = library.vectors
    assert streamed.spec.factory == ("IVF16,PQ16x4fsr" if fast_scan else "IVF16,SQ8")
    assert (streamed._index is None) is fast_scan  # saved, and not read yet
    assert report.added == 800 and streamed.ntotal == 800 and sum(rows for rows, _ in spooled) >= 200
    assert {kind for _, kind in spooled} == {"float16"}  # the files' float16, spooled as given: half the disk
    assert not [path for path in library.path.iterdir() if path.name.startswith("clipdex-")]  # no spool, shard or merged file left
    queries = unit(20, seed=8)
    monkeypatch.setattr(VectorIndex, "train", train)
    expected = library.rebuild_vectors()
    streamed.rerank_source = expected.rerank_source = library.catalog
    assert np.array_equal(streamed.search_with(queries, 10, 8)[1], expected.search_with(queries, 10, 8)[1])
    assert library.check()["ok"]
