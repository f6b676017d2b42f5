"""A library's first run, as an application embedding clipdex meets it: searches from other
threads while the first index exports the model, a model hub that cannot be reached, and
what the run reports and logs on the way."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from clipdex.indexer import index_paths
from clipdex.search.library import Library


@pytest.mark.parametrize("exporter", ["thread", pytest.param("process", marks=pytest.mark.export_process)])
def test_searches_during_the_first_run_all_succeed(library: Library, tmp_path: Path, make_images,  # type: ignore[no-untyped-def]
                                                   exporter: str) -> None:
    """Text searches from several threads while the first index_paths exports the model (with
    the export cache empty), on a thread of this process (as the export falls back to, and
    as the tests run it) and in its own process: none fails, and no export is recorded as refused."""
    make_images(tmp_path / "pics", 48)
    done = threading.Event()
    errors: list[BaseException] = []
    answered = [0]

    def index() -> None:
        try:
            index_paths(library, [tmp_path / "pics"], batch_size=8)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            done.set()

    def search(number: int) -> None:
        turn = 0
        while not done.is_set() or turn < 2:
            try:
                library.search(text=f"query {number} {turn}", k=3)
                answered[0] += 1
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
            turn += 1

    threads = [threading.Thread(target=index)] + [threading.Thread(target=search, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert answered[0] >= 8
    assert sorted(path.name for path in library.path.glob("*.refused.json")) == []
    assert (library.path / "text_encoder").is_dir() and (library.path / "image_encoder").is_dir()


@pytest.mark.parametrize("exporter", ["thread", pytest.param("process", marks=pytest.mark.export_process)])
def test_searches_during_the_first_export_wait_for_it_and_never_load_the_model(  # type: ignore[no-untyped-def]
        library: Library, tmp_path: Path, make_images, exporter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Searches begun once the first run's export has begun (told by its progress) wait for the
    text tower's export and run on it: this process never loads the model a second time."""
    from clipdex.indexer.progress import IndexProgress
    from clipdex.search.encoders.onnx_text import OnnxTextEncoder
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    loads: list[object] = []
    real_load = TorchClipEncoder._load

    def counted_load(encoder: TorchClipEncoder) -> None:
        loads.append(encoder)
        real_load(encoder)

    monkeypatch.setattr(TorchClipEncoder, "_load", counted_load)

    make_images(tmp_path / "pics", 24)
    exporting = threading.Event()
    results: list[object] = []

    def tell(step: IndexProgress) -> None:
        if step.phase == "export" and step.done == 0:
            exporting.set()

    def search(number: int) -> None:
        exporting.wait(timeout=120)
        try:
            results.append(library.search(text=f"query {number}", k=3))
        except BaseException as error:  # noqa: BLE001 - reported below
            results.append(error)

    searches = [threading.Thread(target=search, args=(number,)) for number in range(3)]
    for thread in searches:
        thread.start()
    try:
        index_paths(library, [tmp_path / "pics"], batch_size=8, progress=tell)
    finally:
        exporting.set()
        for thread in searches:
            thread.join(timeout=120)
    assert [result for result in results if isinstance(result, BaseException)] == [] and len(results) == 3
    assert library.encoders.runtime() == "onnx"
    # the searches waited for the export, rather than load the model here: only the exporter did (on a thread)
    assert len(loads) == (1 if exporter == "thread" else 0)
    assert isinstance(library.text_encoder(), OnnxTextEncoder)


