"""Building the FAISS index a library's size calls for."""

from __future__ import annotations

import numpy as np

from search.vectors import IndexSpec, VectorIndex


def build_index(dim: int, spec: IndexSpec, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    """A new index of type `spec` holding `vectors` under `ids`."""
    index = VectorIndex(dim, spec)
    if len(ids):
        index.add(ids, vectors.reshape(len(ids), dim))
    return index
