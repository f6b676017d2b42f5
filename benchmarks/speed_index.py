"""Target 1: indexing 12-megapixel JPEGs close to the model's own speed.

    .venv/bin/python benchmarks/speed_index.py [--count 512] [--batch-size 32] [--plan DxLxT]

Writes COUNT photo-like 12 MP JPEGs (about 3.7 MB each) to a temporary folder and, with
ViT-B-32 at random weights on the CPU (the compute of the pretrained model), measures
in one run:

- the model's own forward throughput on ready tensors (`TorchClipEncoder.encode_tensors`, the
  call the indexer makes) at the batch size, in its best arrangement: one forward on all
  cores, or the indexer's lanes (several batches at once on few threads each), whichever
  is faster; measured before and after the rest, averaged;
- clipdex's steady-state indexing throughput (`index_paths`, model loaded beforehand,
  over the middle half of the run, timed by the commits of its batches);
- a straightforward open_clip loop: open each file with PIL, open_clip's preprocess,
  `encode_image` in batches.

Targets: indexing >= 0.8x the forward throughput and >= 2x the straightforward loop.

Also printed, to explain the first ratio: the ceiling that decoding and the model
sharing the same cores puts on indexing (from the CPU time per image of each: the
indexer's read/hash/decode/preprocess step timed on one thread, and the forward's
cores / throughput), and how close indexing came to it.

`--plan DxLxT` runs the indexer with another thread plan (D decode threads, L model
lanes of T torch threads each), to compare arrangements.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import write_photos  # noqa: E402
from speed_report import at_least, info, report  # noqa: E402

from clipdex.indexer import index_paths  # noqa: E402
from clipdex.search.cores import available_cores  # noqa: E402
from clipdex.search.encoders.torch_clip import TorchClipEncoder  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")


def forward_throughput(encoder: TorchClipEncoder, batch_size: int, lanes: int = 1, repeats: int = 3) -> float:
    """Images per second of `encode_tensors` on ready batches, `lanes` threads each running its own batch."""
    import torch

    batch = torch.randn(batch_size, 3, encoder.image_size, encoder.image_size)

    def run(count: int) -> None:
        for _ in range(count):
            encoder.encode_tensors(batch)

    def all_lanes(count: int) -> None:
        threads = [threading.Thread(target=run, args=(count,)) for _ in range(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    all_lanes(1)  # warm-up
    started = time.perf_counter()
    all_lanes(repeats)
    return lanes * repeats * batch_size / (time.perf_counter() - started)


def best_forward_throughput(encoder: TorchClipEncoder, batch_size: int) -> tuple[float, str]:
    """The model's forward throughput in its best arrangement, and that arrangement.

    Arrangements: one forward on all cores (torch's default), and the lanes the indexer
    runs (`plan_threads`: several batches at once, each on few threads).
    """
    from clipdex.indexer.local import plan_threads

    plan = plan_threads("cpu")
    arrangements = {(available_cores(), 1), (plan.model_threads or available_cores(), plan.model_lanes)}
    before = encoder.threads
    best = (0.0, "")
    for threads, lanes in sorted(arrangements, reverse=True):
        encoder.set_threads(threads)
        label = f"{threads} threads" if lanes == 1 else f"{lanes} lanes x {threads} thread{'s' * (threads > 1)}"
        best = max(best, (forward_throughput(encoder, batch_size, lanes), label))
    encoder.set_threads(before)
    return best


def indexing_throughput(library: Library, folder: Path, batch_size: int) -> float:
    """Steady-state images per second of `index_paths`, from the commit times of its batches.

    The window is the middle half of the run: it leaves out the start (the first batches
    wait for decoding alone) and the end (once decoding is done, the last batches have
    the cores to themselves). It starts and ends on commits that complete a round of the
    model's lanes, so it spans whole rounds however the lanes interleave.
    """
    import clipdex.indexer.local as local

    commit = local._commit
    marks: list[tuple[int, float]] = []

    def timed_commit(*args: Any) -> Any:
        result = commit(*args)
        marks.append((len(args[2]), time.perf_counter()))  # args[2]: the batch
        return result

    local._commit = timed_commit
    try:
        report = index_paths(library, [folder], batch_size=batch_size, export_text=False)
    finally:
        local._commit = commit
    if report.failed:
        raise SystemExit(f"indexing failed on {report.failed[0].path}: {report.failed[0].error}")
    lanes = local.plan_threads(library.encoders.requested_device).model_lanes
    rounds = len(marks) // lanes
    if rounds < 4:
        raise SystemExit(f"too few batches for a steady state: use --count of at least {4 * lanes * batch_size}")
    first = lanes * (rounds // 4) - 1  # the commit ending the first quarter's last round
    last = first + lanes * max(1, rounds // 2)
    return sum(count for count, _ in marks[first + 1 : last + 1]) / (marks[last][1] - marks[first][1])


def prepare_cpu_seconds(library: Library, folder: Path, sample: int = 16) -> float:
    """CPU seconds per file of the indexer's own read, hash, decode and preprocess step, on one thread."""
    from clipdex.indexer.rules import _HashLookup, _Job, _prepare
    from clipdex.indexer.scan import scan

    jobs = [_Job(file, None) for file in scan([folder]).files[:sample]]
    lookup = _HashLookup(library, {})
    _prepare(jobs[0], library.encoder, lookup)  # warm-up
    started = time.thread_time()
    for job in jobs:
        if _prepare(job, library.encoder, lookup).pixels is None:
            raise SystemExit(f"{job.file.path} was not decoded")
    return (time.thread_time() - started) / len(jobs)


def straightforward_throughput(encoder: TorchClipEncoder, paths: Sequence[Path], batch_size: int) -> float:
    """Images per second of the plain loop: PIL open, open_clip preprocess, encode_image per batch."""
    import torch
    from PIL import Image

    model, preprocess = encoder.model, encoder.preprocess
    dtype = next(model.parameters()).dtype
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in paths[start : start + batch_size]])
        with torch.no_grad():
            model.encode_image(batch.to(encoder.device, dtype=dtype), normalize=True).cpu()
    return len(paths) / (time.perf_counter() - started)


