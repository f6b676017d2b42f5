"""The write lock: one writer per library at a time, any number of readers.

A strategy behind a small interface, so that a catalog that lives on a server can take a
lock there (PostgreSQL's advisory locks, say) instead of a file in the library folder.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from filelock import FileLock, Timeout

from clipdex.search.errors import LibraryBusy

LOCK_FILE = "write.lock"
HOLDER_FILE = "write.holder"  # who holds the lock (write.lock itself is truncated by each try)


class WriteLock(Protocol):
    def held(self) -> AbstractContextManager[None]:
        """Hold the lock for the block, or raise LibraryBusy at once when another writer holds it."""
        ...


class FileWriteLock:
    """An OS lock on LIBRARY/write.lock (flock on POSIX, msvcrt on Windows, through filelock).

    The OS releases it when the holder dies, so a killed writer never leaves the library locked.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextmanager
    def held(self) -> Iterator[None]:
        lock = FileLock(self.directory / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise LibraryBusy(
                f"library {self.directory} is being written by {self._holder()}; wait for that run to finish "
                "(searching it meanwhile works)"
            ) from None
        try:
            try:
                (self.directory / HOLDER_FILE).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
            except OSError:
                pass  # only a courtesy to the next writer
            yield
        finally:
            lock.release()

    def _holder(self) -> str:
        try:
            return (self.directory / HOLDER_FILE).read_text().strip() or "another process"
        except OSError:
            return "another process"
