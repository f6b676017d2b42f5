"""The library: one directory, opened or created as one thing.

`Library` puts the parts together and keeps little logic of its own: the manifest
(`manifest`), the catalog (`catalog`, the source of truth), the FAISS index kept in step
with it (`store`), the write lock (`locks`), the model (`encoder`, loaded on first use) and
the searcher (`searcher`). Its methods are the public API over those parts.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from clipdex.search.catalog import Catalog
from clipdex.search.encoder import Encoder
from clipdex.search.errors import CorruptLibrary, LibraryNotFound
from clipdex.search.imaging import decode_image
from clipdex.search.locks import FileWriteLock, WriteLock
from clipdex.search.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest, embedding_dim
from clipdex.search.model import ModelSpec, ResolvedModel
from clipdex.search.paths import resolve_library_path
from clipdex.search.query import Filters, Hit, Query, Term
from clipdex.search.searcher import Searcher
from clipdex.search.store import LibraryWriter, VectorStore
from clipdex.search.vectors import INDEX_FILE, STAMP_FILE, IndexSpec, VectorIndex

CATALOG_FILE = "catalog.sqlite"


class Library:
    """A clipdex library directory. Any number of readers; one writer at a time."""

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto") -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        self.catalog = Catalog(path / CATALOG_FILE)
        self.write_lock: WriteLock = FileWriteLock(path)
        self.store = VectorStore(path, self.catalog, manifest, self.write_lock)
        self.searcher = Searcher(self.catalog, self.store, self.encode_text, self.encode_image)
        self._encoder: Encoder | None = None
        self._text_export: Any = None  # the exported text encoder once looked up; False when there is none
        self.created = False  # made by this open() call

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        model: ModelSpec | None = None,
        create: bool = False,
        device: str = "auto",
    ) -> "Library":
        """Open the library at `path` (default: $CLIPDEX_LIBRARY or the user data dir).

        With `model`, the library must have been built with that model (else
        ModelMismatch). With `create`, a missing library is made for `model` (default
        ViT-B-32 / laion2b_s34b_b79k).
        """
        directory = resolve_library_path(path)
        manifest_path = directory / MANIFEST_FILE
        if manifest_path.exists():
            manifest = Manifest.read(manifest_path)
            if model is not None:
                manifest.model.check_compatible(model.resolve(), directory)
            return cls(directory, manifest, device)
        if not create:
            raise LibraryNotFound(directory)
        if directory.exists() and not directory.is_dir():
            raise CorruptLibrary(f"{directory} exists and is not a directory")
        if directory.exists() and any(directory.iterdir()):
            raise CorruptLibrary(f"{directory} is not empty and holds no {MANIFEST_FILE}; refusing to make a library there")
        resolved = (model or ModelSpec()).resolve()
        manifest = Manifest(FORMAT_VERSION, resolved, embedding_dim(resolved), IndexSpec(), time.time(), {})
        directory.mkdir(parents=True, exist_ok=True)
        manifest.write(manifest_path)
        library = cls(directory, manifest, device)
        library.created = True
        return library

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
    def encoder(self) -> Encoder:
        """The model, loaded on first use."""
        if self._encoder is None:
            self._encoder = Encoder(self.model, self.device)
        return self._encoder

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

    def adopt_vectors(self, index: VectorIndex, generation: int) -> None:
        """Make `index`, built from the catalog as of `generation`, the library's index (see `VectorStore.adopt`)."""
        with self.writer():
            self.store.adopt(index, generation)

    # -- writing ----------------------------------------------------------------------

    @contextmanager
    def writer(self) -> Iterator[LibraryWriter]:
        """Hold the library's write lock; the index is saved when the block ends."""
        with self.write_lock.held():
            writer = LibraryWriter(self.store)
            try:
                yield writer
            finally:
                writer.flush()

    # -- queries --------------------------------------------------------------------------

    def encode_text(self, text: str) -> np.ndarray:
        """A text's vector, from the library's query cache when it was asked before."""
        cached = self.catalog.cached_query(text)
        if cached is not None and cached.shape == (self.dim,):
            return cached
        encoder = self.text_encoder()
        vector = encoder.encode_texts([text])[0]
        self.catalog.cache_query(text, vector)
        if encoder is self._encoder:
            self.export_text_encoder()
        return vector

    def text_encoder(self) -> Any:
        """The encoder for text queries: the open_clip model when it is loaded, else the
        library's exported text encoder (ONNX, imports neither torch nor open_clip; see
        `clipdex.search.text_export`), else the open_clip model."""
        if self._encoder is not None and self._encoder.loaded:
            return self._encoder
        if self._text_export is None:
            from clipdex.search.text_export import load_text_export

            self._text_export = load_text_export(self.path, self.model, self.dim) or False
        return self._text_export or self.encoder

    def export_text_encoder(self) -> None:
        """Store the loaded model's text tower in the library as ONNX, once (see `clipdex.search.text_export`)."""
        if self._encoder is not None and self._encoder.loaded:
            from clipdex.search.text_export import ensure_text_export

            ensure_text_export(self.path, self._encoder, self.dim)

    def encode_image(self, image: str | os.PathLike[str] | bytes) -> np.ndarray:
        decoded = decode_image(image if isinstance(image, bytes) else Path(image))
        return self.encoder.encode_images([decoded.image])[0]

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
            "generation": self.catalog.generation(),
            **({"optimized": self.manifest.extra["optimized"]} if "optimized" in self.manifest.extra else {}),
        }

    def check(self, repair: bool = False) -> dict[str, Any]:
        """Compare catalog, saved vector index and manifest; with `repair`, rebuild the index."""
        problems: list[str] = []
        generation = self.catalog.generation()
        catalog_ids, catalog_vectors = self.catalog.all_vectors()
        if len(catalog_vectors) and catalog_vectors.shape[1] != self.dim:
            problems.append(f"catalog vectors have {catalog_vectors.shape[1]} dimensions, the manifest says {self.dim}")
        loaded = VectorIndex.load(self.path)
        if loaded is None:
            if len(catalog_ids) or generation > 0:  # a library nothing was ever committed to has no index yet
                problems.append(f"{INDEX_FILE} or {STAMP_FILE} is missing or unreadable")
        else:
            index, saved_generation = loaded
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
        if problems and repair:
            self.rebuild_vectors()
            repaired = True
        return {"ok": not problems, "problems": problems, "repaired": repaired, "items": int(len(catalog_ids))}

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


def open_library(path: str | os.PathLike[str] | None = None, model: ModelSpec | None = None, device: str = "auto") -> Library:
    """Open an existing library (see `Library.open`)."""
    return Library.open(path, model=model, device=device)
