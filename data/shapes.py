"""Deterministic generator of a synthetic image-caption data set ("shapes").

Every image shows one coloured shape (circle, square, triangle, star or cross)
on a coloured background. What varies per image:

* the shape and its colour (8 colours, never the same as the background's),
* the background colour (6 colours) and its texture (plain, vertical or
  horizontal gradient, or speckled; named by some captions), with a small
  random tint,
* the size ("small" or "large"), the position (a 3x3 grid for small shapes,
  around the centre for large ones) and the rotation (up to 30 degrees),
* a little colour jitter, Gaussian pixel noise and JPEG compression.

Captions come from several templates with a few synonyms ("small"/"tiny"/
"little", "large"/"big", "gray"/"grey"), and the first caption of every image
is always the canonical one, e.g. "a small red circle on a blue background".

Captions come in English, Chinese and Spanish (``LANGUAGES``): each language has its own
templates and words (Spanish adjectives agree with the shape's gender), and ``generate(...,
languages=...)`` adds every further language's captions after the English ones, drawn from
a random stream of their own, so the English captions and the images do not change.

Images are named after what they show, e.g. ``0007-red-circle-on-blue.jpg``,
and ``class_label`` recovers the short label ("red circle") from such a name.
The module uses only PIL and numpy, so tests can import it cheaply.

CLI::

    python data/shapes.py --out DIR --count N --seed S [--size PX] [--captions K]
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

#: Shape colours. Chosen to be far apart so colour naming is unambiguous.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

#: Background colours. A shape never has the colour of its background.
BACKGROUNDS: dict[str, RGB] = {
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
    "blue": (60, 100, 190),
    "green": (70, 145, 80),
    "brown": (120, 80, 45),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Shape diameter as a fraction of the image side, per size word.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.24, 0.34),
    "large": (0.50, 0.66),
}

#: 3x3 grid of positions for small shapes: name -> (x, y) centre fraction.
POSITIONS: dict[str, tuple[float, float]] = {
    "in the top left corner": (0.22, 0.22),
    "at the top": (0.50, 0.22),
    "in the top right corner": (0.78, 0.22),
    "on the left": (0.22, 0.50),
    "in the center": (0.50, 0.50),
    "on the right": (0.78, 0.50),
    "in the bottom left corner": (0.22, 0.78),
    "at the bottom": (0.50, 0.78),
    "in the bottom right corner": (0.78, 0.78),
}

#: Shapes are rotated by up to this many degrees either way from upright.
MAX_ROTATION = 30.0

TEXTURES: tuple[str, ...] = ("plain", "vertical gradient", "horizontal gradient", "speckled")

SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big"),
}
BACKGROUND_SYNONYMS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey")}

#: Caption templates; the first one is the canonical caption.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} on a {bg} background",
    "a {colour} {shape} on a {bg} background",
    "a {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position} on a {bg} background",
    "a {bg} background with a {colour} {shape}",
    "a {bg} background with a {size} {colour} {shape} {position}",
    "{colour} {shape}, {size}, on {bg}",
    "a picture of a {colour} {shape} {position}",
    "a {size} {colour} {shape} on a {textured_bg} background",
    "a {colour} {shape} {position}, {textured_bg} background",
)

#: How templates name a background texture; ``{bg}`` is the colour word.
TEXTURE_PHRASES: dict[str, str] = {
    "plain": "plain {bg}",
    "vertical gradient": "{bg} vertical gradient",
    "horizontal gradient": "{bg} horizontal gradient",
    "speckled": "speckled {bg}",
}

CAPTIONS_FILE = "captions.tsv"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render and describe one image."""

    colour: str
    shape: str
    background: str
    texture: str
    size: str
    position: str
    centre: tuple[float, float]  # fractions of the image side
    diameter: float  # fraction of the image side
    rotation: float  # degrees

    @property
    def label(self) -> str:
        """Short class label, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


def class_labels() -> list[str]:
    """All colour x shape labels ("red circle", ...), in a fixed order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def zero_shot_prompts(template: str = "a photo of a {}") -> list[str]:
    """One prompt per class label, in the order of ``class_labels()``."""
    return [template.format(label) for label in class_labels()]


def class_label(filename: str | Path) -> str:
    """Class label of a generated image from its file name.

    ``"0007-red-circle-on-blue.jpg"`` -> ``"red circle"``.
    """
    parts = Path(filename).stem.split("-")
    if len(parts) < 5 or parts[1] not in COLOURS or parts[2] not in SHAPES:
        raise ValueError(f"not a generated shapes image name: {filename!r}")
    return f"{parts[1]} {parts[2]}"


