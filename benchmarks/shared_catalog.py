"""A shared PostgreSQL catalog against the default SQLite one, side by side in one run.

    .venv/bin/python benchmarks/shared_catalog.py [--photos 96] [--noop-count 20000]

Starts a PostgreSQL server of its own (initdb + pg_ctl in a temporary folder on
127.0.0.1, as the tests do; needs Debian's postgresql package), then measures, as whole
`clipdex index` processes:

1. indexing throughput (#16 target 2): the same 1600x1200 JPEGs indexed with ViT-B-32
   (random weights: the compute of the pretrained model) into a new SQLite library and
   into a new PostgreSQL one, alternately, twice each; PostgreSQL must reach >= 0.95x;
2. the same with a small model (64-d, two layers), where the catalog's share of the work
   is far larger (info);
3. a no-op re-run over 20,000 indexed files with a PostgreSQL catalog (< 2 s), beside the
   same with SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import write_photos, write_small_images  # noqa: E402
from speed_noop import SMALL_MODEL, build_library, timed_run  # noqa: E402
from speed_report import INFO, Figure, at_least, at_most, report  # noqa: E402

from tests.postgres import PASSWORD, start_server  # noqa: E402

NOOP_LIMIT_SECONDS = 2.0


def index_seconds(folder: Path, library: Path, model: list[str], catalog: str | None) -> float:
    """Wall time of a fresh `clipdex index` making a new library of `folder`."""
    command = [sys.executable, "-m", "clipdex.cli", "index", str(folder), "--library", str(library), "--json",
               "--quiet", "--device", "cpu", *model, *(["--catalog", catalog] if catalog else [])]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"clipdex index failed: {done.stderr.strip()[-2000:]}")
    added = json.loads(done.stdout)["added"]
    if added != len(list(folder.iterdir())):
        raise SystemExit(f"indexed {added} of {len(list(folder.iterdir()))} photos")
    return seconds


def throughput(folder: Path, scratch: Path, model: list[str], new_database: "callable", rounds: int) -> tuple[float, float]:
    """Photos per second with SQLite and with PostgreSQL (median of `rounds` alternating runs each)."""
    count = len(list(folder.iterdir()))
    sqlite_runs, postgres_runs = [], []
    for round_number in range(rounds):
        sqlite_runs.append(count / index_seconds(folder, scratch / f"sqlite-{round_number}", model, None))
        postgres_runs.append(count / index_seconds(folder, scratch / f"pg-{round_number}", model, new_database()))
    return statistics.median(sqlite_runs), statistics.median(postgres_runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--noop-count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    server = start_server()
    os.environ["PGPASSWORD"] = PASSWORD
    figures: list[Figure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="clipdex-bench-pg-") as scratch_name:
            scratch = Path(scratch_name)
            small = scratch / "small-clip.json"
            small.write_text(json.dumps(SMALL_MODEL))
            write_photos(scratch / "photos", args.photos, size=(1600, 1200))
            sqlite_rate, postgres_rate = throughput(scratch / "photos", scratch, ["--model", "ViT-B-32", "--pretrained", "none"],
                                                    server.new_database, args.rounds)
            figures.append(at_least(f"indexing {args.photos} 1600x1200 JPEGs, ViT-B-32, PostgreSQL catalog",
                                    f"{postgres_rate:.2f} img/s", f"{sqlite_rate:.2f} img/s SQLite", postgres_rate / sqlite_rate, 0.95))
            sqlite_rate, postgres_rate = throughput(scratch / "photos", scratch / "small", ["--model", str(small), "--pretrained", "none"],
                                                    server.new_database, args.rounds)
            figures.append(Figure(f"indexing the same, small model (catalog-bound), PostgreSQL", f"{postgres_rate:.1f} img/s",
                                  f"{sqlite_rate:.1f} img/s SQLite", postgres_rate / sqlite_rate, INFO, True))
            write_small_images(scratch / "many", args.noop_count)
            noop = {}
            for name, catalog in (("SQLite", None), ("PostgreSQL", server.new_database())):
                library = scratch / f"noop-{name}"
                build_library(scratch / "many", library, scratch, catalog=catalog).close()
                timed_run(scratch / "many", library)
                runs = [timed_run(scratch / "many", library) for _ in range(3)]
                if any(run[1]["unchanged"] != args.noop_count for run in runs):
                    raise SystemExit(f"the {name} re-run was not a no-op: {runs[-1][1]}")
                noop[name] = sorted(run[0] for run in runs)[1]
            figures.append(at_most(f"no-op re-run, {args.noop_count} files, PostgreSQL catalog (whole process)",
                                   f"{noop['PostgreSQL']:.2f} s", f"{NOOP_LIMIT_SECONDS:.1f} s limit",
                                   noop["PostgreSQL"] / NOOP_LIMIT_SECONDS, 1.0))
            figures.append(Figure("  the same with SQLite", f"{noop['SQLite']:.2f} s", f"{noop['PostgreSQL']:.2f} s PostgreSQL",
                                  noop["SQLite"] / noop["PostgreSQL"], INFO, True))
    finally:
        server.stop()
    return 0 if report("Shared catalog: PostgreSQL beside SQLite", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
