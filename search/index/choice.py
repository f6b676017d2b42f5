"""Choosing and building the FAISS index a library's size calls for.

For n vectors of dimension d and an optional memory budget B (bytes):

- n <= FLAT_MAX_VECTORS (50,000): flat, exact inner product. A query scans every vector,
  which stays within a few milliseconds at this size.
- n <= HNSW_MAX_VECTORS (250,000), no GPU, and the graph fits B: HNSW (`HNSW32,Flat`),
  the fastest in RAM. Its build time grows with n, and FAISS has no GPU form of it.
- otherwise IVF with nlist ~ 2·sqrt(n) lists (a power of two), keeping the vectors whole
  (`IVF{nlist},Flat`, 4d+8 bytes a vector) when they fit B, else scalar-quantized to a
  byte a dimension (`SQ8`, d+8), else product-quantized to 4 bits for each 2 dimensions in
  FAISS's fast-scan layout (`PQ{d/2}x4fsr`, d/4+8; not on a GPU; see
  `clipdex.search.index.fastscan`), else scalar-quantized to half a byte a dimension (`SQ4`,
  d/2+8; where PQ cannot be trained or run), else product-quantized coarser (`PQ{m}`, m+8 bytes). Quantized codes alone cost recall (PQ in particular stays well
  below a 0.95 recall@10), so they only pick candidates: a search for k hits takes the
  codes' best `RERANK[kind]`·k and orders them by the stored vectors, read by id from the
  catalog (`IndexSpec.rerank`), which cost disk, not memory. PQ's training is slow
  (k-means for each of its m sub-spaces). From `TWO_LEVEL_MIN_LISTS` lists on, the
  centroids are trained, and the vectors added assigned their list, in two levels
  (`clipdex.search.index.coarse`).

The choice is made whenever the index is built from scratch (`build_index`): on
`clipdex optimize`, `clipdex check --repair`, when `import-vectors` finds the library
outgrew its index, and when a library is opened without a usable index file. A spec
recorded in the manifest is kept (with its tuned search parameters) while it is still
the choice for the library's size (a `PQ{d/4}` of before fast-scan codes stands for
`PQ{d/2}x4fsr` until an optimize); otherwise the new choice replaces it. Quantizers
train on a random sample of the vectors, never on the first ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from clipdex.search.errors import MemoryBudgetError
from clipdex.search.index.vectors import FAST_SCAN_MARK, GpuSettings, IndexSpec, VectorIndex, VectorSource, faiss_module


class VectorCollection(VectorSource, Protocol):
    """Every stored vector, streamed (the catalog)."""

    def ids(self, kind: str = "any") -> np.ndarray: ...


FLAT_MAX_VECTORS = 50_000
HNSW_MAX_VECTORS = 250_000
HNSW_NEIGHBOURS = 32  # M: graph links per node (2M on the bottom layer)
HNSW_EF_CONSTRUCTION = 40
TRAINING_POINTS_PER_LIST = 50  # k-means sample size per IVF list
MIN_POINTS_PER_LIST = 39  # FAISS's own lower bound for a sound k-means
PQ_MIN_TRAINING = 9_984  # 39 points for each of a PQ sub-quantizer's 256 centroids
PQ_SUBQUANTIZERS = (64, 48, 32, 24, 16, 12, 8)  # code bytes a vector; FAISS GPUs take all of these
ID_BYTES = 8
ADD_CHUNK = 100_000
# Candidates per wanted hit that quantized codes hand to the rerank by stored vectors: the
# coarser the codes, the more of the true top k lie further down their order.
# Measured on a million CLIP-like vectors (IVF2048, the best recall@10 of image-like queries at any
# nprobe): SQ8 with 2 reaches 1.000; PQ128 (4 dimensions a byte) with 10, 0.997; SQ4 with 4
# stops at 0.872 and with 10 at 0.966, so PQ128 comes before SQ4 wherever it can be trained.
# PQ256x4fsr (the same bytes in 4-bit fast-scan codes; IVF1024, nprobe 16): 0.956 with 10, 0.982
# with 20, where PQ128 reaches 0.986 with 10; its scan is 10-14 times faster, so it takes 20.
RERANK = {"SQ8": 2, "SQ4": 10, "PQ": 10, "PQfs": 20}


def parse_size(text: str) -> int:
    """Bytes from "800M", "1.5G", "2GiB", "512MB" or a plain number (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise MemoryBudgetError(f"cannot read {text!r} as a size: use a number of bytes or e.g. 800M, 1.5G, 2GiB")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit or " "))


