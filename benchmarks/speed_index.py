"""Target 1: indexing 12-megapixel JPEGs close to the model's own speed.

    .venv/bin/python benchmarks/speed_index.py [--count 160] [--batch-size 32]

Writes COUNT photo-like 12 MP JPEGs (about 3.7 MB each) to a temporary folder and, with
ViT-B-32 at random weights on the CPU (the compute of the pretrained model), measures
in one run:

- the model's own forward throughput on ready tensors (`Encoder.encode_tensors`, the
  call the indexer makes) at the batch size, at its best thread count: all cores, or the
  share of them the indexer gives the model (whichever is faster; measured before and
  after the rest, averaged);
- clipdex's steady-state indexing throughput (`index_paths`, model loaded beforehand,
  from the first committed batch to the last);
- a straightforward open_clip loop: open each file with PIL, open_clip's preprocess,
  `encode_image` in batches.

Targets: indexing >= 0.8x the forward throughput and >= 2x the straightforward loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import write_photos  # noqa: E402
from speed_report import at_least, report  # noqa: E402

from indexer import index_paths  # noqa: E402
from search.encoder import Encoder  # noqa: E402
from search.library import Library  # noqa: E402
from search.model import ModelSpec  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")


def forward_throughput(encoder: Encoder, batch_size: int, repeats: int = 3) -> float:
    """Images per second of `encode_tensors` on a ready batch (after one warm-up batch)."""
    import torch

    batch = torch.randn(batch_size, 3, encoder.image_size, encoder.image_size)
    encoder.encode_tensors(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        encoder.encode_tensors(batch)
    return repeats * batch_size / (time.perf_counter() - started)


def best_forward_throughput(encoder: Encoder, batch_size: int) -> tuple[float, int]:
    """The model's forward throughput at its best thread count (all cores, or the indexer's share), and that count."""
    from indexer.pipeline import plan_threads
    from search.encoder import available_cores

    before = encoder.threads
    best = (0.0, 0)
    for threads in sorted({available_cores(), plan_threads("cpu").model_threads or available_cores()}, reverse=True):
        encoder.set_threads(threads)
        best = max(best, (forward_throughput(encoder, batch_size), threads))
    encoder.set_threads(before)
    return best


def indexing_throughput(library: Library, folder: Path, batch_size: int) -> float:
    """Steady-state images per second of `index_paths`: from the first committed batch to the end."""
    marks: list[tuple[int, float]] = []

    def progress(done: int, total: int) -> None:
        if done % batch_size == 0 or done == total:
            marks.append((done, time.perf_counter()))

    report = index_paths(library, [folder], batch_size=batch_size, progress=progress, export_text=False)
    if report.failed:
        raise SystemExit(f"indexing failed on {report.failed[0].path}: {report.failed[0].error}")
    (first_done, first_time), (last_done, last_time) = marks[0], marks[-1]
    return (last_done - first_done) / (last_time - first_time)


def straightforward_throughput(encoder: Encoder, paths: Sequence[Path], batch_size: int) -> float:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=160, help="12 MP JPEGs to index")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-index-") as scratch:
        folder = Path(scratch) / "photos"
        photos = write_photos(folder, args.count)
        library = Library.open(Path(scratch) / "library", model=MODEL, create=True, device="cpu")
        encoder = library.encoder.load()  # loading the model is not part of any figure
        before, threads = best_forward_throughput(encoder, args.batch_size)
        indexing = indexing_throughput(library, folder, args.batch_size)
        straightforward = straightforward_throughput(encoder, photos[: 2 * args.batch_size], args.batch_size)
        after, threads_after = best_forward_throughput(encoder, args.batch_size)  # before and after: load drifts
        forward = (before + after) / 2
        library.close()
    size = f"{args.count} x 12 MP JPEG, batch {args.batch_size}"
    threads_used = f"{threads}" if threads == threads_after else f"{threads}/{threads_after}"
    figures = [
        at_least(f"1 indexing vs model forward ({size})", f"{indexing:.2f} img/s",
                 f"{forward:.2f} img/s forward ({threads_used} threads)", indexing / forward, 0.8),
        at_least("1 indexing vs straightforward open_clip loop", f"{indexing:.2f} img/s", f"{straightforward:.2f} img/s loop",
                 indexing / straightforward, 2.0),
    ]
    return 0 if report("Indexing throughput (ViT-B-32, random weights, CPU)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
