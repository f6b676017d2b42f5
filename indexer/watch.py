"""Keeping a library current: follow folders' change notifications and index what changes.

A `Watcher` holds the library's write lock for as long as it watches (searches go on
alongside). It first runs the usual incremental pass over its folders (what changed
while nothing watched), then follows the operating system's notifications (watchfiles:
inotify, FSEvents, ReadDirectoryChangesW; polling where they cannot be had) and feeds
what changed through the same rules as `clipdex index` (`clipdex.indexer.rules`: the
diff, hash reuse for moves and copies, what a batch commits) and the same local runner.

- A file is indexed once its size and mtime have stayed the same for `settle_seconds`
  (a camera card being copied, a download renamed from `.part`): never half-written.
  Empty files wait (a browser's placeholder), as do files the catch-up finds still changing.
- What settles while a batch runs becomes the next batch: a burst of files is indexed
  at the runner's steady rate, a commit per `batch_size` files, not one per file.
- A file gone is removed once nothing waits to settle (so a move, seen as a deletion and
  an addition, keeps its item and vector), unless its watched folder is gone or holds no
  images any more: then its items are kept, as `index` keeps them (an unmounted drive),
  and the folder is caught up when it is back.
- Catalog commits are the unit of durability: a process killed at any moment loses at
  most the batch in flight, and the next `watch` (or `index`) catches up exactly.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from clipdex.indexer.local import run_jobs
from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.rules import ScanDiff, diff_scan, remove_vanished
from clipdex.indexer.scan import ScannedFile, ScanResult, is_excluded, normalize, recordable_name, scan
from clipdex.search.catalog.types import FileRecord
from clipdex.search.errors import ClipdexError
from clipdex.search.library import Library
from clipdex.search.media.imaging import IMAGE_EXTENSIONS
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, max_file_bytes

log = logging.getLogger(__name__)

DEFAULT_SETTLE_SECONDS = 1.0
ROOT_CHECK_SECONDS = 2.0  # how often the watched folders are checked for being gone or back
GONE_WAIT_SECONDS = 30.0  # deletions wait at most so long for files still settling (a move's other half)
SAVE_IDLE_SECONDS = 30.0  # the vector index file is saved once the watcher has been idle so long
# File systems whose changes made on other machines raise no local notification: polled.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "davfs", "ncpfs",
    "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "fuse.gcsfuse", "fuse.glusterfs", "fuse.cephfs", "virtiofs", "vboxsf",
})


@dataclass(frozen=True)
class WatchOptions:
    """How a watcher indexes (as `index_paths`) and how it watches."""

    # -- what to index, as `clipdex index`
    exclude: Sequence[str] = ()
    include_hidden: bool = False
    batch_size: int = 32
    workers: int | None = None
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    prune_empty_roots: bool = False
    # -- texts files (`clipdex text`) indexed again whenever they change
    texts: Sequence[str | os.PathLike[str]] = ()
    text_column: str | None = None
    text_id_column: str | None = None
    # -- watching
    settle_seconds: float = DEFAULT_SETTLE_SECONDS  # size and mtime unchanged so long before a file is read
    poll_seconds: float | None = None  # poll every so many seconds instead of using notifications
    max_batch_files: int = 2000  # files settled at once are indexed in runs of at most so many


@dataclass
class WatchBatch:
    """What one batch did (the catch-up at the start is a batch too: `catch_up`)."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    texts_added: int = 0
    texts_updated: int = 0
    texts_removed: int = 0
    failed: list[Failure] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # gone folders whose items were kept
    seconds: float = 0.0
    pending: int = 0  # files still waiting to settle after this batch
    catch_up: bool = False
    interrupted: bool = False

    @property
    def files(self) -> int:
        return self.added + self.updated + self.moved

    @property
    def rate(self) -> float:
        """Files indexed per second in this batch."""
        return self.files / self.seconds if self.seconds > 0 else 0.0

    @property
    def empty(self) -> bool:
        return not (self.files or self.removed or self.failed or self.kept or self.texts_added or self.texts_updated
                    or self.texts_removed)

    def take(self, report: IndexReport) -> None:
        self.added += report.added
        self.updated += report.updated
        self.moved += report.moved
        self.removed += report.removed
        self.failed += report.failed
        self.interrupted = self.interrupted or report.interrupted

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "catch-up" if self.catch_up else "batch",
            "added": self.added, "updated": self.updated, "moved": self.moved, "removed": self.removed,
            "texts_added": self.texts_added, "texts_updated": self.texts_updated, "texts_removed": self.texts_removed,
            "failed": [failure.to_json() for failure in self.failed],
            "kept": self.kept,
            "seconds": round(self.seconds, 3),
            "files_per_second": round(self.rate, 2),
            "pending": self.pending,
            "interrupted": self.interrupted,
        }


