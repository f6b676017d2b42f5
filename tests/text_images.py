"""Images with words in them, rendered here (DejaVu fonts): screenshots, signs on photos, tilted
receipts, posters, and text turned in several orientations. Used by the OCR tests and benchmarks.

Each maker draws `words` (a list of 1-3 words) and returns a PIL image; `KINDS` names them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONTS = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed-Bold.ttf", "DejaVuSerif-Bold.ttf"]
WORDS = ["walnut", "harbour", "lantern", "meadow", "copper", "violet", "saffron", "glacier", "orchid", "falcon",
         "pepper", "canyon", "marble", "thistle", "cobalt", "juniper", "tundra", "biscuit", "raven", "quarry",
         "ember", "willow", "garnet", "hollow"]


def font(number: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONTS / FONT_FILES[number % len(FONT_FILES)]), size)


def photo_background(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour fields with grain: photo-like, without text."""
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 220, (6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(small, "RGB").resize(size, Image.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8), "RGB")


def screenshot(words: list[str], seed: int) -> Image.Image:
    dark = seed % 2 == 0
    image = Image.new("RGB", (560, 360), (30, 30, 36) if dark else (246, 246, 248))
    draw = ImageDraw.Draw(image)
    ink = (230, 230, 230) if dark else (20, 20, 20)
    draw.rectangle((0, 0, 560, 40), fill=(60, 90, 160))
    draw.text((16, 8), "Settings", font=font(1, 22), fill=(255, 255, 255))
    for row, word in enumerate(words):
        draw.text((24, 70 + 60 * row), f"{word.capitalize()} mode", font=font(seed + row, 30), fill=ink)
        draw.rounded_rectangle((440, 72 + 60 * row, 510, 100 + 60 * row), radius=14, fill=(80, 180, 90))
    return image


def sign(words: list[str], seed: int) -> Image.Image:
    image = photo_background((640, 480), seed)
    draw = ImageDraw.Draw(image)
    draw.rectangle((120, 150, 520, 170 + 70 * len(words)), fill=(16, 90, 40), outline=(240, 240, 240), width=5)
    for row, word in enumerate(words):
        draw.text((150, 165 + 70 * row), word.upper(), font=font(seed + row + 1, 50), fill=(250, 250, 250))
    return image


def receipt(words: list[str], seed: int) -> Image.Image:
    paper = Image.new("RGB", (360, 420), (250, 248, 240))
    draw = ImageDraw.Draw(paper)
    draw.text((90, 14), "RECEIPT", font=font(3, 30), fill=(10, 10, 10))
    for row, word in enumerate(words):
        draw.text((20, 80 + 50 * row), f"{word.upper()}", font=font(3, 28), fill=(10, 10, 10))
        draw.text((260, 80 + 50 * row), f"{3 + row}.99", font=font(3, 28), fill=(10, 10, 10))
    tilted = paper.rotate(7 if seed % 2 else -6, expand=True, fillcolor=(90, 70, 60), resample=Image.BICUBIC)
    return tilted.filter(ImageFilter.GaussianBlur(0.6))


def poster(words: list[str], seed: int) -> Image.Image:
    image = Image.new("RGB", (480, 640), (200, 40 + 10 * (seed % 5), 60))
    draw = ImageDraw.Draw(image)
    for row, word in enumerate(words):
        draw.text((40, 120 + 130 * row), word.capitalize(), font=font(seed + 2 * row, 72), fill=(255, 240, 200))
    return image


def turned(words: list[str], seed: int) -> Image.Image:
    """Text turned a quarter or half turn (as a photo taken sideways, with no EXIF orientation)."""
    image = Image.new("RGB", (520, 300), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for row, word in enumerate(words):
        draw.text((30, 40 + 80 * row), word.upper(), font=font(seed + row, 52), fill=(20, 20, 90))
    return image.rotate(180 if seed % 2 else 90, expand=True)


KINDS: dict[str, Callable[[list[str], int], Image.Image]] = {
    "screenshot": screenshot, "sign": sign, "receipt": receipt, "poster": poster, "turned": turned,
}


def render_set(folder: Path, per_kind: int, words_per_image: int = 2, seed: int = 0,
               kinds: list[str] | None = None) -> dict[Path, tuple[str, list[str]]]:
    """Images of each kind, each with its own words; {path: (kind, words)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = list(rng.permutation(WORDS))
    made: dict[Path, tuple[str, list[str]]] = {}
    number = 0
    for kind in kinds or list(KINDS):
        for copy in range(per_kind):
            if len(pool) < words_per_image:
                pool = [f"{word}{number}" for word in rng.permutation(WORDS)]
            words = [pool.pop() for _ in range(words_per_image)]
            path = folder / f"{kind}-{copy:03d}.png"
            KINDS[kind](words, seed + number).save(path)
            made[path] = (kind, words)
            number += 1
    return made


# Chinese characters made of straight strokes, drawn here (no CJK font on these machines): each
# stroke is a line ("L") or a box ("R") in the glyph's unit square.
GLYPHS: dict[str, list[tuple[str, float, float, float, float]]] = {
    "田": [("R", .1, .1, .9, .9), ("L", .5, .1, .5, .9), ("L", .1, .5, .9, .5)],
    "中": [("R", .15, .3, .85, .7), ("L", .5, .02, .5, .98)],
    "口": [("R", .15, .2, .85, .8)],
    "日": [("R", .25, .05, .75, .95), ("L", .25, .5, .75, .5)],
    "工": [("L", .15, .12, .85, .12), ("L", .5, .12, .5, .88), ("L", .05, .88, .95, .88)],
    "十": [("L", .05, .45, .95, .45), ("L", .5, .05, .5, .95)],
    "三": [("L", .2, .15, .8, .15), ("L", .25, .5, .75, .5), ("L", .1, .88, .9, .88)],
    "王": [("L", .15, .12, .85, .12), ("L", .2, .5, .8, .5), ("L", .08, .9, .92, .9), ("L", .5, .12, .5, .9)],
    "土": [("L", .2, .4, .8, .4), ("L", .5, .08, .5, .88), ("L", .05, .88, .95, .88)],
}
CHINESE_WORDS = ["王土", "三十", "工王", "日土"]


def chinese_sign(word: str, seed: int, side: int = 110) -> Image.Image:
    """`word` (characters of `GLYPHS`) in dark strokes on a light board on a photo."""
    image = photo_background((640, 480), seed)
    draw = ImageDraw.Draw(image)
    left, top = 80, 150
    draw.rectangle((left - 30, top - 30, left + 30 + int(1.2 * side) * len(word), top + side + 30), fill=(240, 238, 228))
    for index, character in enumerate(word):
        x, y = left + int(1.2 * side) * index, top
        for kind, a, b, c, d in GLYPHS[character]:
            corners = [x + a * side, y + b * side, x + c * side, y + d * side]
            if kind == "R":
                draw.rectangle(corners, outline=(25, 25, 30), width=max(3, side // 10))
            else:
                draw.line(corners, fill=(25, 25, 30), width=max(3, side // 10))
    return image
