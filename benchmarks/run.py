"""`make bench`: run every benchmark script in this folder and print one table of all figures.

A benchmark script is a file here with a `__main__` block (helper modules have none),
except the GPU check, which benchmarks/gpu.sh runs.
Each runs in its own process with the same interpreter, one after the other, so that they
do not compete for the cores. Exit status 1 when a script fails or a target is missed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed_report import RESULTS_ENV, machine, read_results, table  # noqa: E402

# Run first: the speed targets, in the order of the issue; then any other script by name.
ORDER = ("speed_index.py", "speed_noop.py", "speed_query.py", "speed_memory.py")
# Not here: needs a GPU, and has its own entry point (benchmarks/gpu.sh); needs root and
# `ip netns` for its two-node Ray cluster, and takes several minutes (run it by hand).
SEPARATE = ("speed_gpu.py", "speed_cluster.py")


def benchmark_scripts() -> list[Path]:
    scripts = [
        path for path in HERE.glob("*.py")
        if path.name != Path(__file__).name and path.name not in SEPARATE and "__main__" in path.read_text()
    ]
    return sorted(scripts, key=lambda path: (ORDER.index(path.name) if path.name in ORDER else len(ORDER), path.name))


def main() -> int:
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as folder:
        results = Path(folder) / "figures.jsonl"
        environment = {**os.environ, RESULTS_ENV: str(results)}
        for script in benchmark_scripts():
            print(f"\n=== {script.name} ===", flush=True)
            started = time.perf_counter()
            code = subprocess.call([sys.executable, str(script)], cwd=HERE.parent, env=environment)
            print(f"=== {script.name}: exit {code}, {time.perf_counter() - started:.0f} s ===", flush=True)
            if code != 0:
                failed.append(script.name)
        figures = read_results(results)
    print(f"\nAll figures ({machine()}):\n")
    print(table(figures))
    missed = [figure.target for figure in figures if not figure.met]
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    if missed:
        print(f"\ntargets missed: {'; '.join(missed)}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
