"""Stored vectors (float32 blobs) turned into arrays, each checked against the library's dimension."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from clipdex.search.errors import DamagedVectors


def stack_rows(rows: Sequence[Any], catalog_path: str | Path, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of (id, blob) rows; a blob that is not `dim` float32 values raises
    DamagedVectors naming the item (without `dim`, the rows must agree with each other)."""
    expected = 4 * dim if dim else len(rows[0][1])
    for item_id, blob in rows:
        if len(blob) != expected or expected % 4 or expected == 0:
            raise DamagedVectors(damaged_message(catalog_path, int(item_id), len(blob), dim))
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
    return ids, vectors


def vector_of(item_id: int, blob: bytes, catalog_path: str | Path, dim: int) -> np.ndarray:
    """One item's stored vector, checked as `stack_rows` checks them."""
    return stack_rows([(item_id, blob)], catalog_path, dim)[1][0]


def damaged_message(catalog_path: str | Path, item_id: int, size: int, dim: int | None) -> str:
    wanted = f"{4 * dim} ({dim} float32 values, the dimension manifest.json gives)" if dim else "a whole number of float32 values"
    return (
        f"{catalog_path}: the stored vector of item {item_id} has {size} bytes, not {wanted}; "
        "run `clipdex check` to see the damage and `clipdex check --repair` to fix what can be fixed"
    )


def concatenated(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, vectors) chunks of a catalog's `iter_vectors` as one pair (empty: no rows)."""
    pieces = list(parts)
    if not pieces:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate([ids for ids, _ in pieces]), np.concatenate([vectors for _, vectors in pieces])
