"""clipdex search library: everything needed to answer a query, and the on-disk format.

    from clipdex.search import open_library
    library = open_library("~/.local/share/clipdex/library")
    hits = library.search(text="a dog on the beach", k=5)
"""

from clipdex.search.errors import (
    ClipdexError,
    CorruptLibrary,
    InvalidQuery,
    ItemNotFound,
    LibraryBusy,
    LibraryNotFound,
    ModelMismatch,
    ModelUnavailable,
    UnreadableCorpus,
    UnreadableImage,
)
from clipdex.search.library import Library, open_library
from clipdex.search.encoders.model import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec
from clipdex.search.query import Filters, Hit, Query, Term

__all__ = [
    "ClipdexError",
    "CorruptLibrary",
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "Filters",
    "Hit",
    "InvalidQuery",
    "ItemNotFound",
    "Library",
    "LibraryBusy",
    "LibraryNotFound",
    "ModelMismatch",
    "ModelSpec",
    "ModelUnavailable",
    "Query",
    "Term",
    "UnreadableCorpus",
    "UnreadableImage",
    "open_library",
]
