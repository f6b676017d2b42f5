"""The library's text encoder exported to ONNX, so a new text query needs neither torch nor open_clip.

Importing torch and open_clip and loading the model takes seconds; answering a text
query needs only the text tower. So once per library, while the open_clip model is
loaded anyway (at the end of an index run that embedded something, or at the first text
query that had to load it), clipdex exports the text tower with `torch.onnx.export` and
stores it in the library, in `LIBRARY/text_encoder/` (laid out as
`clipdex.search.encoders.onnx_text`, which runs it, describes).

An export is used only after it has been checked against open_clip: the torch-free
tokenizer (`clipdex.search.encoders.clip_tokenizer` for CLIP's BPE; for a Hugging Face text
tower, as multilingual models have, `clipdex.search.encoders.hf_tokenizer` on the loaded
tokenizer's own `tokenizer.json`) must give open_clip's tokens on every probe text, and the ONNX vectors must
have cosine >= MIN_COSINE with open_clip's own `encode_text(normalize=True)` on the probe
texts of every length (GRAPH_TEXTS, in a batch and alone). Otherwise
the export is refused, the reason is recorded in `LIBRARY/text_encoder.refused.json`, and
queries keep using the open_clip model.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from clipdex.search.atomic import write_json_atomic
from clipdex.search.encoders.clip_tokenizer import ClipTokenizer
from clipdex.search.encoders.hf_tokenizer import CLEANINGS, TOKENIZER_FILE, HfTokenizer
from clipdex.search.encoders.onnx_text import (
    EXPORT_FOLDER,
    EXPORT_VERSION,
    MODEL_FILE,
    SETTINGS_FILE,
    VOCAB_FILE,
    OnnxTextEncoder,
    TextExportSettings,
    installed_export,
)
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.errors import TextExportRefused
from clipdex.search.encoders.model import ResolvedModel
from clipdex.search.encoders.onnx_files import (
    EXPORT_LOCK,
    export_optimized,
    export_or_refuse,
    install_export,
    recorded_refusal,
    scratch_folder,
)
from clipdex.search.readonly import environment_error

REFUSED_FILE = "text_encoder.refused.json"
WEIGHTS_FILE = "text_encoder.onnx.data"
MIN_COSINE = 0.999
OPSET = 17


# Texts the export is verified on: plain, punctuated, numeric, accented, non-Latin,
# emoji, HTML entities, mojibake, odd whitespace, empty, a special token's name, and
# texts longer than any context length (truncated).
PROBE_TEXTS = (
    "a dog on the beach",
    "A photo of a RED car, parked outside at night!!!",
    "two cats & one dog; 3 birds @ 12:30pm (maybe 4?)",
    "ein Hund am Strand, schön und übermütig",
    "l'été à Paris — café crème",
    "東京の夜景と富士山",
    "红色的圆和蓝色的正方形",
    "un círculo rojo sobre un fondo gris",
    "Кошка сидит на окне",
    "🐶🏖️ sunny day 😎",
    "fish &amp; chips &lt;3",
    "The Mona Lisa by Leonardo da Vinci",
    "   lots\tof\n\nwhitespace   ",
    "",
    "<start_of_text> literally <end_of_text>",
    "https://example.com/photos/IMG_1234.JPG",
    " ".join(f"word{number} and" for number in range(60)),
    "supercalifragilisticexpialidocious " * 30,
)

# The texts the graph is verified on (every probe text's tokens are): the graph computes the
# same function of any tokens, but the trimmed one runs at each batch's own length, so these
# cover the lengths: empty (2 tokens), shorter and longer than the traced 16, and truncated.
GRAPH_TEXTS = ("", "a dog on the beach", PROBE_TEXTS[2], PROBE_TEXTS[-2])


def export_refused(library_path: Path, model: ResolvedModel) -> str | None:
    """Why an earlier export of this model (by this version of the exporter) was refused, or None."""
    return recorded_refusal(library_path / REFUSED_FILE, EXPORT_VERSION, model)


def ensure_text_export(library_path: Path, encoder: TorchClipEncoder, dim: int) -> TextExportSettings | None:
    """Export the text tower of the loaded `encoder` into the library unless done or refused before.

    Never fails the caller: a refusal is recorded (and not retried) when the model itself
    cannot be reproduced; errors of the environment (a read-only library, a full disk,
    ENOSPC/EROFS/EACCES anywhere in the export) leave things as they were, to be retried.
    """
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None  # not installed here: no export, and no refusal to remember either
    with EXPORT_LOCK:  # one export at a time in a process; the one that waited finds this one's installed
        if installed_export(library_path, encoder.spec, dim) is not None or export_refused(library_path, encoder.spec):
            return None
        return export_or_refuse("text encoder", lambda: export_text_encoder(encoder, library_path), TextExportRefused,
                                library_path / REFUSED_FILE, EXPORT_VERSION, encoder.spec,
                                installed=lambda: installed_export(library_path, encoder.spec, dim) is not None)


def export_text_encoder(encoder: TorchClipEncoder, library_path: Path) -> TextExportSettings:
    """Export, verify and install the text tower of `encoder`; raises TextExportRefused."""
    import open_clip
    import onnxruntime

    encoder.load()
    scratch = scratch_folder(library_path, ".text_encoder-")
    try:
        tokenizer, details = _query_tokenizer(encoder, scratch)
        _check_tokens(tokenizer, encoder)
        reference = encoder.encode_texts(list(GRAPH_TEXTS))
        settings = TextExportSettings(
            version=EXPORT_VERSION, model=encoder.spec.to_json(), dim=int(reference.shape[1]),
            context_length=encoder.context_length, trimmed=False, min_cosine=0.0,
            open_clip_version=open_clip.__version__, onnxruntime_version=onnxruntime.__version__, created_at=time.time(),
            **details,
        )
        _export_verified(encoder, scratch, settings, tokenizer, reference)
        write_json_atomic(scratch / SETTINGS_FILE, asdict(settings))
        install_export(scratch, library_path / EXPORT_FOLDER, SETTINGS_FILE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return settings


def _query_tokenizer(encoder: TorchClipEncoder, scratch: Path) -> tuple[ClipTokenizer | HfTokenizer, dict[str, Any]]:
    """The torch-free tokenizer for the export, its files written into `scratch`, and what the
    settings record of it: CLIP's BPE vocabulary, or a Hugging Face tower's `tokenizer.json`."""
    import open_clip

    reference = encoder.open_clip_tokenizer
    if not isinstance(reference, open_clip.tokenizer.HFTokenizer):
        shutil.copyfile(Path(open_clip.tokenizer.default_bpe()), scratch / VOCAB_FILE)
        return ClipTokenizer(scratch / VOCAB_FILE, encoder.context_length), {}
    fast = reference.tokenizer
    cleaning = next((name for name in CLEANINGS if reference.clean_fn is open_clip.tokenizer.get_clean_fn(name)), None)
    if reference.tokenizer_mode or reference.strip_sep_token or cleaning is None or fast.pad_token_id is None \
            or not getattr(fast, "is_fast", False):
        raise TextExportRefused("the text tower's Hugging Face tokenizer has settings the torch-free one does not "
                                "reproduce (a tokenizer mode, a stripped separator, a cleaning other than "
                                f"{' or '.join(CLEANINGS)}, no pad token, or no fast tokenizer)")
    (scratch / TOKENIZER_FILE).write_text(fast.backend_tokenizer.to_str(), encoding="utf-8")
    languages = callable(getattr(fast, "set_src_lang_special_tokens", None))
    details = {"tokenizer": "hf", "pad_id": int(fast.pad_token_id), "cleaning": cleaning, "languages": languages}
    tokenizer = HfTokenizer(scratch / TOKENIZER_FILE, encoder.context_length, int(fast.pad_token_id), cleaning, languages)
    return tokenizer, details


def _check_tokens(tokenizer: ClipTokenizer | HfTokenizer, encoder: TorchClipEncoder) -> None:
    expected = encoder.tokenize(list(PROBE_TEXTS)).cpu().numpy()
    ours = tokenizer(PROBE_TEXTS)
    if expected.shape != ours.shape or not np.array_equal(expected, ours):
        rows = [text for text, a, b in zip(PROBE_TEXTS, expected, ours) if not np.array_equal(a, b)] or ["(shape)"]
        raise TextExportRefused(f"the torch-free tokenizer differs from open_clip's on {rows[0]!r}")


def _export_verified(
    encoder: TorchClipEncoder, scratch: Path, settings: TextExportSettings, tokenizer: ClipTokenizer | HfTokenizer,
    reference: np.ndarray
) -> None:
    """Export the trimmed graph when the model allows it, else the full one; keep the first that matches."""
    from clipdex.search.encoders.text_towers import hf_text_tower, trimmable

    problem = ""
    for trimmed in ([True, False] if trimmable(encoder.model) or hf_text_tower(encoder.model) else [False]):
        settings.trimmed = trimmed
        try:
            _export_onnx(encoder, scratch, trimmed, tokenizer(PROBE_TEXTS[:2]))
            worst = _worst_cosine(OnnxTextEncoder(scratch, settings, threads=encoder.threads, tokenizer=tokenizer), reference)
        except Exception as error:  # the exporter and onnxruntime raise many types; any means "not this way"
            if environment_error(error):
                raise  # a full disk, a read-only folder: not the model's fault, so not a refusal
            problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            continue
        if worst >= MIN_COSINE:
            settings.min_cosine = worst
            return
        problem = f"cosine {worst:.5f} with open_clip, below {MIN_COSINE}"
    raise TextExportRefused(f"the text encoder cannot be exported faithfully ({problem})")


def _worst_cosine(encoder: OnnxTextEncoder, reference: np.ndarray) -> float:
    """The lowest cosine to `reference` over GRAPH_TEXTS, encoded together and one by one."""
    together = encoder.encode_texts(list(GRAPH_TEXTS))
    alone = np.concatenate([encoder.encode_texts([text]) for text in GRAPH_TEXTS])
    return float(min(np.min(np.sum(together * reference, axis=1)), np.min(np.sum(alone * reference, axis=1))))


def _export_onnx(encoder: TorchClipEncoder, scratch: Path, trimmed: bool, sample: np.ndarray) -> None:
    import torch

    model = encoder.model
    if encoder.device != "cpu" or encoder.dtype_name != "fp32":
        import copy

        model = copy.deepcopy(model).float().cpu()
    from clipdex.search.encoders.text_towers import FullTextTower, TrimmedTextTower, hf_text_tower

    # eval() first: torch.onnx.export restores the wrapper's mode afterwards, recursively, and a
    # new module is in training mode - which would leave the library's model in training mode too.
    # A Hugging Face tower masks its padding out of attention and pooling: run whole, it takes any length.
    tower = (TrimmedTextTower(model) if trimmed and not hf_text_tower(model) else FullTextTower(model)).eval()
    tokens = torch.from_numpy(sample[:, :16] if trimmed else sample)  # traced at one length, run at any
    axes = {"tokens": {0: "batch", 1: "length"} if trimmed else {0: "batch"}, "embedding": {0: "batch"}}
    export_optimized(tower, tokens, scratch, scratch / MODEL_FILE, WEIGHTS_FILE, input_names=["tokens"],
                     output_names=["embedding"], dynamic_axes=axes, opset_version=OPSET)
