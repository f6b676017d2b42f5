"""A full disk: a read never needs to write, an index run ends in one line naming ENOSPC with
nothing committed lost, and a text-encoder export that failed for lack of space is retried."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.search.encoders import text_export
from clipdex.search.catalog.database import Catalog, NewItem
from clipdex.search.catalog.local import LocalCatalog
from clipdex.search.encoders.torch_clip import TorchClipEncoder as Encoder
from clipdex.search.index.exact_small import SmallExactSearch
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.encoders.text_export import EXPORT_FOLDER, REFUSED_FILE, ensure_text_export
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE
from tests.conftest import one_line_error

runner = CliRunner()
FAISS_WRITE_ERROR = (
    "Error in void faiss::FileIOWriter::operator()(const void*, size_t, size_t) at faiss/impl/io.cpp:120: "
    "Error: 'ret == nitems' failed: write error in vectors.faiss: 0 != 1 (No space left on device)"
)


def make_stale(library: Library, count: int, seed: int = 0) -> None:
    """Commit `count` random vectors in two commits, and put back the index saved after the first."""
    vectors = np.random.default_rng(seed).standard_normal((count, library.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    half = count // 2
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vectors[i], path=f"/photos/{i}.jpg") for i in range(half)])
    saved = {name: (library.path / name).read_bytes() for name in (INDEX_FILE, STAMP_FILE)}
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vectors[i], path=f"/photos/{i}.jpg") for i in range(half, count)])
    for name, data in saved.items():
        (library.path / name).write_bytes(data)
    library.close()


# -- simulated: the write raises what FAISS raises on a full disk ------------------------------


def test_a_search_answers_when_the_caught_up_index_cannot_be_saved(library: Library, monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # type: ignore[no-untyped-def]
    import faiss

    make_stale(library, 6)
    before = {name: (library.path / name).read_bytes() for name in (INDEX_FILE, STAMP_FILE)}

    def full(*args: object) -> None:
        raise RuntimeError(FAISS_WRITE_ERROR)

    monkeypatch.setattr(faiss, "write_index", full)
    # as a library too large for the exact search without FAISS: the search loads the index and catches it up
    monkeypatch.setattr(SmallExactSearch, "search", lambda *args, **kwargs: None)
    np.save(library.path.parent / "q.npy", np.ones(library.dim, np.float32))
    with caplog.at_level(logging.INFO, logger="clipdex.search"):
        result = runner.invoke(app, ["search", "--vector", str(library.path.parent / "q.npy"), "--library", str(library.path), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 6  # the commit the saved index lacked is there
    assert any("not saved" in record.getMessage() and "No space left on device" in record.getMessage() for record in caplog.records)
    assert {name: (library.path / name).read_bytes() for name in (INDEX_FILE, STAMP_FILE)} == before
    assert not list(library.path.glob(".*.tmp"))  # no half-written file left to hold the space


def test_an_index_run_on_a_full_disk_ends_in_one_line_and_keeps_its_commits(library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch, model_args) -> None:  # type: ignore[no-untyped-def]
    import faiss

    make_images(tmp_path / "photos", 5)
    library.close()

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(faiss, "write_index", full)
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--library", str(library.path), "--quiet", "--batch-size", "2"])
    message = one_line_error(result)
    assert message == (
        f"Error: {library.path / INDEX_FILE}: no space left on device (ENOSPC): free some space and run the same "
        "command again; everything committed so far is kept"
    )
    monkeypatch.undo()
    with Library.open(library.path) as reopened:
        assert sum(reopened.catalog.counts().values()) == 5 and reopened.vectors.ntotal == 5
        ids, vectors = reopened.catalog.all_vectors()
        assert reopened.search(vector=vectors[4], k=1)[0].id == ids[4]


def _sqlite_full(catalog: LocalCatalog) -> Exception:
    """What the everyday catalog raises when SQLite finds the disk full."""
    try:
        with catalog._mapped():
            raise sqlite3.OperationalError("database or disk is full")
    except Exception as error:
        return error
    raise AssertionError("not mapped")


def test_a_catalog_commit_on_a_full_disk_is_one_line(library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    make_images(tmp_path / "photos", 4)
    library.close()
    for catalog_class, failure in ((Catalog, lambda _: OperationalError("INSERT ...", {}, Exception("database or disk is full"))),
                                   (LocalCatalog, _sqlite_full)):
        real_commit = catalog_class.commit_batch
        calls = []

        def filling(self, *args, real_commit=real_commit, calls=calls, failure=failure, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) > 1:
                raise failure(self)
            return real_commit(self, *args, **kwargs)

        monkeypatch.setattr(catalog_class, "commit_batch", filling)
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--library", str(library.path), "--quiet", "--batch-size", "2"])
    assert one_line_error(result) == (
        f"Error: catalog {library.path / 'catalog.sqlite'}: no space left on device (ENOSPC) (database or disk is full): "
        "free some space and run the same command again; everything committed so far is kept"
    )
    monkeypatch.undo()
    with Library.open(library.path) as reopened:
        assert sum(reopened.catalog.counts().values()) == 2 and reopened.vectors.ntotal == 2  # the first batch


@pytest.mark.parametrize("command", ["index", "index-texts"])
def test_a_full_disk_names_what_failed_first_not_the_index_saved_after(tmp_path: Path, make_images, model_args,
                                                                        monkeypatch: pytest.MonkeyPatch, command: str) -> None:  # type: ignore[no-untyped-def]
    """The catalog's second commit finds the disk full, and so does the save of the vector index
    after it. The command names the catalog, which failed first, not vectors.faiss (the index
    was blamed for a full disk while writing texts); the first batch is kept."""
    import faiss

    make_images(tmp_path / "photos", 4)
    (tmp_path / "texts.txt").write_text("\n".join(f"a text about thing {number}" for number in range(4)))
    source = tmp_path / ("photos" if command == "index" else "texts.txt")
    library = tmp_path / "library"

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    calls = []
    for catalog_class, failure in ((Catalog, lambda _: OperationalError("INSERT ...", {}, Exception("database or disk is full"))),
                                   (LocalCatalog, _sqlite_full)):
        def filling(self, *args, real_commit=catalog_class.commit_batch, failure=failure, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) > 1:
                monkeypatch.setattr(faiss, "write_index", full)  # the disk is full for everyone from now on
                raise failure(self)
            return real_commit(self, *args, **kwargs)

        monkeypatch.setattr(catalog_class, "commit_batch", filling)
    result = runner.invoke(app, [command, str(source), "--library", str(library), "--quiet", "--batch-size", "2", *model_args])
    assert one_line_error(result) == (
        "Error: catalog: no space left on device (ENOSPC) (SQLite: database or disk is full): free some space and run "
        "the same command again; everything committed so far is kept")
    monkeypatch.undo()
    with Library.open(library) as reopened:
        assert sum(reopened.catalog.counts().values()) == 2 and reopened.vectors.ntotal == 2 and reopened.check()["ok"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "raw.onnx"),
        RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Save model: No space left on device"),
        OSError(errno.EROFS, os.strerror(errno.EROFS)),
    ],
)
def test_a_text_export_that_failed_for_the_environment_is_retried(tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    encoder = Encoder(tiny_model.resolve(), "cpu").load()
    real_export = text_export.export_optimized

    def broken(*args: object, **options: object) -> None:
        raise failure

    monkeypatch.setattr(text_export, "export_optimized", broken)
    assert ensure_text_export(tmp_path, encoder, 32) is None
    assert not (tmp_path / REFUSED_FILE).exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(text_export, "export_optimized", real_export)  # space again: the next run exports
    assert ensure_text_export(tmp_path, encoder, 32) is not None and (tmp_path / EXPORT_FOLDER).is_dir()


def test_a_refusal_recorded_for_lack_of_space_is_not_honoured(tiny_model: ModelSpec, tmp_path: Path) -> None:
    encoder = Encoder(tiny_model.resolve(), "cpu").load()
    refusal = {"version": text_export.EXPORT_VERSION, "model": encoder.spec.to_json(), "at": 0.0,
               "reason": "the text encoder cannot be exported faithfully (Fail: [ONNXRuntimeError] : 1 : FAIL : No space left on device)"}
    (tmp_path / REFUSED_FILE).write_text(json.dumps(refusal))
    assert ensure_text_export(tmp_path, encoder, 32) is not None


def test_a_model_that_cannot_be_exported_is_still_refused(tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = Encoder(tiny_model.resolve(), "cpu").load()

    def unsupported(*args: object) -> None:
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(text_export, "_export_onnx", unsupported)
    assert ensure_text_export(tmp_path, encoder, 32) is None
    assert "aten::weird" in json.loads((tmp_path / REFUSED_FILE).read_text())["reason"]


# -- real: a tiny tmpfs ------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    target = tmp_path / "disk"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield target
    finally:
        gc.collect()
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(target)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk, leaving about `leave` bytes free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


def test_real_full_disk_search_index_and_export(tiny_disk: Path, tiny_model: ModelSpec, tmp_path: Path, make_images, caplog) -> None:  # type: ignore[no-untyped-def]
    library = Library.open(tiny_disk / "library", model=tiny_model, create=True, device="cpu")
    make_stale(library, 2000)  # an index of ~260 KB that a reader would want to save
    before = {name: (library.path / name).read_bytes() for name in (INDEX_FILE, STAMP_FILE)}
    filler = fill(tiny_disk, 96 << 10)  # room for SQLite's shared memory, not for the index
    np.save(tmp_path / "q.npy", np.ones(library.dim, np.float32))
    search = ["search", "--vector", str(tmp_path / "q.npy"), "-k", "3", "--library", str(library.path), "--json"]
    result = runner.invoke(app, search)  # answered exactly from the catalog: nothing to write
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3
    with caplog.at_level(logging.INFO, logger="clipdex.search"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(SmallExactSearch, "search", lambda *args, **kwargs: None)  # as a larger library: FAISS it is
        result = runner.invoke(app, search)
    assert result.exit_code == 0, result.output
    assert any("not saved" in r.getMessage() and "No space left on device" in r.getMessage() for r in caplog.records)
    assert len(json.loads(result.stdout)) == 3
    assert {name: (library.path / name).read_bytes() for name in (INDEX_FILE, STAMP_FILE)} == before
    # the export of the text tower (~7 MB) cannot fit: not recorded as refused
    encoder = Encoder(tiny_model.resolve(), "cpu").load()
    assert ensure_text_export(library.path, encoder, 32) is None
    assert not (library.path / REFUSED_FILE).exists()
    # an index run that fills the disk: one line naming ENOSPC, the commits made are kept
    make_images(tmp_path / "photos", 40)
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--library", str(library.path), "--quiet", "--batch-size", "4"])
    assert "no space left on device (ENOSPC)" in one_line_error(result)
    filler.unlink()
    gc.collect()
    with Library.open(library.path, device="cpu") as reopened:
        committed = sum(reopened.catalog.counts().values())
        assert committed >= 2000 and reopened.vectors.ntotal == committed
        assert reopened.check()["ok"]
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--library", str(library.path), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    with Library.open(library.path, device="cpu") as reopened:
        assert sum(reopened.catalog.counts().values()) == 2040
