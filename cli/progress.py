"""Progress on stderr (rate and ETA), and a Ctrl-C that stops once the batches in flight are committed."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import typer

from clipdex.cli.common import controls_escaped, discard_new_library_on_error, err
from clipdex.search.library import Library


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield a `callback(done, total)` drawing a bar with files done, rate and ETA on stderr."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err.real, transient=False, refresh_per_second=4) as progress:
        task = progress.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            speed = progress.tasks[task].speed
            progress.update(task, completed=done, total=total, rate=f"{speed:6.1f} files/s" if speed else "")

        yield update


@contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the event (stop after this batch); a second one ends the process at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(_signum: int, _frame: object) -> None:
        if stop.is_set():
            # At once, like a kill: a thread stuck in a read (a hung network drive) would hold up
            # any unwinding. Commits are atomic and the write lock is released with the process.
            err.print("Aborted: everything committed so far is kept. Run the same command again to resume.")
            sys.stderr.flush()
            os._exit(130)
        stop.set()
        err.print("Stopping once the batches in flight are committed (Ctrl-C again to abort)...")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def indexing_run(lib: Library, description: str, quiet: bool) -> Iterator[tuple[threading.Event, Callable[[int, int], None]]]:
    """What every indexing command wraps its run in: Ctrl-C handling, a progress bar, and the
    removal of a library this command created if the run fails before adding anything."""
    with ExitStack() as stack:
        stack.enter_context(discard_new_library_on_error(lib))
        stop = stack.enter_context(stop_on_interrupt())
        progress = stack.enter_context(progress_bar(description, enabled=not quiet))
        yield stop, progress


def finish_run(report: Any, strict: bool) -> None:
    """Print failures, then exit 130 when interrupted, 1 with --strict and failures."""
    for failure in report.failed:
        err.print(controls_escaped(f"failed: {failure.path}: {failure.error}"), markup=False)
    if report.interrupted:
        err.print("Interrupted: everything committed so far is kept. Run the same command again to resume.")
        raise typer.Exit(130)
    if strict and report.failed:
        raise typer.Exit(1)
