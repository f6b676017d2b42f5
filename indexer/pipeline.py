"""The indexing pipeline: scan, diff against the catalog, decode in parallel, embed, commit.

A run commits one batch at a time; SQLite commits are the unit of durability, so a
killed run loses at most the batches in flight (one per model lane) and a re-run picks
up where it stopped.
Nothing here loads the model (or imports torch) unless some file must be embedded.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from clipdex.indexer.scan import ScannedFile, scan
from clipdex.search.catalog import FileRecord, NewItem
from clipdex.search.encoder import available_cores
from clipdex.search.errors import ClipdexError, UnreadableFile, UnreadableImage
from clipdex.search.fileid import content_hash as hash_bytes
from clipdex.search.imaging import decode_image
from clipdex.search.library import Library
from clipdex.search.safe_read import DEFAULT_MAX_FILE_MB, max_file_bytes, read_regular_file
from clipdex.search.vectors import faiss_module

ProgressCallback = Callable[[int, int], None]


@dataclass
class Failure:
    path: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    model_loaded: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "moved": self.moved,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": [failure.to_json() for failure in self.failed],
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Job:
    """A file that needs work: new (`record` None) or changed (`record` its old row)."""

    file: ScannedFile
    record: FileRecord | None


@dataclass
class _Prepared:
    job: _Job
    content_hash: str | None = None
    tensor: Any = None  # preprocessed image tensor, when it had to be decoded
    metadata: dict[str, Any] = field(default_factory=dict)
    reuse_id: int | None = None  # an item with the same bytes: its vector is reused
    error: str | None = None
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file that was read


@dataclass(frozen=True)
class ThreadPlan:
    """How an index run shares the cores between decoding and the model.

    On the CPU, reading, hashing and decoding a camera JPEG costs over half as much CPU
    time as embedding it, so both run at once and share all the cores: `decode_workers`
    threads read, hash and decode, while the model embeds up to `model_lanes` batches at
    once, each on its own thread with `model_threads` torch threads. Several lanes of few
    threads rather than one forward on every core: a thread of a parallel region that a
    decoder preempts holds up the whole region (every thread waits for the slowest at
    each barrier), while single-threaded lanes just take turns with the decoders. So the
    model uses whatever time decoding leaves, and decoding whatever the model leaves.
    On a GPU the model needs no cores: all decode, one lane.
    """

    decode_workers: int
    model_threads: int | None  # torch and FAISS threads per lane; None: leave them as they are
    model_lanes: int = 1  # batches embedded at once


MAX_LANES = 4  # each lane holds a batch and its activations: bound the memory on many-core machines


def plan_threads(device: str, workers: int | None = None) -> ThreadPlan:
    """The plan for an encoder on `device` (auto, cpu or cuda), with `workers` decode threads if given."""
    cores = available_cores()
    if device == "cuda" or (device == "auto" and _nvidia_driver_present()):
        return ThreadPlan(workers or cores, None)
    lanes = min(cores, MAX_LANES)
    return ThreadPlan(workers or cores, max(1, cores // lanes), lanes)


def _nvidia_driver_present() -> bool:
    """Whether `--device auto` will likely find CUDA, known without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version")


