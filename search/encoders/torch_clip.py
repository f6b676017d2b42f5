"""The open_clip model on torch: loaded lazily, on first use, and only when something must be embedded.

Importing this module is cheap; torch and open_clip are imported inside `TorchClipEncoder.load`.
On CUDA the model runs in fp16, on the CPU in fp32; a checkpoint file must have the
sha256 the library recorded when it was made.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from clipdex.search.cores import available_cores
from clipdex.search.encoders.base import ImageTextEncoder, normalized
from clipdex.search.errors import ModelUnavailable
from clipdex.search.encoders.model import ResolvedModel

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

DEVICES = ("auto", "cpu", "cuda")

# torch.nn.init's in-place initializers: a model whose weights all come from a checkpoint
# need not spend a second or more drawing random ones first
INITIALIZERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")
_skip_init = threading.local()
_patch_lock = threading.Lock()
_patched = False


@contextmanager
def _weights_left_uninitialized(skip: bool) -> Iterator[None]:
    """While building a model in this thread (`skip`), torch.nn.init's initializers do nothing.

    Only for a model that then loads its weights strictly (`_loads_every_weight`: open_clip's
    `create_model` does for a registry name with a file or a pretrained tag): every parameter
    and buffer is then overwritten.
    Other threads are not affected: the initializers are wrapped once, and check whose call it is.
    """
    if not skip:
        yield
        return
    import torch.nn.init

    global _patched
    with _patch_lock:
        if not _patched:
            for name in INITIALIZERS:
                original = getattr(torch.nn.init, name, None)
                if original is not None:
                    setattr(torch.nn.init, name, _unless_skipping(original))
            _patched = True
    _skip_init.active = True
    try:
        yield
    finally:
        _skip_init.active = False


def _loads_every_weight(name: str, pretrained: str | None) -> bool:
    """Whether open_clip's create_model replaces every weight of `name` with `pretrained`'s,
    strictly: a pretrained tag or checkpoint file for a registry name (a schema such as
    `hf-hub:` ignores `pretrained`; big_vision's .npz/.npy weights load leniently)."""
    return bool(pretrained) and ":" not in name and Path(str(pretrained)).suffix.lower() not in (".npz", ".npy")


def _unless_skipping(initializer: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(initializer)
    def initialize(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_skip_init, "active", False):
            return tensor
        return initializer(tensor, *args, **kwargs)

    return initialize


class TorchClipEncoder(ImageTextEncoder):
    """Turns images and texts into normalized float32 vectors of one CLIP space, with open_clip."""

    def __init__(self, model: ResolvedModel, device: str = "auto", threads: int | None = None) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
        self.spec = model
        self.requested_device = device
        # torch's intra-op threads: one per core this process may use (see available_cores)
        self.threads = threads or available_cores()
        self._lock = threading.Lock()
        self._model: Any = None
        self._preprocess: Any = None
        self._resize_mode = "shortest"  # open_clip's, for the loaded model
        self._tokenizer: Any = None
        self._dim = 0
        self._device = "cpu"
        self.dtype_name = "fp32"

    # -- loading -----------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> "TorchClipEncoder":
        with self._lock:
            if self._model is None:
                self._load()
        return self

    def _load(self) -> None:
        from clipdex.search.encoders.open_clip_logs import route_open_clip_logs

        route_open_clip_logs()  # its INFO lines go to clipdex's logger, at DEBUG, not to the root logger
        import torch

        import open_clip

        torch.set_num_threads(self.threads)
        device = self.requested_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelUnavailable('device="cuda" was asked for, but torch sees no CUDA device')
        precision = "fp16" if device == "cuda" else "fp32"
        spec = self.spec
        if spec.config is not None:
            _register_config(spec)
        pretrained = spec.checkpoint or spec.pretrained
        if spec.checkpoint and not os.path.isfile(spec.checkpoint):
            raise ModelUnavailable(f"checkpoint file {spec.checkpoint} of model {spec.name} is missing")
        if spec.pretrained and not spec.checkpoint:
            from clipdex.search.encoders.weights import ensure_weights

            ensure_weights(spec)  # offline: fails at once, in one line, rather than after a minute of retries
        from clipdex.search.encoders.hf_files import ensure_hf_text_files

        ensure_hf_text_files(spec)  # a multilingual model's text tower: transformers, its config and tokenizer
        if not spec.checkpoint_verified():
            raise ModelUnavailable(
                f"checkpoint file {spec.checkpoint} is not the one this library was built with "
                "(its sha256 differs); restore the original weights, or index into a new library"
            )
        try:
            with _weights_left_uninitialized(_loads_every_weight(spec.name, pretrained)):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=pretrained, device=device, precision=precision, **_random_tower(spec, pretrained)
                )
        except RuntimeError as error:
            message = str(error)
            if spec.pretrained and ("download" in message.lower() or "tag" in message.lower()):
                from clipdex.search.encoders.weights import weights_unavailable

                raise weights_unavailable(spec, message.splitlines()[0]) from error
            raise ModelUnavailable(f"cannot load model {spec.name}: {message[:500]}") from error
        except (OSError, ValueError, KeyError) as error:
            raise ModelUnavailable(f"cannot load model {spec.describe()}: {error}") from error
        model.eval()
        self._tokenizer = open_clip.get_tokenizer(spec.name)
        self._dim = int(open_clip.get_model_config(spec.name)["embed_dim"])
        self._preprocess = preprocess
        settings = open_clip.get_model_preprocess_cfg(model)
        self._resize_mode = str(settings.get("resize_mode") or "shortest")
        self._device = device
        self.dtype_name = precision
        self._model = model

    def set_threads(self, count: int) -> None:
        """Use `count` torch intra-op threads (torch's setting is for the whole process)."""
        self.threads = count
        if self.loaded:
            import torch

            torch.set_num_threads(count)

    # -- properties of the loaded model --------------------------------------------

    @property
    def device(self) -> str:
        """cpu or cuda once loaded (cpu before)."""
        return self._device

    @property
    def model(self) -> Any:
        model = self.load()._model
        if model.training:  # inference only: batch norm and dropout must never run in training mode
            model.eval()
        return model

    @property
    def preprocess(self) -> Any:
        """open_clip's own inference transform (resize, center crop, to tensor, normalize)."""
        return self.load()._preprocess

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def dim(self) -> int:
        self.load()
        return self._dim

    @property
    def context_length(self) -> int:
        self.load()
        return int(getattr(self._tokenizer, "context_length", 77))

    @property
    def open_clip_tokenizer(self) -> Any:
        """open_clip's tokenizer of the loaded model (`HFTokenizer` for a Hugging Face text tower)."""
        return self.load()._tokenizer

    # -- encoding ----------------------------------------------------------------

    def encode_tensors(self, batch: "torch.Tensor") -> np.ndarray:
        """Encode preprocessed image tensors (N, 3, H, W)."""
        import torch

        model = self.model
        with torch.inference_mode():
            batch = batch.to(self.device, dtype=next(model.parameters()).dtype)
            features = model.encode_image(batch, normalize=True)
        return _normalized_numpy(features)

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_tensors(torch.stack([self._transformed(image) for image in images]))

    def prepare(self, image: "Image.Image") -> np.ndarray:
        """open_clip's preprocessing of one image, as a float32 (3, H, W) array."""
        return np.asarray(self._transformed(image).numpy(), dtype=np.float32)

    def _transformed(self, image: "Image.Image") -> "torch.Tensor":
        """open_clip's transform of the image, or of the part of a long thin one it keeps
        (`clipdex.search.encoders.preprocess.within_model_bounds`)."""
        from clipdex.search.encoders.preprocess import within_model_bounds

        preprocess = self.preprocess
        return preprocess(within_model_bounds(image, self.image_size, self._resize_mode))

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        import torch

        return self.encode_tensors(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))

    def tokenize(self, texts: Sequence[str]) -> "torch.Tensor":
        self.load()
        tokenizer = self._tokenizer
        if callable(getattr(tokenizer, "set_lang_fn", None)) and texts:  # NLLB: each text led by its language code
            import torch

            from clipdex.search.encoders.hf_tokenizer import language_for

            rows = []
            fast = tokenizer.tokenizer
            for text in texts:
                language = language_for(text)
                tokenizer.set_language(language)
                row = tokenizer([text])
                if not getattr(fast, "legacy_behaviour", False):
                    # transformers 5's NllbTokenizer keeps the template it was loaded with (eng_Latn first)
                    # whatever set_src_lang_special_tokens sets: the code leads the text, as NLLB-CLIP was trained
                    row[:, 0] = int(fast.convert_tokens_to_ids(language))
                rows.append(row)
            return torch.cat(rows)
        return tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        model = self.model
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start : start + batch_size]).to(self.device)
            with torch.inference_mode():
                parts.append(_normalized_numpy(model.encode_text(tokens, normalize=True)))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)

    def count_tokens(self, text: str) -> int:
        """How many BPE tokens `text` takes, start and end tokens included."""
        self.load()
        encode = getattr(self._tokenizer, "encode", None)
        if encode is None:
            return 0
        return len(encode(text)) + 2


def _random_tower(spec: ResolvedModel, pretrained: str | None) -> dict[str, Any]:
    """Random weights (`--pretrained none`) for a Hugging Face text tower too: open_clip would
    otherwise fetch the tower's pretrained weights (xlm-roberta-base's, say) into the random model."""
    from clipdex.search.encoders.hf_files import hf_text_names

    return {"pretrained_hf": False} if not pretrained and hf_text_names(spec) is not None else {}


def _normalized_numpy(features: "torch.Tensor") -> np.ndarray:
    return normalized(features.float().cpu().numpy())


_registered: dict[str, dict[str, Any]] = {}


def _register_config(spec: ResolvedModel) -> None:
    """Make the manifest's copy of a model-config JSON known to open_clip under its name.

    The copy, not the file it came from: that file may have changed or moved since.
    """
    import open_clip

    if _registered.get(spec.name) == spec.config:
        return
    with tempfile.TemporaryDirectory(prefix="clipdex-config-") as folder:
        path = Path(folder) / f"{spec.name}.json"
        path.write_text(json.dumps(spec.config))
        open_clip.add_model_config(path)
    _registered[spec.name] = dict(spec.config or {})
