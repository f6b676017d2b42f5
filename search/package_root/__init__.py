"""clipdex: cross-modal semantic search for photos and texts.

    from clipdex import open_library
    library = open_library("~/.local/share/clipdex/library")
    hits = library.search(text="a dog on the beach", k=5)

This folder is installed as the `clipdex` package itself (pyproject.toml's
`package-dir`); its parts are `clipdex.search` (the library and the on-disk format,
folder `search/`), `clipdex.indexer` (`indexer/`) and `clipdex.cli` (`cli/`).
The names below load on first use, so `import clipdex.cli` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipdex.search import (
        DEFAULT_MODEL,
        DEFAULT_PRETRAINED,
        ClipdexError,
        CorruptLibrary,
        Filters,
        Hit,
        InvalidQuery,
        ItemNotFound,
        Library,
        LibraryBusy,
        LibraryNotFound,
        ModelMismatch,
        ModelSpec,
        ModelUnavailable,
        Query,
        Term,
        UnreadableCorpus,
        UnreadableImage,
        open_library,
    )
    from clipdex.indexer import IndexReport, index_paths

_FROM_SEARCH = (
    "ClipdexError", "CorruptLibrary", "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "Filters", "Hit", "InvalidQuery",
    "ItemNotFound", "Library", "LibraryBusy", "LibraryNotFound", "ModelMismatch", "ModelSpec", "ModelUnavailable",
    "Query", "Term", "UnreadableCorpus", "UnreadableImage", "open_library",
)
_FROM_INDEXER = ("IndexReport", "index_paths")

__all__ = sorted(_FROM_SEARCH + _FROM_INDEXER)


def __getattr__(name: str) -> Any:
    if name in _FROM_SEARCH:
        return getattr(importlib.import_module("clipdex.search"), name)
    if name in _FROM_INDEXER:
        return getattr(importlib.import_module("clipdex.indexer"), name)
    raise AttributeError(f"module 'clipdex' has no attribute {name!r}")
