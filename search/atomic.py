"""Writing a file so that readers see the old version or the new one, never half of one.

One mechanism for every file the library writes beside the catalog (the manifest, the
vector index and its stamp, exports' settings, thumbnails): write a temporary file in
the same folder, fsync it, rename it over the target, fsync the folder (so the rename
itself survives a power loss). A writer killed midway leaves a `.NAME.*.tmp` file that
`leftovers` finds.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

# The process's umask, read once (reading it means setting it): the files written here get
# the permissions a plain open() would give them, not mkstemp's private 0600, so that other
# users who may read the library (a shared or read-only copy) can read its manifest and exports.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda temporary: temporary.write_bytes(data))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda temporary: temporary.write_text(text))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Have `write` fill a temporary file, then put it in place of `path` durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def leftovers(directory: Path, name: str) -> list[Path]:
    """Temporary files of `name` that a killed writer left in `directory`."""
    return list(directory.glob(f".{name}.*.tmp"))
