"""`clipdex browse` responsiveness: results for a new query at most 300 ms after typing stops.

    .venv/bin/python benchmarks/browse_latency.py [--items 10000] [--queries 20] [--library DIR]

Builds the library cheaply, as speed_query.py does (no indexing): ITEMS random unit vectors
committed through the library's writer under a ViT-B-32 manifest (random weights, the
compute of the pretrained model) and the exported ONNX text encoder. Then runs the browser
headless (Textual's pilot, the whole app: debounce, worker thread, table, status) with the
text tower loaded at start as `clipdex browse` loads it, and types each query as a fast
typist does, a character every 40 ms; every query is a text never asked before. The figure
is the time from the last keystroke to the hits in the table (debounce included), median
and worst over QUERIES queries.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from speed_query import build_library, query_text  # noqa: E402
from speed_report import at_most, info, report  # noqa: E402

from clipdex.search.library import Library  # noqa: E402

TARGET_SECONDS = 0.300
KEY_INTERVAL = 0.040


async def latencies(library: Library, queries: int) -> list[float]:
    from textual.widgets import Input

    from clipdex.cli.browse import BrowseApp

    app = BrowseApp(library, opener=lambda path: None, picture=None, k=50)
    measured = []
    async with app.run_test(size=(120, 40)) as pilot:
        box = app.query_one("#query", Input)
        for number in range(queries):
            text = f"{query_text(number)} at {time.time():.0f}"  # never asked before, not even in the cache
            box.value = ""
            for end in range(1, len(text) + 1):
                box.value = text[:end]
                await asyncio.sleep(KEY_INTERVAL)
            typed = time.monotonic() - KEY_INTERVAL  # the last keystroke
            while not (app.shown and app.shown[-1][0].text == text):
                await asyncio.sleep(0.002)
            measured.append(app.shown[-1][1] - typed)
            await pilot.pause()
    return measured


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--library", type=Path, help="reuse (or build once into) this folder instead of a temporary one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-browse-") as scratch:
        path = args.library or Path(scratch) / "library"
        if not (path / "text_encoder").exists():
            build_library(path, args.items, "auto").close()
        library = Library.open(path)
        library.text_encoder().encode_texts(["a photo"])  # as `clipdex browse` does before the app starts
        measured = asyncio.run(latencies(library, args.queries))
        searches = []
        for number in range(args.queries):  # the part of it that is the search itself: encode + FAISS + catalog
            started = time.perf_counter()
            library.search(text=f"{query_text(number)} alone at {time.time()}", k=50)
            searches.append(time.perf_counter() - started)
        index_type = str(library.stats()["index_type"])
        library.close()
    from clipdex.cli.browse import DEBOUNCE_SECONDS

    median, worst = statistics.median(measured), max(measured)
    search_median = statistics.median(searches)
    figures = [
        at_most(f"browse: last key to hits, median, {args.items} items ({index_type})", f"{median * 1000:.0f} ms",
                "300 ms", median / TARGET_SECONDS, 1.0),
        at_most(f"browse: last key to hits, worst of {len(measured)}", f"{worst * 1000:.0f} ms",
                "300 ms", worst / TARGET_SECONDS, 1.0),
        info("browse: of which the debounce", f"{DEBOUNCE_SECONDS * 1000:.0f} ms", "last key to hits, median",
             DEBOUNCE_SECONDS / median),
        info("browse: of which library.search(text=new), median", f"{search_median * 1000:.0f} ms",
             "last key to hits, median", search_median / median),
    ]
    return 0 if report("clipdex browse (ViT-B-32, random weights, exported text encoder, CPU)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
