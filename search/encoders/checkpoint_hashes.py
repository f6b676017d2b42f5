"""A checkpoint file's sha256, remembered on this machine, so that each new library of a model
does not hash its weights again (half a second for ViT-B-32's 600 MB, before the first photo).

The hashes live in `CACHE/checkpoints.json` (CACHE as for the export cache:
`paths.user_cache_dir`), each under the file's real path with its size, mtime, ctime, inode
and device: more than a library's manifest asks before it takes a checkpoint's recorded hash
(size and mtime: `ResolvedModel.file_unchanged`); ctime changes with every write and cannot be
set back. At most MAX_REMEMBERED files, the latest kept. The file is replaced atomically; of
two processes remembering at once one may lose its line (that file is hashed again next
time). A cache that cannot be read or written is left alone: the file is hashed as before.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from clipdex.search.atomic import write_json_atomic
from clipdex.search.paths import user_cache_dir

logger = logging.getLogger(__name__)

HASHES_FILE = "checkpoints.json"
MAX_REMEMBERED = 64


def _identity(info: os.stat_result) -> list[int]:
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


def _read() -> dict[str, dict[str, object]]:
    try:
        data = json.loads((user_cache_dir() / HASHES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remembered_sha256(path: Path, info: os.stat_result) -> str | None:
    """The sha256 remembered for the checkpoint at `path` (real path; `info` its stat now), or None."""
    entry = _read().get(str(path))
    if isinstance(entry, dict) and entry.get("file") == _identity(info) and isinstance(entry.get("sha256"), str):
        return str(entry["sha256"])
    return None


def remember_sha256(path: Path, info: os.stat_result, sha256: str) -> None:
    """Remember `sha256` for the checkpoint at `path` as `info` (taken before it was hashed) describes it."""
    try:
        if _identity(path.stat()) != _identity(info):
            return  # changed while it was hashed
        hashes = _read()
        hashes.pop(str(path), None)
        hashes[str(path)] = {"file": _identity(info), "sha256": sha256}
        write_json_atomic(user_cache_dir() / HASHES_FILE, dict(list(hashes.items())[-MAX_REMEMBERED:]))
    except OSError as error:
        logger.info("the sha256 of %s was not remembered (%s)", path, error)
