"""The catalog seam: migrations, dialect-neutral statements, the generation, errors, the write lock."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine

from clipdex.search.catalog.database import MIGRATIONS, Catalog, NewItem, glob_to_regex
from clipdex.search.errors import CorruptLibrary, LibraryBusy
from clipdex.search.locks import FileWriteLock
from clipdex.search.query import Filters


def image(path: str, seed: int = 0) -> NewItem:
    vector = np.random.default_rng(seed).standard_normal(4).astype(np.float32)
    return NewItem(kind="image", vector=vector / np.linalg.norm(vector), path=path, size=1, mtime_ns=1)


PATHS = ["/p/beach/a.jpg", "/p/Beach/b.JPG", "/p/x[1].png", "/p/a?b.jpg", "/p/100%.jpg", "/p/under_score.jpg",
         "/p/dot.jpeg", "/q/beach/c.jpg", "/p/-x.jpg", "/p/]odd.jpg", "/p/back\\slash.jpg"]
GLOBS = ["*", "*/beach/*", "*.jpg", "*.JPG", "/p/?.jpg", "*[1]*", "*x\\[1\\]*", "*[!a-c].jpg", "*[]]*", "*%*",
         "*_*", "/p/a?b.jpg", "*[a-c]*", "/p/*", "*.jp?g", "[", "*[-]*", "*\\*", "*.*.*"]


@pytest.mark.parametrize("pattern", GLOBS)
def test_glob_translation_matches_sqlite_glob(pattern: str) -> None:
    """The regex other backends get selects exactly what SQLite's GLOB selects."""
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (path TEXT)")
    connection.executemany("INSERT INTO t VALUES (?)", [(path,) for path in PATHS])
    by_sqlite = {row[0] for row in connection.execute("SELECT path FROM t WHERE path GLOB ?", (pattern,))}
    by_regex = {path for path in PATHS if re.search(glob_to_regex(pattern), path)}
    assert by_regex == by_sqlite


@pytest.fixture
def target(tmp_path: Path, catalog_backend: str | None) -> Path | str:
    """Where a test's catalog lives: a SQLite file, or a fresh PostgreSQL database."""
    return catalog_backend or tmp_path / "catalog.sqlite"


def test_globs_select_the_same_paths_on_every_backend(postgres_url: str, tmp_path: Path) -> None:
    """PostgreSQL gets the translated regex; it must select what SQLite's GLOB selects."""
    catalogs = [Catalog(tmp_path / "catalog.sqlite"), Catalog(postgres_url)]
    for catalog in catalogs:
        catalog.commit_batch([image(path, number) for number, path in enumerate(PATHS)])
    for pattern in GLOBS:
        found = []
        for catalog in catalogs:
            ids = catalog.filtered_ids(Filters(path=pattern))
            assert ids is not None
            found.append({item.path for item in catalog.get_items(ids.tolist()).values()})
        assert found[0] == found[1], pattern


def test_query_cache_keeps_the_most_recently_used(target: Path | str) -> None:
    catalog = Catalog(target)
    for number in range(5):
        catalog.cache_query(f"query {number}", np.full(4, number, np.float32), keep=3)
    kept = [number for number in range(5) if catalog.cached_query(f"query {number}") is not None]
    assert kept == [2, 3, 4]
    assert np.array_equal(catalog.cached_query("query 4"), np.full(4, 4, np.float32))
    with catalog.engine.begin() as connection:  # "query 2" was last used long ago; a hit refreshes it
        connection.exec_driver_sql("UPDATE query_cache SET used_at = used_at - 100000 WHERE query = 'query 2'")
    assert catalog.cached_query("query 2") is not None
    catalog.cache_query("query 5", np.zeros(4, np.float32), keep=3)
    assert catalog.cached_query("query 2") is not None and catalog.cached_query("query 3") is None


def test_generations_stay_distinct_under_concurrent_writers(target: Path | str) -> None:
    """Each commit gets its own generation and its changes are logged under it, whoever commits."""
    catalogs = [Catalog(target), Catalog(target)]
    generations: list[int] = []
    lock = threading.Lock()

    def write(catalog: Catalog, offset: int) -> None:
        for number in range(15):
            result = catalog.commit_batch([image(f"/w/{offset + number}.jpg", number)])
            with lock:
                generations.append(result.generation)

    threads = [threading.Thread(target=write, args=(catalog, 100 * n)) for n, catalog in enumerate(catalogs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(generations) == list(range(1, 31))
    assert catalogs[0].generation() == 30 and len(catalogs[0].changed_since(0)) == 30


def test_an_old_catalog_is_migrated_and_keeps_its_items(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:  # a catalog as the first release left it: schema version 1
        connection.exec_driver_sql("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        MIGRATIONS[0](connection)
        connection.exec_driver_sql("INSERT INTO schema_version (version) VALUES (1)")
        connection.exec_driver_sql("INSERT INTO items (kind, path, vector, indexed_at) VALUES ('image', '/old.jpg', x'0000803f', 0)")
    engine.dispose()
    catalog = Catalog(path)
    item = catalog.get_item(1)
    assert item is not None and item.path == "/old.jpg" and item.device is None and item.inode is None
    new_id = catalog.commit_batch([image("/new.jpg")]).ids[0]
    assert new_id == 2  # ids are never reused (AUTOINCREMENT)
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)


def test_ids_are_not_reused_after_a_delete(target: Path | str) -> None:
    catalog = Catalog(target)
    first = catalog.commit_batch([image("/a.jpg"), image("/b.jpg")]).ids
    catalog.commit_batch(remove_ids=[first[1]])
    assert catalog.commit_batch([image("/c.jpg")]).ids[0] == first[1] + 1


def test_a_damaged_catalog_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is not a database, just bytes" * 100)
    with pytest.raises(CorruptLibrary, match=re.escape(str(path)) + ".*not a database"):
        Catalog(path)


def test_the_write_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    lock = FileWriteLock(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from clipdex.search.locks import FileWriteLock\n"
         f"with FileWriteLock(Path({str(tmp_path)!r})).held():\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LibraryBusy, match=f"being written by pid {holder.pid} on "):
            with lock.held():
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with lock.held():  # the OS let go of the killed holder's lock
        with pytest.raises(LibraryBusy):
            with FileWriteLock(tmp_path).held():
                pass
