"""`clipdex serve`: the HTTP API and web page over a library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import DeviceOption, LibraryOption, RuntimeOption, err, handles_errors, open_library
from clipdex.search.errors import ClipdexError

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
        shown_host = f"[{host.strip('[]')}]" if ":" in host else host
        bound_port = listener.getsockname()[1]
        err.print(f"Serving {lib.path} on http://{shown_host}:{bound_port}/" + (" (token required)" if token else ""))
        run_server(app, listener)
    finally:
        listener.close()
