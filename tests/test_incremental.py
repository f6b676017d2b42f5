"""Incremental indexing: unchanged, updated, moved, copied, removed; roots, exclusions, hidden files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import clipdex.indexer.rules as rules
from clipdex.indexer import index_paths
from clipdex.indexer.scan import scan
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from tests.conftest import write_image


@pytest.fixture
def library(tmp_path: Path, tiny_model, catalog_backend: str | None):
    """Each test runs on each catalog backend: the library's own SQLite file, and PostgreSQL."""
    lib = Library.open(tmp_path / "library", model=tiny_model, create=True, device="cpu", catalog=catalog_backend)
    yield lib
    lib.close()


def test_second_run_decodes_and_embeds_nothing(library: Library, tmp_path: Path, make_images, monkeypatch) -> None:
    make_images(tmp_path / "pics", 5)
    index_paths(library, [tmp_path / "pics"])
    fresh = Library.open(library.path)
    monkeypatch.setattr(rules, "decode_image", lambda *a, **k: pytest.fail("decoded on a no-op run"))
    report = index_paths(fresh, [tmp_path / "pics"])
    assert (report.unchanged, report.added, report.updated, report.removed) == (5, 0, 0, 0)
    assert not report.model_loaded


def test_changed_file_is_reembedded(library: Library, tmp_path: Path, make_images) -> None:
    paths = make_images(tmp_path / "pics", 3)
    index_paths(library, [tmp_path / "pics"])
    old_id = library.search(image=paths[0], k=1)[0].id
    write_image(paths[0], seed=1000)
    report = index_paths(library, [tmp_path / "pics"])
    assert (report.updated, report.unchanged) == (1, 2)
    hit = library.search(image=paths[0], k=1)[0]
    assert hit.id == old_id and hit.path == str(paths[0]) and hit.score == pytest.approx(1.0, abs=1e-4)
    assert library.vectors.ntotal == 3


def test_touched_file_keeps_vector_without_decoding(library: Library, tmp_path: Path, make_images, monkeypatch) -> None:
    paths = make_images(tmp_path / "pics", 2)
    index_paths(library, [tmp_path / "pics"])
    os.utime(paths[0], ns=(1, 1_000_000_000))
    monkeypatch.setattr(rules, "decode_image", lambda *a, **k: pytest.fail("decoded an unchanged file"))
    report = index_paths(library, [tmp_path / "pics"])
    assert (report.updated, report.unchanged) == (1, 1)
    assert index_paths(library, [tmp_path / "pics"]).unchanged == 2


def test_deleted_files_are_purged(library: Library, tmp_path: Path, make_images) -> None:
    paths = make_images(tmp_path / "pics", 4)
    index_paths(library, [tmp_path / "pics"])
    gone = library.search(image=paths[1], k=1)[0].id
    paths[1].unlink()
    report = index_paths(library, [tmp_path / "pics"])
    assert report.removed == 1
    assert library.catalog.get_item(gone) is None
    assert gone not in library.vectors.ids()
    assert gone not in [hit.id for hit in library.search(text="anything", k=10)]
    assert Library.open(library.path).check()["ok"]


def test_moved_and_copied_files_reuse_vectors(library: Library, tmp_path: Path, make_images, monkeypatch) -> None:
    paths = make_images(tmp_path / "pics", 3)
    index_paths(library, [tmp_path / "pics"])
    original = library.search(image=paths[0], k=1)[0]
    (tmp_path / "pics" / "renamed").mkdir()
    moved = tmp_path / "pics" / "renamed" / "holiday.jpg"
    shutil.move(paths[0], moved)
    copy = tmp_path / "pics" / "copy.jpg"
    shutil.copy(paths[1], copy)
    monkeypatch.setattr(rules, "decode_image", lambda *a, **k: pytest.fail("decoded a known file"))
    report = index_paths(library, [tmp_path / "pics"])
    assert (report.moved, report.added, report.removed, report.unchanged) == (1, 1, 0, 2)
    item = library.catalog.get_item(original.id)
    assert item.path == str(moved)
    stored = {hit.path: hit.id for hit in library.search(like=[original.id], k=10)}
    assert set(stored) == {str(moved), str(paths[1]), str(paths[2]), str(copy)}
    assert library.vectors.ntotal == 4


