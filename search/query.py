"""Queries: weighted, signed terms and the filters applied inside the search."""

from __future__ import annotations

import difflib
import io
import os
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn, Sequence, Union

import numpy as np

from clipdex.search.errors import InvalidQuery, UnreadableFile
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, MB, read_regular_file

TermKind = Literal["text", "image", "like", "vector"]
KIND_CHOICES = ("image", "text", "video", "any")
KindName = Literal["image", "text", "video", "any"]
MODE_CHOICES = ("hybrid", "semantic", "keyword")
SORT_CHOICES = ("relevance", "date", "-date")
# An image: a file's path, or its bytes (encoded, as read from a file).
ImageInput = Union[str, "os.PathLike[str]", bytes]
# A raw query vector: numbers (a numpy array or a list), or the path of a .npy file.
VectorInput = Union["np.ndarray", Sequence[float], str, "os.PathLike[str]"]
# A capture time: a date, a local datetime, or ISO text (2024-07-31, 2024-07-31T18:30).
TimeInput = Union[str, date, datetime]
# The largest integer the catalog (SQLite INTEGER) holds: item ids and pixel sizes beyond it are user errors.
MAX_INTEGER = 2**63 - 1


@dataclass(frozen=True)
class Term:
    """One part of a query. Its normalized embedding is added with `weight` (negative subtracts)."""

    kind: TermKind
    value: Any  # text, image path or bytes, item id, or a vector / .npy path
    weight: float = 1.0


