"""The first run of a CPU library that will run on onnxruntime: export the model first, then index on the export.

A new library's first index run must load the open_clip model anyway, to export it (once
for the library, see `LibraryEncoders.export_text`); afterwards the library runs on
onnxruntime. Rather than index on torch and export at the end, such a run exports first,
on a thread of its own, lets the torch model's memory go and embeds every photo with the
exported model, the one later runs use. The export is mostly serial work (tracing,
graph passes, writing files), so the decoders fill the other cores meanwhile (all but
one, up to EXPORT_AHEAD_BATCHES batches further ahead than usual: `clipdex.indexer.local`):
they need only open_clip's preprocessing, which `ImagePreprocess` reproduces exactly (the
same arrays), known as soon as the model is loaded; the model lanes wait for the export.

When the export is refused, the run embeds with the torch model as before (the arrays
the decoders made are the ones its own transform makes).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from clipdex.search.cores import available_cores
from clipdex.search.library import Library
from clipdex.search.preprocess import ImagePreprocess, UnsupportedPreprocess

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class FirstExport:
    """The decoders' preprocessing during such a run, and the export thread behind it.

    The model is loaded, and the export started, when the first file is decoded (as an
    index run loads the model only when something must be embedded); `wait` holds a model
    lane until the export is done and the library runs on what it made.
    """

    def __init__(self, library: Library, model_threads: int | None, images: int) -> None:
        self.library = library
        self.model_threads = model_threads  # each lane's threads, set on the encoder the lanes then use
        self.images = images  # about how many images the run embeds (`expect_images`)
        self.seconds = 0.0  # what the export took (0: nothing was exported)
        self._lock = threading.Lock()
        self._preprocess: ImagePreprocess | None = None
        self._torch_prepare: Any = None  # open_clip's own transform, when the port cannot reproduce it
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._turns = threading.Condition()
        self._decoding = 0
        # the export is mostly one thread, with bursts on every core (its forward passes):
        # decoders on the other cores only, so that it always has one to itself
        self.decoders_while_exporting = max(1, available_cores() - 1)

    @classmethod
    def for_run(cls, library: Library, model_threads: int | None, images: int) -> "FirstExport | None":
        """One for this run when it is such a first run (else None): the export is pending and the library writable."""
        if images == 0 or library.catalog.read_only or not library.encoders.export_pending():
            return None
        return cls(library, model_threads, images)

    # -- what the decoders call (as they call an encoder's) ----------------------------------

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def image_size(self) -> int:
        self._begin()
        if self._preprocess is not None:
            return self._preprocess.image_size
        return int(self.library.encoder.image_size)

    def prepare(self, image: "Image.Image") -> np.ndarray:
        self._begin()
        if self._preprocess is not None:
            return self._preprocess(image)
        self._done.wait()  # open_clip's transform runs on torch: not while the export traces the model
        return np.asarray(self._torch_prepare(image), dtype=np.float32)

    # -- the export ----------------------------------------------------------------------

    def _begin(self) -> None:
        """Load the model and start the export, once (the first file's decoder does it)."""
        with self._lock:
            if self._thread is not None:
                return
            encoder = self.library.encoder
            encoder.load()  # its errors end the run, as loading the model for the first file always did
            try:
                self._preprocess = ImagePreprocess.of_open_clip_model(getattr(encoder, "model"))
            except UnsupportedPreprocess:
                self._torch_prepare = encoder.prepare  # the image export will be refused: torch embeds
            self._thread = threading.Thread(target=self._export, name="clipdex-export", daemon=True)
            self._thread.start()

    def _export(self) -> None:
        started = time.monotonic()
        try:
            exported = self.library.export_text_encoder()
            self.library.encoders.run_on_export()  # the torch model's memory goes here, when it switched
            encoder = self.library.encoder
            if self.model_threads is not None:
                encoder.set_threads(self.model_threads)
            encoder.expect_images(self.images)
            self.seconds = time.monotonic() - started if exported else 0.0
        except BaseException as error:  # handed to the lanes and to finish(): the run ends with it
            self._error = error
        finally:
            self._done.set()
            with self._turns:
                self._turns.notify_all()

    @contextmanager
    def decoding_turn(self) -> Iterator[None]:
        """A decoder's turn at a file: while the export runs, only so many at once."""
        with self._turns:
            self._turns.wait_for(lambda: not self.exporting or self._decoding < self.decoders_while_exporting)
            self._decoding += 1
        try:
            yield
        finally:
            with self._turns:
                self._decoding -= 1
                self._turns.notify_all()

    @property
    def exporting(self) -> bool:
        """Whether the export has started and is not done yet."""
        return self._thread is not None and not self._done.is_set()

    def wait(self) -> None:
        """Until the export is done, if it was started (a model lane calls this before embedding)."""
        with self._lock:
            started = self._thread is not None
        if started:
            self._done.wait()
            if self._error is not None:
                raise self._error

    def finish(self) -> float:
        """Wait for the export thread (also when the run failed); the seconds the export took."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()
        return self.seconds
