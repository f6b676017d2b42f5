"""Text-like query samples, for tuning and measuring the search breadth of text queries.

In CLIP space a text sits far from every image: a matching text-image pair has a cosine
of about 0.28-0.30, while an image's near neighbours sit at 0.8 or more. An index tuned
on stored vectors as queries (image-like) is tuned for the easy case; text queries need
a wider search for the same recall. `clipdex optimize` therefore tunes text-like queries
on their own sample, taken from, best first:

1. a file of query vectors the user passes (`--queries FILE.npy`);
2. the library's query cache: past text queries, already embedded;
3. the library's text items;
4. prompts ("a photo of a {noun}" over the everyday nouns in `data/everyday_nouns.txt`)
   embedded with the library's text encoder.

When fewer than `MIN_TEXT_QUERIES` real queries come together (no text encoder at hand,
say), the sample is filled with generated queries as far from their best match as CLIP's
modality gap puts a text (`gap_queries`), and the report says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from clipdex.search.errors import ClipdexError, InvalidQuery

if TYPE_CHECKING:
    from clipdex.search.index.parts import IndexedLibrary

log = logging.getLogger(__name__)

MIN_TEXT_QUERIES = 100  # fewer real text queries than this: fill the sample with generated ones
PROMPT_TEMPLATE = "a photo of a {}"
NOUNS_FILE = Path(__file__).with_name("data") / "everyday_nouns.txt"
GAP_COSINE = 0.3  # a generated text query's cosine with the stored vector it was drawn from
GAP_OFFSET_SHARE = 0.8  # of the rest: the shared offset direction; the remainder is noise

GENERATED = "generated with a modality gap"


@dataclass
class QuerySample:
    """Query vectors and where they came from; `own_ids` (-1 for none) are stored items
    used as queries, left out of their own results."""

    vectors: np.ndarray
    own_ids: np.ndarray
    sources: dict[str, int] = field(default_factory=dict)  # source -> queries taken, in order of preference

    def __len__(self) -> int:
        return len(self.vectors)

    def describe(self) -> str:
        return ", ".join(f"{name} ({count})" for name, count in self.sources.items()) or "none"

    def extend(self, name: str, vectors: np.ndarray, own_ids: np.ndarray | None = None) -> None:
        if len(vectors) == 0:
            return
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
        own = np.full(len(vectors), -1, np.int64) if own_ids is None else np.asarray(own_ids, np.int64)
        self.vectors = vectors if len(self.vectors) == 0 else np.concatenate([self.vectors, vectors])
        self.own_ids = np.concatenate([self.own_ids, own])
        self.sources[name] = self.sources.get(name, 0) + len(vectors)

    @classmethod
    def empty(cls, dim: int) -> "QuerySample":
        return cls(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    def shuffled(self, seed: int) -> "QuerySample":
        """The same queries in a random order, so that each half mixes every source."""
        order = np.random.default_rng(seed).permutation(len(self.vectors))
        return QuerySample(np.ascontiguousarray(self.vectors[order]), self.own_ids[order], dict(self.sources))


def load_query_file(path: str | Path, dim: int) -> np.ndarray:
    """Query vectors from a .npy file of shape (n, dim), normalized; one line of error otherwise."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InvalidQuery(f"cannot read query vectors from {path}: {error}") from error
    if vectors.ndim != 2 or vectors.shape[1] != dim or len(vectors) == 0:
        shape = "x".join(str(size) for size in vectors.shape)
        raise InvalidQuery(f"{path}: query vectors of shape {shape}; this library wants (n, {dim}) with n >= 1")
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise InvalidQuery(f"{path}: row {bad[0]} is a zero or non-finite vector")
    return vectors / norms[:, None]