def test_concurrent_exports_in_one_process_are_not_refusals(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two threads export the same library's towers at once: one exports, the other finds its
    export installed; torch's exporter never runs twice at once, and nothing is refused."""
    from clipdex.search.encoders.image_export import ensure_image_export
    from clipdex.search.encoders.text_export import ensure_text_export
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    results: list[object] = []

    def export() -> None:
        results.append(ensure_text_export(tmp_path, encoder, 32))
        results.append(ensure_image_export(tmp_path, encoder, 32))

    threads = [threading.Thread(target=export) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(result is not None for result in results) == 2  # each tower exported once
    assert list(tmp_path.glob("*.refused.json")) == []


def closed_port() -> int:
    """A local port nothing listens on (bound, then let go)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_first_index_with_the_hub_unreachable_fails_at_once_in_one_line(tmp_path: Path, make_images) -> None:  # type: ignore[no-untyped-def]
    """`clipdex index` with the default model, its weights never downloaded, and the model hub
    at a closed local port: one line, within seconds (not a minute of retries), naming the way out."""
    import os
    import subprocess
    import sys
    import time

    make_images(tmp_path / "pics", 2)
    port = closed_port()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "COLUMNS": "2000"}
    env.pop("HF_HUB_OFFLINE")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "clipdex.cli", "index", str(tmp_path / "pics"), "--library",
                           str(tmp_path / "lib")], capture_output=True, text=True, timeout=120, env=env)
    seconds = time.monotonic() - started
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    demo = Path(__file__).resolve().parents[1] / "data" / "demo-model"
    assert lines[0] == (
        "Error: cannot fetch the weights of model ViT-B-32 (pretrained tag 'laion2b_s34b_b79k'): they are not in this "
        f"machine's cache, and http://127.0.0.1:{port} cannot be reached (Connection refused). Use a local checkpoint "
        "file (--model ARCHITECTURE --pretrained FILE; in Python ModelSpec(ARCHITECTURE, FILE)) or the small demo model "
        f"(--model {demo / 'clipdex-demo.json'} --pretrained {demo / 'clipdex-demo.pt'}); HF_HUB_OFFLINE=1 uses only "
        "weights downloaded before, never waiting on the hub")
    assert seconds < 20  # python and clipdex's imports, then one refused connection (retrying took a minute and more)
    assert not (tmp_path / "lib").exists()


def test_a_library_whose_first_index_failed_can_be_made_again_for_another_model(tmp_path: Path, tiny_model,  # type: ignore[no-untyped-def]
                                                                                make_images) -> None:
    """From Python: a library made for a model whose weights cannot be had (offline here), its
    first index failed, is made anew when opened with another model and `create`."""
    import pytest

    from clipdex.search.errors import ModelMismatch, ModelUnavailable

    make_images(tmp_path / "pics", 3)
    first = Library.open(tmp_path / "lib", create=True, device="cpu")
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE"):
        index_paths(first, [tmp_path / "pics"])
    first.close()
    with pytest.raises(ModelMismatch):  # without `create`, the library stays as it is
        Library.open(tmp_path / "lib", model=tiny_model, device="cpu")
    with Library.open(tmp_path / "lib", model=tiny_model, create=True, device="cpu") as again:
        assert again.model.name == "tiny-clip" and again.created
        assert index_paths(again, [tmp_path / "pics"]).added == 3
    with Library.open(tmp_path / "lib", create=True, device="cpu", model=None) as reopened:
        assert reopened.model.name == "tiny-clip"


def test_a_library_with_vectors_is_never_made_again_for_another_model(library: Library, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                      make_images) -> None:
    import pytest

    from clipdex.search.encoders.model import ModelSpec
    from clipdex.search.errors import ModelMismatch

    make_images(tmp_path / "pics", 2)
    index_paths(library, [tmp_path / "pics"])
    with pytest.raises(ModelMismatch):
        Library.open(library.path, model=ModelSpec("ViT-B-32", "laion2b_s34b_b79k"), create=True)
    assert library.catalog.counts()["image"] == 2


def test_index_paths_tells_its_phases_with_counts(library: Library, tmp_path: Path, make_images) -> None:  # type: ignore[no-untyped-def]
    """A first run tells scan, export (towers done of 2), embed and commit, with counts; a
    callable of (done, total), the older form, gets the embed phase's counts."""
    from clipdex.indexer.progress import IndexProgress

    make_images(tmp_path / "pics", 10)
    steps: list[IndexProgress] = []
    report = index_paths(library, [tmp_path / "pics"], batch_size=4, progress=steps.append)
    assert report.added == 10
    assert all(isinstance(step, IndexProgress) for step in steps)
    by_phase = {phase: [(step.done, step.total) for step in steps if step.phase == phase]
                for phase in ("scan", "export", "embed", "commit")}
    assert by_phase["scan"] == [(0, None), (10, 10)]
    assert by_phase["export"][0] == (0, 2) and by_phase["export"][-1] == (2, 2) and (1, 2) in by_phase["export"]
    assert by_phase["embed"][-1] == (10, 10) and all(total == 10 for _, total in by_phase["embed"])
    assert by_phase["commit"][-1] == (10, 10) and [done for done, _ in by_phase["commit"]] == sorted(
        done for done, _ in by_phase["commit"])
    assert steps[0].phase == "scan" and steps[-1].phase in ("embed", "commit", "export")

    make_images(tmp_path / "more", 3)
    counts: list[tuple[int, int]] = []
    index_paths(library, [tmp_path / "pics", tmp_path / "more"], progress=lambda done, total: counts.append((done, total)))
    assert counts and counts[-1] == (3, 3)


def test_a_run_that_exports_at_its_end_tells_so(tmp_path: Path, tiny_model, make_images) -> None:  # type: ignore[no-untyped-def]
    """On torch (no first export before the photos), the export after them is told too."""
    from clipdex.indexer.progress import IndexProgress

    make_images(tmp_path / "pics", 3)
    steps: list[IndexProgress] = []
    with Library.open(tmp_path / "lib", model=tiny_model, create=True, device="cpu", runtime="torch") as library:
        index_paths(library, [tmp_path / "pics"], progress=steps.append)
    assert [(step.done, step.total) for step in steps if step.phase == "export"] == [(0, None), (1, 1)]
    assert (tmp_path / "lib" / "text_encoder").is_dir()


def test_loading_the_model_logs_nothing_on_the_root_logger(tiny_model, caplog) -> None:  # type: ignore[no-untyped-def]
    """open_clip's INFO lines (logged on the root logger) come under clipdex's own logger, at DEBUG."""
    import logging

    from clipdex.search.encoders.open_clip_logs import LOGGER_NAME
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    caplog.set_level(logging.DEBUG)
    TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    assert [record.getMessage() for record in caplog.records if record.name == "root"] == []
    moved = [record for record in caplog.records if record.name == LOGGER_NAME]
    assert moved and {record.levelno for record in moved} == {logging.DEBUG}
    logging.getLogger().info("the application's own line")  # anything else passes untouched
    assert caplog.records[-1].name == "root" and caplog.records[-1].getMessage() == "the application's own line"
