"""CLIP's byte-pair tokenizer without torch: a port of open_clip's `SimpleTokenizer`.

open_clip's tokenizer module imports torch, which costs seconds; a query answered by
the exported text encoder (`clipdex.search.encoders.text_export`) must not pay that. This port covers
open_clip's default configuration (the `lower` cleaning, truncation to the context
length, no extra special tokens) and returns numpy arrays. `clipdex.search.encoders.text_export` checks
it against open_clip's own tokenizer before an export is used.
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# The merges open_clip's SimpleTokenizer reads from its vocabulary file.
MERGE_COUNT = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same on a cleaned text of ASCII alone (letters are a-z, numbers 0-9, the one space is the
# only whitespace left), for the standard library's `re`: such a text never imports `regex`.
ASCII_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The reversible map of UTF-8 bytes to printable characters that CLIP's BPE works on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in characters)))


# Characters outside printable ASCII, tab and newline, or an HTML entity's "&": what ftfy.fix_text
# may change. A text without any (most queries) is its own fix, and skips importing ftfy.
NEEDS_FTFY = re.compile(r"[^\t\n\x20-\x7e]|&")


def clean(text: str) -> str:
    """open_clip's `lower` cleaning: fix mojibake, unescape HTML twice, collapse spaces, lowercase."""
    if NEEDS_FTFY.search(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Texts to CLIP token ids: `[start] + BPE(text) + [end]`, cut at `context_length`."""

    def __init__(self, vocabulary: Path, context_length: int = 77) -> None:
        # A merge is a line "first second"; BPE symbols hold no whitespace, so the line itself
        # is the pair's key (cheaper to build than tuples: this runs on every cold query).
        merges = _read_merges(vocabulary)
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [symbol + "</w>" for symbol in symbols] + [merge.replace(" ", "") for merge in merges] + list(SPECIAL_TOKENS)
        self.token_ids = dict(zip(vocab, range(len(vocab))))
        self.merge_ranks = dict(zip(merges, range(len(merges))))
        self.start_id = self.token_ids[SPECIAL_TOKENS[0]]
        self.end_id = self.token_ids[SPECIAL_TOKENS[1]]
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self._byte_symbols = bytes_to_unicode()
        self._cache: dict[str, str] = {token: token for token in SPECIAL_TOKENS}
        self._pattern: Any = None  # `regex`'s, compiled for the first text beyond ASCII
        self._ascii_pattern = re.compile("|".join(SPECIAL_TOKENS) + "|" + ASCII_WORD_PATTERN, re.IGNORECASE)

    def encode(self, text: str) -> list[int]:
        """The BPE token ids of `text`, without start and end tokens or truncation."""
        ids: list[int] = []
        for word in self._words(clean(text)):
            symbols = "".join(self._byte_symbols[byte] for byte in word.encode("utf-8"))
            ids.extend(self.token_ids[piece] for piece in self._bpe(symbols).split(" "))
        return ids

    def _words(self, cleaned: str) -> list[str]:
        if cleaned.isascii():
            return self._ascii_pattern.findall(cleaned)
        if self._pattern is None:
            import regex

            self._pattern = regex.compile("|".join(SPECIAL_TOKENS) + "|" + WORD_PATTERN, regex.IGNORECASE)
        return self._pattern.findall(cleaned)

    def token_lists(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text as `[start] + tokens + [end]`, cut to the context length (ending in `end`)."""
        lists = []
        for text in texts:
            tokens = [self.start_id] + self.encode(text) + [self.end_id]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.end_id
            lists.append(tokens)
        return lists

    def __call__(self, texts: Sequence[str], length: int | None = None) -> np.ndarray:
        """Token ids as an int64 array (len(texts), length), zero-padded.

        `length` defaults to the context length, which is what open_clip returns.
        """
        lists = self.token_lists(texts)
        length = length or self.context_length
        array = np.zeros((len(lists), length), dtype=np.int64)
        for row, tokens in enumerate(lists):
            array[row, : len(tokens)] = tokens[:length]
        return array

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        ranks = self.merge_ranks
        while len(word) > 1:
            pairs = {f"{first} {second}" for first, second in zip(word, word[1:])}
            best = min(pairs, key=lambda pair: ranks.get(pair, MERGE_COUNT))
            if best not in ranks:
                break
            word = _merge(word, best)
        merged = " ".join(word)
        self._cache[token] = merged
        return merged


def _merge(word: tuple[str, ...], pair: str) -> tuple[str, ...]:
    """`word` with every adjacent occurrence of `pair` ("first second") joined into one symbol."""
    first, second = pair.split(" ")
    merged: list[str] = []
    index = 0
    while index < len(word):
        if word[index] == first and index + 1 < len(word) and word[index + 1] == second:
            merged.append(first + second)
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)


def _read_merges(vocabulary: Path) -> list[str]:
    """The first MERGE_COUNT merge lines of the vocabulary (after its header line), decompressing
    only as far as they go: a third of the file."""
    chunks: list[bytes] = []
    lines = 0
    with gzip.open(vocabulary) as stream:
        while lines <= MERGE_COUNT + 1:
            chunk = stream.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            lines += chunk.count(b"\n")
    # a character cut at the last chunk's end lies past the lines kept
    merges = b"".join(chunks).decode("utf-8", errors="replace").split("\n", MERGE_COUNT + 1)[1 : MERGE_COUNT + 1]
    if len(merges) < MERGE_COUNT:
        raise ValueError(f"{vocabulary}: {len(merges)} BPE merges, not {MERGE_COUNT}")
    return merges
