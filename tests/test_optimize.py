"""Index choice by size and budget, `clipdex optimize`, and switching types on rebuild."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

import clipdex.search.index.choice as choice
import clipdex.search.index.optimize as optimize_module
from clipdex.cli.main import app
from clipdex.search.catalog.database import NewItem
from clipdex.search.index.choice import (
    MemoryBudgetError,
    build_index,
    choose_spec,
    list_count,
    parse_size,
    resolve_spec,
)
from clipdex.search.library import MANIFEST_FILE, Library
from clipdex.search.index.optimize import evaluate, held_out_evaluation, optimize_library, recall_at_k, tune
from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE, IndexSpec

MiB = 1 << 20


def clustered(count: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, dim))
    points = (centers[rng.integers(0, 30, count)] + 0.5 * rng.standard_normal((count, dim))).astype(np.float32)
    faiss.normalize_L2(points)
    return points


def fill(library: Library, count: int) -> np.ndarray:
    vectors = clustered(count)
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vector, path=f"/photos/{i}.jpg") for i, vector in enumerate(vectors)])
    return vectors


@pytest.fixture(autouse=True)
def quick_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize_module, "MEASURE_SECONDS", 0.1)


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds scaled down so that a test library of hundreds of items outgrows flat."""
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 100)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 200)


@pytest.mark.parametrize(
    ("count", "budget", "gpu", "factory"),
    [
        (10_000, None, False, None),
        (100_000, None, False, "HNSW32,Flat"),
        (100_000, None, True, "IVF512,Flat"),
        (1_000_000, None, False, "IVF2048,Flat"),
        (1_000_000, 2100 * MiB, False, "IVF2048,Flat"),
        (1_000_000, 700 * MiB, False, "IVF2048,SQ8"),
        # 4 bits for 2 dimensions in fast-scan blocks, before SQ4's half a byte for one
        (1_000_000, 300 * MiB, False, "IVF2048,PQ256x4fsr"),
        (1_000_000, 300 * MiB, True, "IVF2048,SQ4"),  # FAISS GPUs take no fast-scan codes
        (5_000, 2 * MiB, False, "IVF128,SQ4"),  # too few vectors to train PQ
        (1_000_000, 100 * MiB, False, "IVF2048,PQ64"),
        (1_000_000, 30 * MiB, False, "IVF2048,PQ16"),
    ],
)
def test_choice_by_size_budget_and_gpu(count: int, budget: int | None, gpu: bool, factory: str | None) -> None:
    spec = choose_spec(count, 512, budget, gpu=gpu)
    assert spec.factory == factory
    assert spec.type == ("flat" if factory is None else "hnsw" if factory.startswith("HNSW") else "ivf")
    assert spec.memory_budget == budget


def test_a_budget_nothing_fits_is_an_error_unless_rebuilding() -> None:
    with pytest.raises(MemoryBudgetError, match=r"need at least 19\.3 MiB as IVF2048,PQ8"):
        choose_spec(1_000_000, 512, 5 * MiB, gpu=False)
    assert choose_spec(1_000_000, 512, 5 * MiB, gpu=False, strict=False).factory == "IVF2048,PQ8"


@pytest.mark.parametrize(("count", "lists"), [(100, 16), (2_000, 32), (100_000, 512), (1_000_000, 2048), (10_000_000, 8192)])
def test_list_count_grows_with_the_square_root(count: int, lists: int) -> None:
    assert list_count(count) == lists


