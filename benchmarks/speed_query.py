"""Targets 3 and 4: text queries on 100,000 items, cold from the command line and warm from Python.

    .venv/bin/python benchmarks/speed_query.py [--items 100000]

Builds the library cheaply: ITEMS random normalized vectors committed through the
library's writer under a ViT-B-32 (random weights) manifest, the vector index rebuilt as
the type clipdex picks for that size (`--index flat` keeps the exact index), plus the
library's exported text encoder (`clipdex.search.encoders.text_export`). Then measures, in one run:

3. a cold `clipdex search "a new text"` (a fresh process, a text never asked before) and
   the same query repeated (answered from the query cache), each against the time of
   `python -c "import open_clip"`; both must import neither torch nor open_clip;
4. warm queries through the Python API (library open, encoder loaded, every text new):
   the median latency of `library.search(text=...)` against one text encode + 20 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from speed_report import at_most, report  # noqa: E402

from clipdex.search.catalog.database import NewItem  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")
WARM_MARGIN_SECONDS = 0.020
# Runs `clipdex search` in this process, then reports whether torch or open_clip got imported.
SEARCH_RUN = """
import sys
from clipdex.cli.main import main
sys.argv = ["clipdex", "search", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    if exit.code:
        raise
print("IMPORTED", sorted(name for name in ("torch", "open_clip") if name in sys.modules), file=sys.stderr)
"""
THINGS = ("dog", "cat", "beach", "mountain", "red car", "old house", "sailing boat", "bird", "flower", "bicycle")


def query_text(number: int) -> str:
    """A different, ordinary query for every number (about ten tokens)."""
    return f"a photo of a {THINGS[number % len(THINGS)]} seen from afar, number {number}"


def build_library(path: Path, items: int, index: str) -> Library:
    """ITEMS random unit vectors as image items, committed through the writer; then the text export.

    `index` "auto": then rebuild the vector index as the type clipdex picks for the size
    (what `clipdex optimize` and `clipdex check --repair` build); "flat": keep the exact
    index that incremental commits grow.
    """
    from clipdex.search.encoders.torch_clip import TorchClipEncoder
    from clipdex.search.encoders.text_export import export_text_encoder

    library = Library.open(path, model=MODEL, create=True, device="cpu")
    rng = np.random.default_rng(0)
    with library.writer() as writer:
        for start in range(0, items, 10_000):
            count = min(10_000, items - start)
            vectors = rng.normal(size=(count, library.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            writer.commit(items=[NewItem(kind="image", vector=vector, path=f"/photos/{start + row:06d}.jpg", width=640, height=480)
                                 for row, vector in enumerate(vectors)])
    if index == "auto":
        library.rebuild_vectors()
    encoder = TorchClipEncoder(library.model, "cpu").load()
    export_text_encoder(encoder, library.path)
    return library


def process_seconds(arguments: Sequence[str]) -> tuple[float, str]:
    """Wall time of a fresh Python process running `arguments`, and its stderr."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments[:3])} failed: {done.stderr.strip()[-2000:]}")
    return seconds, done.stderr


def cli_search(library: Path, text: str) -> tuple[float, str]:
    seconds, stderr = process_seconds(["-c", SEARCH_RUN, text, "--library", str(library), "-k", "10"])
    imported = next(line for line in stderr.splitlines() if line.startswith("IMPORTED"))
    if "torch" in imported or "open_clip" in imported:
        raise SystemExit(f"clipdex search {text!r} imported {imported}")
    return seconds, imported


def cold_figures(library: Path, repeats: int = 3) -> tuple[float, float, float]:
    """Median seconds of: import open_clip, a cold search for a new text, the same search again."""
    import_times, new_times, cached_times = [], [], []
    cli_search(library, "a warm-up query")  # the first process after the build may still settle files
    for number in range(repeats):
        import_times.append(process_seconds(["-c", "import open_clip"])[0])
        text = f"a new text, run {number} at {time.time()}"
        new_times.append(cli_search(library, text)[0])
        cached_times.append(cli_search(library, text)[0])
    return statistics.median(import_times), statistics.median(new_times), statistics.median(cached_times)


def warm_figures(library_path: Path, queries: int = 40) -> tuple[float, float, str]:
    """Median seconds of one text encode and of a whole `search(text=...)`, every text new; the index type."""
    library = Library.open(library_path)
    library.search(text="warm-up", k=10)
    encoder = library.text_encoder()
    encode_times, search_times = [], []
    for number in range(queries):
        started = time.perf_counter()
        encoder.encode_texts([query_text(2 * number)])
        encode_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        library.search(text=query_text(2 * number + 1), k=10)
        search_times.append(time.perf_counter() - started)
    index_type = str(library.stats()["index_type"])
    library.close()
    return statistics.median(encode_times), statistics.median(search_times), index_type


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--index", choices=("auto", "flat"), default="auto",
                        help="auto: the index type clipdex picks for the size (HNSW at 100,000); flat: exact")
    parser.add_argument("--library", type=Path, help="reuse (or build once into) this folder instead of a temporary one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-query-") as scratch:
        path = args.library or Path(scratch) / "library"
        if not (path / "text_encoder").exists():
            build_library(path, args.items, args.index).close()
        import_seconds, new_seconds, cached_seconds = cold_figures(path)
        encode_seconds, search_seconds, index_type = warm_figures(path)
    budget = encode_seconds + WARM_MARGIN_SECONDS
    figures = [
        at_most(f"3 cold clipdex search, new text, {args.items} items ({index_type})", f"{new_seconds:.2f} s",
                f"{import_seconds:.2f} s import open_clip", new_seconds / import_seconds, 0.5),
        at_most("3 cold clipdex search, repeated text (cache)", f"{cached_seconds:.2f} s",
                f"{import_seconds:.2f} s import open_clip", cached_seconds / import_seconds, 0.3),
        at_most(f"4 warm Python query, median, {args.items} items ({index_type})", f"{search_seconds * 1000:.1f} ms",
                f"{encode_seconds * 1000:.1f} ms encode + 20 ms", search_seconds / budget, 1.0),
    ]
    return 0 if report("Text queries (ViT-B-32, random weights, exported text encoder, CPU)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
