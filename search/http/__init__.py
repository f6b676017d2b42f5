"""The HTTP backend: a FastAPI app over one library, and its web page.

    from clipdex.search.http import create_app
    app = create_app("~/.local/share/clipdex/library", token="s3cret")  # mount it, or:
    # or: run_server(app, open_listener("127.0.0.1", 8000))
"""

from clipdex.search.http.app import DEFAULT_MAX_UPLOAD_BYTES, create_app
from clipdex.search.http.connections import ConnectionLimits
from clipdex.search.http.server import (
    LOOPBACK_HOSTS,
    AddressUnavailable,
    is_loopback,
    open_listener,
    run_server,
    serve_in_thread,
)

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES", "LOOPBACK_HOSTS", "AddressUnavailable", "ConnectionLimits", "create_app", "is_loopback", "open_listener",
    "run_server", "serve_in_thread",
]