def image_name(index: int, scene: Scene, digits: int = 4) -> str:
    """File name saying what the image shows, e.g. ``0007-red-circle-on-blue.jpg``."""
    return f"{index:0{digits}d}-{scene.colour}-{scene.shape}-on-{scene.background}.jpg"


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene."""
    background = _choice(rng, list(BACKGROUNDS))
    colour = _choice(rng, [c for c in COLOURS if c != background])
    shape = _choice(rng, SHAPES)
    size = _choice(rng, list(SIZES))
    low, high = SIZES[size]
    diameter = float(rng.uniform(low, high))
    if size == "small":
        position = _choice(rng, list(POSITIONS))
        x, y = POSITIONS[position]
        jitter = 0.06
    else:
        position = "in the center"
        x, y = 0.5, 0.5
        jitter = 0.05
    centre = (x + float(rng.uniform(-jitter, jitter)), y + float(rng.uniform(-jitter, jitter)))
    return Scene(
        colour=colour,
        shape=shape,
        background=background,
        texture=_choice(rng, TEXTURES),
        size=size,
        position=position,
        centre=centre,
        diameter=diameter,
        rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
    )


def _jitter(rgb: RGB, rng: np.random.Generator, amount: int) -> RGB:
    values = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    r, g, b = (int(v) for v in np.clip(values, 0, 255))
    return (r, g, b)


def _background(scene: Scene, side: int, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(_jitter(BACKGROUNDS[scene.background], rng, 15), dtype=np.float32)
    image = np.broadcast_to(base, (side, side, 3)).copy()
    ramp = np.linspace(-30.0, 30.0, side, dtype=np.float32)
    if scene.texture == "vertical gradient":
        image += ramp[:, None, None]
    elif scene.texture == "horizontal gradient":
        image += ramp[None, :, None]
    elif scene.texture == "speckled":
        image += 14.0 * rng.standard_normal((side, side, 1), dtype=np.float32)
    return image


def _polygon(shape: str, radius: float, rotation: float) -> np.ndarray:
    """Vertices (relative to the centre) of a non-circular shape."""
    if shape == "square":
        angles = np.deg2rad(np.arange(4) * 90.0 + 45.0)
        radii = np.full(4, radius)
    elif shape == "triangle":
        angles = np.deg2rad(np.arange(3) * 120.0 - 90.0)
        radii = np.full(3, radius * 1.1)
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.1, radius * 0.45)
    elif shape == "cross":
        arm = 0.34
        xs = np.array([arm, arm, 1, 1, arm, arm, -arm, -arm, -1, -1, -arm, -arm])
        ys = np.array([1, arm, arm, -arm, -arm, -1, -1, -arm, -arm, arm, arm, 1])
        angles = np.arctan2(ys, xs)
        radii = np.hypot(xs, ys) * radius
    else:
        raise ValueError(f"unknown shape: {shape!r}")
    theta = angles + math.radians(rotation)
    return np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)


def _shape_mask(scene: Scene, image_size: int) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1], drawn at twice the resolution."""
    side = image_size * 2
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = scene.centre[0] * side, scene.centre[1] * side
    radius = scene.diameter * side / 2.0
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        points = _polygon(scene.shape, radius, scene.rotation) + np.array([cx, cy])
        draw.polygon([(float(x), float(y)) for x, y in points], fill=255)
    small = mask.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32)[:, :, None] / 255.0


def render(scene: Scene, rng: np.random.Generator, image_size: int = 128) -> Image.Image:
    """Render a scene as an RGB image of ``image_size`` x ``image_size`` pixels.

    The shape is blended over the textured background through an anti-aliased
    mask, then Gaussian pixel noise is added.
    """
    background = _background(scene, image_size, rng)
    fill = np.asarray(_jitter(COLOURS[scene.colour], rng, 20), dtype=np.float32)
    alpha = _shape_mask(scene, image_size)
    pixels = background * (1.0 - alpha) + fill * alpha
    pixels += 5.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


@dataclass(frozen=True)
class PointingScene:
    """One target shape among clutter, for the pointing game of `clipdex explain`.

    ``box`` is the target's bounding box in pixels (left, top, right, bottom);
    ``query`` names it ("a red circle"); the clutter shapes differ from it in both
    colour and shape, so only the target answers the query.
    """

    image: Image.Image
    target: Scene
    clutter: tuple[Scene, ...]
    box: tuple[float, float, float, float]
    query: str


