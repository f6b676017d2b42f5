"""Patch-level features of an image, for explanations: on torch, or from a verified ONNX export.

`clipdex.search.encoders.dense.DenseTower` says what is computed. Like the image tower's
embedding export (`clipdex.search.encoders.image_export`), the dense tower is exported once
per library with `torch.onnx.export`, on the first explanation (a separate graph, so
indexing keeps its own, smaller one), checked against torch on probe images, and then run
on onnxruntime without torch:

    LIBRARY/explain_encoder/
      explain_encoder.json             settings: model, dim, preprocessing, how it was verified
      explain_encoder.onnx (+ .data)   the dense tower, graph already optimized by onnxruntime

An export whose features differ from torch's (cosine below MIN_COSINE at any grid position
of a probe image) is refused: the reason goes to `LIBRARY/explain_encoder.refused.json` and
explanations run on torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from clipdex.search.atomic import write_json_atomic
from clipdex.search.encoders.model import ResolvedModel
from clipdex.search.encoders.onnx_files import (
    EXPORT_LOCK,
    export_optimized,
    export_or_refuse,
    install_export,
    recorded_refusal,
    scratch_folder,
)
from clipdex.search.encoders.preprocess import ImagePreprocess
from clipdex.search.errors import ClipdexError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from clipdex.search.encoders.torch_clip import TorchClipEncoder

DENSE_EXPORT_VERSION = 1
DENSE_EXPORT_FOLDER = "explain_encoder"
DENSE_SETTINGS_FILE = "explain_encoder.json"
DENSE_MODEL_FILE = "explain_encoder.onnx"
DENSE_WEIGHTS_FILE = "explain_encoder.onnx.data"
DENSE_REFUSED_FILE = "explain_encoder.refused.json"
MIN_COSINE = 0.999  # between the export's feature and torch's, at every grid position of every probe
PROBES = (0, 2, 5)  # of `image_export.probe_images`: a landscape photo, the EXIF-rotated one, noise
OPSET = 17


class DenseExportRefused(ClipdexError):
    """The dense tower cannot be exported faithfully; explanations run on torch."""


class DenseEncoder(Protocol):
    """An image to its grid of unit-length features, (rows, cols, dim), top row first."""

    @property
    def preprocess(self) -> ImagePreprocess:
        """How an image becomes the dense tower's input (the whole image squashed to a square)."""
        ...

    def features(self, image: "Image.Image") -> np.ndarray:
        """The normalized float32 feature of each grid cell of an RGB image."""
        ...


def dense_preprocess(base: ImagePreprocess, size: int) -> ImagePreprocess:
    """The model's normalization on the whole image, squashed to `size` (no crop: the map covers what is displayed)."""
    return ImagePreprocess(size, base.mean, base.std, base.interpolation, "squash")


def normalized_grid(features: np.ndarray) -> np.ndarray:
    """Unit-length rows along the last axis, float32 (a zero row stays zero)."""
    array = features.astype(np.float32, copy=False)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


@dataclass
class DenseExportSettings:
    """What `explain_encoder.json` records about an export."""

    version: int
    model: dict[str, Any]  # ResolvedModel.to_json()
    dim: int
    preprocess: dict[str, Any]  # ImagePreprocess.to_json() of the dense tower's input (squash)
    grid: list[int]  # [rows, cols]
    min_cosine: float  # lowest cosine to torch's features over the probes' grid positions
    export_seconds: float
    created_at: float

    @classmethod
    def read(cls, path: Path) -> "DenseExportSettings":
        data = json.loads(path.read_text())
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


class TorchDenseEncoder:
    """The dense tower on torch, around a loaded (or loadable) `TorchClipEncoder`."""

    def __init__(self, encoder: "TorchClipEncoder") -> None:
        from clipdex.search.encoders.dense import DenseTower, explain_image_size

        encoder.load()
        self.encoder = encoder
        self.tower = DenseTower(encoder.model)
        base = ImagePreprocess.of_open_clip_model(encoder.model)
        self.preprocess = dense_preprocess(base, explain_image_size(encoder.model, base.image_size))

    def features_of(self, pixels: np.ndarray) -> np.ndarray:
        """Unnormalized features of a batch of preprocessed arrays, (N, rows, cols, dim)."""
        import torch

        with torch.no_grad():
            batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.encoder.device)
            return np.asarray(self.tower(batch).float().cpu().numpy())

    def features(self, image: "Image.Image") -> np.ndarray:
        return normalized_grid(self.features_of(self.preprocess(image)[None])[0])


class OnnxDenseEncoder:
    """The library's exported dense tower on onnxruntime (no torch); the session is made on first use."""

    def __init__(self, folder: Path, settings: DenseExportSettings, threads: int | None = None) -> None:
        from clipdex.search.cores import available_cores

        self.folder = folder
        self.settings = settings
        self.preprocess = ImagePreprocess.from_json(settings.preprocess)
        self.threads = threads or available_cores()
        self._session: Any = None
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        from clipdex.search.encoders.onnx_text import _inference_session

        with self._lock:
            if self._session is None:
                self._session = _inference_session(self.folder / DENSE_MODEL_FILE, self.threads)
            return self._session

    def features_of(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0])

    def features(self, image: "Image.Image") -> np.ndarray:
        return normalized_grid(self.features_of(self.preprocess(image)[None])[0])


