"""Search breadth per query kind: image-like and text-like queries tuned, stored, measured and used apart."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

import clipdex.search.index.choice as choice
import clipdex.search.index.optimize as optimize_module
import clipdex.search.index.vectors as vectors_module
from clipdex.cli.main import app
from clipdex.search.catalog.database import NewItem
from clipdex.search.errors import ClipdexError, ModelUnavailable
from clipdex.search.library import Library
from clipdex.search.index.optimize import RecallTargets, exact_evaluation, optimize_library, optimize_vectors, recall_at_k
from clipdex.search.index.query_sample import GENERATED, QuerySample, gap_queries
from clipdex.search.index.vectors import IndexSpec, VectorIndex

DIM = 32


def clustered(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, DIM))
    points = (centers[rng.integers(0, 30, count)] + 0.5 * rng.standard_normal((count, DIM))).astype(np.float32)
    faiss.normalize_L2(points)
    return points


def fill(library: Library, count: int) -> np.ndarray:
    vectors = clustered(count)
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vector, path=f"/photos/{i}.jpg") for i, vector in enumerate(vectors)])
    return vectors


@pytest.fixture(autouse=True)
def quick_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize_module, "MEASURE_SECONDS", 0.05)


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 100)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 200)


@pytest.fixture
def no_text_encoder(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> Any:
        raise ModelUnavailable("no weights here")

    monkeypatch.setattr(Library, "text_encoder", lambda self: unavailable())


def test_gap_queries_lie_as_far_as_a_text_from_its_image() -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((20, 512))[rng.integers(0, 20, 3000)] + 0.7 * rng.standard_normal((3000, 512))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    queries = gap_queries(data[:300], seed=1)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.sum(queries * data[:300], axis=1), 0.3, atol=1e-5)  # a caption and its image
    best = np.max(queries @ data.T, axis=1)
    assert 0.29 < float(np.median(best)) < 0.35  # as far as CLIP's modality gap puts a text's best match
    assert float(np.median(np.max(data[:300] @ data[300:].T, axis=1))) > 0.6  # while images lie close together


@pytest.mark.parametrize(
    ("spec", "param"),
    [(IndexSpec("flat"), None), (IndexSpec("ivf", "IVF32,Flat"), "nprobe"), (IndexSpec("hnsw", "HNSW16,Flat"), "efSearch")],
    ids=["flat", "ivf", "hnsw"],
)
def test_each_kind_is_tuned_and_measured_on_its_own_queries(spec: IndexSpec, param: str | None) -> None:
    vectors = clustered(3000)
    ids = np.arange(3000, dtype=np.int64) + 1
    index, report = optimize_vectors(ids, vectors, 0.9, spec=spec, min_seconds=0.05)
    kinds = report.by_query_kind
    assert set(kinds) == {"image", "text"}
    assert report.recall_at_10 == min(kinds["image"]["recall_at_10"], kinds["text"]["recall_at_10"])
    if param is None:
        assert kinds["image"]["recall_at_10"] == kinds["text"]["recall_at_10"] == 1.0
        assert index.spec.search_params_by_kind == {} and kinds["text"]["source"] == "not needed: exact search"
        return
    assert report.target_met and all(figures["recall_at_10"] >= 0.9 for figures in kinds.values())
    assert kinds["text"]["source"] == f"{GENERATED} (400)" and kinds["text"]["queries"] == 400
    assert kinds["text"]["best_match_cosine"] < 0.6 < kinds["image"]["best_match_cosine"]
    image, text = kinds["image"][param], kinds["text"][param]
    assert index.spec.search_params_by_kind == {"image": {param: image}, "text": {param: text}}
    assert text > image  # far queries need the wider search
    assert index.spec.search_params == {param: text}  # the kind-less breadth is the widest


def test_reported_text_recall_holds_for_independent_queries() -> None:
    vectors = clustered(4000)
    ids = np.arange(4000, dtype=np.int64) + 1
    index, report = optimize_vectors(ids, vectors, 0.9, spec=IndexSpec("ivf", "IVF64,Flat"), min_seconds=0.05)
    fresh = exact_evaluation(gap_queries(clustered(400, seed=11), seed=42), ids, vectors)
    _, found = index.search(fresh.queries, 10, query_kind="text")
    independent = recall_at_k(found, fresh)
    assert abs(independent - report.by_query_kind["text"]["recall_at_10"]) <= 0.05
    _, found = index.search(fresh.queries, 10, query_kind="image")  # the breadth comes from the query, not its kind
    assert recall_at_k(found, fresh) == independent
    index.spec.breadth_rule = None  # as optimized before the rule: the image breadth does not hold for them
    _, found = index.search(fresh.queries, 10, query_kind="image")
    assert recall_at_k(found, fresh) < independent - 0.1


def test_a_kind_with_a_lower_target_of_its_own_is_searched_narrower() -> None:
    """`--target-recall 0.95,text=0.7`: text-like queries tuned (and routed by the rule) to
    their own, lower target; image-like ones still to 0.95."""
    vectors, unseen = np.split(clustered(4200), [4000])
    ids = np.arange(4000, dtype=np.int64) + 1
    same, same_report = optimize_vectors(ids, vectors, 0.95, spec=IndexSpec("ivf", "IVF64,Flat"), min_seconds=0.05)
    apart, report = optimize_vectors(ids, vectors, RecallTargets(0.95, {"text": 0.7}), spec=IndexSpec("ivf", "IVF64,Flat"), min_seconds=0.05)
    kinds, before = report.by_query_kind, same_report.by_query_kind
    assert report.target_recall == 0.95 and report.target_recall_by_kind == {"text": 0.7} and report.target_met
    assert kinds["text"]["target_recall"] == 0.7 and kinds["image"]["target_recall"] == 0.95
    assert kinds["image"]["recall_at_10"] >= 0.95 and 0.7 <= kinds["text"]["recall_at_10"] < before["text"]["recall_at_10"]
    assert kinds["text"]["nprobe"] < before["text"]["nprobe"]
    assert kinds["text"]["breadth_by_query"]["median"] < before["text"]["breadth_by_query"]["median"]
    fresh = exact_evaluation(gap_queries(clustered(400, seed=11), seed=42), ids, vectors)  # text-like, sent as vectors
    _, found = apart.search(fresh.queries, 10)
    _, found_before = same.search(fresh.queries, 10)
    assert 0.65 <= recall_at_k(found, fresh) < recall_at_k(found_before, fresh)
    held_out = exact_evaluation(unseen, ids, vectors)  # image-like queries keep their breadth
    _, found = apart.search(held_out.queries, 10)
    assert recall_at_k(found, held_out) >= 0.94


@pytest.mark.parametrize(
    ("text", "default", "by_kind"),
    [("0.9", 0.9, {}), ("0.95,text=0.9", 0.95, {"text": 0.9}), ("image=0.97, text=0.9", 0.95, {"image": 0.97, "text": 0.9}),
     ("queries=0.8,0.99", 0.99, {"queries": 0.8})],
)
def test_recall_targets_are_read_per_kind(text: str, default: float, by_kind: dict[str, float]) -> None:
    targets = RecallTargets.parse(text)
    assert (targets.default, dict(targets.by_kind)) == (default, by_kind)
    assert targets("image") == by_kind.get("image", default) and targets("text") == by_kind.get("text", default)


@pytest.mark.parametrize(
    ("text", "message"),
    [("0.95,txt=0.9", "no query kind 'txt': the kinds are image, text, queries"), ("high", "cannot read 'high'"),
     ("0.95,text=1.5", "must be in (0, 1], not 1.5 (text)"), ("0", "must be in (0, 1], not 0.0 (every kind)")],
)
def test_unreadable_recall_targets_say_why(text: str, message: str) -> None:
    with pytest.raises(ClipdexError, match=re.escape(message)):
        RecallTargets.parse(text)


def test_optimize_command_takes_a_target_per_kind(library: Library, small_thresholds: None, no_text_encoder: None) -> None:
    fill(library, 1500)
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.95,text=0.8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["target_recall"] == 0.95 and report["target_recall_by_kind"] == {"text": 0.8}
    assert report["by_query_kind"]["text"]["target_recall"] == 0.8 and report["by_query_kind"]["text"]["recall_at_10"] >= 0.8
    stats = runner.invoke(app, ["stats", "--library", str(library.path)])
    assert "target recall@10 0.95, text 0.80 met" in stats.stdout
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.95,photo=0.8"])
    assert result.exit_code == 1 and "no query kind 'photo'" in result.stderr and "Traceback" not in result.output


def test_searches_use_the_breadth_of_their_kind(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = fill(library, 600)
    with library.writer() as writer:
        text_id = writer.commit(items=[NewItem("text", vectors[0], text="a note", source="/notes.txt", source_key="1")])[0]
    spec = IndexSpec("ivf", "IVF16,Flat", {"nprobe": 16}, pinned=True)
    spec.search_params_by_kind = {"image": {"nprobe": 2}, "text": {"nprobe": 9}}
    library.rebuild_vectors(spec)
    breadths: list[int] = []
    original = VectorIndex.search_with

    def recording(self: VectorIndex, queries: np.ndarray, k: int, breadth: int, allowed: Any = None) -> Any:
        breadths.append(breadth)
        return original(self, queries, k, breadth, allowed)

    monkeypatch.setattr(VectorIndex, "search_with", recording)
    reopened = Library.open(library.path, device="cpu")  # the kinds' breadths come back from the manifest
    reopened.search(vector=vectors[3], k=5)
    reopened.search(like=1, k=5)
    reopened.search(text="a dog on the beach", k=5)
    reopened.search(like=text_id, k=5)
    reopened.search(vector=vectors[3], minus="indoors", k=5)
    reopened.search_index(vectors[:1], 5)  # no kind: the kind-less breadth
    assert breadths == [2, 2, 9, 9, 9, 16]
    reopened.close()


def test_duplicates_search_with_the_image_breadth(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.analysis.duplicates import find_duplicates

    fill(library, 600)
    spec = IndexSpec("ivf", "IVF16,Flat", {"nprobe": 16}, pinned=True)
    spec.search_params_by_kind = {"image": {"nprobe": 2}, "text": {"nprobe": 9}}
    library.rebuild_vectors(spec)
    breadths: list[int] = []
    original = VectorIndex.search_with
    monkeypatch.setattr(VectorIndex, "search_with", lambda self, *args, **kwargs: breadths.append(args[2]) or original(self, *args, **kwargs))
    find_duplicates(library, 0.95)
    assert breadths and set(breadths) == {2}


def test_manifests_without_kinds_use_their_one_breadth_for_every_query() -> None:
    spec = IndexSpec.from_json({"type": "ivf", "factory": "IVF16,Flat", "search_params": {"nprobe": 5}})
    assert spec.params_for("text") == spec.params_for("image") == spec.params_for(None) == {"nprobe": 5}


def test_optimize_tunes_text_queries_on_the_library_prompts_by_default(library: Library, small_thresholds: None) -> None:
    fill(library, 1500)
    report = optimize_library(library, target_recall=0.9)
    text = report.by_query_kind["text"]
    assert text["source"].startswith("prompts 'a photo of a {}' over everyday nouns (")
    assert text["queries"] >= 300 and GENERATED not in text["source"]
    assert library.vectors.spec.search_params_by_kind["text"] == text["search_params"]


@pytest.mark.parametrize("source", ["query cache", "text items"])
def test_library_text_queries_come_before_prompts(library: Library, small_thresholds: None, source: str) -> None:
    vectors = fill(library, 1500)
    texts = gap_queries(clustered(450, seed=3), seed=4)
    if source == "query cache":
        for number, vector in enumerate(texts):
            library.catalog.cache_query(f"query {number}", vector)
    else:
        with library.writer() as writer:
            writer.commit(items=[NewItem("text", v, text=f"t{i}", source="/t.txt", source_key=str(i)) for i, v in enumerate(texts)])
    report = optimize_library(library, target_recall=0.9)
    assert report.by_query_kind["text"]["source"] == f"{source} (400)"
    assert len(vectors) and report.target_met


def test_without_a_text_encoder_text_queries_are_generated(library: Library, small_thresholds: None, no_text_encoder: None) -> None:
    fill(library, 1500)
    report = optimize_library(library, target_recall=0.9)
    assert report.by_query_kind["text"]["source"] == f"{GENERATED} (400)"
    assert report.by_query_kind["text"]["best_match_cosine"] < 0.6


def test_a_queries_file_is_a_kind_of_its_own(
    library: Library, small_thresholds: None, no_text_encoder: None, tmp_path: Path
) -> None:
    fill(library, 1500)
    runner = CliRunner()
    plenty, few = tmp_path / "plenty.npy", tmp_path / "few.npy"
    np.save(plenty, gap_queries(clustered(450, seed=3), seed=4) * 3.0)  # normalized when read
    np.save(few, gap_queries(clustered(20, seed=3), seed=4))
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.9", "--queries", str(plenty), "--json"])
    assert result.exit_code == 0, result.output
    kinds = json.loads(result.stdout)["by_query_kind"]
    assert kinds["queries"]["source"] == f"queries file {plenty} (400)" and kinds["queries"]["queries"] == 400
    assert kinds["text"]["source"] == f"{GENERATED} (400)"  # text-like queries still tuned: the file does not replace them
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.9", "--queries", str(few), "--json"])
    assert result.exit_code == 0, result.output
    kinds = json.loads(result.stdout)["by_query_kind"]
    assert kinds["queries"]["source"] == f"queries file {few} (20)" and kinds["text"]["source"] == f"{GENERATED} (400)"


@pytest.mark.parametrize(("rows", "message"), [((5, 16), "query vectors of shape 5x16; this library wants (n, 32)"), ((0, 32), "shape 0x32")])
def test_an_unusable_queries_file_is_one_line(library: Library, small_thresholds: None, tmp_path: Path, rows: tuple[int, int], message: str) -> None:
    fill(library, 300)
    path = tmp_path / "q.npy"
    np.save(path, np.ones(rows, np.float32))
    result = CliRunner().invoke(app, ["optimize", "--library", str(library.path), "--queries", str(path)])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.output


def test_exit_1_when_only_text_queries_miss(library: Library, small_thresholds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """HNSW held to a narrow widest search: stored vectors as queries still find their
    neighbours, far text-like queries do not; the command says so and exits 1."""
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 5000)
    monkeypatch.setattr(vectors_module, "HNSW_MAX_EF_SEARCH", 16)
    monkeypatch.setattr(optimize_module, "candidate_specs", lambda count, dim, budget: [choice.choose_spec(count, dim, budget)])
    fill(library, 1500)
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.9", "--json"])
    report = json.loads(result.stdout)
    assert report["index_type"] == "hnsw" and result.exit_code == 1
    assert report["by_query_kind"]["image"]["target_met"] and not report["by_query_kind"]["text"]["target_met"]
    assert report["recall_at_10"] == report["by_query_kind"]["text"]["recall_at_10"] < 0.9
    assert "target missed: text-like queries" in result.stderr and "image-like" not in result.stderr
    stats = runner.invoke(app, ["stats", "--library", str(library.path)])
    assert stats.exit_code == 0
    assert "     image: recall@10" in stats.stdout and "      text: recall@10" in stats.stdout and "NOT met" in stats.stdout


def test_ivf_is_kept_over_hnsw_when_only_it_meets_the_target_for_text_queries(
    library: Library, small_thresholds: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 5000)
    monkeypatch.setattr(vectors_module, "HNSW_MAX_EF_SEARCH", 16)  # a graph search too narrow for far queries
    fill(library, 1500)
    report = optimize_library(library, target_recall=0.9)
    assert report.target_met and (report.index_type, report.factory) == ("ivf", "IVF32,Flat")
    assert [other["factory"] for other in report.alternatives] == ["HNSW32,Flat"]
    assert not report.alternatives[0]["by_query_kind"]["text"]["target_met"]
    assert library.vectors.spec.factory == "IVF32,Flat"
