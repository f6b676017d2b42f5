"""The fast paths: what a no-op re-run and a query load (checked in fresh processes), and bounded decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import clipdex.indexer.local as local
from clipdex.indexer import index_paths
from clipdex.search.encoders.onnx_text import EXPORT_FOLDER
from clipdex.search.library import Library

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "onnxruntime")
# Prints a JSON object: what `code` left in `result`, and which heavy modules got imported.
PROBE = """
import json, sys
{code}
print(json.dumps({{"result": result, "imported": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def run_fresh(code: str) -> dict:
    """Run `code` (which sets `result`) in a new interpreter and return its JSON report."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def indexed(library: Library, tmp_path: Path, make_images) -> Library:
    """A library holding four images, its text encoder exported by the index run."""
    make_images(tmp_path / "pics", 4)
    assert index_paths(library, [tmp_path / "pics"]).added == 4
    assert (library.path / EXPORT_FOLDER).is_dir()
    return library


def test_a_no_op_rerun_imports_no_model_code(indexed: Library, tmp_path: Path) -> None:
    code = (
        "from clipdex.indexer import index_paths\nfrom search.library import Library\n"
        f"report = index_paths(Library.open({str(indexed.path)!r}), [{str(tmp_path / 'pics')!r}])\n"
        "result = [report.unchanged, report.added, report.model_loaded]"
    )
    assert run_fresh(code) == {"result": [4, 0, False], "imported": []}


def test_a_cached_query_loads_no_encoder(indexed: Library) -> None:
    expected = indexed.encode_text("a cached query")  # asked once: now in the query cache
    code = (
        "from clipdex.search.library import Library\n"
        f"library = Library.open({str(indexed.path)!r})\n"
        "result = [library.encode_text('a cached query').tolist(), library.search(text='a cached query', k=2)[0].id]"
    )
    report = run_fresh(code)
    assert report["imported"] == []
    assert np.array_equal(np.asarray(report["result"][0], dtype=np.float32), expected)


def test_a_new_text_query_runs_on_the_export_without_torch(indexed: Library) -> None:
    code = (
        "from clipdex.search.library import Library\n"
        f"library = Library.open({str(indexed.path)!r})\n"
        "result = library.encode_text('a text nobody asked before').tolist()"
    )
    report = run_fresh(code)
    assert report["imported"] == ["onnxruntime"]
    reference = indexed.encoder.encode_texts(["a text nobody asked before"])[0]
    assert float(np.asarray(report["result"], dtype=np.float32) @ reference) >= 0.999
    assert indexed.catalog.cached_query("a text nobody asked before") is not None


@pytest.mark.parametrize("arguments", [["search", "a brand new text"], ["search", "a brand new text", "--json"]])
def test_cold_cli_search_imports_neither_torch_nor_open_clip(indexed: Library, arguments: list[str]) -> None:
    code = (
        "from clipdex.cli.main import main\n"
        f"sys.argv = ['clipdex', *{arguments!r}, '--library', {str(indexed.path)!r}, '-k', '2']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "result = None"
    )
    report = run_fresh(code)
    assert "torch" not in report["imported"] and "open_clip" not in report["imported"]


def test_decoding_keeps_a_bounded_number_of_files_in_flight(library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "pics", 40)
    prepare = local._prepare
    lock = threading.Lock()
    state = {"started": 0, "most": 0}

    def counting_prepare(*args):  # type: ignore[no-untyped-def]
        with lock:
            state["started"] += 1
        return prepare(*args)

    def counting_consumer(*args):  # type: ignore[no-untyped-def]
        for done, prepared in enumerate(generator(*args), start=1):
            with lock:
                state["most"] = max(state["most"], state["started"] - done + 1)
            yield prepared

    generator = local._prepare_all
    monkeypatch.setattr(local, "_prepare", counting_prepare)
    monkeypatch.setattr(local, "_prepare_all", counting_consumer)
    report = index_paths(library, [tmp_path / "pics"], batch_size=4, workers=2, export_text=False)
    assert report.added == 40
    assert 4 < state["most"] <= 4 + 2 * 2  # more than a batch ahead, never more than a batch + 2 per worker


def test_model_lanes_embed_batches_at_once_and_each_file_gets_its_own_vector(
    library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = make_images(tmp_path / "pics", 11)
    monkeypatch.setattr(local, "plan_threads", lambda device, workers=None: local.ThreadPlan(2, 1, 3))
    embed = local._embed
    lock = threading.Lock()
    state = {"running": 0, "most": 0}

    def slow_embed(*args):  # type: ignore[no-untyped-def]
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        try:
            time.sleep(0.2)  # long enough for the next batches to reach the other lanes
            return embed(*args)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(local, "_embed", slow_embed)
    report = index_paths(library, [tmp_path / "pics"], batch_size=2, export_text=False)
    assert report.added == 11 and not report.failed
    assert state["most"] >= 2  # lanes overlap
    expected = dict(zip([str(path) for path in paths], library.encoder.encode_files(paths)))
    items = library.catalog.get_items(library.catalog.ids().tolist()).values()
    assert sorted(item.path for item in items) == sorted(expected)
    for item in items:
        assert float(np.dot(item.vector_array(), expected[item.path])) > 0.9999, item.path
    assert library.check()["ok"]


def test_an_error_on_a_model_lane_ends_the_run_and_keeps_what_was_committed(
    library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_images(tmp_path / "pics", 12)
    monkeypatch.setattr(local, "plan_threads", lambda device, workers=None: local.ThreadPlan(2, 1, 2))
    embed = local._embed
    calls = {"count": 0}

    def failing_embed(library_, batch):  # type: ignore[no-untyped-def]
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("the model failed")
        return embed(library_, batch)

    monkeypatch.setattr(local, "_embed", failing_embed)
    with pytest.raises(RuntimeError, match="the model failed"):
        index_paths(library, [tmp_path / "pics"], batch_size=2, export_text=False)
    kept = len(library.catalog.ids())
    assert kept % 2 == 0 and kept < 12  # whole batches only
    assert library.check()["ok"]
    monkeypatch.setattr(local, "_embed", embed)
    report = index_paths(library, [tmp_path / "pics"], batch_size=2, export_text=False)
    assert report.added == 12 - kept and report.unchanged == kept


def test_on_the_cpu_every_lane_embeds_a_part_of_each_batch(library: Library, tmp_path: Path, make_images,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "available_cores", lambda: 2)
    assert local.plan_threads("cpu") == local.ThreadPlan(2, 1, 2, split_batches=True)
    monkeypatch.setattr(local, "available_cores", lambda: 1)
    assert local.plan_threads("cpu") == local.ThreadPlan(1, 1, 1, split_batches=False)
    paths = make_images(tmp_path / "pics", 5)
    monkeypatch.setattr(local, "plan_threads", lambda device, workers=None: local.ThreadPlan(2, 1, 2, split_batches=True))
    embed = local._embed
    lock = threading.Lock()
    state = {"running": 0, "most": 0}
    sizes: list[int] = []

    def slow_embed(library_, batch):  # type: ignore[no-untyped-def]
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
            sizes.append(len(batch))
        try:
            time.sleep(0.2)  # long enough for the other half to reach the other lane
            return embed(library_, batch)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(local, "_embed", slow_embed)
    report = index_paths(library, [tmp_path / "pics"], batch_size=4, export_text=False)
    assert report.added == 5 and not report.failed
    assert sorted(sizes) == [1, 2, 2] and state["most"] == 2  # the batch of 4 as two halves at once, then the last photo
    expected = dict(zip([str(path) for path in paths], library.encoder.encode_files(paths)))
    for item in library.catalog.get_items(library.catalog.ids().tolist()).values():
        assert float(np.dot(item.vector_array(), expected[item.path])) > 0.9999, item.path
    assert [len(part) for part in local._split(list(range(7)), 3)] == [3, 2, 2]  # type: ignore[arg-type]
    assert [len(part) for part in local._split(list(range(1)), 2)] == [1]  # type: ignore[arg-type]
