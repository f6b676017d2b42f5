"""Ranking a text query by meaning and by words at once: fusion, the adaptive cutoff, date order.

Pure functions on ids and scores (no catalog, no index): the searcher gathers the two
rankings and the scores, this module decides the order.

- `fuse`: reciprocal-rank fusion (Cormack et al. 2009): an item's fused score is
  Σ 1 / (RRF_K + rank) over the rankings it is in. It needs no calibration between a
  cosine and a BM25 score, which mean different things on every query and backend (BM25 on
  SQLite, ts_rank on PostgreSQL); an item both rankings place well beats one that only one
  ranking places first; and each ranking's first stays in the fused top three (at most one
  other item, the best fused, above it: `_firsts_kept`). Measured
  against score blends on a labelled set in benchmarks/README.md ("hybrid ranking").
- `standing_out`: the adaptive cutoff of `--confident`: a hit is kept when its cosine stands
  out from the query's cosines over the library (a sample of it): at least CONFIDENT_Z
  standard deviations above their mean; a hit whose words matched is kept too. A fixed
  cosine threshold fails across queries because each query's cosines sit at their own level.
- `date_order`: the best k by relevance, shown by capture time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RRF_K = 60  # the constant of the original paper; small k lets one ranking's first place dominate
CONFIDENT_Z = 2.0  # the best precision and recall together on the labelled set: benchmarks/README.md


def fuse(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[int]:
    """The ids of all `rankings` (each best first, no repeats) in reciprocal-rank-fusion order,
    with each ranking's first kept near the top (`_firsts_kept`); ties go to the id with the better
    rank in any single ranking, then to the earlier ranking."""
    fused: dict[int, float] = {}
    best: dict[int, tuple[int, int]] = {}
    for which, ranking in enumerate(rankings):
        for rank, item_id in enumerate(ranking, start=1):
            fused[item_id] = fused.get(item_id, 0.0) + 1.0 / (k + rank)
            best[item_id] = min(best.get(item_id, (rank, which)), (rank, which))
    order = sorted(fused, key=lambda item_id: (-fused[item_id], best[item_id]))
    return _firsts_kept(order, {ranking[0] for ranking in rankings if ranking})


def _firsts_kept(order: list[int], firsts: set[int]) -> list[int]:
    """`order` with no more than one other item above any ranking's first: the fused top three
    (of two rankings) always holds both firsts. Plain RRF can sink a ranking's first below many
    items that both rankings place in the middle (two ranks of 30 outscore one rank of 1 when
    k = 60), so a page of hits could lose the one item a mode was surest of."""
    if not firsts:
        return order
    last_first = max(order.index(item_id) for item_id in firsts)
    head = order[: last_first + 1]
    others = [item_id for item_id in head if item_id not in firsts]
    if len(others) <= 1:
        return order
    kept = [item_id for item_id in head if item_id in firsts or item_id == others[0]]
    return kept + others[1:] + order[last_first + 1 :]


def standing_out(cosines: dict[int, float], background: np.ndarray, keep: set[int] = frozenset(),  # type: ignore[assignment]
                 z: float = CONFIDENT_Z) -> set[int]:
    """The ids whose cosine is at least `z` standard deviations above the mean of `background`
    (the query's cosines over a sample of the library), and those in `keep` (their words matched)."""
    if len(background) < 2:
        return set(cosines) | set(keep)
    mean, spread = float(np.mean(background)), float(np.std(background))
    cutoff = mean + z * max(spread, 1e-6)
    return {item_id for item_id, cosine in cosines.items() if cosine >= cutoff} | set(keep)


def date_order(hits: list[Any], newest_first: bool) -> list[Any]:
    """`hits` by their capture time (`metadata["taken_at"]`, ISO text), oldest first or newest first;
    hits without one last, in their relevance order."""
    dated = [hit for hit in hits if hit.metadata.get("taken_at")]
    undated = [hit for hit in hits if not hit.metadata.get("taken_at")]
    return sorted(dated, key=lambda hit: str(hit.metadata["taken_at"]), reverse=newest_first) + undated
