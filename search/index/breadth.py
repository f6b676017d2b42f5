"""The search breadth chosen per query from the query itself.

An approximate index (IVF's nprobe, HNSW's efSearch) needs a much wider search for a query
that lies far from every stored vector (a text in CLIP space, a backend's own query
vectors) than for one that lies among them (an image). The kind of a query cannot be read
from where it came from: a backend sends raw vectors, and a text-like vector sent as a
vector would be searched with an image's breadth. So the breadth is read from what a
cheap first search finds (in the spirit of Li et al., "Improving approximate nearest
neighbor search through learned adaptive early termination", SIGMOD 2020, with a rule
simple enough to store in the library's manifest):

1. search at `first`, the narrowest breadth any tuned kind needs;
2. the best score that search found (the query's own copy left out) says how far the
   query lies from the stored vectors: a query whose best match scores 0.9 sits among
   them, one whose best scores 0.3 sits where CLIP puts a text;
3. the rule maps that score to a breadth (a step function, wider for lower scores), and
   queries that need more are searched again at their breadth.

`tune_rule` fits the step function in `clipdex optimize` on every query sample together
(image-like, text-like and the user's `--queries`): the queries are cut into bands of the
first search's best score, and each band gets the breadth tuned for the kinds of query
found in it (each kind's breadth is tuned on the whole kind, with margins, so it holds
for queries of the kind that were not in the sample). Lower bands never get less than
higher ones, so a score that falls between the tuned bands errs wide.

A finer rule was tried first: each band the smallest breadth whose recall over the
band's own tuning queries reached the target. It met the target on its tuning queries
and was 20-40% narrower for text-like ones, but it learned the sample rather than the
kind: generated text-like queries with another modality-gap direction got recall@10 0.85
where the kind's breadth gives 0.90 (tests/test_query_kinds.py holds that case).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np

BAND_QUERIES = 40  # tuning queries per band of the first search's best score (at least)
MAX_BANDS = 12
BAND_SHARE = 0.1  # a kind with at least this share of a band's queries sets its breadth
SELF_SCORE = 0.9999  # a hit scoring this much is the query itself (a stored item searched by its vector)


@dataclass
class BreadthRule:
    """A breadth per query from the best score of a first search at `first`.

    `floors` are the lower bounds of the score bands, highest first; `breadths[i]` is the
    breadth for scores ≥ `floors[i]` (and below the band above); `breadths` has one more
    entry, `breadths[-1]`, the widest, for scores under the last floor and for a first
    search that found nothing."""

    first: int
    floors: list[float]
    breadths: list[int]

    def breadth_for(self, scores: np.ndarray) -> np.ndarray:
        """The breadth for each best score (NaN: nothing found: the widest)."""
        scores = np.asarray(scores, dtype=np.float64)
        chosen = np.full(len(scores), self.breadths[-1], dtype=np.int64)
        for floor, breadth in reversed(list(zip(self.floors, self.breadths))):
            chosen[scores >= floor] = breadth
        return np.maximum(chosen, self.first)

    def describe(self) -> str:
        low, high = min(self.breadths + [self.first]), max(self.breadths + [self.first])
        return f"{low}..{high} by the best score of a first search at {self.first}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "BreadthRule | None":
        if not data:
            return None
        floors = [float(value) for value in data.get("floors", [])]
        breadths = [int(value) for value in data.get("breadths", [])]
        if len(breadths) != len(floors) + 1:
            return None
        return cls(int(data.get("first", min(breadths))), floors, breadths)


def best_scores(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """What the rule reads from a first search's (scores, ids): each row's best score, the
    query's own copy left out (a hit at `SELF_SCORE` or more: a stored item searched by its
    vector finds itself first, which says nothing of how far its neighbours lie). NaN
    where the search found nothing else."""
    usable = (ids >= 0) & (scores < SELF_SCORE)
    first = np.argmax(usable, axis=1)
    rows = np.arange(len(scores))
    return np.where(usable[rows, first], scores[rows, first], np.nan) if len(scores) else np.zeros(0)


def bands(scores: np.ndarray) -> list[float]:
    """Band floors (highest first) at quantiles of the tuning queries' best first-search
    scores; each floor is the lowest score of its band, so a score that falls between two
    bands counts in the lower, wider one."""
    finite = np.sort(np.asarray(scores, dtype=np.float64)[np.isfinite(scores)])
    count = max(1, min(MAX_BANDS, len(finite) // BAND_QUERIES))
    floors = [float(finite[int(len(finite) * part / count)]) for part in range(count - 1, 0, -1)]
    return sorted(set(floors), reverse=True)


def band_of(scores: np.ndarray, floors: list[float]) -> np.ndarray:
    """Each score's band: 0 for the highest, `len(floors)` under every floor (and NaN)."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-math.inf)
    return np.sum(scores[:, None] < np.asarray(floors, dtype=np.float64)[None, :], axis=1) if floors else np.zeros(len(scores), np.int64)


def tune_rule(
    first: int,
    first_scores: np.ndarray,
    kinds: np.ndarray,
    kind_breadths: dict[str, int],
    recall_with: Callable[[np.ndarray], np.ndarray],
    target: float | Mapping[str, float],
    margin: Callable[[np.ndarray], float],
    plateaus: dict[str, float] | None = None,
) -> BreadthRule:
    """Fit the rule on tuning queries of every kind together.

    `first_scores`: each query's best score at `first` (its own item left out); `kinds`:
    each query's kind; `kind_breadths`: the breadth tuned for each kind alone (it meets the
    target on that kind's tuning queries); `recall_with(breadths)`: every query's recall@10
    at the given per-query breadths; `target`: one recall@10 for every kind, or each kind's own.

    Each band gets the widest breadth of the kinds that make up at least `BAND_SHARE` of it,
    and no band less than the band above it. Then each kind's mean recall under the rule
    must clear `target + margin(its recalls)` (a kind in `plateaus`, which no breadth takes to the
    target, its plateau's recall instead); a kind that falls short has every band it reaches
    widened to its own breadth, which is known to clear it."""
    plateaus = plateaus or {}

    def needed(kind: str, recalls: np.ndarray) -> float:
        wanted = target if isinstance(target, (int, float)) else target[kind]
        return plateaus[kind] if kind in plateaus else min(1.0, wanted + margin(recalls))

    floors = bands(first_scores)
    member = band_of(first_scores, floors)
    chosen = [first] * (len(floors) + 1)
    for band in range(len(chosen)):
        inside = kinds[member == band]
        for kind in np.unique(inside):
            if np.mean(inside == kind) >= BAND_SHARE:
                chosen[band] = max(chosen[band], kind_breadths[str(kind)])
    for _ in range(len(kind_breadths) + 1):
        for band in range(1, len(chosen)):  # a lower score never gets a narrower search
            chosen[band] = max(chosen[band], chosen[band - 1])
        rule = BreadthRule(first, floors, chosen)
        recalls = recall_with(rule.breadth_for(first_scores))
        short = [str(kind) for kind in np.unique(kinds) if recalls[kinds == kind].mean() < needed(str(kind), recalls[kinds == kind])]
        if not short:
            break
        for kind in short:
            for band in np.unique(member[kinds == kind]):
                chosen[int(band)] = max(chosen[int(band)], kind_breadths[kind])
    return rule
