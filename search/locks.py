"""The write lock: one writer per library at a time, any number of readers.

A strategy behind a small interface, so that a catalog that lives on a server can take a
lock there (PostgreSQL's advisory locks, say) instead of a file in the library folder.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from clipdex.search.errors import LibraryBusy

LOCK_FILE = "write.lock"
HOLDER_FILE = "write.holder"  # who holds the lock (write.lock itself is truncated by each try)

# The locks this process holds (a library folder, a shared catalog), each with the thread that
# took it: a writer refused by one of them is told so, not sent to wait for another process.
_held_here: dict[str, int] = {}
_held_here_guard = threading.Lock()


@contextmanager
def _holding(key: str) -> Iterator[None]:
    with _held_here_guard:
        _held_here[key] = threading.get_ident()
    try:
        yield
    finally:
        with _held_here_guard:
            _held_here.pop(key, None)


def _held_by_this_thread(key: str) -> bool:
    return _held_here.get(key) == threading.get_ident()


def _waited(wait: float) -> str:
    """How a refusal after waiting says so ('' when it did not wait)."""
    return f" (waited {round(wait, 1):g} s)" if wait > 0 else ""


def _busy_here(what: str, key: str) -> LibraryBusy | None:
    """The error for a writer refused because this process holds the lock `key` already, or None."""
    thread = _held_here.get(key)
    if thread is None:
        return None
    if thread == threading.get_ident():
        return LibraryBusy(f"{what} is already being written in this thread, by a write that has not ended (this one "
                           "is inside it); one writer at a time: end that write before starting another")
    return LibraryBusy(f"{what} is already being written by another thread of this process; one writer at a time: "
                       "wait for that write to end, or write from one thread (searching meanwhile works)")


class WriteLock(Protocol):
    def held(self, wait: float = 0.0) -> AbstractContextManager[None]:
        """Hold the lock for the block; when another writer holds it, wait up to `wait` seconds for
        it to let go, then raise LibraryBusy (at once with 0, and at once when this very thread
        holds it: waiting for itself would never end)."""
        ...


class FileWriteLock:
    """An OS lock on LIBRARY/write.lock (flock on POSIX, msvcrt on Windows, through filelock).

    The OS releases it when the holder dies, so a killed writer never leaves the library locked.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextmanager
    def held(self, wait: float = 0.0) -> Iterator[None]:
        from filelock import FileLock, Timeout  # imported by writers only: a search never takes it

        key = f"folder {os.path.realpath(self.directory)}"
        lock = FileLock(self.directory / LOCK_FILE, timeout=0 if _held_by_this_thread(key) else max(wait, 0.0))
        try:
            lock.acquire(poll_interval=0.05)
        except Timeout:
            raise _busy_here(f"library {self.directory}", key) or LibraryBusy(
                f"library {self.directory} is being written by {self._holder()}{_waited(wait)}; wait for that run "
                "to finish (searching it meanwhile works)"
            ) from None
        try:
            try:
                (self.directory / HOLDER_FILE).write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
            except OSError:
                pass  # only a courtesy to the next writer
            with _holding(key):
                yield
        finally:
            lock.release()

    def _holder(self) -> str:
        try:
            return (self.directory / HOLDER_FILE).read_text().strip() or "another process"
        except OSError:
            return "another process"


# One library per database: one key for its writer (any constant; this one spells "clipdex").
ADVISORY_KEY = 0x636C6970646578


class AdvisoryWriteLock:
    """A PostgreSQL session-level advisory lock: one writer per shared catalog, across machines.

    Held on a connection of its own for the whole run; the server lets go when that
    session ends, so a writer killed on any machine never leaves the catalog locked.
    """

    def __init__(self, engine: Any, catalog: str) -> None:
        self.engine = engine
        self.catalog = catalog

    @contextmanager
    def held(self, wait: float = 0.0) -> Iterator[None]:
        from sqlalchemy import text

        me = f"clipdex writer pid {os.getpid()} on {socket.gethostname()}"
        key = f"catalog {self.catalog}"
        deadline = time.monotonic() + (0.0 if _held_by_this_thread(key) else max(wait, 0.0))
        connection = self.engine.connect()
        try:
            connection.execute(text("SELECT set_config('application_name', :me, false)"), {"me": me})
            while True:  # tried, not waited on inside the server: the wait stays bounded and a Ctrl-C ends it
                got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}).scalar()
                connection.commit()
                if got or time.monotonic() >= deadline:
                    break
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
            if not got:
                raise _busy_here(f"catalog {self.catalog}", key) or LibraryBusy(
                    f"catalog {self.catalog} is being written by {self._holder(connection)}{_waited(wait)}; wait for "
                    "that run to finish (searching it meanwhile works)"
                )
        except BaseException:
            connection.close()
            raise
        try:
            with _holding(key):
                yield
        finally:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
                connection.commit()
                connection.close()
            except Exception:  # the session is unusable: drop it, the server then lets go of the lock
                connection.invalidate()

    def _holder(self, connection: Any) -> str:
        from sqlalchemy import text

        query = text(
            "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low AND l.objsubid = 1"
        )
        row = connection.execute(query, {"high": ADVISORY_KEY >> 32, "low": ADVISORY_KEY & 0xFFFFFFFF}).first()
        connection.rollback()
        if row is None:
            return "another process"
        name = row[0] or "a client"
        where = f" from {row[1]}" if row[1] else ""
        return f"{name}{where} (server pid {row[2]})"
