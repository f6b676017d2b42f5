"""The keyword index's and the OCR text's SQL, for both ways into a catalog and both backends.

The statements use named parameters (`:name`), which sqlite3 and SQLAlchemy's `text()`
both take, so that `Catalog` (SQLAlchemy, SQLite or PostgreSQL) and `LocalCatalog`
(sqlite3) run the very same statements, each inside its own write transaction: an item's
keyword row is written, replaced and deleted in the transaction that writes, replaces or
deletes the item (or stores its OCR text), so a crash never leaves them apart.

Tables (made by migration 5):
- `keywords`: on SQLite an FTS5 table, its rowid the item id, one column `words` (the folded
  words, `keywords.fts5_document`); on PostgreSQL `(item_id, words tsvector)` with a GIN index.
- `ocr`: per image item, the text OCR read, its lines (text, score, box) as JSON, the
  content hash of the bytes it was read from (a row for other bytes is stale and ignored),
  and why it could not be read, if it could not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clipdex.search.catalog.keywords import FTS5_TOKENIZER, KeywordQuery, document, fts5_document, tsvector_literal
from clipdex.search.catalog.types import chunks


class Statements(Protocol):
    """One connection, inside a transaction where it writes: runs a statement with named parameters."""

    def rows(self, sql: str, parameters: dict[str, Any]) -> list[Any]: ...

    def many(self, sql: str, parameters: list[dict[str, Any]]) -> None: ...


@dataclass(frozen=True)
class OcrResult:
    """What OCR read in one image item (`lines`: dicts of text, score, box), or why it could not."""

    item_id: int
    content_hash: str | None
    text: str
    lines: list[dict[str, Any]]
    error: str | None = None


# the current OCR row of an item: read from the bytes the item now holds
_CURRENT_OCR = ("LEFT JOIN ocr o ON o.item_id = i.id AND (o.content_hash = i.content_hash "
                "OR (o.content_hash IS NULL AND i.content_hash IS NULL))")


def create_tables(statements: Statements, dialect: str) -> None:
    if dialect == "sqlite":
        tokenizer = FTS5_TOKENIZER.replace("'", "''")
        statements.rows(f"CREATE VIRTUAL TABLE keywords USING fts5(words, tokenize = '{tokenizer}')", {})
    else:
        statements.rows("CREATE TABLE keywords (item_id BIGINT PRIMARY KEY, words TSVECTOR NOT NULL)", {})
        statements.rows("CREATE INDEX keywords_words ON keywords USING GIN (words)", {})
    statements.rows("CREATE TABLE ocr (item_id BIGINT PRIMARY KEY, content_hash TEXT, text TEXT NOT NULL, "
                    "lines TEXT NOT NULL, error TEXT, read_at DOUBLE PRECISION NOT NULL)", {})


def _in(values: Sequence[Any], name: str = "v") -> tuple[str, dict[str, Any]]:
    parameters = {f"{name}{number}": value for number, value in enumerate(values)}
    return ", ".join(f":{key}" for key in parameters), parameters


def _id_column(dialect: str) -> str:
    return "rowid" if dialect == "sqlite" else "item_id"


def documents(statements: Statements, ids: Sequence[int]) -> dict[int, list[tuple[str, str]]]:
    """Each item's searchable text in labelled parts (`keywords.document`), with its current OCR text."""
    found: dict[int, list[tuple[str, str]]] = {}
    for chunk in chunks([int(i) for i in ids]):
        marks, parameters = _in(chunk)
        rows = statements.rows(
            "SELECT i.id, i.kind, i.path, i.text, i.camera_make, i.camera_model, i.extra, o.text "
            f"FROM items i {_CURRENT_OCR} WHERE i.id IN ({marks}) AND i.kind <> 'frame'", parameters)  # a video's moments: no words of their own
        for item_id, *columns in rows:
            found[int(item_id)] = document(*columns)
    return found


def refresh(statements: Statements, dialect: str, ids: Iterable[int]) -> None:
    """Re-make the keyword rows of `ids` from their items (and current OCR text); ids of items
    no longer there lose theirs."""
    ids = sorted({int(i) for i in ids})
    column = _id_column(dialect)
    for chunk in chunks(ids):
        marks, parameters = _in(chunk)
        statements.rows(f"DELETE FROM keywords WHERE {column} IN ({marks})", parameters)
        add_new(statements, dialect, documents(statements, chunk))


def add_new(statements: Statements, dialect: str, made: dict[int, list[tuple[str, str]]]) -> None:
    """Write the keyword rows of items just inserted (none yet), from their documents
    (`keywords.document`): a bulk import makes them from the rows it inserts, not reading them back."""
    if dialect == "sqlite":
        rows = [{"id": i, "words": fts5_document(parts)} for i, parts in made.items() if parts]
        statement = "INSERT INTO keywords (rowid, words) VALUES (:id, :words)"
    else:
        rows = [{"id": i, "words": tsvector_literal(parts)} for i, parts in made.items() if parts]
        statement = "INSERT INTO keywords (item_id, words) VALUES (:id, CAST(:words AS tsvector))"
    if rows:
        statements.many(statement, rows)


