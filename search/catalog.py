"""The catalog: SQLite (WAL) through SQLAlchemy 2.0, the library's source of truth.

Every item, its metadata and its vector live here. Each committed change bumps the
`generation` and logs the touched item ids in `changes`, so a derived FAISS index can
catch up from the generation it was saved at.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from clipdex.search.errors import CorruptLibrary
from clipdex.search.readonly import check_schema, open_catalog_engine
from clipdex.search.vector_rows import stack_rows

BUSY_TIMEOUT_MS = 60_000
KINDS = ("image", "text")


class Base(DeclarativeBase):
    pass


class Item(Base):
    """One indexed image or text, with its vector."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String)  # "image" | "text"
    # images
    path: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(Integer)
    mtime_ns: Mapped[int | None] = mapped_column(Integer)
    content_hash: Mapped[str | None] = mapped_column(String)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    taken_at: Mapped[str | None] = mapped_column(String)  # ISO 8601, sorts as it compares
    camera_make: Mapped[str | None] = mapped_column(String)
    camera_model: Mapped[str | None] = mapped_column(String)
    # the file's identity when it was read (st_dev, st_ino): the server serves only that file
    device: Mapped[int | None] = mapped_column(Integer)
    inode: Mapped[int | None] = mapped_column(Integer)
    # texts
    text: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)  # corpus file
    source_key: Mapped[str | None] = mapped_column(String)  # id column value or line number
    extra: Mapped[str | None] = mapped_column(Text)  # JSON: other columns, truncation notes
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    indexed_at: Mapped[float] = mapped_column(Float)

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


class Change(Base):
    __tablename__ = "changes"
    rowid: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    item_id: Mapped[int] = mapped_column(Integer)


