"""Importing precomputed embeddings: clipdex `export` files and clip-retrieval output.

- A `.npz` from `clipdex export` (arrays ids, kinds, paths, texts, vectors, model) must
  come from the library's own model; its manifest record says which.
- A clip-retrieval inference folder (`img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`,
  `metadata/metadata_N.parquet` with image_path and caption columns) records no model:
  only the dimension can be checked, unless `model_name` asserts the model.

Images become image items under their path (made absolute when it names an existing
file), texts become text items keyed by the file they came from and their row or
original id, so importing the same file again replaces rather than duplicates. Vectors
are stored as given, except that rows off unit length are normalized (and counted).

An import never degrades an item indexed from its file: a row naming the path of an
image that `clipdex index` read (it has the file's size, mtime and hash) leaves that item
as it is and is counted as `kept` - only items an earlier import made are replaced.

The import is a bulk path, at the speed of the disk: every file's shape, row count and
columns are checked first; then the rows stream in chunks of `CHUNK_ROWS` (vectors read
from memory maps, metadata a chunk at a time) into one catalog transaction and one
generation (`Catalog.import_rows`), so a bad row anywhere leaves nothing imported; and the
vector index is built once: into an empty library while the rows go in (`StreamedIndex`),
else at the end, streamed from the catalog. Only an import smaller than the library is
logged row by row and caught up into the existing index instead.
"""

from __future__ import annotations

import gc
import json
import os
import re
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from clipdex.search.catalog.database import KINDS, ImportRows
from clipdex.search.catalog.vector_rows import half_to_single
from clipdex.search.errors import InvalidVectors, MissingDependency, ModelMismatch
from clipdex.search.index.choice import HNSW_EF_CONSTRUCTION, resolve_spec, training_rows, training_size
from clipdex.search.index.coarse import normalize_in_place
from clipdex.search.encoders.model import ResolvedModel
from clipdex.search.index.sharded import IndexBuilder
from clipdex.search.index.vectors import IndexSpec, VectorIndex

if TYPE_CHECKING:
    from clipdex.search.index.parts import IndexedLibrary
    from clipdex.search.index.rerank_cache import RerankCache

NORM_TOLERANCE = 1e-3
CHUNK_ROWS = 20_000  # rows read, checked and inserted at a time
EXPORT_ARRAYS = ("ids", "kinds", "paths", "texts", "vectors", "model")
_EXTRA_JSON = json.JSONEncoder(default=str)  # json.dumps(extra, default=str), without making an encoder a row


@dataclass
class VectorBatch:
    """Rows read from one embeddings file, ready to become catalog items."""

    origin: Path
    kinds: list[str]
    vectors: np.ndarray
    paths: list[str | None]
    texts: list[str | None]
    keys: list[str]  # text items: a key unique within `origin`
    extras: list[dict[str, Any]]
    half: bool = False  # given as float16: stored so (`stored_bytes`), losing nothing
    halves: np.ndarray | None = None  # the rows as given in float16, while none was normalized: stored as they are


@dataclass
class ImportReport:
    added: int = 0
    replaced: int = 0
    kept: int = 0  # rows naming an image indexed from its file: that item was left as it is
    normalized: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    index_type: str = ""
    index_rebuilt: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Part:
    """One embeddings file, checked up front (`rows` known), read chunk by chunk by `read`."""

    origin: Path
    rows: int
    read: Callable[[], Iterator[VectorBatch]]


