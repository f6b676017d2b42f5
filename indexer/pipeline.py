"""The indexing pipeline: scan, diff against the catalog, decode in parallel, embed, commit.

A run commits one batch at a time; SQLite commits are the unit of durability, so a
killed run loses at most the batches in flight (one per model lane) and a re-run picks
up where it stopped.
Nothing here loads the model (or imports torch) unless some file must be embedded.

`index_paths` composes the parts: the rules (`clipdex.indexer.rules`: the diff, when a
stored vector is reused, what a batch commits) run by the local mechanics
(`clipdex.indexer.local`: decode threads, model lanes, commits in order).
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Sequence

from clipdex.indexer.local import run_jobs
from clipdex.indexer.ocr_pass import enable_ocr, ocr_enabled, read_texts
from clipdex.indexer.progress import ProgressCallback, ProgressReporter
from clipdex.indexer.report import Failure, IndexReport
from clipdex.indexer.rules import diff_scan, remove_vanished
from clipdex.indexer.scan import scan
from clipdex.search.library import Library
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, max_file_bytes

if TYPE_CHECKING:
    from clipdex.indexer.cluster import ClusterOptions


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
    cluster: "ClusterOptions | None" = None,
    ocr: bool = False,
) -> IndexReport:
    """Index the images under `paths` into `library`; see IndexReport for what it reports.

    `progress`: told each phase (scan, export, embed, commit) with its counts, as an
    `IndexProgress` (`clipdex.indexer.progress`; a callable of `(done, total)` gets the embed phase's).
    `stop`: when set (by a Ctrl-C handler, say), the run ends once the batches in flight are committed.
    `prune_empty_roots`: a root folder with no images at all normally keeps its indexed
    items (an unmounted drive looks just like that); with this, they are removed.
    `export_text`: when the run loaded the model, also store its text tower in the library
    (once; `clipdex.search.encoders.text_export`) so that later text queries need neither torch nor open_clip.
    `max_file_mb`: larger files are reported as failed, never read (`clipdex.search.media.safe_read`).
    `cluster`: decode and embed on a Ray cluster (`clipdex.indexer.cluster`); all else stays here.
    `ocr`: also read the text in the images, in a pass of its own after the embedding
    (`clipdex.indexer.ocr_pass`), and record that in the library, so that later runs do too.
    """
    started = time.monotonic()
    report = IndexReport()
    tell = ProgressReporter(progress)
    # The diff and the commits happen under the write lock: another run cannot slip in between.
    with library.writer() as writer:
        if cluster is None and not any(library.catalog.counts().values()):
            # a first run embeds whatever the scan finds, and a scan may take minutes: the weights first
            library.encoders.ensure_weights()
        tell("scan", 0, None)
        result = scan(paths, exclude=exclude, include_hidden=include_hidden, skip_dirs=[str(library.path)],
                      max_file_bytes=max_file_bytes(max_file_mb))
        tell("scan", len(result.files), len(result.files))
        diff = diff_scan(library, result, prune_empty_roots)
        report.failed += diff.failures
        report.unchanged = diff.unchanged
        if diff.jobs and cluster is not None:
            from clipdex.indexer.cluster import run_jobs_on_cluster

            run_jobs_on_cluster(library, writer, diff, report, batch_size, cluster, tell.files("embed"), stop)
        elif diff.jobs:
            run_jobs(library, writer, diff, report, batch_size, workers, tell, stop, export=export_text)
        remove_vanished(writer, diff, report)
    report.model_loaded = library.encoders.model_loaded
    if report.model_loaded and export_text and not report.interrupted and library.encoders.export_due():
        tell("export", 0, None)
        report.export_seconds += library.export_text_encoder()  # a first export before the photos counted already
        tell("export", 1, 1)
    if ocr:
        enable_ocr(library)
    if not report.interrupted and (ocr or ocr_enabled(library)):
        tell("ocr", 0, None)
        report.ocr = read_texts(library, progress=tell.files("ocr"), stop=stop, max_file_mb=max_file_mb)
        report.interrupted = report.ocr.interrupted
        report.failed += [Failure(failure.path, f"OCR: {failure.error}") for failure in report.ocr.failed]
    report.seconds = time.monotonic() - started
    return report
