"""`manifest.json`: what a library is (format version, model, dimension, index spec).

Written once when a library is made, and again only when its index spec changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipdex.search.atomic import write_json_atomic
from clipdex.search.errors import CorruptLibrary, ModelUnavailable
from clipdex.search.encoders.model import ResolvedModel, architecture_config
from clipdex.search.index.vectors import IndexSpec

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


@dataclass
class Manifest:
    format_version: int
    model: ResolvedModel
    dim: int
    index: IndexSpec
    created_at: float
    extra: dict[str, Any]  # keys this version does not know, kept as they are (and "optimized")
    catalog: str | None = None  # a shared catalog's URL, without its password; None: LIBRARY/catalog.sqlite

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = json.loads(path.read_text())
            version = int(data["format_version"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptLibrary(f"cannot read {path}: {error}") from error
        if version > FORMAT_VERSION:
            raise CorruptLibrary(f"{path} has format version {version}; this clipdex reads up to {FORMAT_VERSION}")
        known = {"format_version", "model", "dim", "index", "created_at", "catalog"}
        try:
            return cls(
                format_version=version,
                model=ResolvedModel.from_json(data["model"]),
                dim=int(data["dim"]),
                index=IndexSpec.from_json(data.get("index")),
                created_at=float(data.get("created_at", 0)),
                extra={key: value for key, value in data.items() if key not in known},
                catalog=data.get("catalog"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptLibrary(f"cannot read {path}: {type(error).__name__}: {error}") from error

    def write(self, path: Path) -> None:
        data = {
            "format_version": self.format_version,
            "model": self.model.to_json(),
            "dim": self.dim,
            "index": self.index.to_json(),
            "created_at": self.created_at,
            **({"catalog": self.catalog} if self.catalog else {}),
            **self.extra,
        }
        write_json_atomic(path, data)

    def record_index(self, directory: Path, spec: IndexSpec, entries: dict[str, Any] | None = None) -> None:
        """Record `spec` as the index of the library at `directory` (the vector store's `IndexRecord`),
        with `entries` beside it (optimize's report); this object changes only once the file is written."""
        updated = replace(self, index=spec, extra={**self.extra, **(entries or {})})
        updated.write(directory / MANIFEST_FILE)
        self.index, self.extra = updated.index, updated.extra


    def refresh(self, directory: Path) -> None:
        """Take up the index spec and entries another process recorded in the library at
        `directory` since this was read (an optimize: its tuned spec and report); the rest of
        a manifest never changes. An unreadable file changes nothing."""
        try:
            current = Manifest.read(directory / MANIFEST_FILE)
        except CorruptLibrary:
            return
        self.index, self.extra = current.index, current.extra


def embedding_dim(model: ResolvedModel) -> int:
    """The model's vector dimension, from its config (open_clip's registry for a named model:
    its JSON file, read without importing open_clip where that file is there)."""
    config = architecture_config(model)
    if config is not None:
        return int(config["embed_dim"])
    import open_clip

    config = open_clip.get_model_config(model.name)
    if config is None:
        raise ModelUnavailable(
            f"unknown open_clip model {model.name!r}; pass a model name open_clip knows "
            "(open_clip.list_models()) or the path of a model-config JSON file"
        )
    return int(config["embed_dim"])