def index_paths(
    library: Library,
    paths: Sequence[str | os.PathLike[str]],
    *,
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
    export_text: bool = True,
    prune_empty_roots: bool = False,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> IndexReport:
    """Index the images under `paths` into `library`; see IndexReport for what it reports.

    `stop`: when set (by a Ctrl-C handler, say), the run ends once the batches in flight are committed.
    `prune_empty_roots`: a root folder with no images at all normally keeps its indexed
    items (an unmounted drive looks just like that); with this, they are removed.
    `export_text`: when the run loaded the model, also store its text tower in the library
    (once; `clipdex.search.text_export`) so that later text queries need neither torch nor open_clip.
    `max_file_mb`: larger files are reported as failed, never read (`clipdex.search.safe_read`).
    """
    started = time.monotonic()
    report = IndexReport()
    # The diff and the commits happen under the write lock: another run cannot slip in between.
    with library.writer() as writer:
        result = scan(paths, exclude=exclude, include_hidden=include_hidden, skip_dirs=[str(library.path)],
                      max_file_bytes=max_file_bytes(max_file_mb))
        report.failed += [Failure(path, reason) for path, reason in result.errors]
        known = library.catalog.files_under(result.roots)
        direct = [f.path for f in result.files if f.path not in known and not _inside_any(f.path, result.roots)]
        known.update(library.catalog.files_at(direct))  # single files given directly

        jobs: list[_Job] = []
        for scanned in result.files:
            record = known.get(scanned.path)
            if record is not None and record.size == scanned.size and record.mtime_ns == scanned.mtime_ns:
                report.unchanged += 1
            else:
                jobs.append(_Job(scanned, record))
        seen = {scanned.path for scanned in result.files}
        kept = {path for path, _ in result.errors}
        if not prune_empty_roots:
            result.unreadable_dirs += _empty_roots(result.roots, seen, known, report)
        vanished = {
            path: record
            for path, record in known.items()
            if path not in seen and path not in kept and not _inside_any(path, result.unreadable_dirs)
        }
        if jobs:
            plan = plan_threads(library.encoder.requested_device, workers)
            with _model_threads(library, plan.model_threads):
                _run_jobs(library, writer, jobs, vanished, report, batch_size, plan, progress, stop)
        if not report.interrupted and vanished:
            writer.commit(remove_ids=[record.id for record in vanished.values()])
            report.removed = len(vanished)
    report.model_loaded = library._encoder is not None and library._encoder.loaded
    if report.model_loaded and export_text and not report.interrupted:
        library.export_text_encoder()
    report.seconds = time.monotonic() - started
    return report


@contextmanager
def _model_threads(library: Library, count: int | None) -> Iterator[None]:
    """Run the model's and FAISS's threads at `count` during the block, then as before."""
    if count is None:
        yield
        return
    encoder = library.encoder
    before = encoder.threads
    faiss = faiss_module()
    faiss_before = faiss.omp_get_max_threads()
    encoder.set_threads(count)
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        encoder.set_threads(before)
        faiss.omp_set_num_threads(faiss_before)


def _empty_roots(roots: Sequence[str], seen: set[str], known: dict[str, FileRecord], report: IndexReport) -> list[str]:
    """Roots where no image was found but items are indexed: kept, and reported."""
    empty = []
    for root in roots:
        indexed = sum(1 for path in known if _inside_any(path, [root]))
        if indexed and not any(_inside_any(path, [root]) for path in seen):
            empty.append(root)
            report.failed.append(Failure(root, f"no images found here, but {indexed} are indexed: kept them "
                                               "(is a drive unmounted?); --prune-empty-roots removes them"))
    return empty


def _inside_any(path: str, directories: Iterable[str]) -> bool:
    return any(path.startswith(directory.rstrip(os.sep) + os.sep) for directory in directories)


def _run_jobs(
    library: Library,
    writer: Any,
    jobs: list[_Job],
    vanished: dict[str, FileRecord],
    report: IndexReport,
    batch_size: int,
    plan: ThreadPlan,
    progress: ProgressCallback | None,
    stop: threading.Event | None,
) -> None:
    """Prepare the jobs in parallel, embed full batches on the model lanes, commit them in order."""
    hashes = {record.content_hash: record.id for record in vanished.values() if record.content_hash}
    vanished_by_id = {record.id: path for path, record in vanished.items()}
    known_hashes = _HashLookup(library, hashes)
    lanes = plan.model_lanes
    in_flight: deque[tuple[list[_Prepared], Future[dict[int, np.ndarray]]]] = deque()

    def commit_down_to(limit: int) -> None:
        while len(in_flight) > limit:
            ready, embedded = in_flight.popleft()
            _commit(library, writer, ready, embedded.result(), vanished, vanished_by_id, report)

    batch: list[_Prepared] = []
    done = 0
    ahead = batch_size + 2 * plan.decode_workers  # decoded while the lanes embed: enough for the next batch
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="clipdex-model") as model_pool:
        try:
            for prepared in _prepare_all(library, jobs, known_hashes, plan.decode_workers, ahead):
                done += 1
                if prepared.error is not None:
                    report.failed.append(Failure(prepared.job.file.path, prepared.error))
                else:
                    batch.append(prepared)
                if len(batch) >= batch_size:
                    in_flight.append((batch, model_pool.submit(_embed, library, batch)))
                    batch = []
                    commit_down_to(lanes - 1)
                if progress:
                    progress(done, len(jobs))
                if stop is not None and stop.is_set():  # checked per file: a run of failing files cannot hold it up
                    report.interrupted = True
                    break
            if batch:
                in_flight.append((batch, model_pool.submit(_embed, library, batch)))
            commit_down_to(0)
        finally:
            for _, embedded in in_flight:  # an error ended the run: do not embed what will not be committed
                embedded.cancel()
    if progress:
        progress(done, len(jobs))


