"""Text corpora into the library: .txt (a text per line), .csv/.tsv and .jsonl (a chosen column).

Each text is keyed by its id column (or its line/row number) within its file, so a
re-run updates changed texts, skips unchanged ones and removes vanished ones. A bad row
(a line that is not JSON, a record with more fields than the header...) is reported with
its line number and left out; the file's other rows are indexed, and while a file has bad
rows none of its indexed texts are removed (the bad row may be one of them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from clipdex.indexer.report import Failure
from clipdex.indexer.scan import NOT_UTF8_NAME, recordable_name
from clipdex.search.catalog.types import NewItem
from clipdex.search.errors import ClipdexError, UnreadableCorpus, UnreadableFile
from clipdex.search.library import Library
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, MB, max_file_bytes, not_regular_reason, read_regular_file

TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".ndjson")
DEFAULT_COLUMN = "text"


@dataclass(frozen=True)
class TextRow:
    key: str  # the id column's value, else the 1-based line (txt, jsonl) or row (csv) number
    text: str
    metadata: dict[str, Any]


@dataclass
class Corpus:
    rows: list[TextRow]
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason): left out


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


def read_corpus(path: Path, column: str | None = None, id_column: str | None = None,
                max_bytes: int = DEFAULT_MAX_FILE_MB * MB) -> Corpus:
    """The file's good rows, and its bad ones by line number. Raises UnreadableCorpus when
    the file as a whole cannot be read: not a regular file, over `max_bytes`, not UTF-8,
    no such column in any row."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise UnreadableCorpus(f"{path}: not a text corpus (use {', '.join(TEXT_SUFFIXES)})")
    if suffix == ".txt" and (column or id_column):
        raise UnreadableCorpus(f"{path}: --column and --id-column apply to .csv, .tsv and .jsonl files")
    try:
        data, _ = read_regular_file(path, max_bytes, setting="--max-file-mb")
    except UnreadableFile as error:
        raise UnreadableCorpus(f"{path}: {error.reason}") from None
    except OSError as error:
        raise UnreadableCorpus(f"{path}: {error.strerror or error}") from None
    corpus = Corpus([])
    newline = "" if suffix in (".csv", ".tsv") else None  # as open() would: the csv module wants ""
    handle = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline=newline)
    try:
        if suffix == ".txt":
            corpus.rows = list(_read_lines(handle))
        elif suffix in (".csv", ".tsv"):
            # a field may be as long as the file may be (the csv module's default stops at 131,072 characters)
            csv.field_size_limit(max(csv.field_size_limit(), max_bytes))
            _keyed(path, _read_table(handle, "\t" if suffix == ".tsv" else ",", corpus), column, id_column, corpus)
        else:
            _keyed(path, _read_jsonl(handle, corpus), column, id_column, corpus)
    except UnicodeDecodeError as error:
        raise UnreadableCorpus(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    return corpus


def _read_lines(handle: IO[str]) -> Iterator[TextRow]:
    for number, line in enumerate(handle, start=1):
        text = line.strip()
        if text:
            yield TextRow(str(number), text, {})


def _read_table(handle: IO[str], delimiter: str, corpus: Corpus) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows numbered from 1 after the header; a bad record keeps its number (the next rows keep their keys)."""
    reader = csv.DictReader(handle, delimiter=delimiter)
    number = 0
    while True:
        before = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            corpus.bad_rows.append((reader.line_num, str(error)))
            if reader.line_num == before:  # nothing was consumed: it would fail again
                return
            number += 1
            continue
        number += 1
        if None in row:
            corpus.bad_rows.append((reader.line_num, "more fields than the header has"))
            continue
        yield number, row


def _read_jsonl(handle: IO[str], corpus: Corpus) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            corpus.bad_rows.append((number, f"not valid JSON ({error})"))
            continue
        if not isinstance(row, dict):
            corpus.bad_rows.append((number, "expected a JSON object per line"))
            continue
        yield number, row


def _keyed(path: Path, rows: Iterator[tuple[int, dict[str, Any]]], column: str | None, id_column: str | None,
           corpus: Corpus) -> None:
    """Append the rows with a text to `corpus.rows`; a row without the column or the id column,
    or with an id seen before, is a bad row. No row with the column at all: the file is bad."""
    column = column or DEFAULT_COLUMN
    seen: set[str] = set()
    first_without: tuple[int, dict[str, Any]] | None = None
    had_column = False
    for number, row in rows:
        if column not in row:
            first_without = first_without or (number, row)
            corpus.bad_rows.append((number, f"no column {column!r}"))
            continue
        had_column = True
        if id_column and id_column not in row:
            corpus.bad_rows.append((number, f"no id column {id_column!r}"))
            continue
        text = "" if row[column] is None else str(row[column]).strip()
        if not text:
            continue
        key = str(row[id_column]) if id_column else str(number)
        if key in seen:
            corpus.bad_rows.append((number, f"id {key!r} appears twice in column {id_column!r}; this row is left out"))
            continue
        seen.add(key)
        metadata = {k: v for k, v in row.items() if k not in (column, id_column)}
        corpus.rows.append(TextRow(key, text, metadata))
    if first_without is not None and not had_column:
        number, row = first_without
        raise UnreadableCorpus(f"{path}:{number}: no column {column!r} (columns: {', '.join(map(str, row))}); choose one with --column")


def index_texts(
    library: Library,
    files: Sequence[str | os.PathLike[str]],
    column: str | None = None,
    id_column: str | None = None,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    export_text: bool = True,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> TextReport:
    """Index each corpus file's texts; a file that cannot be read is reported, not indexed,
    and so is each bad row (by line number) of a file whose other rows are indexed.

    Every file must be a regular file (ClipdexError otherwise, before anything is indexed);
    one over `max_file_mb` is reported, not read.

    Texts are embedded with the library's exported text encoder when it has one (no torch,
    no open_clip; see `clipdex.search.encoders.text_export`), else with the open_clip model, whose text
    tower is then exported for later runs and queries (unless `export_text` is False).
    """
    paths = [Path(file).expanduser().resolve() for file in files]
    for path in paths:
        _check_given(path)
    with library.writer() as writer:
        report = index_texts_locked(library, writer, paths, column, id_column, batch_size, progress, stop, max_file_mb)
    if export_text and not report.interrupted:
        library.export_text_encoder()  # only does something when this run loaded the model
    return report


def index_texts_locked(
    library: Library,
    writer: Any,
    files: Sequence[str | os.PathLike[str]],
    column: str | None = None,
    id_column: str | None = None,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> TextReport:
    """`index_texts` for a caller that holds the write lock already (`writer`: a watcher, say);
    exports nothing."""
    report = TextReport()
    for path in [Path(file).expanduser().resolve() for file in files]:
        if not recordable_name(str(path)):
            report.failed.append(Failure(str(path), NOT_UTF8_NAME))
            continue
        try:
            _check_given(path)
            corpus = read_corpus(path, column, id_column, max_file_bytes(max_file_mb))
        except UnreadableCorpus as error:
            report.failed.append(Failure(str(path), str(error).removeprefix(f"{path}: ")))
            continue
        except ClipdexError as error:  # not a regular file (any more)
            report.failed.append(Failure(str(path), str(error).removeprefix(f"{path}: ")))
            continue
        report.failed += [Failure(str(path), f"line {line}: {reason}") for line, reason in corpus.bad_rows]
        _index_file(library, writer, str(path), corpus.rows, report, batch_size, progress, stop,
                    keep_unlisted=bool(corpus.bad_rows))
        if report.interrupted:
            break
    return report


def _check_given(path: Path) -> None:
    """A corpus named by the user that exists must be a regular file (a FIFO would block the run)."""
    try:
        info = os.stat(path)
    except OSError:
        return  # reported with the file's other failures
    reason = not_regular_reason(info.st_mode)
    if reason is not None:
        raise ClipdexError(f"{path}: {reason}")


def _index_file(library: Library, writer: Any, source: str, rows: list[TextRow], report: TextReport,
                batch_size: int, progress: Callable[[int, int], None] | None, stop: threading.Event | None,
                keep_unlisted: bool = False) -> None:
    """`keep_unlisted`: the file had bad rows, so texts missing from `rows` are kept, not removed."""
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
    if stored and not keep_unlisted:
        writer.commit(remove_ids=[item_id for item_id, _, _ in stored.values()])
        report.removed += len(stored)


def _same_metadata(stored_extra: str | None, metadata: dict[str, Any]) -> bool:
    stored = json.loads(stored_extra) if stored_extra else {}
    stored.pop("truncated", None)
    return stored == json.loads(json.dumps(metadata, default=str))
