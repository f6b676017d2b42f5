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
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Sequence

import numpy as np

from clipdex.search.catalog.local import open_catalog
from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder
from clipdex.search.encoders.factory import RUNTIMES, LibraryEncoders
from clipdex.search.errors import (
    ClipdexError,
    CorruptLibrary,
    InvalidQuery,
    LibraryClosed,
    LibraryNotFound,
    ReadOnlyLibrary,
)
from clipdex.search.explanation import Explanation
from clipdex.search.integrity import check_catalog, require_catalog
from clipdex.search.locks import FileWriteLock, WriteLock
from clipdex.search.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, embedding_dim
from clipdex.search.encoders.model import ModelSpec, ResolvedModel
from clipdex.search.encoders.torch_clip import DEVICES
from clipdex.search.paths import resolve_library_path
from clipdex.search.query import (
    BUILD_ARGUMENTS,
    Filters,
    Hit,
    ImageInput,
    KindName,
    Query,
    Term,
    TimeInput,
    VectorInput,
    unknown_arguments,
)
from clipdex.search.searcher import Searcher
from clipdex.search.index.store import LibraryWriter, VectorStore
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE, IndexSpec, VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.index.keyed import ImageSource, KeyedResult

CATALOG_FILE = "catalog.sqlite"


class Library:
    """A clipdex library: one directory of vectors and their catalog, searched by meaning.

    Open one with `Library.open(path)` (or `clipdex.open_library(path)`; `create=True`
    makes a new one), use it as a context manager or call `close()` when done::

        with Library.open("my-library", create=True) as library:
            clipdex.index_paths(library, ["~/Pictures"])
            for hit in library.search(text="a dog on the beach", kind="image", k=5):
                print(hit.rank, hit.score, hit.path)

    `search`, `get_item`, `encode_text`, `encode_image`, `stats` and `check` read;
    `clipdex.index_paths` and `writer()` write. Any number of readers, in any number of
    threads and processes; one writer at a time (see `writer`).
    """

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto", catalog: Catalog | None = None,
                 runtime: str = "auto") -> None:
        """Internal: puts together parts already read. Use `Library.open` (or `clipdex.open_library`)."""
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
        self.wait = 0.0  # seconds a writer waits for another one to finish (see `open`)
        self.closed = False
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
        wait: float = 0.0,
    ) -> "Library":
        """Open the library at `path` (default: $CLIPDEX_LIBRARY or the user data dir).

        With `model`, the library must have been built with that model (else
        ModelMismatch). With `create`, a missing library is made for `model` (default
        ViT-B-32 / laion2b_s34b_b79k). `catalog`, when making one: the URL of a shared
        PostgreSQL catalog instead of LIBRARY/catalog.sqlite; a catalog that already holds
        a library is attached to (a replica), its model read from the catalog. `runtime`:
        what runs the model (auto, torch or onnx; see `LibraryEncoders`); `device`: where
        (auto, cpu or cuda). `wait`: how many seconds a writer (`index_paths`, `writer()`)
        waits for another writer (a CLI index run, another thread) to finish before it
        raises LibraryBusy; 0 raises at once.

        With `create` and another `model`, a library of its own catalog that never committed
        anything (a first index that failed: its model's weights could not be had, say) is
        made anew for `model`, rather than left pinned to a model that cannot load.
        """
        if wait < 0:
            raise ClipdexError(f"wait= is a number of seconds, not {wait!r}")
        _check_choice("runtime", runtime, RUNTIMES)
        _check_choice("device", device, DEVICES)
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
                opened = cls(directory, manifest, device, runtime=runtime)
                opened.wait = wait
                return opened
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
        library.wait = wait
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
        """Let go of the catalog's connections; afterwards every method raises LibraryClosed."""
        self.closed = True
        self.catalog.close()
        self.store.rerank_cache.close()

    def _check_open(self) -> None:
        if self.closed:
            raise LibraryClosed(f"library {self.path} was closed; open it again (Library.open) to use it")

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
        self._check_open()
        return self.encoders.image_text

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index, caught up with the catalog."""
        self._check_open()
        return self.store.index

    def rebuild_vectors(self, spec: IndexSpec | None = None) -> VectorIndex:
        """Rebuild the FAISS index from the catalog (optionally of another type) and save it."""
        self._check_open()
        with self.writer():
            return self.store.rebuild(spec)

    def rebuild_if_outgrown(self) -> bool:
        """Rebuild the index when the library's size now calls for another type; True if it did."""
        self._check_open()
        with self.writer():
            return self.store.rebuild_if_outgrown()

    def adopt_vectors(self, index: VectorIndex, generation: int, entries: dict[str, Any] | None = None) -> None:
        """Make `index`, built from the catalog as of `generation`, the library's index, and record
        `entries` in the manifest once it is saved (see `VectorStore.adopt`)."""
        self._check_open()
        with self.writer():
            self.store.adopt(index, generation, entries)

    # -- writing ----------------------------------------------------------------------

    @contextmanager
    def locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the library's write lock (and a shared catalog's), for a writer of any kind; when
        another writer holds it, wait up to `wait` seconds (default: the library's, see `open`)."""
        self._check_open()
        if self.catalog.read_only:
            raise ReadOnlyLibrary(f"library {self.path} cannot be written here ({self.catalog.read_only_reason}); "
                                  "it can only be searched")
        deadline = time.monotonic() + (self.wait if wait is None else wait)
        with ExitStack() as locks:
            if self.catalog_lock is not None:
                locks.enter_context(self.catalog_lock.held(max(deadline - time.monotonic(), 0.0)))
            locks.enter_context(self.write_lock.held(max(deadline - time.monotonic(), 0.0)))
            yield

    def check_writable(self) -> None:
        """Raise now what a writer would meet (ReadOnlyLibrary, LibraryBusy), holding nothing
        afterwards: for work that runs long before it writes (optimize builds its index without
        the lock, so that writers go on meanwhile, and takes it only to save)."""
        with self.locked():
            pass

    @contextmanager
    def writer(self, wait: float | None = None) -> Iterator[LibraryWriter]:
        """Hold the library's write lock (and a shared catalog's), waiting up to `wait` seconds
        for another writer (default: the library's, see `open`); the index is saved when the block ends."""
        with self.locked(wait):
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
        self._check_open()
        return self.encoders.encode_text(text)

    def text_encoder(self) -> TextEncoder:
        """The encoder for text queries (see `LibraryEncoders.text`)."""
        self._check_open()
        return self.encoders.text()

    def export_text_encoder(self) -> float:
        """Store the loaded model's towers in the library as ONNX, once (see `LibraryEncoders.export_text`);
        the seconds it took (0: nothing to do)."""
        self._check_open()
        if not self.catalog.read_only:  # a read-only library is never written
            return self.encoders.export_text()
        return 0.0

    def encode_image(self, image: str | os.PathLike[str] | bytes) -> np.ndarray:
        self._check_open()
        return self.encoders.encode_image(image)

    def term_vector(self, term: Term) -> np.ndarray:
        self._check_open()
        return self.searcher.term_vector(term)

    def query_vector(self, query: Query) -> np.ndarray:
        self._check_open()
        return self.searcher.query_vector(query)

    def search(
        self,
        query: Query | None = None,
        *,
        text: str | Sequence[str] | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
        like: int | Sequence[int] | None = None,
        vector: VectorInput | Sequence[VectorInput] | None = None,
        minus: str | Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        kind: KindName = "any",
        path: str | None = None,
        after: TimeInput | None = None,
        before: TimeInput | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
        k: int = 10,
        offset: int = 0,
        threshold: float | None = None,
        per_video: int = 1,
        mode: str | None = None,
        sort: str = "relevance",
        confident: bool = False,
        **unknown: NoReturn,
    ) -> list[Hit]:
        """Ranked hits for a query: `library.search(text="a dog", kind="image", k=5)`.

        Terms (at least one; each weighted by the next of `weights`, default 1): `text` (one
        or more), `image` (a path or the bytes of an image file), `like` (item ids: more like
        these), `vector` (numbers, or a .npy file), and `minus` (texts subtracted).
        Filters, applied inside the search: `kind` ("image", "text", "video" or "any"), `path` (a
        glob over the items' paths), `after`/`before` (capture time, a date or ISO text),
        `min_width`/`min_height` (pixels). `k` hits from `offset` on, none below the
        cosine `threshold`. A video is one hit (kind "video") whose `timestamp` is its
        best-matching moment; `per_video` of its best moments are in `moments`. `mode`:
        "semantic" (by meaning), "keyword" (by the words of names, texts, EXIF and OCR text)
        or "hybrid" (both fused; the default when the library has keyword data and the query
        is texts alone). `sort`: "relevance", or the best k shown by capture time ("date",
        "-date" newest first). `confident`: only the hits that stand out from this query's
        scores over the library. Or pass a ready `Query` alone.

        Raises InvalidQuery for a query that cannot be answered (an unknown argument
        included), ItemNotFound for an unknown `like` id, UnreadableImage for an image
        that does not decode.
        """
        self._check_open()
        options: dict[str, Any] = {
            "text": text, "image": image, "like": like, "vector": vector, "minus": minus, "weights": weights,
            "kind": kind, "path": path, "after": after, "before": before, "min_width": min_width,
            "min_height": min_height, "k": k, "offset": offset, "threshold": threshold, "per_video": per_video,
            "mode": mode, "sort": sort, "confident": confident,
        }
        if unknown:
            raise unknown_arguments("search", unknown, BUILD_ARGUMENTS)
        if query is None:
            query = Query.build(**options)
        else:
            given = [name for name, value in options.items() if not _is_default(name, value)]
            if given:
                raise InvalidQuery(f"pass either a Query or keyword arguments, not both (query= with "
                                   f"{', '.join(name + '=' for name in given)})")
        return self.searcher.search(query)

    def search_vector(self, vector: np.ndarray, query: Query) -> list[Hit]:
        self._check_open()
        return self.searcher.search_vector(vector, query)

    def search_index(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, query_kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search the vector index, caught up with the catalog (see `VectorIndex.search`;
        `query_kind` "image" or "text" picks the breadth tuned for such queries).

        Searches from several threads run at the same time; a catch-up or commit that
        changes the index waits for them, and they for it.
        """
        self._check_open()
        return self.store.search(queries, k, allowed, query_kind)

    def allowed_ids(self, filters: Filters) -> np.ndarray | None:
        """The ids a search may return, or None when every item may be returned."""
        self._check_open()
        return self.catalog.filtered_ids(filters)

    def get_item(self, item_id: int) -> Hit:
        self._check_open()
        return self.searcher.get_item(item_id)

    # -- reports ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        self._check_open()
        counts = self.catalog.counts()
        vectors = self.vectors
        return {
            "library": str(self.path),
            "items": sum(counts.values()),
            "images": counts["image"],
            "texts": counts["text"],
            "videos": counts["video"],
            "video_moments": counts["frame"],  # a vector each, gathered into their video in hits
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
        self._check_open()
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
        self._check_open()
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
        self._check_open()
        from clipdex.search.index import keyed

        return keyed.add_texts(self, texts, keys, metadata)

    def add_images(self, images: Sequence[ImageSource], keys: Sequence[str],
                   metadata: Sequence[dict[str, Any] | None] | None = None) -> KeyedResult:
        """Embed `images` (paths, bytes or PIL images) and add them under `keys`, as `add_texts`. An image
        read from a path is not a file of the library: its item has no path (`Hit.path` is None)."""
        self._check_open()
        from clipdex.search.index import keyed

        return keyed.add_images(self, images, keys, metadata)

    def add_vectors(self, keys: Sequence[str], vectors: Any, metadata: Sequence[dict[str, Any] | None] | None = None,
                    kind: str = "image") -> KeyedResult:
        """Add precomputed vectors of this library's model (an (n, dim) array), normalized, under `keys`,
        as `add_texts`; `kind` ("image" or "text") is what they are vectors of, for the `kind` filter."""
        self._check_open()
        from clipdex.search.index import keyed

        return keyed.add_vectors(self, keys, vectors, metadata, kind)

    def remove(self, keys: Sequence[str]) -> int:
        """Remove the items added under these keys, in one transaction; how many were there."""
        self._check_open()
        from clipdex.search.index import keyed

        return keyed.remove(self, keys)

    def item_ids(self, keys: Sequence[str]) -> dict[str, int]:
        """The ids of the items with these keys, for those that are there: `search(like=ids["post:1"])`
        finds what is like an item the application knows by its key."""
        self._check_open()
        from clipdex.search.index import keyed

        return keyed.item_ids(self, keys)

    def explain(self, query: Query | str | None = None, item_id: int | None = None, *,
                path: str | os.PathLike[str] | None = None, text: str | Sequence[str] | None = None,
                image: ImageInput | Sequence[ImageInput] | None = None, like: int | Sequence[int] | None = None,
                vector: VectorInput | Sequence[VectorInput] | None = None, minus: str | Sequence[str] | None = None,
                weights: Sequence[float] | None = None, timestamp: float | None = None, **unknown: NoReturn) -> Explanation:
        """Where a query matches inside an image: `library.explain("a red umbrella", hit.id)`.

        `query`: a text, a `Query`, or terms as `search` takes them (text=, image=, like=,
        vector=, minus=, weights=); the image: a stored image item (`item_id`) or a file
        (`path`), or a stored video at its frame at `timestamp` seconds (default: the query's
        best moment; `Explanation.timestamp` says which frame). Returns an `Explanation`
        (grid, peak in displayed pixels, score). Raises ItemNotFound for an unknown id,
        InvalidQuery for a bad query or a text item.
        """
        self._check_open()
        if unknown:
            raise unknown_arguments("explain", unknown, ("query", "item_id", "path", *BUILD_ARGUMENTS[:6], "timestamp"))
        if isinstance(query, Query) and any(term is not None for term in (text, image, like, vector, minus, weights)):
            raise InvalidQuery("pass either a Query or the terms by name (text=, image=, ...), not both")
        if isinstance(query, str) or query is None:
            texts = [query] if isinstance(query, str) else []
            texts += [text] if isinstance(text, str) else list(text or [])
            query = Query.build(text=texts or None, image=image, like=like, vector=vector, minus=minus, weights=weights)
        from clipdex.search.searcher import explain

        return explain(self.searcher, query, lambda: self.encoders.dense(writable=not self.catalog.read_only), item_id, path,
                       lambda picture: self.encoder.encode_images([picture])[0], timestamp)


def open_library(
    path: str | os.PathLike[str] | None = None,
    model: ModelSpec | None = None,
    device: str = "auto",
    *,
    runtime: str = "auto",
    create: bool = False,
    catalog: str | None = None,
    wait: float = 0.0,
) -> Library:
    """Open the library at `path`, as `Library.open` does, with the options of the CLI's
    `--library`, `--device`, `--runtime` (and `clipdex index`'s `--catalog`, when `create`
    makes it); `wait`: seconds a writer waits for another one to finish before LibraryBusy."""
    return Library.open(path, model=model, create=create, device=device, catalog=catalog, runtime=runtime, wait=wait)


def _check_choice(argument: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ClipdexError(f"{argument}= must be one of {', '.join(choices)}, not {value!r}")


_SEARCH_DEFAULTS: dict[str, Any] = {"kind": "any", "k": 10, "offset": 0, "per_video": 1, "sort": "relevance", "confident": False}


def _is_default(name: str, value: Any) -> bool:
    """Whether `value` is what `Library.search` takes for argument `name` when it is left out."""
    default = _SEARCH_DEFAULTS.get(name)
    return value is default or (default is not None and isinstance(value, (int, str)) and value == default)


def _public_url(url: str) -> str:
    from clipdex.search.catalog.database import public_url

    return public_url(url)


def _shared_catalog(url: str) -> "Catalog":
    from clipdex.search.catalog.database import Catalog, connect_url

    if url.split(":", 1)[0].split("+", 1)[0] != "postgresql":
        raise ClipdexError(
            f"catalog= takes a PostgreSQL URL (postgresql+psycopg://user@host:5432/db), not {_public_url(url)!r}; "
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
