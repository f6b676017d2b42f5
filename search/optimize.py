"""`clipdex optimize`: rebuild the index for the library's size, tune it, measure it.

Recall@10 is measured against exact search on held-out queries: stored vectors drawn
at random and kept out of the quantizer's training sample, each query's own item left
out of both result lists. Half of them tune the search breadth (nprobe for IVF,
efSearch for HNSW) to the smallest value reaching the target plus a small margin; the
other half measure the recall that is reported, so the figure is not the one tuned on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from clipdex.search.errors import ClipdexError
from clipdex.search.index_choice import build_index, choose_spec, training_rows, training_size
from clipdex.search.vectors import IndexSpec, VectorIndex, faiss_module

if TYPE_CHECKING:
    from clipdex.search.library import Library

RECALL_K = 10
HELD_OUT_QUERIES = 400  # split in two halves: tuning and reporting
TUNING_MARGIN = 0.01
MEASURE_SECONDS = 1.0  # time spent timing each throughput (approximate, exact)


@dataclass
class Evaluation:
    """Queries with their exact top-k ids; `own_ids` (one per query, or None) are left out of results."""

    queries: np.ndarray
    truth: np.ndarray
    own_ids: np.ndarray | None = None

    def half(self, second: bool) -> "Evaluation":
        cut = len(self.queries) // 2
        part = slice(cut, None) if second else slice(0, cut)
        own = None if self.own_ids is None else self.own_ids[part]
        return Evaluation(self.queries[part], self.truth[part], own)


@dataclass
class OptimizeReport:
    index_type: str
    factory: str | None
    search_params: dict[str, Any]
    target_recall: float
    recall_at_10: float
    target_met: bool
    queries_per_second: float  # single queries, one at a time
    exact_queries_per_second: float  # the same, by exact flat search
    speedup: float
    bytes_per_vector: float
    vectors: int
    dim: int
    held_out_queries: int
    memory_budget: int | None
    device: str
    build_seconds: float
    seconds: float
    optimized_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def held_out_evaluation(ids: np.ndarray, vectors: np.ndarray, count: int, exclude_rows: np.ndarray, seed: int = 0) -> Evaluation:
    """`count` stored vectors outside `exclude_rows` (the training sample) as queries."""
    rng = np.random.default_rng(seed + 1)
    candidates = np.setdiff1d(np.arange(len(ids)), exclude_rows) if len(exclude_rows) < len(ids) else np.arange(len(ids))
    rows = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    queries = np.ascontiguousarray(vectors[rows])
    return Evaluation(queries, exact_neighbours(queries, ids, vectors, RECALL_K, ids[rows]), ids[rows])


def exact_neighbours(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int, own_ids: np.ndarray | None = None) -> np.ndarray:
    """The exact top-k ids of each query by inner product (FAISS brute force, in blocks)."""
    faiss = faiss_module()
    extra = 0 if own_ids is None else 1
    _, rows = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), k + extra, metric=faiss.METRIC_INNER_PRODUCT)
    return _drop_own(np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), own_ids, k)


def recall_at_k(found: np.ndarray, evaluation: Evaluation, k: int = RECALL_K) -> float:
    """The mean share of each query's exact top-k found in its approximate top-k."""
    found = _drop_own(found, evaluation.own_ids, k)
    hits = [len(np.intersect1d(row[row >= 0], truth)) for row, truth in zip(found, evaluation.truth[:, :k])]
    return float(np.sum(hits) / (k * len(found)))


def _drop_own(rows: np.ndarray, own_ids: np.ndarray | None, k: int) -> np.ndarray:
    if own_ids is None:
        return rows[:, :k]
    kept = [row[row != own][:k] for row, own in zip(rows, own_ids)]
    return np.stack([np.pad(row, (0, k - len(row)), constant_values=-1) for row in kept])


def evaluate(index: VectorIndex, evaluation: Evaluation, breadth: int) -> float:
    extra = 0 if evaluation.own_ids is None else 1
    _, found = index.search_with(evaluation.queries, RECALL_K + extra, breadth)
    return recall_at_k(found, evaluation)


