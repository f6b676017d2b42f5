"""The search breadth chosen per query from the query itself (`clipdex.search.index.breadth`):
a text-like vector, or a backend's own query vector, gets the breadth it needs however it
arrives, on every approximate index type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

import clipdex.search.index.choice as choice
import clipdex.search.index.optimize as optimize_module
from clipdex.cli.main import app
from clipdex.search.catalog.database import NewItem
from clipdex.search.index.breadth import BreadthRule, best_scores, tune_rule
from clipdex.search.index.optimize import exact_evaluation, optimize_vectors, recall_at_k
from clipdex.search.index.query_sample import QuerySample, gap_queries
from clipdex.search.index.vectors import IndexSpec, VectorIndex
from clipdex.search.library import Library

DIM = 32


def clustered(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((60, DIM))
    points = (centers[rng.integers(0, 60, count)] + 0.5 * rng.standard_normal((count, DIM))).astype(np.float32)
    faiss.normalize_L2(points)
    return points


def users_queries(base: np.ndarray) -> np.ndarray:
    """A backend's own query vectors: another offset from the images than a text's, nearer."""
    offset = np.random.default_rng(77).standard_normal(DIM).astype(np.float32)
    return gap_queries(base, seed=5, cosine=0.45, offset=offset)


@pytest.fixture(autouse=True)
def quick_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize_module, "MEASURE_SECONDS", 0.05)


def test_the_rule_maps_lower_scores_to_wider_searches_and_round_trips() -> None:
    rule = BreadthRule(2, [0.8, 0.5], [2, 6, 20])
    assert rule.breadth_for(np.array([0.95, 0.8, 0.79, 0.5, 0.49, np.nan])).tolist() == [2, 2, 6, 6, 20, 20]
    assert BreadthRule.from_json(json.loads(json.dumps(rule.to_json()))) == rule
    assert BreadthRule.from_json(None) is None and BreadthRule.from_json({"first": 2, "floors": [0.5], "breadths": [2]}) is None


def test_a_query_s_own_copy_says_nothing_of_its_distance() -> None:
    scores = np.array([[1.0, 0.4], [0.9, 0.8], [1.0, 0.0]], np.float32)
    ids = np.array([[7, 3], [1, 2], [5, -1]])
    assert np.allclose(best_scores(scores, ids), [0.4, 0.9, np.nan], equal_nan=True)


def test_a_band_gets_the_breadth_of_the_kinds_in_it_and_lower_bands_never_less() -> None:
    scores = np.concatenate([np.linspace(0.8, 0.95, 80), np.linspace(0.3, 0.5, 80)])
    kinds = np.array(["image"] * 80 + ["text"] * 80)
    rule = tune_rule(2, scores, kinds, {"image": 2, "text": 9}, lambda breadths: np.ones(len(breadths)), 0.9, lambda r: 0.01)
    assert rule.breadth_for(np.array([0.9, 0.4, 0.6])).tolist() == [2, 9, 9]  # 0.6 lies between the bands: the wider
    assert all(low >= high for high, low in zip(rule.breadths, rule.breadths[1:]))


def test_a_kind_that_misses_under_the_rule_gets_its_own_breadth_wherever_it_lies() -> None:
    """A few text-like queries score as high as images; if the rule's narrow breadth leaves
    their kind short of the target, every band they reach is widened to the text breadth."""
    scores = np.concatenate([np.linspace(0.8, 0.95, 160), np.linspace(0.3, 0.5, 150), np.full(10, 0.9)])
    kinds = np.array(["image"] * 160 + ["text"] * 160)

    def recalls(breadths: np.ndarray) -> np.ndarray:
        return np.where((kinds == "text") & (breadths < 9), 0.0, 1.0)

    rule = tune_rule(2, scores, kinds, {"image": 2, "text": 9}, recalls, 0.95, lambda r: 0.01)
    assert rule.breadth_for(np.array([0.9])).tolist() == [9]


def test_each_kind_is_held_to_its_own_target_under_the_rule() -> None:
    """The same high-scoring text-like queries, short at the narrow breadth: a text target the
    narrow breadth already meets leaves the image band narrow; the image target would not."""
    scores = np.concatenate([np.linspace(0.8, 0.95, 160), np.linspace(0.3, 0.5, 150), np.linspace(0.8, 0.95, 10)])
    kinds = np.array(["image"] * 160 + ["text"] * 160)  # too few text-like among the images to set a band's breadth

    def recalls(breadths: np.ndarray) -> np.ndarray:
        return np.where((kinds == "text") & (breadths < 9), 0.0, 1.0)  # text's mean at the narrow breadth: 150/160

    apart = tune_rule(2, scores, kinds, {"image": 2, "text": 9}, recalls, {"image": 0.95, "text": 0.9}, lambda r: 0.01)
    assert apart.breadth_for(np.array([0.9])).tolist() == [2]
    same = tune_rule(2, scores, kinds, {"image": 2, "text": 9}, recalls, {"image": 0.95, "text": 0.95}, lambda r: 0.01)
    assert same.breadth_for(np.array([0.9])).tolist() == [9]


@pytest.mark.parametrize("spec", [
    IndexSpec("ivf", "IVF64,Flat"),
    IndexSpec("hnsw", "HNSW16,Flat"),
    IndexSpec("ivf", "IVF64,SQ4", rerank=4),  # codes reranked by the stored vectors, as under a memory budget
    IndexSpec("ivf", "IVF64,PQ8x4", rerank=20),
    IndexSpec("ivf", "IVF64,PQ16x4fsr", rerank=20),  # 4-bit fast-scan codes, as 512-d libraries get
], ids=["ivf", "hnsw", "ivf-sq4-rerank", "ivf-pq-rerank", "ivf-pq-fastscan-rerank"])
def test_every_kind_meets_the_target_whichever_way_it_arrives(spec: IndexSpec) -> None:
    vectors = clustered(6000)
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    mine = QuerySample.empty(DIM)
    mine.extend("users", users_queries(clustered(300, seed=5)))
    index, report = optimize_vectors(ids, vectors, 0.95, spec=spec, min_seconds=0.05, user_queries=mine)
    assert set(report.by_query_kind) == {"image", "text", "queries"} and report.breadth_rule
    assert index.breadth_rule() is not None and index.spec.breadth_rule == IndexSpec.from_json(index.spec.to_json()).breadth_rule
    held_out = {
        "text-like vectors": exact_evaluation(gap_queries(clustered(300, seed=21), seed=8), ids, vectors),
        "the user's vectors": exact_evaluation(users_queries(clustered(300, seed=22)), ids, vectors),
        "new photos": exact_evaluation(clustered(300, seed=23), ids, vectors),
    }
    mixed = {name: np.zeros(0) for name in held_out}
    for name, evaluation in held_out.items():
        recalls = {kind: recall_at_k(index.search(evaluation.queries, 10, query_kind=kind)[1], evaluation) for kind in ("image", "text", None)}
        assert len(set(recalls.values())) == 1, recalls  # the breadth comes from the query, not from a kind
        assert recalls["image"] >= 0.92, (name, recalls)
        mixed[name] = evaluation.queries
    everything = np.concatenate(list(mixed.values()))  # one batch of every kind: each row gets its own breadth
    _, found = index.search(everything, 10)
    start = 0
    for name, evaluation in held_out.items():
        assert recall_at_k(found[start : start + len(evaluation.queries)], evaluation) >= 0.92, name
        start += len(evaluation.queries)
    index.spec.breadth_rule = None  # without the rule, vectors get the image breadth and far ones fall short
    assert recall_at_k(index.search(held_out["text-like vectors"].queries, 10, query_kind="image")[1], held_out["text-like vectors"]) < 0.9


def test_image_like_queries_keep_their_narrow_search(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = clustered(6000)
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    index, report = optimize_vectors(ids, vectors, 0.95, spec=IndexSpec("ivf", "IVF64,Flat"), min_seconds=0.05)
    rule = index.breadth_rule()
    assert rule is not None and rule.first == report.by_query_kind["image"]["nprobe"] < report.by_query_kind["text"]["nprobe"]
    breadths: list[int] = []
    original = VectorIndex.search_with
    monkeypatch.setattr(VectorIndex, "search_with", lambda self, q, k, b, allowed=None: breadths.append(b) or original(self, q, k, b, allowed))
    index.search(vectors[:5], 10)  # stored photos: one search at the narrow breadth, no second pass
    assert breadths == [rule.first]
    breadths.clear()
    index.search(gap_queries(vectors[:5], seed=3), 10)
    assert breadths == [rule.first, report.by_query_kind["text"]["nprobe"]]


def test_reranked_codes_read_only_what_the_rule_needs_before_searching_wider() -> None:
    """On codes reranked by the stored vectors, the first search's candidates are read and scored
    in full only for the queries that stay at its breadth; the rule reads the best of the few a
    2-hit search reranks (as optimize tuned it). Each query's answer is the search at its breadth."""
    from clipdex.search.index.vectors import ArrayVectors

    vectors = clustered(6000)
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    index, _ = optimize_vectors(ids, vectors, 0.95, spec=IndexSpec("ivf", "IVF64,PQ16x4fsr", rerank=20), min_seconds=0.05)
    rule = index.breadth_rule()
    assert rule is not None and index.reranks and max(rule.breadths) > rule.first

    class Counting(ArrayVectors):
        read: list[int] = []

        def iter_vectors(self, wanted: Any = None) -> Any:
            self.read.append(len(wanted))
            return super().iter_vectors(wanted)

    index.rerank_source = Counting(ids, vectors)
    queries = np.concatenate([vectors[:20], gap_queries(clustered(20, seed=32), seed=9)])  # stored photos, text-like
    breadths = rule.breadth_for(best_scores(*index.search_with(queries, 2, rule.first)))
    scores, found = index.search(queries, 10)
    for row, breadth in enumerate(breadths):
        expected_scores, expected = index.search_with(queries[row : row + 1], 10, int(breadth))
        assert found[row].tolist() == expected[0].tolist() and np.allclose(scores[row], expected_scores[0])
    wide = int(np.sum(breadths > rule.first))
    assert 0 < wide < len(queries)
    Counting.read.clear()
    index.search(queries[breadths > rule.first], 10)
    assert Counting.read[0] <= wide * index._candidates(2) < wide * index._candidates(10)  # the first search: the rule's few


