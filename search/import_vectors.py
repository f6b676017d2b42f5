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
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from clipdex.search.catalog import KINDS, NewItem
from clipdex.search.errors import InvalidVectors, MissingDependency, ModelMismatch
from clipdex.search.model import ResolvedModel

if TYPE_CHECKING:
    from clipdex.search.library import Library

NORM_TOLERANCE = 1e-3
EXPORT_ARRAYS = ("ids", "kinds", "paths", "texts", "vectors", "model")


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


def import_vectors(
    library: "Library",
    sources: Sequence[str | Path],
    model_name: str | None = None,
    batch_size: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import every embeddings file or clip-retrieval folder in `sources` into `library`."""
    started = time.perf_counter()
    report = ImportReport()
    batches = [batch for source in sources for batch in read_source(Path(source), library, model_name, report)]
    report.normalized = sum(_normalize(batch) for batch in batches)  # every file checked before any commit
    total, done = sum(len(batch.kinds) for batch in batches), 0
    with library.writer() as writer:
        for batch in batches:
            for start in range(0, len(batch.kinds), batch_size):
                items, kept = _new_items(library, batch, slice(start, start + batch_size))
                report.kept += kept
                report.replaced += sum(item.id is not None for item in items)
                report.added += sum(item.id is None for item in items)
                if items:
                    writer.commit(items=items)
                done += min(batch_size, len(batch.kinds) - start)
                if progress:
                    progress(done, total)
            report.files.append(str(batch.origin))
    if report.normalized:
        report.notes.append(f"{report.normalized} vectors were not of unit length and were normalized")
    if report.kept:
        report.notes.append(
            f"{report.kept} rows name images already indexed from their files; those items were kept as they are "
            "(vector, size, mtime, hash, dimensions, capture time and camera)"
        )
    report.index_rebuilt = library.rebuild_if_outgrown()
    report.index_type = library.vectors.spec.type
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def read_source(source: Path, library: "Library", model_name: str | None, report: ImportReport) -> Iterator[VectorBatch]:
    if source.is_dir():
        yield from read_clip_retrieval(source, library.dim, library.model, model_name, report)
    elif source.suffix == ".npz" and source.is_file():
        yield read_export(source, library.dim, library.model, model_name)
    else:
        raise InvalidVectors(
            f"{source}: not a clipdex export (.npz) nor a clip-retrieval output folder "
            "(with img_emb/, text_emb/ and metadata/)"
        )


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


def read_clip_retrieval(
    folder: Path, dim: int, model: ResolvedModel, model_name: str | None, report: ImportReport
) -> Iterator[VectorBatch]:
    """Image and text rows of a clip-retrieval inference output folder."""
    parts = sorted(_numbered(folder / "metadata", "metadata", ".parquet").items())
    if not parts:
        raise InvalidVectors(f"{folder}: no metadata/metadata_N.parquet files: not a clip-retrieval output folder")
    if model_name and not _same_name(model_name, model.name):
        raise ModelMismatch(f"--model-name {model_name} is not this library's model {model.describe()}")
    if not model_name:
        report.notes.append(
            f"{folder}: clip-retrieval output records no model, so only the dimension ({dim}) was checked; "
            "pass --model-name to assert the model"
        )
    images = _numbered(folder / "img_emb", "img_emb", ".npy")
    texts = _numbered(folder / "text_emb", "text_emb", ".npy")
    parquet = _parquet()
    for number, metadata_path in parts:
        rows = parquet.read_table(metadata_path).to_pylist()
        if number in images:
            yield _image_rows(images[number], rows, dim, metadata_path)
        if number in texts:
            yield _text_rows(texts[number], rows, dim, metadata_path)


def _image_rows(path: Path, rows: list[dict[str, Any]], dim: int, metadata_path: Path) -> VectorBatch:
    vectors = _check_rows(_check_dim(_load_npy(path), dim, path), rows, path, metadata_path)
    column = next((name for name in ("image_path", "url") if rows and name in rows[0]), None)
    if column is None:
        raise InvalidVectors(f"{metadata_path}: no image_path (or url) column to name the images by")
    paths = [_local_path(str(row[column])) for row in rows]
    extras = [{key: value for key, value in row.items() if key != column and value is not None} for row in rows]
    return VectorBatch(path, ["image"] * len(rows), vectors, list(paths), [None] * len(rows), [""] * len(rows), extras)


def _text_rows(path: Path, rows: list[dict[str, Any]], dim: int, metadata_path: Path) -> VectorBatch:
    vectors = _check_rows(_check_dim(_load_npy(path), dim, path), rows, path, metadata_path)
    if rows and "caption" not in rows[0]:
        raise InvalidVectors(f"{metadata_path}: no caption column for the text embeddings in {path}")
    texts = [None if row["caption"] is None else str(row["caption"]) for row in rows]
    missing = [number for number, text in enumerate(texts) if text is None]
    if missing:
        raise InvalidVectors(f"{metadata_path}: row {missing[0]} has no caption for its text embedding")
    extras = [{key: value for key, value in row.items() if key != "caption" and value is not None} for row in rows]
    keys = [str(number) for number in range(len(rows))]
    return VectorBatch(path, ["text"] * len(rows), vectors, [None] * len(rows), list(texts), keys, extras)


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
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:  # not an .npy, truncated, or objects (pickle stays off)
        raise InvalidVectors(f"{path}: cannot read it as an .npy array: {error}") from error


def _check_dim(vectors: np.ndarray, dim: int, path: Path) -> np.ndarray:
    if vectors.dtype.kind not in "fiu":  # strings, complex numbers, booleans, records
        raise InvalidVectors(f"{path}: holds {vectors.dtype} values; embeddings must be real numbers (e.g. float32)")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        shape = "x".join(str(size) for size in vectors.shape)
        raise InvalidVectors(f"{path}: vectors of shape {shape}; this library's model has {dim} dimensions")
    return vectors


def _check_rows(vectors: np.ndarray, rows: list[dict[str, Any]], path: Path, metadata_path: Path) -> np.ndarray:
    if len(vectors) != len(rows):
        raise InvalidVectors(f"{path} has {len(vectors)} vectors but {metadata_path} has {len(rows)} rows")
    return vectors


def _normalize(batch: VectorBatch) -> int:
    """Normalize the rows off unit length (in place); the number normalized."""
    vectors = np.array(batch.vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise InvalidVectors(f"{batch.origin}: row {bad[0]} is a zero or non-finite vector; nothing from this file was imported")
    off = np.abs(norms - 1) > NORM_TOLERANCE
    vectors[off] /= norms[off, None]
    batch.vectors = vectors
    return int(np.count_nonzero(off))


def _new_items(library: "Library", batch: VectorBatch, rows: slice) -> tuple[list[NewItem], int]:
    """Catalog items for `rows` of the batch, and how many rows were left out because they name
    an image indexed from its file. Rows naming an item an earlier import made replace it."""
    origin = str(batch.origin.resolve())
    items: dict[tuple[str, str], NewItem] = {}  # the last row wins among duplicates
    for row in range(*rows.indices(len(batch.kinds))):
        kind = batch.kinds[row]
        extra = {**batch.extras[row], "imported_from": origin}
        vector = batch.vectors[row]
        if kind == "image":
            items[("image", str(batch.paths[row]))] = NewItem("image", vector, path=batch.paths[row], extra=extra)
        else:
            key = batch.keys[row]
            items[("text", key)] = NewItem("text", vector, text=batch.texts[row], source=origin, source_key=key, extra=extra)
    indexed = _match_existing(library, origin, list(items.values()))
    kept = [item for item in items.values() if item.id in indexed]
    return [item for item in items.values() if item.id not in indexed], len(kept)


def _match_existing(library: "Library", origin: str, items: list[NewItem]) -> set[int]:
    """Set the id of items whose image path or (source, key) is already in the catalog; return
    the ids among them of images indexed from their files (which an import must not replace)."""
    by_path = library.catalog.images_at_paths([item.path for item in items if item.kind == "image" and item.path])
    by_key = library.catalog.ids_of_keys(origin, [item.source_key for item in items if item.kind == "text" and item.source_key])
    for item in items:
        if item.kind == "image":
            found = by_path.get(item.path or "")
            item.id = found[0] if found else None
        else:
            item.id = by_key.get(item.source_key or "")
    return {item_id for item_id, from_file in by_path.values() if from_file}


def _local_path(value: str) -> str:
    """An existing local file as an absolute path; anything else (a URL, a missing file) as given."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.is_file() else value


def _same_name(asserted: str, name: str) -> bool:
    """Model names compared case-insensitively, with '/' read as '-' (ViT-B/32 is ViT-B-32)."""
    return asserted.strip().lower().replace("/", "-") == name.strip().lower().replace("/", "-")
