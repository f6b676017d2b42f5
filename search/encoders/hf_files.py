"""The files a Hugging Face text tower (multilingual open_clip models) needs besides the
model's weights, checked before a load, without importing torch or transformers.

open_clip builds such a tower from `hf_model_name` in the model config (`xlm-roberta-base`,
`facebook/nllb-200-distilled-600M`, or a local folder) with `transformers`: its `config.json`
(the architecture; the weights come from the open_clip checkpoint) and its tokenizer
(`hf_tokenizer_name`: `tokenizer.json`, read by the fast tokenizer). A folder must hold them;
a hub name must have them in the Hugging Face cache when HF_HUB_OFFLINE is set (else
transformers fetches them, once). Missing, the error is one line that names what to fetch.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from clipdex.search.encoders.model import ResolvedModel, architecture_config
from clipdex.search.errors import ModelUnavailable

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json",)
INSTALL_HINT = "pip install 'clipdex[multilingual]'"


def hf_text_names(model: ResolvedModel) -> tuple[str, str] | None:
    """The model's Hugging Face text tower and tokenizer (`hf_model_name`, `hf_tokenizer_name`),
    or None for a CLIP text tower (or an architecture only open_clip can tell)."""
    config = architecture_config(model)
    text: Any = (config or {}).get("text_cfg") or {}
    name = text.get("hf_model_name")
    if not name:
        return None
    return str(name), str(text.get("hf_tokenizer_name") or name)


def ensure_hf_text_files(model: ResolvedModel) -> None:
    """Raise ModelUnavailable now, in one line, when `model` has a Hugging Face text tower and
    transformers is not installed, or the tower's config or tokenizer cannot be had offline."""
    names = hf_text_names(model)
    if names is None:
        return
    if importlib.util.find_spec("transformers") is None:
        raise ModelUnavailable(f"model {model.name} has a Hugging Face text tower ({names[0]}), which needs "
                               f"transformers to load: {INSTALL_HINT}")
    tower, tokenizer = names
    missing = [f"{CONFIG_FILE} of {tower}"] if not _available(tower, CONFIG_FILE) else []
    missing += [f"{file} of {tokenizer}" for file in TOKENIZER_FILES if not _available(tokenizer, file)]
    if not missing:
        return
    folders = [name for name in dict.fromkeys(names) if _local(name)]
    hubs = [name for name in dict.fromkeys(names) if not _local(name)]
    where = "; ".join(
        [f"the folder {name} lacks them" for name in folders]
        + [f"fetch them where the hub can be reached with `hf download {name} {CONFIG_FILE} {' '.join(TOKENIZER_FILES)}` "
           "and copy that Hugging Face cache here (HF_HOME), or name a folder holding them as hf_model_name and "
           "hf_tokenizer_name in a model config" for name in hubs]
    )
    raise ModelUnavailable(f"model {model.name} cannot load its text tower: {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing; {where}")


def _local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(name))


def _available(name: str, filename: str) -> bool:
    """Whether transformers finds `filename` of `name` without the network: in the folder, or in
    the hub's cache; online, a hub name's files are fetched by the load itself."""
    if _local(name):
        return (Path(name).expanduser() / filename).is_file()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if isinstance(try_to_load_from_cache(name, filename), str):
        return True
    if _offline():
        return False
    from clipdex.search.encoders.weights import source_unreachable

    return source_unreachable({"hf_hub": name}, True) is None  # the load fetches it


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