def test_optimize_with_a_queries_file_serves_those_vectors_at_the_target(library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case that asked for the rule: `optimize --queries FILE.npy`, then more vectors
    from the same distribution sent with `search(vector=...)`."""
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 100)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 200)
    vectors = clustered(3000)
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vector, path=f"/photos/{i}.jpg") for i, vector in enumerate(vectors)])
    np.save(tmp_path / "mine.npy", users_queries(clustered(200, seed=5)))
    result = CliRunner().invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.95", "--queries", str(tmp_path / "mine.npy"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["by_query_kind"]["queries"]["target_met"]
    reopened = Library.open(library.path, device="cpu")  # the rule comes back from the manifest
    fresh = users_queries(clustered(200, seed=6))
    ids, vectors_ = reopened.catalog.all_vectors()
    truth = exact_evaluation(fresh, ids, vectors_)
    found = np.array([[hit.id for hit in reopened.search(vector=query, k=10)] for query in fresh])
    assert recall_at_k(found, truth) >= 0.92
    reopened.close()


def test_the_report_says_how_the_breadth_is_chosen(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "FLAT_MAX_VECTORS", 100)
    monkeypatch.setattr(choice, "HNSW_MAX_VECTORS", 200)
    with library.writer() as writer:
        writer.commit(items=[NewItem("image", vector, path=f"/photos/{i}.jpg") for i, vector in enumerate(clustered(1500))])
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", "--library", str(library.path), "--target-recall", "0.9"])
    assert result.exit_code == 0, result.output
    assert "search breadth: chosen per query, nprobe" in result.stdout and "nprobe per query (median" in result.stdout
    spec: dict[str, Any] = json.loads((library.path / "manifest.json").read_text())["index"]
    assert spec["breadth_rule"]["breadths"] and spec["search_params_by_kind"]


def test_a_kind_out_of_reach_is_searched_only_as_wide_as_its_recall_grows() -> None:
    """Codes that cap far queries' recall below the target even when every list is searched
    (PQ without its rerank): those queries get the breadth where their recall stops growing,
    not every list, and the report says the target was missed and what would meet it."""
    vectors = clustered(6000)
    ids = np.arange(len(vectors), dtype=np.int64) + 1
    index, report = optimize_vectors(ids, vectors, 0.95, spec=IndexSpec("ivf", "IVF64,PQ8x4"), min_seconds=0.05)
    text = report.by_query_kind["text"]
    assert not report.target_met and text["widest_recall_at_10"] < 0.95 and report.advice
    assert text["nprobe"] < index.max_breadth() and text["breadth_by_query"]["p90"] < index.max_breadth()
    widest = text["widest_recall_at_10"]
    assert text["recall_at_10"] >= widest - 0.03  # the plateau, within its margin and the held-out half's noise
