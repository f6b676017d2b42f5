"""`clipdex import-vectors`: clipdex export files and clip-retrieval output folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import clipdex.search.index.choice as choice
from clipdex.cli.main import app
from clipdex.search.catalog.database import NewItem
from clipdex.search.errors import ModelMismatch
from clipdex.search.index.import_vectors import InvalidVectors, MissingDependency, import_vectors
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec

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
    with pytest.raises(ModelMismatch, match="model_name=ViT-L-14 is not this library's model tiny-clip"):
        import_vectors(other_library, [clip_retrieval_folder(tmp_path / "e")], model_name="ViT-L-14")
    result = CliRunner().invoke(app, ["import-vectors", str(tmp_path / "e"), "--library", str(other_library.path),
                                      "--model-name", "ViT-L-14"])
    assert result.exit_code == 1
    assert "Error: --model-name ViT-L-14 is not this library's model tiny-clip" in " ".join(result.output.split())


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


# -- the bulk path: one transaction and generation, the index built once, compact catalog --------


def clip_retrieval_parts(root: Path, rows: list[dict], dim: int = DIM, seed: int = 1) -> Path:
    """A clip-retrieval folder with one image part of the given metadata rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("img_emb", "metadata"):
        (root / name).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0.npy", unit(len(rows), seed=seed, dim=dim))
    pq.write_table(pa.Table.from_pylist(rows), root / "metadata" / "metadata_0.parquet")
    return root


def test_an_import_is_one_generation_and_one_index_build(other_library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipdex.search.index.store as store_module

    builds: list[int] = []
    original = store_module.build_index_from
    monkeypatch.setattr(store_module, "build_index_from", lambda *args, **kwargs: builds.append(1) or original(*args, **kwargs))
    before = other_library.catalog.generation()
    report = import_vectors(other_library, [clip_retrieval_folder(tmp_path / "e", count=12)], batch_size=5)  # 6 chunks
    assert (report.added, report.replaced) == (24, 0)
    assert other_library.catalog.generation() == before + 1
    assert builds == []  # into an empty library the index is built while the rows go in, not rebuilt after
    assert other_library.vectors.ntotal == 24 and other_library.check()["ok"]
    rows = [{"image_path": f"/again/{i}.jpg"} for i in range(30)]  # not smaller than the library: one rebuild
    import_vectors(other_library, [clip_retrieval_parts(tmp_path / "again", rows)], batch_size=5)
    assert other_library.catalog.generation() == before + 2 and len(builds) == 1 and other_library.check()["ok"]
    assert not (other_library.path / "catalog.sqlite-wal").exists() or (other_library.path / "catalog.sqlite-wal").stat().st_size == 0


def test_a_bad_row_late_in_an_import_leaves_nothing_imported(other_library: Library, tmp_path: Path) -> None:
    import_vectors(other_library, [clip_retrieval_folder(tmp_path / "first", count=6)])
    generation, counts = other_library.catalog.generation(), other_library.catalog.counts()
    rows = [{"image_path": f"/x/{i}.jpg", "caption": None if i == 7 else f"c{i}"} for i in range(12)]
    good = clip_retrieval_parts(tmp_path / "good", [{"image_path": f"/y/{i}.jpg"} for i in range(12)])
    bad = clip_retrieval_parts(tmp_path / "bad", rows)
    (bad / "text_emb").mkdir()
    np.save(bad / "text_emb" / "text_emb_0.npy", unit(12, seed=5))
    with pytest.raises(InvalidVectors, match=r"metadata_0.parquet: row 7 has no caption for its text embedding; nothing was imported"):
        import_vectors(other_library, [good, bad], batch_size=5)
    assert other_library.catalog.generation() == generation and other_library.catalog.counts() == counts
    assert other_library.check()["ok"] and other_library.vectors.ntotal == 12


def test_the_same_image_twice_in_an_import_is_one_item(other_library: Library, tmp_path: Path) -> None:
    rows = [{"image_path": f"/x/{i % 9}.jpg", "caption": f"c{i}"} for i in range(12)]  # rows 9-11 repeat 0-2
    report = import_vectors(other_library, [clip_retrieval_parts(tmp_path / "e", rows)], batch_size=5)
    assert (report.added, report.replaced) == (9, 3)
    assert other_library.catalog.counts()["image"] == 9 and other_library.vectors.ntotal == 9
    hit = other_library.search(vector=unit(12, seed=1)[10], k=1)[0]
    assert hit.path == "/x/1.jpg" and hit.metadata["caption"] == "c10"  # the last row wins


@pytest.mark.parametrize("small", [False, True], ids=["bulk-rebuild", "small-catch-up"])
def test_readers_see_what_an_import_added(other_library: Library, tmp_path: Path, small: bool) -> None:
    if small:  # an import smaller than the library is logged row by row and caught up, not rebuilt
        import_vectors(other_library, [clip_retrieval_folder(tmp_path / "big", count=30)])
    reader = Library.open(other_library.path, device="cpu")
    reader.vectors  # loaded before the import
    rows = [{"image_path": f"/new/{i}.jpg"} for i in range(8)]
    report = import_vectors(other_library, [clip_retrieval_parts(tmp_path / "e", rows, seed=9)])
    assert report.added == 8 and report.index_rebuilt is False
    hit = reader.search(vector=unit(8, seed=9)[3], k=1)[0]
    assert hit.path == "/new/3.jpg" and reader.check()["ok"]
    reader.close()


def test_image_paths_are_resolved_as_before_with_one_listing_a_folder(tmp_path: Path) -> None:
    from clipdex.search.index.import_vectors import LocalPaths, _local_path

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"a")
    (tmp_path / "photos" / "link.jpg").symlink_to(tmp_path / "photos" / "a.jpg")
    (tmp_path / "photos" / "sub").mkdir()
    values = [str(tmp_path / "photos" / name) for name in ("a.jpg", "link.jpg", "missing.jpg", "sub")]
    values += [str(tmp_path / "photos" / ".." / "photos" / "a.jpg"), "https://example.com/a.jpg", str(tmp_path / "nowhere" / "a.jpg")]
    paths = LocalPaths()
    assert [paths.local(value) for value in values] == [_local_path(value) for value in values]


