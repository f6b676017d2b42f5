"""A library that cannot be written (a read-only mount, a backup, another user's folder) can
still be searched: the catalog is opened read-only, said once, and nothing is ever written."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.errors import ReadOnlyLibrary
from clipdex.search.library import Library
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture
def stale_library(library: Library, tmp_path: Path, make_images) -> Path:  # type: ignore[no-untyped-def]
    """A library of 4 images whose saved index is one commit behind its catalog (a reader must catch up)."""
    make_images(tmp_path / "photos", 3)
    index_paths(library, [tmp_path / "photos"], export_text=False)
    saved = {name: (library.path / name).read_bytes() for name in (INDEX_FILE, STAMP_FILE)}
    make_images(tmp_path / "photos", 1, start=10)
    index_paths(library, [tmp_path / "photos"], export_text=False)
    for name, data in saved.items():
        (library.path / name).write_bytes(data)
    library.close()
    return library.path


@pytest.fixture
def read_only_mount(stale_library: Path, tmp_path: Path) -> Iterator[Path]:
    """The library through a read-only bind mount: writes fail with EROFS even for root."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root (as another user, chmod makes the library read-only instead)")
    target = tmp_path / "mounted"
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(stale_library), str(target)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount --bind is not permitted here: {mounted.stderr.strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"a read-only remount is not permitted here: {remounted.stderr.strip()}")
        yield target
    finally:
        gc.collect()  # the CLI's libraries hold the catalog open until collected
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(target)], check=True)


