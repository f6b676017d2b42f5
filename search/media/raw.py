"""RAW photos (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2, PEF ...) to RGB, through rawpy (LibRaw).

Two ways to the pixels, the fast one first:

- the embedded preview (`extract_thumb`: a JPEG, or an RGB bitmap in some DNGs) when its
  shorter side is at least `min_preview_side` (the indexer asks for twice the model's
  input): the camera already rendered it, so it costs a JPEG decode;
- else a demosaic at half size (`postprocess(half_size=True)`, plenty for a model that sees
  224 pixels) with the camera's white balance, the exposure as shot (no auto-brightening)
  and the sRGB tone curve, so that it looks as the camera's own rendering (the preview)
  does: LibRaw's defaults (dcraw's BT.709 curve, brightened until 1% of the pixels clip)
  made the test scenes 25-40 grey levels brighter than the picture they were made from. LibRaw turns that output by the file's own
  orientation (its `flip`); the preview is turned here by the same flip.

Capture time comes from LibRaw; camera make and model from the TIFF header that most RAW
formats are built on (CR3 and RAF are not: their make and model stay unknown).
Every failure is `UnreadableImage(name, reason)`.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipdex.search.errors import UnreadableImage

logger = logging.getLogger(__name__)

RAW_EXTENSIONS = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".pef",
     ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".mef", ".mos", ".kdc", ".dcr", ".rwl"}
)
MISSING = "RAW photos need rawpy: pip install 'clipdex[raw]'"

# LibRaw's flip (0, 3, 5, 6) as the transpose that shows the picture upright
_FLIP_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}
EXIF_MAKE = 0x010F
EXIF_MODEL = 0x0110
EXIF_ORIENTATION = 0x0112


def is_raw_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in RAW_EXTENSIONS


def _rawpy() -> Any:
    try:
        import rawpy
    except ImportError:
        raise UnreadableImage("RAW photo", MISSING) from None
    return rawpy


def decode_raw(data: bytes, name: str, min_preview_side: int | None = None, use_preview: bool = True) -> Any:
    """Decode a RAW file's bytes into a `DecodedImage` (RGB, upright).

    `min_preview_side`: the embedded preview is used when its shorter side reaches this
    (None: whenever there is one); `use_preview=False` always demosaics (for measuring).
    The result's `source` says which path made it ("preview" or "demosaic").
    """
    from clipdex.search.media.imaging import DecodedImage, decode_image

    rawpy = _rawpy()
    if not data:
        raise UnreadableImage(name, "empty file (0 bytes)")
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            flip = int(sizes.flip)
            width, height = int(sizes.width), int(sizes.height)
            if flip in (5, 6):
                width, height = height, width
            taken_at = _timestamp(raw)
            image, source = None, "demosaic"
            if use_preview:
                image = _preview(raw, rawpy, flip, min_preview_side, name, decode_image)
                source = "preview" if image is not None else source
            if image is None:
                pixels = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8, no_auto_bright=True, gamma=(2.4, 12.92))
                image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    except UnreadableImage:
        raise
    except (rawpy.LibRawIOError, rawpy.LibRawDataError) as error:
        raise UnreadableImage(name, f"truncated or damaged RAW photo ({_reason(error)})") from None
    except rawpy.LibRawError as error:
        raise UnreadableImage(name, f"not a RAW photo LibRaw can read ({_reason(error)})") from None
    except (OSError, ValueError, MemoryError) as error:
        raise UnreadableImage(name, f"damaged RAW photo ({_reason(error)})") from None
    make, model = _make_and_model(data)
    return DecodedImage(image=image, width=width, height=height, taken_at=taken_at, camera_make=make,
                        camera_model=model, source=source)


def _preview(raw: Any, rawpy: Any, flip: int, min_side: int | None, name: str, decode_image: Any) -> Image.Image | None:
    """The embedded preview, upright, when there is one big enough; else None."""
    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError:  # none, or one LibRaw cannot give: demosaic instead
        return None
    turn = True
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            decoded = decode_image(bytes(thumb.data), draft_size=min_side, name=f"{name} (embedded preview)")
        except UnreadableImage as error:
            logger.debug("%s: embedded preview not used: %s", name, error.reason)
            return None
        image = decoded.image
        turn = _jpeg_orientation(bytes(thumb.data)) in (None, 1)  # a preview with its own orientation is turned already
        short = min(decoded.width, decoded.height)
    elif thumb.format == rawpy.ThumbFormat.BITMAP and getattr(thumb.data, "ndim", 0) == 3 and thumb.data.shape[2] == 3:
        image = Image.fromarray(np.ascontiguousarray(thumb.data, dtype=np.uint8), "RGB")
        short = min(image.size)
    else:
        return None
    if min_side is not None and short < min_side:
        return None
    if turn and flip in _FLIP_TRANSPOSE:
        image = image.transpose(_FLIP_TRANSPOSE[flip])
    return image


def _jpeg_orientation(data: bytes) -> int | None:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            value = opened.getexif().get(EXIF_ORIENTATION)
    except Exception:  # a preview whose EXIF cannot be read has no orientation of its own
        return None
    return value if isinstance(value, int) else None


def _timestamp(raw: Any) -> datetime | None:
    try:
        value = raw.other.timestamp
    except (AttributeError, ValueError, OSError):
        return None
    if not isinstance(value, datetime) or value.year < 1971:  # LibRaw's 0: no time recorded
        return None
    return value.replace(tzinfo=None)


def _make_and_model(data: bytes) -> tuple[str | None, str | None]:
    """Camera make and model from the TIFF header (DNG, NEF, ARW, CR2, ORF, PEF ...); None when there is none."""
    from PIL import TiffImagePlugin

    try:  # the first directory's tags only: Pillow cannot open a Bayer TIFF as an image
        directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(directory.next)
        directory.load(stream)
        return _text(directory.get(EXIF_MAKE)), _text(directory.get(EXIF_MODEL))
    except Exception:  # not TIFF-based (CR3, RAF) or a damaged header: no make or model to tell
        return None, None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip("\x00 ").strip()
    return text or None


def _reason(error: BaseException) -> str:
    text = str(error).strip().strip("b'\"")
    return (text.splitlines()[0][:200] if text else type(error).__name__)
