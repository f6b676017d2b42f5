"""The library's text tower on onnxruntime: text queries without torch or open_clip.

`clipdex.search.encoders.text_export` makes and verifies the export (it needs torch); this module
only runs it. An export lives in the library:

    LIBRARY/text_encoder/
      text_encoder.json            settings: model, dim, context length, how it was verified
      text_encoder.onnx (+ .data)  the text tower, graph already optimized by onnxruntime
      bpe_simple_vocab_16e6.txt.gz open_clip's BPE vocabulary, for `clipdex.search.encoders.clip_tokenizer`
      tokenizer.json               or, for a Hugging Face text tower (multilingual models), its fast
                                   tokenizer, for `clipdex.search.encoders.hf_tokenizer`
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from clipdex.search.cores import available_cores
from clipdex.search.encoders.base import normalized
from clipdex.search.encoders.model import ResolvedModel

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.encoders.clip_tokenizer import ClipTokenizer
    from clipdex.search.encoders.hf_tokenizer import HfTokenizer

EXPORT_VERSION = 1
EXPORT_FOLDER = "text_encoder"
SETTINGS_FILE = "text_encoder.json"
MODEL_FILE = "text_encoder.onnx"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


@dataclass
class TextExportSettings:
    """What `text_encoder.json` records about an export."""

    version: int
    model: dict[str, Any]  # the library manifest's model (ResolvedModel.to_json())
    dim: int
    context_length: int
    # True: the graph accepts token arrays cut after the longest text's end token (a causal
    # text tower pooled at the end token ignores what follows it); False: always context_length.
    trimmed: bool
    min_cosine: float  # lowest cosine to open_clip on the exporter's probe texts when exported
    open_clip_version: str
    onnxruntime_version: str
    created_at: float
    # "clip": open_clip's BPE (VOCAB_FILE); "hf": a Hugging Face tower's tokenizer.json, with
    # open_clip's `cleaning`, padded with `pad_id`, led by a language code where `languages`
    tokenizer: str = "clip"
    pad_id: int = 0
    cleaning: str = "lower"
    languages: bool = False

    @classmethod
    def read(cls, path: Path) -> "TextExportSettings":
        data = json.loads(path.read_text())
        defaults: dict[str, Any] = {"tokenizer": "clip", "pad_id": 0, "cleaning": "lower", "languages": False}
        return cls(**{**defaults, **{key: data[key] for key in cls.__dataclass_fields__ if key in data or key not in defaults}})


class OnnxTextEncoder:
    """Encodes texts with the exported text tower on onnxruntime: no torch, no open_clip."""

    def __init__(self, folder: Path, settings: TextExportSettings, threads: int | None = None,
                 tokenizer: ClipTokenizer | HfTokenizer | None = None) -> None:
        self.folder = folder
        self.settings = settings
        self.threads = threads or available_cores()
        self.tokenizer = tokenizer or query_tokenizer(folder, settings)
        self._session: Any = None

    @property
    def dim(self) -> int:
        return self.settings.dim

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def count_tokens(self, text: str) -> int:
        """How many BPE tokens `text` takes, start and end tokens included (as `TorchClipEncoder.count_tokens`)."""
        return len(self.tokenizer.encode(text)) + 2

    @property
    def session(self) -> Any:
        if self._session is None:
            self._session = _inference_session(self.folder / MODEL_FILE, self.threads)
        return self._session

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids as the graph takes them: cut after the longest text when trimmed."""
        if not self.settings.trimmed:
            return self.tokenizer(texts)
        longest = max(len(tokens) for tokens in self.tokenizer.token_lists(texts))
        return self.tokenizer(texts, length=longest)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size])
            parts.append(normalized(self.session.run(None, {"tokens": tokens})[0]))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)


def query_tokenizer(folder: Path, settings: TextExportSettings) -> "ClipTokenizer | HfTokenizer":
    """The export's tokenizer. Imported here: ftfy and regex (or tokenizers) are for texts only."""
    if settings.tokenizer == "hf":
        from clipdex.search.encoders.hf_tokenizer import TOKENIZER_FILE, HfTokenizer

        return HfTokenizer(folder / TOKENIZER_FILE, settings.context_length, settings.pad_id, settings.cleaning,
                           settings.languages)
    from clipdex.search.encoders.clip_tokenizer import ClipTokenizer

    return ClipTokenizer(folder / VOCAB_FILE, settings.context_length)


def load_text_export(library_path: Path, model: ResolvedModel, dim: int) -> OnnxTextEncoder | None:
    """The library's exported text encoder, ready to run, or None when there is none usable here."""
    settings = installed_export(library_path, model, dim)
    if settings is None:
        return None
    encoder = OnnxTextEncoder(library_path / EXPORT_FOLDER, settings)
    try:
        encoder.session
    except Exception:  # onnxruntime's own errors (a damaged file, an older runtime): use open_clip instead
        return None
    return encoder


def installed_export(library_path: Path, model: ResolvedModel, dim: int) -> TextExportSettings | None:
    """The settings of the library's export when it fits `model` and onnxruntime is installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        settings = TextExportSettings.read(library_path / EXPORT_FOLDER / SETTINGS_FILE)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if settings.version != EXPORT_VERSION or settings.dim != dim:
        return None
    if not ResolvedModel.from_json(settings.model).same_model(model):
        return None
    return settings


def _inference_session(path: Path, threads: int, prepack: bool = False) -> Any:
    """A CPU session of an exported graph. `prepack`: also keep the weights repacked for the
    matrix kernels, a few percent faster per batch but slower to load (for long runs)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # done at export
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the cores to FAISS
    if not prepack:  # loads in a tenth of the time (the weights stay a memory map of the file)
        options.add_session_config_entry("session.disable_prepacking", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
