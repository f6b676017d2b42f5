"""clipdex: cross-modal semantic search for photos and texts.

    from clipdex import open_library
    library = open_library("~/.local/share/clipdex/library")
    hits = library.search(text="a dog on the beach", k=5)

This folder is installed as the `clipdex` package itself (pyproject.toml's
`package-dir`); its parts are `clipdex.search` (the library and the on-disk format,
folder `search/`), `clipdex.indexer` (`indexer/`) and `clipdex.cli` (`cli/`).
The names below load on first use, so `import clipdex.cli` stays cheap; the README's
"Python API" is their reference. The package ships `py.typed`: type checkers read its hints.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipdex.search import (
        DEFAULT_MODEL,
        DEFAULT_PRETRAINED,
        AddressUnavailable,
        CatalogUnavailable,
        ClipdexError,
        ClusterError,
        CorruptLibrary,
        DamagedVectors,
        Explanation,
        FileUnavailable,
        Filters,
        GpuUnavailable,
        Hit,
        ImageTooLarge,
        InvalidItems,
        InvalidQuery,
        InvalidVectors,
        ItemNotFound,
        Library,
        LibraryBusy,
        LibraryClosed,
        LibraryNotFound,
        MemoryBudgetError,
        MissingDependency,
        ModelMismatch,
        ModelSpec,
        ModelUnavailable,
        Query,
        ReadOnlyLibrary,
        Term,
        TextExportRefused,
        UnreadableCorpus,
        UnreadableFile,
        UnreadableImage,
        UnreadableVideo,
        open_library,
    )
    from clipdex.indexer import IndexProgress, IndexReport, WatchBatch, WatchOptions, index_paths, watch_paths

# A literal list, so that type checkers see these names as exported (mypy --strict: no implicit re-export).
__all__ = [
    "AddressUnavailable", "CatalogUnavailable", "ClipdexError", "ClusterError", "CorruptLibrary",
    "DEFAULT_MODEL", "DEFAULT_PRETRAINED", "DamagedVectors", "Explanation", "FileUnavailable", "Filters", "GpuUnavailable",
    "Hit", "ImageTooLarge", "IndexProgress", "IndexReport", "InvalidItems", "InvalidQuery", "InvalidVectors",
    "ItemNotFound", "Library", "LibraryBusy", "LibraryClosed", "LibraryNotFound", "MemoryBudgetError",
    "MissingDependency", "ModelMismatch", "ModelSpec", "ModelUnavailable", "Query", "ReadOnlyLibrary", "Term",
    "TextExportRefused", "UnreadableCorpus", "UnreadableFile", "UnreadableImage", "UnreadableVideo",
    "index_paths", "open_library",
    "WatchBatch", "WatchOptions", "watch_paths",
]
_FROM_INDEXER = ("IndexProgress", "IndexReport", "index_paths", "WatchBatch", "WatchOptions", "watch_paths")
_FROM_SEARCH = tuple(name for name in __all__ if name not in _FROM_INDEXER)


def __getattr__(name: str) -> Any:
    if name in _FROM_SEARCH:
        return getattr(importlib.import_module("clipdex.search"), name)
    if name in _FROM_INDEXER:
        return getattr(importlib.import_module("clipdex.indexer"), name)
    raise AttributeError(f"module 'clipdex' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (loaded on first use) and the parts imported so far, for `dir(clipdex)` and completion."""
    return sorted(set(__all__) | {name for name in ("search", "indexer", "cli") if name in globals()})
