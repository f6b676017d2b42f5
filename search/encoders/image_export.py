"""The library's image tower exported to ONNX, so indexing and image queries need neither torch nor open_clip.

As `clipdex.search.encoders.text_export` does for the text tower, and at the same moments (once per
library, while the open_clip model is loaded anyway), clipdex exports the image tower
with `torch.onnx.export` into `LIBRARY/image_encoder/` (laid out as
`clipdex.search.encoders.onnx_image` describes), with the parameters of open_clip's
preprocessing, which `clipdex.search.encoders.preprocess` reproduces without torch.

An export is used only after it has been checked against open_clip, on probe images that
cover the cases of the fidelity tests (landscape, portrait, EXIF-rotated, smaller than the
model's input, very long, grayscale, palette, transparent, 16-bit, CMYK), decoded as the
indexer decodes them: on every one, the numpy preprocessing must give open_clip's own
preprocessed arrays (within MAX_PIXEL_DIFFERENCE); on three of them (GRAPH_PROBES: in a batch,
and alone) the ONNX graph must give vectors at cosine >= MIN_COSINE with open_clip's own
`encode_image(normalize=True)` of open_clip's arrays. Together: the export's vectors of each
probe image are open_clip's own.
Otherwise the export is refused, the reason is recorded in
`LIBRARY/image_encoder.refused.json`, and the library keeps running on torch.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.search.atomic import write_json_atomic
from clipdex.search.encoders.onnx_image import (
    IMAGE_EXPORT_FOLDER,
    IMAGE_EXPORT_VERSION,
    IMAGE_MODEL_FILE,
    IMAGE_SETTINGS_FILE,
    IMAGE_WEIGHTS_FILE,
    ImageExportSettings,
    OnnxClipEncoder,
    installed_image_export,
)
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.errors import ClipdexError
from clipdex.search.encoders.model import ResolvedModel
from clipdex.search.encoders.onnx_files import (
    EXPORT_LOCK,
    export_optimized,
    export_or_refuse,
    install_export,
    recorded_refusal,
    scratch_folder,
)
from clipdex.search.encoders.preprocess import ImagePreprocess, UnsupportedPreprocess

IMAGE_REFUSED_FILE = "image_encoder.refused.json"
MIN_COSINE = 0.999
OPSET = 17
MAX_PIXEL_DIFFERENCE = 1e-4  # between the port's preprocessed arrays and open_clip's (1e-6 measured)
GRAPH_PROBES = (0, 5, 2)  # the probes the graph is checked on: landscape and noise together, the EXIF-rotated photo alone



class ImageExportRefused(ClipdexError):
    """The image tower cannot be exported faithfully; the library keeps running the open_clip model."""


def probe_images() -> list[tuple[str, bytes]]:
    """Encoded images covering what the indexer meets: sizes, aspect ratios, EXIF rotation, modes."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(20261129)

    def photo(size: tuple[int, int]) -> Image.Image:
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
        return small.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))

    def encoded(image: Image.Image, format: str, **options: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format, **options)
        return buffer.getvalue()

    rotated = Image.Exif()
    rotated[0x0112] = 6
    noise = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), "RGB")
    transparent = photo((320, 240)).convert("RGBA")
    transparent.putalpha(Image.linear_gradient("L").resize((320, 240)))
    wide = np.tile(np.linspace(0, 65535, 640, dtype=np.uint16), (400, 1))
    return [
        ("landscape.jpg", encoded(photo((1200, 900)), "JPEG", quality=92)),
        ("portrait.jpg", encoded(photo((900, 1200)), "JPEG", quality=92)),
        ("exif-rotated.jpg", encoded(photo((1200, 900)), "JPEG", quality=92, exif=rotated.tobytes())),
        ("small.jpg", encoded(photo((50, 40)), "JPEG", quality=92)),
        ("long.png", encoded(photo((2000, 90)), "PNG")),
        ("noise.png", encoded(noise, "PNG")),
        ("gray.jpg", encoded(photo((640, 480)).convert("L"), "JPEG")),
        ("palette.gif", encoded(photo((400, 300)).convert("P"), "GIF")),
        ("transparent.png", encoded(transparent, "PNG")),
        ("sixteen-bit.png", encoded(Image.fromarray(wide), "PNG")),
        ("cmyk.jpg", encoded(photo((500, 400)).convert("CMYK"), "JPEG")),
    ]


def image_export_refused(library_path: Path, model: ResolvedModel) -> str | None:
    """Why an earlier export of this model (by this version of the exporter) was refused, or None."""
    return recorded_refusal(library_path / IMAGE_REFUSED_FILE, IMAGE_EXPORT_VERSION, model)


def ensure_image_export(library_path: Path, encoder: TorchClipEncoder, dim: int) -> ImageExportSettings | None:
    """Export the image tower of the loaded `encoder` into the library unless done or refused before.

    Never fails the caller: a refusal is recorded (and not retried) when the model itself
    cannot be reproduced; errors of the environment leave things as they were, to be retried.
    """
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    with EXPORT_LOCK:  # one export at a time in a process; the one that waited finds this one's installed
        if installed_image_export(library_path, encoder.spec, dim) is not None or image_export_refused(library_path, encoder.spec):
            return None
        return export_or_refuse("image encoder", lambda: export_image_encoder(encoder, library_path), ImageExportRefused,
                                library_path / IMAGE_REFUSED_FILE, IMAGE_EXPORT_VERSION, encoder.spec, logging.INFO,
                                installed=lambda: installed_image_export(library_path, encoder.spec, dim) is not None)


