"""Every image a user may have, and every bad file: reported with a reason, the rest indexed."""

from __future__ import annotations

import struct
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.indexer import index_paths
from clipdex.search.media.imaging import decode_image, to_rgb
from clipdex.search.library import Library
from tests.conftest import write_image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path) -> Path:
    """A tiny file claiming 40000 x 40000 pixels."""
    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("suffix,format", [
    (".jpg", "JPEG"), (".png", "PNG"), (".webp", "WEBP"), (".gif", "GIF"), (".bmp", "BMP"),
    (".tiff", "TIFF"), (".heic", "HEIF"), (".avif", "AVIF"),
])
def test_every_format_is_indexed(library: Library, tmp_path: Path, suffix: str, format: str) -> None:
    if format == "HEIF":
        pytest.importorskip("pillow_heif")
    path = write_image(tmp_path / "pics" / f"photo{suffix}", seed=3, size=(64, 48), format=format)
    report = index_paths(library, [tmp_path / "pics"])
    assert report.failed == [] and report.added == 1
    hit = library.search(image=path, k=1)[0]
    assert hit.path == str(path) and hit.score == pytest.approx(1.0, abs=1e-4)
    assert (hit.metadata["width"], hit.metadata["height"]) == (64, 48)


def test_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    decoded = decode_image(path)
    assert decoded.image.getpixel((5, 5))[0] > 200


@pytest.mark.parametrize("mode,expected", [
    ("P", (200, 30, 30)),
    ("RGBA", (255, 255, 255)),  # fully transparent pixel -> white background
    ("CMYK", None),
    ("I;16", (128, 128, 128)),
    ("1", (255, 255, 255)),
    ("LA", (255, 255, 255)),
])
def test_modes_become_rgb(mode: str, expected: tuple[int, int, int] | None) -> None:
    if mode == "P":
        image = Image.new("RGB", (8, 8), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA":
        image = Image.new("RGBA", (8, 8), (10, 10, 10, 0))
    elif mode == "LA":
        image = Image.new("LA", (8, 8), (10, 0))
    elif mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))
        assert image.mode == "I;16"
    elif mode == "1":
        image = Image.new("1", (8, 8), 1)
    else:
        image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    pixel = rgb.getpixel((3, 3))
    if expected is None:  # CMYK pure magenta+yellow = red
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60
    else:
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, expected)), pixel


def test_palette_with_transparency_composites_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((1, 1)) == (255, 255, 255)


