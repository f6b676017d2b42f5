"""Running an index run's jobs on this machine: a decode pool, model lanes, commits in order.

The rules (what to reuse, what a batch commits) are `clipdex.indexer.rules`; this module
only decides which thread does what, and when.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from clipdex.indexer.first_export import FirstExport
from clipdex.indexer.progress import ProgressReporter
from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.rules import (VIDEO_BATCH, ScanDiff, _commit, _embed, _HashLookup, _Job, _prepare, _prepare_again,
                                   _Prepared)
from clipdex.search.cores import available_cores
from clipdex.search.encoders.base import ImagePreparer
from clipdex.search.library import Library
from clipdex.search.media.video import is_video_path
from clipdex.search.index.vectors import faiss_module

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
    On the CPU each batch is also split across the lanes (`split_batches`): when decoding
    ends, the last batches keep every lane busy instead of one lane finishing the last
    full batch alone while the other cores idle.
    On a GPU the model needs no cores: the threads read files and JPEG headers (JPEGs
    decode on the GPU, `clipdex.search.media.gpu_decode`; other files here), and two lanes, each
    with its own decoder and CUDA streams, let one lane decode while the other embeds.
    """

    decode_workers: int
    model_threads: int | None  # torch and FAISS threads per lane; None: leave them as they are
    model_lanes: int = 1  # batches (or parts of one, with split_batches) embedded at once
    split_batches: bool = False  # each batch embedded as model_lanes parts, one per lane


MAX_LANES = 4  # each lane holds a batch and its activations: bound the memory on many-core machines
# batches decoded further ahead while a first export runs (`FirstExport`): the decoders have
# the time (loading open_clip and exporting take 10 s and more); 8 batches of 32 inputs of a
# 256-pixel model are about 200 MB
EXPORT_AHEAD_BATCHES = 8
EXPORT_AHEAD_FILES = 256  # and at most so many files, whatever the batch size