def test_a_catalog_of_512_d_vectors_is_little_larger_than_the_vectors(tmp_path: Path) -> None:
    """4 KiB SQLite pages fit one row of a 512-d vector each; with the keyword index of the
    paths and captions (FTS5), the catalog stays within 1.35 times the vectors' size."""
    import json as json_module

    from clipdex.search.encoders.model import ModelSpec

    config = tmp_path / "wide-clip.json"
    config.write_text(json_module.dumps({"embed_dim": 512, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8},
                                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    library = Library.open(tmp_path / "wide", model=ModelSpec(str(config), "none"), create=True, device="cpu")
    rows = [{"image_path": f"/data/laion/shard{i // 1000:05d}/{i:09d}.jpg", "caption": f"a photo of item {i} in a nice place"}
            for i in range(3000)]
    import_vectors(library, [clip_retrieval_parts(tmp_path / "e", rows, dim=512)])
    size = sum(path.stat().st_size for path in library.path.glob("catalog.sqlite*"))
    assert size <= 1.35 * 3000 * 512 * 4
    library.close()


@pytest.mark.parametrize("thresholds", [(10, 20), (10, 5000)], ids=["ivf", "hnsw"])
def test_the_index_built_while_importing_is_the_one_a_rebuild_makes(
    other_library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thresholds: tuple[int, int]
) -> None:
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", thresholds[0])
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", thresholds[1])
    folder = clip_retrieval_folder(tmp_path / "e", count=400, scale=2.0)  # off unit length: the sample is normalized too
    report = import_vectors(other_library, [folder], batch_size=64)
    streamed = other_library.vectors
    assert report.index_rebuilt and streamed.spec.type == ("ivf" if thresholds[1] == 20 else "hnsw") and streamed.ntotal == 800
    queries = unit(20, seed=8)
    expected = other_library.rebuild_vectors()
    if streamed.spec.type == "ivf":  # the same training sample: the same lists, the same results
        assert np.array_equal(streamed.search(queries, 10)[1], expected.search(queries, 10)[1])
    assert sorted(streamed.ids().tolist()) == sorted(expected.ids().tolist())


def test_an_import_within_a_memory_budget_builds_reranked_codes_and_keeps_the_budget(
    other_library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`import-vectors --memory-budget`: the index built while importing fits the budget (SQ
    codes where whole vectors would not), reranks by the catalog's vectors (exact scores),
    and a later rebuild keeps to the same budget."""
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 20)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 20)
    folder = clip_retrieval_folder(tmp_path / "e", count=400)
    budget = 800 * (DIM + 8) + 64 * DIM * 4  # SQ8 codes and centroids fit; whole vectors (4 * DIM + 8 each) do not
    result = CliRunner().invoke(app, ["import-vectors", str(folder), "--library", str(other_library.path), "--quiet",
                                      "--json", "--memory-budget", str(budget)])
    assert result.exit_code == 0, result.output
    library = Library.open(other_library.path)
    try:
        index = library.vectors
        assert index.spec.factory is not None and index.spec.factory.endswith(",SQ8") and index.spec.rerank > 0
        assert library.manifest.index.memory_budget == budget and index.reranks
        ids, vectors = library.catalog.all_vectors()
        query = unit(1, seed=9)[0]
        hits = library.search(vector=query, k=5)
        rows = np.searchsorted(ids, [hit.id for hit in hits])
        np.testing.assert_allclose([hit.score for hit in hits], vectors[rows] @ query, atol=1e-5)  # exact, not SQ8's
        assert library.rebuild_vectors().spec.factory == index.spec.factory  # the budget kept
    finally:
        library.close()


# -- float16 storage: as given, or asked for ---------------------------------------------------


def stored_sizes(library: Library) -> dict[int, int]:
    return library.catalog.vector_lengths()


def test_float16_files_are_stored_as_float16_and_read_back_exactly(other_library: Library, tmp_path: Path) -> None:
    """clip-retrieval writes float16: those vectors are stored in half the bytes, as given (nothing
    lost), read back as float32 of the same values, and the library checks healthy."""
    folder = clip_retrieval_folder(tmp_path / "e", count=12)
    import_vectors(other_library, [folder])
    assert stored_sizes(other_library) == {2 * DIM: 24}
    ids, stored = other_library.catalog.all_vectors()
    given = np.concatenate([np.load(folder / "img_emb" / "img_emb_0.npy"), np.load(folder / "text_emb" / "text_emb_0.npy")])
    assert stored.dtype == np.float32 and np.array_equal(np.sort(stored, axis=0), np.sort(given.astype(np.float32), axis=0))
    query = given[5].astype(np.float32)
    hit = other_library.search(vector=query, k=1, kind="image")[0]
    assert hit.id in ids and hit.score == pytest.approx(float(query @ query) / np.linalg.norm(query), abs=1e-5)
    assert other_library.check()["ok"]


def test_float16_on_request_halves_the_catalog_and_keeps_the_neighbours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`import-vectors --float16` stores float32 files as float16: the catalog's vectors take half
    the bytes, and the reranked neighbours are those of the float32 vectors."""
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 20)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 20)
    rows = [{"image_path": f"/p/{i}.jpg"} for i in range(600)]
    folder = clip_retrieval_parts(tmp_path / "e", rows, dim=512)
    sizes, found = {}, {}
    queries = unit(30, seed=5, dim=512)
    for half in (False, True):
        path = tmp_path / f"library-{half}"
        Library.open(path, model=ModelSpec("ViT-B-32", "none"), create=True, device="cpu").close()
        result = CliRunner().invoke(app, ["import-vectors", str(folder), "--library", str(path), "--quiet", "--json",
                                          "--memory-budget", str(600 * (512 + 8) + 64 * 512 * 4)] + (["--float16"] if half else []))
        assert result.exit_code == 0, result.output
        library = Library.open(path)
        sizes[half] = stored_sizes(library)
        assert library.vectors.reranks and library.check()["ok"]
        found[half] = np.array([[hit.id for hit in library.search(vector=query, k=10)] for query in queries])
        library.close()
    assert sizes == {False: {4 * 512: 600}, True: {2 * 512: 600}}
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(found[False], found[True])])
    assert overlap >= 0.99


