"""The vector store: a library's FAISS index, kept in step with its catalog.

The catalog is the source of truth; the FAISS file is derived. The store loads the saved
index, catches it up from the catalog's change log (or rebuilds it when the log no
longer reaches back), applies each commit of this process's writer, and saves it under
the write lock. Searches from several threads share the index; changing it in place
waits for them, and they for it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from clipdex.search.atomic import leftovers
from clipdex.search.catalog.types import BatchResult, NewItem, database_errors
from clipdex.search.index.exact_small import SmallExactSearch
from clipdex.search.index.rerank_cache import CachedVectors, RerankCache
from clipdex.search.errors import CatalogUnavailable, CorruptLibrary, LibraryBusy
from clipdex.search.index.choice import build_index_from, resolve_spec
from clipdex.search.locks import WriteLock
from clipdex.search.sharedlock import SharedLock
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE, IndexSpec, VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.index.parts import IndexRecord

log = logging.getLogger(__name__)


class VectorStore:
    """The FAISS index of the library at `directory`, as of a catalog generation."""

    def __init__(self, directory: Path, catalog: Catalog, manifest: IndexRecord, write_lock: WriteLock) -> None:
        self.directory = directory
        self.catalog = catalog
        self.manifest = manifest  # the index spec is recorded there; the store rewrites it when the spec changes
        self.write_lock = write_lock
        self._index: VectorIndex | None = None
        self._generation = -1  # of the catalog, that the in-memory index reflects
        self._sync_lock = threading.RLock()  # changes to the in-memory index and its generation
        self._index_lock = SharedLock()  # searches share the index; changing it in place excludes them
        self._small = SmallExactSearch(catalog, manifest.dim)  # exact answers without FAISS, while small
        self._stamp_seen: tuple[int, ...] | None = None  # the saved stamp as of the last load, save or look
        # Float16 copies of the vectors a reranking index reads its candidates from (the catalog's
        # are slow to read by id): kept while the spec reranks, read through to the catalog.
        self.rerank_cache = RerankCache(directory, manifest.dim, manifest.created_at, catalog.generation)
        self.rerank_source = CachedVectors(self.rerank_cache, catalog)
        self._cache_changes = False  # while this process's writer catches up its own commit: write its rows there
        self._changes_cached = False

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def index(self) -> VectorIndex:
        """The FAISS index, caught up with the catalog."""
        self.sync()
        assert self._index is not None
        self._index.rerank_source = self.rerank_source  # a reranking spec reads its candidates' vectors there
        return self._index

    # -- keeping up with the catalog ---------------------------------------------------

    def sync(self) -> bool:
        """Bring the in-memory index up to the catalog's generation. True if anything changed."""
        with self._sync_lock:
            generation = self.catalog.generation()
            if self._index is not None and self._saved_build_changed():
                self._take_up_saved(generation)
            if self._index is not None and self._generation == generation:
                return False
            first_load = self._index is None
            rebuilt: float | None = None  # seconds spent building it from the catalog, when it was
            if self._index is None or self._generation > generation:
                rebuilt = self._load_or_build(generation)
            for _attempt in range(2):
                if self._generation >= generation or self._catch_up(generation):
                    break
                rebuilt = self._load_or_build(generation)  # the log was trimmed: the saved index is newer
            else:
                started = time.perf_counter()
                self._index, self._generation = self._build(), generation
                rebuilt = time.perf_counter() - started
            if first_load and (rebuilt is not None or self._generation > saved_generation(self.directory)):
                self._save_if_no_writer(rebuilt)
            return True

    def _saved_build_changed(self) -> bool:
        """Whether the saved index is now of another build than the one held: another process
        optimized or rebuilt it (its tuned search parameters with it) since this one was loaded.
        One stat of the stamp while it is unchanged."""
        assert self._index is not None
        signature = stamp_signature(self.directory)
        if signature is None or signature == self._stamp_seen:
            return False
        stamp = read_stamp(self.directory)
        if stamp is not None and str(stamp.get("build", "")) != self._index.build:
            return True
        self._stamp_seen = signature  # the same build, saved further along: caught up from the log as ever
        return False

    def _take_up_saved(self, generation: int) -> None:
        """Load the index another process saved in place of the one held, and the manifest it recorded."""
        log.info("the vector index of %s was replaced by another process (optimize or a rebuild): loading it", self.directory)
        self.manifest.refresh(self.directory)
        self._load_or_build(generation)  # searches in progress finish on the index they started with

    def _load_or_build(self, generation: int) -> float | None:
        """Load the saved index, or build it from the catalog: the seconds that took, None when loaded."""
        self._stamp_seen = stamp_signature(self.directory)  # before the load: a save in between is seen next time
        loaded = VectorIndex.load(self.directory)
        # An index ahead of the catalog (its last commits lost) or of another dimension is not trusted.
        if loaded is not None and loaded[0].dim == self.dim and loaded[1] <= generation:
            self._index, self._generation = loaded
            return None
        started = time.perf_counter()
        self._index, self._generation = self._build(), generation
        return time.perf_counter() - started

    def _catch_up(self, generation: int) -> bool:
        """Apply the change log since the index's generation; False if the log no longer reaches back."""
        since = self._generation
        if since < self.catalog.changes_floor():
            return False
        changed = self.catalog.changed_since(since)
        if since < self.catalog.changes_floor():  # trimmed while we read: `changed` may be incomplete
            return False
        self._apply_changes(changed)
        self._generation = generation
        return True

    def _apply_changes(self, item_ids: Sequence[int]) -> None:
        assert self._index is not None
        if not item_ids:
            return
        changes = list(self.catalog.iter_vectors(item_ids))
        with self._index_lock.exclusive():
            self._index.remove(np.asarray(item_ids, dtype=np.int64))
            for ids, vectors in changes:
                self._index.add(ids, vectors)
                if self._cache_changes:
                    self.rerank_cache.write(ids, vectors)
            self._changes_cached = self._cache_changes

    def _build(self, spec: IndexSpec | None = None) -> VectorIndex:
        return build_index_from(self.dim, spec or self.manifest.index, self.catalog, scratch=self.directory)

    def _save_if_no_writer(self, rebuilt: float | None = None) -> None:
        """Persist a caught-up or rebuilt index (after a crash, say) so later readers need not redo it.

        Best effort: a reader never needs to write, so a busy or read-only library just skips it.
        An index rebuilt from the catalog (`rebuilt` seconds: its file missing, unreadable or of
        another history) that cannot be saved here is said once, with the command that saves it:
        every process that opens the library rebuilds it again until then."""
        if self.catalog.read_only:
            self._say_not_saved(rebuilt, f"the library cannot be written here: {self.catalog.read_only_reason}")
            return
        try:
            with self.write_lock.held():
                if not self._saved_build_changed():  # never over an index another process saved meanwhile
                    self.save()
                    if rebuilt is not None:
                        log.info("vector index of %s rebuilt from the catalog (%.1f s) and saved", self.directory, rebuilt)
        except Exception as error:
            if not isinstance(error, (LibraryBusy, OSError, CatalogUnavailable) + database_errors()):
                raise
            log.info("caught-up vector index of %s not saved: %s", self.directory, error)
            if isinstance(error, OSError):  # a busy library's writer saves the index itself
                self._say_not_saved(rebuilt, str(error))

    def _say_not_saved(self, rebuilt: float | None, reason: str) -> None:
        assert self._index is not None
        if rebuilt is not None and self._index.ntotal:
            log.warning("%s of %s is missing or could not be used: it was rebuilt in memory from the catalog (%.1f s) "
                        "and cannot be saved (%s), so every process that opens the library rebuilds it again; run "
                        "`clipdex check --repair --library %s` where the library can be written", INDEX_FILE,
                        self.directory, rebuilt, reason, self.directory)

    # -- searching -------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, query_kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the index, caught up with the catalog first (see `VectorIndex.search`).

        A small library with an exact (flat) index whose FAISS index this process has not
        loaded is answered exactly with numpy instead (`clipdex.search.index.exact_small`), from the
        catalog: the saved index may lag behind it (see `defers_index`).
        """
        if self._index is None and self.manifest.index.type == "flat":
            answer = self._small.search(queries, k, allowed)
            if answer is not None:
                return answer
        self.sync()
        with self._index_lock.shared():
            assert self._index is not None
            self._index.rerank_source = self.rerank_source  # a reranking spec reads its candidates' vectors there
            return self._index.search(queries, k, allowed, source=self.catalog, query_kind=query_kind)

    def searched_exactly(self) -> bool:
        """Whether searches of a process that has not loaded the FAISS index are answered exactly
        from the catalog (`exact_small`: a small library with an exact index), so that it needs none."""
        return self.manifest.index.type == "flat" and sum(self.catalog.counts().values()) <= self._small.limit

    # -- changing it (the caller holds the write lock) ---------------------------------------

    def apply_commit(self, result: BatchResult, items: Sequence[NewItem], remove_ids: Sequence[int]) -> None:
        """Mirror one catalog commit of this process in the in-memory index."""
        with self._sync_lock:
            assert self._index is not None
            if result.frames_changed:  # a video's moments came or went: the change log names them all
                before = result.generation - 1
                self._cache_changes = self.keep_rerank_cache() and self.rerank_cache.mirrors(before)
                self._changes_cached = False
                try:
                    self.sync()  # `_apply_changes` writes the changed rows to the rerank cache
                    if self._changes_cached:
                        self.rerank_cache.mirrored(before, result.generation)
                finally:
                    self._cache_changes = False
                return
            replaced = [item.id for item in items if item.id is not None]
            gone = list(remove_ids) + replaced
            with self._index_lock.exclusive():
                if gone:
                    self._index.remove(np.asarray(gone, dtype=np.int64))
                if items:
                    self._index.add(np.asarray(result.ids, dtype=np.int64), np.stack([item.vector for item in items]))
            self._mirror_in_rerank_cache(result, items)
            if self._generation == result.generation - 1:
                self._generation = result.generation
            else:  # another process wrote in between (cannot happen under the lock): catch up
                self.sync()

    def defers_index(self, adding: int = 0) -> bool:
        """Whether commits leave the FAISS index as it was saved: while this process has not loaded
        it, the library's own catalog holds few enough vectors (with `adding` more) to be searched
        exactly without FAISS, and its index type is exact (flat).

        Adding a photo then never imports FAISS (a fifth of a second) nor rewrites the index file.
        The change log keeps what the saved index lacks (it is trimmed only when an index is
        saved), so whoever loads the index - a search of a larger library, `stats`, the next
        commit once the library outgrows the limit - catches it up from there, as after any crash.
        """
        return (self._index is None and self.manifest.index.type == "flat" and not self.catalog.shared
                # a first run saves one (`check` expects it); one ahead of the catalog (restored from a
                # backup) is of another history: loading it rebuilds it, which a commit must not put off
                and 0 <= saved_generation(self.directory) <= self.catalog.generation()
                and sum(self.catalog.counts().values()) + adding <= self._small.limit)

    def commit(self, items: Sequence[NewItem], remove_ids: Sequence[int], moves: Sequence[tuple[int, dict[str, Any]]]) -> list[int]:
        """Commit a batch to the catalog and mirror it here (unless `defers_index`), as one step for other threads."""
        for item in items:
            if item.vector.shape != (self.dim,):
                raise CorruptLibrary(f"vector of shape {item.vector.shape} does not fit this library (dim {self.dim})")
        with self._sync_lock:
            if self.defers_index(len(items)):
                return self.catalog.commit_batch(items, remove_ids, moves).ids
            self.sync()
            result = self.catalog.commit_batch(items, remove_ids, moves)
            self.apply_commit(result, items, remove_ids)
        return result.ids

    def rebuild(self, spec: IndexSpec | None = None) -> VectorIndex:
        """Rebuild from the catalog (optionally of another type, recorded in the manifest once the
        index is saved) and save."""
        with self._sync_lock:
            with self._replacing():
                generation = self.catalog.generation()
                self._index, self._generation = self._build(spec), generation
                self.save()
            if spec is not None:
                self._record_spec(spec)
            self.keep_rerank_cache(fill=True)
            return self._index

    def rebuild_if_outgrown(self) -> bool:
        """Rebuild when the library's size now calls for another index type; True if it did."""
        current = self.index.spec
        chosen = resolve_spec(self.manifest.index, self.index.ntotal, self.dim)
        if chosen.type == current.type and chosen.factory == current.factory:
            return False
        self.rebuild(chosen)
        return True

    def adopt(self, index: VectorIndex, generation: int, entries: dict[str, Any] | None = None) -> None:
        """Make `index`, built from the catalog as of `generation`, the library's index: catch
        it up from the change log (or rebuild it with its spec when the log no longer reaches
        back) and save it; then record its spec in the manifest, with `entries` (optimize's
        report). An index that cannot be saved (a full disk) leaves the store and the manifest
        as they were: the manifest never describes an index the library does not have."""
        with self._sync_lock:
            with self._replacing():
                self._index, self._generation = index, generation
                current = self.catalog.generation()
                if current > generation and not self._catch_up(current):
                    self._index, self._generation = self._build(index.spec), current
                self.save()
            self._record_spec(index.spec, entries)
            self.keep_rerank_cache(fill=True)

    def _mirror_in_rerank_cache(self, result: BatchResult, items: Sequence[NewItem]) -> None:
        """As the writer, after a commit: its vectors into the rerank cache (all of the catalog's,
        when the cache missed a commit before this one: a crash, say)."""
        if not self.keep_rerank_cache():
            return
        before = result.generation - 1
        if not self.rerank_cache.mirrors(before):
            self.keep_rerank_cache(fill=True)
            return
        if items:
            self.rerank_cache.write(np.asarray(result.ids, dtype=np.int64), np.stack([item.vector for item in items]))
        self.rerank_cache.mirrored(before, result.generation)

    def keep_rerank_cache(self, fill: bool = False, spec: IndexSpec | None = None) -> bool:
        """As the library's writer: keep the rerank cache while the index (or one of `spec`, that
        an import is building) reranks its codes (with `fill`, written again from the catalog
        unless it mirrors it now: after a rebuild or an optimize), and delete it when the index
        does not; True when it is kept."""
        wanted = spec or (self._index.spec if self._index is not None else None)
        if wanted is None or self.catalog.read_only:
            return False
        cache = self.rerank_cache
        if not wanted.reranks_codes:
            if cache.path.exists():
                cache.remove()
            return False
        if not cache.open_for_writing():
            return False
        generation = self.catalog.generation()
        if fill and not cache.mirrors(generation):
            started = time.perf_counter()
            cache.fill(self.catalog, generation)
            log.info("rerank cache of %s written from the catalog (%.1f s)", self.directory, time.perf_counter() - started)
        return True

    @contextmanager
    def _replacing(self) -> Iterator[None]:
        """Put back the index held before the block when it fails (a new one not saved, say)."""
        previous = self._index, self._generation
        try:
            yield
        except BaseException:
            self._index, self._generation = previous
            raise

    def save(self) -> None:
        """Save the in-memory index and trim the change log it makes redundant."""
        with self._sync_lock:
            if self._index is None:
                return
            for leftover in leftovers(self.directory, INDEX_FILE):  # from a writer killed mid-save
                leftover.unlink(missing_ok=True)
            self._index.save(self.directory, self._generation)
            self._stamp_seen = stamp_signature(self.directory)
            if not self.catalog.shared:  # replicas elsewhere still catch up from a shared catalog's log
                self.catalog.trim_changes(self._generation)

    def _record_spec(self, spec: IndexSpec, entries: dict[str, Any] | None = None) -> None:
        self.manifest.record_index(self.directory, spec, entries)


