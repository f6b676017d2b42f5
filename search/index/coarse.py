"""The coarse quantizer of a large inverted file: its centroids trained, and vectors assigned to them, in two levels.

Training 8,192 centroids on the 409,600-vector sample of ten million vectors by k-means
compares every sample with every centroid, ten times over: 34 TFLOP, six minutes of one
core. Assigning the ten million vectors to their nearest centroid one by one is 84 TFLOP.
Both are done in two levels instead, as FAISS's own big-ann recipes do
(`faiss.contrib.clustering.two_level_clustering`), and each level as matrix products:

- `two_level_centroids`: k-means into `sqrt(nlist)` groups, then each group's samples into
  its share of the lists (shares in proportion to the group's samples), by k-means of its
  own. A few percent of the flops; the lists reach a query's neighbours as well as those of
  one k-means (checked on CLIP-like vectors: the share of the true top 10 in the probed lists
  never more than 0.01 lower at any nprobe, see benchmarks/README.md).
- `CentroidGroups`: the centroids grouped (k-means of the centroids, `GROUP_SIZE` to a
  group), a vector compared with the group centres, then with every centroid of its
  `GROUPS_SEARCHED` nearest groups: 640 dot products per vector instead of 8,192, in
  batches that run as matrix products, 11 us a vector on one core (FAISS's HNSW graph of
  the centroids, used before: 16 us). It agrees with the exact nearest centroid for
  99.99% of CLIP-like vectors (the graph: 97.6%); the others go to a list whose centroid
  is about as near. Fewer, larger groups are cheaper but fail on data of many
  well-separated clusters, where a group's centre resembles none of its members.
  (Searches compare a query with every centroid, exactly, whichever way a list was filled.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from clipdex.search.catalog.vector_rows import half_to_single
from clipdex.search.index.choice import training_rows
from clipdex.search.index.vectors import faiss_module

FIRST_LEVEL_POINTS = 1_000  # samples per first-level group that its k-means uses at most (a copy FAISS makes: 184 MB)
KMEANS_ROUNDS = 10  # as FAISS's IVF training
SECOND_LEVEL_ROUNDS = 20
GROUP_SIZE = 32  # centroids a group holds, on average
GROUPS_SEARCHED = 12
ASSIGN_BATCH = 16_384  # vectors assigned at a time (their scores against a group: a few MB)


def unit_single(rows: np.ndarray) -> np.ndarray:
    """Rows (float16 or other) as float32 rows of unit length (zero rows left as they are)."""
    single = half_to_single(np.ascontiguousarray(rows)) if rows.dtype == np.float16 else np.array(rows, dtype=np.float32)
    return normalize_in_place(single)


def normalize_in_place(rows: np.ndarray) -> np.ndarray:
    """`rows` (float32) scaled to unit length where they have a finite, non-zero one; returned."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    rows /= np.where(np.isfinite(norms) & (norms > 0), norms, 1.0)
    return rows


