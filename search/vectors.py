"""The vector index: a FAISS index whose ids are catalog item ids.

The index is derived data. It is saved atomically (temporary file, then rename) with a
stamp naming the catalog generation it reflects; readers catch it up from the
catalog's change log, or rebuild it, when it lags.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from search.errors import CorruptLibrary

INDEX_FILE = "vectors.faiss"
STAMP_FILE = "vectors.json"


@dataclass
class IndexSpec:
    """How the FAISS index is built and searched; recorded in the stamp and the manifest."""

    # "flat": exact inner product. Other types are added by `search.index_choice`.
    type: str = "flat"
    # The FAISS factory string, for types built through `faiss.index_factory`.
    factory: str | None = None
    # Search-time parameters (nprobe, efSearch) tuned by `clipdex optimize`.
    search_params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "IndexSpec":
        data = data or {}
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def faiss_module() -> Any:
    import faiss

    return faiss


class VectorIndex:
    """A FAISS index of normalized vectors searched by inner product (cosine)."""

    def __init__(self, dim: int, spec: IndexSpec | None = None, index: Any = None) -> None:
        self.dim = dim
        self.spec = spec or IndexSpec()
        self.index = index if index is not None else self._new_index()
        self._gpu_index: Any = None

    def _new_index(self) -> Any:
        faiss = faiss_module()
        if self.spec.type == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        raise CorruptLibrary(f"unknown vector index type {self.spec.type!r}")

    # -- contents -----------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        self._gpu_index = None

    def remove(self, ids: np.ndarray | list[int]) -> int:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        removed = int(self.index.remove_ids(faiss_module().IDSelectorBatch(ids)))
        self._gpu_index = None
        return removed

    def ids(self) -> np.ndarray:
        faiss = faiss_module()
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    # -- search -------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; missing places have id -1.

        With `allowed_ids`, only those ids can be returned, and the k returned are the
        best-scoring among them (the selector works inside the search, not after it).
        """
        faiss = faiss_module()
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        if self.ntotal == 0:
            return np.full((len(queries), 0), 0, np.float32), np.full((len(queries), 0), -1, np.int64)
        params = self._search_parameters(allowed_ids)
        if allowed_ids is None and self._use_gpu():
            return self._gpu().search(queries, k)
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def _search_parameters(self, allowed_ids: np.ndarray | None) -> Any:
        faiss = faiss_module()
        if allowed_ids is None and not self.spec.search_params:
            return None
        selector = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
        return faiss.SearchParameters(sel=selector)

    def _use_gpu(self) -> bool:
        return faiss_module().get_num_gpus() > 0

    def _gpu(self) -> Any:
        if self._gpu_index is None:
            self._gpu_index = faiss_module().index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    # -- persistence ----------------------------------------------------------------

    def save(self, directory: Path, generation: int) -> None:
        """Write the index atomically, then its stamp (never ahead of the index)."""
        faiss = faiss_module()
        target = directory / INDEX_FILE
        temporary = directory / f".{INDEX_FILE}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(temporary))
        _fsync_file(temporary)
        os.replace(temporary, target)
        stamp = {"generation": generation, "ntotal": self.ntotal, "dim": self.dim, "spec": self.spec.to_json()}
        write_json_atomic(directory / STAMP_FILE, stamp)

    @classmethod
    def load(cls, directory: Path) -> tuple["VectorIndex", int] | None:
        """The saved index and the generation it reflects at least, or None if absent."""
        stamp_path = directory / STAMP_FILE
        index_path = directory / INDEX_FILE
        if not stamp_path.exists() or not index_path.exists():
            return None
        try:
            stamp = json.loads(stamp_path.read_text())  # read before the index: never overstates
            index = faiss_module().read_index(str(index_path))
        except (OSError, ValueError, RuntimeError):
            return None  # unreadable derived data: the caller rebuilds it from the catalog
        return cls(int(stamp["dim"]), IndexSpec.from_json(stamp.get("spec")), index), int(stamp["generation"])


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _fsync_file(temporary)
    os.replace(temporary, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
