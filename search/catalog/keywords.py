"""The keyword index's words and queries, without a database: what both catalogs and both
backends (SQLite FTS5, PostgreSQL full text) share, so that a query means the same everywhere.

Words are made here, in Python, not by a database's tokenizer: a word is a run of letters
and digits, and every CJK character (Han, kana, Hangul) is a word of its own, so that
Chinese written without spaces is found by any run of its characters (a two-character
word as well as a longer one: FTS5's trigram tokenizer cannot find words shorter than
three characters, and PostgreSQL's parser drops non-ASCII letters in a C locale). Each
word is folded: Unicode compatibility forms, accents removed, case folded. SQLite stores
the folded words separated by spaces in an FTS5 table (tokenizer unicode61, which then
only splits at the spaces: `FTS5_TOKENIZER`); PostgreSQL stores them as a tsvector written out here with
their positions (`tsvector_literal`), never passed through its text parser.

A query (`KeywordQuery.parse`) is clauses that must all match (AND): a word, a `"quoted
phrase"` (its words adjacent, in order), a word run such as `wi-fi` or `咖啡` (a phrase
too), or a prefix `harb*`. `fts5_match` and `tsquery_literal` write the same clauses in
each backend's syntax; `mark` finds them in an item's original text for the snippet.

What an item is found by (`document`): its file name and the names of the three folders
above it, the camera make and model, the EXIF description, a text item's text, and the
text OCR read in the image.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

# CJK ideographs, kana, Hangul syllables, CJK compatibility ideographs, fullwidth forms are folded by NFKC
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_QUERY_PART = re.compile(r'"([^"]*)"(\*?)|(\S+)')
FTS5_TOKENIZER = "unicode61 remove_diacritics 0 tokenchars '_'"
MAX_POSITION = 16_383  # PostgreSQL's largest tsvector position
MAX_WORDS = 20_000  # of one item's document (a page of a book is ~500)
FOLDERS_KEPT = 3
OCR_PART = "ocr"
MARK_START, MARK_END = "\u00ab", "\u00bb"  # «match», as the snippet marks it


_ASCII_WORD = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=65_536)  # names and folders repeat: a bulk import folds each once
def fold(word: str) -> str:
    """A word as stored and compared: compatibility forms unified, accents removed, case folded."""
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()


def words_with_spans(text: str) -> list[tuple[str, int, int]]:
    """(folded word, start, end) of each word of `text` (which should be NFC: see `nfc`)."""
    found = []
    for match in _WORD.finditer(text):
        folded = fold(match.group())
        if folded:
            found.append((folded, match.start(), match.end()))
    return found


def words(text: str) -> list[str]:
    """The folded words of `text`, in order (each may itself split into several when folded: "ﬁ" is "fi")."""
    if text.isascii():  # the common case, the same answer without the Unicode steps
        return _ASCII_WORD.findall(text.lower())
    out: list[str] = []
    for word, _, _ in words_with_spans(nfc(text)):
        out.extend(part for part in _WORD.findall(word))
    return out


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# -- what an item is found by -------------------------------------------------------------


def document(kind: str, path: str | None, text: str | None, camera_make: str | None, camera_model: str | None,
             extra: str | None, ocr_text: str | None) -> list[tuple[str, str]]:
    """An item's searchable text in labelled parts: ("name", ...), ("folder", ...), ("camera", ...),
    ("description", ...), ("text", ...), ("ocr", ...); empty parts left out."""
    parts: list[tuple[str, str]] = []
    if path:
        pieces = [piece for piece in re.split(r"[\\/]", path) if piece]
        if pieces:
            parts.append(("name", pieces[-1]))
            parts.extend(("folder", folder) for folder in pieces[-1 - FOLDERS_KEPT:-1])
    camera = " ".join(value for value in (camera_make, camera_model) if value)
    if camera:
        parts.append(("camera", camera))
    if extra and '"description"' in extra:  # most extras have none: no JSON to read (a bulk import's million rows)
        try:
            described = json.loads(extra)
        except ValueError:
            described = None
        if isinstance(described, dict) and isinstance(described.get("description"), str):
            parts.append(("description", described["description"]))
    if kind == "text" and text:
        parts.append(("text", text))
    if ocr_text:
        parts.append((OCR_PART, ocr_text))
    return [(label, nfc(value)) for label, value in parts if value.strip()]


def document_words(parts: Sequence[tuple[str, str]]) -> list[str]:
    """The folded words of a document, at most MAX_WORDS; parts do not run into each other in a phrase
    (a gap word that no query can contain separates them)."""
    out: list[str] = []
    for _, value in parts:
        if out:
            out.append("_")  # never a word: `_` is no letter or digit
        out.extend(words(value))
        if len(out) >= MAX_WORDS:
            return out[:MAX_WORDS]
    return out


def fts5_document(parts: Sequence[tuple[str, str]]) -> str:
    """The text stored in SQLite's FTS5 table (tokenizer unicode61 with `_` a word character: the
    words split at spaces, and the gap `_` between parts is a word no query has)."""
    return " ".join(document_words(parts))


def tsvector_literal(parts: Sequence[tuple[str, str]]) -> str:
    """The document as a PostgreSQL tsvector literal: each word quoted, with its positions (1-based)."""
    positions: dict[str, list[int]] = {}
    for position, word in enumerate(document_words(parts), start=1):
        if word != "_":
            positions.setdefault(word, []).append(min(position, MAX_POSITION))
    return " ".join(f"'{word}':{','.join(str(p) for p in sorted(set(at))[:256])}" for word, at in positions.items())


# -- queries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """Words that must appear adjacent and in order; the last one a prefix when `prefix`."""

    words: tuple[str, ...]
    prefix: bool = False

    def matches_at(self, found: Sequence[str], start: int) -> bool:
        if start + len(self.words) > len(found):
            return False
        for offset, word in enumerate(self.words):
            candidate = found[start + offset]
            last = offset == len(self.words) - 1
            if not (candidate.startswith(word) if (last and self.prefix) else candidate == word):
                return False
        return True


@dataclass(frozen=True)
class KeywordQuery:
    """A keyword query: clauses that must all match (see the module's description)."""

    clauses: tuple[Clause, ...]

    @classmethod
    def parse(cls, text: str) -> "KeywordQuery":
        clauses: list[Clause] = []
        for match in _QUERY_PART.finditer(nfc(text)):
            quoted, star, bare = match.groups()
            if bare is not None:
                star = "*" if bare.endswith("*") else ""
                quoted = bare.rstrip("*")
            found = tuple(words(quoted))
            if found:
                clauses.append(Clause(found, prefix=bool(star)))
        return cls(tuple(dict.fromkeys(clauses)))

    def __bool__(self) -> bool:
        return bool(self.clauses)

    def fts5_match(self) -> str:
        """The query in FTS5's syntax: `"w1 w2" AND "pre" *`."""
        return " AND ".join('"' + " ".join(clause.words) + '"' + (" *" if clause.prefix else "") for clause in self.clauses)

    def tsquery_literal(self) -> str:
        """The query as a PostgreSQL tsquery literal: `'w1' <-> 'w2' & 'pre':*`."""
        def phrase(clause: Clause) -> str:
            quoted = [f"'{word}'" for word in clause.words]
            if clause.prefix:
                quoted[-1] += ":*"
            return "(" + " <-> ".join(quoted) + ")"

        return " & ".join(phrase(clause) for clause in self.clauses)

    def matches(self, parts: Sequence[tuple[str, str]]) -> bool:
        """Whether a document matches (in Python, as both backends decide; for tests and the snippet)."""
        found = document_words(parts)
        return all(any(clause.matches_at(found, start) for start in range(len(found))) for clause in self.clauses)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where in `text` (NFC) any clause matches: (start, end) character spans, in order, merged."""
        found = words_with_spans(text)
        folded = [word for word, _, _ in found]
        spans: list[tuple[int, int]] = []
        for start in range(len(found)):
            for clause in self.clauses:
                if clause.matches_at(folded, start):
                    spans.append((found[start][1], found[start + len(clause.words) - 1][2]))
        merged: list[tuple[int, int]] = []
        for start, end in sorted(spans):  # overlapping, or apart by spaces only: one mark
            if merged and (start <= merged[-1][1] or not text[merged[-1][1]:start].strip()):
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        return merged


def snippet(query: KeywordQuery, parts: Sequence[tuple[str, str]], width: int = 160) -> str | None:
    """The text around the first match of `query` in the part of a document where it matches most
    (the first such part: name, folders, ..., OCR), the matches marked «so»; None when nothing matches."""
    best: tuple[str, list[tuple[int, int]]] | None = None
    for _, value in parts:
        spans = query.spans(value)
        if spans and (best is None or len(spans) > len(best[1])):
            best = (value, spans)
    if best is None:
        return None
    value, spans = best
    first_start = spans[0][0]
    start = max(0, first_start - width // 3)
    if start:
        space = value.rfind(" ", 0, first_start)
        start = space + 1 if space >= start - 20 and space != -1 else start
    end = min(len(value), start + width)
    pieces = ["\u2026" if start else ""]
    cursor = start
    for span_start, span_end in spans:
        if span_start < cursor or span_start >= end:
            continue
        pieces += [value[cursor:span_start], MARK_START, value[span_start:span_end], MARK_END]
        cursor = span_end
    pieces.append(value[cursor:max(end, cursor)])
    if end < len(value) and cursor < len(value):
        pieces.append("\u2026")
    return " ".join("".join(pieces).split())


def matched_boxes(query: KeywordQuery, lines: Sequence[dict[str, Any]]) -> list[list[list[float]]]:
    """The boxes (four corner points each) of the OCR lines in which `query` matches a word."""
    return [line["box"] for line in lines if isinstance(line, dict) and "box" in line
            and query.spans(nfc(str(line.get("text", ""))))]