@dataclass(frozen=True)
class WatchStatus:
    """Where a watcher is now (for a server's page: "indexing N files")."""

    watching: bool  # the catch-up is done and notifications are followed
    polling: bool  # some folders are polled rather than notified
    pending: int  # files seen changing, not yet indexed
    indexing: int  # files in the batch being indexed now
    batches: int  # batches done so far


BatchCallback = Callable[[WatchBatch], None]
NoticeCallback = Callable[[str], None]


@dataclass
class _Pending:
    """A file seen changing: indexed once (size, mtime) stays the same for the settle time."""

    size: int
    mtime_ns: int
    since: float  # monotonic time it was last seen different


class Watcher:
    """Follows `paths` (folders) and keeps `library` current; `run()` until `stop` is set.

    `on_batch` is called after each batch (the catch-up first), `on_notice` with a line for
    each thing the user should know (polling instead of notifications, a folder gone or
    back); both from the thread that calls `run()`.
    """

    def __init__(self, library: Library, paths: Sequence[str | os.PathLike[str]], options: WatchOptions = WatchOptions(),
                 on_batch: BatchCallback | None = None, on_notice: NoticeCallback | None = None,
                 stop: threading.Event | None = None) -> None:
        self.library = library
        self.roots = [normalize(path) for path in paths]
        self.options = options
        self.on_batch = on_batch
        self.on_notice = on_notice
        self.stop = stop or threading.Event()
        self.texts = [normalize(path) for path in options.texts]
        self._skip = normalize(library.path)
        self._limit = max_file_bytes(options.max_file_mb)
        self._pending: dict[str, _Pending] = {}
        self._gone: dict[str, float] = {}  # path (file or folder) -> when it was seen gone
        self._texts_changed: set[str] = set()
        self._root_identity: dict[str, tuple[int, int] | None] = {}
        self._gone_roots: set[str] = set()
        self._events: queue.Queue[tuple[str, str]] = queue.Queue()
        self._notifications: Notifications | None = None
        self._indexing = 0
        self._watching = False
        self._batches = 0
        self._dirty_since: float | None = None
        self.locked = threading.Event()  # set once the write lock is held
        self._check_roots_given()

    # -- what the caller sees ----------------------------------------------------------

    def status(self) -> WatchStatus:
        notifications = self._notifications
        return WatchStatus(self._watching, bool(notifications and notifications.polling), len(self._pending),
                           self._indexing, self._batches)

    def _notice(self, line: str) -> None:
        log.info("%s", line)
        if self.on_notice is not None:
            self.on_notice(line)

    def _emit(self, batch: WatchBatch) -> None:
        self._batches += 1
        batch.pending = len(self._pending)
        if self.on_batch is not None:
            self.on_batch(batch)

    # -- the run -----------------------------------------------------------------------

    def run(self) -> None:
        """Catch up, then watch until `stop` is set; the write lock is held throughout."""
        with self.library.writer() as writer:
            self._writer = writer
            self.locked.set()
            if not any(self.library.catalog.counts().values()):
                self.library.encoders.ensure_weights()
            self._root_identity = {root: _identity(root) for root in self.roots}
            self._gone_roots = {root for root, identity in self._root_identity.items() if identity is None}
            for root in sorted(self._gone_roots):
                self._notice(f"{root} is not there: its indexed items are kept, and it is caught up when it appears")
            self._notifications = Notifications(self._watched_roots(), self._text_folders(), self.options.poll_seconds,
                                                self._events, self._notice)
            try:
                # notified first, then caught up: a file that arrives between the two is not missed
                self._notifications.start()
                self._catch_up([root for root in self.roots if root not in self._gone_roots], texts=True)
                self._watching = True
                self._loop()
            finally:
                self._watching = False
                self._notifications.close()

    def _loop(self) -> None:
        tick = max(0.02, min(0.25, self.options.settle_seconds / 4))
        last_root_check = time.monotonic()
        while not self.stop.is_set():
            busy = self._pending or self._gone or self._texts_changed or self._dirty_since is not None
            self._take_events(tick if busy else ROOT_CHECK_SECONDS)  # idle: woken by the next event
            now = time.monotonic()
            if now - last_root_check >= ROOT_CHECK_SECONDS:
                last_root_check = now
                self._check_roots()
            self._index_settled()
            if self._dirty_since is not None and time.monotonic() - self._dirty_since > SAVE_IDLE_SECONDS:
                self._writer.flush()  # readers catch up from the catalog meanwhile; a fresh one loads less
                self._dirty_since = None

    # -- events into pending files and gone paths ------------------------------------------

    def _take_events(self, timeout: float) -> None:
        try:
            change, path = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        events = [(change, path)]
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for change, path in events:
            self._take(change, path)

    def _take(self, change: str, path: str) -> None:
        if change == FAILED and self._notifications is not None:
            self._notifications.fall_back(path)  # `path` says why; changes may have been missed meanwhile:
            self._catch_up(self._watched_roots())
            return
        path = normalize(path)
        if path in self.texts:
            self._texts_changed.add(path)
            return
        root = self._root_of(path)
        if root is None or self._ignored(path, root):
            return
        if change == "deleted":
            self._pending.pop(path, None)
            self._gone[path] = time.monotonic()
            return
        try:
            info = os.stat(path)
        except OSError:
            self._gone.setdefault(path, time.monotonic())
            return
        if os.path.isdir(path):
            if change == "added":  # a folder made or moved in: what is in it already raised no event of its own
                self._observe_folder(path)
        elif os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            self._gone.pop(path, None)
            self._observe(path, info.st_size, info.st_mtime_ns)

    def _observe_folder(self, folder: str) -> None:
        try:
            found = scan([folder], exclude=self.options.exclude, include_hidden=self.options.include_hidden,
                         skip_dirs=[self._skip], max_file_bytes=self._limit)
        except ClipdexError:
            return  # gone again already
        for scanned in found.files:
            self._gone.pop(scanned.path, None)
            self._observe(scanned.path, scanned.size, scanned.mtime_ns)

    def _observe(self, path: str, size: int, mtime_ns: int) -> None:
        seen = self._pending.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
            self._pending[path] = _Pending(size, mtime_ns, time.monotonic())

    def _root_of(self, path: str) -> str | None:
        for root in self.roots:
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                return root
        return None

    def _ignored(self, path: str, root: str) -> bool:
        """What a scan of `root` would not enter or index: the library itself, hidden and excluded names."""
        if path == self._skip or path.startswith(self._skip + os.sep):
            return True
        if path == root:
            return False
        relative = os.path.relpath(path, root).split(os.sep)
        for depth in range(len(relative)):
            name = relative[depth]
            if not self.options.include_hidden and name.startswith("."):
                return True
            if is_excluded(os.path.join(root, *relative[: depth + 1]), root, self.options.exclude):
                return True
        return False

    # -- batches ---------------------------------------------------------------------

    def _settled(self) -> list[ScannedFile]:
        """Pending files whose size and mtime held for the settle time (those gone become gone paths)."""
        now = time.monotonic()
        ready: list[ScannedFile] = []
        for path, seen in list(self._pending.items()):
            if now - seen.since < self.options.settle_seconds:
                continue
            try:
                info = os.stat(path)
            except OSError:
                del self._pending[path]
                self._gone[path] = now
                continue
            if (info.st_size, info.st_mtime_ns) != (seen.size, seen.mtime_ns) or info.st_size == 0:
                self._pending[path] = _Pending(info.st_size, info.st_mtime_ns, now)  # still changing, or a placeholder
                continue
            ready.append(ScannedFile(path, info.st_size, info.st_mtime_ns))
            if len(ready) >= self.options.max_batch_files:
                break
        for scanned in ready:
            del self._pending[scanned.path]
        return ready

    def _index_settled(self) -> None:
        ready = self._settled()
        texts = sorted(path for path in self._texts_changed if self._text_settled(path))
        now = time.monotonic()
        # a gone file's item is removed once nothing waits to settle: a move's new path, settled
        # in this batch or a later one, finds its bytes among the gone files and keeps the item
        gone_due = bool(self._gone) and (not self._pending or now - min(self._gone.values()) > GONE_WAIT_SECONDS)
        if not ready and not gone_due and not texts:
            return
        started = time.monotonic()
        batch = WatchBatch()
        self._indexing = len(ready)
        try:
            if ready or gone_due:
                self._apply(ready, gone_due, batch)
            if texts:
                self._texts_changed.difference_update(texts)
                self._index_texts(texts, batch)
        finally:
            self._indexing = 0
        self._export_text_tower()
        batch.seconds = time.monotonic() - started
        if not batch.empty:
            self._dirty_since = self._dirty_since or time.monotonic()
            self._emit(batch)
        if batch.interrupted:
            self.stop.set()

    def _apply(self, ready: list[ScannedFile], remove: bool, batch: WatchBatch) -> None:
        """Index the settled files by the rules `index` uses; the gone files' items are what a
        move finds its bytes in, and with `remove` the rest of them are removed."""
        gone = sorted(self._gone)
        diff = diff_scan(self.library, ScanResult(roots=[], files=ready))
        vanished = self._vanished(gone, {scanned.path for scanned in ready}, batch if remove else None)
        work = ScanDiff(diff.jobs, vanished, diff.unchanged, diff.failures)
        report = IndexReport()
        report.failed += work.failures
        if work.jobs:
            run_jobs(self.library, self._writer, work, report, self.options.batch_size, self.options.workers,
                     stop=self.stop, export=True, long_lived=True)
        if remove and not report.interrupted:
            remove_vanished(self._writer, work, report)
            for path in gone:
                self._gone.pop(path, None)
        batch.take(report)

    def _vanished(self, gone: list[str], seen: set[str], batch: WatchBatch | None) -> dict[str, FileRecord]:
        """The indexed files at or under the gone paths that are truly gone (not back, not waiting to
        settle); with `batch` (they are to be removed), not those of a watched folder that is gone or
        holds no images any more: those are kept, and said in `batch`."""
        if not gone:
            return {}
        catalog = self.library.catalog
        records = catalog.files_at(gone)
        folders = [path for path in gone if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS]
        if folders:
            records.update(catalog.files_under(folders))
        vanished = {path: record for path, record in records.items()
                    if path not in seen and path not in self._pending and not os.path.exists(path)}
        if batch is None:
            return vanished
        by_root: dict[str, list[str]] = {}
        for path in vanished:
            root = self._root_of(path)
            if root is not None:
                by_root.setdefault(root, []).append(path)
        for root, paths in by_root.items():
            if self._keeps(root, len(paths)):
                for path in paths:
                    del vanished[path]
                batch.kept.append(root)
                batch.failed.append(Failure(root, f"no images found here, but {len(paths)} indexed ones went: kept "
                                                  "them (is a drive unmounted?); it is caught up when it is back"))
        return vanished

    def _keeps(self, root: str, going: int) -> bool:
        """Whether a watched folder's items are kept although `going` of them went: the folder is gone,
        or (unless prune_empty_roots) it holds no images any more, which is what `index` would keep."""
        if not os.path.isdir(root) or _identity(root) != self._root_identity.get(root):
            return True
        if self.options.prune_empty_roots:
            return False
        if going < len(self.library.catalog.files_under([root])):
            return False
        return not self._holds_images(root)

    def _holds_images(self, root: str) -> bool:
        for directory, folders, files in os.walk(root):
            folders[:] = [name for name in folders if not self._ignored(os.path.join(directory, name), root)]
            if any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                   and not self._ignored(os.path.join(directory, name), root) for name in files):
                return True
        return False

    # -- catching up: at the start, and when a folder is back ----------------------------------

    def _catch_up(self, roots: list[str], texts: bool = False) -> None:
        """The usual incremental pass over `roots`; files still changing are left to settle."""
        started = time.monotonic()
        batch = WatchBatch(catch_up=True)
        if roots:
            result = scan(roots, exclude=self.options.exclude, include_hidden=self.options.include_hidden,
                          skip_dirs=[self._skip], max_file_bytes=self._limit)
            diff = diff_scan(self.library, result, self.options.prune_empty_roots)
            fresh = time.time_ns() - int(self.options.settle_seconds * 1e9)
            settling = [job for job in diff.jobs if job.file.mtime_ns > fresh or job.file.size == 0]
            for job in settling:
                self._observe(job.file.path, job.file.size, job.file.mtime_ns)
            work = ScanDiff([job for job in diff.jobs if job not in settling], diff.vanished, diff.unchanged, diff.failures)
            report = IndexReport(unchanged=diff.unchanged)
            report.failed += diff.failures
            self._indexing = len(work.jobs)
            try:
                if work.jobs:
                    run_jobs(self.library, self._writer, work, report, self.options.batch_size, self.options.workers,
                             stop=self.stop, export=True, long_lived=True)
                remove_vanished(self._writer, work, report)
            finally:
                self._indexing = 0
            batch.take(report)
        if texts and self.texts:
            self._index_texts(self.texts, batch)
        self._export_text_tower()
        batch.seconds = time.monotonic() - started
        self._dirty_since = time.monotonic() if not batch.empty else self._dirty_since
        self._emit(batch)
        if batch.interrupted:
            self.stop.set()

    def _export_text_tower(self) -> None:
        """As `index` does once it loaded the model: store its text tower, so that text queries
        need neither torch nor open_clip (once per library)."""
        if self.library.encoders.model_loaded and not self.stop.is_set() and self.library.encoders.export_due():
            self.library.export_text_encoder()

    def _check_roots(self) -> None:
        """A watched folder gone (an unmounted drive) keeps its items; one back (or another mounted
        there) is caught up, and the notifications follow the folders there are."""
        back: list[str] = []
        changed = False
        for root in self.roots:
            identity = _identity(root)
            if identity == self._root_identity.get(root):
                continue
            changed = True
            self._root_identity[root] = identity
            if identity is None:
                self._gone_roots.add(root)
                self._notice(f"{root} is gone: its indexed items are kept, and it is caught up when it is back")
            else:
                self._gone_roots.discard(root)
                self._notice(f"{root} is back (or another folder is there now): catching up")
                back.append(root)
        if changed and self._notifications is not None:
            self._notifications.restart(self._watched_roots(), self._text_folders())
        if back:
            self._catch_up(back)

    def _check_roots_given(self) -> None:
        for root in self.roots:
            if os.path.exists(root) and not os.path.isdir(root):
                raise ClipdexError(f"{root} is not a folder: watch takes folders (index a single file with clipdex index)")
            if not recordable_name(root):
                raise ClipdexError(f"{root!r}: folder name is not valid UTF-8, which the catalog cannot record")
        for path in self.texts:
            if os.path.isdir(path):
                raise ClipdexError(f"{path} is a folder: --texts takes a texts file (.txt, .csv, .tsv, .jsonl)")

    def _watched_roots(self) -> list[str]:
        return [root for root in self.roots if root not in self._gone_roots]

    # -- texts files ------------------------------------------------------------------

    def _text_folders(self) -> list[str]:
        return sorted({os.path.dirname(path) for path in self.texts if os.path.isdir(os.path.dirname(path))})

    def _text_settled(self, path: str) -> bool:
        try:
            age = time.time_ns() - os.stat(path).st_mtime_ns
        except OSError:
            return True  # gone: what index_texts does with it (reported) happens now
        return age >= self.options.settle_seconds * 1e9

    def _index_texts(self, paths: Iterable[str], batch: WatchBatch) -> None:
        from clipdex.indexer.texts import index_texts_locked

        report = index_texts_locked(self.library, self._writer, list(paths), self.options.text_column,
                                    self.options.text_id_column, stop=self.stop, max_file_mb=self.options.max_file_mb)
        batch.texts_added += report.added
        batch.texts_updated += report.updated
        batch.texts_removed += report.removed
        batch.failed += report.failed
        batch.interrupted = batch.interrupted or report.interrupted