def export_image_encoder(encoder: TorchClipEncoder, library_path: Path) -> ImageExportSettings:
    """Export, verify and install the image tower of `encoder`; raises ImageExportRefused."""
    import onnxruntime
    import open_clip

    started = time.monotonic()
    encoder.load()
    try:
        preprocess = ImagePreprocess.of_open_clip_model(encoder.model)
    except UnsupportedPreprocess as error:
        raise ImageExportRefused(f"open_clip's preprocessing of this model cannot be reproduced without torch: {error}") from None
    scratch = scratch_folder(library_path, ".image_encoder-")
    try:
        _export_onnx(encoder, scratch, preprocess.image_size)
        settings = ImageExportSettings(
            version=IMAGE_EXPORT_VERSION, model=encoder.spec.to_json(), dim=0, preprocess=preprocess.to_json(),
            min_cosine=0.0, probe_images=0, open_clip_version=open_clip.__version__,
            onnxruntime_version=onnxruntime.__version__, export_seconds=0.0, created_at=time.time(),
        )
        settings.min_cosine, settings.dim, settings.probe_images = verify(encoder, OnnxClipEncoder(scratch, settings, None, threads=encoder.threads))
        if not settings.min_cosine >= MIN_COSINE:  # NaN too
            raise ImageExportRefused(f"the image encoder cannot be exported faithfully (cosine {settings.min_cosine:.5f} "
                                     f"with open_clip, below {MIN_COSINE})")
        settings.export_seconds = round(time.monotonic() - started, 2)
        write_json_atomic(scratch / IMAGE_SETTINGS_FILE, asdict(settings))
        install_export(scratch, library_path / IMAGE_EXPORT_FOLDER, IMAGE_SETTINGS_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return settings


def verify(encoder: TorchClipEncoder, exported: OnnxClipEncoder) -> tuple[float, int, int]:
    """(lowest cosine, dim, probe count): the export against open_clip on the probe images, decoded as the indexer does.

    The preprocessing is checked on every probe image (its arrays against open_clip's own
    transform's: a difference over MAX_PIXEL_DIFFERENCE refuses the export), the graph on the
    GRAPH_PROBES among them (its vectors against open_clip's `encode_image` on open_clip's
    arrays, in a batch and in a batch of one): the graph computes the same function of any
    array, so the other probes would only repeat its forward passes, seconds of a first run.
    """
    from clipdex.search.media.imaging import decode_image

    probes = probe_images()
    images = [decode_image(data, draft_size=2 * exported.image_size, name=name).image for name, data in probes]
    theirs = [encoder.prepare(image) for image in images]  # open_clip's own transform
    ours = [exported.prepare(image) for image in images]
    for (name, _), mine, open_clips in zip(probes, ours, theirs):
        if mine.shape != open_clips.shape:
            raise ImageExportRefused(f"the preprocessing cannot be reproduced: probe image {name} gives shape "
                                     f"{mine.shape}, open_clip's {open_clips.shape}")
        difference = float(np.max(np.abs(mine - open_clips)))
        if not difference <= MAX_PIXEL_DIFFERENCE:  # NaN too
            raise ImageExportRefused(f"the preprocessing cannot be reproduced: probe image {name} differs from "
                                     f"open_clip's by {difference:.2g} (more than {MAX_PIXEL_DIFFERENCE:g})")
    together, alone = list(GRAPH_PROBES[:-1]), GRAPH_PROBES[-1]
    reference = encoder.encode_prepared(np.stack([theirs[index] for index in GRAPH_PROBES]))  # open_clip's encode_image
    batch = exported.encode_prepared(np.stack([ours[index] for index in together]))
    single = exported.encode_prepared(ours[alone][None])
    worst = min(float(np.min(np.sum(batch * reference[:-1], axis=1))), float(np.dot(single[0], reference[-1])))
    return worst, int(reference.shape[1]), len(images)


class _ImageTower:
    """open_clip's encode_image as a module (unnormalized: the runner normalizes in float32)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class ImageTower(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                return self.model.encode_image(pixels, normalize=False)

        return ImageTower()


def _export_onnx(encoder: TorchClipEncoder, scratch: Path, image_size: int) -> None:
    import torch

    model = encoder.model
    if encoder.device != "cpu" or encoder.dtype_name != "fp32":
        import copy

        model = copy.deepcopy(model).float().cpu()
    tower = _ImageTower(model).eval()  # eval() first: export restores the wrapper's mode recursively
    sample = torch.zeros((2, 3, image_size, image_size), dtype=torch.float32)
    export_optimized(tower, sample, scratch, scratch / IMAGE_MODEL_FILE, IMAGE_WEIGHTS_FILE, input_names=["pixels"],
                     output_names=["embedding"], dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
                     opset_version=OPSET)
