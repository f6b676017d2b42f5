"""Running the app under uvicorn: in the foreground (`clipdex serve`) or in a background thread,
with the limits of `connections.py` on what a client may cost."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

from clipdex.search.errors import AddressUnavailable
from clipdex.search.http.connections import ConnectionLimits, guarded_protocol, quiet_repeats

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
STARTUP_TIMEOUT_SECONDS = 30.0


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_listener(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to host:port, so that a busy port is known before the server says it serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a just-closed port is free
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if error.errno == errno.EADDRINUSE:
            raise AddressUnavailable(f"port {port} is already in use on {host}: stop the server there "
                                     "or choose another --port") from None
        raise AddressUnavailable(f"cannot listen on {shown}: {error.strerror or error}") from None
    listener.set_inheritable(True)
    return listener


def run_server(app: ASGIApp, listener: socket.socket, log_level: str = "info",
               limits: ConnectionLimits = ConnectionLimits()) -> None:
    """Serve on an `open_listener` socket until interrupted."""
    host, port = listener.getsockname()[:2]
    server = uvicorn.Server(server_config(app, host, port, log_level, limits))
    with quiet_repeats():
        server.run(sockets=[listener])


def server_config(app: ASGIApp, host: str, port: int, log_level: str, limits: ConnectionLimits) -> uvicorn.Config:
    """uvicorn's settings for clipdex: its h11 protocol with `limits` (`connections.py`), no proxy headers."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False, proxy_headers=False,
                          http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive_timeout)


@contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0,
                    limits: ConnectionLimits = ConnectionLimits()) -> Iterator[str]:
    """Serve `app` from a background thread while the block runs; yields its base URL.

    `port=0` takes a free port. For tests, or embedding the server in a Python program.
    """
    server = uvicorn.Server(server_config(app, host, port, "warning", limits))
    thread = threading.Thread(target=server.run, name="clipdex-http", daemon=True)
    with quiet_repeats():
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
            time.sleep(0.02)
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
