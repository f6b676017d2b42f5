"""`clipdex watch`: latency to searchable, a burst against `clipdex index`, idle cost of many files.

    .venv/bin/python benchmarks/speed_watch.py [--parts latency,burst,idle] [--photos 7] [--burst 400] [--files 100000]
                                               [--idle-seconds 30] [--settle 1.0]

Whole processes throughout (`clipdex watch`, `clipdex index`), the model ViT-B-32 at random
weights on ONNX (its export made once, by a first index run, and copied into each library):

- latency: a watch process follows an empty folder; a 12 MP JPEG (about 3.7 MB) is copied
  into it, and the time from the copy's end to its row being committed to the catalog
  (what a search sees: searches catch up from the catalog) is measured, `--photos` times,
  one after the other. Target: median <= 3 s.
- burst: `--burst` 12 MP JPEGs indexed by `clipdex index FOLDER` (process start to exit),
  then the same files moved at once into a folder a watch process follows (moves to the
  end of the last commit), then indexed by `clipdex index` again into a new library (the
  load of a shared machine drifts: watch is compared with the mean of the two); the watcher's throughput against index's, and the growth of
  its resident memory (peak during the burst less before it, once one photo indexed before
  the burst has loaded the model). Targets: >= 0.9x, <= 300 MB. The libraries hold
  `--seed-items` text items beforehand (10,000: past the 5,000 items up to which a library
  is searched without FAISS, so the watcher holds its FAISS index before the burst, as a
  watcher of a real photo library does); `--seed-items 0` starts them empty, and the burst
  then takes the library past 5,000 items: FAISS is imported during it (about 170 MB).
- idle: `--files` small JPEGs in folders of 1,000, already in the library (rows written
  directly, as speed_noop.py does: no model), then a watch process: its start-up (process
  start to the end of the first incremental run, notifications set up before it), and
  its CPU while nothing changes over `--idle-seconds`. Targets: <= 10 s, <= 1% of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import write_photos, write_small_images  # noqa: E402
from speed_noop import build_library  # noqa: E402
from speed_report import Figure, at_least, at_most, info, report  # noqa: E402

from clipdex.indexer import index_paths  # noqa: E402
from clipdex.search.catalog.types import NewItem  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.library import Library  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class WatchProcess:
    """`clipdex watch FOLDER --json` in a process of its own, its events read as they come."""

    def __init__(self, folder: Path, library: Path, settle: float) -> None:
        command = [sys.executable, "-m", "clipdex.cli", "watch", str(folder), "--library", str(library), "--json",
                   "--settle", str(settle), "--device", "cpu", "--runtime", "onnx"]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Each event as it comes, with `received`: the perf_counter of its arrival (a batch's
        event is printed once its commit is done)."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            event["received"] = time.perf_counter()
            self.events.put(event)

    def added_until(self, count: int, timeout: float, sample: Any = None) -> tuple[float, list[dict[str, Any]]]:
        """perf_counter of the batch event that brings the files added to `count`, and the batches;
        `sample()` is called every 0.25 s meanwhile (nothing polls the catalog: a burst's timing
        is the watcher's alone)."""
        deadline, added, batches = time.perf_counter() + timeout, 0, []
        while added < count:
            if sample is not None:
                sample()
            if time.perf_counter() > deadline:
                raise SystemExit(f"only {added} of {count} files were indexed within {timeout:.0f} s")
            try:
                event = self.events.get(timeout=0.25)
            except queue.Empty:
                continue
            if event.get("failed"):
                raise SystemExit(f"the watcher failed files: {event['failed'][:3]}")
            added += event["added"]
            batches.append(event)
        return batches[-1]["received"], batches

    def caught_up(self, timeout: float = 600) -> float:
        """Seconds from the process's start to its first incremental run's end."""
        event = self.events.get(timeout=timeout)
        if event["event"] != "catch-up":
            raise SystemExit(f"expected the catch-up first, got {event}")
        return time.perf_counter() - self.started

    def rss_mb(self) -> float:
        return self.memory()["VmRSS"]

    def memory(self) -> dict[str, float]:
        """Resident memory in MB: VmRSS, and its anonymous part (RssAnon) and file pages (RssFile:
        the model's weights, memory-mapped from its export, are file pages)."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name = line.split(":")[0]
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(line.split()[1]) / 1024
        return fields

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def exported_library(scratch: Path) -> Path:
    """An empty ViT-B-32 library whose model is exported to ONNX (a first run does it)."""
    template = scratch / "template"
    seed = write_photos(scratch / "seed", 1)[0]
    started = time.perf_counter()
    with Library.open(template, model=MODEL, create=True, device="cpu", runtime="onnx") as library:
        index_paths(library, [seed.parent])
        seed.unlink()
        index_paths(library, [seed.parent], prune_empty_roots=True)
    print(f"exported ViT-B-32 to ONNX in {time.perf_counter() - started:.0f} s", flush=True)
    return template


def committed(library: Library, paths: Sequence[str]) -> int:
    return len(library.catalog.files_at(list(paths)))


def wait_committed(reader: Library, paths: Sequence[str], timeout: float, sample: Any = None) -> float:
    """perf_counter once every path is in the catalog (polled every 10 ms; `sample()` called each time)."""
    deadline = time.perf_counter() + timeout
    while committed(reader, paths) < len(paths):
        if sample is not None:
            sample()
        if time.perf_counter() > deadline:
            raise SystemExit(f"not all of {len(paths)} files were indexed within {timeout:.0f} s")
        time.sleep(0.01)
    return time.perf_counter()


def latency(scratch: Path, template: Path, photos: int, settle: float) -> list[Figure]:
    folder, staging, library_path = scratch / "lat-watched", scratch / "lat-staging", scratch / "lat-library"
    folder.mkdir()
    shutil.copytree(template, library_path)
    sources = write_photos(staging, photos)
    watcher = WatchProcess(folder, library_path, settle)
    watcher.caught_up()
    seconds = []
    with Library.open(library_path) as reader:
        for source in sources:
            target = folder / source.name
            shutil.copyfile(source, target)
            copied = time.perf_counter()
            seconds.append(wait_committed(reader, [str(target)], 120) - copied)
            print(f"  {source.name}: searchable {seconds[-1]:.2f} s after its copy", flush=True)
    watcher.stop()
    median = statistics.median(seconds)
    return [
        at_most(f"latency: 12 MP photo copied -> searchable (median of {photos})", f"{median:.2f} s", "3 s target",
                median / 3.0, 1.0),
        info("latency: the first photo (the model loads)", f"{seconds[0]:.2f} s", f"--settle {settle:g} s",
             seconds[0] / 3.0),
    ]


def index_rate(staging: Path, library: Path, count: int) -> float:
    """Photos per second of a fresh `clipdex index` process on `staging`, start to exit."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipdex.cli", "index", str(staging), "--library", str(library),
                           "--device", "cpu", "--runtime", "onnx", "--json", "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or json.loads(done.stdout)["added"] != count:
        raise SystemExit(f"clipdex index failed: {done.stdout[-500:]} {done.stderr[-1000:]}")
    print(f"  clipdex index: {count} photos in {seconds:.1f} s ({count / seconds:.2f} img/s)", flush=True)
    return count / seconds


def seeded(template: Path, scratch: Path, items: int) -> Path:
    """A copy of `template` already holding `items` text items (random vectors: no model), so
    that a watcher of it holds the vector index (FAISS) before the burst, as a watcher of a
    library past `SMALL_LIBRARY_MAX` items does from its start (0: the empty template)."""
    if items == 0:
        return template
    library_path = scratch / "burst-template"
    shutil.copytree(template, library_path)
    rng = np.random.default_rng(3)
    with Library.open(library_path) as library, library.writer() as writer:
        for start in range(0, items, 5000):
            vectors = rng.normal(size=(min(5000, items - start), library.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            writer.commit(items=[NewItem("text", vector, text=f"note {start + row}", source="/notes.txt",
                                         source_key=str(start + row)) for row, vector in enumerate(vectors)])
    return library_path


def burst(scratch: Path, template: Path, count: int, settle: float, index_after: bool = True, seed_items: int = 0) -> list[Figure]:
    """index, watch, index again on the same files (the machine's load drifts): watch against their mean."""
    staging, folder = scratch / "burst-files", scratch / "burst-watched"
    folder.mkdir()
    photos = write_photos(staging, count)
    template = seeded(template, scratch, seed_items)
    for name in ("burst-index", "burst-index-after", "burst-watch"):
        shutil.copytree(template, scratch / name)
    before_rate = index_rate(staging, scratch / "burst-index", count)

    watcher = WatchProcess(folder, scratch / "burst-watch", settle)
    watcher.caught_up()
    targets = [str(folder / photo.name) for photo in photos]
    with Library.open(scratch / "burst-watch") as reader:
        warm_up = write_photos(scratch / "burst-warm-up", 1)[0]  # one photo first: the model loads
        os.rename(warm_up, folder / "warm-up.jpg")
        wait_committed(reader, [str(folder / "warm-up.jpg")], 600)
        time.sleep(1.0)
        while not watcher.events.empty():
            watcher.events.get()
        before = watcher.memory()
        peak = [(0.0, before)]
        dropped = time.perf_counter()
        for photo in photos:  # dropped in at once: moves within the file system
            os.rename(photo, folder / photo.name)
        finished, events = watcher.added_until(
            count, 4 * 3600, sample=lambda: peak.append((time.perf_counter() - dropped, watcher.memory())))
        if committed(reader, targets) != count:
            raise SystemExit("the watcher's events said every photo was added, the catalog does not")
    watcher.stop()
    batches = [f"{event['added']} in {event['seconds']:.0f} s" for event in events]
    watch_seconds = finished - dropped
    watch_rate = count / watch_seconds
    at, most = max(peak, key=lambda sample: sample[1]["VmRSS"])
    growth = most["VmRSS"] - before["VmRSS"]
    print(f"  clipdex watch: {count} photos in {watch_seconds:.1f} s ({watch_rate:.2f} img/s), batches: "
          f"{', '.join(batches)}; RSS {before['VmRSS']:.0f} MB before (anonymous {before['RssAnon']:.0f}, file "
          f"{before['RssFile']:.0f}), {most['VmRSS']:.0f} MB at most (anonymous {most['RssAnon']:.0f}, file "
          f"{most['RssFile']:.0f}), {at:.0f} s into the burst", flush=True)
    if index_after:
        for photo in photos:  # back, for index's second run
            os.rename(folder / photo.name, photo)
        after_rate = index_rate(staging, scratch / "burst-index-after", count)
        rate, against = (before_rate + after_rate) / 2, "clipdex index (mean of before and after)"
    else:
        rate, against = before_rate, "clipdex index (run before)"
    return [
        at_least(f"burst: watch vs index throughput ({count} x 12 MP)", f"{watch_rate:.2f} img/s",
                 f"{rate:.2f} img/s {against}", watch_rate / rate, 0.9),
        at_most("burst: watch's resident memory growth", f"{growth:.0f} MB", "300 MB", growth / 300, 1.0),
    ]


def idle(scratch: Path, files: int, seconds: float, settle: float) -> list[Figure]:
    folder = scratch / "idle-files"
    started = time.perf_counter()
    write_small_images(folder, files)
    build_library(folder, scratch / "idle-library", scratch).close()
    print(f"  {files} small files written and in the library in {time.perf_counter() - started:.0f} s", flush=True)
    watcher = WatchProcess(folder, scratch / "idle-library", settle)
    start_up = watcher.caught_up()
    time.sleep(2.0)
    cpu_before, wall_before = watcher.cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    cpu = (watcher.cpu_seconds() - cpu_before) / (time.perf_counter() - wall_before)
    rss = watcher.rss_mb()
    watcher.stop()
    print(f"  start-up {start_up:.2f} s; idle CPU {cpu * 100:.2f}% of a core over {seconds:.0f} s; RSS {rss:.0f} MB",
          flush=True)
    return [
        at_most(f"idle: start-up, {files} files watched (process start -> caught up)", f"{start_up:.2f} s", "10 s",
                start_up / 10, 1.0),
        at_most(f"idle: CPU while {files} files are watched", f"{cpu * 100:.2f}% of a core", "1%", cpu * 100, 1.0),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="latency,burst,idle")
    parser.add_argument("--photos", type=int, default=7, help="12 MP photos copied one by one (latency)")
    parser.add_argument("--burst", type=int, default=400, help="12 MP photos dropped at once (burst)")
    parser.add_argument("--files", type=int, default=100_000, help="small files watched (idle)")
    parser.add_argument("--seed-items", type=int, default=10_000,
                        help="text items in the burst's libraries beforehand: past 5,000 items a library has a FAISS "
                             "index, which the watcher then holds before the burst (0: an empty library, which the "
                             "burst takes past 5,000 items: FAISS is imported during it)")
    parser.add_argument("--no-index-after", action="store_true",
                        help="burst: compare with one index run before the watch only (a long burst on a quiet machine)")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=1.0, help="clipdex watch --settle")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-watch-") as name:
        scratch = Path(name)
        template = exported_library(scratch) if parts & {"latency", "burst"} else None
        if "latency" in parts and template is not None:
            figures += latency(scratch, template, args.photos, args.settle)
        if "burst" in parts and template is not None:
            figures += burst(scratch, template, args.burst, args.settle, not args.no_index_after, args.seed_items)
        if "idle" in parts:
            figures += idle(scratch, args.files, args.idle_seconds, args.settle)
    return 0 if report("clipdex watch (ViT-B-32, random weights, ONNX on the CPU)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
