"""Running an index run's jobs on a Ray cluster: the workers read, decode and embed, the driver commits.

The driver (this process) keeps everything that makes a run correct: the write lock, the
scan and its diff against the catalog (`clipdex.indexer.rules`), the reuse of stored
vectors for moved, copied and touched files, the commits in order, the report and Ctrl-C.
Only the jobs (new and changed files) go to the cluster, as a Ray Data pipeline whose
actors run the same per-file rule as the local runner (`rules._prepare`: read, hash, and
decode unless the bytes are known) and embed with the library's model; vectors and
metadata stream back in the jobs' order and are committed batch by batch with
`rules._commit`. Workers read the files at the paths the driver scanned: the files must be
on a filesystem every node mounts at the same path (checked before the run starts).

Which stored item holds some bytes is decided on the driver, from the catalog, when a
batch is committed. The workers only know the hashes of the files that vanished (likely
moves) and of each job's own previous version (a touched file), and skip decoding those;
a copy of a file indexed elsewhere is embedded by a worker and its vector then dropped
for the stored one, as the local runner would have reused it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.rules import (
    ScanDiff,
    _commit,
    _decode_into,
    _HashLookup,
    _Job,
    _prepare,
    _Prepared,
    _read_file,
    embed_with,
)
from clipdex.indexer.scan import ScannedFile
from clipdex.search.catalog.types import FileRecord
from clipdex.search.errors import ClipdexError, ClusterError, UnreadableFile
from clipdex.search.library import Library
from clipdex.search.media.video import is_video_path
from clipdex.search.ray_cluster import check_paths_visible, cluster_cpus, cluster_gpus, ray_session

ProgressCallback = Callable[[int, int], None]  # (done, total) of the embed phase
KNOWN_ELSEWHERE = -1  # what a worker's hash lookup answers for bytes the driver will find a stored vector for


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how an index run uses a Ray cluster."""

    address: str  # auto, local, ray://host:port or host:port (see `clipdex.search.ray_cluster`)
    gpus_per_worker: float = 0.0  # > 0: each embedding actor takes this share of a GPU and runs the model in CUDA
    cpus_per_worker: float = 1.0  # CPUs each actor reserves; the model runs on as many torch threads
    workers: int | None = None  # embedding actors; None: as many as the cluster's CPUs (or GPUs) allow


