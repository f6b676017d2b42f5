"""The everyday way into a library's own SQLite catalog (`LocalCatalog`, stdlib sqlite3) against
the SQLAlchemy `Catalog`: the same answers, statement by statement, and chosen only where it may be."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from clipdex.search.catalog.database import Catalog
from clipdex.search.catalog.local import LocalCatalog, open_catalog
from clipdex.search.catalog.types import SCHEMA_VERSION, ItemRow, NewItem
from clipdex.search.errors import CatalogUnavailable, CorruptLibrary, DamagedVectors, LibraryBusy
from clipdex.search.query import Filters

DIM = 4


def vector(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return values / np.linalg.norm(values)


def image(path: str, seed: int, **columns: Any) -> NewItem:
    return NewItem(kind="image", vector=vector(seed), path=path, size=seed + 1, mtime_ns=seed * 10,
                   content_hash=f"h{seed}", **columns)


def text(source: str, key: str, seed: int) -> NewItem:
    return NewItem(kind="text", vector=vector(seed), text=f"text {key}", source=source, source_key=key,
                   extra={"line": key})


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Catalog, LocalCatalog]:
    """Two catalogs made alike: one used through SQLAlchemy, one through sqlite3."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = Catalog(tmp_path / "a" / "catalog.sqlite", DIM)
    Catalog(tmp_path / "b" / "catalog.sqlite", DIM).close()
    local = open_catalog(None, tmp_path / "b" / "catalog.sqlite", DIM)
    assert isinstance(local, LocalCatalog)
    yield full, local
    full.close()
    local.close()


def same(pair: tuple[Catalog, LocalCatalog], call: Callable[[Any], Any]) -> Any:
    """`call` on both catalogs; their answers must agree (items compared without their indexing time)."""
    answers = [_comparable(call(catalog)) for catalog in pair]
    assert answers[0] == answers[1]
    return answers[1]


def _comparable(value: Any) -> Any:
    if isinstance(value, ItemRow):
        return dataclasses.replace(value, indexed_at=0.0)
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tolist())
    if isinstance(value, (list, tuple)):
        return type(value)(_comparable(item) for item in value)
    return value


def test_the_everyday_statements_answer_as_the_full_catalogs(pair: tuple[Catalog, LocalCatalog]) -> None:
    taken = datetime(2024, 5, 1, 12, 0)
    first = [image("/p/beach/a.jpg", 1, width=800, height=600, taken_at=taken, camera_make="Canon"),
             image("/p/Beach/b.JPG", 2, width=100, height=100), image("/p/x[1].png", 3),
             image("/q/beach/c.jpg", 4, taken_at="2023-01-01T00:00:00", device=5, inode=6),
             text("/corpus/lines.txt", "1", 5), text("/corpus/lines.txt", "2", 6)]
    result = same(pair, lambda catalog: catalog.commit_batch(first))
    ids = result.ids
    assert result.generation == 1 and len(ids) == 6
    same(pair, lambda catalog: catalog.commit_batch([dataclasses.replace(image("/p/beach/a.jpg", 7), id=ids[0])],
                                                    remove_ids=[ids[2]],
                                                    moves=[(ids[1], {"path": "/p/moved/b.jpg", "size": 9})]))
    same(pair, lambda catalog: catalog.commit_batch([image("/p/beach/new.jpg", 8)]))
    for call in (
        lambda c: c.generation(), lambda c: c.changes_floor(), lambda c: c.changed_since(0), lambda c: c.changed_since(1),
        lambda c: c.files_under(["/p"]), lambda c: c.files_under(["/p/beach/", "/q"]), lambda c: c.files_under(["/nowhere"]),
        lambda c: c.files_at(["/p/beach/a.jpg", "/p/moved/b.jpg", "/missing"]),
        lambda c: c.ids_at_paths(["/p/beach/a.jpg", "/q/beach/c.jpg", "/missing"]),
        lambda c: c.images_at_paths(["/p/beach/a.jpg", "/missing"]),
        lambda c: c.ids_of_keys("/corpus/lines.txt", ["1", "2", "3"]), lambda c: c.texts_from("/corpus/lines.txt"),
        lambda c: c.id_with_hash("h4"), lambda c: c.id_with_hash("none"),
        lambda c: c.get_items(range(1, 10)), lambda c: c.get_item(ids[0]), lambda c: c.get_item(999),
        lambda c: list(c.iter_vectors()), lambda c: list(c.iter_vectors([ids[3], ids[0]])),
        lambda c: list(c.iter_vectors(chunk_size=2)), lambda c: c.all_vectors(),
        lambda c: c.counts(), lambda c: sorted(c.ids()), lambda c: sorted(c.ids("text")), lambda c: c.recorded_model(),
    ):
        same(pair, call)
    for filters in (Filters(), Filters(kind="image"), Filters(kind="text"), Filters(path="*/beach/*"), Filters(path="*.JPG"),
                    Filters(path="*[1]*"), Filters(path="/corpus/*"), Filters(after=datetime(2024, 1, 1)),
                    Filters(before=datetime(2024, 1, 1)), Filters(min_width=500), Filters(min_height=100, kind="image")):
        same(pair, lambda catalog: catalog.filtered_ids(filters))
    same(pair, lambda catalog: catalog.trim_changes(2))
    same(pair, lambda catalog: (catalog.changes_floor(), catalog.changed_since(0)))


def test_the_query_cache_and_its_eviction_answer_alike(pair: tuple[Catalog, LocalCatalog]) -> None:
    for number in range(5):
        same(pair, lambda catalog: catalog.cache_query(f"query {number}", vector(number), keep=3))
    same(pair, lambda catalog: [catalog.cached_query(f"query {number}") for number in range(5)])
    assert pair[1].cached_query("query 0") is None and np.allclose(pair[1].cached_query("query 4"), vector(4))
    same(pair, lambda catalog: catalog.cached_query_vectors(DIM, 10))  # handed on to the full catalog


def test_damage_and_a_busy_writer_read_as_the_project_s_own_errors(pair: tuple[Catalog, LocalCatalog]) -> None:
    local = pair[1]
    local.commit_batch([image("/p/a.jpg", 1)])
    raw = sqlite3.connect(local.path)
    raw.execute("UPDATE items SET vector = x'0000' WHERE path = '/p/a.jpg'")
    raw.commit()
    with pytest.raises(DamagedVectors, match="item 1 has 2 bytes"):
        local.all_vectors()
    raw.execute("BEGIN IMMEDIATE")  # another writer holds SQLite's write lock
    local._connection().execute("PRAGMA busy_timeout = 50")
    with pytest.raises(LibraryBusy, match="busy"):
        local.commit_batch([image("/p/b.jpg", 2)])
    raw.execute("ROLLBACK")
    raw.execute("DELETE FROM state WHERE key = 'generation'")
    raw.commit()
    with pytest.raises(CorruptLibrary, match="check --repair"):
        local.generation()
    assert local.missing_state() == ["generation"]  # handed on to the full catalog


def test_a_failed_batch_leaves_nothing_behind(pair: tuple[Catalog, LocalCatalog]) -> None:
    local = pair[1]
    local.commit_batch([image("/p/a.jpg", 1)])
    with pytest.raises(ValueError, match="not item columns"):
        local.commit_batch([image("/p/b.jpg", 2)], moves=[(1, {"path; DROP TABLE items": "x"})])
    assert local.generation() == 1 and sorted(local.files_under(["/p"])) == ["/p/a.jpg"]


