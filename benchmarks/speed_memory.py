"""Target 5: peak memory while indexing 10,000 files within 10% of indexing 1,000.

    .venv/bin/python benchmarks/speed_memory.py [--small 1000] [--large 10000]

Indexes SMALL and then LARGE distinct 320x240 JPEGs, each into a new library in a fresh
process, with a small open_clip model (random weights: the decode-and-embed pipeline is
what is measured, and it bounds the files in flight whatever the model). Reports each
process's peak resident memory (`ru_maxrss`). The text-encoder export at the end of a
first run is left out: it costs the same whatever the corpus size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from speed_data import write_small_images  # noqa: E402
from speed_report import at_most, report  # noqa: E402

SMALL_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Indexes argv[1] into a new library argv[2] with model config argv[3]; prints the report and peak RSS.
INDEX_RUN = """
import json, resource, sys
from clipdex.indexer import index_paths
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
library = Library.open(sys.argv[2], model=ModelSpec(sys.argv[3], "none"), create=True, device="cpu")
report = index_paths(library, [sys.argv[1]], export_text=False)
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added": report.added, "failed": len(report.failed), "peak_mib": peak_kib / 1024, "seconds": report.seconds}))
"""


def index_in_fresh_process(folder: Path, library: Path, config: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", INDEX_RUN, str(folder), str(library), str(config)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"indexing {folder} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=10_000)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-memory-") as scratch_name:
        scratch = Path(scratch_name)
        config = scratch / "small-clip.json"
        config.write_text(json.dumps(SMALL_MODEL))
        for count in (args.small, args.large):
            folder = scratch / f"photos-{count}"
            write_small_images(folder, count, size=(320, 240))
            results[count] = index_in_fresh_process(folder, scratch / f"library-{count}", config)
            if results[count]["added"] != count:
                raise SystemExit(f"indexed {results[count]['added']} of {count} files")
    small, large = results[args.small]["peak_mib"], results[args.large]["peak_mib"]
    for count, result in results.items():
        print(f"{count} files: peak {result['peak_mib']:.0f} MiB, {result['seconds']:.1f} s")
    figures = [
        at_most(f"5 peak memory indexing {args.large} vs {args.small} files", f"{large:.0f} MiB", f"{small:.0f} MiB",
                large / small, 1.10),
    ]
    return 0 if report("Peak memory while indexing", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
