"""`clipdex import-vectors`: clipdex export files and clip-retrieval output folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import clipdex.search.index_choice as choice
from clipdex.cli.main import app
from clipdex.search.catalog import NewItem
from clipdex.search.errors import ModelMismatch
from clipdex.search.import_vectors import InvalidVectors, MissingDependency, import_vectors
from clipdex.search.library import Library
from clipdex.search.model import ModelSpec

DIM = 32


def unit(count: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def other_library(tmp_path: Path, tiny_model: ModelSpec) -> Library:
    lib = Library.open(tmp_path / "other-library", model=tiny_model, create=True, device="cpu")
    yield lib
    lib.close()


def clip_retrieval_folder(root: Path, count: int = 12, dim: int = DIM, scale: float = 1.0) -> Path:
    """The layout clip-retrieval's inference writes, with real image files for half the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("img_emb", "text_emb", "metadata"):
        (root / name).mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir(exist_ok=True)
    paths = []
    for row in range(count):
        path = images / f"{row}.jpg"
        if row % 2 == 0:
            path.write_bytes(b"jpeg")
        paths.append(str(path))
    np.save(root / "img_emb" / "img_emb_0.npy", (scale * unit(count, seed=1, dim=dim)).astype(np.float16))
    np.save(root / "text_emb" / "text_emb_0.npy", (scale * unit(count, seed=2, dim=dim)).astype(np.float16))
    table = pa.table({"image_path": paths, "caption": [f"caption {row}" for row in range(count)], "width": list(range(count))})
    pq.write_table(table, root / "metadata" / "metadata_0.parquet")
    return root


def test_export_then_import_round_trip(library: Library, other_library: Library, tmp_path: Path) -> None:
    vectors = unit(10)
    items = [NewItem("image", vectors[i], path=f"/photos/{i}.jpg") for i in range(5)]
    items += [NewItem("text", vectors[i], text=f"text {i}", source="/c.txt", source_key=str(i)) for i in range(5, 10)]
    with library.writer() as writer:
        writer.commit(items=items)
    library.export(tmp_path / "out.npz")
    report = import_vectors(other_library, [tmp_path / "out.npz"])
    assert (report.added, report.replaced, report.normalized, report.notes) == (10, 0, 0, [])
    ids, stored = other_library.catalog.all_vectors()
    np.testing.assert_array_equal(stored, vectors)
    imported = other_library.catalog.get_items(ids.tolist())
    assert sorted(item.path for item in imported.values() if item.kind == "image") == [f"/photos/{i}.jpg" for i in range(5)]
    assert sorted(item.text for item in imported.values() if item.kind == "text") == [f"text {i}" for i in range(5, 10)]
    hits = other_library.search(vector=vectors[7], k=1)
    assert hits[0].text == "text 7" and hits[0].metadata["imported_from"] == str((tmp_path / "out.npz").resolve())
    again = import_vectors(other_library, [tmp_path / "out.npz"])
    assert (again.added, again.replaced) == (0, 10) and other_library.vectors.ntotal == 10


def test_export_of_another_model_is_refused(library: Library, tmp_path: Path, tiny_model: ModelSpec) -> None:
    library.export(tmp_path / "out.npz")
    weights = tmp_path / "other-weights.pt"
    weights.write_bytes(b"other weights")
    other = Library.open(tmp_path / "other", model=ModelSpec(tiny_model.name, str(weights)), create=True, device="cpu")
    with pytest.raises(ModelMismatch, match="holds vectors of model tiny-clip .*; this library uses tiny-clip"):
        import_vectors(other, [tmp_path / "out.npz"])
    assert other.vectors.ntotal == 0
    other.close()


def test_clip_retrieval_output(other_library: Library, tmp_path: Path) -> None:
    folder = clip_retrieval_folder(tmp_path / "embeddings")
    report = import_vectors(other_library, [folder])
    assert (report.added, report.replaced) == (24, 0)
    assert report.normalized == 0  # float16 rounding stays within the tolerance: stored as given
    assert any("records no model, so only the dimension (32) was checked" in note for note in report.notes)
    counts = other_library.catalog.counts()
    assert (counts["image"], counts["text"]) == (12, 12)
    image_vectors = np.load(folder / "img_emb" / "img_emb_0.npy").astype(np.float32)
    hit = other_library.search(vector=image_vectors[4], k=1, kind="image")[0]
    assert hit.path == str((folder / "images" / "4.jpg").resolve())
    assert hit.metadata["caption"] == "caption 4" and hit.metadata["width"] == 4
    text_vectors = np.load(folder / "text_emb" / "text_emb_0.npy").astype(np.float32)
    assert other_library.search(vector=text_vectors[3], k=1, kind="text")[0].text == "caption 3"
    again = import_vectors(other_library, [folder], model_name="TINY/clip")
    assert (again.added, again.replaced) == (0, 24) and not again.notes


