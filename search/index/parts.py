"""What the index room's whole-library work (optimize, import-vectors, query samples) uses of a library.

`clipdex.search.library.Library` is one. These are protocols so that this room never imports
the facade above it: the rooms import in one direction (README, "Where things live").
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.encoders.base import TextEncoder
    from clipdex.search.encoders.model import ResolvedModel
    from clipdex.search.index.store import VectorStore
    from clipdex.search.index.vectors import IndexSpec, VectorIndex


class IndexRecord(Protocol):
    """Where a library records its dimension and index spec (its manifest)."""

    dim: int
    index: IndexSpec
    extra: dict[str, Any]
    created_at: float  # names the library (a file derived from it, such as the rerank cache, checks it)

    def record_index(self, directory: Path, spec: IndexSpec, entries: dict[str, Any] | None = None) -> None:
        """Record `spec` as the index of the library at `directory`, and `entries` beside it, durably."""

    def refresh(self, directory: Path) -> None:
        """Take up what another process recorded since (the index spec, optimize's report)."""


class LibraryParts(Protocol):
    """The parts every whole-library operation reads: where it is, its dimension, catalog and model."""

    @property
    def path(self) -> Path: ...

    @property
    def dim(self) -> int: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def model(self) -> ResolvedModel: ...


class IndexedLibrary(LibraryParts, Protocol):
    """A library as the index room's whole-library operations see it."""

    @property
    def store(self) -> VectorStore: ...

    @property
    def vectors(self) -> VectorIndex: ...

    @property
    def manifest(self) -> IndexRecord: ...

    def text_encoder(self) -> TextEncoder: ...

    def locked(self) -> AbstractContextManager[None]: ...

    def adopt_vectors(self, index: VectorIndex, generation: int, entries: dict[str, Any] | None = None) -> None: ...
