"""The catalog, the library's source of truth: items, their metadata and vectors.

Every SQL statement of clipdex lives here. The catalog is opened from a SQLAlchemy URL
(default: the library's SQLite file, in WAL mode); the schema is made by numbered
migrations in SQLAlchemy Core, so the same statements serve any backend SQLAlchemy
speaks; upserts go through the dialect's `on_conflict_do_update`; path globs are
translated here. Each committed change bumps the `generation` (in the same transaction,
by an UPDATE that serializes concurrent writers) and logs the touched item ids in
`changes`, so a derived FAISS index can catch up from the generation it was saved at.
Database errors leave this module as the project's own exceptions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from clipdex.search.catalog import keyword_sql
from clipdex.search.catalog.keywords import KeywordQuery, document
from clipdex.search.catalog.keyword_sql import OcrResult
from clipdex.search.catalog.types import (
    BUSY_TIMEOUT_MS,
    KINDS,
    QUERY_CACHE_SIZE,
    VIDEO_KINDS,
    QUERY_CACHE_TOUCH_SECONDS,
    SCHEMA_VERSION,
    BatchResult,
    FileRecord,
    ItemRow,
    NewItem,
    chunks,
    database_error,
    folder_prefix,
)
from clipdex.search.errors import CatalogUnavailable, CorruptLibrary, LibraryBusy
from clipdex.search.query import Filters
from clipdex.search.readonly import check_schema, open_catalog_engine
from clipdex.search.catalog.vector_rows import concatenated, stack_rows, stored_bytes

if TYPE_CHECKING:
    from clipdex.search.locks import WriteLock

log = logging.getLogger(__name__)


class AlchemyStatements:
    """`keyword_sql.Statements` on a SQLAlchemy connection (in the caller's transaction)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def rows(self, sql: str, parameters: dict[str, Any]) -> list[Any]:
        result = self.connection.execute(text(sql), parameters)
        return list(result.fetchall()) if result.returns_rows else []

    def many(self, sql: str, parameters: list[dict[str, Any]]) -> None:
        self.connection.execute(text(sql), parameters)


class Base(DeclarativeBase):
    pass


class Item(Base):
    """One indexed image or text, with its vector (read as `ItemRow`)."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String)  # "image" | "text"
    # images
    path: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    taken_at: Mapped[str | None] = mapped_column(String)  # ISO 8601, sorts as it compares
    camera_make: Mapped[str | None] = mapped_column(String)
    camera_model: Mapped[str | None] = mapped_column(String)
    # the file's identity when it was read (st_dev, st_ino): the server serves only that file
    device: Mapped[int | None] = mapped_column(BigInteger)
    inode: Mapped[int | None] = mapped_column(BigInteger)
    # texts
    text: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)  # corpus file
    source_key: Mapped[str | None] = mapped_column(String)  # id column value or line number
    extra: Mapped[str | None] = mapped_column(Text)  # JSON: other columns, truncation notes
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    indexed_at: Mapped[float] = mapped_column(Float)
    # an application's own key for an item it added (`Library.add_texts` ...), unique; None for files and corpora
    key: Mapped[str | None] = mapped_column(Text)
    # a video's sampled moment (kind "frame"): its video's id and its time in seconds
    parent_id: Mapped[int | None] = mapped_column(BigInteger)
    frame_time: Mapped[float | None] = mapped_column(Float)


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


# -- migrations: numbered, never edited once released ------------------------------
# Each migration describes its own tables (SQLAlchemy Core), so that later changes to the
# ORM classes above never change what an old migration does.

_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite: INTEGER PRIMARY KEY is the rowid


def _migration_001_initial(connection: Connection) -> None:
    metadata = MetaData()
    items = Table(
        "items", metadata,
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("kind", Text, CheckConstraint("kind IN ('image', 'text')"), nullable=False),
        Column("path", Text), Column("size", BigInteger), Column("mtime_ns", BigInteger),
        Column("content_hash", Text), Column("width", Integer), Column("height", Integer),
        Column("taken_at", Text), Column("camera_make", Text), Column("camera_model", Text),
        Column("text", Text), Column("source", Text), Column("source_key", Text), Column("extra", Text),
        Column("vector", LargeBinary, nullable=False), Column("indexed_at", Float, nullable=False),
        sqlite_autoincrement=True,  # ids are never reused: they are the vector index's ids
    )
    Index("items_path", items.c.path, unique=True,
          sqlite_where=items.c.path.isnot(None), postgresql_where=items.c.path.isnot(None))
    Index("items_source_key", items.c.source, items.c.source_key, unique=True,
          sqlite_where=items.c.source.isnot(None), postgresql_where=items.c.source.isnot(None))
    Index("items_content_hash", items.c.content_hash)
    Index("items_kind", items.c.kind)
    Index("items_taken_at", items.c.taken_at)
    changes = Table(
        "changes", metadata,
        Column("rowid", _ID, primary_key=True, autoincrement=True),
        Column("generation", BigInteger, nullable=False), Column("item_id", BigInteger, nullable=False),
    )
    Index("changes_generation", changes.c.generation)
    state = Table("state", metadata, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))
    Table(
        "query_cache", metadata,
        Column("query", Text, primary_key=True), Column("vector", LargeBinary, nullable=False),
        Column("used_at", Float, nullable=False),
    )
    metadata.create_all(connection)
    connection.execute(insert(state), [{"key": "generation", "value": "0"}, {"key": "changes_floor", "value": "0"}])


def _migration_002_file_identity(connection: Connection) -> None:
    """The device and inode of each image file as it was read (NULL for rows indexed before)."""
    connection.execute(text("ALTER TABLE items ADD COLUMN device BIGINT"))
    connection.execute(text("ALTER TABLE items ADD COLUMN inode BIGINT"))


def _migration_003_item_keys(connection: Connection) -> None:
    """Items an application adds under its own keys (`Library.add_texts`, `add_images`, `add_vectors`):
    the key, unique among the items that have one (NULL for files and corpus texts)."""
    connection.execute(text("ALTER TABLE items ADD COLUMN key TEXT"))
    connection.execute(text("CREATE UNIQUE INDEX items_key ON items (key) WHERE key IS NOT NULL"))


def _migration_004_video_frames(connection: Connection) -> None:
    """Videos: an item of kind 'video' (its file, and the mean of its frames' vectors) and one item of
    kind 'frame' per sampled moment (its own id, so its own vector in the index), which points at its
    video (`parent_id`) and says when (`frame_time`, seconds). The kind's CHECK is widened: SQLite
    cannot alter a constraint, so the table is rebuilt from its own SQL, columns, indexes and
    triggers (whatever earlier migrations made), the AUTOINCREMENT counter kept."""
    kinds = "kind IN ('image', 'text', 'video', 'frame')"
    if connection.dialect.name == "sqlite":
        sql = connection.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'items'")).scalar()
        widened = re.sub(r"kind IN \('image', 'text'\)", kinds, str(sql), count=1)
        dependents = [row[0] for row in connection.execute(text(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'items' AND type IN ('index', 'trigger') AND sql IS NOT NULL"))]
        counter = connection.execute(text("SELECT seq FROM sqlite_sequence WHERE name = 'items'")).scalar()
        connection.execute(text(re.sub(r"^CREATE TABLE (\"?)items\1", "CREATE TABLE items_widened", widened, count=1)))
        connection.execute(text("INSERT INTO items_widened SELECT * FROM items"))
        connection.execute(text("DROP TABLE items"))
        connection.execute(text("ALTER TABLE items_widened RENAME TO items"))
        for statement in dependents:
            connection.execute(text(statement))
        if counter is not None:
            connection.execute(text("DELETE FROM sqlite_sequence WHERE name = 'items'"))
            connection.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES ('items', :seq)"), {"seq": counter})
    else:
        names = connection.execute(text(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'items'::regclass AND contype = 'c' "
            "AND pg_get_constraintdef(oid) LIKE '%kind%'")).scalars().all()
        for name in names:
            connection.execute(text(f'ALTER TABLE items DROP CONSTRAINT "{name}"'))
        connection.execute(text(f"ALTER TABLE items ADD CONSTRAINT items_kind_check CHECK ({kinds})"))
    connection.execute(text("ALTER TABLE items ADD COLUMN parent_id BIGINT"))
    connection.execute(text("ALTER TABLE items ADD COLUMN frame_time FLOAT"))
    connection.execute(text("CREATE INDEX items_parent ON items (parent_id) WHERE parent_id IS NOT NULL"))


def _migration_005_keywords(connection: Connection) -> None:
    """The keyword index (`keywords`) and the text OCR read (`ocr`), see `keyword_sql`; the index
    is filled from the items already there (their names, folders, cameras and texts)."""
    statements = AlchemyStatements(connection)
    keyword_sql.create_tables(statements, connection.dialect.name)
    keyword_sql.rebuild(statements, connection.dialect.name)



MIGRATIONS = [_migration_001_initial, _migration_002_file_identity, _migration_003_item_keys,
              _migration_004_video_frames, _migration_005_keywords]
assert len(MIGRATIONS) == SCHEMA_VERSION, "catalog_types.SCHEMA_VERSION counts the migrations"

_versions = Table("schema_version", MetaData(), Column("version", Integer, nullable=False))


def migrate(engine: Engine) -> None:
    with engine.begin() as connection:
        _versions.create(connection, checkfirst=True)
        current = connection.execute(select(func.max(_versions.c.version))).scalar() or 0
        if current > len(MIGRATIONS):
            raise CorruptLibrary(
                f"catalog schema version {current} is newer than this clipdex understands "
                f"({len(MIGRATIONS)}); upgrade clipdex"
            )
        for number, migration in enumerate(MIGRATIONS[current:], start=current + 1):
            migration(connection)
            connection.execute(insert(_versions).values(version=number))


# -- the catalog ----------------------------------------------------------------------


@dataclass
class ImportRows:
    """Rows of one kind to import in bulk (`Catalog.import_rows`), in columns.

    Images are keyed by `keys` (their paths); texts by (`source`, `keys`), their corpus
    file and key within it. `extras` are each row's metadata as JSON text (or None)."""

    kind: str
    vectors: np.ndarray  # (n, dim) float32, normalized
    keys: list[str]
    extras: list[str | None]
    texts: list[str] | None = None
    source: str | None = None
    half: bool = False  # stored as float16 (`stored_bytes`): the import was given float16, or asked for it
    halves: np.ndarray | None = None  # `vectors` as float16 (they are these, exactly), when given so: stored as they are

    COLUMNS = ("kind", "path", "text", "source", "source_key", "extra", "vector", "indexed_at")

    def without(self, keys: set[str]) -> ImportRows:
        """These rows less those with one of `keys`."""
        chosen = [row for row, key in enumerate(self.keys) if key not in keys]
        return ImportRows(self.kind, self.vectors[chosen], [self.keys[row] for row in chosen],
                          [self.extras[row] for row in chosen],
                          None if self.texts is None else [self.texts[row] for row in chosen], self.source, self.half,
                          None if self.halves is None else self.halves[chosen])

    def rows(self, now: float) -> list[tuple[Any, ...]]:
        """The rows as tuples of `COLUMNS` (built column-wise: a million rows are a few seconds of Python)."""
        count = len(self.keys)
        blobs = stored_bytes(self.halves if self.half and self.halves is not None else self.vectors, self.half)
        nothing = repeat(None, count)
        if self.kind == "image":
            return list(zip(repeat("image", count), self.keys, nothing, repeat(None), repeat(None), self.extras, blobs, repeat(now)))
        texts = self.texts if self.texts is not None else nothing
        return list(zip(repeat("text", count), nothing, texts, repeat(self.source), self.keys, self.extras, blobs, repeat(now)))


_DOCUMENT_COLUMNS = tuple(ImportRows.COLUMNS.index(name) for name in ("kind", "path", "text", "extra"))


def _import_document(row: tuple[Any, ...]) -> list[tuple[str, str]]:
    """The keyword document (`keywords.document`) of a new row of `ImportRows.COLUMNS`: an import
    sets no camera, and no OCR has read it yet."""
    kind, path, text, extra = (row[column] for column in _DOCUMENT_COLUMNS)
    return document(kind, path, text, None, None, extra, None)


@dataclass(frozen=True)
class ImportResult:
    generation: int
    added: int
    replaced: int
    kept: int = 0  # image rows naming an item indexed from its file, which an import leaves as it is


class Catalog:
    """The catalog behind a SQLAlchemy URL (a `Path` means that SQLite file).

    `vector_dim`: the library's dimension; a stored vector of another length is damaged.
    A SQLite file that cannot be written here (a read-only mount, a full disk) is opened
    read-only (`read_only`, and why in `read_only_reason`) and never written.
    """

    def __init__(self, url: str | Path, vector_dim: int | None = None) -> None:
        self.vector_dim = vector_dim
        self.read_only_reason: str | None = None
        if isinstance(url, Path):
            self.url = f"sqlite:///{url}"
            self.engine, self.read_only_reason = open_catalog_engine(url, BUSY_TIMEOUT_MS, _configure_sqlite)
        else:
            self.url = url
            try:
                self.engine = create_engine(self.url, **_engine_options(self.url))
            except ModuleNotFoundError as error:
                raise CatalogUnavailable(
                    f"catalog {public_url(self.url)} needs the {error.name} package: pip install 'clipdex[postgres]'"
                ) from None
            except SQLAlchemyError as error:
                raise CatalogUnavailable(f"cannot use catalog URL {public_url(self.url)!r}: {error}") from None
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _configure_sqlite)
        self.read_only = self.read_only_reason is not None
        self.dialect = self.engine.dialect.name
        event.listen(self.engine, "handle_error", self._map_error)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        if self.read_only:
            check_schema(self.engine, len(MIGRATIONS), Path(self.engine.url.database or ""))
        else:
            migrate(self.engine)

    def describe(self) -> str:
        """The catalog for messages: a SQLite file's path, else the URL without its password."""
        if self.dialect == "sqlite" and self.engine.url.database:
            return self.engine.url.database.split("?")[0].removeprefix("file:")
        return public_url(self.engine.url.render_as_string(hide_password=False))

    def close(self) -> None:
        self.engine.dispose()

    def _map_error(self, context: ExceptionContext) -> None:
        """Database errors become the project's own: a busy writer, a damaged or unreachable catalog."""
        original = context.original_exception
        message = " ".join(str(original).split()) or type(original).__name__  # one line: drivers add hints below
        mapped = database_error(message, self.describe())
        if mapped is not None:
            raise mapped from original

    # -- state --------------------------------------------------------------------

    def _state(self, session: Session, key: str) -> int:
        value = session.scalar(select(State.value).where(State.key == key))
        if value is None:
            raise CorruptLibrary(f"catalog {self.describe()}: its state table has no {key!r} row; "
                                 "run `clipdex check --repair` to re-create it")
        return int(value)

    def generation(self) -> int:
        with self.sessions() as session:
            return self._state(session, "generation")

    def changes_floor(self) -> int:
        """Changes of generations at or below this were trimmed from the log."""
        with self.sessions() as session:
            return self._state(session, "changes_floor")

    @property
    def shared(self) -> bool:
        """A catalog on a server, which several library folders (replicas) may follow."""
        return self.dialect != "sqlite"

    def recorded_model(self) -> dict[str, Any] | None:
        """The model (and dimension) the catalog's vectors belong to, as recorded at creation."""
        with self.sessions() as session:
            value = session.scalar(select(State.value).where(State.key == "model"))
        return None if value is None else dict(json.loads(value))

    def record_model(self, model: dict[str, Any]) -> None:
        """Record the library's model once; an existing record is kept."""
        with self.sessions.begin() as session:
            if session.scalar(select(State.value).where(State.key == "model")) is None:
                session.execute(insert(State).values(key="model", value=json.dumps(model, sort_keys=True)))

    def writer_lock(self) -> WriteLock | None:
        """The lock that makes one writer per library across machines, when the backend needs its own."""
        if self.dialect == "postgresql":
            from clipdex.search.locks import AdvisoryWriteLock

            return AdvisoryWriteLock(self.engine, self.describe())
        return None

    def _next_generation(self, session: Session) -> int:
        """Bump the generation in this transaction; the UPDATE's row lock orders concurrent writers."""
        bumped = cast(cast(State.value, BigInteger) + 1, Text)
        session.execute(update(State).where(State.key == "generation").values(value=bumped))
        return self._state(session, "generation")

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
            generation = self._next_generation(session)
            touched: list[int] = []
            frames_removed = self._frame_ids(session, remove_ids)  # a removed video's frames go with it
            remove_ids += frames_removed
            for chunk in chunks(remove_ids):
                session.execute(delete(Item).where(Item.id.in_(chunk)))
            touched.extend(remove_ids)
            for item_id, columns in moves:
                session.execute(update(Item).where(Item.id == item_id).values(**columns))
            for item in items:
                if item.id is not None:
                    session.execute(update(Item).where(Item.id == item.id).values(**item.columns()))
            new_rows = [item.columns() for item in items if item.id is None]
            new_ids: Iterator[int] = iter(())
            if new_rows:  # one multi-row INSERT ... RETURNING (SQLAlchemy's insertmanyvalues), ids in row order
                returned = session.execute(insert(Item).returning(Item.id, sort_by_parameter_order=True), new_rows)
                new_ids = iter([int(row[0]) for row in returned])
            ids = [item.id if item.id is not None else next(new_ids) for item in items]
            touched.extend(ids)
            frames = self._replace_frames(session, items, ids)
            touched.extend(frames)
            statements = AlchemyStatements(session.connection())
            keyword_sql.forget(statements, self.dialect, remove_ids)
            keyword_sql.refresh(statements, self.dialect, [item_id for item_id, _ in moves] + [int(i) for i in ids])
            if touched:
                session.execute(insert(Change), [{"generation": generation, "item_id": item_id} for item_id in touched])
        return BatchResult(generation=generation, ids=ids, frames_changed=bool(frames_removed or frames))

    def _frame_ids(self, session: Session, video_ids: Sequence[int]) -> list[int]:
        found: list[int] = []
        for chunk in chunks(list(video_ids)):
            found += [int(row[0]) for row in session.execute(select(Item.id).where(Item.parent_id.in_(chunk)))]
        return found

    def _replace_frames(self, session: Session, items: Sequence[NewItem], ids: Sequence[int]) -> list[int]:
        """Insert the frames of the videos among `items` (with ids `ids`), removing those they had: the touched ids."""
        videos = [(item, item_id) for item, item_id in zip(items, ids) if item.frames is not None]
        if not videos:
            return []
        old = self._frame_ids(session, [item_id for _, item_id in videos])
        for chunk in chunks(old):
            session.execute(delete(Item).where(Item.id.in_(chunk)))
        rows = [row for item, item_id in videos for row in item.frame_columns(item_id)]
        new: list[int] = []
        if rows:
            returned = session.execute(insert(Item).returning(Item.id, sort_by_parameter_order=True), rows)
            new = [int(row[0]) for row in returned]
        return old + new

    def frames_of(self, video_ids: Iterable[int]) -> dict[int, list[tuple[float, np.ndarray]]]:
        """The sampled moments of these videos: (seconds, vector) each, in time order, by video id."""
        found: dict[int, list[tuple[float, np.ndarray]]] = {}
        with self.sessions() as session:
            for chunk in chunks([int(i) for i in video_ids]):
                query = (select(Item.parent_id, Item.frame_time, Item.vector).where(Item.parent_id.in_(chunk))
                         .order_by(Item.parent_id, Item.frame_time))
                for parent, seconds, vector in session.execute(query):
                    found.setdefault(int(parent or 0), []).append(
                        (float(seconds or 0.0), np.frombuffer(vector, dtype=np.float32)))
        return found

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
        columns = (Item.id, Item.path, Item.size, Item.mtime_ns, Item.content_hash, Item.extra)
        with self.sessions() as session:
            for root in roots:
                prefix = folder_prefix(root)
                query = select(*columns).where(Item.path >= prefix, Item.path < prefix[:-1] + chr(ord(prefix[-1]) + 1))
                for row in session.execute(query):
                    records[row.path] = FileRecord.of_row(*row)
        return records

    def files_at(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        """Indexed image files at exactly these paths."""
        records: dict[str, FileRecord] = {}
        columns = (Item.id, Item.path, Item.size, Item.mtime_ns, Item.content_hash, Item.extra)
        with self.sessions() as session:
            for chunk in chunks(list(paths)):
                for row in session.execute(select(*columns).where(Item.path.in_(chunk))):
                    records[row.path] = FileRecord.of_row(*row)
        return records

    def ids_at_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """Item ids by image path, for the paths that are in the catalog."""
        found: dict[str, int] = {}
        with self.sessions() as session:
            for chunk in chunks(list(paths)):
                found.update((row.path, row.id) for row in session.execute(select(Item.path, Item.id).where(Item.path.in_(chunk))))
        return found

    def images_at_paths(self, paths: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """(id, indexed from its file) by image path, for the paths that are in the catalog; an item
        indexed from its file has its size, time or hash (an imported one has none of them)."""
        from_file = Item.size.is_not(None) | Item.mtime_ns.is_not(None) | Item.content_hash.is_not(None)
        found: dict[str, tuple[int, bool]] = {}
        with self.sessions() as session:
            for chunk in chunks(list(paths)):
                for row in session.execute(select(Item.path, Item.id, from_file).where(Item.path.in_(chunk))):
                    found[str(row[0])] = (int(row[1]), bool(row[2]))
        return found

    def ids_of_keys(self, source: str, keys: Sequence[str]) -> dict[str, int]:
        """Item ids by source key, for the texts of corpus `source` that are in the catalog."""
        found: dict[str, int] = {}
        with self.sessions() as session:
            for chunk in chunks(list(keys)):
                query = select(Item.source_key, Item.id).where(and_(Item.source == source, Item.source_key.in_(chunk)))
                found.update((row.source_key, row.id) for row in session.execute(query))
        return found

    def ids_of_item_keys(self, keys: Sequence[str]) -> dict[str, int]:
        """Item ids by an application's own key (`NewItem.key`), for the keys that are in the catalog."""
        found: dict[str, int] = {}
        with self.sessions() as session:
            for chunk in chunks(list(keys)):
                found.update((row.key, row.id) for row in session.execute(select(Item.key, Item.id).where(Item.key.in_(chunk))))
        return found

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

    def get_items(self, ids: Iterable[int]) -> dict[int, ItemRow]:
        found: dict[int, ItemRow] = {}
        columns = [getattr(Item, name) for name in ItemRow.FIELDS]
        with self.sessions() as session:
            for chunk in chunks([int(i) for i in ids]):
                for row in session.execute(select(*columns).where(Item.id.in_(chunk))):
                    found[row[0]] = ItemRow(*row)
        return found

    def get_vectors(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The stored vectors (bytes) of these items, of those that are there."""
        found: dict[int, bytes] = {}
        with self.sessions() as session:
            for chunk in chunks([int(i) for i in ids]):
                found.update((int(row[0]), bytes(row[1])) for row in session.execute(select(Item.id, Item.vector).where(Item.id.in_(chunk))))
        return found

    def get_item(self, item_id: int) -> ItemRow | None:
        return self.get_items([item_id]).get(item_id)

    def iter_vectors(self, ids: Sequence[int] | None = None, chunk_size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) chunks of the stored vectors, in id order."""
        with self.sessions() as session:
            if ids is not None:
                for chunk in chunks(sorted(ids)):
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
        return concatenated(self.iter_vectors())

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = [(row[0], int(row[1])) for row in session.execute(select(Item.kind, func.count()).group_by(Item.kind))]
        counts = {kind: 0 for kind in KINDS + VIDEO_KINDS}
        counts.update({kind: number for kind, number in rows})
        return counts

    def ids(self, kind: str = "any") -> np.ndarray:
        """Every item id, or those of one kind ("image", "text"; "any" for all)."""
        query = select(Item.id)
        if kind != "any":
            query = query.where(Item.kind == kind)
        with self.sessions() as session:
            return np.fromiter(session.scalars(query), dtype=np.int64)

    def filtered_ids(self, filters: Filters) -> np.ndarray | None:
        """The ids that pass `filters`, or None when every item does (no filter narrows them)."""
        conditions: list[Any] = []
        kind_condition: Any = None
        if filters.kind != "any":
            counts = self.counts()
            kinds = VIDEO_KINDS if filters.kind == "video" else (filters.kind,)
            if sum(counts[kind] for kind in kinds) < sum(counts.values()):
                kind_condition = Item.kind.in_(kinds)
        if filters.path:
            conditions.append(or_(self._glob(Item.path, filters.path), self._glob(Item.source, filters.path)))
        if filters.after:
            conditions.append(Item.taken_at >= filters.after.isoformat())
        if filters.before:
            conditions.append(Item.taken_at < filters.before.isoformat())
        if filters.min_width is not None:
            conditions.append(Item.width >= filters.min_width)
        if filters.min_height is not None:
            conditions.append(Item.height >= filters.min_height)
        if not conditions and kind_condition is None:
            return None
        where: list[Any] = [] if kind_condition is None else [kind_condition]
        if conditions:  # a video's frames pass what their video passes
            videos = select(Item.id).where(and_(Item.kind == "video", *conditions))
            where.append(or_(and_(*conditions), Item.parent_id.in_(videos)))
        with self.sessions() as session:
            return np.fromiter(session.scalars(select(Item.id).where(and_(*where))), dtype=np.int64)

    def _glob(self, column: Any, pattern: str) -> Any:
        """`column` matches the shell glob `pattern` (`*`, `?`, `[...]`; case-sensitive), in this dialect."""
        if self.dialect == "sqlite":
            return column.op("GLOB")(pattern)
        return column.op("~")(glob_to_regex(pattern))

    # -- the keyword index and OCR text (SQL in keyword_sql, shared with LocalCatalog) ----------

    @contextmanager
    def _reading(self) -> Iterator[AlchemyStatements]:
        with self.engine.connect() as connection:
            yield AlchemyStatements(connection)

    def keyword_search(self, query: KeywordQuery, limit: int | None) -> list[tuple[int, float]]:
        """(id, score) of the items whose words match `query`, best first (`keyword_sql.search`)."""
        with self._reading() as statements:
            return keyword_sql.search(statements, self.dialect, query, limit)

    def keyword_documents(self, ids: Sequence[int]) -> dict[int, list[tuple[str, str]]]:
        """What each item is found by, in labelled parts (for snippets)."""
        with self._reading() as statements:
            return keyword_sql.documents(statements, ids)

    def has_keywords(self) -> bool:
        """Whether the keyword index holds anything (then text queries are hybrid by default)."""
        with self.engine.connect() as connection:
            return connection.execute(text("SELECT 1 FROM keywords LIMIT 1")).first() is not None

    def keyword_ids(self) -> set[int]:
        with self._reading() as statements:
            return keyword_sql.indexed_ids(statements, self.dialect)

    def rebuild_keywords(self) -> int:
        """Re-make the keyword index from the items and their OCR text; the items indexed."""
        with self.engine.begin() as connection:
            return keyword_sql.rebuild(AlchemyStatements(connection), self.dialect)

    def store_ocr(self, results: Sequence[OcrResult]) -> None:
        """Keep what OCR read in these images and re-index their words, in one transaction."""
        with self.engine.begin() as connection:
            keyword_sql.store_ocr(AlchemyStatements(connection), self.dialect, results, time.time())

    def images_to_read(self, after_id: int = 0, limit: int = 256) -> list[tuple[int, str, str | None]]:
        with self._reading() as statements:
            return keyword_sql.images_to_read(statements, after_id, limit)

    def ocr_counts(self) -> dict[str, int]:
        with self._reading() as statements:
            return keyword_sql.ocr_counts(statements)

    def ocr_lines(self, ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
        with self._reading() as statements:
            return keyword_sql.ocr_lines(statements, ids)

    def setting(self, key: str) -> str | None:
        """A library setting kept in the catalog's state table (`ocr`: "on" when indexing runs OCR)."""
        with self.sessions() as session:
            return session.scalar(select(State.value).where(State.key == f"setting.{key}"))

    def set_setting(self, key: str, value: str) -> None:
        with self.sessions.begin() as session:
            session.merge(State(key=f"setting.{key}", value=value))

    # -- integrity (clipdex check) ---------------------------------------------------------

    STATE_KEYS = ("generation", "changes_floor")

    def missing_state(self) -> list[str]:
        """The state rows that are not there (an emptied state table)."""
        with self.sessions() as session:
            present = set(session.scalars(select(State.key)))
        return [key for key in self.STATE_KEYS if key not in present]

    def restore_state(self, at_least: int) -> int:
        """Re-create the state rows past every generation the change log, the state and `at_least`
        know of, with the log's floor there too: every reader then rebuilds its index."""
        with self.sessions.begin() as session:
            logged = session.scalar(select(func.max(Change.generation))) or 0
            known = [int(value) for value in session.scalars(select(State.value).where(State.key.in_(self.STATE_KEYS)))]
            generation = max([logged, at_least, *known]) + 1
            for key in self.STATE_KEYS:
                session.merge(State(key=key, value=str(generation)))
        return generation

    def vector_lengths(self) -> dict[int, int]:
        """How many stored vectors have each byte length."""
        length = func.length(Item.vector)
        with self.sessions() as session:
            return {int(size): int(count) for size, count in session.execute(select(length, func.count()).group_by(length))}

    def items_with_vector_length_other_than(self, expected: Sequence[int]) -> list[Any]:
        """(id, kind, path, text, source) of the items whose stored vector is none of the `expected` byte lengths."""
        query = select(Item.id, Item.kind, Item.path, Item.text, Item.source).where(func.length(Item.vector).notin_(list(expected)))
        with self.sessions() as session:
            return list(session.execute(query).all())

    # -- the text query cache ------------------------------------------------------------

    def cached_query(self, query: str) -> np.ndarray | None:
        with self.sessions() as session:
            row = session.get(QueryCache, query)
            if row is None or len(row.vector) % 4:  # none, or damaged: encode the text again
                return None
            vector = np.frombuffer(row.vector, dtype=np.float32).copy()
            stale_use = row.used_at < time.time() - QUERY_CACHE_TOUCH_SECONDS
        if stale_use:  # recently used, for the eviction; not on every hit, which would write on each query
            self._best_effort(lambda connection: connection.execute(
                update(QueryCache).where(QueryCache.query == query).values(used_at=time.time())))
        return vector

    def cache_query(self, query: str, vector: np.ndarray, keep: int = QUERY_CACHE_SIZE) -> None:
        """Remember a text query's vector; the least recently used beyond `keep` are evicted.

        Best effort: a cache write never waits long for a busy writer, a failure is only logged,
        and a read-only catalog has no cache writes.
        """
        values = {"query": query, "vector": np.asarray(vector, dtype=np.float32).tobytes(), "used_at": time.time()}

        def write(connection: Connection) -> None:
            connection.execute(self._upsert(QueryCache.__table__, values, ["query"]))
            oldest_kept = (select(QueryCache.used_at).order_by(QueryCache.used_at.desc())
                           .offset(keep - 1).limit(1).scalar_subquery())
            connection.execute(delete(QueryCache).where(QueryCache.used_at < oldest_kept))

        self._best_effort(write)

    def _best_effort(self, write: Any) -> None:
        if self.read_only:
            return
        try:
            with self.engine.connect() as connection:
                if self.dialect == "sqlite":
                    connection.exec_driver_sql("PRAGMA busy_timeout = 2000")
                try:
                    write(connection)
                    connection.commit()
                finally:
                    if self.dialect == "sqlite":
                        connection.exec_driver_sql(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except (SQLAlchemyError, LibraryBusy, CatalogUnavailable) as error:
            log.info("query cache not written (%s)", error)

    def _upsert(self, table: Any, values: dict[str, Any], keys: list[str]) -> Any:
        """INSERT ... ON CONFLICT (keys) DO UPDATE, in this dialect."""
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = dialect_insert(table).values(**values)
        return statement.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in values.items() if k not in keys})

    # -- bulk work: samples for tuning, bulk imports (clipdex optimize, import-vectors) ------

    def cached_query_vectors(self, dim: int, limit: int) -> np.ndarray:
        """Up to `limit` vectors of past text queries (of `dim` dimensions), most recently used first."""
        query = select(QueryCache.vector).order_by(QueryCache.used_at.desc()).limit(limit)
        with self.sessions() as session:
            blobs = [blob for blob in session.scalars(query) if len(blob) == 4 * dim]
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim).copy()

    def import_rows(
        self,
        chunks: Iterable[ImportRows],
        log_changes: bool,
        inserted: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None] | None = None,
    ) -> ImportResult:
        """Insert or replace many items in ONE transaction and ONE generation (bulk import).

        Rows naming an image path or a text's (source, source_key) already in the catalog,
        or earlier in the import, replace that item and keep its id. With `log_changes`
        every touched id goes to the change log, for an index to catch up from; without,
        the log's floor is raised to this generation instead, so that every older index is
        rebuilt (or reloaded once the importer saves the one it builds) rather than caught
        up: for an import too large to be worth logging row by row. An exception from
        `chunks` (or `inserted`) rolls the whole import back. `inserted` hears the ids and
        vectors of each chunk's new rows (and their float16 form, when the chunk has it), so
        that an index can be built while rows go in.
        """
        added = replaced = kept = 0
        with self.sessions.begin() as session:
            generation = self._next_generation(session)
            connection = session.connection()
            for chunk in chunks:
                existing = self._ids_of_rows(connection, chunk)
                from_files = self._indexed_from_files(connection, chunk, existing)
                if from_files:  # never degrade an item indexed from its file: leave those rows out
                    chunk = chunk.without(from_files)
                    existing = {key: item_id for key, item_id in existing.items() if key not in from_files}
                    kept += len(from_files)
                rows = chunk.rows(time.time())
                new_rows = [row for row, key in zip(rows, chunk.keys) if key not in existing] if existing else rows
                updates = [{**dict(zip(ImportRows.COLUMNS, row)), "item_id": existing[key]}
                           for row, key in zip(rows, chunk.keys) if key in existing]
                new_ids: np.ndarray | None = None
                if new_rows:
                    new_ids = self._insert_many(connection, new_rows)
                    if inserted is not None:
                        if new_ids is None:
                            found = self._ids_of_rows(connection, chunk)
                            new_ids = np.array([found[key] for key in chunk.keys if key not in existing], dtype=np.int64)
                        fresh = np.array([key not in existing for key in chunk.keys]) if existing else slice(None)
                        inserted(new_ids, chunk.vectors[fresh], None if chunk.halves is None else chunk.halves[fresh])
                if updates:
                    connection.execute(update(Item).where(Item.id == bindparam("item_id")), updates)
                added, replaced = added + len(new_rows), replaced + len(updates)
                if not existing and new_ids is not None:  # every row new: its ids are known, its words are in `rows`
                    touched = new_ids.tolist()
                    keyword_sql.add_new(AlchemyStatements(connection), self.dialect,
                                        {item_id: _import_document(row) for item_id, row in zip(touched, rows)})
                else:
                    touched = list(self._ids_of_rows(connection, chunk).values())
                    keyword_sql.refresh(AlchemyStatements(connection), self.dialect, touched)
                if log_changes:
                    connection.execute(insert(Change), [{"generation": generation, "item_id": i} for i in touched])
            if not log_changes:  # the floor was at most the last generation: this one is above it
                session.execute(update(State).where(State.key == "changes_floor").values(value=str(generation)))
        return ImportResult(generation, added, replaced, kept)

    def _insert_many(self, connection: Connection, rows: list[tuple[Any, ...]]) -> np.ndarray | None:
        """INSERT of many rows of `ImportRows.COLUMNS`; their ids in order when known cheaply.

        SQLite: straight through the driver's executemany, which costs a fifth of
        SQLAlchemy's per-row parameter processing; the ids are the range the table's
        AUTOINCREMENT counter moved by, when it moved by exactly the number of rows (one
        writer inside one transaction: it does)."""
        names = ImportRows.COLUMNS
        if self.dialect != "sqlite":
            connection.execute(insert(Item), [dict(zip(names, row)) for row in rows])
            return None
        counter = "SELECT seq FROM sqlite_sequence WHERE name = 'items'"
        before = connection.exec_driver_sql(counter).scalar() or 0
        statement = f"INSERT INTO items ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        connection.exec_driver_sql(statement, rows)
        after = connection.exec_driver_sql(counter).scalar() or 0
        if after - before != len(rows):
            return None
        return np.arange(before + 1, after + 1, dtype=np.int64)

    def truncate_log(self) -> None:
        """Copy SQLite's write-ahead log into the catalog and empty it (after a bulk import,
        whose log would otherwise keep the size of everything imported until the last
        connection closes). Best effort: readers in progress can keep it from finishing."""
        if self.dialect == "sqlite":
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def _indexed_from_files(self, connection: Connection, chunk: ImportRows, existing: dict[str, int]) -> set[str]:
        """The keys (image paths) of `chunk` that name items indexed from their files (they have
        the file's size, time or hash; an imported item has none)."""
        if chunk.kind != "image" or not existing:
            return set()
        from_file = Item.size.is_not(None) | Item.mtime_ns.is_not(None) | Item.content_hash.is_not(None)
        ids: set[int] = set()
        for part in chunks(list(existing.values())):
            ids.update(int(row[0]) for row in connection.execute(select(Item.id).where(Item.id.in_(part), from_file)))
        return {key for key, item_id in existing.items() if item_id in ids}

    def _ids_of_rows(self, connection: Connection, chunk: ImportRows) -> dict[str, int]:
        """Ids of the items that rows of `chunk` name (by image path, or text source and key).

        SQLite: plain SQL through the driver. SQLAlchemy's `in_()` kept every list of keys it
        was given until the transaction ended: a bulk import's one transaction grew by 100 MB
        a million rows (a gigabyte at ten million)."""
        found: dict[str, int] = {}
        if self.dialect == "sqlite":
            for keys in chunks(chunk.keys):
                marks = ", ".join("?" * len(keys))
                if chunk.kind == "image":
                    rows = connection.exec_driver_sql(f"SELECT path, id FROM items WHERE path IN ({marks})", tuple(keys))
                else:
                    rows = connection.exec_driver_sql(f"SELECT source_key, id FROM items WHERE source = ? AND source_key IN ({marks})",
                                                      (chunk.source, *keys))
                found.update((str(row[0]), int(row[1])) for row in rows)
            return found
        for keys in chunks(chunk.keys):
            if chunk.kind == "image":
                query = select(Item.path, Item.id).where(Item.path.in_(keys))
            else:
                query = select(Item.source_key, Item.id).where(and_(Item.source == chunk.source, Item.source_key.in_(keys)))
            found.update((str(row[0]), int(row[1])) for row in connection.execute(query))
        return found


def glob_to_regex(pattern: str) -> str:
    """A shell glob as an anchored POSIX regular expression, matching what SQLite's GLOB does."""
    out, position = ["^"], 0
    while position < len(pattern):
        char = pattern[position]
        position += 1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            negate = pattern[position:position + 1] == "^"  # as in SQLite; "!" is an ordinary character there
            start = position + (1 if negate else 0)
            end = pattern.find("]", start + 1)  # a "]" first in the set is one of its characters
            if end == -1:
                out.append(re.escape(char))
                continue
            body = pattern[start:end].replace("\\", "\\\\")
            out.append("[" + ("^" if negate else "") + body + "]")
            position = end + 1
        else:
            out.append(re.escape(char))
    return "".join(out) + "$"


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": BUSY_TIMEOUT_MS / 1000}}
    return {"pool_pre_ping": True}


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Before the file exists (a no-op after): a row with a 512-d vector takes 2.1 KiB, and
    # 4 KiB pages fit only one such row (a catalog twice the vectors' size); 16 KiB pages fit 7.
    cursor.execute("PRAGMA page_size=16384")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, like the fsynced index
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _stack(rows: Sequence[Any], catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    return stack_rows(rows, catalog.describe(), catalog.vector_dim)


CATALOG_URL_ENV = "CLIPDEX_CATALOG_URL"


def public_url(url: str) -> str:
    """The URL as recorded and shown: never with its password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CatalogUnavailable(f"{url!r} is not a database URL (like postgresql+psycopg://user@host:5432/db)") from None
    # URL is a named tuple; URL.set(password=None) would keep the password
    return parsed._replace(password=None).render_as_string(hide_password=False)


def connect_url(recorded: str) -> str:
    """The URL to connect with: `$CLIPDEX_CATALOG_URL` when it names the same catalog (it may
    carry the password), else the recorded one (PostgreSQL then reads the password from
    `PGPASSWORD` or `~/.pgpass`)."""
    configured = os.environ.get(CATALOG_URL_ENV)
    if configured:
        try:
            if public_url(configured) == public_url(recorded):
                return configured
        except CatalogUnavailable:  # a malformed variable is the recorded URL's business, not a crash
            log.warning("$%s is not a database URL; ignored", CATALOG_URL_ENV)
    public_url(recorded)  # raises on a malformed URL
    return recorded
