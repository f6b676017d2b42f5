"""Side by side with rclip 3.3 (a CLI photo search on onnxruntime): the everyday steps, as whole processes.

    .venv/bin/python benchmarks/peer_rclip.py [--count 200] [--new-count 100] [--rounds 3] [--repeats 3] [--keep DIR] [--no-rclip]

Installs rclip 3.3.0 from PyPI into its own virtual environment (under
~/.cache/clipdex-bench/rclip-3.3.0; skipped with a message when that cannot be done),
makes one random-weight ViT-B-32-256 (open_clip, seeded) and lays it out twice: for
rclip in its data-directory format (`RCLIP_DATADIR` with
`ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx` taking `input` and the tokenizer
vocabulary `tokenizer/bpe_simple_vocab_16e6.txt.gz`: what rclip's `model_download`
checks for and loads), and for clipdex as a checkpoint (`torch.save`, open_clip model
`ViT-B-32-256`). Both then work on the same generated 12 MP JPEGs, each command a whole
process under `/usr/bin/time` (wall time and peak RSS):

1. add one photo to an indexed 100-photo folder (`clipdex index FOLDER`; rclip re-indexes
   and answers a query in one command, `rclip -f QUERY` in the folder), median of repeats;
2. a new text query in a cold process (`clipdex search TEXT`; `rclip -n -f TEXT`), median;
3. first index of COUNT photos into a new library with an empty export cache (clipdex's
   very first export of the model on this machine included; rclip answers a query too), and
   the export's cost: that run's time less a new library's first index of the same photos
   once the export cache holds the model; then the first index of NEW_COUNT new photos into
   a new library with the export cache warm, ROUNDS rounds, clipdex and rclip taking turns
   at going first (medians, and each round's ratio);
4. steady throughput: adding COUNT/2 photos at once to the indexed folder against adding
   one (the photos it adds over one, divided by the time it adds: the fixed costs cancel),
   and, for clipdex, against the ceiling `benchmarks/speed_index.py` computes (model forward
   and decoding sharing the cores), here with the ONNX model the indexer then runs;
5. fidelity: the vectors clipdex stored through the ONNX path against open_clip's own.

Targets: (1) wall <= 0.5x rclip's and peak <= rclip's; (2) the same; (3) wall <= rclip's, and
with the export cache warm also peak <= rclip's; (4) >= 1.3x rclip's and >= 0.9x the ceiling;
(5) every cosine >= 0.999.

Every clipdex process uses an export cache of its own in the work folder
(`CLIPDEX_CACHE_DIR`), empty at the start: never the user's. `--no-rclip` leaves rclip out
(nothing is installed; for a quick check of the script, offline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import photo_jpeg, with_comment  # noqa: E402
from speed_report import Figure, at_least, at_most, info, report  # noqa: E402

RCLIP_VERSION = "3.3.0"
RCLIP_MODEL_FOLDER = "ViT-B-32-256-datacomp_s34b_b86k"
MODEL_NAME = "ViT-B-32-256"
CLIPDEX = [sys.executable, "-m", "clipdex.cli"]
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipdex-bench" / f"rclip-{RCLIP_VERSION}"


@dataclass
class Run:
    seconds: float
    peak_mib: float
    output: str


def timed(command: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run a whole process under /usr/bin/time: its wall time and peak resident memory.

    Written data still waiting to go to disk (an earlier step's library, the photos just
    made) is flushed first, so that its writeback does not land in this step's time."""
    os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        started = time.perf_counter()
        result = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%M", *command], cwd=cwd,
                                env={**os.environ, **(env or {})}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak_kib = int(stats.read().strip().splitlines()[-1])
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return Run(seconds, peak_kib / 1024, result.stdout + result.stderr)


def install_rclip() -> Path | None:
    """rclip's console script in its own virtual environment, or None (with the reason printed)."""
    script = VENV / "bin" / "rclip"
    if script.exists():
        return script
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"rclip=={RCLIP_VERSION}"], check=True,
                       capture_output=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        print(f"rclip {RCLIP_VERSION} could not be installed from PyPI into {VENV} ({error}; "
              f"{detail.decode(errors='replace')[-300:].strip()}): skipping the side-by-side comparison")
        shutil.rmtree(VENV, ignore_errors=True)
        return None
    return script if script.exists() else None