@dataclass
class Filters:
    """Constraints applied inside the search: the k hits are the best among the matches."""

    kind: str = "any"  # image | text | video | any
    path: str | None = None  # glob over image paths (and text corpus files), SQLite GLOB syntax
    after: datetime | None = None  # capture time >= after (EXIF; items without one are left out)
    before: datetime | None = None  # capture time < before
    min_width: int | None = None
    min_height: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_CHOICES:
            raise InvalidQuery(f"kind= must be one of {', '.join(KIND_CHOICES)}, not {self.kind!r}")
        if self.path is not None and not self.path.strip():
            raise InvalidQuery("the path filter is empty: give a glob such as '*/2024/*', or leave it out to search everything")
        self.after = parse_time(self.after, "after")
        self.before = parse_time(self.before, "before")
        if self.after and self.before and self.after >= self.before:
            raise InvalidQuery(f"after={self.after.isoformat()} is not before before={self.before.isoformat()}")
        for name in ("min_width", "min_height"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidQuery(f"{name}= must not be negative, not {value}")
            if value is not None and value > MAX_INTEGER:
                raise InvalidQuery(f"{name}={value} is too large (at most {MAX_INTEGER})")

    @property
    def narrows_items(self) -> bool:
        """True when something beyond the kind restricts the candidates."""
        return any(value is not None for value in (self.path, self.after, self.before, self.min_width, self.min_height))


@dataclass
class Query:
    terms: list[Term] = field(default_factory=list)
    filters: Filters = field(default_factory=Filters)
    k: int = 10
    offset: int = 0
    threshold: float | None = None  # minimum cosine
    per_video: int = 1  # the best moments shown of each video hit (`Hit.moments`)
    # how a text is matched: by meaning, by words, or both fused (None: hybrid where the library has
    # keyword data and the query is texts alone, else semantic); see `clipdex.search.ranking`
    mode: str | None = None
    sort: str = "relevance"  # the best k by relevance, shown in this order (date: capture time, oldest first)
    confident: bool = False  # keep only the hits that stand out from this query's scores over the library

    def __post_init__(self) -> None:
        if not self.terms:
            raise InvalidQuery("a query needs at least one term: a text, an image, an item id (like=) or a vector (vector=)")
        for term in self.terms:
            if term.kind == "text" and not str(term.value).strip():
                raise InvalidQuery(f"the query text {term.value!r} is empty or only whitespace: give words to look for")
        if not 1 <= self.k <= 10_000:
            raise InvalidQuery(f"k must be between 1 and 10000, not {self.k}")
        if self.offset < 0:
            raise InvalidQuery(f"offset must not be negative, not {self.offset}")
        if not 1 <= self.per_video <= 1000:
            raise InvalidQuery(f"per_video must be between 1 and 1000, not {self.per_video}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise InvalidQuery(f"threshold is a cosine between -1 and 1, not {self.threshold}")
        if all(term.weight == 0 for term in self.terms):
            raise InvalidQuery("every query term has weight 0")
        if self.mode is not None and self.mode not in MODE_CHOICES:
            raise InvalidQuery(f"mode= must be one of {', '.join(MODE_CHOICES)}, not {self.mode!r}")
        if self.sort not in SORT_CHOICES:
            raise InvalidQuery(f"sort= must be one of {', '.join(SORT_CHOICES)}, not {self.sort!r}")
        if self.mode in ("hybrid", "keyword") and not self.keyword_text():
            raise InvalidQuery(f"mode={self.mode} needs a text with words to look for; "
                               "images, item ids and vectors are matched by meaning (mode=semantic)")

    def keyword_text(self) -> str:
        """The words a keyword search looks for: the query's texts (not its minus texts), joined."""
        return " ".join(str(term.value) for term in self.terms if term.kind == "text" and term.weight > 0)

    @classmethod
    def build(
        cls,
        text: str | Sequence[str] | None = None,
        image: ImageInput | Sequence[ImageInput] | None = None,
        like: int | Sequence[int] | None = None,
        vector: VectorInput | Sequence[VectorInput] | None = None,
        minus: str | Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        k: int = 10,
        offset: int = 0,
        threshold: float | None = None,
        kind: str = "any",
        path: str | None = None,
        after: TimeInput | None = None,
        before: TimeInput | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
        per_video: int = 1,
        mode: str | None = None,
        sort: str = "relevance",
        confident: bool = False,
        **unknown: NoReturn,
    ) -> "Query":
        """Terms in a fixed order - texts, images, likes, vectors, then minus texts - each
        taking the next of `weights` (default 1). Minus terms are subtracted. An argument
        this method does not take raises InvalidQuery naming the ones it does."""
        if unknown:
            raise unknown_arguments("Query.build", unknown, BUILD_ARGUMENTS)
        terms: list[tuple[TermKind, Any, int]] = []
        terms += [("text", value, 1) for value in _as_list(text)]
        terms += [("image", value, 1) for value in _as_list(image)]
        terms += [("like", _item_id(value), 1) for value in _as_list(like)]
        terms += [("vector", value, 1) for value in _as_vector_list(vector)]
        terms += [("text", value, -1) for value in _as_list(minus)]
        weights = list(weights or [])
        if len(weights) > len(terms):
            raise InvalidQuery(f"{len(weights)} weights given for {len(terms)} query terms")
        weights += [1.0] * (len(terms) - len(weights))
        built = [Term(kind, value, sign * abs(float(w)) if sign < 0 else float(w)) for (kind, value, sign), w in zip(terms, weights)]
        filters = Filters(kind=kind, path=path, after=after, before=before,  # type: ignore[arg-type]  # parsed there
                          min_width=min_width, min_height=min_height)
        return cls(terms=built, filters=filters, k=k, offset=offset, threshold=threshold, per_video=per_video, mode=mode,
                   sort=sort, confident=confident)


# The arguments of Query.build (and of Library.search, which takes them as keywords).
BUILD_ARGUMENTS = ("text", "image", "like", "vector", "minus", "weights", "k", "offset", "threshold",
                   "kind", "path", "after", "before", "min_width", "min_height", "per_video", "mode", "sort", "confident")


def unknown_arguments(function: str, unknown: dict[str, Any], known: Sequence[str]) -> InvalidQuery:
    """The error for keyword arguments `function` does not take: each one named, with a close
    known one where there is one (`max_width=`: did you mean `min_width=`?), and the known ones."""
    described = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, known, n=1)
        described.append(f"{name}= (did you mean {close[0]}=?)" if close else f"{name}=")
    return InvalidQuery(f"{function}() takes no argument {', '.join(described)}; "
                        f"it takes {', '.join(name + '=' for name in known)}")


def combine(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """q = normalize(sum_i w_i * e_i / |e_i|): the README's formula."""
    # In float64 (a float32 vector of large numbers has a norm float32 cannot hold), and with the
    # weights scaled to at most 1: only their ratios count, the sum being normalized, and neither
    # weights of 1e300 (whose sum overflows) nor of 1e-9 (whose sum looks like zero) change q.
    scale = max((abs(weight) for weight in weights), default=0.0) or 1.0
    total = np.zeros_like(np.asarray(vectors[0], dtype=np.float64))
    for vector, weight in zip(vectors, weights):
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(vector))
        if norm == 0:
            raise InvalidQuery("a query vector is all zeros")
        total = total + (weight / scale) * vector / norm
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InvalidQuery("the query terms cancel each other out (their weighted sum is zero)")
    return (total / norm).astype(np.float32)


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float  # cosine similarity to the query vector
    id: int
    kind: str  # "image" | "text" | "video"
    path: str | None = None  # images and videos
    text: str | None = None  # texts
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str | None = None  # the application's own key of an item it added (`Library.add_texts` ...); None for files
    timestamp: float | None = None  # a video: the best-matching moment, seconds from its start
    # a video: its best moments, best first, as (seconds, score): as many as the query's per_video
    moments: list[tuple[float, float]] | None = None
    # why a hybrid or keyword search found it (None in a semantic search): its cosine, its place in the
    # keyword ranking (1 is best; None: its words do not match), the matched text with the match «marked»,
    # and the boxes (four [x, y] corners, in the image's pixels) of the OCR lines that matched
    semantic_score: float | None = None
    keyword_rank: int | None = None
    snippet: str | None = None
    boxes: list[list[list[float]]] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "kind": self.kind}
        if self.key is not None:
            data["key"] = self.key
        if self.path is not None:
            data["path"] = self.path
        if self.timestamp is not None:
            data["timestamp"] = round(self.timestamp, 3)
        if self.moments is not None and len(self.moments) > 1:
            data["moments"] = [{"timestamp": round(seconds, 3), "score": round(score, 6)} for seconds, score in self.moments]
        if self.text is not None:
            data["text"] = self.text
        data["metadata"] = self.metadata
        if self.semantic_score is not None:
            data["semantic_score"] = round(self.semantic_score, 6)
            data["keyword_rank"] = self.keyword_rank
            data["snippet"] = self.snippet
        if self.boxes:
            data["boxes"] = self.boxes
        return data


