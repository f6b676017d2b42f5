"""Domain exceptions: each one says what went wrong and, where it can, what to do."""

from __future__ import annotations


class ClipdexError(Exception):
    """Base class for errors a user can act on; the CLI prints them without a traceback."""


class LibraryNotFound(ClipdexError):
    def __init__(self, path: object) -> None:
        super().__init__(
            f"no clipdex library at {path} - index something first (clipdex index PATH) "
            "or point --library at an existing library"
        )
        self.path = path


class CorruptLibrary(ClipdexError):
    """The library's files cannot be read as a clipdex library."""


class ModelMismatch(ClipdexError):
    """The library was built with another model than the one asked for."""


class ModelUnavailable(ClipdexError):
    """The model's config or weights cannot be found or loaded."""


class UnreadableImage(ClipdexError):
    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ImageTooLarge(UnreadableImage):
    """An image with more pixels than a query image may have (see imaging.MAX_QUERY_IMAGE_PIXELS)."""


class UnreadableCorpus(ClipdexError):
    """A text corpus file cannot be parsed (the message names file and line)."""


class LibraryBusy(ClipdexError):
    """Another process is writing to the library."""


class InvalidQuery(ClipdexError):
    """A query or filter that cannot be answered as given."""


class ItemNotFound(ClipdexError):
    def __init__(self, item_id: object) -> None:
        super().__init__(f"no item with id {item_id} in this library")
        self.item_id = item_id


class CatalogUnavailable(ClipdexError):
    """The catalog's database cannot be reached or written (a disk error, a dead server)."""


class FileUnavailable(ClipdexError):
    """An item has no file to serve (a text), or its file is gone or changed since indexing."""


class DamagedVectors(CorruptLibrary):
    """A vector stored in the catalog is not one of the library's dimension (a damaged row, or a
    manifest whose `dim` disagrees with the catalog); `clipdex check` tells which."""


class ReadOnlyLibrary(ClipdexError):
    """The library can be searched but not written (a read-only mount, a folder of another user)."""


class ClusterError(ClipdexError):
    """A Ray cluster cannot be used: Ray missing, no cluster at the address, a node that cannot see the files."""