def test_a_read_only_mount_is_searched_and_never_written(read_only_mount: Path, stale_library: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError):
        (read_only_mount / "probe").write_text("x")  # the mount really is read-only
    before = snapshot(stale_library)
    with caplog.at_level(logging.WARNING, logger="clipdex.search.readonly"):
        lib = Library.open(read_only_mount, device="cpu")
    assert [record.getMessage() for record in caplog.records] == [
        f"library {read_only_mount} cannot be written here (a read-only file system): opened read-only - searches work, "
        "nothing is saved (immutable: a writer elsewhere would not be seen)"
    ]
    ids, vectors = lib.catalog.all_vectors()
    assert len(ids) == 4
    assert lib.search(vector=vectors[3], k=1)[0].id == ids[3]  # the commit the saved index lacks is caught up in memory
    assert [hit.id for hit in lib.search(text="a dog", k=4)] and lib.stats()["read_only"] is True
    with pytest.raises(ReadOnlyLibrary, match="cannot be written here"):
        with lib.writer():
            pass
    lib.close()
    result = runner.invoke(app, ["search", "a dog", "--library", str(read_only_mount), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4
    result = runner.invoke(app, ["stats", "--library", str(read_only_mount)])
    assert "read-only: yes" in result.stdout
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--library", str(read_only_mount), "--quiet"])
    assert result.exit_code == 1 and f"library {read_only_mount} cannot be written here (a read-only file system)" in result.stderr
    assert snapshot(stale_library) == before  # not one byte, not one new file


def test_an_unwritable_folder_is_opened_read_only(stale_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root: a copy whose files and folder are chmod read-only (as root, os.access is
    told the same, since root ignores permission bits)."""
    copy = tmp_path / "copy"
    shutil.copytree(stale_library, copy)
    for path in [*copy.iterdir(), copy]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and str(path).startswith(str(copy)) else real_access(path, mode, **kw))
    try:
        before = snapshot(copy)
        with Library.open(copy, device="cpu") as lib:
            assert lib.catalog.read_only
            ids, vectors = lib.catalog.all_vectors()
            assert lib.search(vector=vectors[3], k=1)[0].id == ids[3]
            assert lib.search(text="a dog", k=2) and lib.catalog.cached_query("a dog") is None  # no query cache written
        after = snapshot(copy)
        # SQLite may add its shared-memory files where (as here, simulated as root) it can; no file of the library changes
        assert {name: after[name] for name in before} == before and set(after) <= set(before) | {"catalog.sqlite-shm", "catalog.sqlite-wal"}
        assert all(len(after[name][0]) == 0 for name in set(after) - set(before) if name.endswith("-wal"))
    finally:
        for path in [copy, *copy.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_writable_library_still_caches_and_saves(stale_library: Path) -> None:
    with Library.open(stale_library, device="cpu") as lib:
        assert not lib.catalog.read_only
        lib.search(text="a dog", k=1)  # a small exact library: answered from the catalog, FAISS not loaded
        assert lib.catalog.cached_query("a dog") is not None
        assert json.loads((stale_library / STAMP_FILE).read_text())["ntotal"] == 3
        assert lib.vectors.ntotal == 4  # loading the index catches it up from the change log...
    assert json.loads((stale_library / STAMP_FILE).read_text())["ntotal"] == 4  # ...and saves it


def test_files_written_atomically_get_the_umask_s_permissions_not_private_ones(library: Library, tmp_path: Path) -> None:
    """Another user reading the library (its owner's umask 022) can read its manifest, stamp and export settings."""
    import os
    import stat

    from clipdex.search.atomic import write_json_atomic

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    write_json_atomic(tmp_path / "settings.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "settings.json").stat().st_mode) == expected
    assert stat.S_IMODE((library.path / "manifest.json").stat().st_mode) == expected


# -- a missing vectors.faiss: rebuilt once and saved, or said once with the command that saves it --


def as_a_large_library(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Searches load the FAISS index (as in a library too large for the exact search without it);
    the returned list counts the index builds from the catalog."""
    from clipdex.search.index import store
    from clipdex.search.index.exact_small import SmallExactSearch

    monkeypatch.setattr(SmallExactSearch, "search", lambda *args, **kwargs: None)
    builds: list[int] = []
    real_build = store.build_index_from

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(store, "build_index_from", counted)
    return builds


def test_a_missing_index_is_rebuilt_once_and_saved(stale_library: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """vectors.faiss deleted, its up-to-date stamp left: the first search rebuilds it and saves
    it; the next process loads it instead of rebuilding it again."""
    with Library.open(stale_library, device="cpu") as lib:
        assert lib.vectors.ntotal == 4  # caught up and saved: the stamp is the catalog's generation
    (stale_library / INDEX_FILE).unlink()
    builds = as_a_large_library(monkeypatch)
    for _ in range(2):
        with caplog.at_level(logging.INFO, logger="clipdex.search"):
            result = runner.invoke(app, ["search", "a dog", "--library", str(stale_library), "--json"])
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)) == 4
        assert (stale_library / INDEX_FILE).exists()
    assert len(builds) == 1
    assert json.loads((stale_library / STAMP_FILE).read_text())["ntotal"] == 4
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert Library.open(stale_library).check()["ok"]


def test_a_missing_index_that_cannot_be_saved_is_said_once(stale_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """The same on a library that cannot be written here: every process must rebuild the index,
    which is said once per process, with the command that saves it."""
    (stale_library / INDEX_FILE).unlink()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and str(path).startswith(str(stale_library))
                        else real_access(path, mode, **kw))
    builds = as_a_large_library(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="clipdex.search.index"), Library.open(stale_library, device="cpu") as lib:
        assert lib.catalog.read_only
        for _ in range(3):
            assert len(lib.search(text="a dog", k=4)) == 4
    assert len(builds) == 1 and not (stale_library / INDEX_FILE).exists()
    messages = [record.getMessage() for record in caplog.records if record.name == "clipdex.search.index.store"]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{INDEX_FILE} of {stale_library} is missing or could not be used: it was rebuilt in memory "
                                  "from the catalog (")
    assert messages[0].endswith(f"so every process that opens the library rebuilds it again; run `clipdex check --repair "
                                f"--library {stale_library}` where the library can be written")
