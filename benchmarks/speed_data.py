"""Synthetic data for the speed benchmarks: camera-sized JPEGs, small images, cheap libraries.

Nothing is downloaded. The 12-megapixel photos are photo-like (smooth shapes, edges and
sensor-like grain) so that they compress and decode like real ones, about 3-4 MB each.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTO_SIZE = (4000, 3000)  # 12 megapixels


def photo_jpeg(seed: int, size: tuple[int, int] = PHOTO_SIZE, quality: int = 90) -> bytes:
    """A photo-like JPEG: a smooth colour field, a few sharp shapes and fine grain."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        radius = int(rng.integers(40, 500))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius * 2 // 3), fill=colour)
    base = base.filter(ImageFilter.GaussianBlur(1.2))
    texture = rng.normal(0.0, 9.0, (height // 2, width // 2, 1)).astype(np.float32)
    texture = np.repeat(np.repeat(texture, 2, axis=0), 2, axis=1)
    grain = rng.normal(0.0, 4.0, (height, width, 3)).astype(np.float32)
    pixels = np.clip(np.asarray(base, dtype=np.float32) + texture + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def with_comment(jpeg: bytes, comment: str) -> bytes:
    """The same JPEG with a comment segment after its start marker: other bytes, same pixels and decode work."""
    payload = comment.encode("utf-8")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def write_photos(folder: Path, count: int, distinct: int = 8, size: tuple[int, int] = PHOTO_SIZE) -> list[Path]:
    """`count` distinct JPEG files of `size` (12 MP), made from `distinct` renderings (each file has its own bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(distinct, os.cpu_count() or 1)) as pool:
        renderings = list(pool.map(lambda seed: photo_jpeg(seed, size), range(distinct)))
    paths = []
    for number in range(count):
        path = folder / f"photo{number:05d}.jpg"
        path.write_bytes(with_comment(renderings[number % distinct], f"clipdex benchmark {number}"))
        paths.append(path)
    return paths


def write_small_images(folder: Path, count: int, size: tuple[int, int] = (64, 48), per_folder: int = 1000) -> list[Path]:
    """`count` small distinct JPEGs in subfolders of `per_folder` files."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    base.save(buffer, "JPEG", quality=85)
    jpeg = buffer.getvalue()
    paths = []
    for number in range(count):
        path = folder / f"part{number // per_folder:03d}" / f"img{number:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(with_comment(jpeg, f"clipdex benchmark {number}"))
        paths.append(path)
    return paths
