"""A small library of data/shapes.py images on the project's demo model, for the terminal
previews and the browser (tests/test_preview.py, tests/test_browse.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from clipdex.indexer import index_paths
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.library import Library

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelSpec(str(ROOT / "data" / "demo-model" / "clipdex-demo.json"), str(ROOT / "data" / "demo-model" / "clipdex-demo.pt"))


def shapes() -> ModuleType:
    spec = importlib.util.spec_from_file_location("shapes", ROOT / "data" / "shapes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("shapes", module)
    spec.loader.exec_module(module)
    return module


def shared_demo_library(base: Path) -> Library:
    """The session's demo library under `base` (pytest's base temporary folder), made by the
    first module that asks for it and opened by the next: indexing with the demo model takes
    seconds on a busy machine."""
    folder = base / "demo-shapes"
    if (folder / "indexed").exists():
        return Library.open(folder / "library", device="cpu")
    library = demo_library(folder)
    (folder / "indexed").touch()
    return library


def demo_library(folder: Path, count: int = 12, seed: int = 2027) -> Library:
    """`count` shapes images in folder/photos (and two in folder/photos/more), indexed into folder/library,
    and two texts added under keys."""
    generator = shapes()
    generator.generate(folder / "photos", count=count, seed=seed, captions_per_image=1)
    generator.generate(folder / "photos" / "more", count=2, seed=seed + 1, captions_per_image=1)
    library = Library.open(folder / "library", model=MODEL, create=True, device="cpu")
    report = index_paths(library, [folder / "photos"])
    assert report.added == count + 2 and not report.failed
    library.add_texts(["a red circle, in words", "a green star on a white background"], keys=["words-1", "words-2"])
    return library
