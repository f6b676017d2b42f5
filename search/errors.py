"""Domain exceptions: each one says what went wrong and, where it can, what to do."""

from __future__ import annotations


class ClipdexError(Exception):
    """Base class for errors a user can act on; the CLI prints them without a traceback."""


class LibraryNotFound(ClipdexError):
    def __init__(self, path: object) -> None:
        super().__init__(
            f"no clipdex library at {path} - make one there with create=True, or open an existing library"
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


class UnreadableVideo(UnreadableImage):
    """A video file clipdex cannot sample: no video stream, an unsupported codec, no frame (path and reason)."""


class UnreadableCorpus(ClipdexError):
    """A text corpus file cannot be parsed (the message names file and line)."""


class LibraryBusy(ClipdexError):
    """Another writer holds the library's write lock (another process, or another thread of this one)."""


class LibraryClosed(ClipdexError):
    """The library was closed (`Library.close`); open it again to use it."""


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


class AddressUnavailable(ClipdexError):
    """The server cannot listen on the address it was given (a port in use, a host not of this machine)."""


class TextExportRefused(ClipdexError):
    """The text tower cannot be exported faithfully; queries keep using the open_clip model."""


class InvalidVectors(ClipdexError):
    """An embeddings file that cannot be imported as it is (the message names file and reason)."""


class MissingDependency(ClipdexError):
    """An optional package is needed for this input."""


class MemoryBudgetError(ClipdexError):
    """A memory budget that cannot be read, or that no index type fits into."""


class GpuUnavailable(ClipdexError):
    """The GPU was required (CLIPDEX_GPU=on) but FAISS cannot search there."""


class UnreadableFile(ClipdexError):
    """A file clipdex will not read: not a regular file, or over the size limit."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ClusterError(ClipdexError):
    """A Ray cluster cannot be used: Ray missing, no cluster at the address, a node that cannot see the files."""


class InvalidItems(ClipdexError):
    """Items given to `Library.add_texts`, `add_images`, `add_vectors` or `remove` that cannot be added as
    they are (a missing or repeated key, a blank text, a vector of another dimension); nothing was added."""