"""This machine's cache of verified exports (`clipdex.search.encoders.export_cache`): a second
library of a model starts without exporting it; damaged entries are caught and replaced;
another model or other software misses; concurrent stores leave one whole entry; the size
cap evicts the least recently used; `clipdex cache clear` empties it; an unwritable cache is
said once and left alone. Each test has its own empty cache (tests/conftest.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import first_export, index_paths
from clipdex.search.encoders import export_cache, image_export, text_export
from clipdex.search.encoders.export_cache import ENTRY_FILE, ExportCache, key_parts, towers
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.encoders.onnx_image import IMAGE_EXPORT_FOLDER, IMAGE_WEIGHTS_FILE, OnnxClipEncoder
from clipdex.search.encoders.onnx_text import EXPORT_FOLDER
from clipdex.search.library import Library
from clipdex.search.paths import user_cache_dir


class Exports:
    """Counts the towers exported (the exporters' own functions, however they are reached)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[str] = []
        for module, name, tower in ((image_export, "export_image_encoder", "image"), (text_export, "export_text_encoder", "text")):
            real = getattr(module, name)

            def counted(*args, _real=real, _tower=tower):  # type: ignore[no-untyped-def]
                self.made.append(_tower)
                return _real(*args)

            monkeypatch.setattr(module, name, counted)


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> Exports:
    return Exports(monkeypatch)


def new_library(folder: Path, model: ModelSpec) -> Library:
    return Library.open(folder, model=model, create=True, device="cpu")


def first_index(library: Library, photos: Path) -> None:
    report = index_paths(library, [photos])
    assert report.added and not report.failed
    assert library.encoders.runtime() == "onnx"


def vectors_by_name(library: Library) -> dict[str, np.ndarray]:
    items = library.catalog.get_items(library.catalog.ids().tolist()).values()
    return {Path(item.path).name: item.vector_array() for item in items}


def cache_entries() -> dict[str, list[Path]]:
    """The cache's entry folders by tower."""
    entries: dict[str, list[Path]] = {"image": [], "text": []}
    for entry in ExportCache.default().entries():
        assert entry.tower is not None, entry
        entries[entry.tower].append(entry.path)
    return entries


@pytest.fixture
def photos(tmp_path: Path, make_images: Callable) -> Path:
    make_images(tmp_path / "photos", 3)
    return tmp_path / "photos"


@pytest.fixture
def other_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelSpec) -> ModelSpec:
    """The tiny model's architecture with other weights: another checkpoint."""
    import torch

    state = torch.load(tiny_model.pretrained)
    state["state_dict"] = {name: tensor + 0.01 if tensor.is_floating_point() else tensor
                           for name, tensor in state["state_dict"].items()}
    checkpoint = tmp_path_factory.mktemp("other-model") / "other.pt"
    torch.save(state, checkpoint)
    return ModelSpec(tiny_model.name, str(checkpoint))


def test_a_second_library_of_the_same_model_starts_from_the_cache_without_exporting(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first_index(library, photos)
    assert sorted(exports.made) == ["image", "text"]
    entries = cache_entries()
    assert len(entries["image"]) == len(entries["text"]) == 1

    monkeypatch.setattr(first_export, "ExportProcess", lambda: pytest.fail("started an export"))
    monkeypatch.setattr("clipdex.search.encoders.torch_clip.TorchClipEncoder.load", lambda self: pytest.fail("loaded torch"))
    second = new_library(tmp_path / "second", tiny_model)
    assert not second.encoders.export_pending()  # what `clipdex index` asks before saying it will export
    report = index_paths(second, [photos])
    assert report.added == 3 and report.export_seconds == 0 and sorted(exports.made) == ["image", "text"]
    assert isinstance(second.encoder, OnnxClipEncoder) and second.encoders.runtime() == "onnx"
    ours, theirs = vectors_by_name(second), vectors_by_name(library)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[name], theirs[name]) for name in ours)
    # hard links: the cache's file and the library's are one
    weights = second.path / IMAGE_EXPORT_FOLDER / IMAGE_WEIGHTS_FILE
    assert weights.stat().st_ino == (entries["image"][0] / IMAGE_WEIGHTS_FILE).stat().st_ino
    settings = json.loads((second.path / IMAGE_EXPORT_FOLDER / "image_encoder.json").read_text())
    assert settings["model"] == second.model.to_json()  # its own record of its model

    assert len(ExportCache.default().clear()) == 2
    assert not any(ExportCache.default().folder.iterdir())
    reopened = Library.open(second.path, device="cpu")  # self-contained without the cache
    assert reopened.encoders.runtime() == "onnx" and reopened.search(text="a photo", k=3)
    assert reopened.search(image=photos / "img001.jpg", k=1)[0].path == str(photos / "img001.jpg")


