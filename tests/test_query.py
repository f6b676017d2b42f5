"""Lookups: filters inside the search (exact k), composition, texts, paging, threshold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.indexer import index_paths
from clipdex.indexer.texts import index_texts, read_corpus
from clipdex.search.errors import InvalidQuery, ItemNotFound, UnreadableCorpus
from clipdex.search.library import Library
from clipdex.search.query import Query, combine
from tests.conftest import write_image


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mixed(tmp_path_factory: pytest.TempPathFactory, tiny_model, request: pytest.FixtureRequest) -> Library:
    """24 images (sizes, folders, capture dates vary) and 10 texts; shared by the module's tests,
    once with each catalog backend."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    catalog = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    library = Library.open(tmp_path / "library", model=tiny_model, create=True, device="cpu", catalog=catalog)
    for i in range(24):
        folder = tmp_path / "pics" / ("2023" if i % 3 == 0 else "2024")
        path = write_image(folder / f"im{i:02d}.jpg", seed=i, size=(40 + 8 * (i % 4), 30 + 10 * (i % 5)))
        if i % 2 == 0:
            exif = Image.Exif()
            exif.get_ifd(0x8769)[0x9003] = f"2022:{1 + i % 12:02d}:15 12:00:00"
            Image.open(path).save(path, exif=exif.tobytes())
    index_paths(library, [tmp_path / "pics"])
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(f"caption number {i} about {w}" for i, w in enumerate("sun sea dog cat car bus sky red blue tree".split())))
    index_texts(library, [corpus])
    return library


def brute_force(library: Library, query_vector: np.ndarray, allowed: set[int]) -> list[tuple[int, float]]:
    ids, vectors = library.catalog.all_vectors()
    scores = vectors @ query_vector
    ranked = sorted(((int(i), float(s)) for i, s in zip(ids, scores) if int(i) in allowed), key=lambda p: -p[1])
    return ranked


def matching(library: Library, predicate) -> set[int]:
    items = library.catalog.get_items(library.catalog.ids().tolist())
    return {i for i, item in items.items() if predicate(item)}


FILTERS = [
    ({"kind": "image"}, lambda it: it.kind == "image"),
    ({"kind": "text"}, lambda it: it.kind == "text"),
    ({"path": "*/2023/*"}, lambda it: it.path is not None and "/2023/" in it.path),
    ({"min_width": 56}, lambda it: (it.width or 0) >= 56),
    ({"min_height": 60, "kind": "image"}, lambda it: (it.height or 0) >= 60),
    ({"after": "2022-06-01"}, lambda it: it.taken_at is not None and it.taken_at >= "2022-06-01"),
    ({"after": "2022-03-01", "before": "2022-09-01"}, lambda it: it.taken_at is not None and "2022-03-01" <= it.taken_at < "2022-09-01"),
    ({"path": "*/2024/*", "min_width": 48}, lambda it: it.path is not None and "/2024/" in it.path and (it.width or 0) >= 48),
]


@pytest.mark.parametrize("filters,predicate", FILTERS)
@pytest.mark.parametrize("k", [1, 3, 50])
def test_filters_return_exactly_the_best_k_matches(mixed: Library, filters, predicate, k: int) -> None:
    allowed = matching(mixed, predicate)
    assert allowed, "fixture must match something"
    query = Query.build(text="a photo of the sea", k=k, **filters)
    hits = mixed.search(query)
    expected = brute_force(mixed, mixed.query_vector(query), allowed)[:k]
    assert len(hits) == min(k, len(allowed))
    assert [hit.id for hit in hits] == [i for i, _ in expected]
    for hit, (_, score) in zip(hits, expected):
        assert hit.score == pytest.approx(score, abs=1e-5)


def test_filter_matching_nothing(mixed: Library) -> None:
    assert mixed.search(text="x", path="/nowhere/*") == []


def test_offset_and_threshold(mixed: Library) -> None:
    everything = mixed.search(text="sea", k=30)
    assert [h.id for h in mixed.search(text="sea", k=5, offset=5)] == [h.id for h in everything[5:10]]
    assert [h.rank for h in mixed.search(text="sea", k=5, offset=5)] == [6, 7, 8, 9, 10]
    cut = everything[7].score
    assert [h.id for h in mixed.search(text="sea", k=30, threshold=cut)] == [h.id for h in everything if h.score >= cut]