def pointing_scene(rng: np.random.Generator, image_size: int = 128, clutter: int = 2) -> PointingScene:
    """Render a small target shape and ``clutter`` other shapes at distinct cells of the 3x3 grid."""
    background = _choice(rng, list(BACKGROUNDS))
    texture = _choice(rng, TEXTURES)
    cells = [list(POSITIONS)[int(i)] for i in rng.permutation(len(POSITIONS))[: clutter + 1]]
    colours = [str(c) for c in rng.permutation([c for c in COLOURS if c != background])[: clutter + 1]]
    shapes = [str(s) for s in rng.permutation(list(SHAPES))[: clutter + 1]]
    scenes = []
    for cell, colour, shape in zip(cells, colours, shapes):
        x, y = POSITIONS[cell]
        scenes.append(Scene(colour=colour, shape=shape, background=background, texture=texture, size="small",
                            position=cell, centre=(x + float(rng.uniform(-0.04, 0.04)), y + float(rng.uniform(-0.04, 0.04))),
                            diameter=float(rng.uniform(*SIZES["small"])), rotation=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))))
    pixels = _background(scenes[0], image_size, rng)
    for scene in scenes:
        fill = np.asarray(_jitter(COLOURS[scene.colour], rng, 20), dtype=np.float32)
        alpha = _shape_mask(scene, image_size)
        pixels = pixels * (1.0 - alpha) + fill * alpha
    pixels += 5.0 * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    target = scenes[0]
    half = target.diameter * image_size / 2.0
    cx, cy = target.centre[0] * image_size, target.centre[1] * image_size
    box = (cx - half, cy - half, cx + half, cy + half)
    return PointingScene(image, target, tuple(scenes[1:]), box, _with_articles(f"a {target.colour} {target.shape}"))


def _with_articles(text: str) -> str:
    """Turn "a orange" into "an orange"."""
    words = text.split(" ")
    for i, word in enumerate(words[:-1]):
        if word == "a" and words[i + 1][:1] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def caption(scene: Scene, template: str, rng: np.random.Generator) -> str:
    """Fill one caption template for a scene, drawing synonyms at random."""
    bg = _choice(rng, BACKGROUND_SYNONYMS.get(scene.background, (scene.background,)))
    text = template.format(
        size=_choice(rng, SIZE_SYNONYMS[scene.size]),
        colour=scene.colour,
        shape=scene.shape,
        bg=bg,
        textured_bg=TEXTURE_PHRASES[scene.texture].format(bg=bg),
        position=scene.position,
    )
    if rng.random() < 0.25:
        text += "."
    return _with_articles(text)


def canonical_caption(scene: Scene) -> str:
    """The canonical caption, e.g. "a small red circle on a blue background"."""
    text = TEMPLATES[0].format(
        size=scene.size, colour=scene.colour, shape=scene.shape, bg=scene.background, position=scene.position
    )
    return _with_articles(text)


def describe(scene: Scene, rng: np.random.Generator, count: int, language: str = "en") -> list[str]:
    """``count`` distinct captions in ``language``: the canonical one, then random templates."""
    if language != "en":
        return WORDINGS[language].describe(scene, rng, count)
    captions = [canonical_caption(scene)]
    others = rng.permutation(len(TEMPLATES) - 1) + 1
    for index in others[: max(count - 1, 0)]:
        captions.append(caption(scene, TEMPLATES[int(index)], rng))
    return captions[:count]


