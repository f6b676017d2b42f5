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

from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.rules import ScanDiff, _commit, _embed, _HashLookup, _Job, _prepare, _Prepared
from clipdex.search.cores import available_cores
from clipdex.search.library import Library
from clipdex.search.vectors import faiss_module

ProgressCallback = Callable[[int, int], None]


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
    On a GPU the model needs no cores: the threads read files and JPEG headers (JPEGs
    decode on the GPU, `clipdex.search.gpu_decode`; other files here), and two lanes, each
    with its own decoder and CUDA streams, let one lane decode while the other embeds.
    """

    decode_workers: int
    model_threads: int | None  # torch and FAISS threads per lane; None: leave them as they are
    model_lanes: int = 1  # batches embedded at once


MAX_LANES = 4  # each lane holds a batch and its activations: bound the memory on many-core machines


def plan_threads(device: str, workers: int | None = None) -> ThreadPlan:
    """The plan for an encoder on `device` (auto, cpu or cuda), with `workers` decode threads if given."""
    cores = available_cores()
    if device == "cuda" or (device == "auto" and _nvidia_driver_present()):
        # two lanes, each with its own GPU decoder and streams: one decodes while the other embeds
        return ThreadPlan(workers or cores, None, 2)
    lanes = min(cores, MAX_LANES)
    return ThreadPlan(workers or cores, max(1, cores // lanes), lanes)


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
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Do the jobs of `diff` on this machine's cores (see ThreadPlan), committing batches with `writer`.

    `stop`: when set (checked after each file), the run ends once the batches in flight are committed.
    """
    plan = plan_threads(library.encoders.requested_device, workers)
    with _model_threads(library, plan.model_threads, faiss_too=not library.store.defers_index(len(diff.jobs))):
        _run_jobs(library, writer, diff, report, batch_size, plan, progress, stop)


@contextmanager
def _model_threads(library: Library, count: int | None, faiss_too: bool = True) -> Iterator[None]:
    """Run the model's and (`faiss_too`: the run's commits will use it) FAISS's threads at `count`
    during the block, then as before."""
    if count is None:
        yield
        return
    encoder = library.encoder
    before = encoder.threads
    faiss = faiss_module() if faiss_too else None
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else 0
    encoder.set_threads(count)
    if faiss is not None:
        faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        encoder.set_threads(before)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_before)


def _run_jobs(
    library: Library,
    writer: Any,
    diff: ScanDiff,
    report: IndexReport,
    batch_size: int,
    plan: ThreadPlan,
    progress: ProgressCallback | None,
    stop: threading.Event | None,
) -> None:
    """Prepare the jobs in parallel, embed full batches on the model lanes, commit them in order."""
    jobs = diff.jobs
    known_hashes = diff.hash_lookup(library)
    lanes = plan.model_lanes
    in_flight: deque[tuple[list[_Prepared], Future[dict[int, np.ndarray]]]] = deque()

    def commit_down_to(limit: int) -> None:
        while len(in_flight) > limit:
            ready, embedded = in_flight.popleft()
            _commit(library, writer, ready, embedded.result(), diff.vanished, diff.vanished_by_id, report)

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
