"""The vector index: a FAISS index whose ids are catalog item ids.

The index is derived data. It is saved atomically (temporary file, then rename) with a
stamp naming the catalog generation it reflects; readers catch it up from the
catalog's change log, or rebuild it, when it lags.

Three types (`IndexSpec.type`), chosen by `clipdex.search.index.choice`:

- "flat": exact inner product (`IndexIDMap2(IndexFlatIP)`).
- "ivf": an inverted file (`IVF{nlist},Flat|SQ8|PQ{m}`), ids stored in its lists; searched
  with `nprobe` lists.
- "hnsw": a graph (`IndexIDMap(IndexHNSWFlat)`), searched with `efSearch`. FAISS cannot
  remove from an HNSW graph, so a removed vector is a tombstone: its id in the id map
  becomes negative (-1 - position) and every search excludes negative ids with a
  selector. When tombstones pass `HNSW_COMPACT_FRACTION` of the graph, it is rebuilt
  from its live vectors.

Filtered searches return exactly min(k, matches) hits on every type: small filtered
sets are scored exactly (from the index's own vectors, or the catalog's when the index
holds quantized codes), larger ones search wider until enough matches come back.
Unfiltered searches run on the GPU when FAISS sees one (see `GpuSettings`); removals
always go through the CPU copy, which stays the one that is saved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Protocol, Sequence

import numpy as np

from clipdex.search.atomic import write_atomic, write_json_atomic
from clipdex.search.catalog.vector_rows import concatenated
from clipdex.search.errors import CorruptLibrary, GpuUnavailable

if TYPE_CHECKING:
    from clipdex.search.index.breadth import BreadthRule
    from clipdex.search.index.coarse import CentroidGroups

INDEX_FILE = "vectors.faiss"
STAMP_FILE = "vectors.json"

# A filtered search whose filter matches at most this many items scores them exactly.
EXACT_FILTER_MAX = 20_000
# Rebuild an HNSW graph when this fraction of its nodes are tombstones.
HNSW_COMPACT_FRACTION = 0.25
# The widest HNSW search before falling back to exact scoring.
HNSW_MAX_EF_SEARCH = 4096
# Index files at least this large are memory-mapped when loaded (POSIX only).
MMAP_MIN_BYTES = 64 << 20
COPY_CHUNK = 8 << 20
# FAISS GPU indexes answer k and nprobe up to this; larger searches stay on the CPU.
GPU_MAX_K = 2048
DEFAULT_NPROBE_FRACTION = 1 / 16
DEFAULT_EF_SEARCH = 64
# From this many IVF lists on (about 3 million vectors), the coarse quantizer is trained, and a
# vector added is assigned its list, in two levels (`clipdex.search.index.coarse`): 8,192
# centroids trained on 409,600 samples by one k-means are 34 TFLOP, five minutes of a core,
# against under 20 s; 10 million vectors compared with each of 8,192 centroids are 84 TFLOP, against
# two minutes through groups of centroids (which agree with the exact choice for 99.99% of
# CLIP-like vectors; the others go to a list whose centroid is about as near). Searches still compare a
# query with every centroid (a flat quantizer, exact, and what FAISS GPUs take).
TWO_LEVEL_MIN_LISTS = 4096
RERANK_QUERY_CHUNK = 256  # queries whose candidates' vectors are read at once when reranking
EXACT_QUERY_BLOCK = 1_024  # queries scored against a chunk of vectors at once by `exact_top_k`

# Query kinds with search breadths of their own (see `IndexSpec.search_params_by_kind`).
QUERY_KINDS = ("image", "text")

FAST_SCAN_MARK = "x4fs"  # in a factory string: 4-bit fast-scan codes (`clipdex.search.index.fastscan`)

GPU_ENV = "CLIPDEX_GPU"  # auto (default): use GPUs when FAISS sees one; on: require one; off: never
GPU_MULTI_ENV = "CLIPDEX_GPU_MULTI"  # replicate (default): a full copy per GPU; shard: split across GPUs
GPU_FP16_ENV = "CLIPDEX_GPU_FP16"  # 1: float16 storage for flat vectors (and IVF-PQ lookup tables)


@dataclass
class IndexSpec:
    """How the FAISS index is built and searched; recorded in the stamp and the manifest."""

    # "flat" (exact inner product), "ivf" or "hnsw"; see `clipdex.search.index.choice`.
    type: str = "flat"
    # The FAISS factory string, for types built through `faiss.index_factory`.
    factory: str | None = None
    # Search-time parameters (nprobe, efSearch) tuned by `clipdex optimize`: for queries of
    # a kind without its own entry below (and for clipdex versions that know no kinds).
    search_params: dict[str, Any] = field(default_factory=dict)
    # The same, tuned separately per query kind (`QUERY_KINDS`): "image" for queries that lie
    # among the stored vectors (an image, a stored item, a raw vector), "text" for texts,
    # which sit far from every image in CLIP space and need a wider search for the same recall.
    search_params_by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The breadth chosen per query from the query itself (`clipdex.search.index.breadth`), tuned by
    # `clipdex optimize` on every kind together; when present, the kinds' parameters above
    # are used by nothing but clipdex versions that know no rule.
    breadth_rule: dict[str, Any] | None = None
    # The memory budget in bytes the type was chosen under; later rebuilds keep to it.
    memory_budget: int | None = None
    # True when asked for explicitly: rebuilds keep the type whatever the library's size
    # (False: a rebuild may switch to the type `clipdex.search.index.choice` picks for the size).
    pinned: bool = False
    # Quantized codes (SQ, PQ) only rank candidates: with `rerank` = r, a search for k hits takes
    # the codes' best r·k and orders them by the stored vectors (the catalog's, read by id: they
    # cost no memory), so the codes' error costs no recall. 0: the codes' order is the answer.
    rerank: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def keeps_whole_vectors(self) -> bool:
        """True when the index stores the vectors unquantized (flat, HNSW*,Flat, IVF*,Flat)."""
        return self.type == "flat" or (self.factory or "").endswith(",Flat")

    @property
    def fast_scan(self) -> bool:
        """Whether the index holds 4-bit fast-scan codes (`clipdex.search.index.fastscan`): read into
        memory (FAISS maps no block lists), and with no FAISS GPU form."""
        return self.type == "ivf" and FAST_SCAN_MARK in (self.factory or "")

    @property
    def reranks_codes(self) -> bool:
        """Whether searches order the codes' candidates by the stored vectors (`rerank`)."""
        return self.rerank > 0 and not self.keeps_whole_vectors

    def params_for(self, query_kind: str | None) -> dict[str, Any]:
        """The search parameters for queries of `query_kind` (None: the kind-less ones)."""
        return self.search_params_by_kind.get(query_kind or "", self.search_params)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "IndexSpec":
        data = data or {}
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True)
class GpuSettings:
    """Whether and how searches use GPUs; read from the environment."""

    mode: str = "auto"  # auto | on | off
    multi: str = "replicate"  # replicate | shard, when FAISS sees several GPUs
    float16: bool = False

    @classmethod
    def from_environment(cls) -> "GpuSettings":
        aliases = {"1": "on", "true": "on", "yes": "on", "force": "on", "0": "off", "false": "off", "no": "off"}
        raw = os.environ.get(GPU_ENV, "auto").strip().lower() or "auto"
        mode = aliases.get(raw, raw)
        multi = os.environ.get(GPU_MULTI_ENV, "replicate").strip().lower() or "replicate"
        if mode not in ("auto", "on", "off"):
            raise GpuUnavailable(f"{GPU_ENV} must be auto, on or off, not {raw!r}")
        if multi not in ("replicate", "shard"):
            raise GpuUnavailable(f"{GPU_MULTI_ENV} must be replicate or shard, not {multi!r}")
        float16 = os.environ.get(GPU_FP16_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
        return cls(mode, multi, float16)


class VectorSource(Protocol):
    """Where exact vectors come from for exact scoring (the catalog)."""

    def iter_vectors(self, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def faiss_module() -> Any:
    import faiss

    return faiss


class VectorIndex:
    """A FAISS index of normalized vectors searched by inner product (cosine)."""

    def __init__(self, dim: int, spec: IndexSpec | None = None, index: Any = None, gpu: GpuSettings | None = None,
                 build: str | None = None) -> None:
        self.dim = dim
        self.spec = spec or IndexSpec()
        self._index = index if index is not None else self._new_index()
        # A build's fast-scan index left in its file (`unread`): its vector count until it is read
        self._unread_total: int | None = None
        self._read_lock = threading.Lock()
        # Names this build of the index (built, rebuilt, tuned); kept through additions and
        # removals, saved in the stamp. A saved index of another build was replaced by another
        # process (an optimize, a rebuild): a reader loads it, where it would only catch up.
        self.build = build if build is not None else uuid.uuid4().hex
        self.gpu = gpu or GpuSettings.from_environment()
        self.mapped = False  # True while the vectors are a read-only memory map of the file
        # The file a mapped index was read from, open, while the index is as read (a sharded build's
        # merged file, `clipdex.search.index.sharded`): a save copies it rather than reading every page.
        self.backing: BinaryIO | None = None
        # Where a reranking spec (`IndexSpec.rerank`) reads the exact vectors of its candidates:
        # the catalog once a store holds the index, the vectors in memory while optimize tunes it.
        # None: the codes' order is the answer.
        self.rerank_source: VectorSource | None = None
        self._gpu_index: Any = None
        self._groups: CentroidGroups | None = None  # `_assigner`'s groups of the IVF centroids
        self._gpu_resources: list[Any] = []
        self._gpu_count: int | None = None
        self._gpu_lock = threading.Lock()  # FAISS GPU indexes are not safe for concurrent use; CPU ones are for searching
        self._tombstones = self._count_tombstones()

    @classmethod
    def unread(cls, dim: int, spec: IndexSpec, backing: BinaryIO, ntotal: int) -> "VectorIndex":
        """The index in the open file `backing` (FAISS's format), read on first use. An import that
        builds a fast-scan index (read into memory whole: 1.36 GB at ten million vectors) only saves
        it, by copying the file: its memory stays what building it took however big the index."""
        index = cls(dim, spec, index=faiss_module().IndexFlatIP(dim))  # a stand-in, dropped at once: not the spec's own
        index._index, index._unread_total, index.backing = None, ntotal, backing
        return index

    @property
    def index(self) -> Any:
        """The FAISS index (read from `backing` on first use when the build left it there: `unread`)."""
        return self._index if self._index is not None else self._read_unread()

    @index.setter
    def index(self, value: Any) -> None:
        self._index = value

    def _read_unread(self) -> Any:
        """Read the index an `unread` build left in `backing` (once, whichever thread asks first)."""
        with self._read_lock:
            if self._index is None:
                assert self.backing is not None
                faiss = faiss_module()
                self.backing.seek(0)
                self._index = faiss.read_index(faiss.PyCallbackIOReader(self.backing.read, COPY_CHUNK))
                self._unread_total = None
            return self._index

    def _new_index(self) -> Any:
        faiss = faiss_module()
        if self.spec.type == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if self.spec.type == "ivf" and self.spec.factory:
            index = faiss.index_factory(self.dim, self.spec.factory, faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            if isinstance(ivf, faiss.IndexIVFPQ):
                # FAISS's factory turns on polysemous training (PQ codes reordered so that their Hamming
                # distances mean something), for a Hamming filter no search here uses: 95 of the 114 s
                # that training IVF8192,PQ128 on 409,600 vectors took, the codes' distances unchanged
                ivf.do_polysemous_training = False
            return index
        if self.spec.type == "hnsw" and (self.spec.factory or "").endswith(",Flat"):  # tombstone compaction needs whole vectors
            return faiss.IndexIDMap(faiss.index_factory(self.dim, self.spec.factory, faiss.METRIC_INNER_PRODUCT))
        raise CorruptLibrary(f"unknown vector index type {self.spec.type!r} (factory {self.spec.factory!r})")

    # -- contents -----------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """The number of live vectors (HNSW tombstones not counted)."""
        if self._index is None and self._unread_total is not None:
            return self._unread_total
        return int(self.index.ntotal) - self._tombstones

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def tombstones(self) -> int:
        return self._tombstones

    def train(self, vectors: np.ndarray) -> None:
        """Train the quantizers (IVF, SQ, PQ) on a sample; other types need no training. From
        `TWO_LEVEL_MIN_LISTS` lists on, the IVF centroids are trained in two levels first (FAISS
        then trains only the codes, on the residuals to them: on as many rows as it would draw).

        A float16 sample (an import of float16 files) is held as it is and turned into unit
        float32 rows a part at a time where the two levels train: at ten million, 420 MB
        rather than 840 MB, the largest thing an import holds."""
        if self.index.is_trained:
            return
        from clipdex.search.index.choice import training_rows
        from clipdex.search.index.coarse import two_level_centroids, unit_single

        vectors = np.asarray(vectors).reshape(-1, self.dim)
        if self.spec.type == "ivf":
            faiss = faiss_module()
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.nlist >= TWO_LEVEL_MIN_LISTS and len(vectors) > ivf.nlist and ivf.quantizer.ntotal == 0:
                spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
                ivf.quantizer.add(two_level_centroids(vectors, ivf.nlist, spherical=spherical))
                codes = int(ivf.train_encoder_num_vectors())  # 0: every row (FAISS's own rule)
                if 0 < codes < len(vectors):
                    vectors = vectors[training_rows(len(vectors), codes, 1234)]
        self.index.train(np.ascontiguousarray(vectors) if vectors.dtype == np.float32 else unit_single(vectors))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        self._make_writable()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        assigner = self._assigner()
        if assigner is None:
            self.index.add_with_ids(vectors, ids)
        else:
            faiss = faiss_module()
            lists = assigner.assign(vectors)
            ivf = faiss.extract_index_ivf(self.index)
            if self.fast_scan:
                from clipdex.search.index.fastscan import add_assigned

                add_assigned(ivf, ids, vectors, lists)
            else:
                ivf.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        self._gpu_index = None

    @property
    def fast_scan(self) -> bool:
        """See `IndexSpec.fast_scan`."""
        return self.spec.fast_scan

    def _assigner(self) -> "CentroidGroups | None":
        """The groups of IVF centroids that assign added vectors their lists (see
        `TWO_LEVEL_MIN_LISTS`), made on first use; None: FAISS compares with every centroid."""
        if self.spec.type != "ivf" or not self.index.is_trained:
            return None
        if self._groups is None:
            faiss = faiss_module()
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.nlist < TWO_LEVEL_MIN_LISTS or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
                return None
            from clipdex.search.index.coarse import CentroidGroups

            self._groups = CentroidGroups(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        return self._groups

    def remove(self, ids: np.ndarray | list[int]) -> int:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        self._make_writable()
        self._gpu_index = None
        if self.spec.type == "hnsw":
            return self._bury(ids)
        return int(self.index.remove_ids(faiss_module().IDSelectorBatch(ids)))

    def ids(self) -> np.ndarray:
        if self.spec.type == "ivf":
            return _inverted_list_ids(faiss_module().extract_index_ivf(self.index))
        ids = self._id_map()
        return ids[ids >= 0] if self._tombstones else ids

    def _id_map(self) -> np.ndarray:
        return faiss_module().vector_to_array(self.index.id_map).astype(np.int64)

    def _make_writable(self) -> None:
        """A memory-mapped index is read-only (FAISS aborts on writes): copy it into memory first."""
        if self._index is None:  # left unread in its file: read before the file is let go
            self._read_unread()
        if self.mapped:
            faiss = faiss_module()
            self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
            self.mapped = False
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    # -- HNSW tombstones ---------------------------------------------------------------

    def _count_tombstones(self) -> int:
        if self.spec.type != "hnsw":
            return 0
        return int(np.count_nonzero(self._id_map() < 0))

    def _bury(self, ids: np.ndarray) -> int:
        """Mark the graph nodes holding `ids` as tombstones; compact when they pile up."""
        id_map = self._id_map()
        positions = np.flatnonzero(np.isin(id_map, ids) & (id_map >= 0))
        if len(positions) == 0:
            return 0
        id_map[positions] = -1 - positions
        faiss_module().copy_array_to_vector(id_map, self.index.id_map)
        self._tombstones += len(positions)
        if self._tombstones > HNSW_COMPACT_FRACTION * self.index.ntotal:
            self._compact()
        return len(positions)

    def _compact(self) -> None:
        """Rebuild the graph from its live vectors (the storage is exact: `HNSW*,Flat`)."""
        id_map = self._id_map()
        live = np.flatnonzero(id_map >= 0)
        fresh = VectorIndex(self.dim, self.spec, gpu=self.gpu)
        fresh.hnsw_graph().hnsw.efConstruction = self.hnsw_graph().hnsw.efConstruction
        for start in range(0, len(live), 65_536):
            positions = live[start : start + 65_536]
            fresh.add(id_map[positions], self.index.index.reconstruct_batch(positions))
        self.index, self._tombstones = fresh.index, 0

    def hnsw_graph(self) -> Any:
        """The `IndexHNSWFlat` inside the id map (HNSW type only)."""
        return faiss_module().downcast_index(self.index.index)

    # -- search -------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed_ids: np.ndarray | None = None,
        source: VectorSource | None = None,
        query_kind: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; missing places have id -1.

        The search breadth of an approximate index is chosen per query from the query
        itself when `clipdex optimize` tuned a rule for it (`clipdex.search.index.breadth`):
        a text-like vector gets a text's breadth however it arrives. Indexes tuned before
        that use `query_kind` ("image", "text"; see `QUERY_KINDS`) to pick the breadth tuned
        for such queries; None uses the kind-less parameters.

        With `allowed_ids`, only those ids can be returned, and each row holds
        min(k, matches) hits: the best-scoring among them (the filter works inside the
        search, not after it). On approximate types, filters matching at most
        `EXACT_FILTER_MAX` items are scored exactly (quantized indexes read the vectors
        from `source`, the catalog, when given); larger ones search wider until enough
        matches come back.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if self.ntotal == 0:
            return np.full((len(queries), 0), 0, np.float32), np.full((len(queries), 0), -1, np.int64)
        k = max(1, min(k, self.ntotal))
        if allowed_ids is not None:
            allowed_ids = np.unique(np.asarray(allowed_ids, dtype=np.int64))
        if self.spec.type == "flat":
            return self._search_flat(queries, k, allowed_ids)
        if allowed_ids is not None and len(allowed_ids) <= EXACT_FILTER_MAX:
            return self._search_exact(queries, k, allowed_ids, source)
        return self._search_approximate(queries, k, allowed_ids, query_kind)

    def _search_flat(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None and self._gpu_ready(k):
            return self._gpu_search(queries, k, 0)
        if allowed is None:
            return self.index.search(queries, k)
        selector = faiss_module().IDSelectorBatch(allowed)
        return self.index.search(queries, k, params=faiss_module().SearchParameters(sel=selector))

    def _search_approximate(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, query_kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search at the breadth the rule picks for each query (or the one tuned for
        `query_kind`), widened until every row has min(k, matches) hits."""
        matches = self.ntotal if allowed is None else len(allowed)
        fraction = matches / max(1, self.ntotal)
        rule = self.breadth_rule()
        if rule is None:
            return self._search_at(queries, k, allowed, self.search_breadth(fraction, query_kind))
        from clipdex.search.index.breadth import best_scores

        first = self._scaled(rule.first, fraction)
        hits = max(k, min(2, self.ntotal))  # a second hit, past the query's own copy
        if self.reranks and not (allowed is None and self._gpu_ready(self._candidates(hits))):
            return self._search_reranking_by_rule(queries, k, hits, allowed, first, fraction)
        scores, ids = self._search_at(queries, hits, allowed, first)
        wanted = self._breadths(rule, best_scores(scores, ids), fraction)
        scores, ids = scores[:, :k], ids[:, :k]
        for breadth in np.unique(wanted[wanted > first]):
            rows = np.flatnonzero(wanted == breadth)
            scores[rows], ids[rows] = self._search_at(np.ascontiguousarray(queries[rows]), k, allowed, int(breadth))
        return scores, ids

    def _search_reranking_by_rule(self, queries: np.ndarray, k: int, hits: int, allowed: np.ndarray | None, first: int,
                                  fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """`_search_approximate` for codes whose candidates are reranked: the codes' candidates at
        `first`, then the rule reads the best exact score among those a 2-hit search would rerank
        (the first `_candidates(2)`, as `clipdex optimize` tuned it). A query the rule sends wider
        has no more of its first candidates read and scored: at ten million vectors a text-like
        query's first search cost a third of its time, for an answer thrown away."""
        from clipdex.search.index.breadth import best_scores

        rule = self.breadth_rule()
        assert rule is not None
        codes, candidates = self._codes_with(queries, self._candidates(hits), first, allowed)
        judged = self._candidates(2)
        wanted = self._breadths(rule, best_scores(*self._reranked(queries, codes[:, :judged], candidates[:, :judged], 2)), fraction)
        scores, ids = np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
        here = np.flatnonzero(wanted <= first)
        if len(here):
            found_scores, found_ids = self._reranked(queries[here], codes[here], candidates[here], k)
            scores[here, : found_ids.shape[1]], ids[here, : found_ids.shape[1]] = found_scores, found_ids
            matches = min(k, self.ntotal if allowed is None else len(allowed))
            if matches:  # too few hits at `first` (a filter): searched again, widened by `_search_at`
                wanted[here[ids[here, matches - 1] < 0]] = -1
        for breadth in np.unique(wanted[(wanted > first) | (wanted < 0)]):
            rows = np.flatnonzero(wanted == breadth)
            scores[rows], ids[rows] = self._search_at(np.ascontiguousarray(queries[rows]), k, allowed, first if breadth < 0 else int(breadth))
        return scores, ids

    def _breadths(self, rule: "BreadthRule", best: np.ndarray, fraction: float) -> np.ndarray:
        """The rule's breadth for each best score, for a search among `fraction` of the vectors."""
        return np.array([self._scaled(int(breadth), fraction) for breadth in rule.breadth_for(best)], dtype=np.int64)

    def breadth_rule(self) -> "BreadthRule | None":
        """The per-query breadth rule `clipdex optimize` tuned, if any."""
        from clipdex.search.index.breadth import BreadthRule

        return BreadthRule.from_json(self.spec.breadth_rule)

    def _search_at(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Search at `breadth`, widened until every row has min(k, matches) hits, then exact."""
        wanted = min(k, self.ntotal if allowed is None else len(allowed))
        if allowed is None and self._gpu_ready(self._candidates(k)):
            scores, ids = self._reranked(queries, *self._gpu_search(queries, self._candidates(k), breadth), k)
            if _enough(ids, wanted):
                return scores, ids
        while True:
            scores, ids = self.search_with(queries, k, breadth, allowed)
            if _enough(ids, wanted):
                return scores, ids
            if breadth >= self.max_breadth():
                return self._search_exact(queries, k, allowed, None)
            breadth = min(breadth * 4, self.max_breadth())

    def search_breadth(self, fraction: float = 1.0, query_kind: str | None = None) -> int:
        """nprobe (IVF) or efSearch (HNSW) for a search among `fraction` of the vectors, for
        queries of `query_kind` (see `IndexSpec.params_for`).

        A filter matching a fraction f of the items needs about 1/f times the breadth to
        see as many matches as an unfiltered search does.
        """
        params = self.spec.params_for(query_kind)
        if self.spec.type == "ivf":
            nlist = faiss_module().extract_index_ivf(self.index).nlist
            base = int(params.get("nprobe") or max(1, round(nlist * DEFAULT_NPROBE_FRACTION)))
        else:
            base = int(params.get("efSearch") or DEFAULT_EF_SEARCH)
        return self._scaled(base, fraction)

    def _scaled(self, breadth: int, fraction: float) -> int:
        """`breadth` for a search among `fraction` of the vectors, within the widest."""
        return min(self.max_breadth(), max(1, math.ceil(breadth / max(fraction, 1e-9))))

    def max_breadth(self) -> int:
        if self.spec.type == "ivf":
            return int(faiss_module().extract_index_ivf(self.index).nlist)
        return HNSW_MAX_EF_SEARCH

    def search_with(
        self, queries: np.ndarray, k: int, breadth: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One CPU search of an approximate index with nprobe/efSearch = `breadth`."""
        scores, ids = self._codes_with(queries, self._candidates(k), breadth, allowed)
        return self._reranked(queries, scores, ids, k)

    def _codes_with(self, queries: np.ndarray, hits: int, breadth: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The index's own best `hits` (by its codes: the candidates a rerank orders) of one CPU search at `breadth`."""
        faiss = faiss_module()
        selector = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        elif self._tombstones:
            selector = faiss.IDSelectorRange(0, np.iinfo(np.int64).max)
        if self.spec.type == "ivf":
            params = faiss.SearchParametersIVF(nprobe=int(breadth), sel=selector)
        else:
            params = faiss.SearchParametersHNSW(efSearch=int(max(breadth, hits)), sel=selector)
        scores, ids = self.index.search(queries, hits, params=params)
        ids[ids < 0] = -1
        return scores, ids

    @property
    def reranks(self) -> bool:
        """Whether searches order the codes' candidates by the stored vectors (`IndexSpec.rerank`)."""
        return self.spec.reranks_codes and self.rerank_source is not None

    def _candidates(self, k: int) -> int:
        """How many hits to take from the codes for `k` answers."""
        return min(k * self.spec.rerank, max(k, int(self.index.ntotal))) if self.reranks else k

    def _reranked(self, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best `k` of each row's candidates by their exact scores (stored vectors), when reranking."""
        if not self.reranks or ids.shape[1] <= 0:
            return scores[:, :k], ids[:, :k]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        exact = np.full(ids.shape, -np.inf, np.float32)
        for start in range(0, len(queries), RERANK_QUERY_CHUNK):  # bounds the vectors read at once
            part = slice(start, start + RERANK_QUERY_CHUNK)
            exact[part] = self._exact_scores(queries[part], ids[part])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(exact, order, axis=1)
        best_ids = np.where(np.isfinite(best), np.take_along_axis(ids, order, axis=1), -1)
        return np.where(np.isfinite(best), best, 0.0).astype(np.float32), best_ids

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Each query's inner products with its candidates' stored vectors; -inf where a candidate is
        -1 or gone from the catalog since the index was caught up (never an answer)."""
        assert self.rerank_source is not None
        exact = np.full(ids.shape, -np.inf, np.float32)
        found_ids, found = concatenated(self.rerank_source.iter_vectors(np.unique(ids[ids >= 0]).tolist()))
        if not len(found_ids):
            return exact
        if np.any(np.diff(found_ids) <= 0):  # a source need not yield its chunks in id order
            order = np.argsort(found_ids, kind="stable")
            found_ids, found = found_ids[order], found[order]
        rows = np.clip(np.searchsorted(found_ids, ids), 0, len(found_ids) - 1)
        rows = np.ascontiguousarray(np.where((ids >= 0) & (found_ids[rows] == ids), rows, -1), dtype=np.int64)
        faiss = faiss_module()  # each query against its own candidates' rows where they lie: no gathered copy
        found = np.ascontiguousarray(found, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(exact), faiss.swig_ptr(np.ascontiguousarray(queries)), faiss.swig_ptr(found),
                                         faiss.swig_ptr(rows), self.dim, len(queries), ids.shape[1])
        return exact

    def _search_exact(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, source: VectorSource | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores over the allowed ids: from the index when it keeps whole vectors (HNSW,
        IVF-Flat), else from `source`; without one, every IVF list is probed (quantized scores)."""
        if self.spec.type == "hnsw":
            return exact_top_k(queries, k, self._hnsw_vectors(allowed))
        if source is None or allowed is None or self.keeps_whole_vectors:
            return self.search_with(queries, k, self.max_breadth(), allowed)
        return exact_top_k(queries, k, source.iter_vectors(allowed.tolist()))

    @property
    def keeps_whole_vectors(self) -> bool:
        """True when the index stores the vectors unquantized (flat, HNSW*,Flat, IVF*,Flat)."""
        return self.spec.keeps_whole_vectors

    def _hnsw_vectors(self, allowed: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        id_map = self._id_map()
        keep = id_map >= 0 if allowed is None else np.isin(id_map, allowed)
        positions = np.flatnonzero(keep)
        for start in range(0, len(positions), 65_536):
            chunk = positions[start : start + 65_536]
            yield id_map[chunk], self.index.index.reconstruct_batch(chunk)

    # -- GPU ----------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """Where unfiltered searches run: "cpu", or e.g. "gpu x2 (shard, float16)"."""
        if not self._gpu_wanted():
            return "cpu"
        count = self._gpus()
        details = [self.gpu.multi if count > 1 else "single"] + (["float16"] if self.gpu.float16 else [])
        return f"gpu x{count} ({', '.join(details)})"

    def _gpus(self) -> int:
        if self._gpu_count is None:
            self._gpu_count = int(faiss_module().get_num_gpus())
        return self._gpu_count

    def _gpu_wanted(self) -> bool:
        if self.gpu.mode == "off":
            return False
        if self._gpus() == 0:
            if self.gpu.mode == "on":
                raise GpuUnavailable(
                    f"{GPU_ENV}=on, but FAISS sees no GPU (faiss.get_num_gpus() is 0): install faiss-gpu "
                    f"with a CUDA driver, or set {GPU_ENV}=auto"
                )
            return False
        if self.spec.type == "hnsw" or self.fast_scan:
            if self.gpu.mode == "on":
                form = "HNSW index" if self.spec.type == "hnsw" else f"fast-scan index ({self.spec.factory})"
                raise GpuUnavailable(
                    f"{GPU_ENV}=on, but this library's {form} has no GPU form in FAISS; run "
                    "`clipdex optimize` on this machine (it picks a type FAISS GPUs take when a GPU is present)"
                )
            return False
        return True

    def _gpu_ready(self, k: int) -> bool:
        return k <= GPU_MAX_K and self._gpu_wanted()

    def _gpu_search(self, queries: np.ndarray, k: int, breadth: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the GPU copy; IVF with nprobe = `breadth` (set per search: it depends on the query kind)."""
        with self._gpu_lock:
            index = self._gpu()
            if self.spec.type == "ivf":
                faiss_module().GpuParameterSpace().set_index_parameter(index, "nprobe", max(1, min(breadth, GPU_MAX_K)))
            return index.search(queries, k)

    def _gpu(self) -> Any:
        if self._gpu_index is None:
            self._gpu_index, self._gpu_resources = clone_to_gpus(self.index, self.gpu, self._gpus())
        return self._gpu_index

    # -- reports ------------------------------------------------------------------------

    def bytes_per_vector(self) -> float:
        """The index's size (vectors, ids, graph, quantizer) per live vector, as saved."""
        faiss = faiss_module()
        total = int(self.index.ntotal)
        if total == 0:
            return 0.0
        if self.spec.type == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            codes = total * ivf.code_size
            if self.fast_scan:  # codes in blocks of 32 vectors, the last of a list padded
                from clipdex.search.index.fastscan import Packer

                packer = Packer(ivf)
                codes = sum(packer.blocks(ivf.invlists.list_size(j)) for j in range(ivf.nlist)) * packer.block_size
            size = codes + total * 8 + ivf.nlist * self.dim * 4 + _codebook_bytes(ivf)
        elif self.spec.type == "hnsw":
            hnsw = self.hnsw_graph().hnsw
            graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
            size = total * (4 * self.dim + 8) + graph
        else:
            size = total * (4 * self.dim + 8)
        return size / max(1, self.ntotal)

    # -- persistence ----------------------------------------------------------------

    def save(self, directory: Path, generation: int) -> None:
        """Write the index atomically, then its stamp (never ahead of the index)."""
        faiss = faiss_module()

        def write(temporary: Path) -> None:
            # Through Python, not by FAISS to a path: FAISS reports a failed write at close (a full
            # disk) only on stderr, leaving a truncated file; this way it raises OSError(ENOSPC).
            with open(temporary, "wb") as handle:
                if self.backing is not None:  # the file as built: copied in the kernel, not read through the map
                    with self._read_lock:  # the file's one offset, shared with a first search's read of it
                        self.backing.seek(0)
                        shutil.copyfileobj(self.backing, handle, COPY_CHUNK)
                else:
                    faiss.write_index(self.index, faiss.PyCallbackIOWriter(handle.write))

        with _as_os_error(directory / INDEX_FILE):
            write_atomic(directory / INDEX_FILE, write)
        stamp = {"generation": generation, "ntotal": self.ntotal, "dim": self.dim, "spec": self.spec.to_json(), "build": self.build}
        with _as_os_error(directory / STAMP_FILE):
            write_json_atomic(directory / STAMP_FILE, stamp)

    @classmethod
    def load(cls, directory: Path, mmap: bool | None = None) -> tuple["VectorIndex", int] | None:
        """The saved index and the generation it reflects at least, or None if absent.

        Index files of `MMAP_MIN_BYTES` or more are memory-mapped (`mmap=None`), so
        opening a large library reads only the pages a search touches; the first write
        copies the index into memory.
        """
        stamp_path = directory / STAMP_FILE
        index_path = directory / INDEX_FILE
        if not stamp_path.exists() or not index_path.exists():
            return None
        try:
            stamp = json.loads(stamp_path.read_text())  # read before the index: never overstates
            if mmap is None:
                mmap = os.name == "posix" and index_path.stat().st_size >= MMAP_MIN_BYTES
            spec = IndexSpec.from_json(stamp.get("spec"))
            index, mapped = read_index_file(index_path, spec, bool(mmap))
            loaded = cls(int(stamp["dim"]), spec, index, build=str(stamp.get("build", "")))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError):
            return None  # unreadable derived data: the caller rebuilds it from the catalog
        loaded.mapped = mapped
        return loaded, int(stamp["generation"])


def read_index_file(path: Path, spec: IndexSpec, mmap: bool) -> tuple[Any, bool]:
    """The FAISS index of `spec` in `path`, and whether it is memory-mapped: with `mmap`, unless it
    holds fast-scan codes (`IndexSpec.fast_scan`), which FAISS copies into memory from the map and
    keeps the map too, twice the index's size resident (at ten million vectors, 2.7 GB for 1.36)."""
    faiss = faiss_module()
    mapped = mmap and not spec.fast_scan
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0), mapped


def clone_to_gpus(index: Any, settings: GpuSettings, count: int) -> tuple[Any, list[Any]]:
    """A GPU copy of a CPU index on `count` GPUs (replicated or sharded), and its resources."""
    faiss = faiss_module()
    resources = [faiss.StandardGpuResources() for _ in range(count)]
    if count == 1:
        options = faiss.GpuClonerOptions()
        options.useFloat16 = settings.float16
        return faiss.index_cpu_to_gpu(resources[0], 0, index, options), resources
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = settings.float16
    options.shard = settings.multi == "shard"
    return faiss.index_cpu_to_gpu_multiple_py(resources, index, options), resources


def _codebook_bytes(ivf: Any) -> int:
    """The trained tables of a PQ or SQ encoder inside an IVF index."""
    ivf = faiss_module().downcast_index(ivf)
    if hasattr(ivf, "pq"):
        return int(ivf.pq.centroids.size()) * 4
    if hasattr(ivf, "sq"):
        return int(ivf.sq.trained.size()) * 4
    return 0


class ArrayVectors:
    """A `VectorSource` over vectors in memory (ids in any order): what optimize tunes a
    reranking index with, before the index joins a library and reads the catalog's."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._order = np.argsort(ids, kind="stable")
        self._ids = np.asarray(ids, dtype=np.int64)[self._order]
        self._vectors = vectors

    def iter_vectors(self, ids: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if ids is None:
            yield self._ids, np.asarray(self._vectors[self._order], dtype=np.float32)
            return
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        rows = np.clip(np.searchsorted(self._ids, wanted), 0, max(0, len(self._ids) - 1))
        present = self._ids[rows] == wanted if len(self._ids) else np.zeros(len(wanted), bool)
        yield wanted[present], np.asarray(self._vectors[self._order[rows[present]]], dtype=np.float32)


def _enough(ids: np.ndarray, wanted: int) -> bool:
    """Every row holds `wanted` hits (FAISS puts its -1 padding last)."""
    return wanted == 0 or bool(np.all(ids[:, wanted - 1] >= 0))


def exact_top_k(queries: np.ndarray, k: int, chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best (scores, ids) by inner product over streamed (ids, vectors) chunks
    (FAISS's brute force on each, merged): one pass, however many vectors. Missing places:
    score -inf, id -1."""
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, vectors in chunks:
        if len(ids) == 0:
            continue
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for start in range(0, len(queries), EXACT_QUERY_BLOCK):
            block = slice(start, start + EXACT_QUERY_BLOCK)
            scores, rows = faiss.knn(queries[block], vectors, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
            found = np.where(rows >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(rows, 0)], -1)
            merged_scores = np.concatenate([best_scores[block], np.where(rows >= 0, scores, -np.inf).astype(np.float32)], axis=1)
            merged_ids = np.concatenate([best_ids[block], found], axis=1)
            order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
            best_scores[block] = np.take_along_axis(merged_scores, order, axis=1)
            best_ids[block] = np.take_along_axis(merged_ids, order, axis=1)
    best_ids[~np.isfinite(best_scores)] = -1
    return best_scores, best_ids


def _inverted_list_ids(ivf: Any) -> np.ndarray:
    faiss = faiss_module()
    invlists = ivf.invlists
    parts = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            pointer = invlists.get_ids(list_no)
            parts.append(faiss.rev_swig_ptr(pointer, size).astype(np.int64))
            invlists.release_ids(list_no, pointer)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@contextmanager
def _as_os_error(target: Path) -> Iterator[None]:
    """A failed write as an OSError naming the file being written (e.g. ENOSPC on vectors.faiss),
    also when FAISS reports it as a RuntimeError carrying the errno's words."""
    try:
        yield
    except OSError as error:
        if error.filename:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(target)) from error
    except RuntimeError as error:
        number = _errno_in(error)
        if number is None:
            raise
        raise OSError(number, os.strerror(number), str(target)) from error


def _errno_in(error: BaseException) -> int | None:
    """The errno whose words (e.g. "No space left on device") a FAISS RuntimeError carries."""
    from clipdex.search.readonly import UNWRITABLE

    return next((number for number in sorted(UNWRITABLE) if os.strerror(number) in str(error)), None)