def forget(statements: Statements, dialect: str, ids: Sequence[int]) -> None:
    """Delete the keyword and OCR rows of removed items."""
    for chunk in chunks([int(i) for i in ids]):
        marks, parameters = _in(chunk)
        statements.rows(f"DELETE FROM keywords WHERE {_id_column(dialect)} IN ({marks})", parameters)
        statements.rows(f"DELETE FROM ocr WHERE item_id IN ({marks})", parameters)


def rebuild(statements: Statements, dialect: str) -> int:
    """Re-make the whole keyword index from the items (`clipdex check --repair`); the rows written."""
    statements.rows("DELETE FROM keywords", {})
    ids = [int(row[0]) for row in statements.rows("SELECT id FROM items ORDER BY id", {})]
    refresh(statements, dialect, ids)
    return len(ids)


def indexed_ids(statements: Statements, dialect: str) -> set[int]:
    return {int(row[0]) for row in statements.rows(f"SELECT {_id_column(dialect)} FROM keywords", {})}


def search(statements: Statements, dialect: str, query: KeywordQuery, limit: int | None) -> list[tuple[int, float]]:
    """(item id, score) of the items matching `query`, best first (higher score is better: SQLite's
    BM25 negated, PostgreSQL's ts_rank), at most `limit` (None: all)."""
    if not query:
        return []
    tail = "" if limit is None else f" LIMIT {int(limit)}"
    if dialect == "sqlite":
        rows = statements.rows("SELECT rowid, -bm25(keywords) AS score FROM keywords WHERE keywords MATCH :query "
                               f"ORDER BY score DESC, rowid{tail}", {"query": query.fts5_match()})
    else:
        rows = statements.rows("SELECT item_id, ts_rank(words, CAST(:query AS tsquery)) AS score FROM keywords "
                               f"WHERE words @@ CAST(:query AS tsquery) ORDER BY score DESC, item_id{tail}",
                               {"query": query.tsquery_literal()})
    return [(int(item_id), float(score)) for item_id, score in rows]


def count(statements: Statements) -> int:
    return int(statements.rows("SELECT count(*) FROM keywords", {})[0][0])


# -- OCR text -----------------------------------------------------------------------------------


def store_ocr(statements: Statements, dialect: str, results: Sequence[OcrResult], now: float) -> None:
    """Keep what OCR read (replacing what it read before) and re-make those items' keyword rows."""
    rows = [{"item_id": result.item_id, "content_hash": result.content_hash, "text": result.text,
             "lines": json.dumps(result.lines, ensure_ascii=False), "error": result.error, "read_at": now}
            for result in results]
    if not rows:
        return
    statements.many(
        "INSERT INTO ocr (item_id, content_hash, text, lines, error, read_at) "
        "VALUES (:item_id, :content_hash, :text, :lines, :error, :read_at) "
        "ON CONFLICT (item_id) DO UPDATE SET content_hash = excluded.content_hash, text = excluded.text, "
        "lines = excluded.lines, error = excluded.error, read_at = excluded.read_at", rows)
    stored = [result.item_id for result in results]
    present = {int(row[0]) for chunk in chunks(stored)
               for row in statements.rows(f"SELECT id FROM items WHERE id IN ({_in(chunk)[0]})", _in(chunk)[1])}
    gone = [item_id for item_id in stored if item_id not in present]  # removed while OCR read it
    if gone:
        forget(statements, dialect, gone)
    refresh(statements, dialect, present)


def images_to_read(statements: Statements, after_id: int, limit: int) -> list[tuple[int, str, str | None]]:
    """(id, path, content hash) of image items with a path whose bytes OCR has not read, by id after `after_id`."""
    rows = statements.rows(
        f"SELECT i.id, i.path, i.content_hash FROM items i {_CURRENT_OCR} WHERE i.kind = 'image' "
        "AND i.path IS NOT NULL AND o.item_id IS NULL AND i.id > :after ORDER BY i.id LIMIT :limit",
        {"after": int(after_id), "limit": int(limit)})
    return [(int(item_id), str(path), content_hash) for item_id, path, content_hash in rows]


def ocr_counts(statements: Statements) -> dict[str, int]:
    """Image items, those OCR read (their current bytes), those with text found, those it could not read."""
    row = statements.rows(
        "SELECT count(*), count(o.item_id), "
        "coalesce(sum(CASE WHEN o.text <> '' THEN 1 ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN o.error IS NOT NULL THEN 1 ELSE 0 END), 0) "
        f"FROM items i {_CURRENT_OCR} WHERE i.kind = 'image' AND i.path IS NOT NULL", {})[0]
    return {"images": int(row[0]), "read": int(row[1]), "with_text": int(row[2]), "failed": int(row[3])}


def ocr_lines(statements: Statements, ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """The OCR lines (text, score, box) of items whose current bytes were read, by id."""
    found: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks([int(i) for i in ids]):
        marks, parameters = _in(chunk)
        rows = statements.rows(f"SELECT i.id, o.lines FROM items i {_CURRENT_OCR} WHERE i.id IN ({marks}) "
                               "AND o.item_id IS NOT NULL", parameters)
        for item_id, lines in rows:
            found[int(item_id)] = list(json.loads(lines or "[]"))
    return found
