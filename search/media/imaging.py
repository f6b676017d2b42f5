"""Decoding images safely into RGB, the way the model expects them.

Every failure becomes `UnreadableImage(path, reason)` with a one-line reason.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipdex.search.errors import ImageTooLarge, UnreadableFile, UnreadableImage
from clipdex.search.media.raw import RAW_EXTENSIONS, decode_raw, is_raw_path
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, MB, read_regular_file

logger = logging.getLogger(__name__)

try:  # HEIC/HEIF through pillow-heif; AVIF is Pillow's own (>= 11.3)
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    pass

PHOTO_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)
IMAGE_EXTENSIONS = PHOTO_EXTENSIONS | RAW_EXTENSIONS  # RAW photos through `clipdex.search.media.raw`
# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse both.
MAX_IMAGE_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# _decode_opened refuses such images itself; Pillow's own warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A query image (a search or an embedding, from the CLI or over HTTP) is decoded whole into
# memory, 3 bytes a pixel, for the model to shrink it to a few hundred pixels: 50 MP (a
# full-resolution phone or camera photo, 150 MB as RGB) is plenty, where the indexing limit
# above would let one request take half a gigabyte.
MAX_QUERY_IMAGE_PIXELS = 50_000_000

# open_clip's transform resizes an image's shorter side to the model's input, then keeps the
# middle square: the whole image is resized first. For a long thin image that is a huge picture
# made to be thrown away: a 1,249-byte 1x300000 PNG becomes 224 x 67 million pixels (60 GB) for
# ViT-B-32 to keep 224x224 of them. Where that resize would make more than this many pixels (32 MB
# as Pillow's RGB, 96 MB as float32 on the GPU), only the middle of the long side is resized
# (`middle_to_resize`): it holds the square the crop keeps, so the model sees the same part of the
# image. Every other image, panoramas and long screenshots too (up to 159:1 for ViT-B-32), is
# preprocessed whole, exactly as open_clip does.
MAX_RESIZED_PIXELS = 8_000_000

EXIF_DATETIME_ORIGINAL = 0x9003
EXIF_DATETIME = 0x0132
EXIF_MAKE = 0x010F
EXIF_MODEL = 0x0110
EXIF_DESCRIPTION = 0x010E  # ImageDescription: found by keyword search
EXIF_IFD = 0x8769


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int  # of the original, after orientation
    height: int
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    source: str | None = None  # for a RAW photo: "preview" (its embedded JPEG) or "demosaic"
    description: str | None = None  # EXIF ImageDescription

    def extra(self) -> dict[str, Any]:
        """The catalog's `extra` of the image: its EXIF description, when it has one."""
        return {"description": self.description} if self.description else {}


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(source: str | Path | bytes, draft_size: int | None = None, name: str | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = DEFAULT_MAX_FILE_MB * MB) -> DecodedImage:
    """Decode an image file (or its bytes) into RGB with EXIF orientation applied.

    `draft_size`: for JPEGs, let the decoder scale down by a power of two while both
    sides stay at least this large (the model then resizes with its own transform).
    `max_pixels`: a lower limit than the decompression-bomb one (MAX_QUERY_IMAGE_PIXELS
    for query images); an image over it raises ImageTooLarge before its pixels are read.
    A file is read only if it is a regular file of at most `max_bytes` (`clipdex.search.media.safe_read`).
    Pillow's warnings about the file (corrupt EXIF, say) are logged at DEBUG level, not printed.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "image")
    if not isinstance(source, bytes):
        source = _read_image_file(source, label, max_bytes)
    if is_raw_path(label):  # a RAW photo: its embedded preview when big enough, else a demosaic
        return decode_raw(source, label, min_preview_side=draft_size)
    if not source:
        raise UnreadableImage(label, "empty file (0 bytes)")
    try:
        with _warnings_logged(label), Image.open(io.BytesIO(source)) as opened:
            _refuse_over(opened, max_pixels, label)
            # the bytes are in memory: hand them to the decoder at once, not 64 KiB at a time.
            # It releases the GIL while it decodes, so one call lets other threads run
            # throughout, while the loop over small blocks needed the GIL back for each
            # block: with a thread busy in Python (an import, a model export) that decoded
            # photos up to seven times slower
            opened.decodermaxblock = max(opened.decodermaxblock, len(source))
            return _decode_opened(opened, draft_size)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(label, f"refused as a decompression bomb ({_first_line(error)})") from None
    except UnidentifiedImageError:
        raise UnreadableImage(label, "not an image Pillow can identify (wrong extension or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
        reason = _first_line(error) or type(error).__name__
        if "truncated" in reason.lower() or isinstance(error, EOFError):
            reason = f"truncated or corrupt image data ({reason})"
        raise UnreadableImage(label, reason) from None


def _read_image_file(path: str | Path, label: str, max_bytes: int) -> bytes:
    try:
        return read_regular_file(path, max_bytes)[0]
    except UnreadableFile as error:
        raise UnreadableImage(label, error.reason) from None
    except FileNotFoundError:
        raise UnreadableImage(label, "no such file") from None
    except OSError as error:
        raise UnreadableImage(label, f"cannot read: {error.strerror or error}") from None


# Pillow warns about damaged files (corrupt EXIF data, say) with warnings.warn. Those of a
# decode are logged with the file's name instead of printed. warnings.catch_warnings cannot
# do it: it swaps process-wide state, and decodes run on many threads at once (one thread
# leaving the block would restore the state under another, and leave a recorder installed
# for good). So one hook, installed once, looks up which file this thread is decoding.
_decoding = threading.local()
_show_warning_before = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    name = getattr(_decoding, "name", None)
    if name is None:
        _show_warning_before(message, category, filename, lineno, file, line)
    else:
        logger.debug("%s: %s: %s", name, category.__name__, message)


warnings.showwarning = _show_warning


@contextmanager
def _warnings_logged(name: str) -> Iterator[None]:
    before = getattr(_decoding, "name", None)
    _decoding.name = name
    try:
        yield
    finally:
        _decoding.name = before


EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _refuse_over(opened: Image.Image, max_pixels: int, label: str) -> None:
    width, height = opened.size
    if max_pixels < MAX_IMAGE_PIXELS and width * height > max_pixels:
        raise ImageTooLarge(label, f"{width}x{height} pixels is more than the {max_pixels:,} a query image may have; "
                                   "scale it down (the model sees a few hundred pixels a side)")


def _decode_opened(opened: Image.Image, draft_size: int | None) -> DecodedImage:
    width, height = opened.size  # full resolution, before any draft reduction
    if width * height == 0:
        raise UnreadableImage(getattr(opened, "filename", "image") or "image", "image has no pixels")
    if width * height > MAX_IMAGE_PIXELS:  # Pillow only warns up to twice this; warnings filters are not thread-safe
        raise Image.DecompressionBombError(f"{width}x{height} pixels is more than the {MAX_IMAGE_PIXELS} allowed")
    exif = opened.getexif()
    if exif.get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    if getattr(opened, "n_frames", 1) > 1:
        opened.seek(0)
    if draft_size and opened.format == "JPEG":
        opened.draft("RGB", (draft_size, draft_size))
    opened.load()
    # exif_transpose copies the pixels even when there is nothing to turn: only call it when there is
    oriented = ImageOps.exif_transpose(opened) if exif.get(EXIF_ORIENTATION, 1) != 1 else opened
    return DecodedImage(
        image=to_rgb(oriented),
        width=width,
        height=height,
        taken_at=_exif_datetime(exif),
        camera_make=_exif_text(exif, EXIF_MAKE),
        camera_model=_exif_text(exif, EXIF_MODEL),
        description=_exif_text(exif, EXIF_DESCRIPTION),
    )


@dataclass
class ImageHeader:
    """What an image's header says, read without decoding its pixels (see `read_header`)."""

    format: str  # Pillow's name: "JPEG", "MPO", "PNG", ...
    mode: str  # Pillow's mode of the stored pixels: "RGB", "L", "CMYK", ...
    stored_width: int  # as stored, before EXIF orientation
    stored_height: int
    orientation: int  # EXIF orientation 1-8 (1 when absent or invalid)
    width: int  # after orientation, as DecodedImage gives them
    height: int
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    description: str | None = None  # EXIF ImageDescription

    def metadata(self) -> dict[str, Any]:
        """The catalog's image columns, the same keys and values decode_image's result gives."""
        return {"width": self.width, "height": self.height, "taken_at": self.taken_at,
                "camera_make": self.camera_make, "camera_model": self.camera_model,
                **({"extra": {"description": self.description}} if self.description else {})}