def text_query_sample(
    library: "IndexedLibrary",
    count: int,
    queries_file: str | Path | None = None,
    seed: int = 0,
    encode_prompts: Callable[[list[str]], np.ndarray] | None = None,
) -> QuerySample:
    """Up to `count` real text-like queries for `library`, from the sources in the module
    docstring, best first (a source with more than needed gives a random subset)."""
    dim = library.dim
    sample = QuerySample.empty(dim)
    rng = np.random.default_rng(seed + 2)

    def room() -> int:
        return count - len(sample)

    if queries_file is not None:
        sample.extend(f"queries file {queries_file}", _subset(load_query_file(queries_file, dim), room(), rng))
    if room() > 0:
        sample.extend("query cache", library.catalog.cached_query_vectors(dim, room()))
    if room() > 0:
        text_ids = library.catalog.ids("text")
        if len(text_ids):
            chosen = np.sort(_subset(text_ids, room(), rng))
            parts = list(library.catalog.iter_vectors(chosen.tolist()))
            sample.extend("text items", np.concatenate([p[1] for p in parts]), np.concatenate([p[0] for p in parts]))
    if room() > 0:
        prompts = [PROMPT_TEMPLATE.format(noun) for noun in everyday_nouns()]
        vectors = _embed_prompts(library, _subset(np.array(prompts), room(), rng).tolist(), encode_prompts)
        sample.extend(f"prompts '{PROMPT_TEMPLATE}' over everyday nouns", vectors)
    return sample


def everyday_nouns() -> list[str]:
    lines = NOUNS_FILE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _embed_prompts(library: "IndexedLibrary", prompts: list[str], encode: Callable[[list[str]], np.ndarray] | None) -> np.ndarray:
    """The prompts' vectors by the library's text encoder; none when it cannot be had (logged)."""
    try:
        vectors = encode(prompts) if encode is not None else library.text_encoder().encode_texts(prompts)
    except (ClipdexError, OSError) as error:
        log.warning("text prompts not embedded, text-like queries will be generated instead: %s", error)
        return np.zeros((0, library.dim), np.float32)
    return np.asarray(vectors, dtype=np.float32).reshape(len(prompts), library.dim)


def _subset(values: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if size <= 0:
        return values[:0]
    if len(values) <= size:
        return values
    return values[np.sort(rng.choice(len(values), size=size, replace=False))]


def gap_queries(base: np.ndarray, seed: int = 0, cosine: float = GAP_COSINE, offset: np.ndarray | None = None) -> np.ndarray:
    """Text-like queries drawn from stored vectors as CLIP's modality gap places a text.

    Each query is `cosine` times a stored vector plus, orthogonal to it, the rest of a
    unit vector made of a direction shared by every query (the gap between the
    modalities: `offset`, default a random direction orthogonal to the data's mean) and
    noise of its own: its cosine with that vector is exactly `cosine` (0.3, as a caption
    with its image), and its best match is that vector or one a little closer.
    """
    base = np.asarray(base, dtype=np.float32)
    count, dim = base.shape
    rng = np.random.default_rng(seed + 3)
    if offset is None:
        mean = np.asarray(base.mean(axis=0), dtype=np.float32)
        mean /= max(float(np.linalg.norm(mean)), 1e-12)
        direction = np.asarray(rng.standard_normal(dim), dtype=np.float32)
        offset = direction - float(direction @ mean) * mean
    offset = np.asarray(offset, dtype=np.float32) / float(np.linalg.norm(offset))
    noise = rng.standard_normal((count, dim)).astype(np.float32)
    noise -= np.outer(noise @ offset, offset)  # orthogonal to the shared offset, so the shares add up
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    share = GAP_OFFSET_SHARE
    rest = share * offset + math.sqrt(1.0 - share**2) * noise
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    rest -= np.sum(rest * unit, axis=1, keepdims=True) * unit  # orthogonal to its own vector: the cosine is exact
    rest /= np.linalg.norm(rest, axis=1, keepdims=True)
    queries = cosine * unit + math.sqrt(1.0 - cosine**2) * rest
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.asarray(queries, dtype=np.float32)