def test_exif_metadata_is_kept(library: Library, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "EOS 5D"
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 18:30:00"
    path = tmp_path / "pics" / "camera.jpg"
    path.parent.mkdir()
    Image.new("RGB", (40, 30), (20, 120, 40)).save(path, exif=exif.tobytes())
    index_paths(library, [path.parent])
    metadata = library.search(image=path, k=1)[0].metadata
    assert metadata["camera_make"] == "Canon" and metadata["camera_model"] == "EOS 5D"
    assert metadata["taken_at"] == datetime(2021, 7, 4, 18, 30).isoformat()
    assert metadata["size"] == path.stat().st_size


def bad_files(folder: Path) -> dict[str, str]:
    """Each class of bad input, and a word its reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    bomb_png(folder / "bomb.png")
    good = write_image(folder / "whole.jpg", seed=1, size=(200, 150))
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    good.unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    return {"bomb.png": "decompression bomb", "truncated.jpg": "truncated", "empty.jpg": "empty", "notes.jpg": "not an image"}


def test_bad_files_are_reported_and_the_rest_indexed(library: Library, tmp_path: Path, make_images) -> None:
    folder = tmp_path / "pics"
    expected = bad_files(folder)
    make_images(folder, 3)
    report = index_paths(library, [folder])
    assert report.added == 3
    reasons = {Path(f.path).name: f.error for f in report.failed}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name].lower(), (name, reasons[name])
        assert "\n" not in reasons[name]
    assert library.stats()["images"] == 3


def test_file_vanishing_mid_run_is_reported(library: Library, tmp_path: Path, make_images, monkeypatch) -> None:
    import clipdex.indexer.pipeline as pipeline

    paths = make_images(tmp_path / "pics", 4)
    real_scan = pipeline.scan

    def scan_then_delete(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        paths[2].unlink()
        return result

    monkeypatch.setattr(pipeline, "scan", scan_then_delete)
    report = index_paths(library, [tmp_path / "pics"])
    assert report.added == 3
    assert [(Path(f.path).name, f.error) for f in report.failed] == [("img002.jpg", "file vanished before it could be read")]


def test_image_between_one_and_two_bomb_limits_is_refused(tmp_path: Path) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; clipdex refuses (thread-safely)."""
    path = tmp_path / "big.png"
    header = struct.pack(">IIBBBBB", 15_000, 15_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    from clipdex.search.errors import UnreadableImage

    with pytest.raises(UnreadableImage, match="decompression bomb"):
        decode_image(path)


def test_a_file_grown_since_the_scan_is_not_read_past_its_scanned_size(library: Library, tmp_path: Path, make_images, monkeypatch) -> None:
    import clipdex.indexer.pipeline as pipeline
    import clipdex.indexer.rules as rules

    paths = make_images(tmp_path / "pics", 3)
    real_scan = pipeline.scan

    def scan_then_grow(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        with open(paths[1], "r+b") as handle:
            handle.truncate(64 << 20)  # sparse; a JPEG with zeros after its end still decodes
        return result

    monkeypatch.setattr(pipeline, "scan", scan_then_grow)
    read = []
    real_read = rules.read_regular_file
    monkeypatch.setattr(rules, "read_regular_file", lambda *a, **k: read.append(a[1]) or real_read(*a, **k))
    report = index_paths(library, [tmp_path / "pics"])
    assert report.added == 2
    assert [(Path(f.path).name, f.error) for f in report.failed] == [("img001.jpg", "file changed during the run; run index again")]
    assert max(read) < 1 << 20  # each read was bounded by the size the scan saw


def test_pillow_warnings_are_logged_with_the_file_not_printed(library: Library, tmp_path: Path, caplog, capsys, monkeypatch) -> None:
    import logging
    import warnings

    from clipdex.search.media import imaging
    from tests.test_cli import corrupt_exif_jpeg

    monkeypatch.setattr(warnings, "showwarning", imaging._show_warning)  # pytest swaps in its own recorder per test
    path = corrupt_exif_jpeg(tmp_path / "pics" / "warns.jpg") if (tmp_path / "pics").mkdir() is None else None
    caplog.set_level(logging.DEBUG, logger="clipdex.search.media.imaging")
    report = index_paths(library, [tmp_path / "pics"], workers=2)
    assert report.added == 1
    logged = [record.getMessage() for record in caplog.records if record.name == "clipdex.search.media.imaging"]
    assert logged and all(message.startswith(f"{path}: UserWarning: ") for message in logged), logged
    assert "Warning" not in capsys.readouterr().err


def test_a_file_swapped_for_a_fifo_after_its_stat_is_refused_without_blocking(tmp_path: Path, monkeypatch) -> None:
    import os
    import threading

    from clipdex.search.media import safe_read
    from clipdex.search.errors import UnreadableFile

    photo = write_image(tmp_path / "photo.jpg", seed=1)
    swapped = tmp_path / "swapped.jpg"
    os.mkfifo(swapped)
    real_stat = os.stat
    monkeypatch.setattr(safe_read.os, "stat", lambda path, *args, **kwargs: real_stat(photo))  # the stat saw a photo
    outcome: list[str] = []

    def read() -> None:
        try:
            safe_read.read_regular_file(swapped, 1 << 20)
            outcome.append("read")
        except UnreadableFile as error:
            outcome.append(error.reason)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(swapped, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked open return
        pytest.fail("opening the FIFO blocked")
    assert outcome == ["a FIFO (named pipe), not a regular file: only regular files are read"]


def test_a_jpeg_is_handed_to_the_decoder_in_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder releases the GIL while it decodes; a loop over 64 KiB blocks would need it
    back for every block, and stall behind any thread busy in Python (an import, an export)."""
    import io

    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8), "RGB").save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    assert len(data) > 20 * 65536
    calls: list[int] = []
    getdecoder = Image._getdecoder

    class Counted:
        def __init__(self, decoder):  # type: ignore[no-untyped-def]
            self.decoder = decoder

        def decode(self, chunk):  # type: ignore[no-untyped-def]
            calls.append(len(chunk))
            return self.decoder.decode(chunk)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.decoder, name)

    monkeypatch.setattr(Image, "_getdecoder", lambda *args, **kwargs: Counted(getdecoder(*args, **kwargs)))
    decoded = decode_image(data, draft_size=512)
    assert decoded.width == 2000 and decoded.image.size == (1000, 750)  # drafted to a quarter, as before
    assert 1 <= len(calls) <= 2, calls  # all bytes at once (and the end of the data)


@pytest.mark.parametrize("error, reason", [
    (MemoryError(), "MemoryError: not enough memory to decode and prepare this file"),
    (RuntimeError(""), "RuntimeError: no detail given"),
    (ValueError("bad\nsecond line"), "ValueError: bad"),
])
def test_an_unexpected_decoder_error_is_one_line_that_says_something(
        library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str) -> None:
    import clipdex.indexer.rules as rules

    make_images(tmp_path / "pics", 2)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(rules, "decode_image", failing)
    report = index_paths(library, [tmp_path / "pics"])
    assert [f.error for f in report.failed] == [reason, reason]
