"""Why is this a hit: where in an image a query matches (`clipdex explain`).

The typed result and its arithmetic, beside the query types: the `Library` facade returns
an `Explanation` (`Library.explain`), and the rooms above it (`analysis`' pointing game,
`http`) use it, so it sits below them all and imports no room.

The image's dense tower (`clipdex.search.encoders.dense`: MaskCLIP-style features, one per
grid cell, in the space of the query vectors) gives a feature per cell; the map is each
cell's cosine with the query vector. The whole image is squashed to the tower's square
input, so the grid covers exactly what is displayed (EXIF orientation applied): cell
(r, c) of a rows x cols grid is the rectangle from (c/cols, r/rows) to ((c+1)/cols,
(r+1)/rows) of the displayed image.

The peak is not the centre of the best cell: it is the centroid of the best cell's 3x3
neighbourhood, each cell weighted by how far its value rises above the map's median.
On the pointing game (benchmarks/README.md, "explain") this refinement took the demo model
from 0.59 to 0.875 of targets hit, because a coarse cell's centre often falls just outside
a small object that the cell and its neighbour share.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# The overlay: the map (bilinear, stretched over the photo) as a red-to-yellow heat layer,
# opaque up to this much where the map is at its highest, fading (as the square) to transparent at its lowest.
OVERLAY_OPACITY = 0.6


@dataclass
class Explanation:
    """Where a query matches inside one image."""

    grid: list[list[float]]  # rows x cols cosines, row-major, top row first
    peak: tuple[float, float]  # [x, y] in pixels of the image as displayed (EXIF orientation applied)
    score: float  # the cosine of the query with the image's own vector (the hit's score)
    width: int  # the displayed image's size
    height: int
    item_id: int | None = None
    path: str | None = None
    timestamp: float | None = None  # a video: the time of the frame explained, seconds from its start
    image: "Image.Image | None" = field(default=None, repr=False, compare=False)  # the decoded photo, for overlays

    @property
    def rows(self) -> int:
        return len(self.grid)

    @property
    def cols(self) -> int:
        return len(self.grid[0]) if self.grid else 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"item_id": self.item_id, "path": self.path, "score": self.score,
                                "peak": [self.peak[0], self.peak[1]], "width": self.width, "height": self.height,
                                "rows": self.rows, "cols": self.cols, "grid": self.grid}
        if self.timestamp is not None:
            data["timestamp"] = self.timestamp
        return data

    def overlay(self, max_side: int | None = None) -> "Image.Image":
        """The photo with the map laid over it and the peak marked (needs `image`); with
        `max_side`, scaled down to at most that many pixels on its longer side."""
        if self.image is None:
            raise ValueError("this explanation holds no image to overlay")
        photo = self.image
        if max_side is not None and max(photo.size) > max_side:
            photo = photo.copy()
            photo.thumbnail((max_side, max_side))
        return overlay(photo, np.asarray(self.grid, dtype=np.float32), self.peak, (self.width, self.height))

    def overlay_png(self, max_side: int | None = None) -> bytes:
        buffer = io.BytesIO()
        self.overlay(max_side).save(buffer, "PNG")
        return buffer.getvalue()


def similarity_grid(features: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each cell's cosine with the query: features (rows, cols, dim), unit length; query (dim,)."""
    vector = np.asarray(query, dtype=np.float32).reshape(-1)
    vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return np.asarray(features @ vector, dtype=np.float32)


def peak_of(grid: np.ndarray, width: int, height: int) -> tuple[float, float]:
    """The map's peak in pixels of a width x height image (the module docstring says how)."""
    rows, cols = grid.shape
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    top, bottom, left, right = max(row - 1, 0), min(row + 2, rows), max(col - 1, 0), min(col + 2, cols)
    weights = np.maximum(grid[top:bottom, left:right] - float(np.median(grid)), 0.0)
    if float(weights.sum()) <= 0.0:  # a flat map: the best cell's centre
        x, y = float(col) + 0.5, float(row) + 0.5
    else:
        ys, xs = np.mgrid[top:bottom, left:right]
        x = float(((xs + 0.5) * weights).sum() / weights.sum())
        y = float(((ys + 0.5) * weights).sum() / weights.sum())
    return (round(x * width / cols, 1), round(y * height / rows, 1))


def explanation_of(features: np.ndarray, image: "Image.Image", query: np.ndarray, score: float,
                   size: tuple[int, int] | None = None) -> Explanation:
    """The explanation of `query` in `image` (RGB, oriented) from the image's dense `features`
    (rows, cols, dim); `size`: the displayed size when `image` was decoded smaller (a JPEG
    draft), so that the peak is in the original's pixels."""
    grid = similarity_grid(features, query)
    width, height = size or image.size
    return Explanation(grid=[[round(float(value), 5) for value in row] for row in grid], peak=peak_of(grid, width, height),
                       score=float(score), width=width, height=height, image=image)


def overlay(image: "Image.Image", grid: np.ndarray, peak: tuple[float, float], size: tuple[int, int]) -> "Image.Image":
    """`image` with `grid` as a heat layer (low: transparent, high: opaque yellow) and a ring at `peak`
    (given in pixels of `size`, the displayed image that `image` may be a smaller decode of)."""
    from PIL import Image, ImageDraw

    base = image.convert("RGB")
    low, high = float(grid.min()), float(grid.max())
    scaled = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
    heat = Image.fromarray(np.clip(scaled * 255.0, 0, 255).astype(np.uint8), "L").resize(base.size, Image.Resampling.BILINEAR)
    level = np.asarray(heat, dtype=np.float32) / 255.0
    colour = np.stack([np.full_like(level, 255.0), 255.0 * level, np.zeros_like(level)], axis=-1)  # red -> yellow
    alpha = (OVERLAY_OPACITY * level * level)[..., None]  # squared: the weak parts of the map stay clear
    pixels = np.asarray(base, dtype=np.float32) * (1.0 - alpha) + colour * alpha
    result = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    x, y = peak[0] * base.size[0] / size[0], peak[1] * base.size[1] / size[1]
    radius = max(3.0, min(base.size) / 25.0)
    draw = ImageDraw.Draw(result)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=(255, 255, 255), width=max(1, int(radius / 3)))
    return result
