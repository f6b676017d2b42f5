"""Reading a whole file safely: only a regular file, and never more than a size limit.

A FIFO would block the reader forever, a device (a link to /dev/zero, say) never ends,
and a sparse file can claim 50 GB: each is refused before a byte is read. The file is
stat'ed before it is opened (opening some devices has effects of its own), then opened
non-blocking and checked again on the descriptor, so a file swapped for a FIFO in between
is refused too; and the read stops one byte past the limit whatever the size claims.
"""

from __future__ import annotations

import os
import stat

from clipdex.search.errors import ClipdexError, UnreadableFile

DEFAULT_MAX_FILE_MB = 512  # far above any real photo or query vector
MB = 1024 * 1024
_FIRST_READ = 1 << 16  # when the size claims less: read on in steps of this


def max_file_bytes(megabytes: float) -> int:
    if megabytes <= 0:
        raise ClipdexError(f"the file size limit must be positive, not {megabytes} MB")
    return int(megabytes * MB)


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this st_mode is refused, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"{kind}, not a regular file: only regular files are read"


def describe_size(size: int) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", MB), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def too_large_reason(size: int, limit: int, claimed: bool = True, setting: str | None = None) -> str:
    """`claimed`: the size is what stat says; else the file only turned out larger when read.
    `setting`: the option that sets the limit, named in the reason."""
    said = describe_size(size) if claimed else "larger when read than its size said"
    return f"{said}, over the {describe_size(limit)} size limit" + (f" ({setting})" if setting else "")


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, larger: str | None = None,
                      setting: str | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at `path` (links followed) and its fstat, reading at most
    `max_bytes` + 1 bytes. Raises UnreadableFile for anything else or anything larger (with
    the reason `larger` when given, else its size, the limit and the `setting` that sets
    it); OSError (FileNotFoundError, PermissionError...) as opening and reading raise it."""
    name = os.fspath(path)

    def check(info: os.stat_result) -> None:
        reason = not_regular_reason(info.st_mode)
        if reason is not None:
            raise UnreadableFile(name, reason)
        if info.st_size > max_bytes:
            raise UnreadableFile(name, larger or too_large_reason(info.st_size, max_bytes, setting=setting))

    check(os.stat(path))
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                         | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(descriptor)
        check(info)
        data = _read_at_most(descriptor, max_bytes + 1, info.st_size + 1)
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise UnreadableFile(name, larger or too_large_reason(len(data), max_bytes, claimed=False, setting=setting))
    return data, info


def _read_at_most(descriptor: int, limit: int, expected: int) -> bytes:
    """Read up to `limit` bytes: one read of the `expected` size for most files, then on in steps."""
    parts: list[bytes] = []
    total = 0
    want = min(limit, max(expected, 1))
    while total < limit:
        chunk = os.read(descriptor, min(want, limit - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        want = _FIRST_READ
    return b"".join(parts)
