"""How well explanations point: the pointing game (`benchmarks/explain.py`, `tests/test_explain.py`).

Each case is an image with one target object at a known place among clutter, the query
vector that names it, and the target's box; an explanation points well when its peak
(`clipdex.search.explanation.peak_of`) falls inside the box. The centre of the image is
the baseline any map must beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from clipdex.search.explanation import peak_of, similarity_grid

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass(frozen=True)
class PointingCase:
    image: "Image.Image"
    query: np.ndarray  # the vector of the text that names the target
    box: tuple[float, float, float, float]  # left, top, right, bottom in pixels


@dataclass(frozen=True)
class PointingScore:
    hits: int  # peaks inside the target's box
    centre_hits: int  # cases whose target box holds the image's centre (the baseline)
    cases: int

    @property
    def accuracy(self) -> float:
        return self.hits / self.cases if self.cases else 0.0

    @property
    def centre_accuracy(self) -> float:
        return self.centre_hits / self.cases if self.cases else 0.0


def inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def pointing_game(cases: Iterable[PointingCase], features: Callable[["Image.Image"], np.ndarray]) -> PointingScore:
    """Score `features` (an image to its (rows, cols, dim) grid of unit vectors) on `cases`."""
    hits = centre_hits = count = 0
    for case in cases:
        width, height = case.image.size
        grid = similarity_grid(features(case.image), case.query)
        hits += inside(peak_of(grid, width, height), case.box)
        centre_hits += inside((width / 2.0, height / 2.0), case.box)
        count += 1
    return PointingScore(hits, centre_hits, count)
