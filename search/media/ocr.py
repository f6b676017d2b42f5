"""Words from pixels: OCR with RapidOCR (PP-OCR detection and recognition models) on onnxruntime.

`rapidocr` (Apache-2.0; its models are PaddleOCR's, Apache-2.0 too: its MODEL_LICENSES.md)
ships its detection, direction and recognition models inside its wheel; they are opened
here by their paths in the installed package, so RapidOCR never takes its download path
(which it takes only when no model path is given). A missing model file is an error that
says to reinstall, never a download. The recognition model reads Chinese and English
(with digits and punctuation) and carries its own character table.

How a photo is read (`TextReader.read`), bounded in time and memory:
1. decoded once, with its EXIF orientation, at most `read_side` pixels a side (JPEG's draft
   mode scales 12-MP photos down while decoding); an image too thin or too elongated to hold
   text (a 30000x1 strip), or that is no image or a decompression bomb, is reported, not read;
2. the detector runs on a copy at most `detect_side` pixels a side (a smaller image is
   enlarged to it, up to 3 times, for both steps): a photo without text costs only this step;
3. only the boxes found are recognised, at most `max_lines`, turned upright first when
   upside down, each from the larger decoded copy;
4. recognitions under `min_score` are dropped (a cat's fur yields a "0" at 0.70), and so are
   those of punctuation alone (photo grain read as a "：" at 0.84).
Boxes are given in the pixels of the image as shown (after its orientation), at full size.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipdex.search.errors import MissingDependency, UnreadableImage
from clipdex.search.media.imaging import decode_image

log = logging.getLogger(__name__)

OCR_EXTRA = "ocr"  # pyproject's extra that installs rapidocr


@dataclass(frozen=True)
class OcrSettings:
    """How text is read (see the module's description)."""

    # the detector's copy: its longer side at most this (pixels). 512 finds letters from about 1.5% of
    # a 12-MP photo's longer side up and keeps the pass at >= 2 photos/s on 2 cores (benchmarks/README.md)
    detect_side: int = 512
    read_side: int = 1600  # the copy boxes are cut from for recognition: longer side at most this
    min_score: float = 0.8  # recognitions less confident than this are dropped
    max_lines: int = 300  # boxes recognised per image at most (a page of a book holds ~50 lines)
    min_side: int = 8  # an image thinner than this (pixels) holds no readable text
    max_aspect: float = 60.0  # nor one longer than this many times its width
    threads: int = 0  # onnxruntime's threads per model (0: its default, every core)


@dataclass
class TextFound:
    """What OCR read in one image: its lines (text, score, box) and all their text."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    detected: int = 0  # boxes the detector found (before the confidence filter)

    @property
    def text(self) -> str:
        return "\n".join(line["text"] for line in self.lines)


@dataclass(frozen=True)
class PreparedImage:
    bgr: np.ndarray  # the decoded copy, OpenCV's channel order
    scale: tuple[float, float]  # from its pixels to the full image's


class TextReader:
    """RapidOCR, loaded on first use (its models are a few seconds' load), shared by threads
    (one read at a time: onnxruntime already uses every core)."""

    def __init__(self, settings: OcrSettings | None = None) -> None:
        self.settings = settings or OcrSettings()
        self._engine: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._engine is None:
            self._engine = _engine(self.settings)
        return self._engine

    def read(self, source: str | Path | bytes, name: str | None = None) -> TextFound:
        """The text in an image file (or its bytes). Raises UnreadableImage for a file that is no
        image, a decompression bomb, or an image that cannot hold text."""
        return self.read_prepared(self.prepare(source, name))

    def prepare(self, source: str | Path | bytes, name: str | None = None) -> "PreparedImage":
        """Decode an image for `read_prepared` (steps 1 of the module's description; any thread)."""
        label = name or (str(source) if not isinstance(source, bytes) else "image")
        # JPEG's draft mode scales by 1/2, 1/4, 1/8 while decoding, keeping both sides at least the size asked:
        # half the read size lets a 4:3 photo come out between read_side and twice it, at a quarter of the work
        decoded = decode_image(source, draft_size=self.settings.read_side // 2, name=label)
        width, height = decoded.width, decoded.height
        if min(width, height) < self.settings.min_side or max(width, height) > self.settings.max_aspect * min(width, height):
            raise UnreadableImage(label, f"{width}x{height} pixels is too thin or too elongated to hold text; not read")
        image = decoded.image
        if max(image.size) > self.settings.read_side:
            image = image.copy()
            image.thumbnail((self.settings.read_side, self.settings.read_side))
        elif max(image.size) < self.settings.detect_side:  # small text (a scan at screen size): enlarged for both steps
            factor = min(3.0, self.settings.detect_side / max(image.size))
            image = image.resize((round(image.size[0] * factor), round(image.size[1] * factor)), Image.Resampling.BICUBIC)
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # RapidOCR takes OpenCV's BGR
        return PreparedImage(pixels, (width / image.size[0], height / image.size[1]))

    def read_prepared(self, prepared: "PreparedImage") -> TextFound:
        return self.read_pixels(prepared.bgr, prepared.scale)

    def read_pixels(self, bgr: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)) -> TextFound:
        """The text in BGR pixels; boxes multiplied by `scale` (to the full image's pixels)."""
        started = time.perf_counter()
        with self._lock:
            result = self._load()(bgr)
        found = TextFound(seconds=0.0)
        boxes = getattr(result, "boxes", None)
        texts = getattr(result, "txts", None) or ()
        scores = getattr(result, "scores", None) or ()
        found.detected = 0 if boxes is None else len(boxes)
        for box, text, score in zip(boxes if boxes is not None else (), texts, scores):
            text = " ".join(str(text).split())
            if float(score) < self.settings.min_score or not any(char.isalnum() for char in text):
                continue  # unsure, or punctuation alone (grain read as "：")
            corners = [[round(float(x) * scale[0], 1), round(float(y) * scale[1], 1)] for x, y in np.asarray(box)[:4]]
            found.lines.append({"text": text, "score": round(float(score), 4), "box": corners})
        found.seconds = time.perf_counter() - started
        return found


def _engine(settings: OcrSettings) -> Any:
    try:
        import rapidocr
        from rapidocr import RapidOCR
    except ImportError:
        raise MissingDependency(f"OCR needs the rapidocr package: pip install 'clipdex[{OCR_EXTRA}]'") from None
    models = Path(rapidocr.__file__).parent / "models"
    paths = {"Det": models / "PP-OCRv6_det_small.onnx", "Rec": models / "PP-OCRv6_rec_small.onnx",
             "Cls": models / "ch_ppocr_mobile_v2.0_cls_mobile.onnx"}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:  # RapidOCR would download them: never here
        raise MissingDependency(f"rapidocr's models are missing ({', '.join(missing)}): reinstall it: "
                             f"pip install --force-reinstall 'clipdex[{OCR_EXTRA}]'")
    threads = settings.threads or -1
    params: dict[str, Any] = {
        "Global.log_level": "error",
        "Global.text_score": 0.0,  # the confidence filter is ours (`min_score`)
        "Global.max_side_len": max(settings.read_side, settings.detect_side),
        "Det.limit_type": "max",
        "Det.limit_side_len": settings.detect_side,
        "Det.max_candidates": settings.max_lines,
        "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    }
    params.update({f"{task}.model_path": str(path) for task, path in paths.items()})
    for name in ("rapidocr", "RapidOCR"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return RapidOCR(params=params)