def tune(index: VectorIndex, evaluation: Evaluation, target: float) -> tuple[int, float]:
    """The smallest breadth (nprobe/efSearch) whose recall reaches `target`, and that recall.

    Doubles the breadth until the target is met, then bisects between the last miss and
    the first hit. When even the widest search misses, returns the widest."""
    widest = index.max_breadth()
    low, high = 0, 1 if index.spec.type == "ivf" else 16
    recall = evaluate(index, evaluation, high)
    while recall < target and high < widest:
        low, high = high, min(high * 2, widest)
        recall = evaluate(index, evaluation, high)
    while low and high - low > max(1, high // 8) and recall >= target:
        middle = (low + high) // 2
        middle_recall = evaluate(index, evaluation, middle)
        if middle_recall >= target:
            high, recall = middle, middle_recall
        else:
            low = middle
    return high, recall


def queries_per_second(search_one: Callable[[np.ndarray], Any], queries: np.ndarray, min_seconds: float = 1.0, min_queries: int = 20) -> float:
    """Single-query throughput: queries searched one at a time, for at least `min_seconds` and `min_queries`."""
    with one_faiss_thread():
        done, start = 0, time.perf_counter()
        while True:
            search_one(queries[done % len(queries)][None, :])
            done += 1
            elapsed = time.perf_counter() - start
            if (elapsed >= min_seconds and done >= min_queries) or elapsed >= 20 * min_seconds:
                return done / elapsed


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """Time single queries on one FAISS (OpenMP) thread, exact and approximate alike: one
    query is too little work to split, and on a busy machine OpenMP threads waiting for a
    core distort the timing (a server runs concurrent queries on the other cores)."""
    faiss = faiss_module()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def exact_queries_per_second(vectors: np.ndarray, queries: np.ndarray, min_seconds: float = 1.0) -> float:
    """Single-query throughput of exact flat search over `vectors` (FAISS's flat kernel)."""
    faiss = faiss_module()
    return queries_per_second(
        lambda query: faiss.knn(query, vectors, RECALL_K, metric=faiss.METRIC_INNER_PRODUCT), queries, min_seconds, min_queries=5
    )


def optimize_vectors(
    ids: np.ndarray,
    vectors: np.ndarray,
    target_recall: float = 0.95,
    memory_budget: int | None = None,
    evaluation: Evaluation | None = None,
    spec: IndexSpec | None = None,
    seed: int = 0,
    min_seconds: float | None = None,
    builder: Callable[..., VectorIndex] = build_index,
) -> tuple[VectorIndex, OptimizeReport]:
    """Build the chosen index (or `spec`) over the vectors, tune it to `target_recall` and measure it.

    `evaluation` defaults to held-out stored vectors (see the module docstring); the
    benchmark passes its own queries. `builder`: `build_index`, or one that builds the same index elsewhere
    (`clipdex.search.optimize_cluster`)."""
    started = time.perf_counter()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), -1)
    spec = spec or choose_spec(len(ids), vectors.shape[1], memory_budget)
    index = builder(vectors.shape[1], spec, ids, vectors, seed=seed, resolve=False)
    build_seconds = time.perf_counter() - started
    if evaluation is None:
        trained = training_rows(len(ids), training_size(spec, len(ids)), seed) if spec.type == "ivf" else np.zeros(0, np.int64)
        evaluation = held_out_evaluation(ids, vectors, HELD_OUT_QUERIES, trained, seed)
    recall = tune_spec(index, evaluation, target_recall)
    min_seconds = MEASURE_SECONDS if min_seconds is None else min_seconds
    qps = queries_per_second(lambda query: index.search(query, RECALL_K), evaluation.queries, min_seconds)
    exact_qps = exact_queries_per_second(vectors, evaluation.queries, min_seconds)
    report = OptimizeReport(
        index_type=index.spec.type,
        factory=index.spec.factory,
        search_params=dict(index.spec.search_params),
        target_recall=target_recall,
        recall_at_10=round(recall, 4),
        target_met=recall >= target_recall,
        queries_per_second=round(qps, 1),
        exact_queries_per_second=round(exact_qps, 1),
        speedup=round(qps / exact_qps, 1),
        bytes_per_vector=round(index.bytes_per_vector(), 1),
        vectors=len(ids),
        dim=vectors.shape[1],
        held_out_queries=len(evaluation.queries),
        memory_budget=memory_budget,
        device=index.device,
        build_seconds=round(build_seconds, 2),
        seconds=round(time.perf_counter() - started, 2),
        optimized_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return index, report


def tune_spec(index: VectorIndex, evaluation: Evaluation, target_recall: float) -> float:
    """Tune on the first half of the queries into `index.spec.search_params`; the recall on the second half."""
    if index.spec.type == "flat":
        return 1.0
    breadth, _ = tune(index, evaluation.half(second=False), min(1.0, target_recall + TUNING_MARGIN))
    index.spec.search_params = {"nprobe" if index.spec.type == "ivf" else "efSearch": breadth}
    return evaluate(index, evaluation.half(second=True), breadth)


def optimize_library(library: "Library", target_recall: float = 0.95, memory_budget: int | None = None, seed: int = 0,
                     cluster: str | None = None) -> OptimizeReport:
    """Rebuild the library's index from its catalog, tuned and measured, and record the report.

    `cluster`: a Ray address; an IVF index is then built in shards there (`clipdex.search.optimize_cluster`).

    The index is built from a snapshot while searches (and writers) go on; it is then
    caught up with any commits made meanwhile and saved under the write lock."""
    if not 0.0 < target_recall <= 1.0:
        raise ClipdexError(f"the target recall must be in (0, 1], not {target_recall}")
    generation = library.catalog.generation()
    ids, vectors = library.catalog.all_vectors()
    if len(ids) == 0:
        raise ClipdexError(f"library {library.path} is empty: index something before optimizing it")
    if cluster is None:
        index, report = optimize_vectors(ids, vectors, target_recall, memory_budget, seed=seed)
    else:
        from functools import partial

        from clipdex.search.optimize_cluster import build_index_on_cluster
        from clipdex.search.ray_cluster import ray_session

        with ray_session(cluster) as ray:
            index, report = optimize_vectors(ids, vectors, target_recall, memory_budget, seed=seed,
                                             builder=partial(build_index_on_cluster, ray, scratch=library.path))
    library.manifest.extra["optimized"] = report.to_json()
    library.adopt_vectors(index, generation)
    return report