def test_stored_vectors_of_either_width_are_read_and_others_are_damaged() -> None:
    from clipdex.search.catalog.vector_rows import stack_rows
    from clipdex.search.errors import DamagedVectors

    vectors = unit(3, dim=8)
    rows = [(1, vectors[0].tobytes()), (2, vectors[1].astype(np.float16).tobytes()), (3, vectors[2].tobytes())]
    ids, read = stack_rows(rows, "catalog.sqlite", 8)
    assert ids.tolist() == [1, 2, 3] and read.dtype == np.float32
    np.testing.assert_array_equal(read[[0, 2]], vectors[[0, 2]])
    np.testing.assert_allclose(read[1], vectors[1], atol=1e-3)
    with pytest.raises(DamagedVectors, match="item 4 has 12 bytes, not 32 .* nor 16"):
        stack_rows(rows + [(4, b"x" * 12)], "catalog.sqlite", 8)


def test_an_import_s_keyword_rows_are_those_the_items_make(other_library: Library, tmp_path: Path) -> None:
    """A bulk import writes the keyword rows of its new items from the rows it inserts; they are
    the rows the items themselves make (`check --repair` rebuilds them from the items)."""
    import sqlite3

    import_vectors(other_library, [clip_retrieval_folder(tmp_path / "e", count=30)])

    def keyword_rows() -> list[tuple[int, str]]:
        with sqlite3.connect(other_library.path / "catalog.sqlite") as connection:
            return connection.execute("SELECT rowid, words FROM keywords ORDER BY rowid").fetchall()

    imported = keyword_rows()
    assert len(imported) == 60 and any("caption" in words for _, words in imported)
    assert other_library.catalog.rebuild_keywords() == 60
    assert keyword_rows() == imported
    assert [hit.kind for hit in other_library.search(text="caption 7", k=3, mode="keyword")][:1] == ["text"]


def test_parts_are_read_in_chunks_as_stored(tmp_path: Path) -> None:
    """`_chunks` reads an .npy's rows by offset (row-major, float16 or float32) or from its map
    (column-major): the same rows either way, and a file cut short is named."""
    from clipdex.search.index.import_vectors import _chunks

    rows = np.arange(50 * 6, dtype=np.float32).reshape(50, 6)
    for name, array in (("c32", rows), ("c16", rows.astype(np.float16)), ("f32", np.asfortranarray(rows))):
        np.save(tmp_path / f"{name}.npy", array)
        read = list(_chunks(tmp_path / f"{name}.npy", 7))
        assert [start for start, _ in read] == list(range(0, 50, 7))
        assert np.array_equal(np.concatenate([chunk for _, chunk in read]), array) and read[0][1].dtype == array.dtype
    data = (tmp_path / "c32.npy").read_bytes()
    reader = _chunks(tmp_path / "c32.npy", 7)
    next(reader)
    (tmp_path / "c32.npy").write_bytes(data[: len(data) - 100])  # cut short while it is read
    with pytest.raises(InvalidVectors, match="c32.npy: the file ends before row"):
        list(reader)
