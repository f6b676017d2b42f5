"""The vectors `clipdex optimize` builds and tunes an index over: in memory, or streamed from the catalog.

`optimize` needs four things of them: a few hundred vectors by row (held-out queries, the
stored vectors text-like queries are generated from), the exact top k of its queries, a
build of the index, and the exact vectors a reranking index orders its candidates by.

- `ArrayCorpus`: vectors already in memory (benchmarks, `--ray`, which ships them).
- `CatalogCorpus`: the library's catalog, read a chunk at a time. Nothing holds every
  vector: the index is built streamed (`build_index_from`), the exact top k of all the
  queries is merged over one pass through the catalog, and exact search's throughput (the
  baseline the speedup is reported against) is timed on a sample of `EXACT_SAMPLE` vectors
  and scaled by the library's size. Ten million 512-d vectors are 20 GB in float32; a
  library of that size is optimized within the memory of its index and a chunk.

Rows are positions in `ids`, which a catalog gives in id order: both corpora of one library
draw the same training sample and the same held-out queries for the same seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from clipdex.search.errors import ClipdexError
from clipdex.search.index.choice import VectorCollection, build_index, build_index_from
from clipdex.search.index.vectors import ArrayVectors, IndexSpec, VectorIndex, VectorSource, faiss_module

EXACT_SAMPLE = 200_000  # vectors exact search is timed over when the corpus is streamed
QUERY_BLOCK = 1_024  # queries scored against a chunk at once


class Corpus(Protocol):
    ids: np.ndarray
    dim: int

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The vectors at these positions of `ids`, float32."""
        ...

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors), a chunk at a time."""
        ...

    def build(self, spec: IndexSpec, seed: int) -> VectorIndex:
        """`spec` (as given: not resolved again) over every vector."""
        ...

    @property
    def source(self) -> VectorSource:
        """Where a reranking index reads its candidates' exact vectors."""
        ...

    def exact_seconds_per_query(self, time_queries: Callable[[np.ndarray], float]) -> float:
        """Exact search's time for one query over every vector, by `time_queries(vectors)` (queries/s over them)."""
        ...


class ArrayCorpus:
    """Vectors in memory; `builder` builds the index (`build_index`, or the cluster's)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, builder: Callable[..., VectorIndex] = build_index) -> None:
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(self.ids), -1)
        self.dim = int(self.vectors.shape[1])
        self._builder = builder
        self._source: ArrayVectors | None = None

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.vectors[rows])

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield self.ids, self.vectors

    def build(self, spec: IndexSpec, seed: int) -> VectorIndex:
        return self._builder(self.dim, spec, self.ids, self.vectors, seed=seed, resolve=False)

    @property
    def source(self) -> VectorSource:
        if self._source is None:
            self._source = ArrayVectors(self.ids, self.vectors)
        return self._source

    def exact_seconds_per_query(self, time_queries: Callable[[np.ndarray], float]) -> float:
        return 1.0 / time_queries(self.vectors)


class CatalogCorpus:
    """The catalog's vectors, streamed (see the module docstring)."""

    def __init__(self, catalog: VectorCollection, dim: int, scratch: Path | None = None) -> None:
        self.catalog = catalog
        self.scratch = scratch  # where a big inverted file is built in shards
        self.ids = np.sort(np.asarray(catalog.ids(), dtype=np.int64))
        self.dim = dim

    def rows(self, rows: np.ndarray) -> np.ndarray:
        wanted = self.ids[np.asarray(rows, dtype=np.int64)]
        found_ids, found = _gathered(self.catalog.iter_vectors(wanted.tolist()), self.dim)
        where = np.searchsorted(found_ids, wanted)
        if len(found_ids) == 0 or np.any(where >= len(found_ids)) or np.any(found_ids[np.minimum(where, len(found_ids) - 1)] != wanted):
            missing = np.setdiff1d(wanted, found_ids)
            raise ClipdexError(f"items {missing[:5].tolist()} left the catalog while it was being optimized: run it again")
        return np.ascontiguousarray(found[where], dtype=np.float32)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.catalog.iter_vectors()

    def build(self, spec: IndexSpec, seed: int) -> VectorIndex:
        return build_index_from(self.dim, spec, self.catalog, seed, resolve=False, ids=self.ids, scratch=self.scratch)

    @property
    def source(self) -> VectorSource:
        return self.catalog

    def exact_seconds_per_query(self, time_queries: Callable[[np.ndarray], float]) -> float:
        size = min(len(self.ids), EXACT_SAMPLE)
        sample = self.rows(np.sort(np.random.default_rng(17).choice(len(self.ids), size=size, replace=False)))
        return len(self.ids) / size / time_queries(sample)


def _gathered(parts: Iterator[tuple[np.ndarray, np.ndarray]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    pieces = list(parts)
    if not pieces:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids = np.concatenate([ids for ids, _ in pieces])
    vectors = np.concatenate([vectors for _, vectors in pieces])
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def exact_top_k(queries: np.ndarray, chunks: Iterator[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best (scores, ids) by inner product over every chunk (FAISS's brute force
    on each, merged): one pass, however many vectors. Missing places: score -inf, id -1."""
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for ids, vectors in chunks:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for start in range(0, len(queries), QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            scores, rows = faiss.knn(queries[block], vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            found = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
            scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
            merged_scores = np.concatenate([best_scores[block], scores], axis=1)
            merged_ids = np.concatenate([best_ids[block], found], axis=1)
            order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
            best_scores[block] = np.take_along_axis(merged_scores, order, axis=1)
            best_ids[block] = np.take_along_axis(merged_ids, order, axis=1)
    return best_scores, best_ids


def split_rows(sizes: Sequence[int]) -> list[slice]:
    """Consecutive slices of the given sizes (queries of several kinds searched as one)."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [slice(int(start), int(end)) for start, end in zip(bounds[:-1], bounds[1:])]