def test_a_text_query_on_a_new_library_takes_the_text_export_from_the_cache(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first_index(library, photos)
    monkeypatch.setattr("clipdex.search.encoders.torch_clip.TorchClipEncoder.load", lambda self: pytest.fail("loaded torch"))
    empty = new_library(tmp_path / "empty", tiny_model)
    vector = empty.encode_text("a dog on the beach")
    assert np.allclose(vector, library.encode_text("a dog on the beach"), atol=1e-6)
    assert (empty.path / EXPORT_FOLDER).is_dir()


DAMAGES = {
    "a file's bytes": lambda entry: _rewrite(entry / IMAGE_WEIGHTS_FILE, lambda data: bytes([data[0] ^ 1]) + data[1:]),
    "a truncated file": lambda entry: _rewrite(entry / IMAGE_WEIGHTS_FILE, lambda data: data[:-10]),
    "a missing file": lambda entry: (entry / IMAGE_WEIGHTS_FILE).unlink(),
    "a record that is not JSON": lambda entry: _rewrite(entry / ENTRY_FILE, lambda data: data[:20]),
    "a missing record": lambda entry: (entry / ENTRY_FILE).unlink(),
    "a settings file's bytes": lambda entry: _rewrite(entry / "image_encoder.json", lambda data: data.replace(b"bicubic", b"bilinear")),
}


def _rewrite(path: Path, change: Callable[[bytes], bytes]) -> None:
    """A new file in place of `path` (its hard links elsewhere, the first library's, keep theirs)."""
    data = change(path.read_bytes())
    path.unlink()
    path.write_bytes(data)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_entry_is_removed_and_the_model_exported_again(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports,
        caplog: pytest.LogCaptureFixture, damage: str) -> None:
    first_index(library, photos)
    (image_entry,) = cache_entries()["image"]
    DAMAGES[damage](image_entry)
    exports.made.clear()
    second = new_library(tmp_path / "second", tiny_model)
    with caplog.at_level(logging.WARNING, logger="clipdex.search.encoders.export_cache"):
        first_index(second, photos)
    assert exports.made == ["image"]  # the damaged tower was exported again; the text came from the cache
    warnings = [record.getMessage() for record in caplog.records if record.name == export_cache.__name__]
    assert len(warnings) == 1 and str(image_entry) in warnings[0]
    ours, theirs = vectors_by_name(second), vectors_by_name(library)
    assert all(float(np.dot(ours[name], theirs[name])) > 0.9999 for name in ours)
    # the entry was replaced by a whole one: a third library starts from it
    (replaced,) = cache_entries()["image"]
    assert replaced == image_entry and json.loads((replaced / ENTRY_FILE).read_text())["files"]
    exports.made.clear()
    first_index(new_library(tmp_path / "third", tiny_model), photos)
    assert exports.made == []


@pytest.mark.parametrize("change", ["another checkpoint", "another torch", "another exporter", "another onnxruntime"])
def test_another_model_or_other_software_does_not_use_the_entries(
        library: Library, tiny_model: ModelSpec, other_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports,
        monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    first_index(library, photos)
    exports.made.clear()
    model = tiny_model
    if change == "another checkpoint":
        model = other_model
    elif change == "another exporter":
        monkeypatch.setattr(export_cache, "exporter_digest", lambda: "0" * 64)
    else:
        software = dict(export_cache.software_versions())
        software["torch" if change == "another torch" else "onnxruntime"] = "0.0.1"
        monkeypatch.setattr(export_cache, "software_versions", lambda: software)
    second = new_library(tmp_path / "second", model)
    first_index(second, photos)
    assert sorted(exports.made) == ["image", "text"]
    entries = cache_entries()
    assert len(entries["image"]) == len(entries["text"]) == 2


def test_random_weights_are_not_cached(tiny_model: ModelSpec) -> None:
    random = ModelSpec(tiny_model.name, "none").resolve()
    assert all(key_parts(random, 32, tower) is None for tower in towers().values())
    assert key_parts(tiny_model.resolve(), 32, towers()["image"]) is not None


def copy_of(library: Library, folder: Path, model: ModelSpec) -> Library:
    """A new library of the same model holding a copy of `library`'s exports."""
    other = new_library(folder, model)
    for name in (IMAGE_EXPORT_FOLDER, EXPORT_FOLDER):
        shutil.copytree(library.path / name, other.path / name)
    assert other.encoders.runtime() == "onnx"
    return other


def test_concurrent_stores_leave_one_whole_entry_per_tower(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_cache, "store_exports", lambda *args, **options: None)  # the stores are the test's own
    first_index(library, photos)
    libraries = [library] + [copy_of(library, tmp_path / f"copy{number}", tiny_model) for number in range(3)]
    cache = ExportCache.default()
    start = threading.Barrier(len(libraries) * 2)
    added: list[bool] = []
    failed: list[BaseException] = []

    def store(target: Library, tower: str) -> None:
        try:
            start.wait()
            added.append(cache.store(target.path, target.model, target.dim, towers()[tower]))
        except BaseException as error:  # noqa: BLE001 - reported below
            failed.append(error)

    threads = [threading.Thread(target=store, args=(target, tower)) for target in libraries for tower in ("image", "text")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == [] and added.count(True) == 2  # one store per tower won
    entries = cache_entries()
    assert len(entries["image"]) == len(entries["text"]) == 1
    assert [path.name for path in cache.folder.iterdir() if path.name.startswith(".")] == []  # no half entry left
    monkeypatch.setattr("clipdex.search.encoders.torch_clip.TorchClipEncoder.load", lambda self: pytest.fail("loaded torch"))
    restored = new_library(tmp_path / "restored", tiny_model)
    assert export_cache.restore_exports(restored.path, restored.model, restored.dim) == ["text", "image"]


def test_an_entry_being_written_is_never_used(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_cache, "store_exports", lambda *args, **options: None)
    first_index(library, photos)
    halfway, go_on = threading.Event(), threading.Event()
    link_or_copy = export_cache._link_or_copy

    def slow(source: Path, target: Path) -> None:
        link_or_copy(source, target)
        halfway.set()
        go_on.wait(30)

    monkeypatch.setattr(export_cache, "_link_or_copy", slow)
    cache = ExportCache.default()
    writer = threading.Thread(target=cache.store, args=(library.path, library.model, library.dim, towers()["text"]))
    writer.start()
    assert halfway.wait(30)
    reader = new_library(tmp_path / "reader", tiny_model)
    assert export_cache.restore_exports(reader.path, reader.model, reader.dim) == []  # half an entry: nothing
    assert not (reader.path / EXPORT_FOLDER).exists()
    go_on.set()
    writer.join()
    monkeypatch.setattr(export_cache, "_link_or_copy", link_or_copy)
    assert export_cache.restore_exports(reader.path, reader.model, reader.dim) == ["text"]  # whole now (no image entry)


@pytest.mark.slow
@pytest.mark.export_process
def test_two_processes_exporting_the_same_model_at_once_leave_one_valid_entry_each(
        tiny_model: ModelSpec, photos: Path, tmp_path: Path, model_args: list[str]) -> None:
    runs = [subprocess.Popen([sys.executable, "-m", "clipdex.cli", "index", str(photos), "--library", str(tmp_path / name),
                              *model_args, "--device", "cpu", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for name in ("a", "b")]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
    entries = cache_entries()
    assert len(entries["image"]) == len(entries["text"]) == 1
    assert [path.name for path in ExportCache.default().folder.iterdir() if path.name.startswith(".")] == []
    for name in ("a", "b"):
        assert Library.open(tmp_path / name, device="cpu").encoders.runtime() == "onnx"
    restored = new_library(tmp_path / "c", tiny_model)
    assert export_cache.restore_exports(restored.path, restored.model, restored.dim) == ["text", "image"]


def test_the_size_cap_evicts_the_least_recently_used_entries(
        library: Library, tiny_model: ModelSpec, other_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports,
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    first_index(library, photos)  # the tiny model's entries
    mine = {entry.tower: entry for entry in ExportCache.default().entries()}
    first_index(new_library(tmp_path / "other", other_model), photos)  # the other model's
    theirs = {entry.tower: entry for entry in ExportCache.default().entries() if entry.key not in {e.key for e in mine.values()}}
    hour_ago = time.time() - 3600
    for entry in theirs.values():
        os.utime(entry.path, (hour_ago, hour_ago))
    for entry in mine.values():
        os.utime(entry.path, (hour_ago - 60, hour_ago - 60))  # older still...
    first_index(new_library(tmp_path / "again", tiny_model), photos)  # ...but used again now
    model_bytes = sum(entry.bytes for entry in mine.values())
    monkeypatch.setenv(export_cache.SIZE_ENV, str(2.5 * model_bytes / (1 << 20)))  # room for two models' exports

    state = torch.load(tiny_model.pretrained)
    state["state_dict"] = {name: tensor * 1.01 if tensor.is_floating_point() else tensor for name, tensor in state["state_dict"].items()}
    third = tmp_path_factory.mktemp("third-model") / "third.pt"
    torch.save(state, third)
    exports.made.clear()
    first_index(new_library(tmp_path / "third", ModelSpec(tiny_model.name, str(third))), photos)
    assert sorted(exports.made) == ["image", "text"]
    left = {entry.key for entry in ExportCache.default().entries()}
    assert {entry.key for entry in mine.values()} <= left  # used last: kept
    assert theirs["text"].key not in left  # used least recently: evicted
    assert ExportCache.default().size() <= 2.5 * model_bytes


def test_an_export_larger_than_the_cap_is_not_cached(
        library: Library, photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(export_cache.SIZE_ENV, "1")  # 1 MiB: the image export fits, the text export's 7 MiB do not
    first_index(library, photos)
    entries = cache_entries()
    assert len(entries["image"]) == 1 and entries["text"] == []


@pytest.mark.parametrize("size", ["0", "0.0"])
def test_a_cap_of_zero_turns_the_cache_off(library: Library, photos: Path, monkeypatch: pytest.MonkeyPatch, size: str) -> None:
    monkeypatch.setenv(export_cache.SIZE_ENV, size)
    first_index(library, photos)
    assert not ExportCache.default().folder.exists()


def run(*args: str) -> "object":
    return CliRunner().invoke(app, list(args))


def test_cache_info_lists_the_entries_and_clear_empties_the_cache(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports) -> None:
    first_index(library, photos)
    listed = run("cache", "info", "--json")
    assert listed.exit_code == 0, listed.output
    info = json.loads(listed.stdout)
    assert info["path"] == str(user_cache_dir() / "exports") and info["enabled"] and info["max_bytes"] == 2048 << 20
    assert sorted(entry["tower"] for entry in info["entries"]) == ["image", "text"]
    assert info["bytes"] == sum(entry["bytes"] for entry in info["entries"]) > 0
    assert all(entry["model"] == library.model.describe() for entry in info["entries"])
    text = run("cache", "info")
    assert text.exit_code == 0 and f"export cache {info['path']}: 2 entries" in text.stdout
    assert text.stdout.count(library.model.describe()) == 2

    cleared = run("cache", "clear")
    assert cleared.exit_code == 0
    assert f"removed 2 cached exports ({info['bytes'] / (1 << 20):.1f} MiB) from {info['path']}" in cleared.stdout
    assert json.loads(run("cache", "info", "--json").stdout)["entries"] == []
    assert json.loads(run("cache", "clear", "--json").stdout) == {"path": info["path"], "removed": 0, "bytes": 0}
    searched = run("search", "a photo", "--library", str(library.path), "--format", "paths", "--device", "cpu")
    assert searched.exit_code == 0 and len(searched.stdout.splitlines()) == 3  # the library kept its exports
    exports.made.clear()
    first_index(new_library(tmp_path / "later", tiny_model), photos)
    assert sorted(exports.made) == ["image", "text"]  # nothing cached any more: exported again


def test_an_unwritable_cache_is_said_once_and_clipdex_works_without_it(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(blocker / "cache"))  # cannot be made (as root, too)
    monkeypatch.setattr(export_cache, "_said", set())
    with caplog.at_level(logging.WARNING, logger="clipdex.search.encoders.export_cache"):
        first_index(library, photos)
        first_index(new_library(tmp_path / "second", tiny_model), photos)
    assert sorted(exports.made) == ["image", "image", "text", "text"]
    said = [record.getMessage() for record in caplog.records if record.name == export_cache.__name__]
    assert len(said) == 1 and f"the export cache {blocker / 'cache' / 'exports'} cannot be written" in said[0]


def test_the_cache_folder_is_the_users_unless_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLIPDEX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert user_cache_dir() == tmp_path / "xdg" / "clipdex"
    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path / "mine"))
    assert ExportCache.default().folder == tmp_path / "mine" / "exports"


def test_across_file_systems_the_exports_are_copied_and_checked(
        library: Library, tiny_model: ModelSpec, photos: Path, tmp_path: Path, exports: Exports,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    first_index(library, photos)
    (image_entry,) = cache_entries()["image"]

    def cross_device(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(export_cache.os, "link", cross_device)
    exports.made.clear()
    second = new_library(tmp_path / "second", tiny_model)
    first_index(second, photos)
    assert exports.made == []
    weights = second.path / IMAGE_EXPORT_FOLDER / IMAGE_WEIGHTS_FILE
    assert weights.stat().st_nlink == 1 and weights.read_bytes() == (image_entry / IMAGE_WEIGHTS_FILE).read_bytes()


def test_a_checkpoint_is_hashed_once_per_machine_until_it_changes(
        tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.encoders import model as model_module

    checkpoint = tmp_path / "copy.pt"
    shutil.copyfile(tiny_model.pretrained, checkpoint)
    hashed: list[Path] = []
    real = model_module.file_sha256
    monkeypatch.setattr(model_module, "file_sha256", lambda path: hashed.append(path) or real(path))
    spec = ModelSpec(tiny_model.name, str(checkpoint))
    first = new_library(tmp_path / "first", spec)
    second = new_library(tmp_path / "second", spec)
    assert len(hashed) == 1 and first.model.checkpoint_sha256 == second.model.checkpoint_sha256 == real(checkpoint)
    info = checkpoint.stat()
    os.utime(checkpoint, ns=(info.st_atime_ns, info.st_mtime_ns))  # the same mtime, but its ctime moves on
    new_library(tmp_path / "third", spec)
    assert len(hashed) == 2
    (user_cache_dir() / "checkpoints.json").write_text("{not json")  # a damaged memory: hashed as before
    assert new_library(tmp_path / "fourth", spec).model.checkpoint_sha256 == first.model.checkpoint_sha256
    assert len(hashed) == 3
