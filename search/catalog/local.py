"""A library's own SQLite catalog on the standard library's sqlite3: the everyday commands' way in.

`clipdex.search.catalog.database.Catalog` speaks SQLAlchemy, so that one catalog serves SQLite and
PostgreSQL alike; importing SQLAlchemy (and its ORM) costs a quarter of a second, more than
a whole cold text query may take. A library's own SQLite file, already made and migrated
and writable here, is therefore opened as `LocalCatalog`: the statements that `search`,
`index` of a few new photos, `tag` and the server run on every call (the state, the change
log, the items, the query cache, committing a batch) are written here for SQLite directly,
with the same meaning as `Catalog`'s; anything else (integrity checks and repairs, bulk
imports, tuning samples, ...) is handed to a `Catalog` on the same file, made when first
needed. Each thread has its own sqlite3 connection. The parity of the two is tested
statement by statement (tests/test_catalog_local.py), and every library test runs on this.

A new catalog, one with an older schema (which `Catalog` migrates), one that cannot be
written here (a read-only mount, a full disk: `Catalog` opens those read-only) and every
shared catalog are opened as `Catalog`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from clipdex.search.catalog import keyword_sql
from clipdex.search.catalog.keywords import KeywordQuery
from clipdex.search.catalog.keyword_sql import OcrResult
from clipdex.search.catalog.types import (
    BUSY_TIMEOUT_MS,
    ITEM_COLUMNS,
    KINDS,
    VIDEO_KINDS,
    QUERY_CACHE_SIZE,
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
from clipdex.search.catalog.vector_rows import concatenated, stack_rows

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.locks import WriteLock

log = logging.getLogger(__name__)

CACHE_BUSY_TIMEOUT_MS = 2_000  # a query-cache write never waits long for a busy writer


class NotCurrent(Exception):
    """The file is not a catalog this class may open (no schema table, or another version)."""


def open_catalog(recorded_url: str | None, path: Path, vector_dim: int | None) -> "Catalog":
    """The catalog of a library: its own SQLite file as `LocalCatalog` where that can be, else `Catalog`
    (`recorded_url`: the manifest's shared catalog, or None for `path`)."""
    from clipdex.search.readonly import can_write

    if recorded_url is None and path.is_file() and can_write(path):
        try:
            # duck-typed: LocalCatalog answers every Catalog method, the hot ones itself
            return cast("Catalog", LocalCatalog(path, vector_dim))
        except (sqlite3.Error, NotCurrent) as error:  # Catalog migrates it, opens it read-only, or says why not
            log.debug("catalog %s opened with SQLAlchemy (%s)", path, error)
    from clipdex.search.catalog.database import Catalog, connect_url

    return Catalog(connect_url(recorded_url) if recorded_url else path, vector_dim)


class LocalCatalog:
    """A library's own, current, writable SQLite catalog (see the module's description)."""

    dialect = "sqlite"
    shared = False
    read_only = False
    read_only_reason: str | None = None

    def __init__(self, path: Path, vector_dim: int | None = None) -> None:
        self._full: Catalog | None = None
        self._full_lock = threading.Lock()
        self.path = path
        self.vector_dim = vector_dim
        self.url = f"sqlite:///{path}"
        self._local = threading.local()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._connections_lock = threading.Lock()
        try:
            version = self._connection().execute("SELECT max(version) FROM schema_version").fetchone()[0]
        except sqlite3.OperationalError as error:  # no such table: not made by Catalog yet
            self.close()
            raise NotCurrent(str(error)) from None
        if version != SCHEMA_VERSION:
            self.close()
            raise NotCurrent(f"schema version {version}, not {SCHEMA_VERSION}")

    # -- connections, errors, the rest of the catalog -------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # autocommit: a read holds no snapshot past its statement; writes BEGIN IMMEDIATE themselves
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                         check_same_thread=False)
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")  # as Catalog: a commit survives power loss
                connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except sqlite3.Error:
                connection.close()
                raise
            self._local.connection = connection
            with self._connections_lock:
                # those of ended threads (a server's thread pool ends idle ones and starts others)
                for thread in [thread for thread in self._connections if not thread.is_alive()]:
                    self._connections.pop(thread).close()
                self._connections[threading.current_thread()] = connection
        return connection

    @contextmanager
    def _mapped(self) -> Iterator[sqlite3.Connection]:
        """The thread's connection; sqlite3's errors leave as the project's own (as `Catalog._map_error`)."""
        try:
            yield self._connection()
        except sqlite3.Error as error:
            mapped = database_error(" ".join(str(error).split()) or type(error).__name__, self.describe())
            if mapped is not None:
                raise mapped from error
            raise

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking SQLite's write lock at its start (as the full catalog's writers do)."""
        with self._mapped() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk, an I/O error): then the error is
                # that, not a ROLLBACK finding no transaction; a failed COMMIT is never left open
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    @property
    def full(self) -> "Catalog":
        """The SQLAlchemy catalog on the same file, for everything this class does not do itself."""
        with self._full_lock:  # one, whichever thread asks first
            if self._full is None:
                from clipdex.search.catalog.database import Catalog

                self._full = Catalog(self.path, self.vector_dim)
            return self._full

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # its own state, looked up before it is set: never the full catalog's
            raise AttributeError(name)
        return getattr(self.full, name)

    def describe(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.close()
        self._local = threading.local()
        if self._full is not None:
            self._full.close()

    def writer_lock(self) -> "WriteLock | None":
        return None  # the library folder's file lock is the one writer's lock

    # -- state -------------------------------------------------------------------------------

    def _state(self, connection: sqlite3.Connection, key: str) -> int:
        row = connection.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise CorruptLibrary(f"catalog {self.describe()}: its state table has no {key!r} row; "
                                 "run `clipdex check --repair` to re-create it")
        return int(row[0])

    def generation(self) -> int:
        with self._mapped() as connection:
            return self._state(connection, "generation")

    def changes_floor(self) -> int:
        with self._mapped() as connection:
            return self._state(connection, "changes_floor")

    def recorded_model(self) -> dict[str, Any] | None:
        with self._mapped() as connection:
            row = connection.execute("SELECT value FROM state WHERE key = 'model'").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    # -- writing -----------------------------------------------------------------------------

    def commit_batch(
        self,
        items: Sequence[NewItem] = (),
        remove_ids: Iterable[int] = (),
        moves: Sequence[tuple[int, dict[str, Any]]] = (),
    ) -> BatchResult:
        """As `Catalog.commit_batch`: insert or replace `items`, delete `remove_ids`, re-describe moves; atomically."""
        remove_ids = [int(item_id) for item_id in remove_ids]
        with self._transaction() as connection:
            connection.execute("UPDATE state SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'generation'")
            generation = self._state(connection, "generation")
            frames_removed = _frame_ids(connection, remove_ids)  # a removed video's frames go with it
            remove_ids += frames_removed
            for chunk in chunks(remove_ids):
                connection.execute(f"DELETE FROM items WHERE id IN ({_marks(len(chunk))})", chunk)
            for item_id, columns in moves:
                _update(connection, int(item_id), columns)
            ids: list[int] = []
            for item in items:
                columns = item.columns()
                if item.id is not None:
                    _update(connection, int(item.id), columns)
                    ids.append(int(item.id))
                else:
                    names = list(columns)
                    cursor = connection.execute(
                        f"INSERT INTO items ({', '.join(names)}) VALUES ({_marks(len(names))})", [columns[n] for n in names])
                    ids.append(int(cursor.lastrowid or 0))
            frames = _replace_frames(connection, items, ids)
            touched = remove_ids + ids + frames
            statements = Sqlite3Statements(connection)
            keyword_sql.forget(statements, self.dialect, remove_ids)
            keyword_sql.refresh(statements, self.dialect, [int(item_id) for item_id, _ in moves] + ids)
            connection.executemany("INSERT INTO changes (generation, item_id) VALUES (?, ?)",
                                   [(generation, item_id) for item_id in touched])
        return BatchResult(generation=generation, ids=ids, frames_changed=bool(frames_removed or frames))

    def trim_changes(self, up_to_generation: int) -> None:
        with self._transaction() as connection:
            connection.execute("DELETE FROM changes WHERE generation <= ?", (up_to_generation,))
            floor = max(self._state(connection, "changes_floor"), up_to_generation)
            connection.execute("UPDATE state SET value = ? WHERE key = 'changes_floor'", (str(floor),))

    # -- reading -----------------------------------------------------------------------------

    def _rows(self, statement: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._mapped() as connection:
            return connection.execute(statement, parameters).fetchall()

    def _rows_in(self, statement: str, values: Sequence[Any], before: Sequence[Any] = ()) -> Iterator[Any]:
        """`statement`'s rows for each chunk of `values` (its `{}` is the chunk's placeholders)."""
        for chunk in chunks(list(values)):
            yield from self._rows(statement.format(_marks(len(chunk))), [*before, *chunk])

    def changed_since(self, generation: int) -> list[int]:
        return [row[0] for row in self._rows("SELECT DISTINCT item_id FROM changes WHERE generation > ?", (generation,))]

    def files_under(self, roots: Sequence[str]) -> dict[str, FileRecord]:
        records: dict[str, FileRecord] = {}
        for root in roots:
            prefix = folder_prefix(root)
            rows = self._rows("SELECT id, path, size, mtime_ns, content_hash, extra FROM items WHERE path >= ? AND path < ?",
                              (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)))
            for row in rows:
                records[row[1]] = FileRecord.of_row(*row)
        return records

    def files_at(self, paths: Sequence[str]) -> dict[str, FileRecord]:
        rows = self._rows_in("SELECT id, path, size, mtime_ns, content_hash, extra FROM items WHERE path IN ({})", paths)
        return {row[1]: FileRecord.of_row(*row) for row in rows}

    def ids_at_paths(self, paths: Sequence[str]) -> dict[str, int]:
        return {path: item_id for path, item_id in self._rows_in("SELECT path, id FROM items WHERE path IN ({})", paths)}

    def images_at_paths(self, paths: Sequence[str]) -> dict[str, tuple[int, bool]]:
        statement = ("SELECT path, id, (size IS NOT NULL OR mtime_ns IS NOT NULL OR content_hash IS NOT NULL) "
                     "FROM items WHERE path IN ({})")
        return {str(path): (int(item_id), bool(from_file)) for path, item_id, from_file in self._rows_in(statement, paths)}

    def ids_of_keys(self, source: str, keys: Sequence[str]) -> dict[str, int]:
        statement = "SELECT source_key, id FROM items WHERE source = ? AND source_key IN ({})"
        return {key: item_id for key, item_id in self._rows_in(statement, keys, before=(source,))}

    def ids_of_item_keys(self, keys: Sequence[str]) -> dict[str, int]:
        return {key: item_id for key, item_id in self._rows_in("SELECT key, id FROM items WHERE key IN ({})", keys)}

    def texts_from(self, source: str) -> dict[str, tuple[int, str, str | None]]:
        rows = self._rows("SELECT id, source_key, text, extra FROM items WHERE source = ?", (source,))
        return {key: (item_id, text, extra) for item_id, key, text, extra in rows}

    def id_with_hash(self, content_hash: str) -> int | None:
        rows = self._rows("SELECT id FROM items WHERE content_hash = ? ORDER BY id LIMIT 1", (content_hash,))
        return int(rows[0][0]) if rows else None

    def get_items(self, ids: Iterable[int]) -> dict[int, ItemRow]:
        statement = f"SELECT {', '.join(ItemRow.FIELDS)} FROM items WHERE id IN ({{}})"
        return {row[0]: ItemRow(*row) for row in self._rows_in(statement, [int(i) for i in ids])}

    def get_vectors(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The stored vectors (bytes) of these items, of those that are there (as `Catalog.get_vectors`)."""
        return {int(item_id): blob for item_id, blob in self._rows_in("SELECT id, vector FROM items WHERE id IN ({})",
                                                                      [int(i) for i in ids])}

    def get_item(self, item_id: int) -> ItemRow | None:
        return self.get_items([item_id]).get(item_id)

    def iter_vectors(self, ids: Sequence[int] | None = None, chunk_size: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, vectors) chunks of the stored vectors, in id order (as `Catalog.iter_vectors`)."""
        if ids is not None:
            for chunk in chunks(sorted(int(i) for i in ids)):
                rows = self._rows(f"SELECT id, vector FROM items WHERE id IN ({_marks(len(chunk))}) ORDER BY id", chunk)
                if rows:
                    yield stack_rows(rows, self.describe(), self.vector_dim)
            return
        last = 0
        while True:
            rows = self._rows("SELECT id, vector FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, chunk_size))
            if not rows:
                return
            yield stack_rows(rows, self.describe(), self.vector_dim)
            last = rows[-1][0]

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return concatenated(self.iter_vectors())

    def counts(self) -> dict[str, int]:
        counts = {kind: 0 for kind in KINDS + VIDEO_KINDS}
        counts.update({kind: int(number) for kind, number in self._rows("SELECT kind, count(*) FROM items GROUP BY kind")})
        return counts

    def ids(self, kind: str = "any") -> np.ndarray:
        rows = self._rows("SELECT id FROM items") if kind == "any" else self._rows("SELECT id FROM items WHERE kind = ?", (kind,))
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def filtered_ids(self, filters: Filters) -> np.ndarray | None:
        """As `Catalog.filtered_ids`: the ids that pass `filters`, or None when no filter narrows them."""
        conditions: list[str] = []
        parameters: list[Any] = []
        kinds: tuple[str, ...] = ()
        if filters.kind != "any":
            counts = self.counts()
            wanted = VIDEO_KINDS if filters.kind == "video" else (filters.kind,)
            if sum(counts[kind] for kind in wanted) < sum(counts.values()):
                kinds = wanted
        if filters.path:
            conditions.append("(path GLOB ? OR source GLOB ?)")
            parameters += [filters.path, filters.path]
        if filters.after:
            conditions.append("taken_at >= ?")
            parameters.append(filters.after.isoformat())
        if filters.before:
            conditions.append("taken_at < ?")
            parameters.append(filters.before.isoformat())
        if filters.min_width is not None:
            conditions.append("width >= ?")
            parameters.append(filters.min_width)
        if filters.min_height is not None:
            conditions.append("height >= ?")
            parameters.append(filters.min_height)
        if not conditions and not kinds:
            return None
        where = [f"kind IN ({_marks(len(kinds))})"] if kinds else []
        values: list[Any] = list(kinds)
        if conditions:  # a video's frames pass what their video passes
            both = " AND ".join(conditions)
            where.append(f"(({both}) OR parent_id IN (SELECT id FROM items WHERE kind = 'video' AND {both}))")
            values += parameters + parameters
        rows = self._rows(f"SELECT id FROM items WHERE {' AND '.join(where)}", values)
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def frames_of(self, video_ids: Iterable[int]) -> dict[int, list[tuple[float, np.ndarray]]]:
        """As `Catalog.frames_of`: (seconds, vector) of each video's moments, in time order."""
        found: dict[int, list[tuple[float, np.ndarray]]] = {}
        statement = "SELECT parent_id, frame_time, vector FROM items WHERE parent_id IN ({}) ORDER BY parent_id, frame_time"
        for parent, seconds, vector in self._rows_in(statement, [int(i) for i in video_ids]):
            found.setdefault(int(parent), []).append((float(seconds), np.frombuffer(vector, dtype=np.float32)))
        return found

    # -- the keyword index and OCR text (as `Catalog`'s: the same statements, keyword_sql) ----------

    def keyword_search(self, query: KeywordQuery, limit: int | None) -> list[tuple[int, float]]:
        with self._mapped() as connection:
            return keyword_sql.search(Sqlite3Statements(connection), self.dialect, query, limit)

    def keyword_documents(self, ids: Sequence[int]) -> dict[int, list[tuple[str, str]]]:
        with self._mapped() as connection:
            return keyword_sql.documents(Sqlite3Statements(connection), ids)

    def has_keywords(self) -> bool:
        return bool(self._rows("SELECT 1 FROM keywords LIMIT 1"))

    def store_ocr(self, results: Sequence[OcrResult]) -> None:
        with self._transaction() as connection:
            keyword_sql.store_ocr(Sqlite3Statements(connection), self.dialect, results, time.time())

    def images_to_read(self, after_id: int = 0, limit: int = 256) -> list[tuple[int, str, str | None]]:
        with self._mapped() as connection:
            return keyword_sql.images_to_read(Sqlite3Statements(connection), after_id, limit)

    def ocr_lines(self, ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
        with self._mapped() as connection:
            return keyword_sql.ocr_lines(Sqlite3Statements(connection), ids)

    def setting(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM state WHERE key = ?", (f"setting.{key}",))
        return str(rows[0][0]) if rows else None

    # -- the text query cache ----------------------------------------------------------------

    def cached_query(self, query: str) -> np.ndarray | None:
        rows = self._rows("SELECT vector, used_at FROM query_cache WHERE query = ?", (query,))
        if not rows or len(rows[0][0]) % 4:  # none, or damaged: encode the text again
            return None
        blob, used_at = rows[0]
        if used_at < time.time() - QUERY_CACHE_TOUCH_SECONDS:  # for the eviction; not on every hit
            self._cache_write("UPDATE query_cache SET used_at = ? WHERE query = ?", (time.time(), query))
        return np.frombuffer(blob, dtype=np.float32).copy()

    def cache_query(self, query: str, vector: np.ndarray, keep: int = QUERY_CACHE_SIZE) -> None:
        """As `Catalog.cache_query`: remember a text query's vector, evicting the least recently used beyond `keep`."""
        self._cache_write(
            "INSERT INTO query_cache (query, vector, used_at) VALUES (?, ?, ?) "
            "ON CONFLICT (query) DO UPDATE SET vector = excluded.vector, used_at = excluded.used_at",
            (query, np.asarray(vector, dtype=np.float32).tobytes(), time.time()),
            ("DELETE FROM query_cache WHERE used_at < "
             "(SELECT used_at FROM query_cache ORDER BY used_at DESC LIMIT 1 OFFSET ?)", (keep - 1,)),
        )

    def _cache_write(self, statement: str, parameters: Sequence[Any], *more: tuple[str, Sequence[Any]]) -> None:
        """Best effort, as `Catalog._best_effort`: waits at most CACHE_BUSY_TIMEOUT_MS, a failure is only
        logged. Without an fsync (synchronous=NORMAL): the cache can be rebuilt, and SQLite's WAL
        stays whole either way; a power cut may only forget the last queries cached."""
        try:
            with self._mapped() as connection:
                connection.execute(f"PRAGMA busy_timeout = {CACHE_BUSY_TIMEOUT_MS}")
                connection.execute("PRAGMA synchronous = NORMAL")
                try:
                    with self._transaction() as writing:
                        for sql, values in ((statement, parameters), *more):
                            writing.execute(sql, values)
                finally:
                    connection.execute("PRAGMA synchronous = FULL")
                    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except (sqlite3.Error, LibraryBusy, CatalogUnavailable) as error:
            log.info("query cache not written (%s)", error)


def _frame_ids(connection: sqlite3.Connection, video_ids: Sequence[int]) -> list[int]:
    found: list[int] = []
    for chunk in chunks(list(video_ids)):
        found += [int(row[0]) for row in connection.execute(
            f"SELECT id FROM items WHERE parent_id IN ({_marks(len(chunk))})", list(chunk))]
    return found


def _replace_frames(connection: sqlite3.Connection, items: Sequence[NewItem], ids: Sequence[int]) -> list[int]:
    """As `Catalog._replace_frames`: the videos' frames inserted, those they had removed; the touched ids."""
    videos = [(item, item_id) for item, item_id in zip(items, ids) if item.frames is not None]
    if not videos:
        return []
    old = _frame_ids(connection, [item_id for _, item_id in videos])
    for chunk in chunks(old):
        connection.execute(f"DELETE FROM items WHERE id IN ({_marks(len(chunk))})", list(chunk))
    new: list[int] = []
    for item, item_id in videos:
        for row in item.frame_columns(item_id):
            names = list(row)
            cursor = connection.execute(f"INSERT INTO items ({', '.join(names)}) VALUES ({_marks(len(names))})",
                                        [row[name] for name in names])
            new.append(int(cursor.lastrowid or 0))
    return old + new
class Sqlite3Statements:
    """`keyword_sql.Statements` on a sqlite3 connection (in the caller's transaction)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def rows(self, sql: str, parameters: dict[str, Any]) -> list[Any]:
        return self.connection.execute(sql, parameters).fetchall()

    def many(self, sql: str, parameters: list[dict[str, Any]]) -> None:
        self.connection.executemany(sql, parameters)


def _update(connection: sqlite3.Connection, item_id: int, columns: dict[str, Any]) -> None:
    unknown = set(columns) - set(ITEM_COLUMNS)
    if unknown:
        raise ValueError(f"not item columns: {', '.join(sorted(unknown))}")
    if columns:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        connection.execute(f"UPDATE items SET {assignments} WHERE id = ?", [*columns.values(), item_id])


def _marks(count: int) -> str:
    return ", ".join("?" * count)
