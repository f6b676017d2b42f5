"""The keyword index in the catalog: the same query meaning on SQLite (both ways in) and PostgreSQL,
written in the transactions that write the items, rebuilt by `check --repair`."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipdex.search.catalog.database import Catalog
from clipdex.search.catalog.keywords import KeywordQuery, document, snippet, tsvector_literal
from clipdex.search.catalog.keyword_sql import OcrResult
from clipdex.search.catalog.local import LocalCatalog, open_catalog
from clipdex.search.catalog.types import NewItem

DIM = 4


def vector(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return values / np.linalg.norm(values)


def items() -> list[NewItem]:
    return [
        NewItem(kind="image", vector=vector(1), path="/photos/Harbour Trip/IMG_0001.jpg", content_hash="h1",
                camera_make="Canon", camera_model="EOS R6"),
        NewItem(kind="image", vector=vector(2), path="/photos/receipts/scan.png", content_hash="h2"),
        NewItem(kind="text", vector=vector(3), text="Le café de la gare ouvre à sept heures", source="/c.txt", source_key="1"),
        NewItem(kind="text", vector=vector(4), text="我们在咖啡馆见面", source="/c.txt", source_key="2"),
        NewItem(kind="text", vector=vector(5), text="The harbor master's WALNUT boat", source="/c.txt", source_key="3"),
        NewItem(kind="image", vector=vector(6), path="/photos/misc/cat.jpg", content_hash="h6",
                extra={"description": "Sunset over Zürich"}),
    ]


# query -> the item numbers (1-based, as in items()) it must find
EXPECTED = {
    "harbour": {1},
    "HARBOUR": {1},
    "harb*": {1, 5},
    "cafe": {3},  # accents folded
    "CAFÉ": {3},
    '"cafe de la gare"': {3},
    '"gare de la cafe"': set(),  # a phrase is in order
    "咖啡": {4},  # Chinese without spaces, a two-character word
    "咖啡馆": {4},
    "啡咖": set(),
    "walnut boat": {5},  # every word must match
    "walnut cat": set(),
    "canon eos": {1},
    "r6": {1},
    "receipts": {2},  # a folder's name
    "zurich": {6},  # the EXIF description
    "img_0001": {1},
    "...": set(),
}


@pytest.fixture(params=["sqlalchemy", "sqlite3", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "postgresql":
        made: Any = Catalog(str(request.getfixturevalue("postgres_url")), DIM)
    elif request.param == "sqlite3":
        Catalog(tmp_path / "catalog.sqlite", DIM).close()
        made = open_catalog(None, tmp_path / "catalog.sqlite", DIM)
        assert isinstance(made, LocalCatalog)
    else:
        made = Catalog(tmp_path / "catalog.sqlite", DIM)
    yield made
    made.close()


def found(catalog: Any, ids: list[int], query: str) -> set[int]:
    number = {item_id: position + 1 for position, item_id in enumerate(ids)}
    return {number[item_id] for item_id, _ in catalog.keyword_search(KeywordQuery.parse(query), None)}


def test_queries_mean_the_same_on_every_backend(catalog: Any) -> None:
    ids = catalog.commit_batch(items()).ids
    parts = catalog.keyword_documents(ids)
    for query, expected in EXPECTED.items():
        assert found(catalog, ids, query) == expected, query
        # the Python reading of the query agrees with the database's
        assert {n for n, i in enumerate(ids, 1) if KeywordQuery.parse(query) and KeywordQuery.parse(query).matches(parts[i])} == expected, query


def test_keyword_rows_follow_every_write(catalog: Any) -> None:
    ids = catalog.commit_batch(items()).ids
    catalog.commit_batch(moves=[(ids[0], {"path": "/photos/Lake Trip/IMG_0001.jpg"})])
    assert found(catalog, ids, "harbour") == set() and found(catalog, ids, "lake") == {1}
    catalog.commit_batch(remove_ids=[ids[4]])
    assert found(catalog, ids, "walnut") == set()
    assert catalog.keyword_ids() == set(ids) - {ids[4]}


def test_ocr_text_is_found_and_follows_the_bytes(catalog: Any) -> None:
    ids = catalog.commit_batch(items()).ids
    lines = [{"text": "WALNUT BREAD 3.99", "score": 0.97, "box": [[1, 2], [30, 2], [30, 9], [1, 9]]}]
    catalog.store_ocr([OcrResult(ids[1], "h2", "WALNUT BREAD 3.99", lines)])
    assert found(catalog, ids, "walnut") == {2, 5}
    assert catalog.ocr_lines([ids[1]]) == {ids[1]: lines}
    assert [i for i, _, _ in catalog.images_to_read(0, 10)] == [ids[0], ids[5]]
    # the file changed: the text read from its old bytes is no longer what the item is found by
    changed = items()[1]
    changed.id, changed.content_hash = ids[1], "h2-changed"
    catalog.commit_batch([changed])
    assert found(catalog, ids, "walnut") == {5}
    assert ids[1] in [i for i, _, _ in catalog.images_to_read(0, 10)]


def test_a_failed_commit_leaves_no_keyword_rows(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite", DIM)
    catalog.commit_batch([items()[0]])
    with pytest.raises(Exception):  # the second row's path is the first's: the unique index refuses it
        catalog.commit_batch([items()[4], items()[0]])
    assert catalog.keyword_ids() == {1}
    assert found(catalog, [1, 2, 3, 4, 5], "walnut") == set()


def test_an_older_catalog_is_indexed_when_migrated(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog(path, DIM).commit_batch(items())
    with sqlite3.connect(path) as connection:  # as the release before the keyword index left it
        connection.execute("DROP TABLE keywords")
        connection.execute("DROP TABLE ocr")
        connection.execute("DELETE FROM schema_version WHERE version = 5")
    catalog = Catalog(path, DIM)
    assert found(catalog, list(range(1, 7)), "harbour") == {1}


def test_rebuild_restores_a_damaged_index(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite", DIM)
    ids = catalog.commit_batch(items()).ids
    with catalog.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM keywords WHERE rowid IN (1, 2)")
    assert found(catalog, ids, "harbour") == set()
    assert catalog.rebuild_keywords() == len(ids)
    assert found(catalog, ids, "harbour") == {1}


def test_snippet_marks_the_match() -> None:
    parts = document("image", "/p/x.jpg", None, None, None, None, "Fresh WALNUT bread and Café au lait")
    assert snippet(KeywordQuery.parse("walnut cafe"), parts) == "Fresh «WALNUT» bread and «Café» au lait"
    assert snippet(KeywordQuery.parse("sesame"), parts) is None


def test_tsvector_positions_keep_parts_apart() -> None:
    literal = tsvector_literal([("name", "a b"), ("ocr", "c")])
    assert literal == "'a':1 'b':2 'c':4"
