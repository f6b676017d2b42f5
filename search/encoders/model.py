"""Which open_clip model a library uses, and how it is recorded in the manifest.

Nothing here imports torch or open_clip: a model is only loaded by `clipdex.search.encoders`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdex.search.errors import ModelMismatch, ModelUnavailable

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
# `--pretrained none` builds the architecture with random weights: only for speed tests.
RANDOM_WEIGHTS = "none"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

# Names for open_clip's best multilingual models, so a user need not know their tags
# (open_clip's multilingual benchmark: average recall over languages, and image recall@1 on
# Chinese COCO; an English ViT-B-32 scores 0.043 on the latter). README "Multilingual models".
MODEL_PRESETS: dict[str, tuple[str, str]] = {
    "multilingual": ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),  # 0.647, 0.508; 366 M parameters
    "multilingual-large": ("xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k"),  # 1.2 B parameters
    "multilingual-nllb": ("nllb-clip-base-siglip", "v1"),  # 0.749, 0.627; NLLB language codes
}


@dataclass(frozen=True)
class ModelSpec:
    """A model as a user names it.

    `name` is an open_clip model name (`ViT-B-32`) or the path of a model-config JSON
    file in open_clip's `model_configs/*.json` format. `pretrained` is an open_clip
    pretrained tag, the path of a local checkpoint file, or `none` for random weights.
    """

    name: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED

    def resolve(self, known: "ResolvedModel | None" = None) -> "ResolvedModel":
        """Pin the model down. A checkpoint file is hashed, unless `known` (a library's model)
        recorded the same file with the same size and mtime: then its sha256 is taken as recorded."""
        config: dict[str, Any] | None = None
        config_path: str | None = None
        model_name = self.name
        if self.name.endswith(".json") or Path(self.name).is_file():
            path = Path(self.name).expanduser()
            if not path.is_file():
                raise ModelUnavailable(f"model config file {path} does not exist")
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise ModelUnavailable(f"model config file {path} is not valid JSON: {error}") from error
            if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
                raise ModelUnavailable(
                    f"model config file {path} lacks embed_dim, vision_cfg or text_cfg "
                    "(use the format of open_clip's model_configs/*.json)"
                )
            model_name = path.stem
            config_path = str(path.resolve())

        checkpoint: str | None = None
        checkpoint_sha256: str | None = None
        checkpoint_size: int | None = None
        checkpoint_mtime_ns: int | None = None
        tag: str | None = self.pretrained
        if self.pretrained.lower() == RANDOM_WEIGHTS:
            tag = None
        elif _looks_like_file(self.pretrained):
            path = Path(self.pretrained).expanduser()
            if not path.is_file():
                raise ModelUnavailable(f"checkpoint file {path} does not exist")
            checkpoint = str(path.resolve())
            info = path.stat()
            checkpoint_size, checkpoint_mtime_ns = info.st_size, info.st_mtime_ns
            unchanged = known is not None and known.checkpoint == checkpoint and known.file_unchanged()
            checkpoint_sha256 = known.checkpoint_sha256 if unchanged and known else _checkpoint_sha256(Path(checkpoint), info)
            tag = None
        return ResolvedModel(
            name=model_name,
            config=config,
            config_path=config_path,
            pretrained=tag,
            checkpoint=checkpoint,
            checkpoint_sha256=checkpoint_sha256,
            checkpoint_size=checkpoint_size,
            checkpoint_mtime_ns=checkpoint_mtime_ns,
        )


def architecture_config(model: "ResolvedModel") -> dict[str, Any] | None:
    """The model's architecture config without importing open_clip: the user's config file,
    or the JSON file of open_clip's registry (`model_configs/NAME.json`, what
    `open_clip.get_model_config` reads). None for names the registry does not hold as a file
    (a schema such as `hf-hub:`), for which open_clip itself must be asked."""
    if model.config is not None:
        return model.config
    import importlib.util

    if not model.name or any(character in model.name for character in ":/\\") or model.name.startswith("."):
        return None
    try:
        spec = importlib.util.find_spec("open_clip")  # finds the package without running it
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            path = Path(location) / "model_configs" / f"{model.name}.json"
            if path.is_file():
                config = json.loads(path.read_text())
                if isinstance(config, dict) and all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
                    return config
    except (ImportError, OSError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class ResolvedModel:
    """A model pinned down exactly: what the manifest records and the encoder loads."""

    name: str
    config: dict[str, Any] | None = None
    config_path: str | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_size: int | None = None
    # the checkpoint file's mtime when it was hashed: while size and mtime stay, the hash is not redone
    checkpoint_mtime_ns: int | None = None

    @property
    def weights(self) -> str:
        """A short human description of where the weights come from."""
        if self.checkpoint:
            return f"checkpoint {self.checkpoint}"
        if self.pretrained:
            return f"pretrained tag {self.pretrained}"
        return "random weights"

    def describe(self) -> str:
        return f"{self.name} ({self.weights})"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "config_path": self.config_path,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoint_size": self.checkpoint_size,
            "checkpoint_mtime_ns": self.checkpoint_mtime_ns,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ResolvedModel":
        values: dict[str, Any] = {key: data.get(key) for key in cls.__dataclass_fields__}
        return cls(**values)

    def file_unchanged(self) -> bool:
        """Whether the checkpoint file has the size and mtime recorded when it was hashed (no hashing)."""
        if not self.checkpoint or self.checkpoint_size is None or self.checkpoint_mtime_ns is None:
            return False
        try:
            info = Path(self.checkpoint).stat()
        except OSError:
            return False
        return info.st_size == self.checkpoint_size and info.st_mtime_ns == self.checkpoint_mtime_ns

    def checkpoint_verified(self) -> bool:
        """Whether the checkpoint file holds the weights recorded: unchanged since hashed, else hashed again now."""
        if not self.checkpoint or not self.checkpoint_sha256:
            return True
        return self.file_unchanged() or file_sha256(Path(self.checkpoint)) == self.checkpoint_sha256

    def same_model(self, other: "ResolvedModel") -> bool:
        """True when both would produce the same vectors."""
        if self.name != other.name or (self.config or None) != (other.config or None):
            return False
        if self.checkpoint_sha256 or other.checkpoint_sha256:
            return self.checkpoint_sha256 == other.checkpoint_sha256
        return self.pretrained == other.pretrained

    def check_compatible(self, requested: "ResolvedModel", library: object) -> None:
        if not self.same_model(requested):
            raise ModelMismatch(
                f"library {library} was built with model {self.describe()}, "
                f"not {requested.describe()}; drop model= to use the library's "
                "own model, or open another library"
            )


def _looks_like_file(value: str) -> bool:
    return value.endswith(CHECKPOINT_SUFFIXES) or "/" in value or "\\" in value or Path(value).is_file()


def _checkpoint_sha256(path: Path, info: os.stat_result) -> str:
    """The sha256 of the checkpoint at `path` (real path, `info` its stat): remembered on this
    machine when it was hashed before (`clipdex.search.encoders.checkpoint_hashes`), else hashed now."""
    from clipdex.search.encoders.checkpoint_hashes import remember_sha256, remembered_sha256

    digest = remembered_sha256(path, info)
    if digest is None:
        digest = file_sha256(path)
        remember_sha256(path, info, digest)
    return digest


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
