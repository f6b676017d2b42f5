"""HTTP Range requests (RFC 9110) for an item's file: a browser seeks in a video by asking for
its bytes from an offset on, and gets them as `206 Partial Content`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

_SINGLE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeNotSatisfiable(Exception):
    """A range that lies wholly past the end of the file (answered 416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) bytes, inclusive, that a Range header asks of a file of `size` bytes;
    None to send the whole file (no header, several ranges, a unit other than bytes, nonsense:
    a server may always answer those with the whole file)."""
    if not header:
        return None
    match = _SINGLE_RANGE.match(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # bytes=-N: the last N bytes
        suffix = int(last_text)
        if suffix == 0:
            raise RangeNotSatisfiable()
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text else size - 1
    if last_text and int(last_text) < first:
        return None  # invalid: ignored, as RFC 9110 says
    if first >= size:
        raise RangeNotSatisfiable()
    return first, last


def read_range(handle: BinaryIO, first: int, last: int, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    """The bytes first..last (inclusive) of the open file, in chunks; the file closed at the end."""
    with handle:
        handle.seek(first)
        left = last - first + 1
        while left > 0:
            chunk = handle.read(min(chunk_size, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk
