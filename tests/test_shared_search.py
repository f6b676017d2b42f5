"""Searches share the vector index; commits and catch-ups that change it wait for them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from clipdex.indexer import index_paths
from clipdex.search.catalog.database import NewItem
from clipdex.search.library import Library
from clipdex.search.sharedlock import SharedLock
from clipdex.search.index.vectors import VectorIndex


def test_readers_share_and_a_writer_is_alone() -> None:
    lock = SharedLock()
    inside = threading.Barrier(3, timeout=5)  # two readers and this thread meet while both readers hold the lock
    release = threading.Event()
    events: list[str] = []

    def reader() -> None:
        with lock.shared():
            inside.wait()
            release.wait(5)
        events.append("reader out")

    def writer() -> None:
        with lock.exclusive():
            events.append("writer in")

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    inside.wait()  # both readers are in at once
    writing = threading.Thread(target=writer)
    writing.start()
    time.sleep(0.2)
    assert events == []  # the writer waits for the readers
    late_entered = threading.Event()

    def late_reader() -> None:
        with lock.shared():
            late_entered.set()

    late = threading.Thread(target=late_reader)
    late.start()
    time.sleep(0.2)
    assert not late_entered.is_set()  # a waiting writer holds off new readers
    release.set()
    for thread in [*readers, writing, late]:
        thread.join(5)
    assert events[-1] == "writer in" and late_entered.is_set()


@pytest.fixture
def indexed(library: Library, tmp_path: Path, make_images) -> Library:
    make_images(tmp_path / "pics", 6)
    index_paths(library, [tmp_path / "pics"], export_text=False)
    return library


def searches_must_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every FAISS search wait inside for a second one: an error if they run one after the other."""
    meet = threading.Barrier(2, timeout=5)
    search = VectorIndex.search

    def meeting_search(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        meet.wait()
        return search(self, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "search", meeting_search)


def run_twice_at_once(function: Callable[[], object]) -> list[object]:
    """`function`'s results from two threads started together; raises the first error."""
    results: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(function())
        except BaseException as error:  # noqa: BLE001 - raised below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    if errors:
        raise errors[0]
    return results


def any_vector(library: Library) -> np.ndarray:
    return next(iter(library.catalog.get_items(library.catalog.ids().tolist()).values())).vector_array()


def test_two_threads_search_at_the_same_time(indexed: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    searches_must_meet(monkeypatch)
    vector = any_vector(indexed)
    first, second = run_twice_at_once(lambda: [hit.id for hit in indexed.search(vector=vector, k=3)])
    assert first == second and len(first) == 3  # type: ignore[arg-type]


def test_a_commit_waits_for_a_search_in_progress(indexed: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    searching, finish = threading.Event(), threading.Event()
    search = VectorIndex.search
    ntotal_seen: list[int] = []

    def slow_search(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        searching.set()
        finish.wait(5)
        ntotal_seen.append(self.ntotal)  # the index must not change under a search
        return search(self, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "search", slow_search)
    vector = np.zeros(indexed.dim, dtype=np.float32)
    vector[0] = 1.0
    before = indexed.vectors.ntotal
    searcher = threading.Thread(target=lambda: indexed.search(vector=vector, k=2))
    searcher.start()
    assert searching.wait(5)
    committed = threading.Event()

    def commit() -> None:
        with indexed.writer() as writer:
            writer.commit(items=[NewItem(kind="text", vector=vector, text="new", source="t", source_key="1")])
        committed.set()

    committer = threading.Thread(target=commit)
    committer.start()
    time.sleep(0.3)
    assert not committed.is_set()  # held off while the search runs
    finish.set()
    searcher.join(5)
    committer.join(5)
    assert committed.is_set() and ntotal_seen == [before]
    assert indexed.vectors.ntotal == before + 1


def test_the_http_service_searches_at_the_same_time(indexed: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.http.service import SearchService
    from clipdex.search.query import Query

    service = SearchService(indexed)
    searches_must_meet(monkeypatch)
    vector = any_vector(indexed)
    assert run_twice_at_once(lambda: len(service.search(Query.build(vector=vector, k=2)))) == [2, 2]
