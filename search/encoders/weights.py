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

Offline, a download would retry for a minute and more (Hugging Face's client retries with
backoff, logging each retry) before it fails. So before one, the hub (or the URL the weights
come from) is probed once, with a HUB_PROBE_SECONDS timeout, through the proxy the environment
names: when it cannot be reached the error comes at once, in one line that says what to do
(`weights_unavailable`). The model's own load (`TorchClipEncoder`) runs this check first too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

from clipdex.search.errors import ModelUnavailable
from clipdex.search.encoders.model import ResolvedModel

_PRETRAINED_MODULE = "_clipdex_open_clip_tags"  # open_clip's pretrained.py, under a package name of its own
HUB_PROBE_SECONDS = 3.0  # to connect to the hub and hear back, once, before a download
DEFAULT_HUB = "https://huggingface.co"
MAX_REASON = 200  # characters of an upstream error quoted in ours (cut at a word)


def weights_unavailable(model: ResolvedModel, reason: str) -> ModelUnavailable:
    """The error for a pretrained tag whose weights cannot be fetched, in one line, with the ways out:
    a local checkpoint file, the project's small demo model, or (when not set) HF_HUB_OFFLINE=1."""
    demo = demo_model_folder()
    demo_hint = (f"the small demo model (--model {demo / 'clipdex-demo.json'} --pretrained {demo / 'clipdex-demo.pt'})"
                 if demo is not None else "the small demo model of clipdex's source (data/demo-model)")
    offline_hint = "" if _offline() else "; HF_HUB_OFFLINE=1 uses only weights downloaded before, never waiting on the hub"
    return ModelUnavailable(
        f"cannot fetch the weights of model {model.name} (pretrained tag {model.pretrained!r}): {_one_line(reason)}. "
        f"Use a local checkpoint file (--model ARCHITECTURE --pretrained FILE; in Python ModelSpec(ARCHITECTURE, FILE)) "
        f"or {demo_hint}{offline_hint}"
    )


def demo_model_folder() -> Path | None:
    """The project's small demo model (`data/demo-model` of clipdex's source), where it is here."""
    folder = Path(__file__).resolve().parents[2] / "data" / "demo-model"
    return folder if (folder / "clipdex-demo.pt").is_file() else None


def _one_line(reason: str) -> str:
    """The first line of an upstream error, cut at a word if it is long."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    line = lines[0] if lines else "unknown error"
    if len(line) > MAX_REASON:
        line = line[:MAX_REASON].rsplit(" ", 1)[0] + " …"
    return line.rstrip(".")


def ensure_weights(model: ResolvedModel) -> None:
    """Raise ModelUnavailable now when `model`'s weights cannot be had (see the module's docstring).

    Random weights, a hub model (`hf-hub:`, which names its own weights) and tags open_clip
    does not know are left to the load, which says what is wrong with them."""
    from clipdex.search.encoders.hf_files import ensure_hf_text_files

    ensure_hf_text_files(model)  # a multilingual model's text tower: transformers, its config and tokenizer
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
    unreachable = source_unreachable(config, pretrained.has_hf_hub())
    if unreachable:
        raise weights_unavailable(model, f"they are not in this machine's cache, and {unreachable}")
    try:
        pretrained.download_pretrained(config)
    except Exception as error:  # whatever the download met: no network, a refused file, a full disk
        raise weights_unavailable(model, str(error) or type(error).__name__) from error


def source_unreachable(config: dict[str, Any], hub: bool) -> str | None:
    """Why the place `config`'s weights download from cannot be reached (one request, at most
    HUB_PROBE_SECONDS, through the environment's proxy, as the download goes), or None. Any
    HTTP answer, an error status too, means it can be reached."""
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    if hub and config.get("hf_hub"):
        # read now: huggingface_hub reads it once, when imported
        url = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or _hub_endpoint()
    elif config.get("url"):
        parts = urllib.parse.urlsplit(str(config["url"]))
        url = f"{parts.scheme}://{parts.netloc}"
    else:
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/", method="HEAD"), timeout=HUB_PROBE_SECONDS):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, socket.timeout, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        return f"{url} cannot be reached ({reason})"


def _hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT).rstrip("/")
    except ImportError:
        return DEFAULT_HUB


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
