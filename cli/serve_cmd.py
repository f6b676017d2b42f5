"""`clipdex serve`: the HTTP API and web page over a library."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import DeviceOption, LibraryOption, RuntimeOption, err, escape, handles_errors, open_library
from clipdex.search.errors import ClipdexError
from clipdex.search.library import Library

if TYPE_CHECKING:
    from clipdex.indexer.watch import BackgroundWatch

TOKEN_ENV = "CLIPDEX_TOKEN"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


@handles_errors
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network (then set a token)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on"),
    token: Optional[str] = typer.Option(
        None, "--token", envvar=TOKEN_ENV,
        help="Require 'Authorization: Bearer TOKEN' on every request but /health (prefer the env var: other users can see a command line)",
        show_default=False,
    ),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01, help="Largest image a request may send, in MiB"),
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    watch: List[Path] = typer.Option(
        [], "--watch", metavar="PATH", help="Index this folder in the background and keep following it, as clipdex watch does (repeatable)"),
    settle: float = typer.Option(1.0, "--settle", min=0.0, help="With --watch: seconds a file must stay unchanged before it is read"),
    poll: Optional[float] = typer.Option(None, "--poll", metavar="SECONDS", min=0.05, show_default=False,
                                         help="With --watch: poll every SECONDS instead of using the system's notifications"),
) -> None:
    """Serve the library over HTTP: a JSON API (docs at /docs) and a search page at /."""
    from clipdex.search.http import LOOPBACK_HOSTS, create_app, is_loopback, open_listener, run_server

    if token is not None and not token.strip():
        raise ClipdexError(f"--token (or ${TOKEN_ENV}) is empty; give a token or leave it unset")
    lib = open_library(library, device=device, runtime=runtime)
    listener = open_listener(host.strip("[]"), port)  # a busy port fails here, before anything says "Serving"
    try:
        loopback = is_loopback(host)
        if not loopback and not token:
            err.print(f"[bold yellow]Warning:[/] serving on {host} without a token: anyone who can reach it can search "
                      f"this library and read its images. Set ${TOKEN_ENV} or --token.", markup=True)
        app = create_app(lib, token=token, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                         allowed_hosts=LOOPBACK_HOSTS if loopback else None)
        err.print(f"Loading model {lib.model.name} ({lib.encoders.runtime()})...")
        app.state.service.load_model()
        watching = start_watching(lib, watch, settle, poll, device, runtime, app) if watch else None
        shown_host = f"[{host.strip('[]')}]" if ":" in host else host
        bound_port = listener.getsockname()[1]
        err.print(f"Serving {lib.path} on http://{shown_host}:{bound_port}/" + (" (token required)" if token else ""))
        if watching is not None and threading.current_thread() is threading.main_thread():
            # uvicorn shuts down on SIGTERM, then raises it again: here it ends the command, so
            # that the watcher stops after its batch in flight (below) as it does on Ctrl-C
            signal.signal(signal.SIGTERM, _exit_on_terminate)
        try:
            run_server(app, listener)
        finally:
            if watching is not None:
                err.print("Stopping the watcher once its batch in flight is committed...")
                watching.stop()
    finally:
        listener.close()


def _exit_on_terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def start_watching(lib: Library, paths: List[Path], settle: float, poll: Optional[float], device: str, runtime: str,
                   app: Any) -> "BackgroundWatch":
    """`serve --watch`: the folders indexed and followed on a thread of the server's process; its batches
    on stderr as `clipdex watch` says them, its state at GET /indexing (the page's "indexing N files")."""
    from dataclasses import asdict

    from clipdex.cli.watch_cmd import batch_line
    from clipdex.indexer.watch import BackgroundWatch, WatchOptions
    from clipdex.search.http.indexing import IndexingOut

    options = WatchOptions(settle_seconds=settle, poll_seconds=poll)
    watching = BackgroundWatch(lib.path, paths, options, on_batch=lambda batch: err.print(escape(batch_line(batch))),
                               on_notice=lambda line: err.print(escape(line)), device=device, runtime=runtime).start()
    app.state.indexing = lambda: IndexingOut(enabled=True, **asdict(watching.status()))
    err.print(f"Watching {escape(', '.join(str(path) for path in paths))}: new photos are searchable once indexed")
    return watching
