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
from typing import Any, Callable
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from clipdex.search.errors import CorruptLibrary

logger = logging.getLogger(__name__)

# OSError numbers that mean "the environment cannot take a write here", not "the data is bad".
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def sqlite_uri(path: Path, read_only: bool = True, immutable: bool = False) -> str:
    """An SQLite URI for `path`: mode=ro (and immutable=1) when asked."""
    options = "mode=ro" if read_only else "mode=rwc"
    if immutable:
        options += "&immutable=1"
    return f"file:{quote(str(path.absolute()))}?{options}"


def can_write(path: Path) -> bool:
    """True when the catalog file and its folder take writes (SQLite needs both: journal files live beside it)."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def open_catalog_engine(path: Path, busy_timeout_ms: int, configure: Callable[[Any, Any], None]) -> tuple[Engine, bool]:
    """An engine for the catalog at `path`, and whether it is read-only.

    Where the file and its folder take writes, the ordinary read-write engine (`configure`
    sets WAL and durability on each connection). Elsewhere a `mode=ro` engine that never
    writes (`PRAGMA query_only`), `immutable=1` when SQLite cannot read the WAL file's
    index without creating it; the library says so once, in the log.
    """
    if can_write(path):
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": busy_timeout_ms / 1000})
        event.listen(engine, "connect", configure)
        return engine, False
    last_error: Exception | None = None
    for immutable in (False, True):
        if immutable and Path(f"{path}-wal").exists():
            break  # a WAL file may hold commits that immutable=1 would not see
        engine = create_engine(f"sqlite:///{sqlite_uri(path, immutable=immutable)}&uri=true",
                               connect_args={"timeout": busy_timeout_ms / 1000})
        event.listen(engine, "connect", _read_only_connection(busy_timeout_ms))
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
        except OperationalError as error:
            engine.dispose()
            last_error = error
            continue
        logger.warning(
            "library %s cannot be written here (%s): opened read-only - searches work, nothing is saved%s",
            path.parent, _why_unwritable(path), " (immutable: a writer elsewhere would not be seen)" if immutable else "",
        )
        return engine, True
    raise CorruptLibrary(f"cannot open catalog {path} read-only: {getattr(last_error, 'orig', last_error)}")


def check_schema(engine: Engine, known_versions: int, path: Path) -> None:
    """What `migrate` checks, for a catalog that cannot be migrated because it cannot be written."""
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


def _why_unwritable(path: Path) -> str:
    probe = path if path.exists() and not os.access(path, os.W_OK) else path.parent
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return "a read-only file system"
    except (OSError, AttributeError):
        pass
    return f"no write permission on {probe}"
