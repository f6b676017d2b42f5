"""What the catalog's two ways in share, without importing a database library: the rows
going in and coming out, the schema version, the limits, and the reading of database errors.

`clipdex.search.catalog.database` is the catalog on SQLAlchemy (any backend, and everything a library
can do); `clipdex.search.catalog.local` reads and writes a library's own SQLite file for the
everyday commands on the standard library's sqlite3, which imports in a few milliseconds
where SQLAlchemy takes a quarter of a second.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from clipdex.search.errors import CatalogUnavailable, ClipdexError, LibraryBusy

SCHEMA_VERSION = 5  # the catalog's migrations (`clipdex.search.catalog.database.MIGRATIONS`)
BUSY_TIMEOUT_MS = 60_000
KINDS = ("image", "text")
VIDEO_KINDS = ("video", "frame")  # a video's item, and one item per sampled moment of it (`NewItem.frames`)
QUERY_CACHE_SIZE = 10_000  # text queries kept, least recently used evicted
QUERY_CACHE_TOUCH_SECONDS = 3600.0  # a cache hit refreshes its use time at most this often
# The item columns a caller may set (`NewItem.columns`, and a move's file columns).
ITEM_COLUMNS = ("kind", "path", "size", "mtime_ns", "content_hash", "width", "height", "taken_at", "camera_make",
                "camera_model", "device", "inode", "text", "source", "source_key", "extra", "vector", "indexed_at", "key",
                "parent_id", "frame_time")


@dataclass
class NewItem:
    """An item to insert or, with `id` set, to replace."""

    kind: str
    vector: np.ndarray
    id: int | None = None
    path: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    taken_at: datetime | str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    device: int | None = None
    inode: int | None = None
    text: str | None = None
    source: str | None = None
    source_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    key: str | None = None  # an application's own key (`Library.add_texts` ...); None for files and corpora
    # a video's sampled moments, (seconds, vector) each: committed as items of kind "frame" pointing at
    # this one, replacing the frames it had (None: an item that is no video, or whose frames are kept)
    frames: list[tuple[float, np.ndarray]] | None = None

    def columns(self) -> dict[str, Any]:
        taken = self.taken_at.isoformat() if isinstance(self.taken_at, datetime) else self.taken_at
        return {
            "kind": self.kind,
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "content_hash": self.content_hash,
            "width": self.width,
            "height": self.height,
            "taken_at": taken,
            "camera_make": self.camera_make,
            "camera_model": self.camera_model,
            "device": self.device,
            "inode": self.inode,
            "text": self.text,
            "source": self.source,
            "source_key": self.source_key,
            "extra": json.dumps(self.extra, default=str) if self.extra else None,
            "vector": np.ascontiguousarray(self.vector, dtype=np.float32).tobytes(),
            "indexed_at": time.time(),
            "key": self.key,
        }

    def frame_columns(self, parent_id: int) -> list[dict[str, Any]]:
        """The rows of this video's frames (`frames`), each an item of kind "frame" of the video `parent_id`."""
        now = time.time()
        empty = dict.fromkeys(ITEM_COLUMNS)
        return [{**empty, "kind": "frame", "parent_id": parent_id, "frame_time": float(seconds), "indexed_at": now,
                 "vector": np.ascontiguousarray(vector, dtype=np.float32).tobytes()} for seconds, vector in self.frames or ()]


@dataclass(frozen=True)
class FileRecord:
    """What the indexer needs to know of an indexed file to decide whether it changed."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    pair: str | None = None  # the RAW file shown by this JPEG or HEIC (one photo, two files), as last indexed

    @classmethod
    def of_row(cls, item_id: int, path: str | None, size: int | None, mtime_ns: int | None, content_hash: str | None,
               extra: str | None) -> "FileRecord":
        """The record of a catalog row (`extra`: its JSON, which names a RAW pair's other file)."""
        pair = None
        if extra and '"pair"' in extra:
            try:
                value = json.loads(extra).get("pair")
            except (ValueError, AttributeError):
                value = None
            pair = value if isinstance(value, str) else None
        return cls(item_id, str(path), size or 0, mtime_ns or 0, content_hash, pair)


@dataclass(frozen=True)
class BatchResult:
    generation: int
    ids: list[int]  # ids of the added or replaced items, in input order
    frames_changed: bool = False  # video moments (items of their own) came or went: the change log says which


@dataclass
class ItemRow:
    """One indexed image or text as read from the catalog, with its vector."""

    id: int
    kind: str  # "image" | "text"
    path: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    content_hash: str | None = None
    width: int | None = None
    height: int | None = None
    taken_at: str | None = None  # ISO 8601, sorts as it compares
    camera_make: str | None = None
    camera_model: str | None = None
    device: int | None = None  # the file's st_dev and st_ino when it was read
    inode: int | None = None
    text: str | None = None
    source: str | None = None  # corpus file
    source_key: str | None = None  # id column value or line number
    extra: str | None = None  # JSON: other columns, truncation notes
    vector: bytes = b""
    indexed_at: float = 0.0
    key: str | None = None  # an application's own key, unique in the library (None: a file or a corpus text)
    parent_id: int | None = None  # a frame's video
    frame_time: float | None = None  # a frame's time in its video, seconds

    FIELDS = ("id", *ITEM_COLUMNS)

    def metadata_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key in ("width", "height", "size", "taken_at", "camera_make", "camera_model", "source", "source_key"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.extra:
            data.update(json.loads(self.extra))
        return data

    def vector_array(self) -> np.ndarray:
        return np.frombuffer(self.vector, dtype=np.float32)


def database_error(message: str, catalog: str) -> ClipdexError | None:
    """The project's own exception for a database error's message (one line), or None when it is
    none of those: a busy writer, a full disk, a damaged or unreachable catalog."""
    lowered = message.lower()
    if "database is locked" in lowered or "lock timeout" in lowered:
        return LibraryBusy(f"catalog {catalog} is busy (locked by a writer): {message}")
    if "disk is full" in lowered or "no space left" in lowered:
        return CatalogUnavailable(
            f"catalog {catalog}: no space left on device (ENOSPC) ({message}): free some space and run "
            "the same command again; everything committed so far is kept"
        )
    if any(sign in lowered for sign in ("unable to open", "not a database", "malformed", "disk i/o", "readonly",
                                        "read-only", "connection", "could not connect", "no such table")):
        return CatalogUnavailable(f"catalog {catalog}: {message}")
    return None


def database_errors() -> tuple[type[BaseException], ...]:
    """The database libraries' own exception types that may reach a caller unmapped: sqlite3's,
    and SQLAlchemy's once something imported it (before that, none of its errors can exist)."""
    import sqlite3

    loaded = sys.modules.get("sqlalchemy.exc")
    return (sqlite3.Error,) + ((loaded.SQLAlchemyError,) if loaded is not None else ())


def chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """`values` in pieces of `size` (ids or paths per IN (...) list)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def folder_prefix(root: str) -> str:
    """`root` with one trailing separator (a backslash for a Windows path): the paths inside it start with this."""
    return root.rstrip("/\\") + ("\\" if "\\" in root and "/" not in root else "/")
