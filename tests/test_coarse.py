"""The coarse quantizer in two levels (`clipdex.search.index.coarse`): centroids as good as one
k-means's at finding a query's neighbours, and vectors assigned their nearest centroid."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from clipdex.search.index.coarse import CentroidGroups, two_level_centroids

DIM = 48


def clip_like(count: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 200 centres of varied spread (as CLIP's images cluster by subject)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, DIM))
    spread = rng.uniform(0.3, 0.9, 200)
    which = rng.integers(0, 200, count)
    points = (centres[which] + spread[which, None] * rng.standard_normal((count, DIM))).astype(np.float32)
    faiss.normalize_L2(points)
    return points


def list_reach(centroids: np.ndarray, base: np.ndarray, queries: np.ndarray, nprobe: int) -> float:
    """The share of each query's exact top 10 that lies in its `nprobe` nearest centroids' lists."""
    lists = np.argmax(base @ centroids.T, axis=1)
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    probed = np.argsort(-(queries @ centroids.T), axis=1)[:, :nprobe]
    return float(np.mean([np.isin(lists[truth[q]], probed[q]).mean() for q in range(len(queries))]))


def test_two_level_centroids_find_neighbours_as_one_kmeans_does() -> None:
    base, queries, nlist = clip_like(30_000), clip_like(200, seed=1), 256
    sample = base[np.random.default_rng(2).choice(len(base), 50 * nlist, replace=False)]
    centroids = two_level_centroids(sample, nlist)
    assert centroids.shape == (nlist, DIM) and np.isfinite(centroids).all()
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)
    assert len(np.unique(np.round(centroids, 4), axis=0)) == nlist  # no list left without a centroid of its own
    single = faiss.Kmeans(DIM, nlist, niter=10, spherical=True, seed=1234)
    single.train(sample)
    for nprobe in (4, 16):
        two, one = list_reach(centroids, base, queries, nprobe), list_reach(single.centroids, base, queries, nprobe)
        assert two >= one - 0.03, (nprobe, two, one)
    # a random choice of centroids (what a broken second level would leave) reaches far less
    assert list_reach(sample[:nlist], base, queries, 4) < list_reach(centroids, base, queries, 4) - 0.05


def test_two_level_centroids_with_fewer_samples_than_a_group_needs() -> None:
    """A group with fewer samples than its share of lists takes its samples (repeated) as centroids."""
    sample = clip_like(70)
    centroids = two_level_centroids(sample, 64)
    assert centroids.shape == (64, DIM) and np.isfinite(centroids).all()


def test_groups_assign_the_nearest_centroid() -> None:
    vectors = clip_like(20_000, seed=3)
    centroids = two_level_centroids(vectors[:20_000], 1024)
    groups = CentroidGroups(centroids)
    lists = groups.assign(vectors)
    exact = np.argmax(vectors @ centroids.T, axis=1)
    assert lists.dtype == np.int64 and lists.shape == (20_000,)
    assert np.mean(lists == exact) >= 0.98
    # where it differs, the chosen centroid is about as near as the nearest
    scores = vectors @ centroids.T
    chosen, best = scores[np.arange(len(vectors)), lists], scores.max(axis=1)
    assert np.quantile(best - chosen, 0.999) < 0.05


def test_a_float16_sample_trains_lists_as_good_as_its_float32() -> None:
    """An import of float16 files keeps its training sample in float16 (half the memory): the two
    levels turn it into unit float32 rows a group at a time, and the lists reach as far."""
    base, queries, nlist = clip_like(30_000), clip_like(200, seed=1), 256
    sample = base[np.random.default_rng(2).choice(len(base), 50 * nlist, replace=False)]
    half = (sample * 1.0004).astype(np.float16)  # as a file holds them: rounded, a little off unit length
    from_half = two_level_centroids(half, nlist)
    assert from_half.dtype == np.float32 and np.allclose(np.linalg.norm(from_half, axis=1), 1.0, atol=1e-4)
    for nprobe in (4, 16):
        assert list_reach(from_half, base, queries, nprobe) >= list_reach(two_level_centroids(sample, nlist), base, queries, nprobe) - 0.02


def test_an_index_trains_on_a_float16_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    import clipdex.search.index.vectors as vectors_module
    from clipdex.search.index.vectors import IndexSpec, VectorIndex

    monkeypatch.setattr(vectors_module, "TWO_LEVEL_MIN_LISTS", 64)
    base = clip_like(8_000)
    for sample in (base, base.astype(np.float16)):
        index = VectorIndex(DIM, IndexSpec("ivf", "IVF64,PQ12", rerank=10))
        index.train(sample)
        assert index.is_trained
        index.add(np.arange(len(base), dtype=np.int64), base)
        found = index.search_with(base[:50], 1, 64)[1][:, 0]
        assert np.mean(found == np.arange(50)) >= 0.9  # each finds itself among codes of 12 bytes