def test_vectors_off_unit_length_are_normalized(other_library: Library, tmp_path: Path) -> None:
    folder = clip_retrieval_folder(tmp_path / "embeddings", count=6, scale=3.0)
    report = import_vectors(other_library, [folder])
    assert report.normalized == 12 and "12 vectors were not of unit length and were normalized" in report.notes
    _, stored = other_library.catalog.all_vectors()
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda root: clip_retrieval_folder(root, dim=16), InvalidVectors, "shape 12x16; this library's model has 32 dimensions"),
        (lambda root: root / "nothing.txt", InvalidVectors, "not a clipdex export"),
    ],
)
def test_unusable_input_is_refused(other_library: Library, tmp_path: Path, make, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        import_vectors(other_library, [make(tmp_path / "input")])
    assert other_library.vectors.ntotal == 0


def test_asserted_model_name_must_match(other_library: Library, tmp_path: Path) -> None:
    with pytest.raises(ModelMismatch, match="--model-name ViT-L-14 is not this library's model tiny-clip"):
        import_vectors(other_library, [clip_retrieval_folder(tmp_path / "e")], model_name="ViT-L-14")


def test_zero_vectors_are_refused_before_anything_is_imported(other_library: Library, tmp_path: Path) -> None:
    good = clip_retrieval_folder(tmp_path / "good")
    bad = clip_retrieval_folder(tmp_path / "bad")
    vectors = np.load(bad / "text_emb" / "text_emb_0.npy")
    vectors[5] = 0
    np.save(bad / "text_emb" / "text_emb_0.npy", vectors)
    with pytest.raises(InvalidVectors, match="text_emb_0.npy: row 5 is a zero or non-finite vector"):
        import_vectors(other_library, [good, bad])
    assert other_library.vectors.ntotal == 0


def test_missing_pyarrow_names_the_extra(other_library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = clip_retrieval_folder(tmp_path / "e")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependency, match=r"needs pyarrow: pip install 'clipdex\[parquet\]'"):
        import_vectors(other_library, [folder])


def test_import_that_outgrows_flat_rebuilds_the_index(other_library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 100)
    report = import_vectors(other_library, [clip_retrieval_folder(tmp_path / "e", count=60)])
    assert report.index_rebuilt and report.index_type == "hnsw" and other_library.vectors.ntotal == 120


@pytest.mark.parametrize("json_output", [True, False])
def test_import_vectors_command(other_library: Library, tmp_path: Path, json_output: bool) -> None:
    folder = clip_retrieval_folder(tmp_path / "e")
    arguments = ["import-vectors", str(folder), "--library", str(other_library.path), "--quiet"]
    result = CliRunner().invoke(app, arguments + (["--json"] if json_output else []))
    assert result.exit_code == 0, result.output
    if json_output:
        assert json.loads(result.stdout)["added"] == 24
    else:
        assert result.stdout.startswith("24 added, 0 replaced from 2 files")
    assert "note: " in result.stderr and "--model-name" in result.stderr


def test_import_vectors_command_refusal(other_library: Library, tmp_path: Path) -> None:
    folder = clip_retrieval_folder(tmp_path / "e", dim=16)
    result = CliRunner().invoke(app, ["import-vectors", str(folder), "--library", str(other_library.path)])
    assert result.exit_code == 1 and "this library's model has 32 dimensions" in result.stderr


# -- data integrity: an import never degrades what was indexed from files; bad files are one line --


def test_import_into_the_same_library_keeps_items_indexed_from_files(library: Library, tmp_path: Path, make_images) -> None:  # type: ignore[no-untyped-def]
    from clipdex.indexer import index_paths

    make_images(tmp_path / "photos", 3)
    index_paths(library, [tmp_path / "photos"], export_text=False)
    before = {item.path: item for item in library.catalog.get_items(library.catalog.ids().tolist()).values()}
    library.export(tmp_path / "out.npz")
    report = import_vectors(library, [tmp_path / "out.npz"])
    assert (report.added, report.replaced, report.kept) == (0, 0, 3)
    assert any("3 rows name images already indexed from their files" in note for note in report.notes)
    after = {item.path: item for item in library.catalog.get_items(library.catalog.ids().tolist()).values()}
    assert sorted(after) == sorted(before)
    for path, item in after.items():
        old = before[path]
        columns = ("id", "size", "mtime_ns", "content_hash", "width", "height", "device", "inode", "vector", "extra")
        assert [getattr(item, c) for c in columns] == [getattr(old, c) for c in columns]
    rerun = index_paths(library, [tmp_path / "photos"], export_text=False)
    assert (rerun.added, rerun.updated, rerun.unchanged) == (0, 0, 3)  # nothing to re-embed


def test_import_command_reports_kept_items(library: Library, tmp_path: Path, make_images) -> None:  # type: ignore[no-untyped-def]
    from clipdex.indexer import index_paths

    make_images(tmp_path / "photos", 2)
    index_paths(library, [tmp_path / "photos"], export_text=False)
    library.export(tmp_path / "out.npz")
    result = CliRunner().invoke(app, ["import-vectors", str(tmp_path / "out.npz"), "--library", str(library.path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("0 added, 0 replaced, 2 kept (indexed from their files) from 1 files")


def export_file(path: Path, library: Library, **overrides: np.ndarray) -> Path:
    arrays = {
        "ids": np.arange(1, 4, dtype=np.int64),
        "kinds": np.array(["image", "text", "image"]),
        "paths": np.array(["/a.jpg", "", "/b.jpg"]),
        "texts": np.array(["", "hello", ""]),
        "vectors": unit(3),
        "model": np.array(json.dumps(library.model.to_json())),
    }
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kinds": np.array(["image", "video", "image"])}, r"row 1 has kind 'video'; clipdex knows image and text"),
        ({"ids": np.arange(1, 3, dtype=np.int64)}, r"arrays disagree in length \(ids 2, kinds 3, paths 3, texts 3, vectors 3\)"),
        ({"vectors": unit(2)}, r"arrays disagree in length .*vectors 2"),
        ({"kinds": np.array(["image", "text", "image"], dtype=object)}, r"cannot read its array 'kinds': Object arrays cannot be loaded"),
        ({"vectors": unit(3).astype(np.complex64)}, r"its array 'vectors' holds 2-dimensional complex64 values, not a table of real numbers"),
        ({"vectors": unit(3).astype(str)}, r"its array 'vectors' holds 2-dimensional <U\d+ values"),
    ],
)
def test_bad_export_files_are_one_line_errors(other_library: Library, tmp_path: Path, overrides, message) -> None:  # type: ignore[no-untyped-def]
    path = export_file(tmp_path / "bad.npz", other_library, **overrides)
    with pytest.raises(InvalidVectors, match=message):
        import_vectors(other_library, [path])
    assert other_library.vectors.ntotal == 0
    result = CliRunner().invoke(app, ["import-vectors", str(path), "--library", str(other_library.path), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and str(path) in result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (lambda: np.array([["x"] * DIM] * 12), r"holds <U1 values; embeddings must be real numbers"),
        (lambda: unit(12).astype(np.complex64), r"holds complex64 values; embeddings must be real numbers"),
        (lambda: np.array([[object()] * DIM] * 12, dtype=object), r"cannot read it as an .npy array: .*Python objects"),
    ],
)
def test_npy_of_strings_complex_or_objects_is_refused(other_library: Library, tmp_path: Path, values, message) -> None:  # type: ignore[no-untyped-def]
    folder = clip_retrieval_folder(tmp_path / "e")
    np.save(folder / "img_emb" / "img_emb_0.npy", values(), allow_pickle=True)
    result = CliRunner().invoke(app, ["import-vectors", str(folder), "--library", str(other_library.path), "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "img_emb_0.npy: " in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(InvalidVectors, match=message):
        import_vectors(other_library, [folder])
    assert other_library.vectors.ntotal == 0
