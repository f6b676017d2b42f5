"""The library's whole model on onnxruntime: images and texts without torch or open_clip.

`clipdex.search.encoders.image_export` makes and verifies the image tower's export (it needs
torch); this module only runs it, with the preprocessing ported to numpy
(`clipdex.search.encoders.preprocess`) and the text tower's export (`onnx_text`) for texts:

    LIBRARY/image_encoder/
      image_encoder.json             settings: model, dim, preprocessing, how it was verified
      image_encoder.onnx (+ .data)   the image tower, graph already optimized by onnxruntime
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from clipdex.search.cores import available_cores
from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder, normalized
from clipdex.search.encoders.onnx_text import _inference_session
from clipdex.search.errors import ModelUnavailable
from clipdex.search.encoders.model import ResolvedModel
from clipdex.search.encoders.preprocess import ImagePreprocess

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_EXPORT_VERSION = 1
IMAGE_EXPORT_FOLDER = "image_encoder"
IMAGE_SETTINGS_FILE = "image_encoder.json"
IMAGE_MODEL_FILE = "image_encoder.onnx"
IMAGE_WEIGHTS_FILE = "image_encoder.onnx.data"
# From this many images on, the session has prepacked weights: a long run gains a few
# percent per batch (the load takes 0.3 s more for ViT-B-32), a run that adds a few photos
# or a query skips the slower load.
BULK_IMAGES = 64


@dataclass
class ImageExportSettings:
    """What `image_encoder.json` records about an export."""

    version: int
    model: dict[str, Any]  # the library manifest's model (ResolvedModel.to_json())
    dim: int
    preprocess: dict[str, Any]  # ImagePreprocess.to_json(): image size, mean, std, interpolation, resize mode
    min_cosine: float  # lowest cosine to open_clip's encode_image on the probe images the graph is checked on
    probe_images: int  # the probe images whose preprocessing was checked (`clipdex.search.encoders.image_export.verify`)
    open_clip_version: str
    onnxruntime_version: str
    export_seconds: float
    created_at: float

    @classmethod
    def read(cls, path: Path) -> "ImageExportSettings":
        data = json.loads(path.read_text())
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


class OnnxClipEncoder(ImageTextEncoder):
    """The library's exported image tower (and text tower) on onnxruntime, on the CPU.

    Sessions are made on first use. `set_threads` takes effect at the next session: the
    indexer sets it before its lanes start, each lane then runs the one session on its
    own thread (onnxruntime sessions may run from several threads at once). A run that
    says it will embed at least BULK_IMAGES images (`expect_images`, as the indexer does)
    gets a session with prepacked weights from the start, and keeps it; one that says
    fewer, a session that loads fast. Without a word, the first session loads fast and
    is remade with prepacked weights after BULK_IMAGES images.
    """

    def __init__(self, folder: Path, settings: ImageExportSettings, text: Callable[[], TextEncoder | None] | None,
                 threads: int | None = None) -> None:
        self.folder = folder
        self.settings = settings
        self.spec = ResolvedModel.from_json(settings.model)
        self.preprocess = ImagePreprocess.from_json(settings.preprocess)
        self.threads = threads or available_cores()
        self._text_loader = text  # the text tower's export, loaded on the first text
        self._text: TextEncoder | None = None
        self._session: Any = None
        self._session_threads = 0
        self._session_bulk = False
        self._encoded = 0  # images encoded so far
        self._expected: int | None = None  # images the run said it will embed
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def runtime(self) -> str:
        return "onnx"

    @property
    def dim(self) -> int:
        return self.settings.dim

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    def load(self) -> "OnnxClipEncoder":
        self.session
        return self

    @property
    def session(self) -> Any:
        with self._lock:
            bulk = (self._expected if self._expected is not None else self._encoded) >= BULK_IMAGES
            if self._session is None or self._session_threads != self.threads or self._session_bulk != bulk:
                self._session = None  # the old one's memory goes before the new one's comes
                self._session = _inference_session(self.folder / IMAGE_MODEL_FILE, self.threads, prepack=bulk)
                self._session_threads, self._session_bulk = self.threads, bulk
            return self._session

    def set_threads(self, count: int) -> None:
        """Run on `count` intra-op threads from the next batch on (a new session, made then)."""
        self.threads = count

    def expect_images(self, count: int) -> None:
        """The coming run embeds about `count` images: from BULK_IMAGES on, the session has
        prepacked weights from its start, else it loads fast; either way it is not remade midway."""
        self._expected = count

    # -- images ------------------------------------------------------------------------

    def prepare(self, image: "Image.Image") -> np.ndarray:
        return self.preprocess(image)

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        vectors = normalized(self.session.run(None, {"pixels": pixels})[0])
        self._encoded += len(pixels)  # not exact under concurrent lanes; it only picks the session kind
        return vectors

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_prepared(np.stack([self.prepare(image) for image in images]))

    # -- texts: the text tower's export ---------------------------------------------------

    @property
    def text(self) -> TextEncoder:
        if self._text is None and self._text_loader is not None:
            self._text = self._text_loader()
        if self._text is None:
            raise ModelUnavailable('this library\'s text encoder has no ONNX export here; run with runtime="torch"')
        return self._text

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text.encode_texts(texts)

    def count_tokens(self, text: str) -> int:
        return self.text.count_tokens(text)


def installed_image_export(library_path: Path, model: ResolvedModel, dim: int) -> ImageExportSettings | None:
    """The settings of the library's image export when it fits `model` and onnxruntime is installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        settings = ImageExportSettings.read(library_path / IMAGE_EXPORT_FOLDER / IMAGE_SETTINGS_FILE)
        ImagePreprocess.from_json(settings.preprocess)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if settings.version != IMAGE_EXPORT_VERSION or settings.dim != dim:
        return None
    if not ResolvedModel.from_json(settings.model).same_model(model):
        return None
    return settings


def load_image_export(library_path: Path, model: ResolvedModel, dim: int,
                      text: Callable[[], TextEncoder | None] | None) -> OnnxClipEncoder | None:
    """The library's exported model, ready to run, or None when there is none usable here."""
    settings = installed_image_export(library_path, model, dim)
    if settings is None or not (library_path / IMAGE_EXPORT_FOLDER / IMAGE_MODEL_FILE).is_file():
        return None
    return OnnxClipEncoder(library_path / IMAGE_EXPORT_FOLDER, settings, text)