def watch_paths(library: Library, paths: Sequence[str | os.PathLike[str]], options: WatchOptions = WatchOptions(),
                on_batch: BatchCallback | None = None, on_notice: NoticeCallback | None = None,
                stop: threading.Event | None = None) -> None:
    """Catch `library` up with `paths` (folders), then keep it current until `stop` is set (see `Watcher`)."""
    Watcher(library, paths, options, on_batch, on_notice, stop).run()


class BackgroundWatch:
    """A `Watcher` on a thread of its own, over the library at `library_path` opened for it: a
    server's own library then sees its commits as another process's (caught up before each
    search), and its model is not shared with the server's queries."""

    def __init__(self, library_path: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]],
                 options: WatchOptions = WatchOptions(), on_batch: BatchCallback | None = None,
                 on_notice: NoticeCallback | None = None, device: str = "auto", runtime: str = "auto") -> None:
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.library = Library.open(library_path, device=device, runtime=runtime)
        try:
            self.watcher = Watcher(self.library, paths, options, on_batch, on_notice, self.stop_event)
        except BaseException:
            self.library.close()
            raise
        self.thread = threading.Thread(target=self._run, name="clipdex-watcher", daemon=True)

    def start(self) -> "BackgroundWatch":
        """Start watching; returns once the write lock is held (LibraryBusy, say, is raised here)."""
        self.thread.start()
        while not self.watcher.locked.wait(0.05):
            if not self.thread.is_alive():
                self.thread.join()
                self.library.close()
                if self.error is not None:
                    raise self.error
                break
        return self

    def _run(self) -> None:
        try:
            self.watcher.run()
        except BaseException as error:  # said by start(), or logged: the server goes on answering
            self.error = error
            if self.watcher.locked.is_set():
                log.error("watching stopped: %s", error)

    def status(self) -> WatchStatus:
        return self.watcher.status()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the batch in flight, and close the library."""
        self.stop_event.set()
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.library.close()


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None when there is no folder there."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if os.path.isdir(path) else None


# -- notifications ---------------------------------------------------------------------


class Notifications:
    """watchfiles on background threads, putting `(change, path)` into a queue.

    Folders on a network file system are polled (their notifications do not arrive); when
    the system refuses more watches (inotify's max_user_watches), polling takes over too.
    Either is said in one line through `notice`. `poll_seconds` polls everything.
    """

    def __init__(self, roots: list[str], text_folders: list[str], poll_seconds: float | None,
                 events: "queue.Queue[tuple[str, str]]", notice: NoticeCallback) -> None:
        self.events = events
        self.notice = notice
        self.poll_seconds = poll_seconds
        self.roots = roots
        self.text_folders = text_folders
        self.polling = poll_seconds is not None
        self.poll_all = False  # set once notifications failed while watching
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._told: set[str] = set()

    def start(self) -> None:
        try:
            import watchfiles._rust_notify  # noqa: F401
        except ImportError:
            raise ClipdexError("watching folders needs watchfiles: pip install 'clipdex[watch]'") from None
        self._stop = threading.Event()
        self._threads = []
        polled = [root for root in self.roots if self.poll_all or self.poll_seconds is not None or self._on_network(root)]
        notified = [root for root in self.roots if root not in polled]
        if notified and not self._start(notified, recursive=True, polling=False):
            polled += notified
        if polled:
            self.polling = True
            self._start(polled, recursive=True, polling=True)
        if self.text_folders:  # texts files: their folders, not recursively (an editor saves by renaming)
            if not self._start(self.text_folders, recursive=False, polling=self.poll_all or self.poll_seconds is not None):
                self._start(self.text_folders, recursive=False, polling=True)

    def fall_back(self, reason: str) -> None:
        """Notifications failed while watching: poll everything from now on (said in one line)."""
        self._tell(f"change notifications failed ({reason}): polling every {self._poll_delay():g} s instead")
        self.poll_all = True
        self.restart(self.roots, self.text_folders)

    def restart(self, roots: list[str], text_folders: list[str]) -> None:
        self.close()
        self.roots, self.text_folders = roots, text_folders
        self.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def _on_network(self, root: str) -> bool:
        kind = file_system_type(root)
        if kind is None or kind not in NETWORK_FILE_SYSTEMS:
            return False
        self._tell(f"{root} is on a network file system ({kind}), where change notifications do not arrive: "
                   f"polling it every {self._poll_delay():g} s")
        return True

    def _poll_delay(self) -> float:
        return self.poll_seconds if self.poll_seconds is not None else DEFAULT_POLL_SECONDS

    def _tell(self, line: str) -> None:
        if line not in self._told:
            self._told.add(line)
            self.notice(line)

    def _start(self, paths: list[str], recursive: bool, polling: bool) -> bool:
        """Start a watcher thread on `paths`; False when the system refused (said in one line)."""
        started = threading.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._follow, args=(paths, recursive, polling, started, failure),
                                  name="clipdex-watch", daemon=True)
        thread.start()
        started.wait()
        if failure:
            thread.join()
            error = failure[0]
            if polling or isinstance(error, FileNotFoundError):
                raise ClipdexError(f"cannot watch {', '.join(paths)}: {error}") from None
            self._tell(f"change notifications refused ({refusal(error)}): polling every {self._poll_delay():g} s instead")
            return False
        self._threads.append(thread)
        return True

    def _follow(self, paths: list[str], recursive: bool, polling: bool, started: threading.Event,
                failure: list[BaseException]) -> None:
        try:
            source = start_watch(paths, recursive, polling, self._poll_delay(), self._stop)
        except Exception as error:  # the system refused (too many watches), or a folder went meanwhile
            failure.append(error)
            started.set()
            return
        started.set()
        try:
            for changes in source:
                for change in changes:
                    self.events.put(change)
        except Exception as error:  # the watcher failed while watching (too many watches for a new folder, say)
            if not self._stop.is_set():
                self.events.put((FAILED, refusal(error)))


DEFAULT_POLL_SECONDS = 5.0
FAILED = "failed"  # the change of the event a watcher thread puts when its watcher failed (the path: why)


def start_watch(paths: list[str], recursive: bool, polling: bool, poll_seconds: float,
                stop: threading.Event) -> Iterable[list[tuple[str, str]]]:
    """`(change, path)` lists for `paths` until `stop` is set, from watchfiles' watcher, made
    here so that a refusal (too many watches, a folder gone) raises here.

    watchfiles' `RustNotify` (its documented Rust backend) rather than `watchfiles.watch`:
    `watch` makes its watcher on the first `next()`, which waits for a first change."""
    from watchfiles._rust_notify import RustNotify

    watcher = RustNotify(paths, False, polling, int(poll_seconds * 1000), recursive, True)
    return _changes(watcher, stop)


CHANGE_NAMES = {1: "added", 2: "modified", 3: "deleted"}  # watchfiles.Change


def _changes(watcher: Any, stop: threading.Event) -> Iterable[list[tuple[str, str]]]:
    with watcher:
        while True:
            raw = watcher.watch(400, 50, 1000, stop)  # grouped over up to 0.4 s; stop looked at every 0.05 s
            if raw == "stop" or stop.is_set():
                return
            if isinstance(raw, set):
                yield [(CHANGE_NAMES.get(change, "modified"), path) for change, path in raw]


def refusal(error: BaseException) -> str:
    """A watcher's refusal in a few words, with the fix for inotify's limit."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "limit" in text.lower() or getattr(error, "errno", None) == 28:
        return (f"{text}; raise it with sudo sysctl fs.inotify.max_user_watches=524288")
    return text


def file_system_type(path: str) -> str | None:
    """The type of the file system `path` is on, from /proc/self/mounts (Linux); None elsewhere."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    real = os.path.realpath(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind
