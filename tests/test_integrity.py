"""A damaged library says what is wrong in one line; `check` finds it, `check --repair` fixes
what can be fixed; a lost catalog is an error, never a new empty library."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.errors import CorruptLibrary
from clipdex.search.library import Library
from tests.conftest import one_line_error

runner = CliRunner()


@pytest.fixture
def indexed(library: Library, tmp_path: Path, make_images) -> Path:  # type: ignore[no-untyped-def]
    make_images(tmp_path / "photos", 3)
    index_paths(library, [tmp_path / "photos"], export_text=False)
    library.close()
    return library.path


def sql(library_path: Path, statement: str, *parameters: object) -> None:
    connection = sqlite3.connect(library_path / "catalog.sqlite")
    connection.execute(statement, parameters)
    connection.commit()
    connection.close()


def invoke(*arguments: str, library: Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*arguments, "--library", str(library)])


# -- a lost catalog ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_lost_catalog_is_an_error_for_search_index_and_check(indexed: Path, tmp_path: Path, damage: str, model_args) -> None:  # type: ignore[no-untyped-def]
    catalog = indexed / "catalog.sqlite"
    for leftover in (indexed / "catalog.sqlite-wal", indexed / "catalog.sqlite-shm"):
        leftover.unlink(missing_ok=True)
    if damage == "deleted":
        catalog.unlink()
        expected = f"{catalog} is missing: this library's catalog (its items and vectors) is gone"
    else:
        catalog.write_bytes(b"")
        expected = f"{catalog} holds no catalog (it is empty or has no items table)"
    vectors_before = (indexed / "vectors.faiss").read_bytes()
    for arguments in (["search", "a dog"], ["index", str(tmp_path / "photos"), *model_args], ["check"], ["check", "--repair"]):
        assert expected in one_line_error(invoke(*arguments, library=indexed)), arguments
    assert catalog.exists() == (damage == "emptied") and (not catalog.exists() or catalog.stat().st_size == 0)
    assert (indexed / "vectors.faiss").read_bytes() == vectors_before  # nothing discarded
    with pytest.raises(CorruptLibrary, match="catalog"):
        Library.open(indexed)


def test_only_a_new_library_makes_a_catalog(tmp_path: Path, make_images, model_args) -> None:  # type: ignore[no-untyped-def]
    make_images(tmp_path / "photos", 1)
    result = invoke("index", str(tmp_path / "photos"), *model_args, library=tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "catalog.sqlite").exists()


# -- damaged rows, a wrong manifest, an emptied state table -----------------------------


def test_a_damaged_vector_blob(indexed: Path, tmp_path: Path, model_args) -> None:  # type: ignore[no-untyped-def]
    sql(indexed, "UPDATE items SET vector = ? WHERE id = 2", b"\0" * 130)
    (indexed / "vectors.faiss").unlink()  # the next reader rebuilds from the catalog
    message = one_line_error(invoke("search", "a dog", library=indexed))
    assert "catalog.sqlite: the stored vector of item 2 has 130 bytes, not 128 (32 float32 values" in message
    assert "the stored vector of item 2 has 130 bytes" in one_line_error(invoke("search", "--like", "2", library=indexed))
    result = invoke("check", "--json", library=indexed)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["problems"] == [f"{indexed / 'catalog.sqlite'}: 1 items have damaged vectors (not 32 float32 values): ids 2"]
    result = invoke("check", "--repair", library=indexed)
    assert result.exit_code == 0, result.output
    assert "repaired: removed the 1 items whose vectors were damaged (" in result.stdout and "img001.jpg" in result.stdout
    assert invoke("check", library=indexed).exit_code == 0
    assert invoke("search", "a dog", library=indexed).exit_code == 0
    rerun = invoke("index", str(tmp_path / "photos"), *model_args, "--json", library=indexed)
    assert json.loads(rerun.stdout)["added"] == 1  # the removed file comes back whole
    with Library.open(indexed) as lib:
        assert lib.vectors.ntotal == 3 and sum(lib.catalog.counts().values()) == 3


def test_a_manifest_whose_dim_disagrees_with_the_catalog(indexed: Path) -> None:
    manifest = json.loads((indexed / "manifest.json").read_text())
    manifest["dim"] = 16
    (indexed / "manifest.json").write_text(json.dumps(manifest))
    assert "the stored vector of item 1 has 128 bytes, not 64 (16 float32 values" in one_line_error(invoke("search", "a dog", library=indexed))
    result = invoke("check", library=indexed)
    assert result.exit_code == 1
    assert f"problem: {indexed / 'manifest.json'} gives dimension 16, but 3 of the catalog's vectors have 32" in result.stderr
    result = invoke("check", "--repair", library=indexed)
    assert result.exit_code == 0, result.output
    assert "repaired: set dimension 32 in manifest.json" in result.stdout
    assert json.loads((indexed / "manifest.json").read_text())["dim"] == 32
    assert invoke("check", library=indexed).exit_code == 0
    with Library.open(indexed) as lib:
        ids, vectors = lib.catalog.all_vectors()
        assert lib.search(vector=vectors[1], k=1)[0].id == ids[1]


def test_a_manifest_dim_that_fits_neither_catalog_nor_model_cannot_be_repaired(indexed: Path) -> None:
    sql(indexed, "UPDATE items SET vector = ?", np.ones(8, np.float32).tobytes())  # every vector 8-dimensional
    result = invoke("check", "--repair", library=indexed)
    assert result.exit_code == 1
    assert "gives dimension 32, but 3 of the catalog's vectors have 8" in result.stderr
    assert "cannot repair: the model tiny-clip" in result.stderr and "gives 32 dimensions" in result.stderr
    assert json.loads((indexed / "manifest.json").read_text())["dim"] == 32


def test_an_emptied_state_table(indexed: Path, tmp_path: Path, make_images, model_args) -> None:  # type: ignore[no-untyped-def]
    sql(indexed, "DELETE FROM state")
    (indexed / "vectors.json").unlink()  # force readers to the catalog's generation
    message = one_line_error(invoke("search", "a dog", library=indexed))
    assert message.endswith("catalog.sqlite: its state table has no 'generation' row; run `clipdex check --repair` to re-create it")
    result = invoke("check", library=indexed)
    assert result.exit_code == 1 and "its state table lacks the rows generation, changes_floor" in result.stderr
    result = invoke("check", "--repair", library=indexed)
    assert result.exit_code == 0, result.output
    assert "repaired: re-created the state rows at generation" in result.stdout
    assert invoke("check", library=indexed).exit_code == 0
    assert invoke("search", "a dog", library=indexed).exit_code == 0
    make_images(tmp_path / "photos", 1, start=10)
    assert json.loads(invoke("index", str(tmp_path / "photos"), *model_args, "--json", library=indexed).stdout)["added"] == 1
    with Library.open(indexed) as lib:
        assert lib.vectors.ntotal == 4


# -- the derived vector index: healthy without one, damaged with half of one ------------------

INDEX_FILE, STAMP_FILE = "vectors.faiss", "vectors.json"


def damage_index(library_path: Path, damage: str) -> None:
    if damage in ("no index saved", "stamp only"):
        (library_path / INDEX_FILE).unlink()
    if damage in ("no index saved", "index only"):
        (library_path / STAMP_FILE).unlink()
    if damage == "unreadable index":
        (library_path / INDEX_FILE).write_bytes(b"not a FAISS index")


def read_only(library_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library as another user's: nothing in it may be written (as root too: os.access says so)."""
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and str(path).startswith(str(library_path))
                        else real_access(path, mode, **kw))