def _embed(library: Library, batch: list[_Prepared]) -> dict[int, np.ndarray]:
    """The vectors of the batch's decoded files, by `id` of their _Prepared (runs on a model lane)."""
    to_embed = [prepared for prepared in batch if prepared.tensor is not None]
    if not to_embed:
        return {}
    import torch

    encoded = library.encoder.encode_tensors(torch.stack([prepared.tensor for prepared in to_embed]))
    for prepared in to_embed:
        prepared.tensor = None  # embedded: let the memory go
    return {id(prepared): vector for prepared, vector in zip(to_embed, encoded)}


class _HashLookup:
    """Which stored item has given bytes: vanished files first (moves), then any (copies)."""

    def __init__(self, library: Library, vanished_hashes: dict[str, int]) -> None:
        self.library = library
        self.vanished = vanished_hashes
        self.lock = threading.Lock()

    def find(self, content_hash: str) -> int | None:
        if content_hash in self.vanished:
            return self.vanished[content_hash]
        with self.lock:
            return self.library.catalog.id_with_hash(content_hash)


def _prepare_all(library: Library, jobs: list[_Job], hashes: _HashLookup, workers: int, ahead: int) -> Iterator[_Prepared]:
    """Read, hash and (when no stored vector fits) decode files in parallel, in order.

    At most `ahead` files are in flight (being read or decoded, or done and waiting), so
    memory does not grow with the corpus. `ahead` spans more than a batch: while the
    caller embeds one batch, the workers decode the next.
    """
    encoder = library.encoder
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipdex-decode") as pool:
        pending: deque[Future[_Prepared]] = deque()
        job_iter = iter(jobs)
        try:
            for job in job_iter:
                pending.append(pool.submit(_prepare, job, encoder, hashes))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _prepare(job: _Job, encoder: Any, hashes: _HashLookup) -> _Prepared:
    path = job.file.path
    try:
        data, identity = _read_file(path, job.file.size)
    except FileNotFoundError:
        return _Prepared(job, error="file vanished before it could be read")
    except UnreadableFile as error:
        return _Prepared(job, error=error.reason)
    except OSError as error:
        return _Prepared(job, error=f"cannot read: {error.strerror or error}")
    content_hash = hash_bytes(data)
    prepared = _Prepared(job, content_hash=content_hash, identity=identity)
    if job.record is not None and job.record.content_hash == content_hash:
        prepared.reuse_id = job.record.id  # touched, not changed
        return prepared
    reuse = hashes.find(content_hash)
    if reuse is not None:
        prepared.reuse_id = reuse
        return prepared
    _decode_into(prepared, data, encoder)
    return prepared


def _read_file(path: str, scanned_size: int) -> tuple[bytes, tuple[int, int]]:
    """The file's bytes and its (device, inode), both of the one file that was opened: a
    regular file, read up to one byte past the size the scan saw (which was within the limit)."""
    data, info = read_regular_file(path, scanned_size, larger="file changed during the run; run index again")
    return data, (info.st_dev, info.st_ino)