def read_header(data: bytes, name: str = "image") -> ImageHeader:
    """Format, size, EXIF orientation and metadata of an image's bytes, without decoding its pixels.

    Raises UnreadableImage when Pillow cannot identify the bytes or they hold no pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            stored_width, stored_height = opened.size
            exif = opened.getexif()
            image_format, mode = opened.format or "", opened.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(name, f"refused as a decompression bomb ({_first_line(error)})") from None
    except UnidentifiedImageError:
        raise UnreadableImage(name, "not an image Pillow can identify (wrong extension or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
        raise UnreadableImage(name, _first_line(error) or type(error).__name__) from None
    if stored_width * stored_height == 0:
        raise UnreadableImage(name, "image has no pixels")
    orientation = exif.get(EXIF_ORIENTATION, 1)
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    turned = orientation in TRANSPOSING_ORIENTATIONS
    return ImageHeader(
        format=image_format,
        mode=mode,
        stored_width=stored_width,
        stored_height=stored_height,
        orientation=orientation,
        width=stored_height if turned else stored_width,
        height=stored_width if turned else stored_height,
        taken_at=_exif_datetime(exif),
        camera_make=_exif_text(exif, EXIF_MAKE),
        camera_model=_exif_text(exif, EXIF_MODEL),
        description=_exif_text(exif, EXIF_DESCRIPTION),
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode != "I" or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        return image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _exif_datetime(exif: Image.Exif) -> datetime | None:
    raw = None
    try:
        raw = exif.get_ifd(EXIF_IFD).get(EXIF_DATETIME_ORIGINAL) or exif.get(EXIF_DATETIME)
    except (KeyError, ValueError, TypeError, OSError):
        raw = exif.get(EXIF_DATETIME)
    if not raw:
        return None
    try:
        return datetime.strptime(str(raw).strip("\x00 ").strip(), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def _exif_text(exif: Image.Exif, tag: int) -> str | None:
    value = exif.get(tag)
    if value is None:
        return None
    text = str(value).strip("\x00 ").strip()
    return text or None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def middle_to_resize(width: int, height: int, image_size: int,
                     max_pixels: int = MAX_RESIZED_PIXELS) -> tuple[int, int, int, int] | None:
    """What to resize of a `width` x `height` image for a model that resizes the shorter side to
    `image_size` and keeps the middle square: None (all of it) when that resize makes at most
    `max_pixels` pixels; else, as a (left, top, right, bottom) box, the middle of the long side
    as long as such a resize of it makes at most `max_pixels` (and never shorter than the short side)."""
    short, long = min(width, height), max(width, height)
    if image_size * int(image_size * long / short) <= max_pixels:  # the size torchvision's Resize makes
        return None
    keep = max(short, max_pixels * short // (image_size * image_size))
    start = (long - keep) // 2
    return (0, start, width, start + keep) if height > width else (start, 0, start + keep, height)


def thumbnail_jpeg(source: str | Path | bytes, size: int = 256, quality: int = 85) -> bytes:
    """A JPEG thumbnail whose longer side is at most `size` pixels."""
    decoded = decode_image(source, draft_size=size)
    image = decoded.image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
