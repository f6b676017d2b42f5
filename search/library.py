"""The library: manifest + catalog + vector index, opened or created as one thing."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from sqlalchemy import and_, or_

from clipdex.search.catalog import Catalog, Item, NewItem
from clipdex.search.encoder import Encoder
from clipdex.search.errors import CorruptLibrary, InvalidQuery, ItemNotFound, LibraryBusy, LibraryNotFound, ModelUnavailable
from clipdex.search.imaging import decode_image
from clipdex.search.model import ModelSpec, ResolvedModel
from clipdex.search.paths import resolve_library_path
from clipdex.search.query import Filters, Hit, Query, Term, combine, vector_from
from clipdex.search.sharedlock import SharedLock
from clipdex.search.vectors import INDEX_FILE, STAMP_FILE, IndexSpec, VectorIndex, write_json_atomic

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CATALOG_FILE = "catalog.sqlite"
LOCK_FILE = "write.lock"


@dataclass
class Manifest:
    format_version: int
    model: ResolvedModel
    dim: int
    index: IndexSpec
    created_at: float
    extra: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = json.loads(path.read_text())
            version = int(data["format_version"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptLibrary(f"cannot read {path}: {error}") from error
        if version > FORMAT_VERSION:
            raise CorruptLibrary(f"{path} has format version {version}; this clipdex reads up to {FORMAT_VERSION}")
        known = {"format_version", "model", "dim", "index", "created_at"}
        return cls(
            format_version=version,
            model=ResolvedModel.from_json(data["model"]),
            dim=int(data["dim"]),
            index=IndexSpec.from_json(data.get("index")),
            created_at=float(data.get("created_at", 0)),
            extra={key: value for key, value in data.items() if key not in known},
        )

    def write(self, path: Path) -> None:
        data = {
            "format_version": self.format_version,
            "model": self.model.to_json(),
            "dim": self.dim,
            "index": self.index.to_json(),
            "created_at": self.created_at,
            **self.extra,
        }
        write_json_atomic(path, data)


class Library:
    """A clipdex library directory. Any number of readers; one writer at a time."""

    def __init__(self, path: Path, manifest: Manifest, device: str = "auto") -> None:
        self.path = path
        self.manifest = manifest
        self.device = device
        self.catalog = Catalog(path / CATALOG_FILE)
        self._vectors: VectorIndex | None = None
        self._vectors_generation = -1
        self._encoder: Encoder | None = None
        self._text_export: Any = None  # the exported text encoder once looked up; False when there is none
        self._sync_lock = threading.RLock()  # changes to the in-memory index and its generation
        self._index_lock = SharedLock()  # searches share the index; changing it in place excludes them
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
        manifest = Manifest(FORMAT_VERSION, resolved, _embedding_dim(resolved), IndexSpec(), time.time(), {})
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
        self.sync_vectors()
        assert self._vectors is not None
        return self._vectors

    def sync_vectors(self) -> bool:
        """Bring the in-memory index up to the catalog's generation. True if anything changed."""
        with self._sync_lock:
            generation = self.catalog.generation()
            if self._vectors is not None and self._vectors_generation == generation:
                return False
            first_load = self._vectors is None
            if self._vectors is None or self._vectors_generation > generation:
                self._load_or_build_vectors(generation)
            for _attempt in range(2):
                if self._vectors_generation >= generation or self._catch_up(generation):
                    break
                self._load_or_build_vectors(generation)  # the log was trimmed: the saved index is newer
            else:
                self._vectors, self._vectors_generation = self._build_vectors(), generation
            if first_load and self._vectors_generation > _saved_generation(self.path):
                self._save_if_no_writer()
            return True

    def _load_or_build_vectors(self, generation: int) -> None:
        loaded = VectorIndex.load(self.path)
        # An index ahead of the catalog (its last commits lost) or of another dimension is not trusted.
        if loaded is not None and loaded[0].dim == self.dim and loaded[1] <= generation:
            self._vectors, self._vectors_generation = loaded
        else:
            self._vectors, self._vectors_generation = self._build_vectors(), generation

    def _catch_up(self, generation: int) -> bool:
        """Apply the change log since the index's generation; False if the log no longer reaches back."""
        since = self._vectors_generation
        if since < self.catalog.changes_floor():
            return False
        changed = self.catalog.changed_since(since)
        if since < self.catalog.changes_floor():  # trimmed while we read: `changed` may be incomplete
            return False
        self._apply_changes(changed)
        self._vectors_generation = generation
        return True

    def _save_if_no_writer(self) -> None:
        """Persist a caught-up index (after a crash, say) so later readers need not redo it."""
        try:
            with _write_lock(self.path):
                self.save_vectors()
        except (LibraryBusy, OSError):
            pass  # a writer will save it, or the library is read-only

    def _apply_changes(self, item_ids: Sequence[int]) -> None:
        assert self._vectors is not None
        if not item_ids:
            return
        changes = list(self.catalog.iter_vectors(item_ids))
        with self._index_lock.exclusive():
            self._vectors.remove(np.asarray(item_ids, dtype=np.int64))
            for ids, vectors in changes:
                self._vectors.add(ids, vectors)

    def _build_vectors(self) -> VectorIndex:
        from clipdex.search.index_choice import build_index

        ids, vectors = self.catalog.all_vectors()
        return build_index(self.dim, self.manifest.index, ids, vectors)

    def rebuild_vectors(self, spec: IndexSpec | None = None) -> VectorIndex:
        """Rebuild the FAISS index from the catalog (optionally of another type) and save it."""
        with self.writer():
            with self._sync_lock:
                if spec is not None:
                    self.manifest.index = spec
                    self.manifest.write(self.path / MANIFEST_FILE)
                generation = self.catalog.generation()
                self._vectors = self._build_vectors()
                self._vectors_generation = generation
                self.save_vectors()
        return self._vectors

    def adopt_vectors(self, index: VectorIndex, generation: int) -> None:
        """Make `index`, built from the catalog as of `generation`, the library's index: catch
        it up from the change log (or rebuild it with its spec when the log no longer reaches
        back), save it, and record its spec in the manifest."""
        with self.writer():
            with self._sync_lock:
                self.manifest.index = index.spec
                self.manifest.write(self.path / MANIFEST_FILE)
                self._vectors, self._vectors_generation = index, generation
                current = self.catalog.generation()
                if current > generation and not self._catch_up(current):
                    self._vectors, self._vectors_generation = self._build_vectors(), current
                self.save_vectors()

    def save_vectors(self) -> None:
        """Save the in-memory index (the caller holds the write lock) and trim the change log."""
        with self._sync_lock:
            if self._vectors is None:
                return
            generation = self._vectors_generation
            for leftover in self.path.glob(".vectors.*.tmp"):  # from a writer killed mid-save
                leftover.unlink(missing_ok=True)
            self._vectors.save(self.path, generation)
            self.catalog.trim_changes(generation)

    # -- writing ----------------------------------------------------------------------

    @contextmanager
    def writer(self) -> Iterator["LibraryWriter"]:
        """Hold the library's write lock; the index is saved when the block ends."""
        with _write_lock(self.path):
            writer = LibraryWriter(self)
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
        if term.kind == "text":
            return self.encode_text(str(term.value))
        if term.kind == "image":
            return self.encode_image(term.value)
        if term.kind == "like":
            item = self.catalog.get_item(int(term.value))
            if item is None:
                raise ItemNotFound(term.value)
            return item.vector_array()
        return self._vector_term(term.value)

    def _vector_term(self, value: Any) -> np.ndarray:
        vector = vector_from(value)  # a .npy read safely, numbers checked
        if vector.shape[0] != self.dim:
            raise InvalidQuery(f"the query vector has {vector.shape[0]} dimensions; this library's model has {self.dim}")
        if not np.all(np.isfinite(vector)):
            raise InvalidQuery("the query vector holds NaN or infinite values")
        return vector

    def query_vector(self, query: Query) -> np.ndarray:
        return combine([self.term_vector(term) for term in query.terms], [term.weight for term in query.terms])

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
        return self.search_vector(self.query_vector(query), query)

    def search_vector(self, vector: np.ndarray, query: Query) -> list[Hit]:
        allowed = self.allowed_ids(query.filters)
        if allowed is not None and len(allowed) == 0:
            return []
        wanted = query.k + query.offset
        scores, ids = self.search_index(vector[None, :], wanted, allowed)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        pairs = pairs[query.offset : query.offset + query.k]
        if query.threshold is not None:
            pairs = [(s, i) for s, i in pairs if s >= query.threshold]
        items = self.catalog.get_items(i for _, i in pairs)
        hits = []
        for score, item_id in pairs:
            item = items.get(item_id)
            if item is None:  # removed since the index was read
                continue
            hits.append(_hit(len(hits) + 1 + query.offset, score, item))
        return hits

    def search_index(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search the vector index, caught up with the catalog (see `VectorIndex.search`).

        Searches from several threads run at the same time; a catch-up or commit that
        changes the index waits for them, and they for it.
        """
        self.sync_vectors()
        with self._index_lock.shared():
            assert self._vectors is not None
            return self._vectors.search(queries, k, allowed, source=self.catalog)

    def catalog_kind_condition(self, kind: str) -> Any:
        """A SQL condition selecting items of `kind` (None for any)."""
        return None if kind == "any" else Item.kind == kind

    def allowed_ids(self, filters: Filters) -> np.ndarray | None:
        """The ids a search may return, or None when every item may be returned."""
        conditions = []
        if filters.kind != "any":
            counts = self.catalog.counts()
            if counts[filters.kind] < sum(counts.values()):
                conditions.append(Item.kind == filters.kind)
        if filters.path:
            conditions.append(or_(Item.path.op("GLOB")(filters.path), Item.source.op("GLOB")(filters.path)))
        if filters.after:
            conditions.append(Item.taken_at >= filters.after.isoformat())
        if filters.before:
            conditions.append(Item.taken_at < filters.before.isoformat())
        if filters.min_width is not None:
            conditions.append(Item.width >= filters.min_width)
        if filters.min_height is not None:
            conditions.append(Item.height >= filters.min_height)
        if not conditions:
            return None
        return self.catalog.ids(and_(*conditions))

    def get_item(self, item_id: int) -> Hit:
        item = self.catalog.get_item(item_id)
        if item is None:
            raise ItemNotFound(item_id)
        return _hit(0, 1.0, item)

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


class LibraryWriter:
    """Commits batches to the catalog and keeps the in-memory index in step."""

    SAVE_EVERY_SECONDS = 30.0

    def __init__(self, library: Library) -> None:
        self.library = library
        self._synced = False  # the index is caught up on the first commit, not before
        self._dirty = False
        self._last_save = time.monotonic()

    def commit(
        self,
        items: Sequence[NewItem] = (),
        remove_ids: Sequence[int] = (),
        moves: Sequence[tuple[int, dict[str, Any]]] = (),
    ) -> list[int]:
        """Durably commit one batch; returns the ids of `items`."""
        for item in items:
            if item.vector.shape != (self.library.dim,):
                raise CorruptLibrary(f"vector of shape {item.vector.shape} does not fit this library (dim {self.library.dim})")
        library = self.library
        with library._sync_lock:
            if not self._synced:
                library.sync_vectors()
                self._synced = True
            result = library.catalog.commit_batch(items, remove_ids, moves)
            vectors = library._vectors
            assert vectors is not None
            replaced = [item.id for item in items if item.id is not None]
            gone = list(remove_ids) + replaced
            with library._index_lock.exclusive():
                if gone:
                    vectors.remove(np.asarray(gone, dtype=np.int64))
                if items:
                    vectors.add(np.asarray(result.ids, dtype=np.int64), np.stack([item.vector for item in items]))
            if library._vectors_generation == result.generation - 1:
                library._vectors_generation = result.generation
            else:  # another process wrote in between (cannot happen under the lock): catch up
                library.sync_vectors()
        self._dirty = True
        if time.monotonic() - self._last_save > self.SAVE_EVERY_SECONDS:
            self.flush()
        return result.ids

    def flush(self) -> None:
        if self._dirty:
            self.library.save_vectors()
            self._dirty = False
            self._last_save = time.monotonic()


def open_library(path: str | os.PathLike[str] | None = None, model: ModelSpec | None = None, device: str = "auto") -> Library:
    """Open an existing library (see `Library.open`)."""
    return Library.open(path, model=model, device=device)


def _hit(rank: int, score: float, item: Item) -> Hit:
    return Hit(rank=rank, score=score, id=item.id, kind=item.kind, path=item.path, text=item.text, metadata=item.metadata_dict())


def _embedding_dim(model: ResolvedModel) -> int:
    if model.config is not None:
        return int(model.config["embed_dim"])
    import open_clip

    config = open_clip.get_model_config(model.name)
    if config is None:
        raise ModelUnavailable(
            f"unknown open_clip model {model.name!r}; pass a model name open_clip knows "
            "(open_clip.list_models()) or the path of a model-config JSON file"
        )
    return int(config["embed_dim"])


def _saved_generation(directory: Path) -> int:
    """The generation the saved vector index reflects, or -1 when there is none."""
    try:
        return int(json.loads((directory / STAMP_FILE).read_text())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


@contextmanager
def _write_lock(directory: Path) -> Iterator[None]:
    lock_path = directory / LOCK_FILE
    handle = open(lock_path, "a+")
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
            pass
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise LibraryBusy(
                f"library {directory} is being written by {holder}; wait for that run to finish "
                "(searching it meanwhile works)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()
