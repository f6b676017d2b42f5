"""open_clip's inference preprocessing of an image, ported to Pillow and numpy (no torch).

open_clip's transform for a model is torchvision's `Resize` (shorter side to the model's
size, bicubic, on the PIL image: Pillow's own resampling), `CenterCrop`, `ToTensor` and
`Normalize`. `ImagePreprocess` does the same steps with the same arithmetic (Pillow for the
resize, float32 for the rest), so its arrays equal open_clip's tensors (tests compare them);
an ONNX image export records it beside the graph (`clipdex.search.encoders.onnx_image`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image

from clipdex.search.encoders.model import ResolvedModel, architecture_config
from clipdex.search.media.imaging import middle_to_resize

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
RESIZE_MODES = ("shortest", "squash")  # open_clip's "longest" pads; not ported


class UnsupportedPreprocess(ValueError):
    """open_clip preprocesses this model in a way the port does not reproduce."""


@dataclass(frozen=True)
class ImagePreprocess:
    """The parameters of open_clip's inference transform, and the transform itself."""

    image_size: int  # the side of the square the model sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UnsupportedPreprocess(f"interpolation {self.interpolation!r} is not ported (only {', '.join(INTERPOLATIONS)})")
        if self.resize_mode not in RESIZE_MODES:
            raise UnsupportedPreprocess(f"resize mode {self.resize_mode!r} is not ported (only {', '.join(RESIZE_MODES)})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ImagePreprocess":
        mean, std = (float(value) for value in data["mean"]), (float(value) for value in data["std"])
        return cls(int(data["image_size"]), _triple(mean), _triple(std), str(data["interpolation"]), str(data["resize_mode"]))

    @classmethod
    def of_open_clip_model(cls, model: Any) -> "ImagePreprocess":
        """The parameters open_clip uses for a loaded model (imports open_clip)."""
        import open_clip

        return cls.of_settings(open_clip.get_model_preprocess_cfg(model))

    @classmethod
    def of_settings(cls, config: dict[str, Any]) -> "ImagePreprocess":
        """From open_clip's preprocessing settings (its `PreprocessCfg` as a dict: size, mode,
        mean, std, interpolation, resize_mode); UnsupportedPreprocess where the port differs."""
        size = config["size"]
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise UnsupportedPreprocess(f"non-square image size {tuple(size)} is not ported")
            size = size[0]
        if config.get("mode", "RGB") != "RGB":
            raise UnsupportedPreprocess(f"image mode {config['mode']!r} is not ported (only RGB)")
        return cls(int(size), _triple(float(v) for v in config["mean"]), _triple(float(v) for v in config["std"]),
                   str(config.get("interpolation") or "bicubic"), str(config.get("resize_mode") or "shortest"))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image as the model's float32 (3, size, size) input."""
        size = self.image_size
        resample = INTERPOLATIONS[self.interpolation]
        image = within_model_bounds(image, size, self.resize_mode)
        if self.resize_mode == "squash":
            image = image.resize((size, size), resample)
        else:
            image = image.resize(shortest_side_size(image.size, size), resample)
            image = center_crop(image, size)
        scaled = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        pixels: np.ndarray = (scaled - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


# open_clip's defaults (`open_clip.transform.PreprocessCfg`: OpenAI's normalization)
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


def expected_preprocess(model: ResolvedModel) -> ImagePreprocess | None:
    """What open_clip's transform for `model` will most likely be, known without importing
    open_clip: its config's image size with open_clip's default normalization, for weights
    from a checkpoint file or none (a pretrained tag brings settings of its own: None).

    Only an expectation, for work that may start before the model loads; whoever uses it
    compares it with `of_open_clip_model` once the model is loaded (`clipdex.indexer.first_export`).
    """
    if model.pretrained is not None:
        return None
    config = architecture_config(model)
    if config is None:
        return None
    try:
        return ImagePreprocess.of_settings({"mean": DEFAULT_MEAN, "std": DEFAULT_STD, **(config.get("preprocess_cfg") or {}),
                                            "size": config["vision_cfg"]["image_size"]})
    except (KeyError, TypeError, ValueError):  # UnsupportedPreprocess too: the model's own settings decide
        return None


def _triple(values: Iterable[float]) -> tuple[float, float, float]:
    first, second, third = values
    return (first, second, third)


def within_model_bounds(image: Image.Image, image_size: int, resize_mode: str = "shortest") -> Image.Image:
    """`image`, or of a long thin one the part the model's transform keeps, so that resizing it
    makes at most `MAX_RESIZED_PIXELS` pixels.

    "shortest" (resize the shorter side to `image_size`, then center crop): the middle of the
    long side (`middle_to_resize`), which holds the square the crop keeps; the result is
    open_clip's transform of that part. Other modes resize the long side down (Pillow resizes
    along it first when squashing), and images within the limit: unchanged.
    """
    if resize_mode != "shortest":
        return image
    box = middle_to_resize(*image.size, image_size)
    return image if box is None else image.crop(box)


def shortest_side_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    """(width, height) with the shorter side `target`, as torchvision's Resize(int) computes it."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(target * long / short)
    return (target, new_long) if width <= height else (new_long, target)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop of an image at least `size` on both sides."""
    width, height = image.size
    if width == size and height == size:
        return image
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
