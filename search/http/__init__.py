"""The HTTP backend: a FastAPI app over one library, and its web page.

    from clipdex.search.http import create_app
    app = create_app("~/.local/share/clipdex/library", token="s3cret")  # mount it, or:
    # or: run_server(app, open_listener("127.0.0.1", 8000))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
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

# Loaded on first use (PEP 562): `clipdex search --preview` and `clipdex browse` use this
# room's thumbnail cache (`media.py`) without importing FastAPI (a quarter of a second).
_MODULE_OF = {
    "DEFAULT_MAX_UPLOAD_BYTES": "app", "create_app": "app", "ConnectionLimits": "connections",
    "LOOPBACK_HOSTS": "server", "AddressUnavailable": "server", "is_loopback": "server", "open_listener": "server",
    "run_server": "server", "serve_in_thread": "server",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES", "LOOPBACK_HOSTS", "AddressUnavailable", "ConnectionLimits", "create_app", "is_loopback", "open_listener",
    "run_server", "serve_in_thread",
]