def make_model(folder: Path, for_rclip: bool = True) -> tuple[Path, Path]:
    """One random-weight ViT-B-32-256: a checkpoint for clipdex, rclip's data directory for rclip
    (`for_rclip`; else the folder is made empty)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(MODEL_NAME, pretrained=None).eval()
    checkpoint = folder / "vit-b-32-256-random.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    datadir = folder / "rclip-data"
    target = datadir / RCLIP_MODEL_FOLDER
    target.mkdir(parents=True)
    if not for_rclip:
        return checkpoint, datadir
    (datadir / "tokenizer").mkdir()
    shutil.copyfile(open_clip.tokenizer.default_bpe(), datadir / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz")

    class Tower(torch.nn.Module):
        def __init__(self, method: str) -> None:
            super().__init__()
            self.model, self.method = model, method

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return getattr(self.model, self.method)(inputs)

    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no ONNX form
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tower, sample, name in ((Tower("encode_image"), torch.zeros(2, 3, 256, 256), "visual.onnx"),
                                    (Tower("encode_text"), open_clip.tokenize(["a", "b"]), "textual.onnx")):
            torch.onnx.export(tower.eval(), (sample,), str(target / name), dynamo=False, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              opset_version=17)
    return checkpoint, datadir


def write_photos(folder: Path, numbers: range, renderings: list[bytes]) -> list[Path]:
    """12 MP JPEGs, each with bytes of its own (a comment naming folder and number): nothing is reused."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in numbers:
        path = folder / f"photo{number:05d}.jpg"
        path.write_bytes(with_comment(renderings[number % len(renderings)], f"peer benchmark {folder.name} {number}"))
        paths.append(path)
    return paths


class Clipdex:
    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint

    def first_index(self, folder: Path, library: Path) -> Run:
        return timed([*CLIPDEX, "index", str(folder), "--library", str(library), "--model", MODEL_NAME,
                      "--pretrained", str(self.checkpoint), "--quiet"])

    def add(self, folder: Path, library: Path) -> Run:
        return timed([*CLIPDEX, "index", str(folder), "--library", str(library), "--quiet"])

    def query(self, text: str, library: Path) -> Run:
        return timed([*CLIPDEX, "search", text, "--library", str(library), "-k", "10", "--format", "paths"])


class Rclip:
    def __init__(self, script: Path, datadir: Path, scratch: Path) -> None:
        self.script = script
        self.model_folder = datadir
        self.scratch = scratch

    def datadir(self, name: str) -> Path:
        """A data directory of its own (its own database) with the shared model files linked in."""
        folder = self.scratch / f"rclip-{name}"
        if not folder.exists():
            folder.mkdir()
            for item in (RCLIP_MODEL_FOLDER, "tokenizer"):
                (folder / item).symlink_to(self.model_folder / item)
        return folder

    def run(self, arguments: Sequence[str], folder: Path, name: str) -> Run:
        return timed([str(self.script), *arguments], cwd=folder, env={"RCLIP_DATADIR": str(self.datadir(name)),
                                                                      "HF_HUB_OFFLINE": "1"})

    def first_index(self, folder: Path, name: str) -> Run:
        return self.run(["-f", "-t", "1", "a photo"], folder, name)

    def add(self, folder: Path, name: str) -> Run:
        return self.run(["-f", "-t", "1", "a photo"], folder, name)

    def query(self, text: str, folder: Path, name: str) -> Run:
        return self.run(["-n", "-f", "-t", "10", text], folder, name)


def median_run(runs: list[Run]) -> Run:
    return Run(statistics.median(r.seconds for r in runs), statistics.median(r.peak_mib for r in runs), "")