def plan_threads(device: str, workers: int | None = None) -> ThreadPlan:
    """The plan for an encoder on `device` (auto, cpu or cuda), with `workers` decode threads if given."""
    cores = available_cores()
    if device == "cuda" or (device == "auto" and _nvidia_driver_present()):
        # two lanes, each with its own GPU decoder and streams: one decodes while the other embeds
        return ThreadPlan(workers or cores, None, 2)
    lanes = min(cores, MAX_LANES)
    return ThreadPlan(workers or cores, max(1, cores // lanes), lanes, split_batches=lanes > 1)


def _nvidia_driver_present() -> bool:
    """Whether `--device auto` will likely find CUDA, known without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version")


def run_jobs(
    library: Library,
    writer: Any,
    diff: ScanDiff,
    report: IndexReport,
    batch_size: int,
    workers: int | None = None,
    progress: ProgressReporter | None = None,
    stop: threading.Event | None = None,
    export: bool = True,
    long_lived: bool = False,
) -> None:
    """Do the jobs of `diff` on this machine's cores (see ThreadPlan), committing batches with `writer`.

    `stop`: when set (checked after each file), the run ends once the batches in flight are committed.
    `export`: a run that must export the model (`LibraryEncoders.export_pending`) exports it
    first and embeds on the export (`clipdex.indexer.first_export`); without, it exports nothing.
    `progress`: told the embed and commit phases' counts, and the first export's (`clipdex.indexer.progress`).
    `long_lived`: the process outlives the run and runs again, mostly on a few files (a watcher):
    the encoder is told to expect a few images whatever this run holds, so it keeps one light
    session throughout (ONNX: the weights a memory map of the export, which the kernel can take
    back while the watcher idles) instead of loading a prepacked copy of them (about 330 MB
    for ViT-B-32) for a burst beside the light one a single photo loaded.
    """
    plan = plan_threads(library.encoders.requested_device, workers)
    faiss_too = not library.store.defers_index(len(diff.jobs))
    expected = 1 if long_lived else len(diff.jobs)
    first_export = FirstExport.for_run(library, plan.model_threads, len(diff.jobs), progress, expected) if export else None
    try:
        if first_export is None:
            library.encoder.expect_images(expected)
        with _model_threads(library, plan.model_threads, faiss_too=faiss_too, encoder_too=first_export is None):
            _run_jobs(library, writer, diff, report, batch_size, plan, progress, stop, first_export)
    finally:
        if first_export is not None:
            report.export_seconds = first_export.finish()
    if first_export is not None and first_export.error is not None:
        raise first_export.error  # after the lanes were let go: the text export's, say


@contextmanager
def _model_threads(library: Library, count: int | None, faiss_too: bool = True, encoder_too: bool = True) -> Iterator[None]:
    """Run the model's (`encoder_too`) and FAISS's (`faiss_too`: the run's commits will use it)
    threads at `count` during the block; then the encoder the run ended with, and FAISS, as
    before. (A first export sets the model's threads itself, on the encoder it switches to:
    see `FirstExport`.)"""
    if count is None:
        yield
        return
    before = library.encoder.threads
    faiss = faiss_module() if faiss_too else None
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else 0
    if encoder_too:
        library.encoder.set_threads(count)
    if faiss is not None:
        faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        library.encoder.set_threads(before)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_before)


def _run_jobs(
    library: Library,
    writer: Any,
    diff: ScanDiff,
    report: IndexReport,
    batch_size: int,
    plan: ThreadPlan,
    progress: ProgressReporter | None,
    stop: threading.Event | None,
    first_export: FirstExport | None = None,
) -> None:
    """Prepare the jobs in parallel, embed full batches on the model lanes, commit them in order.

    `first_export`: the decoders preprocess with it, and the lanes wait for its export."""
    videos = [job for job in diff.jobs if is_video_path(job.file.path)]
    jobs = [job for job in diff.jobs if not is_video_path(job.file.path)] if videos else diff.jobs
    total = len(diff.jobs)
    known_hashes = diff.hash_lookup(library)
    lanes = plan.model_lanes
    in_flight: deque[tuple[list[_Prepared], list[Future[dict[int, np.ndarray]]]]] = deque()
    committed = 0

    def submit(model_pool: ThreadPoolExecutor, ready: list[_Prepared]) -> None:
        parts = _split(ready, lanes if plan.split_batches else 1)
        in_flight.append((ready, [model_pool.submit(_embed_when_ready, first_export, library, part) for part in parts]))

    def commit_down_to(limit: int) -> None:
        nonlocal committed
        while len(in_flight) > limit:
            ready, embedded = in_flight.popleft()
            vectors: dict[int, np.ndarray] = {}
            for part in embedded:
                vectors.update(part.result())
            _commit(library, writer, ready, vectors, diff.vanished, diff.vanished_by_id, report)
            committed += len(ready)
            if progress:
                progress("commit", committed, total)

    batch: list[_Prepared] = []
    done = 0
    ahead = batch_size + 2 * plan.decode_workers  # decoded while the lanes embed: enough for the next batch

    def files_ahead() -> int:  # while a first export runs, the decoders use the cores it leaves
        exporting = first_export is not None and first_export.exporting
        return ahead + min(EXPORT_AHEAD_BATCHES * batch_size, EXPORT_AHEAD_FILES) if exporting else ahead
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="clipdex-model") as model_pool:
        try:
            preparer = first_export or library.encoder
            for prepared in _prepare_all(preparer, jobs, known_hashes, plan.decode_workers, files_ahead, first_export):
                done += 1
                if prepared.error is not None:
                    report.failed.append(Failure(prepared.job.file.path, prepared.error))
                else:
                    batch.append(prepared)
                if len(batch) >= batch_size:
                    submit(model_pool, batch)
                    batch = []
                    commit_down_to(lanes - 1)
                if progress:
                    progress("embed", done, total)
                if stop is not None and stop.is_set():  # checked per file: a run of failing files cannot hold it up
                    report.interrupted = True
                    break
            if batch:
                submit(model_pool, batch)
            commit_down_to(0)
            if videos and not report.interrupted:
                done = _run_videos(library, writer, diff, report, videos, known_hashes, plan, model_pool, progress,
                                   stop, first_export, done, total)
        finally:
            for _, embedded in in_flight:  # an error ended the run: do not embed what will not be committed
                for part in embedded:
                    part.cancel()
    if progress:
        progress("embed", done, total)


def _run_videos(library: Library, writer: Any, diff: ScanDiff, report: IndexReport, videos: list[_Job],
                hashes: _HashLookup, plan: ThreadPlan, model_pool: ThreadPoolExecutor, progress: ProgressReporter | None,
                stop: threading.Event | None, first_export: FirstExport | None, done: int, total: int) -> int:
    """The videos, after the images: sampled on the decode threads (two ahead, so memory holds two
    videos' moments), each one's moments embedded across the model lanes, committed one video at a time."""
    if first_export is not None:
        first_export.wait()  # the moments are prepared and embedded by the model the run ends with
    lanes = plan.model_lanes

    def embed(prepared: _Prepared) -> dict[int, np.ndarray]:
        if prepared.pixels is None:
            return {}
        rows = prepared.pixels
        parts = [part for part in np.array_split(rows, min(lanes, len(rows))) if len(part)]
        futures = [model_pool.submit(_embed_rows, library, part) for part in parts]
        prepared.pixels = None
        return {id(prepared): np.concatenate([future.result() for future in futures])}

    for prepared in _prepare_all(library.encoder, videos, hashes, min(2, plan.decode_workers), lambda: 2):
        done += 1
        if prepared.error is not None:
            report.failed.append(Failure(prepared.job.file.path, prepared.error))
        else:
            _commit(library, writer, [prepared], embed(prepared), diff.vanished, diff.vanished_by_id, report)
        if progress:
            progress("embed", done, total)
            progress("commit", done, total)
        if stop is not None and stop.is_set():
            report.interrupted = True
            break
    return done


def _embed_rows(library: Library, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([library.encoder.encode_prepared(rows[start:start + VIDEO_BATCH])
                           for start in range(0, len(rows), VIDEO_BATCH)])


def _split(batch: list[_Prepared], parts: int) -> list[list[_Prepared]]:
    """`batch` in at most `parts` consecutive parts of near-equal size (none empty)."""
    size, extra = divmod(len(batch), max(1, parts))
    pieces, start = [], 0
    for index in range(max(1, parts)):
        end = start + size + (1 if index < extra else 0)
        if end > start:
            pieces.append(batch[start:end])
        start = end
    return pieces or [batch]


def _embed_when_ready(first_export: FirstExport | None, library: Library, batch: list[_Prepared]) -> dict[int, np.ndarray]:
    if first_export is not None:
        first_export.wait()
        for prepared in batch:
            if prepared.pixels is not None and first_export.prepared_wrongly(prepared.pixels):
                _prepare_again(prepared, first_export)
    return _embed(library, batch)


def _prepare_in_turn(first_export: FirstExport | None, job: _Job, preparer: ImagePreparer, hashes: _HashLookup) -> _Prepared:
    if first_export is None:
        return _prepare(job, preparer, hashes)
    with first_export.decoding_turn():
        return _prepare(job, preparer, hashes)


def _prepare_all(preparer: ImagePreparer, jobs: list[_Job], hashes: _HashLookup, workers: int,
                 ahead: Callable[[], int], first_export: FirstExport | None = None) -> Iterator[_Prepared]:
    """Read, hash and (when no stored vector fits) decode files in parallel, in order.

    At most `ahead()` files are in flight (being read or decoded, or done and waiting), so
    memory does not grow with the corpus. `ahead()` spans more than a batch: while the
    caller embeds one batch, the workers decode the next.
    """
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipdex-decode") as pool:
        pending: deque[Future[_Prepared]] = deque()
        job_iter = iter(jobs)
        try:
            for job in job_iter:
                pending.append(pool.submit(_prepare_in_turn, first_export, job, preparer, hashes))
                while len(pending) >= ahead():
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
