"""Where a library lives when the user does not say."""

from __future__ import annotations

import os
import sys
from pathlib import Path

LIBRARY_ENV = "CLIPDEX_LIBRARY"
CACHE_ENV = "CLIPDEX_CACHE_DIR"


def user_data_dir() -> Path:
    """The per-user data directory for clipdex (XDG on Linux, the platform's own elsewhere)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "clipdex"


def user_cache_dir() -> Path:
    """`$CLIPDEX_CACHE_DIR` if set, else the per-user cache directory for clipdex (XDG on
    Linux, the platform's own elsewhere): what can be made again, such as the export cache."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "clipdex" / "Cache"
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "clipdex"


def default_library_path() -> Path:
    """`$CLIPDEX_LIBRARY` if set, else `<user data dir>/library`."""
    configured = os.environ.get(LIBRARY_ENV)
    if configured:
        return Path(configured).expanduser()
    return user_data_dir() / "library"


def resolve_library_path(path: str | os.PathLike[str] | None) -> Path:
    return Path(path).expanduser() if path else default_library_path()
