"""Texts to token ids for Hugging Face text towers (multilingual open_clip models), without
torch or transformers: the `tokenizers` library on the tokenizer's own `tokenizer.json`.

open_clip tokenizes such towers with `transformers.AutoTokenizer` (its `HFTokenizer`): the
text cleaned (`whitespace`: ftfy, HTML unescaped twice, spaces collapsed; case kept), then
the fast tokenizer's own normalizer, pre-tokenizer, model and post-processor (the start and
end tokens), truncated to the context length and padded with the pad token. A fast
tokenizer is a `tokenizers.Tokenizer` underneath, so the one saved from the loaded model
(`tokenizer.json`) gives the same ids here; `clipdex.search.encoders.text_export` checks
that it does on its probe texts before an export is used.

NLLB towers start every text with a language code (`zho_Hans`, `spa_Latn`): the one set
with `query_language` (`clipdex search --lang`), else the one detected from the text's
script (`detect_language`). The torch path (`TorchClipEncoder.tokenize`) does the same, so
stored texts and queries agree.
"""

from __future__ import annotations

import html
import unicodedata
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from clipdex.search.encoders.clip_tokenizer import NEEDS_FTFY

TOKENIZER_FILE = "tokenizer.json"
CLEANINGS = ("whitespace", "lower")

# Scripts to NLLB language codes, for a text whose language was not given: the script tells
# the language apart where one language owns it (Han → Chinese unless there is kana or hangul).
# Latin script is too many languages to guess from; it gets the tokenizer's default.
SCRIPT_LANGUAGES: dict[str, str] = {
    "HIRAGANA": "jpn_Jpan",
    "KATAKANA": "jpn_Jpan",
    "HANGUL": "kor_Hang",
    "CJK": "zho_Hans",
    "CYRILLIC": "rus_Cyrl",
    "ARABIC": "arb_Arab",
    "HEBREW": "heb_Hebr",
    "GREEK": "ell_Grek",
    "DEVANAGARI": "hin_Deva",
    "BENGALI": "ben_Beng",
    "THAI": "tha_Thai",
    "TAMIL": "tam_Taml",
    "TELUGU": "tel_Telu",
    "GUJARATI": "guj_Gujr",
    "KANNADA": "kan_Knda",
    "MALAYALAM": "mal_Mlym",
    "GEORGIAN": "kat_Geor",
    "ARMENIAN": "hye_Armn",
    "ETHIOPIC": "amh_Ethi",
    "KHMER": "khm_Khmr",
    "LAO": "lao_Laoo",
    "MYANMAR": "mya_Mymr",
    "SINHALA": "sin_Sinh",
    "TIBETAN": "bod_Tibt",
}
# A script that, present at all, decides (kana makes Han text Japanese, hangul Korean).
DECIDING_SCRIPTS = ("HIRAGANA", "KATAKANA", "HANGUL")
DEFAULT_LANGUAGE = "eng_Latn"


# The language code set for this thread's or task's queries (None: detect each text's).
_query_language: ContextVar[str | None] = ContextVar("clipdex_query_language", default=None)


@contextmanager
def query_language(code: str | None) -> Iterator[None]:
    """Texts encoded within take `code` as their NLLB language (None: detected from each text)."""
    token = _query_language.set(code)
    try:
        yield
    finally:
        _query_language.reset(token)


def language_for(text: str) -> str:
    """The NLLB language code a text is encoded with: `query_language`'s, else detected."""
    return _query_language.get() or detect_language(text)


def current_query_language() -> str | None:
    """The code `query_language` set, or None."""
    return _query_language.get()


