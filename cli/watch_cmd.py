"""`clipdex watch`: keep a library current with its folders until stopped."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import (
    CatalogOption,
    DeviceOption,
    JsonOption,
    LibraryOption,
    ModelOption,
    PretrainedOption,
    RuntimeOption,
    discard_new_library_on_error,
    err,
    escape,
    handles_errors,
    open_library,
)
from clipdex.cli.progress import stop_on_interrupt
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB

if TYPE_CHECKING:  # the indexer loads when the command runs
    from clipdex.indexer.watch import WatchBatch


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)


SettleOption = typer.Option(1.0, "--settle", min=0.0, help="Seconds a file's size and mtime must stay the same before it is read")


@handles_errors
def watch(
    paths: List[Path] = typer.Argument(..., metavar="PATH...", help="Folders to index and then follow (recursively)"),
    library: Optional[Path] = LibraryOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    catalog: Optional[str] = CatalogOption,
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096, help="Images per model batch and commit"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decode threads [default: one per core]"),
    exclude: List[str] = typer.Option([], "--exclude", help="Skip files and folders matching this glob (repeatable)"),
    include_hidden: bool = typer.Option(False, "--include-hidden", help="Also index hidden files and folders"),
    prune_empty_roots: bool = typer.Option(
        False, "--prune-empty-roots", help="Remove the items of a folder that has no images left (kept by default: it may be an unmounted drive)"
    ),
    max_file_mb: int = typer.Option(DEFAULT_MAX_FILE_MB, "--max-file-mb", min=1, help="Report larger files as failed instead of reading them"),
    texts: List[Path] = typer.Option([], "--texts", metavar="FILE", help="A texts file (.txt, .csv, .tsv, .jsonl) indexed again whenever it changes (repeatable)"),
    column: Optional[str] = typer.Option(None, "--column", help="With --texts: the text column of .csv/.tsv/.jsonl [default: text]"),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="With --texts: a column holding each text's stable id"),
    settle: float = SettleOption,
    poll: Optional[float] = typer.Option(
        None, "--poll", metavar="SECONDS", min=0.05, show_default=False,
        help="Look for changes every SECONDS instead of using the system's notifications (network drives: chosen by itself there)",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON event per batch on stdout"),
) -> None:
    """Index folders, then keep the library current as files are added, changed, moved or deleted (Ctrl-C stops)."""
    from clipdex.indexer.watch import WatchOptions, watch_paths

    options = WatchOptions(exclude=exclude, include_hidden=include_hidden, batch_size=batch_size, workers=workers,
                           max_file_mb=max_file_mb, prune_empty_roots=prune_empty_roots, texts=texts,
                           text_column=column, text_id_column=id_column, settle_seconds=settle, poll_seconds=poll)
    lib = open_library(library, model, pretrained, device, create=True, catalog=catalog, runtime=runtime)
    shown = ", ".join(str(path) for path in paths)
    err.print(f"Watching {escape(shown)} into {escape(str(lib.path))}: catching up first (Ctrl-C stops)")

    def on_batch(batch: "WatchBatch") -> None:
        if json_output:
            sys.stdout.write(json.dumps(batch.to_json()) + "\n")
            sys.stdout.flush()
        err.print(escape(batch_line(batch)))
        for failure in batch.failed[:20]:
            err.print(f"  failed: {escape(failure.path)}: {escape(failure.error)}")
        if len(batch.failed) > 20:
            err.print(f"  ... and {len(batch.failed) - 20} more failed")

    def on_notice(line: str) -> None:
        err.print(escape(line))

    with discard_new_library_on_error(lib), stop_on_interrupt() as stop, stop_on_terminate(stop):
        watch_paths(lib, paths, options, on_batch=on_batch, on_notice=on_notice, stop=stop)
    err.print("Stopped: everything indexed so far is kept.")


def batch_line(batch: "WatchBatch") -> str:
    """One line for a batch, on stderr: what it did, how fast, what still waits."""
    what = "caught up" if batch.catch_up else "batch"
    parts = [f"{batch.added} added", f"{batch.updated} updated", f"{batch.moved} moved", f"{batch.removed} removed"]
    if batch.texts_added or batch.texts_updated or batch.texts_removed:
        parts.append(f"texts {batch.texts_added} added, {batch.texts_updated} updated, {batch.texts_removed} removed")
    if batch.failed:
        parts.append(f"{len(batch.failed)} failed")
    line = f"{time.strftime('%H:%M:%S')} {what}: {', '.join(parts)} ({batch.seconds:.1f}s"
    line += f", {batch.rate:.1f} files/s)" if batch.files else ")"
    if batch.pending:
        line += f"; {batch.pending} waiting to settle"
    return line


@contextmanager
def stop_on_terminate(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (a service manager stopping the watcher) stops after the batch in flight, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
