"""Shared by the speed benchmarks: the table of figures, the machine they ran on, timing helpers.

Each figure is a measurement, what it is compared with, their ratio and the target. When
`CLIPDEX_BENCH_RESULTS` names a file (benchmarks/run.py sets it), figures are appended
to it as JSON lines so that run.py can print one table for every benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

RESULTS_ENV = "CLIPDEX_BENCH_RESULTS"


@dataclass
class Figure:
    target: str  # what is measured
    measured: str  # the figure, with its unit
    baseline: str  # what it is compared with, with its unit
    ratio: float  # measured / baseline
    goal: str  # the target, e.g. ">= 0.80"
    met: bool


def at_least(target: str, measured: str, baseline: str, ratio: float, goal: float) -> Figure:
    return Figure(target, measured, baseline, ratio, f">= {goal:.2f}", ratio >= goal)


def at_most(target: str, measured: str, baseline: str, ratio: float, goal: float) -> Figure:
    return Figure(target, measured, baseline, ratio, f"<= {goal:.2f}", ratio <= goal)


INFO = "(info)"  # the goal of a figure that has none


def info(target: str, measured: str, baseline: str, ratio: float) -> Figure:
    """A figure that explains others rather than meets a target of its own."""
    return Figure(target, measured, baseline, ratio, INFO, True)


def table(figures: Sequence[Figure]) -> str:
    header = ("target", "measured", "compared with", "ratio", "goal", "met")
    rows = [header] + [(f.target, f.measured, f.baseline, f"{f.ratio:.2f}", f.goal, _met(f)) for f in figures]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _met(figure: Figure) -> str:
    if figure.goal == INFO:
        return ""
    return "yes" if figure.met else "NO"


def machine() -> str:
    """The CPU, its core count and the load average now (other jobs make timings noisy)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {load}"


def report(title: str, figures: Sequence[Figure]) -> bool:
    """Print the figures as a table (and record them for run.py); True when every target is met."""
    print(f"\n{title}\nmachine: {machine()}\n")
    print(table(figures), flush=True)
    results = os.environ.get(RESULTS_ENV)
    if results:
        with open(results, "a") as handle:
            for figure in figures:
                handle.write(json.dumps(asdict(figure)) + "\n")
    return all(figure.met for figure in figures)


def read_results(path: Path) -> list[Figure]:
    if not path.exists():
        return []
    return [Figure(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
