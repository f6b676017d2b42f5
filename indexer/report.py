"""What an index run reports: counts, the files it could not index, whether it was interrupted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Failure:
    path: str
    error: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[Failure] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    model_loaded: bool = False
    export_seconds: float = 0.0  # spent exporting the model to ONNX (once per library)
    ocr: Any = None  # the OCR pass's `OcrReport`, when the run read text (`clipdex.indexer.ocr_pass`)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "moved": self.moved,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": [failure.to_json() for failure in self.failed],
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            **({"ocr": self.ocr.to_json()} if self.ocr is not None else {}),
        }
