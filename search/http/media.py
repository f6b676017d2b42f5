"""Serving an item's own file and its thumbnail - and nothing else from the disk.

A file is served only from the path the catalog holds for that item, and only while it
is still the file that was indexed (a regular file of the same size and modification
time): a path swapped for a link to something else after indexing is refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from search.catalog import Item
from search.errors import UnreadableImage
from search.imaging import thumbnail_jpeg

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)  # a requested size is rounded up to one of these


class FileUnavailable(Exception):
    """The item has no file to serve (a text), or its file is gone or changed since indexing."""


def open_indexed_file(item: Item) -> BinaryIO:
    """Open the item's file for reading, checking that it is the one that was indexed."""
    if item.kind != "image" or not item.path:
        raise FileUnavailable(f"item {item.id} is a {item.kind}; it has no file")
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not hang the server
        descriptor = os.open(item.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise FileUnavailable(f"the file of item {item.id} cannot be opened: {error.strerror}") from None
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode) or info.st_size != item.size or info.st_mtime_ns != item.mtime_ns:
        os.close(descriptor)
        raise FileUnavailable(f"the file of item {item.id} changed since it was indexed; re-index it to serve it")
    return os.fdopen(descriptor, "rb")


def thumbnail_size(requested: int) -> int:
    """The cached size that serves a request for `requested` pixels (the cache stays bounded)."""
    return next((size for size in THUMBNAIL_SIZES if size >= requested), THUMBNAIL_SIZES[-1])


class ThumbnailCache:
    """JPEG thumbnails made on first request and kept under LIBRARY/thumbnails/SIZE/."""

    def __init__(self, library_path: Path) -> None:
        self.directory = library_path / THUMBNAIL_DIR

    def path_for(self, item: Item, size: int) -> Path:
        # The file's identity is part of the name: a changed file gets a new thumbnail.
        identity = f"{item.id}:{item.content_hash}:{item.size}:{item.mtime_ns}"
        digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
        return self.directory / str(size) / f"{item.id}-{digest}.jpg"

    def get(self, item: Item, size: int) -> bytes:
        """The thumbnail's JPEG bytes, made and stored when it is not cached yet."""
        cached = self.path_for(item, size)
        try:
            return cached.read_bytes()
        except OSError:  # not made yet (or the cache cannot be read): make it
            pass
        with open_indexed_file(item) as handle:
            source = handle.read()
        try:
            data = thumbnail_jpeg(source, size)
        except UnreadableImage as error:
            raise FileUnavailable(f"the file of item {item.id} cannot be decoded: {error.reason}") from None
        try:
            _write_atomic(cached, data)
        except OSError:  # a read-only library still gets its thumbnails, made each time
            pass
        return data


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
