"""The GPU speed check (run by benchmarks/gpu.sh): fp16 indexing throughput and FAISS GPU search latency.

    .venv/bin/python benchmarks/speed_gpu.py [--count 768] [--batch-size 64] [--vectors 1000000]

Needs a CUDA GPU that both torch and FAISS see, and no network (ViT-B-32 at random
weights). Measures in one run, printing the same table as the CPU benchmarks:

- fp16 indexing of COUNT 12 MP JPEGs on the GPU (`index_paths`, model loaded before,
  steady state) against the decode capacity of the same worker threads without the model
  (reading, hashing, draft decoding and preprocessing only): on a GPU the model is fast
  and decoding sets the pace, so the pipeline must keep the decoders busy;
- the same indexing against a straightforward open_clip loop on the GPU (PIL open,
  preprocess, `encode_image` in batches);
- FAISS exact search of one query over VECTORS vectors (k=10) on the GPU against the
  same search on every CPU core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from speed_data import write_photos  # noqa: E402
from speed_index import forward_throughput, indexing_throughput, straightforward_throughput  # noqa: E402
from speed_report import at_least, at_most, report  # noqa: E402

from clipdex.indexer.local import plan_threads  # noqa: E402
from clipdex.search.encoders.torch_clip import TorchClipEncoder  # noqa: E402
from clipdex.search.imaging import decode_image  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.model import ModelSpec  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")


def require_gpus() -> None:
    import faiss
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device: this benchmark needs a GPU")
    if faiss.get_num_gpus() < 1:
        raise SystemExit("FAISS sees no GPU: install faiss-gpu with a CUDA driver")


def decode_capacity(encoder: TorchClipEncoder, paths: Sequence[Path], workers: int) -> float:
    """Images per second that `workers` threads read, hash, draft-decode and preprocess, without the model."""
    import hashlib

    preprocess, draft = encoder.preprocess, 2 * encoder.image_size

    def prepare(path: Path) -> object:
        data = path.read_bytes()
        hashlib.blake2b(data, digest_size=20).hexdigest()
        return preprocess(decode_image(data, draft_size=draft).image)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(prepare, paths[:workers]))  # warm-up
        started = time.perf_counter()
        list(pool.map(prepare, paths))
        return len(paths) / (time.perf_counter() - started)


def search_latencies(count: int, dim: int = 512, queries: int = 50) -> tuple[float, float]:
    """Median seconds of one k=10 exact inner-product query over `count` vectors: (GPU, CPU)."""
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(vectors)
    resources = faiss.StandardGpuResources()  # must outlive the GPU index
    gpu = faiss.index_cpu_to_gpu(resources, 0, cpu)
    probes = rng.standard_normal((queries, dim), dtype=np.float32)

    def median(index: object) -> float:
        index.search(probes[:1], 10)  # type: ignore[attr-defined]
        times = []
        for row in range(queries):
            started = time.perf_counter()
            index.search(probes[row : row + 1], 10)  # type: ignore[attr-defined]
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return median(gpu), median(cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=768, help="12 MP JPEGs to index")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors in the FAISS search")
    args = parser.parse_args(argv)
    require_gpus()
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-gpu-") as scratch:
        folder = Path(scratch) / "photos"
        photos = write_photos(folder, args.count)
        library = Library.open(Path(scratch) / "library", model=MODEL, create=True, device="cuda")
        encoder = library.encoder.load()
        if encoder.dtype_name != "fp16":
            raise SystemExit(f"the model runs in {encoder.dtype_name} on {encoder.device}, not fp16 on the GPU")
        workers = plan_threads("cuda").decode_workers
        forward = forward_throughput(encoder, args.batch_size, repeats=20)
        decoding = decode_capacity(encoder, photos, workers)
        indexing = indexing_throughput(library, folder, args.batch_size)
        straightforward = straightforward_throughput(encoder, photos[: 4 * args.batch_size], args.batch_size)
        library.close()
    gpu_seconds, cpu_seconds = search_latencies(args.vectors)
    size = f"{args.count} x 12 MP JPEG, batch {args.batch_size}, {workers} decode threads"
    print(f"model forward alone: {forward:.0f} img/s (fp16, batch {args.batch_size})")
    figures = [
        at_least(f"G1 fp16 GPU indexing vs decode capacity ({size})", f"{indexing:.1f} img/s",
                 f"{decoding:.1f} img/s decode only", indexing / decoding, 0.8),
        at_least("G1 fp16 GPU indexing vs straightforward open_clip loop", f"{indexing:.1f} img/s",
                 f"{straightforward:.1f} img/s loop", indexing / straightforward, 2.0),
        at_most(f"G2 FAISS GPU exact search, 1 query, {args.vectors} vectors", f"{gpu_seconds * 1000:.2f} ms",
                f"{cpu_seconds * 1000:.2f} ms same on the CPU", gpu_seconds / cpu_seconds, 0.5),
    ]
    return 0 if report("GPU: fp16 indexing and FAISS search (ViT-B-32, random weights)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