@pytest.mark.parametrize(("text", "size"), [("800M", 800 * MiB), ("1.5G", 1536 * MiB), ("2GiB", 2048 * MiB), ("512MB", 512 * MiB), ("4096", 4096)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(MemoryBudgetError, match="cannot read 'lots' as a size"):
        parse_size("lots")


def test_rebuilds_keep_tuned_or_pinned_specs_and_switch_outgrown_ones() -> None:
    tuned = IndexSpec("ivf", "IVF2048,Flat", {"nprobe": 40})
    assert resolve_spec(tuned, 1_000_000, 512, gpu=False) is tuned
    assert resolve_spec(tuned, 5_000_000, 512, gpu=False).factory == "IVF4096,Flat"
    assert resolve_spec(IndexSpec(), 60_000, 512, gpu=False).type == "hnsw"
    pinned = IndexSpec("ivf", "IVF64,Flat", pinned=True)
    assert resolve_spec(pinned, 5_000, 512, gpu=False) is pinned
    assert resolve_spec(pinned, 10, 512, gpu=False).type == "flat"  # too few vectors to train 64 lists


def test_quantizers_train_on_a_random_sample_not_the_first_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = clustered(5000)
    trained: list[np.ndarray] = []
    monkeypatch.setattr(choice.VectorIndex, "train", lambda self, sample: trained.append(sample) or self.index.train(sample))
    build_index(32, IndexSpec("ivf", "IVF8,Flat"), np.arange(5000), vectors, resolve=False)
    sample = trained[0]
    assert len(sample) == 8 * choice.TRAINING_POINTS_PER_LIST
    rows = [int(np.flatnonzero((vectors == row).all(axis=1))[0]) for row in sample]
    assert rows != list(range(len(sample))) and max(rows) > len(vectors) // 2


def test_tune_finds_the_smallest_breadth_reaching_the_target() -> None:
    vectors = clustered(4000)
    ids = np.arange(4000) + 1
    index = build_index(32, IndexSpec("ivf", "IVF64,Flat"), ids, vectors, resolve=False)
    evaluation = held_out_evaluation(ids, vectors, 200, np.zeros(0, np.int64))
    breadth, recall = tune(index, evaluation, 0.9)
    assert recall >= 0.9 and evaluate(index, evaluation, breadth) == recall
    assert evaluate(index, evaluation, breadth // 2) < 0.9  # recall only grows with nprobe on IVF-Flat


def test_held_out_queries_leave_their_own_item_out() -> None:
    vectors = clustered(500)
    ids = np.arange(500) * 2
    evaluation = held_out_evaluation(ids, vectors, 50, np.arange(400))
    assert evaluation.own_ids is not None and evaluation.own_ids.min() >= ids[400]
    assert not any(own in row for own, row in zip(evaluation.own_ids, evaluation.truth))
    _, exact = faiss.knn(evaluation.queries, vectors, 11, metric=faiss.METRIC_INNER_PRODUCT)
    assert recall_at_k(ids[exact], evaluation) == 1.0


def test_optimize_library_records_the_report(library: Library, small_thresholds: None) -> None:
    fill(library, 1500)
    report = optimize_library(library, target_recall=0.9)
    assert (report.index_type, report.factory) == ("ivf", "IVF32,Flat")
    assert report.target_met and report.recall_at_10 >= 0.9
    assert 1 <= report.search_params["nprobe"] <= 32
    assert report.vectors == 1500 and report.bytes_per_vector == pytest.approx(32 * 4 + 8, rel=0.1)
    assert report.queries_per_second > 0 and report.exact_queries_per_second > 0 and report.device == "cpu"
    manifest = json.loads((library.path / MANIFEST_FILE).read_text())
    assert manifest["index"]["search_params"] == report.search_params
    assert manifest["optimized"]["recall_at_10"] == report.recall_at_10
    assert json.loads((library.path / STAMP_FILE).read_text())["spec"]["factory"] == "IVF32,Flat"
    reopened = Library.open(library.path, device="cpu")
    assert reopened.stats()["optimized"]["factory"] == "IVF32,Flat"
    assert reopened.vectors.spec.search_params == report.search_params
    reopened.close()


@pytest.mark.parametrize("saved", [True, False], ids=["log-trimmed-by-a-save", "log-intact"])
def test_optimize_catches_up_with_commits_made_while_it_ran(
    library: Library, small_thresholds: None, monkeypatch: pytest.MonkeyPatch, saved: bool
) -> None:
    fill(library, 600)
    original = optimize_module.optimize_corpus
    late: list[int] = []

    def optimize_while_someone_writes(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(*args, **kwargs)
        item = NewItem("text", clustered(1, seed=9)[0], text="late", source="x", source_key="1")
        if saved:  # a writer that saves its index trims the change log the new index would catch up from
            with library.writer() as writer:
                late.extend(writer.commit(items=[item]))
        else:
            late.extend(library.catalog.commit_batch([item]).ids)
        return result

    monkeypatch.setattr(optimize_module, "optimize_corpus", optimize_while_someone_writes)
    optimize_library(library, target_recall=0.9)
    assert library.vectors.spec.type == "ivf" and late[0] in library.vectors.ids().tolist()
    assert library.check()["ok"]


def test_rebuild_if_outgrown_switches_types(library: Library, small_thresholds: None) -> None:
    fill(library, 150)
    assert library.vectors.spec.type == "flat"
    assert library.rebuild_if_outgrown() is True
    assert library.vectors.spec.type == "hnsw" and library.vectors.ntotal == 150
    assert library.rebuild_if_outgrown() is False


def test_optimize_command(library: Library, small_thresholds: None) -> None:
    fill(library, 1500)
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.9", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["index_type"] == "ivf" and report["target_recall"] == 0.9 and report["target_met"]
    stats = runner.invoke(app, ["stats", "--library", str(library.path)])
    assert stats.exit_code == 0 and "optimized" in stats.stdout and "ivf" in stats.stdout
    text = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.9"])
    assert text.exit_code == 0 and "recall@10" in text.stdout and "bytes/vector" in text.stdout


def test_optimize_command_memory_budget(library: Library, small_thresholds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    fill(library, 1500)
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--memory-budget", "50K", "--json"])
    report = json.loads(result.stdout)
    assert report["factory"] == "IVF32,SQ4" and report["memory_budget"] == 50 * 1024
    assert report["bytes_per_vector"] * 1500 <= 50 * 1024
    # the 4-bit codes pick candidates, the catalog's vectors order them: the target is met
    assert result.exit_code == 0 and report["target_met"], result.output
    assert library.vectors.spec.rerank == choice.RERANK["SQ4"]
    # without reranking, 4-bit codes cap the recall below the target, for both kinds: exit 1, with what would meet it
    monkeypatch.setitem(choice.RERANK, "SQ4", 0)
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--memory-budget", "50K", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["target_met"]
    assert all(not figures["target_met"] for figures in report["by_query_kind"].values())
    assert "target missed: image-like queries reach recall@10" in result.stderr
    assert "target missed: text-like queries reach recall@10" in result.stderr
    assert "IVF32,Flat keeps whole vectors and reaches any recall, in about 204K (--memory-budget 204K or more)" in result.stderr
    advised = runner.invoke(app, ["optimize", "--library", str(library.path), "--memory-budget", "204K", "--json"])
    assert advised.exit_code == 0, advised.output
    assert json.loads(advised.stdout)["factory"] == "IVF32,Flat"
    refused = runner.invoke(app, ["optimize", "--library", str(library.path), "--memory-budget", "1K"])
    assert refused.exit_code == 1 and "need at least" in refused.stderr


def test_optimize_an_empty_library_says_so(library: Library) -> None:
    result = CliRunner().invoke(app, ["optimize", "--library", str(library.path)])
    assert result.exit_code == 1 and "is empty" in result.stderr


def test_an_optimize_whose_index_cannot_be_saved_records_nothing(library: Library, small_thresholds: None) -> None:
    """A full disk: optimize ends with the ENOSPC error, the index, its stamp and the manifest
    stay as they were (no `optimized` block claiming a recall the library does not have), in
    this process and for whoever opens the library next; with space again, it records."""
    import errno
    import os

    fill(library, 1500)
    files = (MANIFEST_FILE, INDEX_FILE, STAMP_FILE)
    before = {name: (library.path / name).read_bytes() for name in files}
    assert library.vectors.spec.type == "flat"

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(faiss, "write_index", full)
        with pytest.raises(OSError) as raised:
            optimize_library(library, target_recall=0.9)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(library.path / INDEX_FILE)
    assert {name: (library.path / name).read_bytes() for name in files} == before
    assert "optimized" not in library.stats() and library.vectors.spec.type == "flat"
    assert library.manifest.index.type == "flat" and library.check()["ok"]
    with Library.open(library.path, device="cpu") as reopened:
        assert "optimized" not in reopened.stats() and reopened.vectors.spec.type == "flat"
    report = optimize_library(library, target_recall=0.9)
    assert library.stats()["optimized"]["factory"] == report.factory == library.vectors.spec.factory


def test_a_running_server_takes_up_an_optimize_run_by_another_process(library: Library, small_thresholds: None) -> None:
    """The server's library holds its index in memory; `optimize` in another process (here another
    Library object, with its own store) saves a tuned one. The server's next search and `/stats`
    use the new index and its tuned breadths, and `/stats` shows the report, without a restart."""
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    vectors = fill(library, 1500)
    library.close()
    server = Library.open(library.path, device="cpu")
    client = TestClient(create_app(server))
    assert server.search(vector=vectors[0], k=1)[0].path == "/photos/0.jpg"  # the flat index, loaded
    before = client.get("/stats").json()
    assert before["index_type"] == "flat" and before["index"]["search_params"] == {} and "optimized" not in before
    with Library.open(library.path, device="cpu") as other:
        report = optimize_library(other, target_recall=0.9)
    assert report.index_type == "ivf"
    assert server.search(vector=vectors[7], k=1)[0].path == "/photos/7.jpg"
    index = server.store.index
    assert (index.spec.type, index.spec.factory) == ("ivf", report.factory) and index.ntotal == 1500
    assert index.spec.search_params == report.search_params
    assert index.search_breadth(query_kind="text") == report.by_query_kind["text"]["nprobe"]
    stats = client.get("/stats").json()
    assert stats["index"]["search_params_by_kind"] == index.spec.search_params_by_kind
    assert stats["optimized"]["optimized_at"] == report.optimized_at and stats["optimized"]["factory"] == report.factory
    assert server.manifest.index.factory == report.factory
    server.close()



def test_quantized_choices_rerank_and_older_specs_take_it_up() -> None:
    """Codes that lose recall (SQ, PQ) pick candidates for the catalog's vectors to order;
    whole vectors need no reranking; a spec recorded before reranking existed gets it on
    its next rebuild, its tuned parameters kept."""
    assert choose_spec(1_000_000, 512, None, gpu=False).rerank == 0  # IVF,Flat
    for budget, kind, gpu in ((1 << 30, "SQ8", False), (400 << 20, "SQ4", True), (200 << 20, "PQfs", False), (100 << 20, "PQ", False)):
        spec = choose_spec(1_000_000, 512, budget, gpu=gpu)
        assert kind[:2] in (spec.factory or "") and ("x4fs" in (spec.factory or "")) == (kind == "PQfs")
        assert spec.rerank == choice.RERANK[kind]
    pq = IndexSpec("ivf", "IVF2048,PQ128", {"nprobe": 40}, memory_budget=200 << 20, rerank=10)  # chosen before fast-scan codes
    assert resolve_spec(pq, 1_000_000, 512, gpu=False) == pq  # kept: no rebuild until optimize chooses anew
    assert resolve_spec(pq, 4_000_000, 512, gpu=False).factory == "IVF4096,PQ32"  # outgrown its budget: the choice
    older = IndexSpec("ivf", "IVF2048,SQ8", {"nprobe": 40}, memory_budget=1 << 30)  # as a manifest of before records it
    resolved = resolve_spec(older, 1_000_000, 512, gpu=False)
    assert resolved.rerank == choice.RERANK["SQ8"] and resolved.search_params == {"nprobe": 40} and older.rerank == 0
    assert IndexSpec.from_json(resolved.to_json()) == resolved