class State(Base):
    __tablename__ = "state"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class QueryCache(Base):
    __tablename__ = "query_cache"
    query: Mapped[str] = mapped_column(Text, primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    used_at: Mapped[float] = mapped_column(Float)


# -- migrations: numbered, never edited once released -------------------------------


def _migration_001_initial(connection: Any) -> None:
    for statement in (
        """CREATE TABLE items (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
            path TEXT, size INTEGER, mtime_ns INTEGER, content_hash TEXT,
            width INTEGER, height INTEGER, taken_at TEXT, camera_make TEXT, camera_model TEXT,
            text TEXT, source TEXT, source_key TEXT, extra TEXT,
            vector BLOB NOT NULL, indexed_at REAL NOT NULL)""",
        "CREATE UNIQUE INDEX items_path ON items(path) WHERE path IS NOT NULL",
        "CREATE UNIQUE INDEX items_source_key ON items(source, source_key) WHERE source IS NOT NULL",
        "CREATE INDEX items_content_hash ON items(content_hash)",
        "CREATE INDEX items_kind ON items(kind)",
        "CREATE INDEX items_taken_at ON items(taken_at)",
        "CREATE TABLE changes (rowid INTEGER PRIMARY KEY, generation INTEGER NOT NULL, item_id INTEGER NOT NULL)",
        "CREATE INDEX changes_generation ON changes(generation)",
        "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO state (key, value) VALUES ('generation', '0'), ('changes_floor', '0')",
        "CREATE TABLE query_cache (query TEXT PRIMARY KEY, vector BLOB NOT NULL, used_at REAL NOT NULL)",
    ):
        connection.exec_driver_sql(statement)


def _migration_002_file_identity(connection: Any) -> None:
    """The device and inode of each image file as it was read (NULL for rows indexed before)."""
    connection.exec_driver_sql("ALTER TABLE items ADD COLUMN device INTEGER")
    connection.exec_driver_sql("ALTER TABLE items ADD COLUMN inode INTEGER")


MIGRATIONS = [_migration_001_initial, _migration_002_file_identity]


def migrate(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = connection.exec_driver_sql("SELECT max(version) FROM schema_version").scalar() or 0
        if current > len(MIGRATIONS):
            raise CorruptLibrary(
                f"catalog schema version {current} is newer than this clipdex understands "
                f"({len(MIGRATIONS)}); upgrade clipdex"
            )
        for number, migration in enumerate(MIGRATIONS[current:], start=current + 1):
            migration(connection)
            connection.exec_driver_sql("INSERT INTO schema_version (version) VALUES (?)", (number,))


# -- the catalog ----------------------------------------------------------------------


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
        }


@dataclass(frozen=True)
class FileRecord:
    """What the indexer needs to know of an indexed file to decide whether it changed."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None


@dataclass(frozen=True)
class BatchResult:
    generation: int
    ids: list[int]  # ids of the added or replaced items, in input order


class Catalog:
    def __init__(self, path: Path, vector_dim: int | None = None) -> None:
        self.path = path
        self.vector_dim = vector_dim  # the library's dimension: a stored vector of another length is damaged
        # read_only: the file or its folder cannot be written here; opened mode=ro, never written
        self.engine, self.read_only_reason = open_catalog_engine(path, BUSY_TIMEOUT_MS, _configure_connection)
        self.read_only = self.read_only_reason is not None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            if self.read_only:
                check_schema(self.engine, len(MIGRATIONS), path)
            else:
                migrate(self.engine)
        except OperationalError as error:
            raise CorruptLibrary(f"cannot open catalog {path}: {error.orig}") from error

    def close(self) -> None:
        self.engine.dispose()

    # -- state --------------------------------------------------------------------

    def _state(self, session: Session, key: str) -> int:
        row = session.get(State, key)
        if row is None:
            raise CorruptLibrary(f"{self.path}: its state table has no {key!r} row; run `clipdex check --repair` to re-create it")
        return int(row.value)

    def generation(self) -> int:
        with self.sessions() as session:
            return self._state(session, "generation")

    def changes_floor(self) -> int:
        """Changes of generations at or below this were trimmed from the log."""
        with self.sessions() as session:
            return self._state(session, "changes_floor")

    # -- writing --------------------------------------------------------------------

    def commit_batch(
        self,
        items: Sequence[NewItem] = (),
        remove_ids: Iterable[int] = (),
        moves: Sequence[tuple[int, dict[str, Any]]] = (),
    ) -> BatchResult:
        """Insert or replace `items`, delete `remove_ids` and re-describe moved items, atomically.

        A moved item keeps its id and vector; only its file columns change, so the
        vector index need not hear of it.
        """
        remove_ids = list(remove_ids)
        with self.sessions.begin() as session:
            generation = self._state(session, "generation") + 1
            touched: list[int] = []
            if remove_ids:
                for chunk in _chunks(remove_ids, 500):
                    session.execute(delete(Item).where(Item.id.in_(chunk)))
                touched.extend(remove_ids)
            for item_id, columns in moves:
                session.execute(update(Item).where(Item.id == item_id).values(**columns))
            ids: list[int] = []
            for item in items:
                values = item.columns()
                if item.id is not None:
                    session.execute(update(Item).where(Item.id == item.id).values(**values))
                    ids.append(item.id)
                else:
                    row = Item(**values)
                    session.add(row)
                    session.flush()
                    ids.append(row.id)
            touched.extend(ids)
            if touched:
                session.add_all(Change(generation=generation, item_id=item_id) for item_id in touched)
            session.execute(update(State).where(State.key == "generation").values(value=str(generation)))
        return BatchResult(generation=generation, ids=ids)

    def trim_changes(self, up_to_generation: int) -> None:
        """Forget the change log up to a generation that a saved vector index reflects."""
        with self.sessions.begin() as session:
            session.execute(delete(Change).where(Change.generation <= up_to_generation))
            floor = max(self._state(session, "changes_floor"), up_to_generation)
            session.execute(update(State).where(State.key == "changes_floor").values(value=str(floor)))

    # -- reading --------------------------------------------------------------------

    def changed_since(self, generation: int) -> list[int]:
        with self.sessions() as session:
            rows = session.execute(select(Change.item_id).where(Change.generation > generation).distinct())
            return [row[0] for row in rows]

    def files_under(self, roots: Sequence[str]) -> dict[str, FileRecord]:
        """Indexed image files inside any of `roots` (absolute, normalized paths)."""
        records: dict[str, FileRecord] = {}
        columns = (Item.id, Item.path, Item.size, Item.mtime_ns, Item.content_hash)
        with self.sessions() as session:
            for root in roots:
                prefix = root.rstrip("/\\") + _separator(root)
                query = select(*columns).where(Item.path >= prefix, Item.path < prefix[:-1] + chr(ord(prefix[-1]) + 1))
                for row in session.execute(query):
                    records[row.path] = FileRecord(row.id, row.path, row.size or 0, row.mtime_ns or 0, row.content_hash)
        return records

    def files_at(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """Indexed image files at exactly these paths."""
        records: dict[str, FileRecord] = {}
        columns = (Item.id, Item.path, Item.size, Item.mtime_ns, Item.content_hash)
        with self.sessions() as session:
            for chunk in _chunks(list(paths), 500):
                for row in session.execute(select(*columns).where(Item.path.in_(chunk))):
                    records[row.path] = FileRecord(row.id, row.path, row.size or 0, row.mtime_ns or 0, row.content_hash)
        return records

    def texts_from(self, source: str) -> dict[str, tuple[int, str, str | None]]:
        """Indexed texts of one corpus file: source_key -> (id, text, extra JSON)."""
        query = select(Item.id, Item.source_key, Item.text, Item.extra).where(Item.source == source)
        with self.sessions() as session:
            return {row.source_key: (row.id, row.text, row.extra) for row in session.execute(query)}

    def id_with_hash(self, content_hash: str) -> int | None:
        """The id of an item holding these bytes (the oldest such item), or None."""
        query = select(Item.id).where(Item.content_hash == content_hash).order_by(Item.id).limit(1)
        with self.engine.connect() as connection:
            return connection.execute(query).scalar()

    def get_items(self, ids: Iterable[int]) -> dict[int, Item]:
        found: dict[int, Item] = {}
        with self.sessions() as session:
            for chunk in _chunks([int(i) for i in ids], 500):
                for item in session.scalars(select(Item).where(Item.id.in_(chunk))):
                    found[item.id] = item
        return found

    def get_item(self, item_id: int) -> Item | None:
        with self.sessions() as session:
            return session.get(Item, item_id)

    def iter_vectors(self, ids: Sequence[int] | None = None, chunk_size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) chunks of the stored vectors, in id order."""
        with self.sessions() as session:
            if ids is not None:
                for chunk in _chunks(sorted(ids), 500):
                    rows = session.execute(select(Item.id, Item.vector).where(Item.id.in_(chunk)).order_by(Item.id)).all()
                    if rows:
                        yield _stack(rows, self)
                return
            last = 0
            while True:
                query = select(Item.id, Item.vector).where(Item.id > last).order_by(Item.id).limit(chunk_size)
                rows = session.execute(query).all()
                if not rows:
                    return
                yield _stack(rows, self)
                last = rows[-1][0]

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors())
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(Item.kind, func.count()).group_by(Item.kind)).all()
        counts = {kind: 0 for kind in KINDS}
        counts.update({kind: number for kind, number in rows})
        return counts

    def ids(self, where: Any = None) -> np.ndarray:
        query = select(Item.id)
        if where is not None:
            query = query.where(where)
        with self.sessions() as session:
            return np.fromiter(session.scalars(query), dtype=np.int64)

    # -- the text query cache ------------------------------------------------------------

    def cached_query(self, query: str) -> np.ndarray | None:
        with self.sessions() as session:
            row = session.get(QueryCache, query)
            if row is None or len(row.vector) % 4:  # none, or damaged: encode the text again
                return None
            return np.frombuffer(row.vector, dtype=np.float32).copy()

    def cache_query(self, query: str, vector: np.ndarray) -> None:
        """Best effort: a cache write never waits long for a busy writer, and a read-only catalog has none."""
        if self.read_only:
            return
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA busy_timeout = 2000")
                connection.execute(
                    text("INSERT OR REPLACE INTO query_cache (query, vector, used_at) VALUES (:q, :v, :t)"),
                    {"q": query, "v": np.asarray(vector, dtype=np.float32).tobytes(), "t": time.time()},
                )
                connection.commit()
                connection.exec_driver_sql(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except OperationalError:
            pass


def _configure_connection(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, like the fsynced index
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _stack(rows: Sequence[Any], catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    return stack_rows(rows, catalog.path, catalog.vector_dim)


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _separator(root: str) -> str:
    return "\\" if "\\" in root and "/" not in root else "/"
