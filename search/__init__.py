"""clipdex search library: everything needed to answer a query, and the on-disk format.

    from clipdex.search import open_library
    library = open_library("~/.local/share/clipdex/library")
    hits = library.search(text="a dog on the beach", k=5)

The README's "Python API" is the reference for the names exported here.
"""

from clipdex.search.errors import (
    AddressUnavailable,
    CatalogUnavailable,
    ClipdexError,
    ClusterError,
    CorruptLibrary,
    DamagedVectors,
    FileUnavailable,
    GpuUnavailable,
    ImageTooLarge,
    InvalidItems,
    InvalidQuery,
    InvalidVectors,
    ItemNotFound,
    LibraryBusy,
    LibraryClosed,
    LibraryNotFound,
    MemoryBudgetError,
    MissingDependency,
    ModelMismatch,
    ModelUnavailable,
    ReadOnlyLibrary,
    TextExportRefused,
    UnreadableCorpus,
    UnreadableFile,
    UnreadableImage,
    UnreadableVideo,
)
from clipdex.search.library import Library, open_library
from clipdex.search.encoders.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec
from clipdex.search.explanation import Explanation
from clipdex.search.query import Filters, Hit, Query, Term

__all__ = [
    "AddressUnavailable",
    "CatalogUnavailable",
    "ClipdexError",
    "ClusterError",
    "CorruptLibrary",
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "DamagedVectors",
    "Explanation",
    "FileUnavailable",
    "Filters",
    "GpuUnavailable",
    "Hit",
    "ImageTooLarge",
    "InvalidItems",
    "InvalidQuery",
    "InvalidVectors",
    "ItemNotFound",
    "Library",
    "LibraryBusy",
    "LibraryClosed",
    "LibraryNotFound",
    "MemoryBudgetError",
    "MissingDependency",
    "ModelMismatch",
    "ModelSpec",
    "ModelUnavailable",
    "Query",
    "ReadOnlyLibrary",
    "Term",
    "TextExportRefused",
    "UnreadableCorpus",
    "UnreadableFile",
    "UnreadableImage",
    "UnreadableVideo",
    "open_library",
]