def test_composition_follows_the_formula(mixed: Library) -> None:
    image = Path(mixed.get_item(2).path)
    query = Query.build(text="golden retriever", image=image, minus="indoors", weights=[2.0])
    t, i, m = mixed.encode_text("golden retriever"), mixed.encode_image(image), mixed.encode_text("indoors")
    expected = 2 * t + i - m
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(mixed.query_vector(query), expected, atol=1e-6)
    hits = mixed.search(query)
    best = brute_force(mixed, expected, set(mixed.catalog.ids().tolist()))[0]
    assert hits[0].id == best[0]


def test_like_and_vector_terms(mixed: Library, tmp_path: Path) -> None:
    target = mixed.search(text="dog", kind="image", k=1)[0]
    assert mixed.search(like=[target.id], k=1)[0].id == target.id
    vector = mixed.catalog.get_item(target.id).vector_array()
    np.save(tmp_path / "q.npy", vector)
    assert mixed.search(vector=str(tmp_path / "q.npy"), k=1)[0].id == target.id
    with pytest.raises(ItemNotFound):
        mixed.search(like=[999999])
    np.save(tmp_path / "bad.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(InvalidQuery, match="5 dimensions"):
        mixed.search(vector=str(tmp_path / "bad.npy"))


def test_a_vector_of_large_numbers_searches_its_direction(mixed: Library) -> None:
    """Only the direction counts: a float32 vector whose norm float32 cannot hold (3.4e38 is its
    largest number) is the same query as its unit vector, not one that "cancels out"."""
    target = mixed.search(text="dog", kind="image", k=1)[0]
    vector = mixed.catalog.get_item(target.id).vector_array()
    large = (vector / np.abs(vector).max() * 3e38).astype(np.float32)
    np.testing.assert_allclose(mixed.query_vector(Query.build(vector=large)), vector / np.linalg.norm(vector), atol=1e-6)
    assert mixed.search(vector=large, k=1)[0].id == target.id


@pytest.mark.parametrize("scale", [1e300, 1e-9])
def test_only_the_weights_ratios_count(mixed: Library, scale: float) -> None:
    """Weights of 1e300 (whose weighted sum overflows) or 1e-9 (whose sum looks like zero) give
    the query that weights of 1 in the same ratios give."""
    image = Path(mixed.get_item(2).path)
    expected = mixed.query_vector(Query.build(text="golden retriever", image=image, minus="indoors", weights=[2.0, 1.0, 1.0]))
    scaled = Query.build(text="golden retriever", image=image, minus="indoors", weights=[2 * scale, scale, scale])
    np.testing.assert_allclose(mixed.query_vector(scaled), expected, atol=1e-6)


def test_invalid_queries() -> None:
    with pytest.raises(InvalidQuery, match="at least one term"):
        Query.build()
    with pytest.raises(InvalidQuery, match="kind"):
        Query.build(text="x", kind="audio")
    with pytest.raises(InvalidQuery, match="date"):
        Query.build(text="x", after="last tuesday")
    for blank in ("", " ", "\t\n"):
        with pytest.raises(InvalidQuery, match="only whitespace"):
            Query.build(text=blank)
        with pytest.raises(InvalidQuery, match="only whitespace"):
            Query.build(text="a dog", minus=[blank])
    with pytest.raises(InvalidQuery, match="without a time zone"):
        Query.build(text="x", after="2024-01-01T00:00:00+05:00", before="2024-06-01")
    with pytest.raises(InvalidQuery, match="cancel"):
        combine([np.ones(4), np.ones(4)], [1.0, -1.0])


def test_text_hits_carry_text_and_metadata(mixed: Library) -> None:
    hits = mixed.search(text="caption number 2 about dog", kind="text", k=1)
    assert hits[0].kind == "text" and hits[0].text == "caption number 2 about dog"
    assert hits[0].path is None
    assert hits[0].metadata["source_key"] == "3"
    data = hits[0].to_json()
    assert data["text"] == hits[0].text and "path" not in data


def test_text_corpora_formats_and_reruns(library: Library, tmp_path: Path) -> None:
    csv_file = tmp_path / "notes.csv"
    csv_file.write_text("id,body,author\na1,the quick brown fox,ann\na2,a lazy dog,bob\n")
    report = index_texts(library, [csv_file], column="body", id_column="id")
    assert (report.added, report.unchanged) == (2, 0)
    csv_file.write_text("id,body,author\na1,the quick brown fox,ann\na2,a very lazy dog,bob\na3,new,cy\n")
    report = index_texts(library, [csv_file], column="body", id_column="id")
    assert (report.added, report.updated, report.unchanged, report.removed) == (1, 1, 1, 0)
    hit = library.search(text="a very lazy dog", kind="text", k=1)[0]
    assert hit.metadata["author"] == "bob" and hit.metadata["source_key"] == "a2"
    csv_file.write_text("id,body,author\na1,the quick brown fox,ann\n")
    assert index_texts(library, [csv_file], column="body", id_column="id").removed == 2
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"text": "héllo wörld", "lang": "de"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert index_texts(library, [jsonl]).added == 2
    tsv = tmp_path / "t.tsv"
    tsv.write_text("caption\tscore\nred car\t1\n")
    assert index_texts(library, [tsv], column="caption").added == 1
    assert library.stats()["texts"] == 4


def test_long_texts_are_truncated_and_said_so(library: Library, tmp_path: Path) -> None:
    corpus = tmp_path / "long.txt"
    corpus.write_text("short one\n" + " ".join(["word"] * 200) + "\n")
    report = index_texts(library, [corpus])
    assert report.truncated == 1 and report.context_length == 16
    long_hit = [h for h in library.search(text="word word", kind="text", k=2) if h.text.startswith("word")][0]
    assert long_hit.metadata["truncated"] is True


@pytest.mark.parametrize("content,suffix,message", [
    ("a,b\n1,2\n", ".csv", "no column 'text'"),
    ('{"title": "no text"}\n', ".jsonl", ":1: no column 'text'"),
    ("x\n", ".pdf", "not a text corpus"),
])
def test_bad_corpora_name_file_and_line(tmp_path: Path, content: str, suffix: str, message: str, library: Library) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(UnreadableCorpus, match=message):
        read_corpus(path)
    report = index_texts(library, [path])
    assert report.failed and message.strip(":") in report.failed[0].error


def test_bad_rows_are_reported_by_line_and_the_others_indexed(library: Library, tmp_path: Path) -> None:
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"text": "first"}\nnot json\n[1, 2]\n{"title": "no text"}\n{"text": "last"}\n')
    table = tmp_path / "t.csv"
    huge = "x" * 200_000  # over the csv module's default field limit of 131,072 characters
    table.write_text(f'text,note\nalpha,1\n"{huge}",2\nbeta,3,extra\ngamma,4\n')
    report = index_texts(library, [jsonl, table])
    assert report.added == 5
    assert [(f.path, f.error.split(" (")[0]) for f in report.failed] == [
        (str(jsonl), "line 2: not valid JSON"), (str(jsonl), "line 3: expected a JSON object per line"),
        (str(jsonl), "line 4: no column 'text'"), (str(table), "line 4: more fields than the header has")]
    texts = {hit.text for hit in library.search(text="x", kind="text", k=10)}
    assert texts == {"first", "last", "alpha", huge, "gamma"}


def test_a_row_gone_bad_keeps_its_indexed_text(library: Library, tmp_path: Path) -> None:
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert index_texts(library, [jsonl]).added == 2
    jsonl.write_text('{"text": "one"}\n{"text": "two"\n')
    report = index_texts(library, [jsonl])
    assert (report.unchanged, report.removed, len(report.failed)) == (1, 0, 1)
    assert library.stats()["texts"] == 2
    jsonl.write_text('{"text": "one"}\n')
    assert index_texts(library, [jsonl]).removed == 1


def test_a_corpus_over_the_size_limit_is_reported_unread(library: Library, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        handle.truncate(3 << 20)  # sparse
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    report = index_texts(library, [big, good], max_file_mb=2)
    assert report.added == 1
    assert [(f.path, f.error) for f in report.failed] == [(str(big), "3.0 MB, over the 2.0 MB size limit (--max-file-mb)")]