def onnx_ceiling(library_path: Path, folder: Path, batch_size: int = 32) -> tuple[float, str]:
    """speed_index.py's ceiling with the model the indexer runs here: cores / (forward + decode CPU per image)."""
    import numpy as np
    from speed_index import prepare_cpu_seconds

    from clipdex.indexer.local import plan_threads
    from clipdex.search.cores import available_cores
    from clipdex.search.library import Library

    library = Library.open(library_path, device="cpu")
    encoder = library.encoder
    cores = available_cores()
    plan = plan_threads("cpu")
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, encoder.image_size, encoder.image_size)).astype(np.float32)
    best = 0.0
    encoder.expect_images(1 << 20)  # the session a long index run gets: prepacked weights from the start
    for threads, lanes in {(cores, 1), (plan.model_threads or cores, plan.model_lanes)}:
        import threading

        encoder.set_threads(threads)
        encoder.encode_prepared(batch)  # warm-up (and the session)

        def lane() -> None:
            for _ in range(3):
                encoder.encode_prepared(batch)

        started = time.perf_counter()
        workers = [threading.Thread(target=lane) for _ in range(lanes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, 3 * lanes * batch_size / (time.perf_counter() - started))
    decode_cpu = prepare_cpu_seconds(library, folder)
    library.close()
    forward_cpu = cores / best
    return cores / (forward_cpu + decode_cpu), f"{forward_cpu * 1000:.0f} + {decode_cpu * 1000:.0f} ms CPU/img"


def fidelity(library_path: Path, checkpoint: Path, sample: int) -> float:
    """The lowest cosine between the last `sample` vectors clipdex stored and open_clip's on the same files."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image, ImageOps

    from clipdex.search.library import Library

    library = Library.open(library_path, device="cpu")
    ids, _ = library.catalog.all_vectors()
    items = library.catalog.get_items(ids[-sample:].tolist())
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(checkpoint))
    model.eval()
    worst = 1.0
    for item in items.values():
        image = ImageOps.exif_transpose(Image.open(item.path)).convert("RGB")
        with torch.no_grad():
            reference = model.encode_image(preprocess(image)[None], normalize=True)[0].numpy()
        worst = min(worst, float(np.dot(item.vector_array(), reference)))
    library.close()
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="photos of the first index with an empty export cache")
    parser.add_argument("--new-count", type=int, default=100, help="photos of the first index with the export cache warm")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the first index with the cache warm (median)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each everyday step (median)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--no-rclip", action="store_true", help="clipdex alone: rclip is neither installed nor run")
    args = parser.parse_args(argv)
    rclip_script = None if args.no_rclip else install_rclip()
    with tempfile.TemporaryDirectory(prefix="clipdex-peer-") as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        return compare(scratch, rclip_script, args.count, args.repeats, args.new_count, args.rounds)


def compare(scratch: Path, rclip_script: Path | None, count: int, repeats: int, new_count: int = 100, rounds: int = 3) -> int:
    export_cache = scratch / "clipdex-cache"  # clipdex's export cache: this run's own, empty at the start
    shutil.rmtree(export_cache, ignore_errors=True)
    os.environ["CLIPDEX_CACHE_DIR"] = str(export_cache)
    print(f"making the model and {count + new_count + repeats} 12 MP photos in {scratch}...", flush=True)
    checkpoint, datadir = make_model(scratch, for_rclip=rclip_script is not None)
    renderings = [photo_jpeg(seed) for seed in range(8)]
    full, half, new = scratch / "full", scratch / "half", scratch / "new"
    write_photos(full, range(count), renderings)
    write_photos(half, range(count // 2), renderings)
    write_photos(new, range(new_count), renderings)
    clipdex = Clipdex(checkpoint)
    rclip = Rclip(rclip_script, datadir, scratch) if rclip_script else None

    results: dict[str, dict[str, Run]] = {"clipdex": {}, "rclip": {}}
    print(f"first index of {count} photos with an empty export cache...", flush=True)
    results["clipdex"]["first"] = clipdex.first_index(full, scratch / "lib-full")
    if rclip:
        results["rclip"]["first"] = rclip.first_index(full, "full")
    print(f"the same {count} photos into a new library, export cache warm...", flush=True)
    results["clipdex"]["first-warm"] = clipdex.first_index(full, scratch / "lib-full-warm")
    print(f"first index of {new_count} new photos, export cache warm, {rounds} interleaved rounds...", flush=True)
    warm_rounds: dict[str, list[Run]] = {"clipdex": [], "rclip": []}
    for round_number in range(rounds):
        turns = ["clipdex", "rclip"] if round_number % 2 == 0 else ["rclip", "clipdex"]
        for tool in turns:
            if tool == "clipdex":
                warm_rounds[tool].append(clipdex.first_index(new, scratch / f"lib-new-{round_number}"))
            elif rclip:
                warm_rounds[tool].append(rclip.first_index(new, f"new-{round_number}"))
    for tool, runs in warm_rounds.items():
        if runs:
            results[tool]["new"] = median_run(runs)
    print(f"first index of {count // 2} photos (the folder photos are then added to)...", flush=True)
    results["clipdex"]["half"] = clipdex.first_index(half, scratch / "lib-half")
    if rclip:
        results["rclip"]["half"] = rclip.first_index(half, "half")
    adds: dict[str, list[Run]] = {"clipdex": [], "rclip": []}
    queries: dict[str, list[Run]] = {"clipdex": [], "rclip": []}
    for repeat in range(repeats):
        print(f"add one photo, new query ({repeat + 1}/{repeats})...", flush=True)
        new = write_photos(half, range(count + repeat, count + repeat + 1), renderings)[0]
        adds["clipdex"].append(clipdex.add(half, scratch / "lib-half"))
        queries["clipdex"].append(clipdex.query(f"a new question number {repeat} {time.time()}", scratch / "lib-half"))
        if rclip:
            adds["rclip"].append(rclip.add(half, "half"))
            queries["rclip"].append(rclip.query(f"a new question number {repeat} {time.time()}", half, "half"))
        assert new.exists()
    for tool in results:
        if adds[tool]:
            results[tool]["add"] = median_run(adds[tool])
            results[tool]["query"] = median_run(queries[tool])
    print(f"add {count // 2} photos at once...", flush=True)
    write_photos(half, range(count + repeats, count + repeats + count // 2), renderings)
    results["clipdex"]["bulk"] = clipdex.add(half, scratch / "lib-half")
    if rclip:
        results["rclip"]["bulk"] = rclip.add(half, "half")
    ceiling, ceiling_detail = onnx_ceiling(scratch / "lib-half", full)
    worst = fidelity(scratch / "lib-half", checkpoint, repeats)  # the photos added on the exported model
    stats = subprocess.run([*CLIPDEX, "stats", "--library", str(scratch / "lib-half"), "--json"], capture_output=True, text=True)
    runtime = json.loads(stats.stdout).get("runtime", "?") if stats.returncode == 0 else "?"
    print(f"clipdex runtime on the indexed library: {runtime}")
    figures = figures_of(results, count, ceiling, ceiling_detail, worst, new_count, warm_rounds)
    return 0 if report(f"clipdex vs rclip {RCLIP_VERSION} (ViT-B-32-256, random weights, whole processes)", figures) else 1


def figures_of(results: dict[str, dict[str, Run]], count: int, ceiling: float, ceiling_detail: str, worst: float,
               new_count: int = 100, warm_rounds: dict[str, list[Run]] | None = None) -> list[Figure]:
    ours, theirs = results["clipdex"], results["rclip"]
    bulk = count // 2
    our_rate = (bulk - 1) / max(1e-9, ours["bulk"].seconds - ours["add"].seconds)
    figures: list[Figure] = []

    def both(step: str, label: str, wall_goal: float | None, memory: bool) -> None:
        mine = ours[step]
        if step not in theirs:
            figures.append(info(f"{label}: wall", f"{mine.seconds:.2f} s", "rclip not run", 1.0))
            figures.append(info(f"{label}: peak memory", f"{mine.peak_mib:.0f} MiB", "rclip not run", 1.0))
            return
        other = theirs[step]
        if wall_goal is not None:
            figures.append(at_most(f"{label}: wall", f"{mine.seconds:.2f} s", f"{other.seconds:.2f} s rclip",
                                   mine.seconds / other.seconds, wall_goal))
        figures.append((at_most if memory else info)(f"{label}: peak memory", f"{mine.peak_mib:.0f} MiB",
                                                     f"{other.peak_mib:.0f} MiB rclip", mine.peak_mib / other.peak_mib,
                                                     *([1.0] if memory else [])))

    both("add", "1 add one photo to an indexed folder", 0.5, True)
    both("query", "2 cold new text query", 0.5, True)
    both("first", f"3 first index of {count} 12 MP photos, empty export cache (the very first export)", 1.0, False)
    cold, warm = ours["first"], ours["first-warm"]
    figures.append(info("3 the very first export's cost: that run less the same photos' with the cache warm",
                        f"{cold.seconds - warm.seconds:.2f} s, {cold.peak_mib:.0f} MiB peak",
                        f"{warm.seconds:.2f} s, {warm.peak_mib:.0f} MiB peak warm", cold.seconds / warm.seconds))
    rounds = warm_rounds or {"clipdex": [], "rclip": []}
    both("new", f"3 first index of {new_count} new 12 MP photos, export cache warm (median of {len(rounds['clipdex'])})",
         1.0, True)
    for number, mine in enumerate(rounds["clipdex"]):
        other = rounds["rclip"][number] if number < len(rounds["rclip"]) else None
        figures.append(info(f"3   round {number + 1} ({'clipdex' if number % 2 == 0 else 'rclip'} first)", f"{mine.seconds:.2f} s",
                            f"{other.seconds:.2f} s rclip" if other else "rclip not run",
                            mine.seconds / other.seconds if other else 1.0))
    if "bulk" in theirs:
        their_rate = (bulk - 1) / max(1e-9, theirs["bulk"].seconds - theirs["add"].seconds)
        figures.append(at_least("4 steady throughput", f"{our_rate:.2f} photos/s", f"{their_rate:.2f} photos/s rclip",
                                our_rate / their_rate, 1.3))
    figures.append(at_least("4 steady throughput vs the ceiling", f"{our_rate:.2f} photos/s",
                            f"{ceiling:.2f} photos/s ({ceiling_detail})", our_rate / ceiling, 0.9))
    figures.append(at_least("5 stored vectors vs open_clip (ONNX path)", f"cosine >= {worst:.5f}", "open_clip encode_image",
                            worst / 0.999, 1.0))
    return figures


if __name__ == "__main__":
    sys.exit(main())
