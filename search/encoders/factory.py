"""Which encoder does what: the one factory for a model, and which encoder answers a library's text queries."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder
from clipdex.search.errors import ClipdexError, ModelUnavailable
from clipdex.search.encoders.model import ResolvedModel

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.encoders.dense_export import DenseEncoder

RUNTIMES = ("auto", "torch", "onnx")


def gpu_likely(device: str) -> bool:
    """Whether `device` (auto, cpu or cuda) will likely run on CUDA, known without importing torch."""
    return device == "cuda" or (device == "auto" and os.path.exists("/proc/driver/nvidia/version"))


def create_encoder(model: ResolvedModel, device: str = "auto") -> ImageTextEncoder:
    """The encoder that runs `model` on `device` (auto, cpu or cuda); nothing is loaded yet.

    open_clip on torch is the one backend so far.
    """
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    return TorchClipEncoder(model, device)


class QueryVectorCache(Protocol):
    """Vectors of texts asked before (the library keeps them in its catalog)."""

    def get(self, text: str) -> np.ndarray | None: ...

    def put(self, text: str, vector: np.ndarray) -> None: ...


class LibraryEncoders:
    """A library's encoders: its model, created on first use and loaded only when something
    must be embedded, and the encoder that answers its text queries.

    A text query is answered by the model when it is loaded anyway, else by the library's
    verified ONNX export of the text tower (no torch, no open_clip; see
    `clipdex.search.encoders.text_export`), else by the model, whose text tower is then exported
    for the next process.

    The model runs on onnxruntime (`runtime` onnx: the library's verified exports of both
    towers, see `clipdex.search.encoders.image_export`; no torch, no open_clip) or on torch. `auto`
    picks onnx on the CPU once the library has its exports, torch where a GPU is (fp16
    there) or before the exports exist (the first run that loads the model makes them).

    Safe to share between threads: an application indexes on one and searches on others. While
    a new library's first index run exports the model (`first_export_begins`, until
    `first_export_ends`), a text query waits for the text tower's export and then runs on it
    (or, refused, on the model), rather than load the model a second time or export it again.
    """

    def __init__(self, library_path: Path, model: ResolvedModel, dim: int, requested_device: str = "auto",
                 query_cache: QueryVectorCache | None = None, requested_runtime: str = "auto") -> None:
        if requested_runtime not in RUNTIMES:
            raise ClipdexError(f"runtime= must be one of {', '.join(RUNTIMES)}, not {requested_runtime!r}")
        self.library_path = library_path
        self.model = model
        self.dim = dim
        self.requested_device = requested_device  # auto, cpu or cuda
        self.requested_runtime = requested_runtime  # auto, torch or onnx
        self.query_cache = query_cache
        self._image_text: ImageTextEncoder | None = None
        self._text_export: TextEncoder | None = None
        self._text_export_looked_up = False
        self._cache_looked_up: set[str] = set()  # the towers looked up in the export cache
        self._lock = threading.RLock()  # which encoder runs the model, and the text export looked up
        self._text_settled = threading.Event()  # cleared while a first run exports the text tower
        self._text_settled.set()
        self._dense: DenseEncoder | None = None  # patch-level features for explanations, made on first use

    @property
    def image_text(self) -> ImageTextEncoder:
        """The library's model (created now, loaded on its first use): its ONNX export where the runtime is onnx."""
        with self._lock:
            if self._image_text is None:
                exported = self._onnx_model() if self._wants_onnx() else None
                self._image_text = exported or create_encoder(self.model, self.requested_device)
            return self._image_text

    def _wants_onnx(self) -> bool:
        if self.requested_runtime == "onnx":
            if self.requested_device == "cuda":
                raise ClipdexError('runtime="onnx" runs the model on the CPU; drop device="cuda", or use runtime="torch"')
            return True
        return self.requested_runtime == "auto" and self.requested_device != "cuda" and not gpu_likely(self.requested_device)

    def _onnx_model(self) -> ImageTextEncoder | None:
        from clipdex.search.encoders.onnx_image import load_image_export
        from clipdex.search.encoders.onnx_text import installed_export

        self._exports_from_cache()
        has_text = installed_export(self.library_path, self.model, self.dim) is not None
        exported = load_image_export(self.library_path, self.model, self.dim, self.text_export) if has_text else None
        if exported is None and self.requested_runtime == "onnx":
            reason = self.onnx_refusal()
            if reason:
                raise ModelUnavailable(f'runtime="onnx": this library\'s model cannot run on onnxruntime ({reason}); '
                                       'use runtime="torch"')
            # no export yet: the first run loads open_clip once, and exports the model for the next ones
        return exported

    def onnx_refusal(self) -> str | None:
        """Why this library's model does not run on onnxruntime (a refused export), or None."""
        from clipdex.search.encoders.image_export import image_export_refused
        from clipdex.search.encoders.text_export import export_refused

        return image_export_refused(self.library_path, self.model) or export_refused(self.library_path, self.model)

    def runtime(self) -> str:
        """What runs (or would run) the model: onnx, or torch (loads nothing)."""
        if self._image_text is not None:
            return "onnx" if self._runs_on_onnx() else "torch"
        from clipdex.search.encoders.onnx_image import installed_image_export
        from clipdex.search.encoders.onnx_text import installed_export

        try:
            wanted = self._wants_onnx()
        except ClipdexError:
            return "torch"
        exported = installed_image_export(self.library_path, self.model, self.dim) and installed_export(
            self.library_path, self.model, self.dim)
        return "onnx" if wanted and exported else "torch"

    def ensure_weights(self) -> None:
        """Before a run that embeds: raise ModelUnavailable now when the model will run on torch
        and its weights cannot be had (`clipdex.search.encoders.weights`); on its ONNX export it
        needs none. No torch is imported."""
        if self.runtime() == "torch":
            from clipdex.search.encoders.weights import ensure_weights

            ensure_weights(self.model)

    def export_due(self) -> bool:
        """Whether `export_text` has something to export now (the loaded torch model's towers
        lack their exports, and were not refused): what a run tells before it calls it."""
        import importlib.util

        from clipdex.search.encoders.torch_clip import TorchClipEncoder

        model = self._image_text
        if not (model is not None and model.loaded and isinstance(model, TorchClipEncoder)) \
                or importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
            return False
        from clipdex.search.encoders.image_export import image_export_refused
        from clipdex.search.encoders.onnx_image import installed_image_export
        from clipdex.search.encoders.onnx_text import installed_export
        from clipdex.search.encoders.text_export import export_refused

        text_due = installed_export(self.library_path, self.model, self.dim) is None \
            and not export_refused(self.library_path, self.model)
        image_due = self.requested_runtime != "torch" and model.device == "cpu" \
            and installed_image_export(self.library_path, self.model, self.dim) is None \
            and not image_export_refused(self.library_path, self.model)
        return text_due or image_due

    def export_pending(self) -> bool:
        """Whether the next run that loads the open_clip model will export it to ONNX (a one-time cost)."""
        import importlib.util

        from clipdex.search.encoders.onnx_image import installed_image_export

        self._exports_from_cache()
        if self.runtime() == "onnx" or importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
            return False
        try:
            if not self._wants_onnx():
                return False
        except ClipdexError:
            return False
        return installed_image_export(self.library_path, self.model, self.dim) is None and not self.onnx_refusal()

    def _exports_from_cache(self, image: bool = True) -> None:
        """Once, before the exports are looked up: install those of this model that the library
        lacks from this machine's export cache (`clipdex.search.encoders.export_cache`), so that a
        new library of a model exported here before never loads it. The text export always, the
        image export with `image` where the model would run on it here (a text query only needs
        the text export, and does not import what the image export's lookup does)."""
        try:
            image = image and self._wants_onnx()
        except ClipdexError:
            image = False
        towers = {"text", "image"} if image else {"text"}
        if towers <= self._cache_looked_up:
            return
        self._cache_looked_up |= towers
        from clipdex.search.encoders.onnx_text import installed_export

        if installed_export(self.library_path, self.model, self.dim) is not None:
            if not image:
                return  # the everyday case: nothing to look up
            from clipdex.search.encoders.onnx_image import installed_image_export

            if installed_image_export(self.library_path, self.model, self.dim) is not None:
                return
        from clipdex.search.encoders.export_cache import restore_exports

        restore_exports(self.library_path, self.model, self.dim, image=image)

    def _exports_to_cache(self) -> None:
        """Keep the exports just made in this machine's export cache, for the next new library of this model."""
        from clipdex.search.encoders.export_cache import store_exports

        store_exports(self.library_path, self.model, self.dim)

    def run_on_export(self) -> bool:
        """Once `export_text` has exported both towers: run them from now on instead of the
        loaded open_clip model, whose memory goes with it. False (nothing changes) when the
        runtime is not onnx here or the exports are not there (refused, say)."""
        with self._lock:
            if not self.model_loaded or self._runs_on_onnx() or not self._wants_onnx():
                return False
            exported = self._onnx_model()
            if exported is None:
                return False
            self._image_text = exported
            self._text_export_looked_up = False  # looked up before the export, it was not there yet
        gc.collect()
        return True

    def first_export_begins(self) -> None:
        """A first index run is about to export the model (`clipdex.indexer.first_export`): text
        queries wait for its text tower (`text_exported`, or `first_export_ends`) from now on."""
        self._text_settled.clear()

    def first_export_ends(self) -> None:
        """The first run's export is over (done, refused or failed): text queries wait no more."""
        with self._lock:
            self._text_export_looked_up = False  # looked up before the export, it was not there yet
        self._text_settled.set()

    def export_images_first(self, images_ready: Callable[[], None]) -> float:
        """`export_text` for a first run that embeds images: the image tower first; as soon as
        it is exported, the library's images run on it (`images_ready` is called then, or, when
        it was refused, once the text tower is exported too and the images stay on torch), and
        the text tower is exported meanwhile, from the torch model, whose memory goes afterwards.
        Returns the seconds both took (0: nothing was exported)."""
        from clipdex.search.encoders.torch_clip import TorchClipEncoder

        torch_model = self._image_text
        if not (self.model_loaded and isinstance(torch_model, TorchClipEncoder)) or torch_model.device != "cpu" \
                or not self._wants_onnx():
            images_ready()
            return self.export_text()
        started = time.monotonic()
        from clipdex.search.encoders.image_export import ensure_image_export
        from clipdex.search.encoders.text_export import ensure_text_export

        exported = ensure_image_export(self.library_path, torch_model, self.dim) is not None
        on_export = self.use_image_export()
        if on_export:
            images_ready()
        exported = ensure_text_export(self.library_path, torch_model, self.dim) is not None or exported
        if on_export:
            self.text_exported(torch_model)
        del torch_model
        gc.collect()
        if not on_export:  # refused, or not written (a full disk): the run embeds on torch
            images_ready()
        if exported:
            self._exports_to_cache()
        return time.monotonic() - started if exported else 0.0

    def use_image_export(self) -> bool:
        """Run the images on the library's image export from now on (a first run's, just made:
        `clipdex.indexer.first_export`); False when it is not there."""
        from clipdex.search.encoders.onnx_image import load_image_export

        images = load_image_export(self.library_path, self.model, self.dim, self.text_export)
        if images is None:
            return False
        with self._lock:
            self._image_text = images  # its texts: the text export, looked up once it is there
        return True

    def text_exported(self, torch_model: ImageTextEncoder | None = None) -> None:
        """The text tower has been exported, or an export tried (after `use_image_export`):
        look it up again. Without it (refused, or not written: a full disk) the rest of the run
        embeds on torch, as the next process will run (--runtime onnx: an error if refused), on
        `torch_model` if this process has it loaded."""
        try:
            with self._lock:
                self._text_export_looked_up = False  # looked up before the export, it was not there yet
                self._text_on_torch(torch_model)
        finally:
            self._text_settled.set()

    def _text_on_torch(self, torch_model: ImageTextEncoder | None = None) -> None:
        """Where the images run on the image export and the text tower has no export (refused,
        not written): run both on the torch model from now on (`torch_model` if loaded here)."""
        from clipdex.search.encoders.onnx_text import installed_export

        if self._runs_on_onnx() and installed_export(self.library_path, self.model, self.dim) is None:
            if self.requested_runtime == "onnx":
                self._onnx_model()  # refused: says why
            torch_model = torch_model or create_encoder(self.model, self.requested_device)
            torch_model.set_threads(self.image_text.threads)
            self._image_text = torch_model.load()  # the lanes take it for their next batch

    def text_export(self) -> TextEncoder | None:
        """The library's exported text encoder, looked up once, or None."""
        with self._lock:
            if not self._text_export_looked_up:
                from clipdex.search.encoders.onnx_text import load_text_export

                self._exports_from_cache(image=False)
                self._text_export = load_text_export(self.library_path, self.model, self.dim)
                self._text_export_looked_up = True
            return self._text_export

    @property
    def model_loaded(self) -> bool:
        """Whether this library's model is in memory (torch and open_clip imported)."""
        return self._image_text is not None and self._image_text.loaded

    def text(self) -> TextEncoder:
        """The encoder for text queries: the model when it is loaded, else the library's
        exported text encoder, else the model. While a first run exports the model, it waits
        for the text tower's export first (see the class)."""
        self._text_settled.wait()
        with self._lock:
            if self.model_loaded and not self._runs_on_onnx():
                return self.image_text
            exported = self.text_export()
            if exported is None and self._runs_on_onnx():  # the images on their export: look the text's up again
                self._text_export_looked_up = False
                exported = self.text_export()
            if exported is not None:
                return exported
            self._text_on_torch()  # images on their export, texts without one: a first run that failed midway
            return self.image_text

    def encode_text(self, text: str) -> np.ndarray:
        """A text's vector, from the query cache when it was asked before (under its language
        code too, when `clipdex.search.encoders.hf_tokenizer.query_language` set one)."""
        from clipdex.search.encoders.hf_tokenizer import current_query_language

        language = current_query_language()
        key = f"[{language}] {text}" if language else text
        cached = self.query_cache.get(key) if self.query_cache is not None else None
        if cached is not None and cached.shape == (self.dim,):
            return cached
        encoder = self.text()
        vector = encoder.encode_texts([text])[0]
        if self.query_cache is not None:
            self.query_cache.put(key, vector)
        if encoder is self._image_text:
            self.export_text(image=False)  # this query waits for it: the text tower only
        return vector

    def encode_image(self, image: str | os.PathLike[str] | bytes) -> np.ndarray:
        """The vector of a query image, a file or its bytes (EXIF-oriented RGB; at most
        MAX_QUERY_IMAGE_PIXELS, lower than for indexing: a query must not cost gigabytes)."""
        from clipdex.search.media.imaging import MAX_QUERY_IMAGE_PIXELS, decode_image

        decoded = decode_image(image if isinstance(image, bytes) else Path(image), max_pixels=MAX_QUERY_IMAGE_PIXELS)
        return self.image_text.encode_images([decoded.image])[0]

    def _runs_on_onnx(self) -> bool:
        from clipdex.search.encoders.onnx_image import OnnxClipEncoder

        return isinstance(self._image_text, OnnxClipEncoder)

    def export_text(self, image: bool = True) -> float:
        """Store the loaded open_clip model's towers in the library as ONNX, once: the text
        tower (`clipdex.search.encoders.text_export`), then with `image` the image tower
        (`clipdex.search.encoders.image_export`), unless torch was asked for or runs on a GPU.
        Returns the seconds this took (0: nothing to do)."""
        from clipdex.search.encoders.torch_clip import TorchClipEncoder

        model = self._image_text  # another thread may switch the library to the export meanwhile
        if not (model is not None and model.loaded and isinstance(model, TorchClipEncoder)):
            return 0.0
        started = time.monotonic()
        from clipdex.search.encoders.image_export import ensure_image_export
        from clipdex.search.encoders.text_export import ensure_text_export

        exported = ensure_text_export(self.library_path, model, self.dim) is not None
        if exported:  # a whole collection costs a quarter of a second and more: not on every query that finds it done
            gc.collect()  # the text export's graphs and sessions: gone before the image export's come
        if image and self.requested_runtime != "torch" and model.device == "cpu":
            exported = ensure_image_export(self.library_path, model, self.dim) is not None or exported
        if exported:
            self._exports_to_cache()
        return time.monotonic() - started if exported else 0.0

    def dense(self, writable: bool = True) -> "DenseEncoder":
        """The encoder of patch-level features for explanations (`clipdex.search.encoders.dense_export`):
        the library's verified ONNX export where the runtime is onnx and it is there; else the
        torch model, whose dense tower is exported then (with `writable`) for the next time."""
        from clipdex.search.encoders.dense_export import TorchDenseEncoder, ensure_dense_export, load_dense_export
        from clipdex.search.encoders.torch_clip import TorchClipEncoder

        with self._lock:
            if self._dense is not None:
                return self._dense
            wants_onnx = self._wants_onnx()
            if wants_onnx:
                self._dense = load_dense_export(self.library_path, self.model, self.dim)
                if self._dense is not None:
                    return self._dense
            model = self.image_text  # the library's model, created (not loaded) now if need be: loaded once for both
            torch_model = model if isinstance(model, TorchClipEncoder) else TorchClipEncoder(self.model, self.requested_device)
            on_torch = TorchDenseEncoder(torch_model)
            exported = ensure_dense_export(self.library_path, on_torch, self.dim) if wants_onnx and writable else None
            self._dense = exported or on_torch
            return self._dense
