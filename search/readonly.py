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
from urllib.parse import quote

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
