"""Reading a library that cannot be written: a read-only mount, a backup, another user's folder.

SQLite opens the catalog with a `mode=ro` URI then, and never writes to it. A catalog in
WAL mode needs its `-shm` file to be read; in a folder where it cannot be created (and no
writer left one behind), the catalog is opened `immutable=1`: nothing can be writing to it
then, since no writer could have created the `-wal` file either.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote

from clipdex.search.errors import CorruptLibrary

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.engine import Engine

logger = logging.getLogger(__name__)

# OSError numbers that mean "the environment cannot take a write here", not "the data is bad".
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}
# SQLite's words when it cannot write where the catalog is (it gives no errno).
SQLITE_UNWRITABLE = ("unable to open database file", "readonly database", "disk I/O error", "database or disk is full")
# Less free space than this, and a failed write is taken for a full disk.
LOW_SPACE_BYTES = 1 << 20


def sqlite_uri(path: Path, read_only: bool = True, immutable: bool = False) -> str:
    """An SQLite URI for `path`: mode=ro (and immutable=1) when asked."""
    options = "mode=ro" if read_only else "mode=rwc"
    if immutable:
        options += "&immutable=1"
    return f"file:{quote(str(path.absolute()))}?{options}"


def can_write(path: Path) -> bool:
    """True when the catalog file and its folder take writes (SQLite needs both: journal files live beside it)."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def open_catalog_engine(path: Path, busy_timeout_ms: int, configure: Callable[[Any, Any], None]) -> tuple[Engine, str | None]:
    """An engine for the catalog at `path`, and why it is read-only (None: it is not).

    Where the file and its folder take writes, the ordinary read-write engine (`configure`
    sets WAL and durability on each connection). Elsewhere, or when SQLite cannot open it
    for writing (a full disk: it cannot even create its shared-memory file), a `mode=ro`
    engine that never writes (`PRAGMA query_only`), `immutable=1` when SQLite cannot read
    the WAL file's index without writing; the library says so once, in the log.
    """
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import DatabaseError, OperationalError

    problem: Exception | None = None
    if can_write(path):
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": busy_timeout_ms / 1000})
        event.listen(engine, "connect", configure)
        try:
            _probe(engine)
            return engine, None
        except DatabaseError as error:  # read-only to SQLite after all, a full disk, or not a database
            engine.dispose()
            if not any(words in str(error.orig) for words in SQLITE_UNWRITABLE):
                raise CorruptLibrary(f"cannot open catalog {path}: {error.orig}") from error
            problem = error
    reason = _why_unwritable(path, problem)
    for immutable in (False, True):
        if immutable and _wal_holds_commits(path):
            break  # commits in the WAL file that immutable=1 would not see
        engine = create_engine(f"sqlite:///{sqlite_uri(path, immutable=immutable)}&uri=true",
                               connect_args={"timeout": busy_timeout_ms / 1000})
        event.listen(engine, "connect", _read_only_connection(busy_timeout_ms))
        try:
            _probe(engine)
        except OperationalError as error:
            engine.dispose()
            problem = problem or error
            continue
        logger.warning(
            "library %s cannot be written here (%s): opened read-only - searches work, nothing is saved%s",
            path.parent, reason, " (immutable: a writer elsewhere would not be seen)" if immutable else "",
        )
        return engine, reason
    raise CorruptLibrary(f"cannot open catalog {path}: {getattr(problem, 'orig', problem)}")


def _probe(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()


def _wal_holds_commits(path: Path) -> bool:
    try:
        return Path(f"{path}-wal").stat().st_size > 0
    except OSError:
        return False


def check_schema(engine: Engine, known_versions: int, path: Path) -> None:
    """What `migrate` checks, for a catalog that cannot be migrated because it cannot be written."""
    from sqlalchemy.exc import OperationalError

    try:
        with engine.connect() as connection:
            current = connection.exec_driver_sql("SELECT max(version) FROM schema_version").scalar() or 0
    except OperationalError as error:
        raise CorruptLibrary(f"cannot read catalog {path}: {error.orig}") from error
    if current > known_versions:
        raise CorruptLibrary(f"catalog schema version {current} is newer than this clipdex understands ({known_versions}); upgrade clipdex")
    if current < known_versions:
        raise CorruptLibrary(
            f"catalog {path} has schema version {current} and this clipdex needs {known_versions}, but the library "
            "cannot be written here: open it once with this clipdex where it can be written"
        )


def _read_only_connection(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def configure(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only = 1")  # belt and braces: this connection never writes
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.close()

    return configure


def _why_unwritable(path: Path, problem: Exception | None = None) -> str:
    """In words: a read-only file system, a full disk (ENOSPC), missing permission, or SQLite's reason."""
    probe = path if path.exists() and not os.access(path, os.W_OK) else path.parent
    try:
        status = os.statvfs(probe)
        if status.f_flag & os.ST_RDONLY:
            return "a read-only file system"
        if status.f_bavail * status.f_frsize < LOW_SPACE_BYTES:
            return f"no space left on device (ENOSPC) on {probe}: free some space"
    except (OSError, AttributeError):
        pass
    if problem is not None:
        return f"SQLite: {getattr(problem, 'orig', problem)}"
    return f"no write permission on {probe}"


def environment_error(error: BaseException) -> bool:
    """True when `error` (or what caused it) says the environment cannot take a write - a full
    disk, a read-only file system, no permission - rather than that the data or model is at fault.
    Libraries that wrap an OSError in their own exception (onnxruntime, torch) keep its words."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in UNWRITABLE:
            return True
        if environment_reason(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def environment_reason(text: str) -> bool:
    """True when a message carries the words of an environment error (ENOSPC, EROFS, ...)."""
    return any(os.strerror(number) in text for number in UNWRITABLE)
