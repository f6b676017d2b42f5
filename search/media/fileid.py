"""What identifies an indexed file's bytes: one content hash for the indexer and the server."""

from __future__ import annotations

import hashlib
import os

from clipdex.search.errors import UnreadableFile
from clipdex.search.media.safe_read import not_regular_reason

CHUNK = 1 << 20


def content_hash(data: bytes) -> str:
    """The hash stored with each image item (BLAKE2b, 160 bits): equal bytes, equal hash."""
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def content_hash_of_file(path: str | os.PathLike[str]) -> tuple[str, os.stat_result]:
    """`content_hash` of a regular file's bytes, read a MiB at a time (a video of gigabytes is
    never held in memory), and the fstat of the file that was read. Raises UnreadableFile for
    anything but a regular file, OSError as opening and reading raise it."""
    name = os.fspath(path)
    descriptor = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(descriptor)
        reason = not_regular_reason(info.st_mode)
        if reason is not None:
            raise UnreadableFile(name, reason)
        digest = hashlib.blake2b(digest_size=20)
        while chunk := os.read(descriptor, CHUNK):
            digest.update(chunk)
    finally:
        os.close(descriptor)
    return digest.hexdigest(), info