def force_plan(text: str) -> None:
    """Make the indexer use the thread plan DxLxT, to compare arrangements."""
    import clipdex.indexer.local as local

    try:
        decode, lanes, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--plan {text!r}: expected DxLxT, for example 2x2x1") from None
    plan = local.ThreadPlan(decode, threads, lanes)
    local.plan_threads = lambda device, workers=None: plan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=512, help="12 MP JPEGs to index")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plan", metavar="DxLxT", help="force the indexer's thread plan: D decode threads, "
                        "L model lanes of T torch threads each (default: the indexer's own plan)")
    args = parser.parse_args(argv)
    if args.plan:
        force_plan(args.plan)
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-index-") as scratch:
        folder = Path(scratch) / "photos"
        photos = write_photos(folder, args.count)
        library = Library.open(Path(scratch) / "library", model=MODEL, create=True, device="cpu")
        encoder = library.encoder.load()  # loading the model is not part of any figure
        before, arrangement = best_forward_throughput(encoder, args.batch_size)
        decode_cpu = prepare_cpu_seconds(library, folder)  # before indexing: nothing can be reused yet
        indexing = indexing_throughput(library, folder, args.batch_size)
        straightforward = straightforward_throughput(encoder, photos[: 2 * args.batch_size], args.batch_size)
        after, arrangement_after = best_forward_throughput(encoder, args.batch_size)  # before and after: load drifts
        forward = (before + after) / 2
        library.close()
    cores = available_cores()
    forward_cpu = cores / forward
    ceiling = cores / (forward_cpu + decode_cpu)
    size = f"{args.count} x 12 MP JPEG, batch {args.batch_size}"
    arrangement = arrangement if arrangement == arrangement_after else f"{arrangement} / {arrangement_after}"
    figures = [
        at_least(f"1 indexing vs model forward ({size})", f"{indexing:.2f} img/s",
                 f"{forward:.2f} img/s forward ({arrangement})", indexing / forward, 0.8),
        # Both on the same cores: per image, the forward's CPU time (cores / forward throughput,
        # every core busy) plus the decode step's; indexing cannot beat cores / that sum.
        info("1 ceiling: forward + decode CPU on the same cores", f"{ceiling:.2f} img/s",
             f"{forward_cpu * 1000:.0f} + {decode_cpu * 1000:.0f} ms CPU/img, {cores} cores", ceiling / forward),
        info("1 indexing vs that ceiling", f"{indexing:.2f} img/s", f"{ceiling:.2f} img/s ceiling", indexing / ceiling),
        at_least("1 indexing vs straightforward open_clip loop", f"{indexing:.2f} img/s", f"{straightforward:.2f} img/s loop",
                 indexing / straightforward, 2.0),
    ]
    return 0 if report("Indexing throughput (ViT-B-32, random weights, CPU)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
