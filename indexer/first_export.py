"""The first run of a CPU library that will run on onnxruntime: export the model first, then index on the export.

A new library's first index run must load the open_clip model anyway, to export it (once
for the library); afterwards the library runs on onnxruntime. Rather than index on torch
and export at the end, such a run has a process of its own (`clipdex.search.encoders.export_process`)
load the model and export its image tower first, embeds every photo with that export (the
one later runs use) as soon as it is verified, and lets that process export the text tower
meanwhile; the torch model's memory goes with the process, and this one never imports
torch. Loading and exporting are mostly serial work (importing open_clip, tracing, graph
passes), so the decoders fill the other cores from the start (all but one, up to
EXPORT_AHEAD_BATCHES batches further ahead than usual: `clipdex.indexer.local`). They need
only open_clip's preprocessing, which `ImagePreprocess` reproduces exactly (the same
arrays): before the model is loaded they use what its config says it will be
(`expected_preprocess`; with a pretrained tag, which has settings of its own, they wait for
the model); once it is loaded, the model's own, as the export process tells it. Should the
two differ, the files prepared before are prepared again before they are embedded.

When the image export is refused, the run loads the model and embeds with torch as before
(the arrays the decoders made are the ones its own transform makes). When the export
process cannot start, or says it failed before the image export was made or refused, this
process loads the model and exports on a thread of its own (`LibraryEncoders.export_images_first`),
where the same error, if any, is raised; killed, or failing once the photos are being
embedded on the export, it ends the run with an error.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from clipdex.indexer.progress import ProgressReporter
from clipdex.search.encoders import export_process
from clipdex.search.cores import available_cores
from clipdex.search.errors import ClipdexError
from clipdex.search.encoders.export_process import ExportProcess
from clipdex.search.library import Library
from clipdex.search.encoders.preprocess import ImagePreprocess, UnsupportedPreprocess, expected_preprocess

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


logger = logging.getLogger(__name__)

# whether the model is exported in a process of its own (`clipdex.search.encoders.export_process`)
EXPORT_PROCESS = True


class FirstExport:
    """The decoders' preprocessing during such a run, and the export behind it (a thread
    that runs the export process, or exports itself).

    The model is loaded, and the export started, when the first file is decoded (as an
    index run loads the model only when something must be embedded); `wait` holds a model
    lane until the images can be embedded on what the export made (or, refused, on torch).
    """

    def __init__(self, library: Library, model_threads: int | None, images: int,
                 progress: ProgressReporter | None = None) -> None:
        self.library = library
        self.progress = progress or ProgressReporter(None)  # told the export's steps: towers done of 2
        self.model_threads = model_threads  # each lane's threads, set on the encoder the lanes then use
        self.images = images  # about how many images the run embeds (`expect_images`)
        self.seconds = 0.0  # what the export took (0: nothing was exported)
        self._lock = threading.Lock()
        self._expected = expected_preprocess(library.model)  # until the model is loaded
        self._expected_arrays: dict[int, "weakref.ref[np.ndarray]"] = {}  # made with it, not embedded yet
        self.expected_wrong = False  # the model's own preprocessing turned out to differ
        self._preprocess: ImagePreprocess | None = None  # the model's own, once it is loaded
        self._torch_prepare: Any = None  # open_clip's own transform, when the port cannot reproduce it
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()  # the model is loaded (or failed to): its preprocessing known
        self._ready = threading.Event()  # images can be embedded (or the export failed)
        self._finished = threading.Event()  # the export thread is done
        self._error: BaseException | None = None
        self._turns = threading.Condition()
        self._decoding = 0
        self._local = threading.local()  # a decoder's: whether its image was decoded for the expected size
        # the export is mostly one thread, with bursts on every core (its forward passes):
        # decoders on the other cores only, so that it always has one to itself
        self.decoders_while_exporting = max(1, available_cores() - 1)

    @classmethod
    def for_run(cls, library: Library, model_threads: int | None, images: int,
                progress: ProgressReporter | None = None, expected: int | None = None) -> "FirstExport | None":
        """One for this run when it is such a first run (else None): the export is pending and the library writable.
        `expected`: the images the encoder is told to expect (`run_jobs`' `long_lived`), if not `images`."""
        if images == 0 or library.catalog.read_only or not library.encoders.export_pending():
            return None
        first = cls(library, model_threads, images if expected is None else expected, progress)
        library.encoders.first_export_begins()  # text queries wait for its text tower, until `finish` at the latest
        return first

    # -- what the decoders call (as they call an encoder's) ----------------------------------

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def image_size(self) -> int:
        """The model's input size: as expected, until the model is loaded. (The decoder asks
        this, then `prepare`s the image it decoded for that size: both as expected, or neither.)"""
        self._begin()
        if not self._loaded.is_set() and self._expected is not None:
            self._local.as_expected = True
            return self._expected.image_size
        self._local.as_expected = False
        self._wait_loaded()
        if self._preprocess is not None:
            return self._preprocess.image_size
        return int(self.library.encoder.image_size)

    def prepare(self, image: "Image.Image") -> np.ndarray:
        self._begin()
        as_expected = getattr(self._local, "as_expected", None)
        if self._expected is not None and (as_expected or (as_expected is None and not self._loaded.is_set())):
            self._local.as_expected = None
            pixels = self._expected(image)
            with self._lock:  # noted before the array is handed on: a lane checks it (`prepared_wrongly`)
                self._expected_arrays[id(pixels)] = weakref.ref(pixels)
            return pixels
        self._local.as_expected = None
        self._wait_loaded()
        if self._preprocess is not None:
            return self._preprocess(image)
        self._ready.wait()  # open_clip's transform runs on torch: not while the export traces the model
        if self._error is not None:
            raise self._error
        return np.asarray(self._torch_prepare(image), dtype=np.float32)

    def prepared_wrongly(self, pixels: np.ndarray) -> bool:
        """Whether `pixels` were prepared as expected before the model was loaded, and the
        model's own preprocessing differs (call after `wait`): they must be prepared again."""
        if not self.expected_wrong:
            return False
        with self._lock:
            made = self._expected_arrays.get(id(pixels))
            return made is not None and made() is pixels

    def _wait_loaded(self) -> None:
        self._loaded.wait()
        if self._error is not None:
            raise self._error

    # -- the export ----------------------------------------------------------------------

    def _begin(self) -> None:
        """Start loading the model and exporting it, once (the first file's decoder does it)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._export, name="clipdex-export", daemon=True)
            self.progress("export", 0, 2)
            try:
                self._thread.start()
            except BaseException as error:  # no thread: nobody may wait for it
                self._fail(error)
                raise

    def _export(self) -> None:
        try:
            if EXPORT_PROCESS and self._export_in_process():
                return
            encoder = self.library.encoder
            encoder.set_threads(self._export_threads)
            encoder.load()  # its errors end the run, as loading the model for the first file always did
            try:
                preprocess: ImagePreprocess | None = ImagePreprocess.of_open_clip_model(getattr(encoder, "model"))
            except UnsupportedPreprocess:
                preprocess = None  # the image export will be refused: torch embeds
            del encoder  # the library holds the model while it is needed, and lets it go after the export
            self._model_known(preprocess)
            self.seconds = self.library.encoders.export_images_first(self._images_ready)
        except BaseException as error:  # handed to the decoders, the lanes and the run's end
            self._fail(error)
        finally:
            self.library.encoders.first_export_ends()
            self.progress("export", 2, 2)
            self._ready.set()
            self._finished.set()
            with self._turns:
                self._turns.notify_all()

    def _export_in_process(self) -> bool:
        """Have a process of its own load the model and export it (`ExportProcess`), and settle
        this run by what it tells. False, with nothing settled but the preprocessing, when it
        could not start (or ended at once without a word, as when it cannot import clipdex),
        or said it failed before the image tower was exported or refused: this process then
        does the rest itself (where the same error, if any, is raised). Killed, or failing
        once the photos are being embedded on the export, it ends the run with an error."""
        try:
            child = ExportProcess()
        except OSError as error:
            logger.info("no process could be started to export the model of %s (%s); this process exports it",
                        self.library.path, error)
            return False
        try:
            settled = self._settle(child.export(self.library.path, self.library.model.to_json(), self.library.encoders.dim,
                                                self._export_threads))
        finally:
            status = child.close()
        if settled is None:
            how = f"signal {-status}" if status < 0 else f"exit status {status}"
            if not self._loaded.is_set() and status > 0 and status != export_process.INTERRUPTED:
                return self._failed({"error": f"it ended without a word ({how})"})  # it never got going
            raise ClipdexError(f"the process exporting the model of {self.library.path} ended unexpectedly ({how})")
        return settled

    def _settle(self, messages: Iterator[dict[str, Any]]) -> bool | None:
        """Act on the export process's messages: True when it exported or refused both towers
        (the run follows from that), False when it said it failed before the image tower, None
        when it ended before it was done without a word."""
        encoders = self.library.encoders
        loaded = next(messages, None)
        if loaded is None or "loaded" not in loaded:
            return None if loaded is None else self._failed(loaded)
        loading_here = 0.0
        if loaded.get("preprocess") is None:  # the port cannot do it: open_clip's own transform runs here, on torch
            loading_here = self._load_here()
            self._model_known(None)
        else:
            self._model_known(ImagePreprocess.from_json(loaded["preprocess"]))
        started = time.monotonic()
        image = next(messages, None)
        if image is None or "image" not in image:
            return None if image is None else self._failed(image)
        if not (image["image"] and encoders.use_image_export()):
            loading_here += self._load_here()  # refused (the reason is recorded), or not written: embed on torch
        self._images_ready()
        text = next(messages, None)
        if text is None:
            return None
        if "text" not in text:
            raise ClipdexError(f"the process exporting the model of {self.library.path} failed: {text.get('error', text)}")
        encoders.text_exported()
        exported = image.get("exported") or text.get("exported")
        self.seconds = max(0.0, time.monotonic() - started - loading_here) if exported else 0.0
        return True

    @property
    def _export_threads(self) -> int:
        """The threads of the export's own forward passes (its checks): the cores the decoders leave it."""
        return max(1, available_cores() - self.decoders_while_exporting)

    def _model_known(self, preprocess: ImagePreprocess | None) -> None:
        """The model is loaded, and with it its preprocessing (None: the port cannot reproduce
        it, and open_clip's own transform runs on the model loaded here): let the decoders on."""
        self._preprocess = preprocess
        if preprocess is None:
            self._torch_prepare = self.library.encoder.prepare
        self.expected_wrong = self._expected is not None and self._expected != preprocess
        self._loaded.set()

    def _load_here(self) -> float:
        """Load the torch model in this process (the images run on it); the seconds it took."""
        started = time.monotonic()
        encoder = self.library.encoder
        encoder.set_threads(self._export_threads)  # the lanes' threads are set when they are let go
        encoder.load()
        return time.monotonic() - started

    def _failed(self, message: dict[str, Any]) -> bool:
        logger.info("the process exporting the model of %s failed (%s); this process exports it",
                    self.library.path, message.get("error", message))
        return False

    def _fail(self, error: BaseException) -> None:
        self._error = error  # before anyone waiting is let go
        self._loaded.set()
        self._ready.set()
        self._finished.set()
        with self._turns:
            self._turns.notify_all()

    def _images_ready(self) -> None:
        """The encoder the lanes embed with is settled: set it up for them, and let them go."""
        encoder = self.library.encoder
        if self.model_threads is not None:
            encoder.set_threads(self.model_threads)
        encoder.expect_images(self.images)
        self.progress("export", 1, 2)
        self._ready.set()

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
        return self._thread is not None and not self._finished.is_set()

    def wait(self) -> None:
        """Until the images can be embedded, if the export was started (a model lane calls this first)."""
        with self._lock:
            started = self._thread is not None
        if started:
            self._ready.wait()
            if self._error is not None:
                raise self._error

    def finish(self) -> float:
        """Wait for the export thread (also when the run failed); the seconds the export took."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.library.encoders.first_export_ends()  # also when it never began
        return self.seconds

    @property
    def error(self) -> BaseException | None:
        """What ended the export thread, if anything did (the run must end with it)."""
        return self._error