def import_vectors(
    library: "IndexedLibrary",
    sources: Sequence[str | Path],
    model_name: str | None = None,
    batch_size: int = CHUNK_ROWS,
    progress: Callable[[int, int], None] | None = None,
    memory_budget: int | None = None,
    float16: bool = False,
) -> ImportReport:
    """Import every embeddings file or clip-retrieval folder in `sources` into `library`
    (see the module docstring: one transaction, the index built once at the end).
    `memory_budget` (bytes): the index is chosen to fit it (`clipdex.search.index.choice`),
    and later rebuilds keep to it; else the budget the library's index was chosen under, if any.
    Vectors are stored in the catalog as given: float16 when a file holds float16 (clip-retrieval
    writes float16), float32 otherwise; `float16` stores every vector as float16 (half the disk)."""
    started = time.perf_counter()
    report = ImportReport()
    parts = [part for source in sources for part in plan_source(Path(source), library, model_name, report, batch_size)]
    total = sum(part.rows for part in parts)
    with library.locked():
        existing = sum(library.catalog.counts().values())
        log_changes = 0 < total < existing  # a small addition: catch the index up; else build it once
        recorded = library.manifest.index
        wanted = recorded if memory_budget is None else replace(recorded, memory_budget=memory_budget, pinned=False)
        spec = resolve_spec(wanted, existing + total, library.dim)
        streamed = StreamedIndex.start(library.dim, spec, parts, library.path) if existing == 0 and total else None
        cache = _rerank_cache(library, spec, existing)
        before = library.catalog.generation()

        def inserted(ids: np.ndarray, vectors: np.ndarray, halves: np.ndarray | None) -> None:
            if cache is not None:
                cache.write(ids, vectors, halves)
            if streamed is not None:
                streamed.add(ids, vectors, halves)

        try:
            with _collector_paused():
                result = library.catalog.import_rows(_rows(parts, report, total, progress, float16), log_changes,
                                                     inserted=inserted if streamed or cache else None)
        except BaseException:
            if streamed:
                streamed.abandon()
            raise
        if cache is not None and result.replaced == 0:  # vectors replaced under their ids: written again at the rebuild
            cache.mirrored(before, result.generation)
        index = streamed.finish() if streamed else None
        report.added, report.replaced, report.kept = result.added, result.replaced, result.kept
        if index is not None and result.replaced == 0 and index.ntotal == result.added:
            library.store.adopt(index, result.generation)
            report.index_rebuilt = (spec.type, spec.factory) != (recorded.type, recorded.factory)
        else:
            report.index_rebuilt = _update_index(library, log_changes, wanted)
        library.catalog.truncate_log()
    if report.normalized:
        report.notes.append(f"{report.normalized} vectors were not of unit length and were normalized")
    if report.kept:
        report.notes.append(
            f"{report.kept} rows name images already indexed from their files; those items were kept as they are "
            "(vector, size, mtime, hash, dimensions, capture time and camera)"
        )
    report.index_type = library.vectors.spec.type
    report.seconds = round(time.perf_counter() - started, 2)
    return report


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the rows stream in: each chunk makes hundreds of thousands
    of tuples, strings and dicts (none in a cycle: counting references frees them), and the collector
    walked them all, again and again, for a fifteenth of the import's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rerank_cache(library: "IndexedLibrary", spec: IndexSpec, existing: int) -> "RerankCache | None":
    """The library's rerank cache, to write the imported rows to as they go in, when the index
    will rerank its codes and the cache mirrors the catalog now (an empty library's is made so)."""
    # an empty library's is filled now: nothing to read, a header saying so
    if not spec.reranks_codes or not library.store.keep_rerank_cache(fill=existing == 0, spec=spec):
        return None
    cache = library.store.rerank_cache
    return cache if cache.mirrors(library.catalog.generation()) else None


def _rows(parts: list[Part], report: ImportReport, total: int, progress: Callable[[int, int], None] | None,
          float16: bool = False) -> Iterator[ImportRows]:
    done = 0
    for part in parts:
        origin = str(part.origin.resolve())
        for batch in part.read():
            normalized = _normalize(batch)
            report.normalized += normalized
            batch.half = float16 or (batch.half and not normalized)  # normalized rows are no longer as given: float32
            yield from _import_rows(batch, origin)
            done += len(batch.kinds)
            if progress:
                progress(done, total)
        report.files.append(str(part.origin))


