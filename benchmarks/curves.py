"""What `ann_peers.py` measures a recall–throughput curve with, for clipdex and for each peer alike.

numpy and the standard library only: the peers' scripts import it too, in their own virtual
environment (numpy 1.25, no clipdex).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable

import numpy as np

K = 10
MIN_CURVE_QPS = 20  # a curve stops after its first point below this (clipdex at 10M: nprobe 1024, 17/s)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def recall(found_rows: np.ndarray, truth: np.ndarray) -> float:
    """Recall@K of each row of `found_rows` against the exact top K of `truth`, averaged."""
    return float(np.mean([len(set(row.tolist()) & set(want.tolist())) / K for row, want in zip(found_rows[:, :K], truth)]))


def timed_batch(search: Callable[[np.ndarray], Any], queries: np.ndarray, min_seconds: float = 2.0) -> tuple[Any, float]:
    """The rows a batched search finds, and queries per second (repeated for `min_seconds`, after
    one batch untimed: the pages it reads, from disk when the building pushed them out of the
    cache, are a server's working set, not its steady speed)."""
    search(queries)
    started, rounds = time.perf_counter(), 0
    while True:
        found = search(queries)
        rounds += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return found, rounds * len(queries) / elapsed


def worth_going_on(points: list[dict[str, Any]]) -> bool:
    """Whether a curve measured up to its last point goes on to a wider search: not at recall
    0.995 (as good as it gets), nor after a doubling that gained less than 0.002 (the codes'
    plateau), nor below MIN_CURVE_QPS (each wider point takes twice as long, for a recall no
    one serves at that speed)."""
    if points[-1]["recall"] >= 0.995 or (len(points) > 1 and points[-1]["recall"] - points[-2]["recall"] < 0.002):
        return False
    return points[-1]["qps"] >= MIN_CURVE_QPS


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