def installed_dense_export(library_path: Path, model: ResolvedModel, dim: int) -> DenseExportSettings | None:
    """The settings of the library's dense export when it fits `model` and onnxruntime is installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        settings = DenseExportSettings.read(library_path / DENSE_EXPORT_FOLDER / DENSE_SETTINGS_FILE)
        ImagePreprocess.from_json(settings.preprocess)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if settings.version != DENSE_EXPORT_VERSION or settings.dim != dim \
            or not ResolvedModel.from_json(settings.model).same_model(model) \
            or not (library_path / DENSE_EXPORT_FOLDER / DENSE_MODEL_FILE).is_file():
        return None
    return settings


def load_dense_export(library_path: Path, model: ResolvedModel, dim: int) -> OnnxDenseEncoder | None:
    settings = installed_dense_export(library_path, model, dim)
    return None if settings is None else OnnxDenseEncoder(library_path / DENSE_EXPORT_FOLDER, settings)


def dense_export_refused(library_path: Path, model: ResolvedModel) -> str | None:
    return recorded_refusal(library_path / DENSE_REFUSED_FILE, DENSE_EXPORT_VERSION, model)


def ensure_dense_export(library_path: Path, torch_dense: TorchDenseEncoder, dim: int) -> OnnxDenseEncoder | None:
    """The library's dense export, made now from `torch_dense` unless there, refused before or impossible here."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    model = torch_dense.encoder.spec
    with EXPORT_LOCK:
        if installed_dense_export(library_path, model, dim) is None and not dense_export_refused(library_path, model):
            export_or_refuse("explain encoder", lambda: export_dense_encoder(torch_dense, library_path, dim), DenseExportRefused,
                             library_path / DENSE_REFUSED_FILE, DENSE_EXPORT_VERSION, model,
                             installed=lambda: installed_dense_export(library_path, model, dim) is not None)
    return load_dense_export(library_path, model, dim)


def export_dense_encoder(torch_dense: TorchDenseEncoder, library_path: Path, dim: int) -> DenseExportSettings:
    """Export, verify and install the dense tower; raises DenseExportRefused when it differs from torch."""
    import copy

    import torch

    started = time.monotonic()
    encoder = torch_dense.encoder
    tower = torch_dense.tower
    if encoder.device != "cpu" or encoder.dtype_name != "fp32":
        from clipdex.search.encoders.dense import DenseTower

        tower = DenseTower(copy.deepcopy(encoder.model).float().cpu())
    size = torch_dense.preprocess.image_size
    scratch = scratch_folder(library_path, ".explain_encoder-")
    try:
        export_optimized(tower, torch.zeros((1, 3, size, size), dtype=torch.float32), scratch, scratch / DENSE_MODEL_FILE,
                         DENSE_WEIGHTS_FILE, input_names=["pixels"], output_names=["features"],
                         dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}}, opset_version=OPSET)
        settings = DenseExportSettings(version=DENSE_EXPORT_VERSION, model=encoder.spec.to_json(), dim=dim,
                                       preprocess=torch_dense.preprocess.to_json(), grid=[0, 0], min_cosine=0.0,
                                       export_seconds=0.0, created_at=time.time())
        exported = OnnxDenseEncoder(scratch, settings, threads=encoder.threads)
        settings.min_cosine, settings.grid = verify_dense(torch_dense, exported, tower)
        if not settings.min_cosine >= MIN_COSINE:  # NaN too
            raise DenseExportRefused(f"the explain encoder cannot be exported faithfully (cosine {settings.min_cosine:.5f} "
                                     f"with torch, below {MIN_COSINE})")
        settings.export_seconds = round(time.monotonic() - started, 2)
        write_json_atomic(scratch / DENSE_SETTINGS_FILE, asdict(settings))
        install_export(scratch, library_path / DENSE_EXPORT_FOLDER, DENSE_SETTINGS_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return settings


def verify_dense(torch_dense: TorchDenseEncoder, exported: OnnxDenseEncoder, tower: Any = None) -> tuple[float, list[int]]:
    """(lowest cosine, [rows, cols]): the export's features against torch's at every grid
    position of the PROBES images (decoded as the indexer decodes them), in a batch."""
    import torch

    from clipdex.search.encoders.image_export import probe_images
    from clipdex.search.media.imaging import decode_image

    probes = probe_images()
    images = [decode_image(probes[index][1], draft_size=2 * torch_dense.preprocess.image_size, name=probes[index][0]).image
              for index in PROBES]
    pixels = np.stack([torch_dense.preprocess(image) for image in images])
    with torch.no_grad():
        reference = normalized_grid((tower or torch_dense.tower)(torch.from_numpy(pixels)).float().numpy())
    theirs = normalized_grid(exported.features_of(pixels))
    if theirs.shape != reference.shape:
        raise DenseExportRefused(f"the exported explain encoder gives features of shape {theirs.shape}, torch {reference.shape}")
    return float(np.min(np.sum(theirs * reference, axis=-1))), [int(reference.shape[1]), int(reference.shape[2])]