def _update_index(library: "IndexedLibrary", log_changes: bool, wanted: IndexSpec) -> bool:
    """Bring the vector index up to the import (the write lock is held); True if its type changed.
    `wanted`: the recorded spec, with the import's memory budget when it gives one (a rebuild keeps to it)."""
    store = library.store
    if log_changes:
        store.sync()
        if store.rebuild_if_outgrown():
            return True
        store.save()
        return False
    spec = resolve_spec(wanted, sum(library.catalog.counts().values()), library.dim)
    store.rebuild(spec)
    return (spec.type, spec.factory) != (wanted.type, wanted.factory)


class StreamedIndex:
    """The vector index of an import into an empty library, built while the rows go into
    the catalog: a worker thread trains the quantizers on a sample read from the files
    (the rows a rebuild from the catalog would draw), then adds each chunk as the catalog
    assigns its ids. FAISS and SQLite release the GIL, so building overlaps inserting.

    Memory stays bounded however many rows come: an inverted file too big to grow in memory
    is built in shards spilled under `scratch` (`clipdex.search.index.sharded`), and when the
    worker falls `MAX_PENDING` chunks behind (training the quantizer of ten million vectors
    takes minutes), further chunks wait in a spool file there rather than in memory or
    holding up the catalog."""

    MAX_PENDING = 4  # chunks handed to the worker in memory and not yet added

    def __init__(self, index: VectorIndex, training: np.ndarray | None, expected: int, scratch: Path | None = None) -> None:
        self.index = index
        self._builder = IndexBuilder(index, scratch, expected)
        self._scratch = scratch
        self._spool: Any = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="clipdex-index")
        self._pending: deque[Future[None]] = deque()  # chunks in memory
        self._spooled: deque[Future[None]] = deque()  # chunks in the spool file
        if training is not None:
            self._pending.append(self._worker.submit(index.train, training))

    @classmethod
    def start(cls, dim: int, spec: IndexSpec, parts: list[Part], scratch: Path | None = None) -> "StreamedIndex | None":
        """None unless every part is a .npy file (a sample can be read from it at random)."""
        if not all(part.origin.suffix == ".npy" for part in parts):
            return None
        index = VectorIndex(dim, spec)
        if spec.type == "hnsw":
            index.hnsw_graph().hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        total = sum(part.rows for part in parts)
        training = None if index.is_trained else _sample_rows(parts, training_rows(total, training_size(spec, total)), dim)
        return cls(index, training, total, scratch)

    def add(self, ids: np.ndarray, vectors: np.ndarray, halves: np.ndarray | None = None) -> None:
        """Add these rows (`halves`: the same in float16, exactly, when the import has them: what
        a chunk spools, in half the disk)."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        while self._spooled and self._spooled[0].done():
            self._spooled.popleft().result()
        if len(self._pending) >= self.MAX_PENDING and self._spool_file() is not None:
            self._spooled.append(self._worker.submit(self._add_spooled, *self._write_spool(ids, vectors if halves is None else halves)))
            return
        while len(self._pending) >= self.MAX_PENDING:
            self._pending.popleft().result()
        self._pending.append(self._worker.submit(self._builder.add, ids, np.array(vectors, dtype=np.float32)))

    def _spool_file(self) -> Any:
        if self._spool is None and self._scratch is not None:
            try:
                self._spool = tempfile.TemporaryFile(prefix="clipdex-import-", dir=self._scratch)
            except OSError:
                self._scratch = None
        return self._spool

    def _write_spool(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[int, int, bool]:
        """Spool a chunk: its ids, then its vectors as they are given (float16 or float32)."""
        half = vectors.dtype == np.float16
        self._spool.seek(0, os.SEEK_END)
        offset = self._spool.tell()
        self._spool.write(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        self._spool.write(np.ascontiguousarray(vectors, dtype=np.float16 if half else np.float32).tobytes())
        self._spool.flush()
        return offset, len(ids), half

    def _add_spooled(self, offset: int, count: int, half: bool) -> None:
        width = 2 if half else 4
        data = os.pread(self._spool.fileno(), count * (8 + width * self.index.dim), offset)
        ids = np.frombuffer(data, dtype=np.int64, count=count)
        vectors = np.frombuffer(data, dtype=np.float16 if half else np.float32, offset=8 * count).reshape(count, self.index.dim)
        self._builder.add(ids, half_to_single(vectors) if half else vectors)

    def abandon(self) -> None:
        """Stop after the chunk in progress; the import failed."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._builder.abandon()
        self._close_spool()

    def finish(self) -> VectorIndex:
        """The index once every chunk is in (raises what the worker raised)."""
        try:
            for queue in (self._pending, self._spooled):
                while queue:
                    queue.popleft().result()
            return self._builder.finish()
        except BaseException:
            self._builder.abandon()
            raise
        finally:
            self._worker.shutdown(cancel_futures=True)
            self._close_spool()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def _sample_rows(parts: list[Part], rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows of the parts taken as one sequence of rows (sorted), read from memory maps (one
    part's at a time) into one array, held once: as float16 when every part is (made unit
    float32 a part at a time where it trains, `VectorIndex.train`: 420 MB for the 409,600 rows
    of ten million 512-d vectors' 8,192 lists, not 840), else as unit float32 rows."""
    half = all(np.load(part.origin, mmap_mode="r").dtype == np.float16 for part in parts)
    sample = np.empty((len(rows), dim), dtype=np.float16 if half else np.float32)
    done, start = 0, 0
    for part in parts:
        local = rows[(rows >= start) & (rows < start + part.rows)] - start
        if len(local):
            sample[done : done + len(local)] = np.load(part.origin, mmap_mode="r")[local]
            done += len(local)
        start += part.rows
    return sample if half else normalize_in_place(sample)


def plan_source(source: Path, library: "IndexedLibrary", model_name: str | None, report: ImportReport, chunk_rows: int) -> list[Part]:
    if source.is_dir():
        return plan_clip_retrieval(source, library.dim, library.model, model_name, report, chunk_rows)
    if source.suffix == ".npz" and source.is_file():
        batch = read_export(source, library.dim, library.model, model_name)
        return [Part(source, len(batch.kinds), lambda: _slices(batch, chunk_rows))]
    raise InvalidVectors(
        f"{source}: not a clipdex export (.npz) nor a clip-retrieval output folder "
        "(with img_emb/, text_emb/ and metadata/)"
    )


def _slices(batch: VectorBatch, chunk_rows: int) -> Iterator[VectorBatch]:
    for start in range(0, len(batch.kinds), chunk_rows):
        rows = slice(start, start + chunk_rows)
        yield VectorBatch(batch.origin, batch.kinds[rows], batch.vectors[rows], batch.paths[rows], batch.texts[rows],
                          batch.keys[rows], batch.extras[rows], batch.half)


def read_export(path: Path, dim: int, model: ResolvedModel, model_name: str | None) -> VectorBatch:
    """The rows of a `clipdex export` file, refused unless made with the library's model."""
    try:
        data = np.load(path, allow_pickle=False)
        missing = [name for name in EXPORT_ARRAYS if name not in data.files]
        exported = ResolvedModel.from_json(json.loads(str(data["model"]))) if "model" in data.files else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidVectors(f"{path}: cannot read it as a clipdex export: {error}") from error
    if missing or exported is None:
        raise InvalidVectors(f"{path}: not a clipdex export, it lacks the arrays {', '.join(missing)}")
    if not model.same_model(exported) or (model_name and not _same_name(model_name, exported.name)):
        raise ModelMismatch(
            f"{path} holds vectors of model {exported.describe()}; this library uses {model.describe()}. "
            "Import it into a library of that model (clipdex index --model/--pretrained makes one)"
        )
    arrays = _export_arrays(data, path)
    vectors = _check_dim(arrays["vectors"], dim, path)
    kinds = [str(kind) for kind in arrays["kinds"]]
    unknown = next((row for row, kind in enumerate(kinds) if kind not in KINDS), None)
    if unknown is not None:
        raise InvalidVectors(f"{path}: row {unknown} has kind {kinds[unknown]!r}; clipdex knows {' and '.join(KINDS)}")
    return VectorBatch(
        origin=path,
        kinds=kinds,
        vectors=vectors,
        paths=[str(p) if kind == "image" else None for p, kind in zip(arrays["paths"], kinds)],
        texts=[str(t) if kind == "text" else None for t, kind in zip(arrays["texts"], kinds)],
        keys=[str(int(i)) for i in arrays["ids"]],
        extras=[{} for _ in kinds],
        half=vectors.dtype == np.float16,
    )


def _export_arrays(data: Any, path: Path) -> dict[str, np.ndarray]:
    """The row arrays of an export, each one-dimensional (vectors: two) of one length and the expected type."""
    expected = {"ids": "iu", "kinds": "U", "paths": "U", "texts": "U", "vectors": "fiu"}
    arrays = {}
    for name, kinds in expected.items():
        try:
            array = np.asarray(data[name])
        except (OSError, ValueError) as error:  # object arrays need pickle, which stays off
            raise InvalidVectors(f"{path}: cannot read its array {name!r}: {error}") from error
        if array.dtype.kind not in kinds or array.ndim != (2 if name == "vectors" else 1):
            raise InvalidVectors(f"{path}: its array {name!r} holds {array.ndim}-dimensional {array.dtype} values, not {_TYPE_NAMES[name]}")
        arrays[name] = array
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} {length}" for name, length in lengths.items())
        raise InvalidVectors(f"{path}: its arrays disagree in length ({described}); every array needs one entry per item")
    return arrays


_TYPE_NAMES = {
    "ids": "a list of integers",
    "kinds": "a list of strings",
    "paths": "a list of strings",
    "texts": "a list of strings",
    "vectors": "a table of real numbers",
}


def plan_clip_retrieval(
    folder: Path, dim: int, model: ResolvedModel, model_name: str | None, report: ImportReport, chunk_rows: int = CHUNK_ROWS
) -> list[Part]:
    """The image and text files of a clip-retrieval inference output folder, each checked
    against its metadata file (dimension, row count, columns) without reading the rows."""
    parts = sorted(_numbered(folder / "metadata", "metadata", ".parquet").items())
    if not parts:
        raise InvalidVectors(f"{folder}: no metadata/metadata_N.parquet files: not a clip-retrieval output folder")
    if model_name and not _same_name(model_name, model.name):
        raise ModelMismatch(f"model_name={model_name} is not this library's model {model.describe()}")
    if not model_name:
        report.notes.append(
            f"{folder}: clip-retrieval output records no model, so only the dimension ({dim}) was checked; "
            "pass --model-name to assert the model"
        )
    images = _numbered(folder / "img_emb", "img_emb", ".npy")
    texts = _numbered(folder / "text_emb", "text_emb", ".npy")
    parquet = _parquet()
    planned: list[Part] = []
    paths = LocalPaths()
    for number, metadata_path in parts:
        metadata = parquet.ParquetFile(metadata_path)
        rows, columns = metadata.metadata.num_rows, list(metadata.schema_arrow.names)
        if number in images:
            _check_rows(_check_dim(_load_npy(images[number]), dim, images[number]), rows, images[number], metadata_path)
            column = next((name for name in ("image_path", "url") if name in columns), None)
            if column is None:
                raise InvalidVectors(f"{metadata_path}: no image_path (or url) column to name the images by")
            planned.append(Part(images[number], rows, _reader(_image_rows, images[number], metadata_path, column, paths, chunk_rows)))
        if number in texts:
            _check_rows(_check_dim(_load_npy(texts[number]), dim, texts[number]), rows, texts[number], metadata_path)
            if "caption" not in columns:
                raise InvalidVectors(f"{metadata_path}: no caption column for the text embeddings in {texts[number]}")
            planned.append(Part(texts[number], rows, _reader(_text_rows, texts[number], metadata_path, "caption", paths, chunk_rows)))
    return planned


def _reader(
    make: Callable[..., VectorBatch], path: Path, metadata_path: Path, column: str, paths: "LocalPaths", chunk_rows: int
) -> Callable[[], Iterator[VectorBatch]]:
    """Read a part: its metadata once (columns), its vectors and rows a chunk at a time
    (`_chunks`: read into memory of their own, so that the part's pages stay the kernel's cache
    and never count as the process's memory, as a memory map's pages read through do)."""

    def read() -> Iterator[VectorBatch]:
        table = _parquet().read_table(metadata_path)
        for start, vectors in _chunks(path, chunk_rows):
            chunk = table.slice(start, chunk_rows).to_pydict()
            yield make(path, vectors, chunk, column, start, metadata_path, paths)

    return read


def _chunks(path: Path, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of an .npy file, `chunk_rows` at a time, read with `pread` at the offsets
    its header gives (the memory map only describes the file: its pages are never touched); a
    column-major file, whose rows are not contiguous, is sliced from the map instead."""
    mapped = np.load(path, mmap_mode="r")
    rows, row_bytes = len(mapped), mapped.dtype.itemsize * int(np.prod(mapped.shape[1:]))
    contiguous = mapped.flags.c_contiguous and isinstance(mapped, np.memmap)
    with open(path, "rb", buffering=0) as file:
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            if not contiguous:
                yield start, np.array(mapped[start : start + count])
                continue
            data = os.pread(file.fileno(), count * row_bytes, mapped.offset + start * row_bytes)
            if len(data) != count * row_bytes:
                raise InvalidVectors(f"{path}: the file ends before row {start + count} its header promises")
            yield start, np.frombuffer(data, dtype=mapped.dtype).reshape((count, *mapped.shape[1:]))


def _extras(columns: dict[str, list[Any]], skip: str, count: int) -> list[dict[str, Any]]:
    """Each row's other metadata columns, leaving out missing values."""
    others = [(name, values) for name, values in columns.items() if name != skip]
    return [{name: values[row] for name, values in others if values[row] is not None} for row in range(count)]


def _image_rows(
    path: Path, vectors: np.ndarray, columns: dict[str, list[Any]], column: str, start: int, metadata_path: Path, paths: "LocalPaths"
) -> VectorBatch:
    count = len(vectors)
    names = [paths.local(str(value)) for value in columns[column]]
    return VectorBatch(path, ["image"] * count, vectors, list(names), [None] * count, [""] * count, _extras(columns, column, count),
                       vectors.dtype == np.float16)


def _text_rows(
    path: Path, vectors: np.ndarray, columns: dict[str, list[Any]], column: str, start: int, metadata_path: Path, paths: "LocalPaths"
) -> VectorBatch:
    count = len(vectors)
    texts = [None if text is None else str(text) for text in columns[column]]
    missing = [number for number, text in enumerate(texts) if text is None]
    if missing:
        raise InvalidVectors(f"{metadata_path}: row {start + missing[0]} has no caption for its text embedding; nothing was imported")
    keys = [str(start + number) for number in range(count)]
    return VectorBatch(path, ["text"] * count, vectors, [None] * count, list(texts), keys, _extras(columns, column, count),
                       vectors.dtype == np.float16)


def _parquet() -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise MissingDependency(
            "reading clip-retrieval metadata (.parquet) needs pyarrow: pip install 'clipdex[parquet]' "
            "(or pip install pyarrow)"
        ) from error
    return parquet


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+){re.escape(suffix)}")
    found = {}
    for path in folder.glob(f"{prefix}_*{suffix}") if folder.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _load_npy(path: Path) -> np.ndarray:
    """A memory map of an .npy file (objects refused: pickle stays off)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:  # not an .npy, truncated, or objects
        raise InvalidVectors(f"{path}: cannot read it as an .npy array: {error}") from error


def _check_dim(vectors: np.ndarray, dim: int, path: Path) -> np.ndarray:
    if vectors.dtype.kind not in "fiu":  # strings, complex numbers, booleans, records
        raise InvalidVectors(f"{path}: holds {vectors.dtype} values; embeddings must be real numbers (e.g. float32)")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        shape = "x".join(str(size) for size in vectors.shape)
        raise InvalidVectors(f"{path}: vectors of shape {shape}; this library's model has {dim} dimensions")
    return vectors


def _check_rows(vectors: np.ndarray, rows: int, path: Path, metadata_path: Path) -> np.ndarray:
    if len(vectors) != rows:
        raise InvalidVectors(f"{path} has {len(vectors)} vectors but {metadata_path} has {rows} rows")
    return vectors


def _normalize(batch: VectorBatch) -> int:
    """Normalize the rows off unit length (in place, as float32); the number normalized."""
    given = np.asarray(batch.vectors)
    halves = np.ascontiguousarray(given) if given.dtype == np.float16 else None
    vectors = half_to_single(halves) if halves is not None else np.array(given, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise InvalidVectors(f"{batch.origin}: row {bad[0]} is a zero or non-finite vector; nothing was imported")
    off = np.abs(norms - 1) > NORM_TOLERANCE
    vectors[off] /= norms[off, None]
    batch.vectors = vectors
    batch.halves = halves if not off.any() else None  # what the catalog and the rerank cache keep: not converted back
    return int(np.count_nonzero(off))


def _import_rows(batch: VectorBatch, origin: str) -> Iterator[ImportRows]:
    """The batch as catalog rows, one `ImportRows` per kind; the last row wins among rows
    naming the same image path or text key."""
    by_kind: dict[str, dict[str, int]] = {"image": {}, "text": {}}
    for row, kind in enumerate(batch.kinds):
        by_kind[kind][str(batch.paths[row]) if kind == "image" else batch.keys[row]] = row
    suffix = f'"imported_from": {json.dumps(origin)}}}'
    encode = _EXTRA_JSON.encode
    for kind, rows in by_kind.items():
        if not rows:
            continue
        every = len(rows) == len(batch.kinds)  # the usual chunk: one kind, no path twice; taken as it is
        chosen = range(len(rows)) if every else np.fromiter(rows.values(), dtype=np.int64, count=len(rows)).tolist()
        extras: list[str | None] = [encode(extra)[:-1] + ", " + suffix if extra else "{" + suffix
                                    for extra in map(batch.extras.__getitem__, chosen)]
        texts = [str(batch.texts[row]) for row in chosen] if kind == "text" else None
        taken = slice(None) if every else np.asarray(chosen, dtype=np.int64)
        halves = batch.halves[taken] if batch.halves is not None else None
        yield ImportRows(kind, batch.vectors[taken], list(rows), extras, texts, origin if kind == "text" else None, batch.half,
                         halves)


class LocalPaths:
    """Image names as `_local_path` makes them, a folder listed once rather than a file
    looked up per row: an existing local file becomes its resolved absolute path; anything
    else (a URL, a missing file) stays as given."""

    def __init__(self) -> None:
        self._folders: dict[str, tuple[str, set[str], set[str]] | None] = {}  # folder -> (real path, files, links)

    def local(self, value: str) -> str:
        if "://" in value:
            return value
        parent, name = os.path.split(os.path.expanduser(value))
        folder = self._folder(parent or ".")
        if folder is None:
            return value
        real, files, links = folder
        if name in links:
            return _local_path(value)
        return os.path.join(real, name) if name in files else value

    def _folder(self, folder: str) -> tuple[str, set[str], set[str]] | None:
        if folder not in self._folders:
            files: set[str] = set()
            links: set[str] = set()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.is_symlink():
                            links.add(entry.name)
                        elif entry.is_file():
                            files.add(entry.name)
                self._folders[folder] = (os.path.realpath(folder), files, links)
            except OSError:
                self._folders[folder] = None
        return self._folders[folder]


def _local_path(value: str) -> str:
    """An existing local file as an absolute path; anything else (a URL, a missing file) as given."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.is_file() else value


def _same_name(asserted: str, name: str) -> bool:
    """Model names compared case-insensitively, with '/' read as '-' (ViT-B/32 is ViT-B-32)."""
    return asserted.strip().lower().replace("/", "-") == name.strip().lower().replace("/", "-")
