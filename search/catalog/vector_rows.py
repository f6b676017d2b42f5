"""Stored vectors (float32 blobs, or float16 where an import was given float16) turned into
float32 arrays, each checked against the library's dimension."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from clipdex.search.errors import DamagedVectors

_HALF_TO_SINGLE: np.ndarray | None = None


def half_to_single(values: np.ndarray) -> np.ndarray:
    """float16 values (or their bits, as uint16) as float32, by a table of all 65,536: about three
    times numpy's own cast on this machine's CPUs, and exact."""
    global _HALF_TO_SINGLE
    if _HALF_TO_SINGLE is None:
        _HALF_TO_SINGLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    return _HALF_TO_SINGLE[values.view(np.uint16)]


def stack_rows(rows: Sequence[Any], catalog_path: str | Path, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of (id, blob) rows, as float32; a blob that is neither `dim` float32
    values nor `dim` float16 values (an import stores vectors as it was given them: see
    `stored_bytes`) raises DamagedVectors naming the item. Without `dim`, the rows must agree
    with each other and are read as float32."""
    expected = 4 * dim if dim else len(rows[0][1])
    half = expected // 2 if dim else -1
    halves = 0
    for item_id, blob in rows:
        size = len(blob)
        if size == half:
            halves += 1
        elif size != expected or expected % 4 or expected == 0:
            raise DamagedVectors(damaged_message(catalog_path, int(item_id), size, dim))
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    if halves == 0:
        return ids, np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
    if halves == len(rows):
        return ids, half_to_single(np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float16).reshape(len(rows), -1))
    return ids, np.stack([vector_from(blob, dim or 0) for _, blob in rows])


def vector_of(item_id: int, blob: bytes, catalog_path: str | Path, dim: int) -> np.ndarray:
    """One item's stored vector, checked as `stack_rows` checks them."""
    return stack_rows([(item_id, blob)], catalog_path, dim)[1][0]


def vector_from(blob: bytes, dim: int) -> np.ndarray:
    """One stored vector as float32: `dim` float16 values when the blob is half the size of float32's."""
    return np.frombuffer(blob, dtype=np.float16).astype(np.float32) if dim and len(blob) == 2 * dim else np.frombuffer(blob, dtype=np.float32)


def stored_bytes(vectors: np.ndarray, half: bool) -> list[bytes]:
    """Each row as the catalog stores it: float16 when `half` (an import of float16 vectors, or
    `--float16`: half the disk, the scores rounded as float16 rounds), else float32."""
    return [vector.tobytes() for vector in np.ascontiguousarray(vectors, dtype=np.float16 if half else np.float32)]


def valid_sizes(dim: int) -> tuple[int, int]:
    """The byte lengths of a stored vector of `dim` dimensions: float32, and an import's float16."""
    return 4 * dim, 2 * dim


def damaged_message(catalog_path: str | Path, item_id: int, size: int, dim: int | None) -> str:
    wanted = (f"{4 * dim} ({dim} float32 values, the dimension manifest.json gives) nor {2 * dim} ({dim} float16 values)"
              if dim else "a whole number of float32 values")
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
