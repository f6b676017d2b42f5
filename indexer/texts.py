"""Text corpora into the library: .txt (a text per line), .csv/.tsv and .jsonl (a chosen column).

Each text is keyed by its id column (or its line/row number) within its file, so a
re-run updates changed texts, skips unchanged ones and removes vanished ones.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from clipdex.indexer.report import Failure
from clipdex.search.catalog import NewItem
from clipdex.search.errors import UnreadableCorpus
from clipdex.search.library import Library

TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".ndjson")
DEFAULT_COLUMN = "text"


@dataclass(frozen=True)
class TextRow:
    key: str  # the id column's value, else the 1-based line (txt, jsonl) or row (csv) number
    text: str
    metadata: dict[str, Any]


@dataclass
class TextReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    truncated: int = 0  # texts longer than the model's context: only their beginning is embedded
    context_length: int = 0
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "truncated": self.truncated,
            "context_length": self.context_length,
            "failed": [failure.to_json() for failure in self.failed],
            "interrupted": self.interrupted,
        }


def read_corpus(path: Path, column: str | None = None, id_column: str | None = None) -> list[TextRow]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise UnreadableCorpus(f"{path}: not a text corpus (use {', '.join(TEXT_SUFFIXES)})")
    try:
        if suffix == ".txt":
            if column or id_column:
                raise UnreadableCorpus(f"{path}: --column and --id-column apply to .csv, .tsv and .jsonl files")
            return list(_read_lines(path))
        if suffix in (".csv", ".tsv"):
            return _keyed(path, _read_table(path, "\t" if suffix == ".tsv" else ","), column, id_column)
        return _keyed(path, _read_jsonl(path), column, id_column)
    except UnicodeDecodeError as error:
        raise UnreadableCorpus(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise UnreadableCorpus(f"{path}: {error}") from None
    except OSError as error:
        raise UnreadableCorpus(f"{path}: {error.strerror or error}") from None


def _read_lines(path: Path) -> Iterator[TextRow]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if text:
                yield TextRow(str(number), text, {})


def _read_table(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            for number, row in enumerate(reader, start=1):
                if None in row:
                    raise UnreadableCorpus(f"{path}:{reader.line_num}: more fields than the header has")
                yield number, row
        except csv.Error as error:
            raise UnreadableCorpus(f"{path}:{reader.line_num}: {error}") from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UnreadableCorpus(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise UnreadableCorpus(f"{path}:{number}: expected a JSON object per line")
            yield number, row


def _keyed(path: Path, rows: Iterator[tuple[int, dict[str, Any]]], column: str | None, id_column: str | None) -> list[TextRow]:
    column = column or DEFAULT_COLUMN
    result: list[TextRow] = []
    seen: set[str] = set()
    for number, row in rows:
        if column not in row:
            raise UnreadableCorpus(f"{path}:{number}: no column {column!r} (columns: {', '.join(map(str, row))}); choose one with --column")
        if id_column and id_column not in row:
            raise UnreadableCorpus(f"{path}:{number}: no id column {id_column!r}")
        text = "" if row[column] is None else str(row[column]).strip()
        if not text:
            continue
        key = str(row[id_column]) if id_column else str(number)
        if key in seen:
            raise UnreadableCorpus(f"{path}:{number}: id {key!r} appears twice in column {id_column!r}")
        seen.add(key)
        metadata = {k: v for k, v in row.items() if k not in (column, id_column)}
        result.append(TextRow(key, text, metadata))
    return result


def index_texts(
    library: Library,
    files: Sequence[str | os.PathLike[str]],
    column: str | None = None,
    id_column: str | None = None,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    export_text: bool = True,
) -> TextReport:
    """Index each corpus file's texts; a file that cannot be parsed is reported, not indexed.

    Texts are embedded with the library's exported text encoder when it has one (no torch,
    no open_clip; see `clipdex.search.text_export`), else with the open_clip model, whose text
    tower is then exported for later runs and queries (unless `export_text` is False).
    """
    report = TextReport()
    with library.writer() as writer:
        for file in files:
            path = Path(file).expanduser().resolve()
            try:
                rows = read_corpus(path, column, id_column)
            except UnreadableCorpus as error:
                report.failed.append(Failure(str(path), str(error).removeprefix(f"{path}: ")))
                continue
            _index_file(library, writer, str(path), rows, report, batch_size, progress, stop)
            if report.interrupted:
                break
    if export_text and not report.interrupted:
        library.export_text_encoder()  # only does something when this run loaded the model
    return report


def _index_file(library: Library, writer: Any, source: str, rows: list[TextRow], report: TextReport,
                batch_size: int, progress: Callable[[int, int], None] | None, stop: threading.Event | None) -> None:
    stored = library.catalog.texts_from(source)
    pending: list[tuple[TextRow, int | None]] = []
    for row in rows:
        old = stored.pop(row.key, None)
        if old is not None and old[1] == row.text and _same_metadata(old[2], row.metadata):
            report.unchanged += 1
        else:
            pending.append((row, old[0] if old else None))
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        encoder = library.text_encoder()  # the same each batch: the library keeps its choice
        vectors = encoder.encode_texts([row.text for row, _ in batch])
        limit = encoder.context_length
        report.context_length = limit
        items = []
        for (row, item_id), vector in zip(batch, vectors):
            metadata = dict(row.metadata)
            if encoder.count_tokens(row.text) > limit:
                metadata["truncated"] = True
                report.truncated += 1
            items.append(NewItem(kind="text", vector=vector, id=item_id, text=row.text, source=source,
                                 source_key=row.key, extra=metadata))
            report.updated += item_id is not None
            report.added += item_id is None
        writer.commit(items=items)
        if progress:
            progress(start + len(batch), len(pending))
        if stop is not None and stop.is_set():
            report.interrupted = True
            return
    if stored:
        writer.commit(remove_ids=[item_id for item_id, _, _ in stored.values()])
        report.removed += len(stored)


def _same_metadata(stored_extra: str | None, metadata: dict[str, Any]) -> bool:
    stored = json.loads(stored_extra) if stored_extra else {}
    stored.pop("truncated", None)
    return stored == json.loads(json.dumps(metadata, default=str))
