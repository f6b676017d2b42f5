"""Target 2: a re-run over 20,000 already indexed files that changed nothing, in under 2 seconds.

    .venv/bin/python benchmarks/speed_noop.py [--count 20000]

Writes COUNT small JPEGs and builds their library cheaply: a catalog row per file (its
path, size, mtime and hash) with a random vector, committed through the library's
writer, for a small model that is never loaded (a no-op run loads no model). Then times
`clipdex index FOLDER` in a fresh process, start to exit, and checks that it reported
every file unchanged and never imported torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import write_small_images  # noqa: E402
from speed_report import at_most, report  # noqa: E402

from clipdex.indexer.scan import scan  # noqa: E402
from clipdex.search.catalog.database import NewItem  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402

SMALL_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
LIMIT_SECONDS = 2.0
# Runs `clipdex index` in this process and reports whether torch or open_clip got imported.
NO_OP_RUN = """
import sys
from clipdex.cli.main import main
sys.argv = ["clipdex", "index", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("IMPORTED", sorted(name for name in ("torch", "open_clip") if name in sys.modules), file=sys.stderr)
"""


def build_library(folder: Path, library_path: Path, scratch: Path, catalog: str | None = None) -> Library:
    """A library that already holds every image under `folder`, made without the model
    (on the PostgreSQL catalog at `catalog`, if given)."""
    config = scratch / "small-clip.json"
    config.write_text(json.dumps(SMALL_MODEL))
    library = Library.open(library_path, model=ModelSpec(str(config), "none"), create=True, device="cpu", catalog=catalog)
    files = scan([folder]).files
    rng = np.random.default_rng(0)
    with library.writer() as writer:
        for start in range(0, len(files), 2000):
            chunk = files[start : start + 2000]
            vectors = rng.normal(size=(len(chunk), library.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            writer.commit(items=[_item(file, vector) for file, vector in zip(chunk, vectors)])
    return library


def _item(file, vector: np.ndarray) -> NewItem:  # type: ignore[no-untyped-def]
    content_hash = hashlib.blake2b(Path(file.path).read_bytes(), digest_size=20).hexdigest()
    return NewItem(kind="image", vector=vector, path=file.path, size=file.size, mtime_ns=file.mtime_ns,
                   content_hash=content_hash, width=64, height=48)


def timed_run(folder: Path, library_path: Path) -> tuple[float, dict, str]:
    """Seconds of a fresh `clipdex index` process, its JSON report and what it imported."""
    command = [sys.executable, "-c", NO_OP_RUN, str(folder), "--library", str(library_path), "--json", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"clipdex index failed: {done.stderr.strip()[-2000:]}")
    imported = next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED"))
    return seconds, json.loads(done.stdout), imported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-noop-") as scratch_name:
        scratch = Path(scratch_name)
        folder = scratch / "photos"
        write_small_images(folder, args.count)
        build_library(folder, scratch / "library", scratch).close()
        timed_run(folder, scratch / "library")  # the first run may still find things to settle
        runs = [timed_run(folder, scratch / "library") for _ in range(3)]
    seconds = sorted(run[0] for run in runs)[1]
    summary, imported = runs[-1][1], runs[-1][2]
    if summary["unchanged"] != args.count or summary["added"] or summary["updated"] or summary["removed"]:
        raise SystemExit(f"the re-run was not a no-op: {summary}")
    print(f"a no-op run {imported.lower()}; report: {summary['unchanged']} unchanged")
    figures = [
        at_most(f"2 no-op re-run, {args.count} files (clipdex index, whole process)", f"{seconds:.2f} s",
                f"{LIMIT_SECONDS:.1f} s limit", seconds / LIMIT_SECONDS, 1.0),
    ]
    ok = report("No-op re-run", figures)
    if "torch" in imported or "open_clip" in imported:
        print("a no-op run imported torch or open_clip")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
