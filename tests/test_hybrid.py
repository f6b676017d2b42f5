"""Hybrid search: meaning and words fused, from the Python API, the CLI and the keyword index.

Items are added with vectors the test chooses (`Library.add_vectors`, their words in an EXIF-like
`description`), so that which item matches the meaning, the words or both is known exactly.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search import ranking
from clipdex.search.errors import InvalidQuery
from clipdex.search.library import Library

QUERY = "walnut bread"


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def away_from(query: np.ndarray, seed: int) -> np.ndarray:
    """A unit vector with a cosine near 0 to `query`."""
    other = np.random.default_rng(seed).standard_normal(query.shape[0]).astype(np.float32)
    return unit(other - np.dot(other, query) * query)


def near(query: np.ndarray, seed: int, cosine: float) -> np.ndarray:
    return unit(cosine * query + np.sqrt(1 - cosine**2) * away_from(query, seed))


@pytest.fixture
def scene(library: Library) -> tuple[Library, dict[str, int]]:
    """both: the meaning and the words; meaning: only the meaning (the query's own vector); words:
    only the words; fillers: neither (other words, vectors away from the query)."""
    query = library.encode_text(QUERY)
    vectors = {"both": near(query, 1, 0.95), "meaning": query, "words": away_from(query, 2)}
    descriptions = {"both": "fresh walnut bread", "meaning": "a quiet harbour", "words": "Walnut Bread, 3.99"}
    keys = list(vectors) + [f"filler{n}" for n in range(30)]
    rows = list(vectors.values()) + [near(query, 10 + n, 0.2) for n in range(30)]
    metadata = [{"description": descriptions.get(key, f"garden hose number {n}")} for n, key in enumerate(keys)]
    library.add_vectors(keys, np.stack(rows), metadata)
    return library, library.item_ids(keys)


def test_hybrid_ranks_both_matches_first_and_keeps_each_modes_first(scene) -> None:
    library, ids = scene
    hybrid = library.search(text=QUERY, k=5)  # hybrid by default: the library has keyword data
    assert hybrid[0].id == ids["both"] and {hit.id for hit in hybrid[1:3]} == {ids["meaning"], ids["words"]}
    semantic = library.search(text=QUERY, k=5, mode="semantic")
    keyword = library.search(text=QUERY, k=5, mode="keyword")
    assert semantic[0].id == ids["meaning"] and ids["both"] in {hit.id for hit in semantic[:2]}
    assert {hit.id for hit in keyword} == {ids["both"], ids["words"]}
    assert {semantic[0].id, keyword[0].id} <= {hit.id for hit in hybrid[:3]}


def test_hits_say_why_they_matched(scene) -> None:
    library, ids = scene
    by_id = {hit.id: hit for hit in library.search(text=QUERY, k=5)}
    both, meaning, words = by_id[ids["both"]], by_id[ids["meaning"]], by_id[ids["words"]]
    assert both.keyword_rank in (1, 2) and words.keyword_rank in (1, 2) and meaning.keyword_rank is None
    assert words.snippet == "«Walnut Bread», 3.99" and meaning.snippet is None
    assert meaning.semantic_score == pytest.approx(1.0, abs=1e-5) and meaning.score == meaning.semantic_score
    assert words.semantic_score == pytest.approx(0.0, abs=1e-4)
    data = both.to_json()
    assert data["snippet"] == "fresh «walnut bread»" and data["keyword_rank"] in (1, 2) and "semantic_score" in data
    assert "semantic_score" not in library.search(text=QUERY, k=5, mode="semantic")[0].to_json()


def test_random_words_find_no_item_by_keyword(scene) -> None:
    library, _ = scene
    assert library.search(text="zebra quantum", mode="keyword") == []
    assert all(hit.keyword_rank is None for hit in library.search(text="zebra quantum", k=10))


def test_filters_paging_and_threshold_keep_their_meaning(scene) -> None:
    library, ids = scene
    every = library.search(text=QUERY, k=12)
    assert [hit.rank for hit in every] == list(range(1, 13))
    assert library.search(text=QUERY, k=4, offset=4) == every[4:8]
    assert all(hit.score >= 0.5 for hit in library.search(text=QUERY, k=12, threshold=0.5))
    assert {hit.id for hit in library.search(text=QUERY, k=12, threshold=0.5)} == {ids["both"], ids["meaning"]}
    assert library.search(text=QUERY, kind="text", k=5) == []  # every item is an image
    with pytest.raises(InvalidQuery, match="mode=keyword needs a text"):
        library.search(like=ids["both"], mode="keyword")


def test_confident_keeps_the_hits_that_stand_out(scene) -> None:
    library, ids = scene
    kept = {hit.id for hit in library.search(text=QUERY, k=20, confident=True)}
    assert kept == {ids["both"], ids["meaning"], ids["words"]}  # the words matched: kept though its cosine is low
    kept = {hit.id for hit in library.search(text=QUERY, k=20, confident=True, mode="semantic")}
    assert kept == {ids["both"], ids["meaning"]}


def test_fusion_never_loses_either_rankings_first() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = list(range(40))
        first, second = list(rng.permutation(ids)[:25]), list(rng.permutation(ids)[:25])
        fused = ranking.fuse([first, second])
        assert {first[0], second[0]} <= set(fused[:3])  # neither ranking's first is ever lost from the top
        assert sorted(fused) == sorted(set(first) | set(second))
        # an item both rankings place best but for each other's first is above every item only one ranking has
        for item in set(first[:2]) & set(second[:2]):
            assert all(fused.index(item) < fused.index(other) for other in set(first) ^ set(second))


def test_sort_by_date_shows_the_best_in_capture_order(library: Library, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for number, day in enumerate(["2021:05:01", "2019:01:02", "2023:07:03"]):
        exif = Image.Exif()
        exif[0x0132] = f"{day} 10:00:00"
        exif[0x010E] = "walnut harvest"  # ImageDescription: found by keyword
        Image.new("RGB", (32, 24), (40 * number, 90, 20)).save(photos / f"p{number}.jpg", exif=exif)
    Image.new("RGB", (32, 24), (1, 2, 3)).save(photos / "other.jpg")
    index_paths(library, [photos])
    by_date = library.search(text="walnut", mode="keyword", sort="date")
    assert [Path(hit.path).name for hit in by_date] == ["p1.jpg", "p0.jpg", "p2.jpg"]
    newest = library.search(text="walnut", mode="keyword", sort="-date")
    assert [Path(hit.path).name for hit in newest] == ["p2.jpg", "p0.jpg", "p1.jpg"]


def test_chinese_text_items_are_found_by_their_words(library: Library) -> None:
    texts = ["我们在咖啡馆见面", "今天的天气很好", "火车站在城市的北边", "Meet me at the café"]
    library.add_texts(texts, keys=[f"t{n}" for n in range(len(texts))])
    for word, number in (("咖啡", 0), ("天气", 1), ("火车站", 2), ("北边", 2), ("cafe", 3)):
        for mode in ("keyword", "hybrid"):
            hits = library.search(text=word, mode=mode, k=3)
            assert f"t{number}" in [hit.key for hit in hits], (word, mode)
    assert library.search(text="咖啡", mode="keyword")[0].snippet == "我们在«咖啡»馆见面"


def test_search_cli_mode_and_json(scene, tmp_path: Path) -> None:
    library, ids = scene
    runner = CliRunner()
    base = ["search", QUERY, "--library", str(library.path), "--json", "-k", "3"]
    result = runner.invoke(app, base + ["--mode", "keyword"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert {hit["id"] for hit in hits} == {ids["both"], ids["words"]}
    assert all(set(hit) >= {"semantic_score", "keyword_rank", "snippet"} for hit in hits)
    result = runner.invoke(app, base + ["--mode", "nonsense"])
    assert result.exit_code == 2
    page = tmp_path / "hits.html"
    result = runner.invoke(app, ["search", QUERY, "--library", str(library.path), "--mode", "keyword", "--format", "html",
                                 "--out", str(page)])
    assert result.exit_code == 0, result.output
    assert "fresh <mark>walnut bread</mark>" in page.read_text()


def test_check_repair_rebuilds_the_keyword_index(scene) -> None:
    library, ids = scene
    with sqlite3.connect(library.path / "catalog.sqlite") as connection:
        connection.execute("DELETE FROM keywords WHERE rowid = ?", (ids["words"],))
    report = library.check()
    assert not report["ok"] and any("keyword index lacks 1 items" in problem for problem in report["problems"])
    assert library.check(repair=True)["repairs"] == ["rebuilt the keyword index from the items and their OCR text"]
    assert library.check()["ok"]
    assert ids["words"] in {hit.id for hit in library.search(text=QUERY, mode="keyword")}


def test_http_search_takes_the_mode_and_says_why(scene) -> None:
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    library, ids = scene
    client = TestClient(create_app(library))
    answer = client.post("/search", json={"text": QUERY, "mode": "keyword", "k": 5})
    assert answer.status_code == 200, answer.text
    hits = answer.json()["hits"]
    assert {hit["id"] for hit in hits} == {ids["both"], ids["words"]}
    assert {hit["snippet"] for hit in hits} == {"fresh «walnut bread»", "«Walnut Bread», 3.99"}
    assert all(hit["keyword_rank"] in (1, 2) and hit["semantic_score"] is not None for hit in hits)
    semantic = client.post("/search", json={"text": QUERY, "mode": "semantic", "k": 1}).json()["hits"]
    assert semantic[0]["id"] == ids["meaning"] and semantic[0]["snippet"] is None
    refused = client.post("/search", json={"like": [ids["both"]], "mode": "keyword"})
    assert refused.status_code == 400 and "mode=keyword needs a text" in refused.json()["detail"]


def test_hybrid_search_on_a_shared_postgresql_catalog(tmp_path: Path, tiny_model, postgres_url: str) -> None:
    """The same query meaning through a library on PostgreSQL: words, phrases, prefixes, Chinese, fusion."""
    library = Library.open(tmp_path / "shared", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    query = library.encode_text(QUERY)
    library.add_vectors(["both", "words", "meaning"], np.stack([near(query, 1, 0.95), away_from(query, 2), query]),
                        [{"description": "Fresh Walnut Bread"}, {"description": "walnut bread, 3.99"},
                         {"description": "我们在咖啡馆见面"}])
    ids = library.item_ids(["both", "words", "meaning"])
    assert {hit.id for hit in library.search(text='"walnut bread"', mode="keyword")} == {ids["both"], ids["words"]}
    assert {hit.id for hit in library.search(text="WALN*", mode="keyword")} == {ids["both"], ids["words"]}
    assert [hit.id for hit in library.search(text="咖啡", mode="keyword")] == [ids["meaning"]]
    assert library.search(text="bread walnut", mode="keyword")[0].snippet in ("Fresh «Walnut Bread»", "«walnut bread», 3.99")
    assert library.search(text=QUERY, k=3)[0].id == ids["both"]
    assert library.check()["ok"]
    library.close()