def two_level_centroids(sample: np.ndarray, nlist: int, spherical: bool = True, seed: int = 1234) -> np.ndarray:
    """`nlist` centroids of `sample` (n x d: float32, as given; or float16, made unit float32
    a group at a time), trained in two levels (see the module docstring); unit length when
    `spherical` (inner-product indexes)."""
    faiss = faiss_module()

    def rows_of(chosen: np.ndarray | slice) -> np.ndarray:
        return np.ascontiguousarray(sample[chosen], dtype=np.float32) if sample.dtype == np.float32 else unit_single(sample[chosen])

    count, dim = sample.shape
    groups = max(1, min(int(round(math.sqrt(nlist))), nlist))
    # (the sample's size is `training_size`'s choice: FAISS's warnings of too few points stay quiet)
    first = faiss.Kmeans(dim, groups, niter=KMEANS_ROUNDS, spherical=spherical, seed=seed,
                         max_points_per_centroid=FIRST_LEVEL_POINTS, min_points_per_centroid=1)
    first.train(rows_of(training_rows(count, groups * FIRST_LEVEL_POINTS, seed)))
    member = np.concatenate([first.index.search(rows_of(slice(start, start + ASSIGN_BATCH)), 1)[1][:, 0]
                             for start in range(0, count, ASSIGN_BATCH)])
    sizes = np.bincount(member, minlength=groups)
    # each group's share of the lists, in proportion to its samples (at least one list for a
    # group with any: the shares are the differences of the rounded cumulative proportion)
    shares = np.diff(np.concatenate([[0], np.cumsum(sizes) * nlist // count]))
    order = np.argsort(member, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    centroids = np.empty((nlist, dim), dtype=np.float32)
    done = 0
    for group in range(groups):
        share = int(shares[group])
        if share == 0:
            continue
        rows = rows_of(order[starts[group] : starts[group + 1]])
        if len(rows) <= share:  # as many lists as samples (or more): the samples are the centroids
            centroids[done : done + len(rows)] = rows
            extra = share - len(rows)
            if extra:
                centroids[done + len(rows) : done + share] = rows[np.arange(extra) % len(rows)]
        else:
            second = faiss.Kmeans(dim, share, niter=SECOND_LEVEL_ROUNDS, spherical=spherical, seed=seed + group + 1,
                                  min_points_per_centroid=1)
            second.train(rows)
            centroids[done : done + share] = second.centroids
        done += share
    assert done == nlist, (done, nlist)
    return centroids


class CentroidGroups:
    """Assigns vectors their nearest centroid (inner product) by way of groups of centroids."""

    def __init__(self, centroids: np.ndarray, seed: int = 1234) -> None:
        faiss = faiss_module()
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        nlist, dim = centroids.shape
        count = max(1, nlist // GROUP_SIZE)
        grouping = faiss.Kmeans(dim, count, niter=SECOND_LEVEL_ROUNDS, spherical=True, seed=seed, min_points_per_centroid=1)
        grouping.train(centroids)
        self.centres = np.ascontiguousarray(grouping.centroids)
        _, nearest = grouping.index.search(centroids, 1)
        self.members = [np.flatnonzero(nearest[:, 0] == group) for group in range(count)]
        self.blocks = [np.ascontiguousarray(centroids[members].T) for members in self.members]  # each group's, d x size
        self.searched = min(GROUPS_SEARCHED, count)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """The list (centroid number) of each vector, int64. Its matrix products run on one BLAS
        thread: it runs beside other work (an import's rows), and BLAS's own threads, spinning
        for a core that work holds, made it three times slower (60 against 22 us a vector)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        out = np.empty(len(vectors), dtype=np.int64)
        with _blas_controller().limit(limits=1, user_api="blas"):
            for start in range(0, len(vectors), ASSIGN_BATCH):
                out[start : start + ASSIGN_BATCH] = self._assign(vectors[start : start + ASSIGN_BATCH])
        return out

    def _assign(self, vectors: np.ndarray) -> np.ndarray:
        scores = vectors @ self.centres.T
        if self.searched < scores.shape[1]:
            nearest = np.argpartition(-scores, self.searched - 1, axis=1)[:, : self.searched]
        else:
            nearest = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        best = np.full(len(vectors), -np.inf, dtype=np.float32)
        chosen = np.zeros(len(vectors), dtype=np.int64)
        # rows of each group, found at once: sort the (row, group) pairs by group
        rows = np.repeat(np.arange(len(vectors)), self.searched)
        groups = nearest.reshape(-1)
        order = np.argsort(groups, kind="stable")
        bounds = np.searchsorted(groups[order], np.arange(len(self.members) + 1))
        for group, members in enumerate(self.members):
            if len(members) == 0 or bounds[group] == bounds[group + 1]:
                continue
            these = rows[order[bounds[group] : bounds[group + 1]]]
            scored = vectors[these] @ self.blocks[group]
            top = scored.argmax(axis=1)
            value = scored[np.arange(len(these)), top]
            better = value > best[these]
            best[these[better]] = value[better]
            chosen[these[better]] = members[top[better]]
        return chosen


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded (found once: it walks the loaded libraries)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