def list_count(count: int) -> int:
    """IVF lists for `count` vectors: a power of two near 2·sqrt(n), with enough points each to train."""
    target = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(count))))
    while target > 16 and count < MIN_POINTS_PER_LIST * target:
        target //= 2
    return max(1, min(target, 65_536, count))


def gpu_available() -> bool:
    """True when searches will run on a GPU (FAISS sees one and CLIPDEX_GPU is not off)."""
    return GpuSettings.from_environment().mode != "off" and faiss_module().get_num_gpus() > 0


def choose_spec(count: int, dim: int, memory_budget: int | None = None, gpu: bool | None = None, strict: bool = True) -> IndexSpec:
    """The index type for `count` vectors of `dim` dimensions within `memory_budget` bytes.

    With `strict`, a budget nothing fits raises MemoryBudgetError; otherwise the most
    compact type is returned anyway (a rebuild must never fail over a budget).
    """
    gpu = gpu_available() if gpu is None else gpu
    for spec, size in _candidates(count, dim, gpu):
        if memory_budget is None or size <= memory_budget:
            spec.memory_budget = memory_budget
            return spec
    smallest, size = min(_candidates(count, dim, gpu), key=lambda candidate: candidate[1])
    if strict:
        raise MemoryBudgetError(
            f"{count} vectors of {dim} dimensions need at least {_human(size)} as {smallest.factory or smallest.type}; "
            f"the memory budget is {_human(memory_budget or 0)}"
        )
    smallest.memory_budget = memory_budget
    return smallest


