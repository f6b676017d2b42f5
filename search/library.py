"""The library: one directory, opened or created as one thing.

`Library` puts the parts together and keeps little logic of its own: the manifest
(`manifest`), the catalog (`catalog`, the source of truth), the FAISS index kept in step
with it (`store`), the write lock (`locks`), the encoders (`encoders`: the model, loaded on
first use, and what answers text queries) and the searcher (`searcher`). Its methods are
the public API over those parts.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from clipdex.search.catalog.local import open_catalog
from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder
from clipdex.search.encoders.factory import LibraryEncoders
from clipdex.search.errors import ClipdexError, CorruptLibrary, LibraryNotFound, ReadOnlyLibrary
from clipdex.search.integrity import check_catalog, require_catalog
from clipdex.search.locks import FileWriteLock, WriteLock
from clipdex.search.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, embedding_dim
from clipdex.search.encoders.model import ModelSpec, ResolvedModel
from clipdex.search.paths import resolve_library_path
from clipdex.search.query import Filters, Hit, Query, Term
from clipdex.search.searcher import Searcher
from clipdex.search.index.store import LibraryWriter, VectorStore
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE, IndexSpec, VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.index.keyed import ImageSource, KeyedResult

CATALOG_FILE = "catalog.sqlite"


class Library:
    """A clipdex library directory. Any number of readers; one writer at a time."""

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto", catalog: Catalog | None = None,
                 runtime: str = "auto") -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        if catalog is None:
            catalog = open_catalog(manifest.catalog, path / CATALOG_FILE, manifest.dim)
        self.catalog = catalog
        self.write_lock: WriteLock = FileWriteLock(path)  # this folder's files (the vector index)
        self.catalog_lock: WriteLock | None = catalog.writer_lock()  # a shared catalog's one writer
        self.store = VectorStore(path, self.catalog, manifest, self.write_lock)
        self.encoders = LibraryEncoders(path, manifest.model, manifest.dim, device, _CatalogQueryCache(self.catalog), runtime)
        self.searcher = Searcher(self.catalog, self.store, self.encode_text, self.encode_image)
        self.created = False  # made by this open() call
        self.attached = False  # made by this open() call, as a replica of a shared catalog that held a library

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        model: ModelSpec | None = None,
        create: bool = False,
        device: str = "auto",
        catalog: str | None = None,
        runtime: str = "auto",
    ) -> "Library":
        """Open the library at `path` (default: $CLIPDEX_LIBRARY or the user data dir).

        With `model`, the library must have been built with that model (else
        ModelMismatch). With `create`, a missing library is made for `model` (default
        ViT-B-32 / laion2b_s34b_b79k). `catalog`, when making one: the URL of a shared
        PostgreSQL catalog instead of LIBRARY/catalog.sqlite; a catalog that already holds
        a library is attached to (a replica), its model read from the catalog. `runtime`:
        what runs the model (auto, torch or onnx; see `LibraryEncoders`).

        With `create` and another `model`, a library of its own catalog that never committed
        anything (a first index that failed: its model's weights could not be had, say) is
        made anew for `model`, rather than left pinned to a model that cannot load.
        """
        directory = resolve_library_path(path)
        manifest_path = directory / MANIFEST_FILE
        if manifest_path.exists():
            manifest = Manifest.read(manifest_path)
            if manifest.catalog is None:
                require_catalog(directory / CATALOG_FILE)  # a lost catalog is an error, never a new empty one
            if catalog is not None and _public_url(catalog) != manifest.catalog:
                raise ClipdexError(
                    f"library {directory} already uses {manifest.catalog or 'its own catalog.sqlite'}, "
                    f"not {_public_url(catalog)}; attach another folder to that catalog instead"
                )
            requested = model.resolve(known=manifest.model) if model is not None else None
            if not (requested is not None and create and not manifest.model.same_model(requested)
                    and cls._discard_if_never_indexed(directory, manifest)):
                if requested is not None:
                    manifest.model.check_compatible(requested, directory)
                return cls(directory, manifest, device, runtime=runtime)
        if not create:
            raise LibraryNotFound(directory)
        if directory.exists() and not directory.is_dir():
            raise CorruptLibrary(f"{directory} exists and is not a directory")
        if directory.exists() and any(directory.iterdir()):
            raise CorruptLibrary(f"{directory} is not empty and holds no {MANIFEST_FILE}; refusing to make a library there")
        shared = _shared_catalog(catalog) if catalog is not None else None
        attached = shared is not None and shared.recorded_model() is not None
        resolved, dim = _model_for(shared, model, catalog)
        manifest = Manifest(FORMAT_VERSION, resolved, dim, IndexSpec(), time.time(), {},
                            catalog=_public_url(catalog) if catalog else None)
        directory.mkdir(parents=True, exist_ok=True)
        manifest.write(manifest_path)
        library = cls(directory, manifest, device, shared, runtime)
        library.catalog.record_model({"model": resolved.to_json(), "dim": dim})
        library.created = True
        library.attached = attached
        return library

    @classmethod
    def _discard_if_never_indexed(cls, directory: Path, manifest: Manifest) -> bool:
        """Remove the library at `directory` if it has its own catalog and never committed
        anything (generation 0, no items), under its write lock (LibraryBusy: a run is on);
        whether it was removed."""
        if manifest.catalog is not None:
            return False  # a shared catalog: other replicas may be attached to it
        import shutil

        library = cls(directory, manifest, "cpu")
        try:
            with library.locked():
                if library.catalog.generation() != 0 or any(library.catalog.counts().values()):
                    return False
                library.close()
                shutil.rmtree(directory)
        finally:
            library.close()
        return True

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- parts ----------------------------------------------------------------------

    @property
    def model(self) -> ResolvedModel:
        return self.manifest.model

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def encoder(self) -> ImageTextEncoder:
        """The model, loaded on first use."""
        return self.encoders.image_text

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index, caught up with the catalog."""
        return self.store.index

    def rebuild_vectors(self, spec: IndexSpec | None = None) -> VectorIndex:
        """Rebuild the FAISS index from the catalog (optionally of another type) and save it."""
        with self.writer():
            return self.store.rebuild(spec)

    def rebuild_if_outgrown(self) -> bool:
        """Rebuild the index when the library's size now calls for another type; True if it did."""
        with self.writer():
            return self.store.rebuild_if_outgrown()

    def adopt_vectors(self, index: VectorIndex, generation: int, entries: dict[str, Any] | None = None) -> None:
        """Make `index`, built from the catalog as of `generation`, the library's index, and record
        `entries` in the manifest once it is saved (see `VectorStore.adopt`)."""
        with self.writer():
            self.store.adopt(index, generation, entries)

    # -- writing ----------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the library's write lock (and a shared catalog's), for a writer of any kind."""
        if self.catalog.read_only:
            raise ReadOnlyLibrary(f"library {self.path} cannot be written here ({self.catalog.read_only_reason}); "
                                  "it can only be searched")
        with ExitStack() as locks:
            if self.catalog_lock is not None:
                locks.enter_context(self.catalog_lock.held())
            locks.enter_context(self.write_lock.held())
            yield

    def check_writable(self) -> None:
        """Raise now what a writer would meet (ReadOnlyLibrary, LibraryBusy), holding nothing
        afterwards: for work that runs long before it writes (optimize builds its index without
        the lock, so that writers go on meanwhile, and takes it only to save)."""
        with self.locked():
            pass

    @contextmanager
    def writer(self) -> Iterator[LibraryWriter]:
        """Hold the library's write lock (and a shared catalog's); the index is saved when the block ends."""
        with self.locked():
            writer = LibraryWriter(self.store)
            try:
                yield writer
            except BaseException as error:
                writer.flush_after(error)  # what was committed is saved if it can be; the error is this one
                raise
            writer.flush()

    # -- queries --------------------------------------------------------------------------

    def encode_text(self, text: str) -> np.ndarray:
        """A text's vector, from the library's query cache when it was asked before."""
        return self.encoders.encode_text(text)

    def text_encoder(self) -> TextEncoder:
        """The encoder for text queries (see `LibraryEncoders.text`)."""
        return self.encoders.text()

    def export_text_encoder(self) -> float:
        """Store the loaded model's towers in the library as ONNX, once (see `LibraryEncoders.export_text`);
        the seconds it took (0: nothing to do)."""
        if not self.catalog.read_only:  # a read-only library is never written
            return self.encoders.export_text()
        return 0.0

    def encode_image(self, image: str | os.PathLike[str] | bytes) -> np.ndarray:
        return self.encoders.encode_image(image)

    def term_vector(self, term: Term) -> np.ndarray:
        return self.searcher.term_vector(term)

    def query_vector(self, query: Query) -> np.ndarray:
        return self.searcher.query_vector(query)

    def search(self, query: Query | None = None, **options: Any) -> list[Hit]:
        """Ranked hits for a query: `library.search(text="a dog", k=5, kind="image")`.

        Takes a `Query`, or the keyword arguments of `Query.build` (text, image, like,
        vector, minus, weights, k, offset, threshold and the filters kind, path, after,
        before, min_width, min_height).
        """
        if query is None:
            query = Query.build(**options)
        elif options:
            raise TypeError("pass either a Query or keyword options, not both")
        return self.searcher.search(query)

    def search_vector(self, vector: np.ndarray, query: Query) -> list[Hit]:
        return self.searcher.search_vector(vector, query)

    def search_index(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, query_kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the vector index, caught up with the catalog (see `VectorIndex.search`;
        `query_kind` "image" or "text" picks the breadth tuned for such queries).

        Searches from several threads run at the same time; a catch-up or commit that
        changes the index waits for them, and they for it.
        """
        return self.store.search(queries, k, allowed, query_kind)

    def allowed_ids(self, filters: Filters) -> np.ndarray | None:
        """The ids a search may return, or None when every item may be returned."""
        return self.catalog.filtered_ids(filters)

    def get_item(self, item_id: int) -> Hit:
        return self.searcher.get_item(item_id)

    # -- reports ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        counts = self.catalog.counts()
        vectors = self.vectors
        return {
            "library": str(self.path),
            "items": sum(counts.values()),
            "images": counts["image"],
            "texts": counts["text"],
            "vectors": vectors.ntotal,
            "dim": self.dim,
            "model": self.model.name,
            "weights": self.model.weights,
            "index_type": vectors.spec.type,
            "index": vectors.spec.to_json(),
            "index_device": vectors.device,
            "runtime": self.encoders.runtime(),
            "generation": self.catalog.generation(),
            "catalog": self.manifest.catalog or str(self.path / CATALOG_FILE),
            **({"read_only": True} if self.catalog.read_only else {}),
            **({"optimized": self.manifest.extra["optimized"]} if "optimized" in self.manifest.extra else {}),
        }

    def check(self, repair: bool = False) -> dict[str, Any]:
        """Compare catalog, saved vector index and manifest; with `repair`, rebuild the index (and
        fix the catalog's own damage where it can: see `clipdex.search.integrity`)."""
        catalog_check = check_catalog(self, repair)
        if catalog_check.blocking:
            return catalog_check.report()
        problems: list[str] = list(catalog_check.problems)
        generation = self.catalog.generation()
        catalog_ids, catalog_vectors = self.catalog.all_vectors()
        if len(catalog_vectors) and catalog_vectors.shape[1] != self.dim:
            problems.append(f"catalog vectors have {catalog_vectors.shape[1]} dimensions, the manifest says {self.dim}")
        loaded = VectorIndex.load(self.path)
        notes: list[str] = []
        if loaded is None:
            # Derived data never saved here is no damage: a library nothing was committed to, a small
            # one searched exactly from the catalog (a replica of a shared catalog never writes one),
            # one whose first search has yet to build it. Half of it, or a file FAISS cannot read, is.
            if any((self.path / name).exists() for name in (INDEX_FILE, STAMP_FILE)):
                problems.append(f"{INDEX_FILE} or {STAMP_FILE} is missing or unreadable")
            elif len(catalog_ids) and not self.store.searched_exactly():
                notes.append(f"no {INDEX_FILE} is saved here yet: the first search builds it from the catalog "
                             "(and saves it where the library can be written); `clipdex check --repair` builds it now")
        else:
            index, saved_generation = loaded
            if saved_generation < generation and self.catalog.changes_floor() <= saved_generation and index.dim == self.dim:
                # behind, with the change log reaching back to it (a small library's commits leave
                # the index file as it was, see VectorStore.defers_index): caught up, as every reader does
                changed = self.catalog.changed_since(saved_generation)
                if self.catalog.changes_floor() <= saved_generation:  # not trimmed meanwhile by a writer's save
                    index.remove(np.asarray(changed, dtype=np.int64))
                    for ids, vectors in self.catalog.iter_vectors(changed):
                        index.add(ids, vectors)
                    saved_generation = generation
            if saved_generation != generation:
                problems.append(f"{INDEX_FILE} reflects generation {saved_generation}, the catalog is at {generation}")
            if index.dim != self.dim:
                problems.append(f"{INDEX_FILE} has dimension {index.dim}, the manifest says {self.dim}")
            index_ids = np.sort(index.ids())
            if not np.array_equal(index_ids, np.sort(catalog_ids)):
                missing = len(np.setdiff1d(catalog_ids, index_ids))
                extra = len(np.setdiff1d(index_ids, catalog_ids))
                problems.append(f"{INDEX_FILE} lacks {missing} catalog items and holds {extra} unknown ids")
        repaired = False
        if (problems or notes) and repair:
            self.rebuild_vectors()
            repaired = True
        return {"ok": not problems, "problems": problems, "repaired": repaired, "items": int(len(catalog_ids)),
                **({"notes": notes} if notes and not repaired else {}), **catalog_check.details()}

    def export(self, out: str | os.PathLike[str]) -> int:
        """Write ids, kinds, paths (texts: ''), texts and vectors (float32, as stored) to an .npz."""
        ids, vectors = self.catalog.all_vectors()
        items = self.catalog.get_items(ids.tolist())
        kinds = np.array([items[i].kind for i in ids.tolist()], dtype=str)
        paths = np.array([items[i].path or "" for i in ids.tolist()], dtype=str)
        texts = np.array([items[i].text or "" for i in ids.tolist()], dtype=str)
        vectors = vectors.reshape(len(ids), self.dim) if len(ids) else np.zeros((0, self.dim), np.float32)
        np.savez(out, ids=ids, kinds=kinds, paths=paths, texts=texts, vectors=vectors.astype(np.float32),
                 model=np.array(json.dumps(self.model.to_json())))
        return len(ids)

    # -- items under the application's own keys (see `clipdex.search.index.keyed`) --------------

    def add_texts(self, texts: Sequence[str], keys: Sequence[str],
                  metadata: Sequence[dict[str, Any] | None] | None = None) -> KeyedResult:
        """Embed `texts` and add them under the application's own `keys` (one per text, unique in the
        library: a key already there is replaced, keeping its id), with `metadata` (a JSON-able dict or
        None per text). All or nothing: one catalog transaction, searchable at once; hits carry `Hit.key`."""
        from clipdex.search.index import keyed

        return keyed.add_texts(self, texts, keys, metadata)

    def add_images(self, images: Sequence[ImageSource], keys: Sequence[str],
                   metadata: Sequence[dict[str, Any] | None] | None = None) -> KeyedResult:
        """Embed `images` (paths, bytes or PIL images) and add them under `keys`, as `add_texts`. An image
        read from a path is not a file of the library: its item has no path (`Hit.path` is None)."""
        from clipdex.search.index import keyed

        return keyed.add_images(self, images, keys, metadata)

    def add_vectors(self, keys: Sequence[str], vectors: Any, metadata: Sequence[dict[str, Any] | None] | None = None,
                    kind: str = "image") -> KeyedResult:
        """Add precomputed vectors of this library's model (an (n, dim) array), normalized, under `keys`,
        as `add_texts`; `kind` ("image" or "text") is what they are vectors of, for the `kind` filter."""
        from clipdex.search.index import keyed

        return keyed.add_vectors(self, keys, vectors, metadata, kind)

    def remove(self, keys: Sequence[str]) -> int:
        """Remove the items added under these keys, in one transaction; how many were there."""
        from clipdex.search.index import keyed

        return keyed.remove(self, keys)

    def item_ids(self, keys: Sequence[str]) -> dict[str, int]:
        """The ids of the items with these keys, for those that are there: `search(like=ids["post:1"])`
        finds what is like an item the application knows by its key."""
        from clipdex.search.index import keyed

        return keyed.item_ids(self, keys)


def open_library(path: str | os.PathLike[str] | None = None, model: ModelSpec | None = None, device: str = "auto") -> Library:
    """Open an existing library (see `Library.open`)."""
    return Library.open(path, model=model, device=device)


def _public_url(url: str) -> str:
    from clipdex.search.catalog.database import public_url

    return public_url(url)


def _shared_catalog(url: str) -> "Catalog":
    from clipdex.search.catalog.database import Catalog, connect_url

    if url.split(":", 1)[0].split("+", 1)[0] != "postgresql":
        raise ClipdexError(
            f"--catalog takes a PostgreSQL URL (postgresql+psycopg://user@host:5432/db), not {_public_url(url)!r}; "
            "without it a library keeps its own SQLite catalog"
        )
    return Catalog(connect_url(url))


def _model_for(shared: "Catalog | None", model: ModelSpec | None, url: str | None) -> tuple[ResolvedModel, int]:
    """The model of a new library: the one a shared catalog records (a replica), else the one asked for."""
    recorded = shared.recorded_model() if shared is not None else None
    if recorded is not None:
        resolved = ResolvedModel.from_json(recorded["model"])
        if model is not None:
            resolved.check_compatible(model.resolve(), f"catalog {_public_url(url or '')}")
        return resolved, int(recorded["dim"])
    resolved = (model or ModelSpec()).resolve()
    return resolved, embedding_dim(resolved)


class _CatalogQueryCache:
    """The catalog's cache of query vectors, as `LibraryEncoders` uses it."""

    def __init__(self, catalog: "Catalog") -> None:
        self.catalog = catalog

    def get(self, text: str) -> np.ndarray | None:
        return self.catalog.cached_query(text)

    def put(self, text: str, vector: np.ndarray) -> None:
        self.catalog.cache_query(text, vector)