class LibraryWriter:
    """Commits batches to the catalog and keeps the in-memory index in step; saves it now and then."""

    SAVE_EVERY_SECONDS = 30.0

    def __init__(self, store: VectorStore) -> None:
        self.store = store
        self._dirty = False
        self._last_save = time.monotonic()

    def commit(
        self,
        items: Sequence[NewItem] = (),
        remove_ids: Sequence[int] = (),
        moves: Sequence[tuple[int, dict[str, Any]]] = (),
    ) -> list[int]:
        """Durably commit one batch; returns the ids of `items`."""
        ids = self.store.commit(items, list(remove_ids), moves)
        self._dirty = True
        if time.monotonic() - self._last_save > self.SAVE_EVERY_SECONDS:
            self.flush()
        return ids

    def flush(self) -> None:
        if self._dirty:
            self.store.save()
            self._dirty = False
            self._last_save = time.monotonic()

    def flush_after(self, failure: BaseException) -> None:
        """Save the index as far as the commits made before `failure` ended the writing, when it
        can be: a save that fails too (the same full disk, say) is logged, never raised in the
        place of `failure`, which is what the user must hear of. The next reader catches the
        saved index up from the catalog's log."""
        try:
            self.flush()
        except Exception as error:
            log.info("vector index of %s not saved after %s: %s", self.store.directory, type(failure).__name__, error)


def saved_generation(directory: Path) -> int:
    """The generation the saved vector index reflects, or -1 when there is none."""
    try:
        return int((read_stamp(directory) or {})["generation"])
    except (ValueError, KeyError, TypeError):
        return -1


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """The saved vector index's stamp (`VectorIndex.save`), or None when it is missing or unreadable."""
    try:
        stamp = json.loads((directory / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def stamp_signature(directory: Path) -> tuple[int, ...] | None:
    """What changes when the stamp is written again (it is replaced by a rename), or None when there is none."""
    try:
        info = os.stat(directory / STAMP_FILE)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)