def test_only_a_current_writable_own_catalog_is_opened_so(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    assert type(open_catalog(None, path, DIM)).__name__ == "Catalog"  # a new one: made and migrated by Catalog
    assert isinstance(open_catalog(None, path, DIM), LocalCatalog)
    raw = sqlite3.connect(path)
    newest = SCHEMA_VERSION
    raw.execute(f"UPDATE schema_version SET version = {newest + 1} WHERE version = {newest}")  # made by a newer clipdex
    raw.commit()
    with pytest.raises(CorruptLibrary, match="newer than this clipdex"):  # the full catalog's word on it
        open_catalog(None, path, DIM)
    raw.execute(f"UPDATE schema_version SET version = {newest} WHERE version = {newest + 1}")
    raw.commit()
    assert isinstance(open_catalog(None, path, DIM), LocalCatalog)
    os.chmod(path, 0o444)
    try:
        if not os.access(path, os.W_OK):  # (root may write anyway)
            assert type(open_catalog(None, path, DIM)).__name__ == "Catalog"
    finally:
        os.chmod(path, 0o644)


def test_a_text_search_and_adding_a_photo_import_neither_sqlalchemy_nor_faiss(tmp_path: Path, library, make_images) -> None:  # type: ignore[no-untyped-def]
    """Adding a photo to a small library leaves its FAISS index file as saved (VectorStore.defers_index);
    the change log brings whoever loads it up to date, and `check` finds nothing wrong."""
    from clipdex.indexer import index_paths
    from clipdex.search.library import Library
    from clipdex.search.index.vectors import STAMP_FILE

    folder = tmp_path / "photos"
    make_images(folder, 3)
    index_paths(library, [folder])
    library.close()
    stamp = (library.path / STAMP_FILE).read_bytes()
    make_images(folder / "new", 1, start=10)
    probe = (
        "import sys\n"
        "from clipdex.indexer import index_paths\n"
        "from clipdex.search.library import Library\n"
        f"library = Library.open({str(library.path)!r})\n"
        f"report = index_paths(library, [{str(folder)!r}])\n"
        "assert report.added == 1, report\n"
        "assert library.search(text='a new question', k=2)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('sqlalchemy', 'faiss')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (library.path / STAMP_FILE).read_bytes() == stamp  # the index file was left as it was
    with Library.open(library.path, device="cpu") as reopened:
        assert reopened.check()["ok"], reopened.check()
        assert reopened.vectors.ntotal == 4  # caught up from the change log
        new_id = reopened.catalog.ids_at_paths([str(folder / "new" / "img010.jpg")])[str(folder / "new" / "img010.jpg")]
        ids, vectors = reopened.catalog.all_vectors()
        assert reopened.search_index(vectors[ids == new_id], 1)[1][0, 0] == new_id


def test_a_full_disk_in_the_middle_of_a_batch_reads_as_a_full_disk(pair: tuple[Catalog, LocalCatalog]) -> None:
    """SQLite rolls the whole transaction back itself when a statement finds the disk full (or an
    I/O error): the error is the full disk, not the ROLLBACK that finds no transaction left."""
    local = pair[1]
    local.commit_batch([image("/p/a.jpg", 1)])
    connection = local._connection()
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {pages}")  # no room for one more page
    big = [dataclasses.replace(image(f"/p/{number}.jpg", number), extra={"note": "x" * 20_000}) for number in range(2, 6)]
    with pytest.raises(CatalogUnavailable, match="no space left on device"):
        local.commit_batch(big)
    assert not connection.in_transaction
    connection.execute("PRAGMA max_page_count = 1073741823")
    assert local.generation() == 1 and sorted(local.files_under(["/p"])) == ["/p/a.jpg"]
    local.commit_batch([image("/p/b.jpg", 2)])  # the connection is as good as before
    assert local.generation() == 2


def test_a_small_library_s_commits_never_trust_an_index_ahead_of_its_catalog(library) -> None:  # type: ignore[no-untyped-def]
    """A catalog restored from a backup is behind the saved index, which belongs to another history:
    the first commit rebuilds the index (as every reader does), rather than leaving it for later
    commits to carry the generation past it, after which it would be caught up and trusted."""
    from clipdex.search.library import CATALOG_FILE, Library

    dim = library.dim

    def texts(*keys: str) -> list[NewItem]:
        return [NewItem(kind="text", vector=np.random.default_rng(int(key)).standard_normal(dim).astype(np.float32),
                        text=f"text {key}", source="s", source_key=key) for key in keys]

    with library.writer() as writer:
        writer.commit(texts("1"))  # generation 1, saved
    library.close()
    backup = sqlite3.connect(":memory:")
    with sqlite3.connect(library.path / CATALOG_FILE) as catalog:
        catalog.backup(backup)
    with Library.open(library.path, device="cpu") as opened:
        with opened.writer() as writer:
            writer.commit(texts("2", "3", "4"))  # generation 2
        opened.rebuild_vectors()  # saved at generation 2: four items
    with sqlite3.connect(library.path / CATALOG_FILE) as catalog:
        backup.backup(catalog)  # the catalog as it was at generation 1
    with Library.open(library.path, device="cpu") as restored:
        with restored.writer() as writer:
            writer.commit(remove_ids=[1])  # generation 2 again
        with restored.writer() as writer:
            writer.commit(texts("5"))  # generation 3
    with Library.open(library.path, device="cpu") as reopened:
        assert sorted(reopened.vectors.ids().tolist()) == sorted(reopened.catalog.ids().tolist())
        assert reopened.check()["ok"], reopened.check()


def _open_files_of(path: Path) -> int:
    """Descriptors this process holds on the catalog and its WAL and shared-memory files."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(path))
        except OSError:
            pass
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_the_connections_of_ended_threads_are_closed(pair: tuple[Catalog, LocalCatalog]) -> None:
    """The server's thread pool ends idle threads (anyio: after 10 s) and starts new ones: each opens
    its own connection, and those of ended threads must not stay open (file descriptors, memory)."""
    local = pair[1]
    local.generation()
    one = _open_files_of(local.path)
    for _ in range(20):
        thread = threading.Thread(target=local.generation)
        thread.start()
        thread.join()
    assert _open_files_of(local.path) <= 2 * one  # this thread's, and at most the last ended one's
    local.close()
    assert _open_files_of(local.path) == 0


def test_items_under_keys_answer_alike(pair: tuple[Catalog, LocalCatalog]) -> None:
    """An application's keys (issue #32): stored, read back and looked up the same way on both."""
    keyed = [NewItem(kind="text", vector=vector(1), text="a post", key="post:1", extra={"author": "ann"}),
             NewItem(kind="image", vector=vector(2), width=3, height=4, key="upload:é"), text("/corpus.txt", "post:1", 3)]
    ids = same(pair, lambda catalog: catalog.commit_batch(keyed)).ids
    same(pair, lambda catalog: catalog.commit_batch([dataclasses.replace(keyed[0], text="replaced", id=ids[0])]))
    for call in (lambda c: c.ids_of_item_keys(["post:1", "upload:é", "missing"]), lambda c: c.ids_of_item_keys([]),
                 lambda c: c.get_items(ids), lambda c: c.ids_of_keys("/corpus.txt", ["post:1"])):
        same(pair, call)
    assert same(pair, lambda c: c.get_item(ids[0])).key == "post:1"
    assert same(pair, lambda c: c.get_item(ids[2])).key is None  # a corpus text's own key is its source_key


def test_vectors_and_keyword_answers_agree(pair) -> None:
    """The hybrid search's statements: stored vectors by id, keyword matches and documents, OCR lines."""
    from clipdex.search.catalog.keyword_sql import OcrResult
    from clipdex.search.catalog.keywords import KeywordQuery

    for catalog in pair:
        catalog.commit_batch([image("/p/Walnut Grove/a.jpg", 1), image("/p/b.jpg", 2), text("/c.txt", "1", 3)])
        catalog.store_ocr([OcrResult(2, "h2", "fresh walnut bread", [{"text": "fresh walnut bread", "box": [[0, 0]] * 4}])])
    same(pair, lambda catalog: catalog.get_vectors([1, 3, 99]))
    same(pair, lambda catalog: catalog.keyword_search(KeywordQuery.parse("walnut"), None))
    same(pair, lambda catalog: catalog.keyword_documents([1, 2, 3]))
    same(pair, lambda catalog: catalog.ocr_lines([1, 2]))
    same(pair, lambda catalog: catalog.images_to_read(0, 10))
    same(pair, lambda catalog: catalog.has_keywords())