def parse_time(value: Any, name: str) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    else:
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            raise InvalidQuery(f"{name}= wants a date or time like 2024-07-31 or 2024-07-31T18:30, not {value!r}") from None
    if parsed.tzinfo is not None:  # capture times are the camera's local time, with no zone to convert from
        raise InvalidQuery(f"{name}= takes a local date or time without a time zone (as cameras record it), not {value!r}")
    return parsed


def _item_id(value: Any) -> int:
    """An item id for `like`: a positive integer the catalog can hold."""
    try:
        item_id = int(value)
    except (TypeError, ValueError):
        raise InvalidQuery(f"like= wants an item id (a positive integer), not {value!r}") from None
    if not 1 <= item_id <= MAX_INTEGER:
        raise InvalidQuery(f"like={item_id}: item ids are between 1 and {MAX_INTEGER}")
    return item_id


# what a .npy may hold instead of numbers, by numpy dtype kind
_NOT_NUMBERS = {"U": "text", "S": "bytes", "c": "complex numbers", "b": "booleans", "O": "Python objects",
                "M": "dates", "m": "time spans", "V": "records"}


def vector_from(value: Any) -> np.ndarray:
    """A query vector given as numbers or a .npy file, as a flat float32 array (of any length:
    the library checks it against its model's)."""
    name = "the query vector"
    if isinstance(value, (str, os.PathLike)):
        name = f"vector file {os.fspath(value)}"
        value = _load_npy(value)
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise InvalidQuery(f"{name} holds {_NOT_NUMBERS.get(array.dtype.kind, array.dtype.name)}, not real numbers")
    if array.size == 0:
        raise InvalidQuery(f"{name} is empty: an array of no numbers")
    with np.errstate(over="ignore"):  # said below, in words, rather than as numpy's warning
        flat = array.astype(np.float32).reshape(-1)
    if array.dtype.kind == "f" and array.dtype.itemsize > 4 and np.isfinite(array).all() and not np.isfinite(flat).all():
        raise InvalidQuery(f"{name} holds a number beyond float32's range (about ±3.4e38)")
    return flat


def _load_npy(path: str | os.PathLike[str]) -> Any:
    try:
        data, _ = read_regular_file(path, DEFAULT_MAX_FILE_MB * MB)
    except UnreadableFile as error:
        raise InvalidQuery(f"vector file {error}") from None
    except FileNotFoundError:
        raise InvalidQuery(f"vector file {os.fspath(path)}: no such file") from None
    except OSError as error:
        raise InvalidQuery(f"vector file {os.fspath(path)}: cannot read: {error.strerror or error}") from None
    if not data:
        raise InvalidQuery(f"vector file {os.fspath(path)} is empty (0 bytes), not a .npy array")
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise InvalidQuery(f"vector file {os.fspath(path)} is not a .npy array ({reason})") from None
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise InvalidQuery(f"vector file {os.fspath(path)} is an .npz archive; save one array with numpy.save")
    return loaded


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Path, int)):
        return [value]
    return list(value)


def _as_vector_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return [value] if value.ndim == 1 else list(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float, np.number)):
        return [value]  # one vector given as a list of numbers
    return _as_list(value)