def test_roots_do_not_remove_each_other(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "b", 3, start=10)
    index_paths(library, [tmp_path / "a"])
    index_paths(library, [tmp_path / "b"])
    report = index_paths(library, [tmp_path / "a"])
    assert (report.unchanged, report.removed) == (2, 0)
    assert library.stats()["images"] == 5
    # a root that is a prefix of another's name is still another root
    make_images(tmp_path / "a2", 1, start=20)
    index_paths(library, [tmp_path / "a2"])
    assert index_paths(library, [tmp_path / "a"]).removed == 0
    assert library.stats()["images"] == 6


def test_exclude_and_hidden(library: Library, tmp_path: Path, make_images) -> None:
    root = tmp_path / "pics"
    make_images(root, 2)
    make_images(root / "raw", 2, start=10)
    make_images(root / ".thumbnails", 2, start=20)
    write_image(root / ".hidden.jpg", seed=30)
    report = index_paths(library, [root], exclude=["raw"])
    assert report.added == 2
    report = index_paths(library, [root], exclude=["raw"], include_hidden=True)
    assert report.added == 3
    report = index_paths(library, [root], exclude=["*.jpg"], prune_empty_roots=True)
    assert report.removed == 5 and library.stats()["images"] == 0


def test_symlink_loop_terminates(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics" / "sub", 2)
    os.symlink(tmp_path / "pics", tmp_path / "pics" / "sub" / "loop")
    result = scan([tmp_path / "pics"])
    assert sorted(Path(f.path).name for f in result.files) == ["img000.jpg", "img001.jpg"]


def test_unreadable_folder_is_reported_and_its_items_kept(library: Library, tmp_path: Path, make_images, monkeypatch) -> None:
    make_images(tmp_path / "pics" / "locked", 2)
    make_images(tmp_path / "pics", 1, start=5)
    index_paths(library, [tmp_path / "pics"])
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = index_paths(library, [tmp_path / "pics"])
    assert report.removed == 0 and report.unchanged == 1
    assert [Path(f.path).name for f in report.failed] == ["locked"]
    assert "Permission denied" in report.failed[0].error
    assert library.stats()["images"] == 3


def test_missing_root_is_an_error(library: Library, tmp_path: Path) -> None:
    from clipdex.search.errors import ClipdexError

    with pytest.raises(ClipdexError, match="does not exist"):
        index_paths(library, [tmp_path / "nope"])


def test_swapped_contents_get_their_own_vectors(library: Library, tmp_path: Path, make_images) -> None:
    a, b = make_images(tmp_path / "pics", 2)
    index_paths(library, [tmp_path / "pics"])
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    os.utime(a, ns=(5, 5_000_000_000))
    os.utime(b, ns=(6, 6_000_000_000))
    report = index_paths(library, [tmp_path / "pics"], batch_size=1)
    assert report.updated == 2 and report.failed == []
    for path in (a, b):
        hit = library.search(image=path, k=1)[0]
        assert hit.path == str(path) and hit.score == pytest.approx(1.0, abs=1e-4)


def test_dangling_symlinked_folder_keeps_its_items(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "nas", 3)
    make_images(tmp_path / "pics", 1, start=9)
    os.symlink(tmp_path / "nas", tmp_path / "pics" / "nas")
    assert index_paths(library, [tmp_path / "pics"]).added == 4
    os.rename(tmp_path / "nas", tmp_path / "nas-offline")
    report = index_paths(library, [tmp_path / "pics"])
    assert report.removed == 0 and library.stats()["images"] == 4
    assert [Path(f.path).name for f in report.failed] == ["nas"]


def test_library_inside_an_indexed_folder_is_not_indexed(tmp_path: Path, tiny_model, make_images) -> None:
    make_images(tmp_path / "pics", 2)
    library = Library.open(tmp_path / "pics" / "my-library", model=tiny_model, create=True)
    write_image(library.path / "thumbnails" / "t.jpg", seed=5)
    assert index_paths(library, [tmp_path / "pics"]).added == 2


def test_concurrent_run_is_refused_cleanly(library: Library, tmp_path: Path, make_images) -> None:
    from clipdex.search.errors import LibraryBusy

    make_images(tmp_path / "pics", 2)
    with library.writer():
        other = Library.open(library.path)
        with pytest.raises(LibraryBusy, match="is already being written in this thread, by a write that has not ended"):
            index_paths(other, [tmp_path / "pics"])


def test_one_library_written_from_two_threads_says_so(catalog_backend: str | None, tmp_path: Path, tiny_model: ModelSpec,
                                                      make_images) -> None:
    """Not "being written by another process": the writer is this one, on another thread."""
    import threading

    from clipdex.search.errors import LibraryBusy

    make_images(tmp_path / "pics", 2)
    library = Library.open(tmp_path / "lib", model=tiny_model, create=True, device="cpu", catalog=catalog_backend)
    inside, done = threading.Event(), threading.Event()

    def write() -> None:
        with library.writer():
            inside.set()
            done.wait(60)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert inside.wait(60)
        with pytest.raises(LibraryBusy) as refused:
            index_paths(library, [tmp_path / "pics"])
    finally:
        done.set()
        writer.join()
    what = "catalog postgresql" if catalog_backend else f"library {library.path}"
    assert str(refused.value).startswith(what)
    assert str(refused.value).endswith(" is already being written by another thread of this process; one writer at a "
                                       "time: wait for that write to end, or write from one thread (searching meanwhile works)")
    assert index_paths(library, [tmp_path / "pics"]).added == 2


def test_emptied_root_keeps_its_items_unless_pruned(library: Library, tmp_path: Path, make_images) -> None:
    paths = make_images(tmp_path / "mount", 3)
    index_paths(library, [tmp_path / "mount"])
    for path in paths:  # what an unmounted drive's mount point looks like
        path.unlink()
    report = index_paths(library, [tmp_path / "mount"])
    assert report.removed == 0 and library.stats()["images"] == 3
    assert "no images found here, but 3 are indexed" in report.failed[0].error
    assert index_paths(library, [tmp_path / "mount"], prune_empty_roots=True).removed == 3
    assert library.stats()["images"] == 0


def test_a_stop_request_is_seen_between_files_even_when_no_batch_fills(library: Library, tmp_path: Path, make_images) -> None:
    import threading

    folder = tmp_path / "pics"
    make_images(folder, 4)
    for number in range(40):  # files that all fail: no batch of 32 ever fills
        (folder / f"x-broken{number:02d}.jpg").write_bytes(b"not a jpeg")  # after the images
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        if done == 5:
            stop.set()

    report = index_paths(library, [folder], batch_size=32, progress=progress, stop=stop, export_text=False)
    assert report.interrupted
    assert (report.added, len(report.failed)) == (4, 1)  # stopped at the fifth file; the part-batch is committed
    check = library.check()
    assert check["ok"], check
    assert len(library.catalog.ids()) == report.added


def test_a_name_that_is_not_utf8_is_reported_alone(library: Library, tmp_path: Path, make_images) -> None:
    pics = tmp_path / "pics"
    make_images(pics, 2)
    odd = os.fsdecode(os.path.join(os.fsencode(pics), b"caf\xe9.jpg"))  # 'caf\udce9.jpg'
    write_image(Path(odd), seed=7)
    write_image(Path(os.fsdecode(os.path.join(os.fsencode(pics), b"d\xefr"))) / "inside.jpg", seed=8)
    report = index_paths(library, [pics])
    assert (report.added, report.unchanged) == (2, 0)
    not_utf8 = "file name is not valid UTF-8, which the catalog cannot record: rename the file to index it"
    assert [(failure.path, failure.error) for failure in report.failed] == [
        (odd, not_utf8), (os.fsdecode(os.path.join(os.fsencode(pics), b"d\xefr", b"inside.jpg")), not_utf8)]
    again = index_paths(library, [pics])
    assert (again.added, again.updated, again.removed, again.unchanged, len(again.failed)) == (0, 0, 0, 2, 2)
    assert library.stats()["images"] == 2