HEALTHY = {"as indexed": True, "no index saved": True, "stamp only": False, "index only": False, "unreadable index": False}


@pytest.mark.parametrize("writable", [True, False], ids=["writable", "read-only"])
@pytest.mark.parametrize("damage", list(HEALTHY))
def test_check_tells_a_healthy_small_library_from_a_damaged_one(indexed: Path, monkeypatch: pytest.MonkeyPatch, damage: str,
                                                                writable: bool) -> None:
    """A small library is searched exactly from the catalog: without any saved index it is sound
    (a replica of a shared catalog never saves one: see test_shared_catalog); half an index, or
    one FAISS cannot read, is damage, which --repair fixes where the library can be written."""
    damage_index(indexed, damage)
    if not writable:
        read_only(indexed, monkeypatch)
    result = invoke("check", library=indexed)
    if HEALTHY[damage]:
        assert (result.exit_code, result.stdout, result.stderr) == (0, "ok: 3 items, catalog and vectors agree\n", "")
        return
    assert result.exit_code == 1 and result.stderr == f"problem: {INDEX_FILE} or {STAMP_FILE} is missing or unreadable\n"
    repaired = invoke("check", "--repair", library=indexed)
    if writable:
        assert repaired.exit_code == 0 and invoke("check", library=indexed).exit_code == 0
    else:
        assert repaired.exit_code == 1 and "cannot be written here" in repaired.stderr


def test_a_larger_library_without_a_saved_index_is_sound_and_told_what_builds_it(library: Library) -> None:
    """Beyond the exact search's size, a library with no index saved yet (deleted, or a replica's
    first search yet to come) is not damaged: the check says who builds it; --repair builds it now."""
    from clipdex.search.catalog.database import NewItem
    from clipdex.search.index.exact_small import SMALL_LIBRARY_MAX

    vectors = np.random.default_rng(0).standard_normal((SMALL_LIBRARY_MAX + 1, library.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vector, path=f"/photos/{i}.jpg") for i, vector in enumerate(vectors)])
    library.close()
    damage_index(library.path, "no index saved")
    report = Library.open(library.path).check()
    assert report["ok"] and report["notes"] == [
        f"no {INDEX_FILE} is saved here yet: the first search builds it from the catalog (and saves it where the library "
        "can be written); `clipdex check --repair` builds it now"]
    shown = invoke("check", library=library.path)
    assert shown.exit_code == 0 and shown.stdout.splitlines() == [f"note: {report['notes'][0]}",
                                                                   f"ok: {SMALL_LIBRARY_MAX + 1} items, catalog and vectors agree"]
    repaired = Library.open(library.path).check(repair=True)
    assert repaired["ok"] and repaired["repaired"] and "notes" not in repaired and (library.path / INDEX_FILE).exists()