def run_jobs_on_cluster(
    library: Library,
    writer: Any,
    diff: ScanDiff,
    report: IndexReport,
    batch_size: int,
    options: ClusterOptions,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Embed the jobs of `diff` on the cluster at `options.address`, committing batches in order with `writer`."""
    if library.model.weights == "random weights":
        raise ClusterError(
            f"library {library.path} has a model with random weights (--pretrained none): each Ray worker would draw "
            "weights of its own; index it without --ray, or make a library whose weights are in a checkpoint file"
        )
    videos = [job for job in diff.jobs if is_video_path(job.file.path)]
    if videos:  # a video's moments are many vectors: the cluster's pipeline carries one per file
        report.failed += [Failure(job.file.path, "videos are not indexed on a Ray cluster yet: index them without --ray")
                          for job in videos]
        diff.jobs = [job for job in diff.jobs if not is_video_path(job.file.path)]
        if not diff.jobs:
            return
    with ray_session(options.address) as ray:
        check_paths_visible(ray, _paths_workers_read(library, diff))
        rows = _embedded_rows(ray, library, diff, batch_size, options)
        _commit_in_order(library, writer, diff, report, batch_size, rows, progress, stop)


def _paths_workers_read(library: Library, diff: ScanDiff) -> list[str]:
    """The folders of the jobs' files (and the model's checkpoint): each node must see them all."""
    folders = sorted({os.path.dirname(job.file.path) for job in diff.jobs})
    checkpoint = library.model.checkpoint
    return folders + ([checkpoint] if checkpoint else [])


def _commit_in_order(
    library: Library,
    writer: Any,
    diff: ScanDiff,
    report: IndexReport,
    batch_size: int,
    rows: Iterator[tuple[int, dict[str, Any], np.ndarray | None]],
    progress: ProgressCallback | None,
    stop: threading.Event | None,
) -> None:
    hashes = diff.hash_lookup(library)
    batch: list[_Prepared] = []
    vectors: dict[int, np.ndarray] = {}
    done = 0
    try:
        for position, info, vector in rows:
            prepared = _received(library, diff.jobs[position], info, vector is not None, hashes)
            done += 1
            if prepared.error is not None:
                report.failed.append(Failure(prepared.job.file.path, prepared.error))
            else:
                batch.append(prepared)
                if vector is not None and prepared.reuse_id is None:
                    vectors[id(prepared)] = vector
            if len(batch) >= batch_size:
                _commit(library, writer, batch, vectors, diff.vanished, diff.vanished_by_id, report)
                batch, vectors = [], {}
            if progress:
                progress(done, len(diff.jobs))
            if stop is not None and stop.is_set():
                report.interrupted = True
                break
        if batch:
            _commit(library, writer, batch, vectors, diff.vanished, diff.vanished_by_id, report)
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops the pipeline when the run ends early
    if progress:
        progress(done, len(diff.jobs))


def _received(library: Library, job: _Job, info: dict[str, Any], embedded: bool, hashes: _HashLookup) -> _Prepared:
    """A worker's result for `job` as the local runner's `_Prepared`, its reuse decided here from the catalog."""
    identity = info.get("identity")
    prepared = _Prepared(job, content_hash=info.get("content_hash"), metadata=info.get("metadata") or {},
                         error=info.get("error"), identity=(int(identity[0]), int(identity[1])) if identity else None)
    if prepared.error is not None or prepared.content_hash is None:
        return prepared
    if job.record is not None and job.record.content_hash == prepared.content_hash:
        prepared.reuse_id = job.record.id  # touched, not changed
        return prepared
    prepared.reuse_id = hashes.find(prepared.content_hash)
    if prepared.reuse_id is None and not embedded:
        # the worker expected a stored vector that is gone: decode here (rare), `_commit` embeds it
        try:
            data, prepared.identity = _read_file(job.file.path, job.file.size)
        except UnreadableFile as error:
            prepared.error = error.reason
            return prepared
        except OSError as error:
            prepared.error = f"cannot read: {error.strerror or error}"
            return prepared
        _decode_into(prepared, data, library.encoder)
    return prepared


# -- the pipeline on the cluster -----------------------------------------------------------


def _embedded_rows(ray: Any, library: Library, diff: ScanDiff, batch_size: int,
                   options: ClusterOptions) -> Iterator[tuple[int, dict[str, Any], np.ndarray | None]]:
    """(position in diff.jobs, the worker's report, the vector or None) for each job, in the jobs' order."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # commits follow the scan's order, as locally
    actors = options.workers or _actor_count(ray, options)
    actors = max(1, min(actors, -(-len(diff.jobs) // batch_size)))  # no idle actors for a small run
    jobs = [
        {"position": position, "path": job.file.path, "size": job.file.size, "mtime_ns": job.file.mtime_ns,
         "record_id": job.record.id if job.record else -1,
         "record_hash": (job.record.content_hash or "") if job.record else ""}
        for position, job in enumerate(diff.jobs)
    ]
    known = sorted({record.content_hash for record in diff.vanished.values() if record.content_hash})
    blocks = max(1, min(len(jobs), -(-len(jobs) // batch_size)))  # blocks of at most batch_size jobs
    dataset = ray.data.from_items(jobs, override_num_blocks=blocks).map_batches(
        EmbedFiles,
        batch_size=None,  # a block at a time: a batch_size would bundle small blocks into long tasks that return in bursts
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),  # one actor per CPU (or GPU share) of the cluster
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker or None,
        fn_constructor_kwargs={
            "model": library.model.to_json(),
            "device": "cuda" if options.gpus_per_worker else "cpu",
            "threads": max(1, int(options.cpus_per_worker)),
            "known_hashes": known,
        },
    )
    return _stream(dataset, batch_size)


def _actor_count(ray: Any, options: ClusterOptions) -> int:
    if options.gpus_per_worker:
        gpus = cluster_gpus(ray)
        if gpus == 0:
            raise ClusterError("--ray-gpus-per-worker was given, but the Ray cluster has no GPUs")
        return max(1, int(gpus / options.gpus_per_worker))
    return max(1, int(cluster_cpus(ray) / max(options.cpus_per_worker, 0.01)))


def _stream(dataset: Any, batch_size: int) -> Iterator[tuple[int, dict[str, Any], np.ndarray | None]]:
    try:
        for rows in dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
            for position, info, vector, embedded in zip(rows["position"], rows["info"], rows["vector"], rows["embedded"]):
                yield int(position), json.loads(str(info)), (np.asarray(vector, dtype=np.float32) if embedded else None)
    except (ClipdexError, KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as error:  # a worker died, or its model could not load: one line, what was committed is kept
        raise ClusterError(f"the Ray pipeline failed: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    cause: BaseException = error
    while getattr(cause, "cause", None) is not None and cause is not getattr(cause, "cause"):
        cause = getattr(cause, "cause")
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else type(cause).__name__)
    return message[:300]


class _KnownHashes:
    """A worker's stand-in for `_HashLookup`: the driver will find a stored vector for these bytes."""

    def __init__(self, hashes: list[str]) -> None:
        self.hashes = set(hashes)

    def find(self, content_hash: str) -> int | None:
        return KNOWN_ELSEWHERE if content_hash in self.hashes else None


class EmbedFiles:
    """A Ray Data actor: reads, hashes, decodes and embeds a batch of jobs, as `rules._prepare` and the model do locally."""

    def __init__(self, model: dict[str, Any], device: str, threads: int, known_hashes: list[str]) -> None:
        from clipdex.search.encoders.factory import create_encoder
        from clipdex.search.encoders.model import ResolvedModel

        self.encoder = create_encoder(ResolvedModel.from_json(model), device)
        self.encoder.load()
        self.encoder.set_threads(threads)
        self.known = _KnownHashes(known_hashes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = [_prepare(_job_of(batch, row), self.encoder, self.known) for row in range(len(batch["position"]))]  # type: ignore[arg-type]
        vectors = np.zeros((len(prepared), self.encoder.dim), dtype=np.float32)
        by_id = embed_with(self.encoder, prepared)  # on a GPU actor, JPEGs decode on the GPU as locally
        decoded = [row for row, item in enumerate(prepared) if id(item) in by_id]
        for row in decoded:
            vectors[row] = by_id[id(prepared[row])]
        infos = [json.dumps({"content_hash": item.content_hash, "identity": item.identity, "error": item.error,
                             "metadata": item.metadata}) for item in prepared]
        embedded = np.zeros(len(prepared), dtype=bool)
        embedded[decoded] = True
        return {"position": batch["position"], "info": np.array(infos, dtype=object), "vector": vectors, "embedded": embedded}


def _job_of(batch: dict[str, np.ndarray], row: int) -> _Job:
    path = str(batch["path"][row])
    record_id = int(batch["record_id"][row])
    record = None
    if record_id >= 0:
        record = FileRecord(record_id, path, -1, -1, str(batch["record_hash"][row]) or None)
    return _Job(ScannedFile(path, int(batch["size"][row]), int(batch["mtime_ns"][row])), record)