def detect_language(text: str, default: str = DEFAULT_LANGUAGE) -> str:
    """The NLLB language code of `text` from its script: 红色的圆 → zho_Hans, ひらがな → jpn_Jpan,
    кошка → rus_Cyrl; Latin script (and no letters at all) → `default`."""
    counts: dict[str, int] = {}
    for character in text:
        if not character.isalpha():
            continue
        name = unicodedata.name(character, "")
        script = "CJK" if name.startswith("CJK") else name.split(" ", 1)[0]
        if script in SCRIPT_LANGUAGES:
            counts[script] = counts.get(script, 0) + 1
    for script in DECIDING_SCRIPTS:
        if counts.get(script):
            return SCRIPT_LANGUAGES[script]
    if not counts:
        return default
    return SCRIPT_LANGUAGES[max(counts, key=counts.__getitem__)]


def clean(text: str, cleaning: str = "whitespace") -> str:
    """open_clip's `whitespace` cleaning (ftfy, HTML unescaped twice, spaces collapsed), or its
    `lower` (the same, lowercased)."""
    if NEEDS_FTFY.search(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = " ".join(text.split()).strip()
    return text.lower() if cleaning == "lower" else text


class HfTokenizer:
    """A Hugging Face fast tokenizer's `tokenizer.json` with open_clip's cleaning, truncation and padding.

    `languages`: the tokenizer takes an NLLB language code as its first token; each text's is
    `language` when given, else `language_for`'s.
    """

    def __init__(self, path: Path, context_length: int, pad_id: int, cleaning: str = "whitespace",
                 languages: bool = False, language: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            from clipdex.search.errors import ModelUnavailable

            raise ModelUnavailable("this model's tokenizer needs the tokenizers package: "
                                   "pip install 'clipdex[multilingual]'") from error
        if cleaning not in CLEANINGS:
            raise ValueError(f"cleaning must be one of {', '.join(CLEANINGS)}, not {cleaning!r}")
        self._tokenizer: Any = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.context_length = context_length
        self.pad_id = pad_id
        self.cleaning = cleaning
        self.languages = languages
        self.language = language
        self._by_language: dict[str, Any] = {}

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` without the special tokens around it, untruncated."""
        return list(self._tokenizer.encode(clean(text, self.cleaning), add_special_tokens=False).ids)

    def language_of(self, text: str) -> str | None:
        """The language code this tokenizer puts before `text` (None: not an NLLB tokenizer)."""
        if not self.languages:
            return None
        return self.language or language_for(text)

    def token_lists(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with the tokenizer's special tokens, truncated to the context length."""
        lists: list[list[int]] = []
        for text in texts:
            tokenizer = self._for_language(self.language_of(text))
            lists.append(list(tokenizer.encode(clean(text, self.cleaning)).ids))
        return lists

    def __call__(self, texts: Sequence[str], length: int | None = None) -> np.ndarray:
        """Token ids as an int64 array (len(texts), length), padded with the pad id.

        `length` defaults to the context length, which is what open_clip returns."""
        length = length or self.context_length
        array = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        for row, tokens in enumerate(self.token_lists(texts)):
            array[row, : len(tokens)] = tokens[:length]
        return array

    def _for_language(self, language: str | None) -> Any:
        """The tokenizer, truncating at the context length, with `language` as its first token."""
        key = language or ""
        tokenizer = self._by_language.get(key)
        if tokenizer is None:
            from tokenizers import Tokenizer, processors

            tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
            tokenizer.enable_truncation(self.context_length)
            if language is not None:
                language_id = tokenizer.token_to_id(language)
                end = _end_token(tokenizer)
                if language_id is None or end is None:
                    from clipdex.search.errors import ClipdexError

                    raise ClipdexError(f"this model's tokenizer has no language code {language!r} "
                                       "(NLLB codes look like zho_Hans, spa_Latn, eng_Latn)")
                tokenizer.post_processor = processors.TemplateProcessing(
                    single=f"{language} $A {end[0]}", pair=f"{language} $A $B {end[0]}",
                    special_tokens=[(language, language_id), end])
            self._by_language[key] = tokenizer
        return tokenizer


def _end_token(tokenizer: Any) -> tuple[str, int] | None:
    for name in ("</s>", "[SEP]", "<|endoftext|>"):
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return name, int(token_id)
    return None
