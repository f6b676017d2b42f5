"""The write lock: one writer per library at a time, any number of readers.

A strategy behind a small interface, so that a catalog that lives on a server can take a
lock there (PostgreSQL's advisory locks, say) instead of a file in the library folder.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

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
        from filelock import FileLock, Timeout  # imported by writers only: a search never takes it

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
    def held(self) -> Iterator[None]:
        from sqlalchemy import text

        me = f"clipdex writer pid {os.getpid()} on {socket.gethostname()}"
        connection = self.engine.connect()
        try:
            connection.execute(text("SELECT set_config('application_name', :me, false)"), {"me": me})
            got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}).scalar()
            connection.commit()
            if not got:
                raise LibraryBusy(
                    f"catalog {self.catalog} is being written by {self._holder(connection)}; wait for that run "
                    "to finish (searching it meanwhile works)"
                )
        except BaseException:
            connection.close()
            raise
        try:
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
