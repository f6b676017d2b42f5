"""`clipdex optimize --ray ADDRESS`: build a big IVF index in parallel on a Ray cluster.

The driver trains the quantizer once, on the same random sample `build_index` would use.
The vectors are then cut into shards, in catalog order, and each shard is added to a copy
of the trained, empty index by a Ray task. The driver merges the shards' inverted lists
into one index in the shards' order, so every list holds its entries in the order a
single process adding all the vectors would have left them: the index, and so its
recall, is the single-process build's.

When the index would not fit in memory (`on_disk`), the shards are written to files and
merged from there into the index file (FAISS's own format, one inverted list at a time,
through memory maps); the index is then that file, memory-mapped, as a large saved
index is when served.

Only inverted files shard this way; a library small enough for a flat or HNSW index
is built here, in this process, as without `--ray`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.search.index.choice import build_index, training_sample, training_size
from clipdex.search.index.fastscan import merge_into
from clipdex.search.index.sharded import write_merged_ivf
from clipdex.search.ray_cluster import cluster_cpus
from clipdex.search.index.vectors import IndexSpec, VectorIndex, faiss_module, read_index_file

logger = logging.getLogger(__name__)

MIN_SHARD_VECTORS = 1_000  # below this, a task costs more than it adds


def build_index_on_cluster(ray: Any, dim: int, spec: IndexSpec, ids: np.ndarray, vectors: np.ndarray, seed: int = 0,
                           resolve: bool = True, shards: int | None = None, on_disk: bool | None = None,
                           scratch: Path | None = None) -> VectorIndex:
    """`build_index`'s index, its vectors added in `shards` Ray tasks (default: one per CPU of the cluster).

    `on_disk`: merge the shards in files under `scratch` (default: the temporary folder)
    rather than in memory; None: when the index would take over half the memory available.
    """
    if spec.type != "ivf":
        logger.info("a %s index does not shard: building it in this process", spec.type)
        return build_index(dim, spec, ids, vectors, seed, resolve)
    vectors = vectors.reshape(len(ids), dim)
    trained = VectorIndex(dim, spec)
    trained.train(training_sample(vectors, training_size(spec, len(ids)), seed))
    faiss = faiss_module()
    empty = ray.put(faiss.serialize_index(trained.index))
    count = shards or max(1, cluster_cpus(ray))
    count = max(1, min(count, len(ids) // MIN_SHARD_VECTORS))
    bounds = np.linspace(0, len(ids), count + 1).astype(int)
    add = ray.remote(num_cpus=1)(_add_shard)
    pending = [add.remote(empty, ids[start:end], vectors[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]
    if on_disk is None:
        on_disk = len(ids) * (faiss.extract_index_ivf(trained.index).code_size + 8) > _available_memory() / 2
    if on_disk:
        return _merge_on_disk(ray, dim, spec, trained.index, pending, Path(scratch or tempfile.gettempdir()))
    merged = trained.index
    into = faiss.extract_index_ivf(merged)
    for shard in pending:  # in order: each list's entries as one process would have added them
        part = faiss.deserialize_index(ray.get(shard))
        if spec.fast_scan:
            merge_into(into, faiss.extract_index_ivf(part))
        else:
            into.merge_from(faiss.extract_index_ivf(part), 0)
        del part
    return VectorIndex(dim, spec, merged)


def _add_shard(empty: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """A Ray task: the trained empty index with this shard's vectors added, serialized."""
    faiss = faiss_module()
    faiss.omp_set_num_threads(1)  # one task a CPU
    index = faiss.deserialize_index(empty)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return faiss.serialize_index(index)


def _available_memory() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _merge_on_disk(ray: Any, dim: int, spec: IndexSpec, trained: Any, pending: list[Any], scratch: Path) -> VectorIndex:
    """Write the shards to files, merge them list by list into one index file, and map that file."""
    faiss = faiss_module()
    folder = Path(tempfile.mkdtemp(prefix="clipdex-merge-", dir=scratch))
    shard_paths = []
    for number, shard in enumerate(pending):  # one shard's bytes in memory at a time
        path = folder / f"shard-{number}.faiss"
        path.write_bytes(ray.get(shard).tobytes())
        shard_paths.append(path)
    merged_path = folder / "merged.faiss"
    parts = [read_index_file(path, spec, True)[0] for path in shard_paths]  # mapped, but for fast-scan codes
    with open(merged_path, "wb") as out:
        write_merged_ivf(trained, [faiss.extract_index_ivf(part) for part in parts], out)
    del parts
    for path in shard_paths:
        path.unlink()
    faiss_index, mapped = read_index_file(merged_path, spec, True)
    index = VectorIndex(dim, spec, faiss_index)
    index.mapped = mapped
    merged_path.unlink()  # the map keeps it until the index is dropped; whoever keeps the index saves it
    folder.rmdir()
    return index
