"""The working core: library format, indexing, search and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipdex.indexer import index_paths
from clipdex.search import Hit, LibraryNotFound, ModelMismatch, ModelSpec, open_library
from clipdex.search.library import CATALOG_FILE, MANIFEST_FILE, Library
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE


def test_library_files_and_manifest(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 3)
    index_paths(library, [tmp_path / "pics"])
    for name in (MANIFEST_FILE, CATALOG_FILE, INDEX_FILE, STAMP_FILE):
        assert (library.path / name).exists(), name
    manifest = json.loads((library.path / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    assert manifest["dim"] == 32
    assert manifest["model"]["name"] == "tiny-clip"
    assert len(manifest["model"]["checkpoint_sha256"]) == 64
    journal = library.catalog.engine.connect().exec_driver_sql("PRAGMA journal_mode").scalar()
    assert journal == "wal"


def test_index_then_search_by_image_finds_itself(library: Library, tmp_path: Path, make_images) -> None:
    paths = make_images(tmp_path / "pics", 6)
    report = index_paths(library, [tmp_path / "pics"])
    assert (report.added, report.failed) == (6, [])
    hits = library.search(image=paths[2], k=3)
    assert isinstance(hits[0], Hit)
    assert hits[0].path == str(paths[2])
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [hit.rank for hit in hits] == [1, 2, 3]
    assert hits[0].metadata["width"] == 48 and hits[0].metadata["height"] == 40


def test_text_search_scores_are_cosines(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 5)
    index_paths(library, [tmp_path / "pics"])
    hits = library.search(text="a red square", k=5)
    query = library.encoder.encode_texts(["a red square"])[0]
    ids, vectors = library.catalog.all_vectors()
    expected = dict(zip(ids.tolist(), (vectors @ query).tolist()))
    assert len(hits) == 5
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.id], abs=1e-5)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_open_library_api_and_missing_library(tmp_path: Path, library: Library, make_images) -> None:
    make_images(tmp_path / "pics", 2)
    index_paths(library, [tmp_path / "pics"])
    reopened = open_library(library.path)
    assert reopened.stats()["images"] == 2
    with pytest.raises(LibraryNotFound, match="no clipdex library"):
        open_library(tmp_path / "nowhere")


def test_other_model_is_a_clear_error(library: Library, tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the same weights")
    with pytest.raises(ModelMismatch, match="was built with model tiny-clip"):
        Library.open(library.path, model=ModelSpec(library.model.config_path, str(other)))


def test_faiss_index_is_rebuilt_from_the_catalog(library: Library, tmp_path: Path, make_images) -> None:
    paths = make_images(tmp_path / "pics", 4)
    index_paths(library, [tmp_path / "pics"])
    (library.path / INDEX_FILE).unlink()
    fresh = open_library(library.path)
    assert fresh.vectors.ntotal == 4
    assert fresh.search(image=paths[1], k=1)[0].path == str(paths[1])


def test_check_passes_a_library_nothing_was_committed_to_and_flags_a_lost_index(library: Library, tmp_path: Path, make_images) -> None:
    assert library.check() == {"ok": True, "problems": [], "repaired": False, "items": 0}
    make_images(tmp_path / "pics", 2)
    index_paths(library, [tmp_path / "pics"])
    (library.path / INDEX_FILE).unlink()
    assert Library.open(library.path).check()["problems"] == [f"{INDEX_FILE} or {STAMP_FILE} is missing or unreadable"]


def test_stale_faiss_index_catches_up_from_change_log(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 3)
    index_paths(library, [tmp_path / "pics"])
    stamp = json.loads((library.path / STAMP_FILE).read_text())
    saved = (library.path / INDEX_FILE).read_bytes()
    more = make_images(tmp_path / "pics", 2, start=10)
    index_paths(library, [tmp_path / "pics"])
    # put back the older index, as if the process died before saving
    (library.path / INDEX_FILE).write_bytes(saved)
    (library.path / STAMP_FILE).write_text(json.dumps(stamp))
    fresh = open_library(library.path)
    assert fresh.check()["ok"] is False
    assert fresh.vectors.ntotal == 5
    assert fresh.search(image=more[1], k=1)[0].path == str(more[1])
    assert open_library(library.path).check()["ok"], "the reader saved the caught-up index"


def test_export_round_trip(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 3)
    index_paths(library, [tmp_path / "pics"])
    library.export(tmp_path / "out.npz")
    data = np.load(tmp_path / "out.npz")
    ids, vectors = library.catalog.all_vectors()
    assert data["vectors"].dtype == np.float32
    np.testing.assert_array_equal(data["ids"], ids)
    np.testing.assert_array_equal(data["vectors"], vectors)
    assert list(data["kinds"]) == ["image"] * 3
    assert all(path.endswith(".jpg") for path in data["paths"])


def test_leftover_temporary_index_files_are_removed(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 2)
    leftover = library.path / ".vectors.faiss.99999.tmp"
    leftover.write_bytes(b"half an index from a killed writer")
    index_paths(library, [tmp_path / "pics"])
    assert not leftover.exists()
