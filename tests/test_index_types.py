"""Every index type: add, remove, search, filtered search, save and load, and the GPU wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import pytest

import clipdex.search.index.vectors as vectors_module
from clipdex.search.catalog.database import NewItem
from clipdex.search.index.choice import build_index
from clipdex.search.library import Library
from clipdex.search.index.vectors import GpuSettings, GpuUnavailable, IndexSpec, VectorIndex

DIM = 32
COUNT = 3000
SPECS = {
    "flat": IndexSpec("flat"),
    "ivf-flat": IndexSpec("ivf", "IVF16,Flat"),
    "ivf-sq8": IndexSpec("ivf", "IVF16,SQ8"),
    "ivf-pq": IndexSpec("ivf", "IVF16,PQ8x4"),  # 16 centroids per sub-space: trains on a small sample
    "hnsw": IndexSpec("hnsw", "HNSW16,Flat"),
    # the codes pick candidates, the stored vectors (the catalog's; here an ArraySource) order them
    # (PQ8x4 is far coarser than the PQ64 of 512-d vectors: it needs more candidates)
    "ivf-sq4-rerank": IndexSpec("ivf", "IVF16,SQ4", rerank=4),
    "ivf-pq-rerank": IndexSpec("ivf", "IVF16,PQ8x4", rerank=20),
    # 4-bit codes in FAISS's fast-scan blocks of 32, by residual (what 512-d libraries get for PQ)
    "ivf-pq-fastscan-rerank": IndexSpec("ivf", "IVF16,PQ16x4fsr", rerank=20),
}
# recall@10 of an unfiltered search at the widest breadth; PQ codes lose the most, unless reranked
MIN_RECALL = {"flat": 1.0, "ivf-flat": 1.0, "ivf-sq8": 0.9, "ivf-pq": 0.2, "hnsw": 0.95, "ivf-sq4-rerank": 0.99,
              "ivf-pq-rerank": 0.9, "ivf-pq-fastscan-rerank": 0.95}


def clustered(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, DIM))
    points = centers[rng.integers(0, 40, count)] + 0.6 * rng.standard_normal((count, DIM))
    points = points.astype(np.float32)
    faiss.normalize_L2(points)
    return points


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    return np.arange(COUNT, dtype=np.int64) * 3 + 7, clustered(COUNT)


@pytest.fixture(params=list(SPECS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


_BUILT: dict[str, VectorIndex] = {}


def make_index(kind: str, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    """A fresh copy of the `kind` index over the test data (built once: PQ trains slowly)."""
    if kind not in _BUILT:
        _BUILT[kind] = build_index(DIM, IndexSpec(SPECS[kind].type, SPECS[kind].factory), ids, vectors, resolve=False)
    assert np.array_equal(ids, np.arange(COUNT, dtype=np.int64) * 3 + 7)
    built = _BUILT[kind]
    index = VectorIndex(DIM, IndexSpec(built.spec.type, built.spec.factory, rerank=SPECS[kind].rerank), faiss.clone_index(built.index))
    index.rerank_source = ArraySource(ids, vectors)  # as a store gives its index the catalog
    return index


def brute_force(query: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], ids[order]


class ArraySource:
    """The catalog's `iter_vectors`, over arrays."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.rows = {int(i): row for row, i in enumerate(ids)}
        self.vectors = vectors

    def iter_vectors(self, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        wanted = sorted(ids if ids is not None else self.rows)
        for start in range(0, len(wanted), 500):
            chunk = np.asarray(wanted[start : start + 500], dtype=np.int64)
            yield chunk, self.vectors[[self.rows[int(i)] for i in chunk]]


def test_every_type_finds_neighbours(kind: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    assert index.ntotal == COUNT and sorted(index.ids().tolist()) == ids.tolist()
    queries = clustered(50, seed=1)
    if kind == "flat":
        _, found = index.search(queries, 10)
    else:
        _, found = index.search_with(queries, 10, index.max_breadth())
    recall = np.mean([len(set(row) & set(brute_force(q, ids, vectors, 10)[1])) / 10 for q, row in zip(queries, found)])
    assert recall >= MIN_RECALL[kind]


def test_removed_and_replaced_vectors_never_come_back(kind: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    removed = ids[100:400]
    assert index.remove(removed) == len(removed)
    index.remove(ids[5:6])
    index.add(ids[5:6], vectors[900:901])  # item 5 now has the vector of row 900
    changed = vectors.copy()
    changed[5] = vectors[900]
    index.rerank_source = ArraySource(ids, changed)  # and so has the catalog
    assert index.ntotal == COUNT - len(removed)
    assert set(index.ids().tolist()) == set(ids.tolist()) - set(removed.tolist())
    for query in vectors[100:110]:  # the removed vectors themselves
        _, found = index.search(query[None, :], 20)
        assert not set(found[0].tolist()) & set(removed.tolist())
    scores, found = index.search(vectors[900][None, :], COUNT)
    by_id = dict(zip(found[0].tolist(), scores[0].tolist()))
    assert found[0].tolist().count(int(ids[5])) == 1  # the old vector of item 5 is gone
    assert by_id[int(ids[5])] == pytest.approx(by_id[int(ids[900])], abs=1e-5)  # same vector, same score


@pytest.mark.parametrize("matches", [3, 10, 250])
def test_filtered_search_is_exact_in_count_and_scores(kind: str, data: tuple[np.ndarray, np.ndarray], matches: int) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    rng = np.random.default_rng(matches)
    allowed = np.sort(rng.choice(ids, size=matches, replace=False))
    rows = np.searchsorted(ids, allowed)
    source = ArraySource(ids, vectors)
    for query in clustered(5, seed=2):
        scores, found = index.search(query[None, :], 10, allowed, source=source)
        expected_scores, expected_ids = brute_force(query, allowed, vectors[rows], 10)
        assert np.count_nonzero(found[0] >= 0) == min(10, matches)
        assert found[0][: min(10, matches)].tolist() == expected_ids.tolist()
        np.testing.assert_allclose(scores[0][: min(10, matches)], expected_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf-flat", "hnsw"])
def test_indexes_of_whole_vectors_score_filters_without_the_catalog(kind: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    class Unreadable:
        def iter_vectors(self, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            raise AssertionError("the catalog was read")

    ids, vectors = data
    index = make_index(kind, ids, vectors)
    allowed = ids[::7]
    query = clustered(1, seed=8)[0]
    scores, found = index.search(query[None, :], 10, allowed, source=Unreadable())  # type: ignore[arg-type]
    expected_scores, expected_ids = brute_force(query, allowed, vectors[::7], 10)
    assert found[0].tolist() == expected_ids.tolist()
    np.testing.assert_allclose(scores[0], expected_scores, atol=1e-5)


def test_large_filters_search_wider_until_k_matches_come_back(
    kind: str, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the exact-scoring threshold a filter goes through the index's own selector."""
    monkeypatch.setattr(vectors_module, "EXACT_FILTER_MAX", 10)
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    allowed = ids[::40]  # 75 matches, spread over every cluster
    for query in clustered(10, seed=3):
        scores, found = index.search(query[None, :], 25, allowed)
        assert np.count_nonzero(found[0] >= 0) == 25
        assert set(found[0].tolist()) <= set(allowed.tolist())
        if kind in ("flat", "ivf-flat"):
            rows = np.searchsorted(ids, allowed)
            assert found[0].tolist() == brute_force(query, allowed, vectors[rows], 25)[1].tolist()


def test_hnsw_falls_back_to_exact_scoring_when_the_graph_finds_too_few(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vectors_module, "EXACT_FILTER_MAX", 0)
    monkeypatch.setattr(vectors_module, "HNSW_MAX_EF_SEARCH", 20)
    ids, vectors = data
    index = make_index("hnsw", ids, vectors)
    allowed = ids[::100]  # 30 matches: a graph walk of 20 meets only a few of them
    rows = np.searchsorted(ids, allowed)
    query = clustered(1, seed=4)[0]
    scores, found = index.search(query[None, :], 20, allowed)
    assert found[0].tolist() == brute_force(query, allowed, vectors[rows], 20)[1].tolist()


def test_hnsw_removals_are_tombstones_until_compaction(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = make_index("hnsw", ids, vectors)
    index.remove(ids[:100])
    assert index.tombstones == 100 and index.index.ntotal == COUNT
    index.remove(ids[100:800])  # past a quarter of the graph: rebuilt from the live vectors
    assert index.tombstones == 0 and index.index.ntotal == COUNT - 800
    _, found = index.search(vectors[:50], 5)
    assert found.min() >= ids[800]


@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_load_keep_results_and_accept_writes(kind: str, data: tuple[np.ndarray, np.ndarray], tmp_path: Path, mmap: bool) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    index.remove(ids[:50])
    index.spec.search_params = {"nprobe": 4} if kind.startswith("ivf") else {}
    before = index.search(vectors[:20], 10)
    index.save(tmp_path, generation=12)
    loaded = VectorIndex.load(tmp_path, mmap=mmap)
    assert loaded is not None
    again, generation = loaded
    assert generation == 12 and again.mapped is (mmap and not again.fast_scan)  # FAISS reads block lists into memory
    again.rerank_source = index.rerank_source  # as a store gives the index it loads the catalog
    assert again.spec == index.spec and again.ntotal == index.ntotal and again.tombstones == index.tombstones
    after = again.search(vectors[:20], 10)
    np.testing.assert_array_equal(after[1], before[1])
    again.add(ids[:50], vectors[:50])  # a mapped index is copied into memory first: FAISS would abort
    again.remove(ids[60:70])
    assert not again.mapped and again.ntotal == COUNT - 10


def test_large_files_load_memory_mapped(data: tuple[np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors = data
    make_index("ivf-flat", ids, vectors).save(tmp_path, generation=1)
    monkeypatch.setattr(vectors_module, "MMAP_MIN_BYTES", (tmp_path / "vectors.faiss").stat().st_size + 1)
    assert VectorIndex.load(tmp_path)[0].mapped is False  # type: ignore[index]
    monkeypatch.setattr(vectors_module, "MMAP_MIN_BYTES", (tmp_path / "vectors.faiss").stat().st_size)
    assert VectorIndex.load(tmp_path)[0].mapped is True  # type: ignore[index]


def test_fast_scan_indexes_are_read_whole_not_mapped(data: tuple[np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS reads fast-scan block lists into memory whatever the flag: through a map it would keep
    the map as well, the index resident twice (2.7 GB at ten million vectors for 1.36)."""
    ids, vectors = data
    flags: list[int] = []
    read = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda path, flag=0: flags.append(flag) or read(path, flag))
    for kind, folder in (("ivf-pq-fastscan-rerank", tmp_path / "fast"), ("ivf-pq-rerank", tmp_path / "pq")):
        folder.mkdir()
        make_index(kind, ids, vectors).save(folder, generation=1)
        loaded, _ = VectorIndex.load(folder, mmap=True)  # type: ignore[misc]
        assert loaded.ntotal == COUNT and loaded.mapped is (kind == "ivf-pq-rerank")
    assert flags == [0, faiss.IO_FLAG_MMAP_IFC]


def test_bytes_per_vector_matches_the_saved_file(kind: str, data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    index.save(tmp_path, generation=1)
    on_disk = (tmp_path / "vectors.faiss").stat().st_size / COUNT
    assert index.bytes_per_vector() == pytest.approx(on_disk, rel=0.1)


# -- the library, end to end ------------------------------------------------------------


def fill(library: Library, count: int = 600) -> tuple[np.ndarray, np.ndarray]:
    vectors = clustered(count, seed=5)
    items = [
        NewItem("image", vectors[i], path=f"/photos/{'a' if i % 3 else 'b'}/{i}.jpg") if i % 2
        else NewItem("text", vectors[i], text=f"text {i}", source="/corpus.txt", source_key=str(i))
        for i in range(count)
    ]
    with library.writer() as writer:
        writer.commit(items=items)
    return library.catalog.all_vectors()


@pytest.mark.parametrize(
    "spec", [IndexSpec("ivf", "IVF8,SQ8", pinned=True), IndexSpec("hnsw", "HNSW16,Flat", pinned=True)], ids=["ivf-sq8", "hnsw"]
)
def test_library_filters_are_exact_on_approximate_indexes(library: Library, spec: IndexSpec) -> None:
    ids, vectors = fill(library)
    library.rebuild_vectors(spec)
    assert library.stats()["index_type"] == spec.type
    items = library.catalog.get_items(ids.tolist())
    query = clustered(1, seed=6)[0]
    for filters, wanted in (({"path": "/photos/b/*"}, 10), ({"kind": "text"}, 25), ({"path": "/photos/b/1*"}, 40)):
        matching = np.array([i for i in ids.tolist() if _matches(items[i], filters)])
        rows = np.searchsorted(ids, matching)
        expected_scores, expected_ids = brute_force(query, matching, vectors[rows], wanted)
        hits = library.search(vector=query, k=wanted, **filters)
        assert [hit.id for hit in hits] == expected_ids.tolist()
        np.testing.assert_allclose([hit.score for hit in hits], expected_scores, atol=1e-5)


def test_library_reranks_quantized_codes_by_the_catalog_s_vectors(library: Library) -> None:
    """PQ codes pick candidates; the hits come in the order, and with the scores, of the
    vectors the catalog stores, as the rerank cache keeps them in float16 (the codes' own
    scores are approximations)."""
    ids, vectors = fill(library)
    library.rebuild_vectors(IndexSpec("ivf", "IVF8,PQ8x4", {"nprobe": 8}, pinned=True, rerank=10))
    assert library.vectors.reranks and library.manifest.index.rerank == 10
    queries = clustered(20, seed=7)
    halves = vectors.astype(np.float16).astype(np.float32)
    found = 0
    for query in queries:
        hits = library.search(vector=query, k=10)
        rows = np.searchsorted(ids, [hit.id for hit in hits])
        np.testing.assert_allclose([hit.score for hit in hits], halves[rows] @ query, atol=1e-5)
        np.testing.assert_allclose([hit.score for hit in hits], vectors[rows] @ query, atol=1e-3)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        found += len({hit.id for hit in hits} & set(brute_force(query, ids, vectors, 10)[1].tolist()))
    assert found / (10 * len(queries)) >= 0.95
    index = library.vectors
    index.rerank_source = None  # the codes' order and scores, for contrast
    scores, _ = index.search(queries, 10)
    assert not np.allclose(scores, np.sort(vectors @ queries.T, axis=0)[::-1][:10].T, atol=1e-3)


def _matches(item: Any, filters: dict[str, str]) -> bool:
    from fnmatch import fnmatchcase

    if "kind" in filters:
        return item.kind == filters["kind"]
    return item.path is not None and fnmatchcase(item.path, filters["path"])


def test_library_writes_after_a_memory_mapped_open(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors = fill(library)
    library.rebuild_vectors(IndexSpec("ivf", "IVF8,Flat", pinned=True))
    monkeypatch.setattr(vectors_module, "MMAP_MIN_BYTES", 0)
    reopened = Library.open(library.path, device="cpu")
    assert reopened.vectors.mapped
    with reopened.writer() as writer:
        writer.commit(remove_ids=ids[:10].tolist())
    assert reopened.vectors.ntotal == len(ids) - 10
    hits = reopened.search(vector=vectors[3], k=5)
    assert not {hit.id for hit in hits} & set(ids[:10].tolist())
    reopened.close()


# -- GPU: FAISS's GPU calls replaced by CPU clones (no GPU here) ----------------------------


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    calls: dict[str, Any] = {"clones": 0, "searches": 0, "options": None}

    class FakeGpuIndex:
        def __init__(self, index: Any) -> None:
            self.index = faiss.clone_index(index)

        def search(self, queries: np.ndarray, k: int) -> Any:
            calls["searches"] += 1
            return self.index.search(queries, k)

    def clone(index: Any, options: Any) -> FakeGpuIndex:
        calls["clones"] += 1
        calls["options"] = options
        return FakeGpuIndex(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: calls.get("count", 1))
    monkeypatch.setattr(faiss, "StandardGpuResources", object)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda resources, device, index, options: clone(index, options))
    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", lambda resources, index, options: clone(index, options))
    monkeypatch.setattr(faiss, "GpuParameterSpace", lambda: _NprobeSetter(calls))
    return calls


class _NprobeSetter:
    def __init__(self, calls: dict[str, Any]) -> None:
        self.calls = calls

    def set_index_parameter(self, gpu_index: Any, name: str, value: int) -> None:
        self.calls[name] = value
        faiss.ParameterSpace().set_index_parameter(gpu_index.index, name, value)


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_unfiltered_searches_run_on_the_gpu_copy(kind: str, data: tuple[np.ndarray, np.ndarray], fake_gpus: dict[str, Any]) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    index.gpu = GpuSettings("auto", "replicate", float16=True)
    index.spec.search_params = {"nprobe": 16} if kind == "ivf-flat" else {}
    assert index.device == "gpu x1 (single, float16)"
    _, found = index.search(vectors[:5], 3)
    assert fake_gpus["clones"] == 1 and fake_gpus["searches"] == 1 and fake_gpus["options"].useFloat16
    assert found[:, 0].tolist() == ids[:5].tolist()
    index.remove(ids[:5])  # through the CPU copy; the GPU copy is made again
    _, found = index.search(vectors[:5], 3)
    assert fake_gpus["clones"] == 2 and not set(found.ravel().tolist()) & set(ids[:5].tolist())
    index.search(vectors[:5], 3, allowed_ids=ids[10:20])  # filters stay on the CPU
    assert fake_gpus["searches"] == 2
    if kind == "ivf-flat":
        assert fake_gpus["nprobe"] == 16


def test_several_gpus_shard_or_replicate(data: tuple[np.ndarray, np.ndarray], fake_gpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus["count"] = 2
    monkeypatch.setenv("CLIPDEX_GPU_MULTI", "shard")
    ids, vectors = data
    index = make_index("flat", ids, vectors)
    assert index.device == "gpu x2 (shard)"
    index.search(vectors[:1], 1)
    assert fake_gpus["options"].shard is True


def test_gpu_settings_force_or_refuse(data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    ids, vectors = data
    monkeypatch.setenv("CLIPDEX_GPU", "on")
    with pytest.raises(GpuUnavailable, match="FAISS sees no GPU"):
        make_index("flat", ids, vectors).search(vectors[:1], 1)
    monkeypatch.setenv("CLIPDEX_GPU", "off")
    assert make_index("flat", ids, vectors).device == "cpu"
    monkeypatch.setenv("CLIPDEX_GPU", "sometimes")
    with pytest.raises(GpuUnavailable, match="must be auto, on or off"):
        GpuSettings.from_environment()


@pytest.mark.parametrize(("kind", "words"), [("hnsw", "HNSW index"), ("ivf-pq-fastscan-rerank", r"fast-scan index \(IVF16,PQ16x4fsr\)")])
def test_graphs_and_fast_scan_codes_have_no_gpu_form(
    kind: str, words: str, data: tuple[np.ndarray, np.ndarray], fake_gpus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, vectors = data
    index = make_index(kind, ids, vectors)
    assert index.device == "cpu"
    index.search(vectors[:1], 1)
    assert fake_gpus["clones"] == 0
    index.gpu = GpuSettings("on")
    with pytest.raises(GpuUnavailable, match=f"{words} has no GPU form"):
        index.search(vectors[:1], 1)


def test_pq_codes_train_without_polysemous_reordering() -> None:
    """FAISS's factory would reorder the PQ codes for Hamming filtering, which no search here uses
    (most of the training time of a large PQ index): a clipdex PQ index leaves it out."""
    index = VectorIndex(64, IndexSpec("ivf", "IVF16,PQ16", rerank=10))
    assert faiss.downcast_index(faiss.extract_index_ivf(index.index)).do_polysemous_training is False