@dataclass(frozen=True)
class Wording:
    """How one language other than English words a scene.

    Words are tuples of synonyms (one drawn per caption; the first is the canonical one).
    ``colours`` and ``sizes`` hold a masculine and a feminine form for languages whose
    adjectives agree with the noun (Spanish); ``genders`` names each shape's gender ("m"
    or "f"), and ``articles`` the indefinite article per gender.
    """

    templates: tuple[str, ...]
    colours: dict[str, tuple[str, str]]
    shapes: dict[str, tuple[str, ...]]
    sizes: dict[str, tuple[tuple[str, str], ...]]
    backgrounds: dict[str, str]
    positions: dict[str, str]
    textures: dict[str, str]
    genders: dict[str, str]
    articles: dict[str, str]
    full_stop: str
    short_query: str

    def _fill(self, scene: Scene, template: str, rng: np.random.Generator | None) -> str:
        def pick(options: Sequence[Any]) -> Any:
            return options[0] if rng is None else _choice(rng, options)

        gender = 0 if self.genders.get(scene.shape, "m") == "m" else 1
        bg = self.backgrounds[scene.background]
        return template.format(
            size=pick(self.sizes[scene.size])[gender],
            colour=self.colours[scene.colour][gender],
            shape=pick(self.shapes[scene.shape]),
            article=self.articles["m" if gender == 0 else "f"],
            bg=bg,
            textured_bg=self.textures[scene.texture].format(bg=bg),
            position=self.positions[scene.position],
        )

    def describe(self, scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
        captions = [self._fill(scene, self.templates[0], None)]
        for index in (rng.permutation(len(self.templates) - 1) + 1)[: max(count - 1, 0)]:
            text = self._fill(scene, self.templates[int(index)], rng)
            captions.append(text + self.full_stop if rng.random() < 0.25 else text)
        return captions[:count]

    def label(self, colour: str, shape: str) -> str:
        """The short query for a colour and shape, e.g. "红色的圆", "un círculo rojo"."""
        scene = Scene(colour, shape, "gray", "plain", "small", "in the center", (0.5, 0.5), 0.3, 0.0)
        return self._fill(scene, self.short_query, None)


_CHINESE = Wording(
    templates=(
        "{bg}背景上的一个{size}{colour}{shape}",
        "{bg}背景上的{colour}{shape}",
        "{colour}的{shape}",
        "一个{colour}的{shape}",
        "{colour}{shape}",
        "一张{colour}{shape}的照片",
        "一张{size}{colour}{shape}的照片",
        "{position}的一个{size}{colour}{shape}",
        "{colour}{shape}在{position}，{bg}背景",
        "{textured_bg}背景上的{size}{colour}{shape}",
        "一个{colour}{shape}在{position}",
    ),
    colours={
        "red": ("红色", "红色"),
        "green": ("绿色", "绿色"),
        "blue": ("蓝色", "蓝色"),
        "yellow": ("黄色", "黄色"),
        "purple": ("紫色", "紫色"),
        "orange": ("橙色", "橙色"),
        "white": ("白色", "白色"),
        "black": ("黑色", "黑色"),
    },
    shapes={
        "circle": ("圆", "圆形"),
        "square": ("正方形", "方块"),
        "triangle": ("三角形",),
        "star": ("星星", "五角星"),
        "cross": ("十字", "十字形"),
    },
    sizes={"small": (("小", "小"),), "large": (("大", "大"),)},
    backgrounds={
        "gray": "灰色", "white": "白色", "black": "黑色", "blue": "蓝色", "green": "绿色", "brown": "棕色",
    },
    positions={
        "in the top left corner": "左上角",
        "at the top": "上方",
        "in the top right corner": "右上角",
        "on the left": "左边",
        "in the center": "中间",
        "on the right": "右边",
        "in the bottom left corner": "左下角",
        "at the bottom": "下方",
        "in the bottom right corner": "右下角",
    },
    textures={
        "plain": "纯{bg}",
        "vertical gradient": "{bg}竖向渐变",
        "horizontal gradient": "{bg}横向渐变",
        "speckled": "{bg}斑点",
    },
    genders={},
    articles={"m": "", "f": ""},
    full_stop="。",
    short_query="{colour}的{shape}",
)

_SPANISH = Wording(
    templates=(
        "{article} {shape} {colour} {size} sobre un fondo {bg}",
        "{article} {shape} {colour} sobre un fondo {bg}",
        "{article} {shape} {colour}",
        "una foto de {article} {shape} {colour} {size}",
        "una foto de {article} {shape} {colour}",
        "{article} {shape} {colour} {size} {position}",
        "{article} {shape} {colour} {position} sobre un fondo {bg}",
        "un fondo {bg} con {article} {shape} {colour}",
        "{shape} {colour}, {size}, sobre fondo {bg}",
        "una imagen de {article} {shape} {colour} {position}",
        "{article} {shape} {colour} {size} sobre un fondo {textured_bg}",
    ),
    colours={
        "red": ("rojo", "roja"),
        "green": ("verde", "verde"),
        "blue": ("azul", "azul"),
        "yellow": ("amarillo", "amarilla"),
        "purple": ("morado", "morada"),
        "orange": ("naranja", "naranja"),
        "white": ("blanco", "blanca"),
        "black": ("negro", "negra"),
    },
    shapes={
        "circle": ("círculo",),
        "square": ("cuadrado",),
        "triangle": ("triángulo",),
        "star": ("estrella",),
        "cross": ("cruz",),
    },
    sizes={"small": (("pequeño", "pequeña"), ("chico", "chica")), "large": (("grande", "grande"),)},
    backgrounds={
        "gray": "gris", "white": "blanco", "black": "negro", "blue": "azul", "green": "verde", "brown": "marrón",
    },
    positions={
        "in the top left corner": "en la esquina superior izquierda",
        "at the top": "arriba",
        "in the top right corner": "en la esquina superior derecha",
        "on the left": "a la izquierda",
        "in the center": "en el centro",
        "on the right": "a la derecha",
        "in the bottom left corner": "en la esquina inferior izquierda",
        "at the bottom": "abajo",
        "in the bottom right corner": "en la esquina inferior derecha",
    },
    textures={
        "plain": "{bg} liso",
        "vertical gradient": "{bg} con degradado vertical",
        "horizontal gradient": "{bg} con degradado horizontal",
        "speckled": "{bg} moteado",
    },
    genders={"circle": "m", "square": "m", "triangle": "m", "star": "f", "cross": "f"},
    articles={"m": "un", "f": "una"},
    full_stop=".",
    short_query="{article} {shape} {colour}",
)

#: Caption languages: English (the templates above) first, then the others' wordings.
WORDINGS: dict[str, Wording] = {"zh": _CHINESE, "es": _SPANISH}
LANGUAGES: tuple[str, ...] = ("en", *WORDINGS)


def mixed_query(label: str, mix: str = "zh+en") -> str:
    """A short query that mixes two languages: "红色的 circle" (zh+en), "a circle rojo" (en+es)."""
    colour, shape = label.split(" ")
    if mix == "zh+en":
        return f"{WORDINGS['zh'].colours[colour][0]}的 {shape}"
    if mix == "en+es":
        return _with_articles(f"a {shape} {WORDINGS['es'].colours[colour][0]}")
    raise ValueError(f"unknown mix {mix!r}: zh+en or en+es")


MIXES: tuple[str, ...] = ("zh+en", "en+es")


def short_query(label: str, language: str = "en") -> str:
    """The short query for a class label in a language: "a red circle", "红色的圆", "un círculo rojo"."""
    if language == "en":
        return _with_articles(f"a {label}")
    colour, shape = label.split(" ")
    return WORDINGS[language].label(colour, shape)


def generate(
    out_dir: str | Path,
    count: int,
    seed: int,
    *,
    image_size: int = 128,
    captions_per_image: int = 2,
    quality: int = 90,
    languages: Sequence[str] = ("en",),
) -> list[tuple[str, str]]:
    """Write ``count`` JPEG images and ``captions.tsv`` into ``out_dir``.

    Image ``i`` depends only on ``(seed, i)``, so a larger ``count`` extends a
    smaller one. Returns the ``(filename, caption)`` rows of ``captions.tsv``
    (``captions_per_image`` rows per image and language, each language's canonical
    caption first). English, when asked for, comes first; every other language draws
    from its own random stream, so adding one changes neither the images nor the
    English captions.
    """
    if count < 0 or captions_per_image < 1:
        raise ValueError("count must be >= 0 and captions_per_image >= 1")
    unknown = [language for language in languages if language not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown caption language(s) {unknown}; known: {', '.join(LANGUAGES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(max(count - 1, 0))))
    rows: list[tuple[str, str]] = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng)
        name = image_name(index, scene, digits)
        render(scene, rng, image_size).save(out / name, format="JPEG", quality=quality)
        for language in languages:
            stream = rng if language == "en" else np.random.default_rng([seed, index, 1 + LANGUAGES.index(language)])
            rows.extend((name, text) for text in describe(scene, stream, captions_per_image, language))
    write_captions(out / CAPTIONS_FILE, rows)
    return rows


def write_captions(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    """Write ``image<TAB>caption`` rows with a header line."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(("image", "caption"))
        writer.writerows(rows)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--count", type=int, default=200, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--captions", type=int, default=2, help="captions per image and language")
    parser.add_argument(
        "--languages", default="en", help=f"comma-separated caption languages ({','.join(LANGUAGES)}); default en"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    rows = generate(
        args.out,
        args.count,
        args.seed,
        image_size=args.size,
        captions_per_image=args.captions,
        languages=[language.strip() for language in args.languages.split(",") if language.strip()],
    )
    print(f"wrote {args.count} images and {len(rows)} captions to {args.out}")


if __name__ == "__main__":
    main()