def _decode_into(prepared: _Prepared, data: bytes, encoder: Any) -> None:
    """Decode and preprocess the file's bytes into `prepared` (tensor and metadata, or error)."""
    if not data:
        prepared.error = "empty file (0 bytes)"
        return
    try:
        preprocess = encoder.preprocess
        decoded = decode_image(data, draft_size=2 * encoder.image_size, name=prepared.job.file.path)
        prepared.tensor = preprocess(decoded.image)
    except UnreadableImage as error:
        prepared.error = error.reason
        return
    except ClipdexError:  # the model cannot load: that ends the run, it is no file's fault
        raise
    except Exception as error:  # a decoder bug must not end the run: report the file
        prepared.error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return
    prepared.metadata = {
        "width": decoded.width,
        "height": decoded.height,
        "taken_at": decoded.taken_at,
        "camera_make": decoded.camera_make,
        "camera_model": decoded.camera_model,
    }


def _recheck_reuse(library: Library, batch: list[_Prepared]) -> dict[int, Any]:
    """The stored items whose vectors the batch reuses, still holding the same bytes.

    The decision to reuse was made before earlier batches of this run committed; if one of
    them changed or removed that item (two files swapped contents, say), decode instead.
    """
    reused = [prepared.reuse_id for prepared in batch if prepared.reuse_id is not None]
    stored = library.catalog.get_items(reused) if reused else {}
    for prepared in batch:
        if prepared.reuse_id is None:
            continue
        source = stored.get(prepared.reuse_id)
        if source is None or source.content_hash != prepared.content_hash:
            prepared.reuse_id = None
            try:
                data, prepared.identity = _read_file(prepared.job.file.path, prepared.job.file.size)
            except UnreadableFile as error:
                prepared.error = error.reason
                continue
            except OSError as error:
                prepared.error = f"cannot read: {error.strerror or error}"
                continue
            if hash_bytes(data) != prepared.content_hash:
                prepared.error = "file changed during the run; run index again"
                continue
            _decode_into(prepared, data, library.encoder)
    return stored


def _commit(
    library: Library,
    writer: Any,
    batch: list[_Prepared],
    vectors: dict[int, np.ndarray],
    vanished: dict[str, FileRecord],
    vanished_by_id: dict[int, str],
    report: IndexReport,
) -> None:
    """Commit a batch whose decoded files are embedded (`vectors`); reuse is rechecked here, in commit order."""
    stored = _recheck_reuse(library, batch)
    for prepared in [p for p in batch if p.error is not None]:
        report.failed.append(Failure(prepared.job.file.path, prepared.error or ""))
    batch = [prepared for prepared in batch if prepared.error is None]
    if any(prepared.tensor is not None for prepared in batch):  # files the recheck had to decode after all
        vectors = {**vectors, **_embed(library, batch)}
    items: list[NewItem] = []
    moves: list[tuple[int, dict[str, Any]]] = []
    counts = {"added": 0, "updated": 0, "moved": 0}
    for prepared in batch:
        job = prepared.job
        device, inode = prepared.identity or (None, None)
        file_columns = {"path": job.file.path, "size": job.file.size, "mtime_ns": job.file.mtime_ns,
                        "content_hash": prepared.content_hash, "device": device, "inode": inode}
        source_id = prepared.reuse_id
        if source_id is not None and source_id in vanished_by_id and job.record is None:
            moves.append((source_id, file_columns))  # same bytes at a new path: keep id and vector
            vanished.pop(vanished_by_id.pop(source_id), None)
            counts["moved"] += 1
            continue
        if source_id is not None and job.record is not None and source_id == job.record.id:
            moves.append((source_id, file_columns))  # touched: only size/mtime changed
            counts["updated"] += 1
            continue
        if source_id is not None:
            source = stored[source_id]
            metadata = {key: getattr(source, key) for key in ("width", "height", "taken_at", "camera_make", "camera_model")}
            vector = source.vector_array().copy()
        else:
            metadata = prepared.metadata
            vector = vectors[id(prepared)]
        items.append(NewItem(kind="image", vector=vector, id=job.record.id if job.record else None, **file_columns, **metadata))
        counts["updated" if job.record else "added"] += 1
    writer.commit(items=items, moves=moves)
    report.added += counts["added"]
    report.updated += counts["updated"]
    report.moved += counts["moved"]
