"""Exact search of a small library with numpy, without importing FAISS or loading its index.

A library of a few thousand vectors is answered exactly faster than FAISS can be imported
(a third of a second or more) and its index read: the catalog's vectors, read once per
catalog generation, times the query. `VectorStore.search` uses this while it has not loaded
the FAISS index anyway (a one-off search process); a process that already holds the index
(an index run, the server after a commit) keeps using it. The answers are those of an exact
(flat) FAISS index: the best `k` ids by inner product, ties in id order, padded with id -1.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

SMALL_LIBRARY_MAX = 5_000  # vectors: at 512 dimensions, 10 MB read from the catalog per generation


class VectorCatalog(Protocol):
    def generation(self) -> int: ...

    def counts(self) -> dict[str, int]: ...

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]: ...


class SmallExactSearch:
    """The catalog's vectors as one matrix, while the library is small; reread when the generation changes."""

    def __init__(self, catalog: VectorCatalog, dim: int, limit: int = SMALL_LIBRARY_MAX) -> None:
        self.catalog = catalog
        self.dim = dim
        self.limit = limit
        self._generation = -1
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._lock = threading.Lock()

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k (scores, ids) per query row, or None when the library is too large for this."""
        loaded = self._load()
        if loaded is None:
            return None
        ids, vectors = loaded
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(ids) == 0:
            return np.zeros((len(queries), 0), np.float32), np.full((len(queries), 0), -1, np.int64)
        k = max(1, min(k, len(ids)))
        if allowed is not None:
            keep = np.isin(ids, np.asarray(allowed, dtype=np.int64))
            ids, vectors = ids[keep], vectors[keep]
        scores = queries @ vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        found_scores, found_ids = np.take_along_axis(scores, order, axis=1), ids[order]
        missing = k - found_ids.shape[1]  # a filter matching fewer than k: padded as FAISS pads
        if missing:
            found_scores = np.pad(found_scores, ((0, 0), (0, missing)), constant_values=-np.finfo(np.float32).max)
            found_ids = np.pad(found_ids, ((0, 0), (0, missing)), constant_values=-1)
        return found_scores, found_ids

    def _load(self) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            generation = self.catalog.generation()
            if generation != self._generation:
                if sum(self.catalog.counts().values()) > self.limit:
                    self._ids, self._vectors, self._generation = self._ids[:0], self._vectors[:0], -1
                    return None
                ids, vectors = self.catalog.all_vectors()
                order = np.argsort(ids, kind="stable")
                self._ids = ids[order].astype(np.int64)
                self._vectors = np.ascontiguousarray(vectors.reshape(len(ids), self.dim)[order], dtype=np.float32) \
                    if len(ids) else np.zeros((0, self.dim), dtype=np.float32)
                self._generation = generation
            return self._ids, self._vectors
