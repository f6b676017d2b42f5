"""Serving an item's own file and its thumbnail - and nothing else from the disk.

A file is served only from the path the catalog holds for that item, and only while it
is still the file that was indexed. Size and modification time are not enough for that
(whoever can write the folder sets both), so the file must be:

- a regular file, opened without following a symbolic link in its last component;
- the same file as when it was indexed: the device and inode recorded then, which also
  catches a parent folder swapped for a link to another folder; where they differ (a
  restored backup, a filesystem without stable inodes, a row indexed before they were
  recorded) its bytes must hash to the indexed content hash.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO

from clipdex.search.catalog.types import ItemRow
from clipdex.search.atomic import write_bytes_atomic
from clipdex.search.errors import FileUnavailable, UnreadableImage
from clipdex.search.media.fileid import content_hash
from clipdex.search.media.imaging import thumbnail_jpeg
from clipdex.search.media.video import video_frame_jpeg

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)  # a requested size is rounded up to one of these


def open_indexed_file(item: ItemRow) -> BinaryIO:
    """Open the item's file for reading, checking that it is the one that was indexed."""
    if item.kind not in ("image", "video") or not item.path:
        raise FileUnavailable(f"item {item.id} is a {item.kind}; it has no file")
    # O_NONBLOCK: a FIFO put in the file's place must not hang the server
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(item.path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise _changed(item) from None
        raise FileUnavailable(f"the file of item {item.id} cannot be opened: {error.strerror}") from None
    handle = os.fdopen(descriptor, "rb")
    try:
        if not _is_indexed_file(item, handle):
            raise _changed(item)
    except BaseException:
        handle.close()
        raise
    return handle


def _is_indexed_file(item: ItemRow, handle: BinaryIO) -> bool:
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size != item.size or info.st_mtime_ns != item.mtime_ns:
        return False
    if item.device is not None and (info.st_dev, info.st_ino) == (item.device, item.inode):
        return True
    if not item.content_hash:
        return False
    data = handle.read(info.st_size + 1)
    handle.seek(0)
    return content_hash(data) == item.content_hash


def _changed(item: ItemRow) -> FileUnavailable:
    return FileUnavailable(f"the file of item {item.id} changed since it was indexed; re-index it to serve it")


def thumbnail_size(requested: int) -> int:
    """The cached size that serves a request for `requested` pixels (the cache stays bounded)."""
    return next((size for size in THUMBNAIL_SIZES if size >= requested), THUMBNAIL_SIZES[-1])


class ThumbnailCache:
    """JPEG thumbnails made on first request and kept under LIBRARY/thumbnails/SIZE/."""

    def __init__(self, library_path: Path) -> None:
        self.directory = library_path / THUMBNAIL_DIR

    def path_for(self, item: ItemRow, size: int, at: float = 0.0) -> Path:
        # The file's identity is part of the name: a changed file gets a new thumbnail.
        identity = f"{item.id}:{item.content_hash}:{item.size}:{item.mtime_ns}"
        if item.kind == "video":
            identity += f":{at:.3f}"
        digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
        return self.directory / str(size) / f"{item.id}-{digest}.jpg"

    def get(self, item: ItemRow, size: int, at: float = 0.0) -> bytes:
        """The thumbnail's JPEG bytes, made and stored when it is not cached yet (a video's: its frame `at` seconds)."""
        cached = self.path_for(item, size, at)
        try:
            return cached.read_bytes()
        except OSError:  # not made yet (or the cache cannot be read): make it
            pass
        with open_indexed_file(item) as handle:
            source = b"" if item.kind == "video" else handle.read()  # a video is decoded from its path, as a stream
        try:
            data = video_frame_jpeg(str(item.path), at, size) if item.kind == "video" else thumbnail_jpeg(source, size)
        except UnreadableImage as error:
            raise FileUnavailable(f"the file of item {item.id} cannot be decoded: {error.reason}") from None
        try:
            write_bytes_atomic(cached, data)
        except OSError:  # a read-only library still gets its thumbnails, made each time
            pass
        return data