def _candidates(count: int, dim: int, gpu: bool) -> list[tuple[IndexSpec, int]]:
    """Index types in order of preference for this size, each with its estimated bytes."""
    flat_vector = 4 * dim + ID_BYTES
    candidates: list[tuple[IndexSpec, int]] = []
    if count <= FLAT_MAX_VECTORS:
        candidates.append((IndexSpec("flat"), count * flat_vector))
    elif count <= HNSW_MAX_VECTORS and not gpu:
        graph = int(2.25 * HNSW_NEIGHBOURS * 4)  # bottom layer 2M links, upper layers ~1/M of that
        candidates.append((IndexSpec("hnsw", f"HNSW{HNSW_NEIGHBOURS},Flat"), count * (flat_vector + graph)))
    nlist = list_count(count)
    coarse = f"IVF{nlist}"
    centroids = nlist * dim * 4
    candidates.append((IndexSpec("ivf", f"{coarse},Flat"), count * flat_vector + centroids))
    candidates.append((IndexSpec("ivf", f"{coarse},SQ8", rerank=RERANK["SQ8"]), count * (dim + ID_BYTES) + centroids))
    fine = dim // 2  # 4-bit fast-scan codes of 2 dimensions each: half SQ4's bytes, better candidates (no FAISS GPU form)
    if count >= PQ_MIN_TRAINING and not gpu and dim % 2 == 0 and fine // 2 > max(PQ_SUBQUANTIZERS):
        spec = IndexSpec("ivf", f"{coarse},PQ{fine}{FAST_SCAN_MARK}r", rerank=RERANK["PQfs"])
        candidates.append((spec, count * (fine // 2 + ID_BYTES) + centroids))
    candidates.append((IndexSpec("ivf", f"{coarse},SQ4", rerank=RERANK["SQ4"]), count * (dim // 2 + ID_BYTES) + centroids))
    if count >= PQ_MIN_TRAINING:
        for m in (m for m in PQ_SUBQUANTIZERS if dim % m == 0 and m < dim):
            candidates.append((IndexSpec("ivf", f"{coarse},PQ{m}", rerank=RERANK["PQ"]), count * (m + ID_BYTES) + centroids))
    return candidates


def resolve_spec(spec: IndexSpec, count: int, dim: int, gpu: bool | None = None) -> IndexSpec:
    """`spec` while it is still the choice for `count` vectors (keeping its tuned parameters)
    or is pinned (and can be trained on `count` vectors); else the choice."""
    if spec.pinned and trainable(spec, count):
        return spec
    chosen = choose_spec(count, dim, spec.memory_budget, gpu, strict=False)
    if (chosen.type, chosen.factory) == (spec.type, spec.factory):
        if chosen.rerank and not spec.rerank:  # chosen before codes were reranked: rerank them now
            return replace(spec, rerank=chosen.rerank)
        return spec
    if chosen.fast_scan and spec.factory == (chosen.factory or "").replace(f"PQ{dim // 2}{FAST_SCAN_MARK}r", f"PQ{dim // 4}"):
        # chosen before fast-scan codes, at the same bytes: kept (its rerank with it) until `clipdex
        # optimize` builds anew, rather than rebuilt by the next import that outgrows nothing
        return spec if spec.rerank else replace(spec, rerank=RERANK["PQ"])
    return chosen


def trainable(spec: IndexSpec, count: int) -> bool:
    """Whether `count` vectors are enough to train `spec`'s quantizers (k-means needs a point per centroid)."""
    if spec.type != "ivf":
        return True
    nlist = _list_count_of(spec)
    pq = re.search(r"PQ\d+(?:x(\d+))?", spec.factory or "")
    return count >= nlist and (pq is None or count >= 2 ** int(pq.group(1) or 8))


def build_index(dim: int, spec: IndexSpec, ids: np.ndarray, vectors: np.ndarray, seed: int = 0, resolve: bool = True) -> VectorIndex:
    """A new index holding `vectors` under `ids`: of type `spec`, or of the choice for their
    number when `spec` no longer fits it (see `resolve_spec`; `resolve=False` keeps `spec`)."""
    vectors = vectors.reshape(len(ids), dim) if len(ids) else np.zeros((0, dim), np.float32)
    if resolve:
        spec = resolve_spec(spec, len(ids), dim)
    index = VectorIndex(dim, spec)
    if not index.is_trained:
        index.train(training_sample(vectors, training_size(spec, len(ids)), seed))
    if spec.type == "hnsw":
        index.hnsw_graph().hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    for start in range(0, len(ids), ADD_CHUNK):
        index.add(ids[start : start + ADD_CHUNK], vectors[start : start + ADD_CHUNK])
    return index


def build_index_from(dim: int, spec: IndexSpec, source: VectorCollection, seed: int = 0, resolve: bool = True,
                     ids: np.ndarray | None = None, scratch: Path | None = None) -> VectorIndex:
    """`build_index` over every vector of `source` (the catalog), streamed: the quantizers
    train on the same random sample `build_index` draws, then the vectors are added a
    chunk at a time, so memory holds the index and one chunk, never a copy of them all.
    `ids`: the source's ids, sorted, when the caller has them already. `scratch`: a folder
    where an inverted file too big to grow in memory is built in shards
    (`clipdex.search.index.sharded`); None builds it in memory."""
    from clipdex.search.index.sharded import IndexBuilder

    ids = np.sort(np.asarray(source.ids(), dtype=np.int64)) if ids is None else ids
    if resolve:
        spec = resolve_spec(spec, len(ids), dim)
    index = VectorIndex(dim, spec)
    if not index.is_trained:
        rows = training_rows(len(ids), training_size(spec, len(ids)), seed)
        index.train(_gathered(source, ids[rows], dim))
    if spec.type == "hnsw":
        index.hnsw_graph().hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    builder = IndexBuilder(index, scratch, len(ids))
    try:
        for chunk_ids, vectors in source.iter_vectors():
            builder.add(chunk_ids, vectors)
        return builder.finish()
    except BaseException:
        builder.abandon()
        raise


def _gathered(source: VectorCollection, ids: np.ndarray, dim: int) -> np.ndarray:
    """The vectors of `ids` (sorted) in one array filled chunk by chunk: a training sample is
    held once (410,000 rows, 840 MB, for 8,192 lists), never as chunks and their concatenation."""
    sample = np.empty((len(ids), dim), dtype=np.float32)
    done = 0
    for _, vectors in source.iter_vectors(ids.tolist()):
        sample[done : done + len(vectors)] = vectors
        done += len(vectors)
    return sample[:done]


def training_size(spec: IndexSpec, count: int) -> int:
    nlist = _list_count_of(spec)
    wanted = TRAINING_POINTS_PER_LIST * nlist
    if "PQ" in (spec.factory or ""):
        wanted = max(wanted, PQ_MIN_TRAINING)
    return min(count, wanted)


def _list_count_of(spec: IndexSpec) -> int:
    match = re.match(r"IVF(\d+)", spec.factory or "")
    return int(match.group(1)) if match else 1


def training_sample(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """`size` rows drawn at random (in storage order, for locality)."""
    if size >= len(vectors):
        return vectors
    return vectors[training_rows(len(vectors), size, seed)]


def training_rows(count: int, size: int, seed: int = 0) -> np.ndarray:
    """The rows `training_sample` draws: all of them when `size` >= `count`."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"
