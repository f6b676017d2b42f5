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
from typing import Callable, Iterator, Protocol

import numpy as np

from clipdex.search.catalog.vector_rows import concatenated
from clipdex.search.errors import ClipdexError
from clipdex.search.index.choice import VectorCollection, build_index, build_index_from
from clipdex.search.index.vectors import ArrayVectors, IndexSpec, VectorIndex, VectorSource

EXACT_SAMPLE = 200_000  # vectors exact search is timed over when the corpus is streamed


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

    def __init__(self, catalog: VectorCollection, dim: int, scratch: Path | None = None,
                 rerank_source: VectorSource | None = None) -> None:
        self.catalog = catalog
        self.scratch = scratch  # where a big inverted file is built in shards
        self._rerank_source = rerank_source  # where the library's index reads candidates (its rerank cache), if not the catalog
        self.ids = np.sort(np.asarray(catalog.ids(), dtype=np.int64))
        self.dim = dim

    def rows(self, rows: np.ndarray) -> np.ndarray:
        wanted = self.ids[np.asarray(rows, dtype=np.int64)]
        found_ids, found = concatenated(self.catalog.iter_vectors(wanted.tolist()))
        order = np.argsort(found_ids, kind="stable")
        found_ids, found = found_ids[order], found[order]
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
        return self._rerank_source or self.catalog

    def exact_seconds_per_query(self, time_queries: Callable[[np.ndarray], float]) -> float:
        size = min(len(self.ids), EXACT_SAMPLE)
        sample = self.rows(np.sort(np.random.default_rng(17).choice(len(self.ids), size=size, replace=False)))
        return len(self.ids) / size / time_queries(sample)
