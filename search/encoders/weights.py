"""Whether a model's weights can be had on this machine: known before a run does any work,
and without importing torch.

An index run loads the model only once it has scanned the folders and found files to embed;
offline, a first run with a pretrained tag whose weights were never downloaded used to scan
for minutes, then fail on the download. `ensure_weights` runs first instead: a checkpoint
file must be there; a pretrained tag's weights must be in the cache open_clip uses (the
Hugging Face hub's, or `~/.cache/clip` for a URL), or are downloaded now, as open_clip would
on first use. open_clip's table of tags is read from its `pretrained` module, loaded on its
own: `import open_clip` imports torch (seconds), which a run on the model's ONNX export never
needs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

from clipdex.search.errors import ModelUnavailable
from clipdex.search.encoders.model import ResolvedModel

_PRETRAINED_MODULE = "_clipdex_open_clip_tags"  # open_clip's pretrained.py, under a package name of its own


def weights_unavailable(model: ResolvedModel, reason: str) -> ModelUnavailable:
    """The error for a pretrained tag whose weights cannot be fetched, with the way out."""
    return ModelUnavailable(
        f"cannot fetch the weights of model {model.name} (pretrained tag {model.pretrained!r}): {reason[:300]}. "
        "open_clip downloads them from the model hub on first use; without network access, pass a local "
        "checkpoint file with --pretrained FILE (and the architecture with --model)"
    )


def ensure_weights(model: ResolvedModel) -> None:
    """Raise ModelUnavailable now when `model`'s weights cannot be had (see the module's docstring).

    Random weights, a hub model (`hf-hub:`, which names its own weights) and tags open_clip
    does not know are left to the load, which says what is wrong with them."""
    if model.checkpoint:
        if not os.path.isfile(model.checkpoint):
            raise ModelUnavailable(f"checkpoint file {model.checkpoint} of model {model.name} is missing")
        return
    if not model.pretrained or ":" in model.name:
        return
    pretrained = _open_clip_pretrained()
    if pretrained is None:
        return
    config = pretrained.get_pretrained_cfg(model.name, model.pretrained)
    if not config or _in_cache(pretrained, config):
        return
    if _offline():
        raise weights_unavailable(model, "they are not in this machine's cache, and HF_HUB_OFFLINE is set")
    try:
        pretrained.download_pretrained(config)
    except Exception as error:  # whatever the download met: no network, a refused file, a full disk
        raise weights_unavailable(model, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__) from error


def _open_clip_pretrained() -> Any:
    """open_clip's `pretrained` module, without running `open_clip/__init__` (which imports
    torch); None when open_clip is not installed or its module cannot be loaded on its own.

    Its one import of torch (`safetensors.torch`, only to tell whether `.safetensors` files
    are preferred to `.bin` ones) is kept out while it loads; that answer is then set as
    open_clip itself finds it, so the same file is looked for."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].pretrained
    if _PRETRAINED_MODULE in sys.modules:
        return sys.modules[f"{_PRETRAINED_MODULE}.pretrained"]
    try:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        package = types.ModuleType(_PRETRAINED_MODULE)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[_PRETRAINED_MODULE] = package
        kept_out = "safetensors.torch" not in sys.modules
        if kept_out:
            sys.modules["safetensors.torch"] = None  # type: ignore[assignment]  # `import` raises ImportError
        try:
            module = importlib.import_module(f"{_PRETRAINED_MODULE}.pretrained")
        finally:
            if kept_out:
                del sys.modules["safetensors.torch"]
        setattr(module, "_has_safetensors", all(importlib.util.find_spec(name) is not None for name in ("safetensors", "torch")))
        return module
    except Exception:  # another open_clip than the one this reads: the load will tell
        sys.modules.pop(_PRETRAINED_MODULE, None)
        sys.modules.pop(f"{_PRETRAINED_MODULE}.pretrained", None)
        return None


def _in_cache(pretrained: Any, config: dict[str, Any]) -> bool:
    """Whether open_clip's `download_pretrained(config)` would find its file without the network."""
    if "file" in config:
        return os.path.isfile(config["file"])
    hub = config.get("hf_hub", "") if pretrained.has_hf_hub() else ""
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repository, filename = os.path.split(hub)
        filename = filename or pretrained.HF_WEIGHTS_NAME
        candidates = [*(pretrained._get_safe_alternatives(filename) if pretrained._has_safetensors else []), filename]
        return any(isinstance(try_to_load_from_cache(repository, candidate), str) for candidate in candidates)
    url = config.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
