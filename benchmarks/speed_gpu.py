"""The GPU speed check (run by benchmarks/gpu.sh): does ingestion keep the GPU busy, and FAISS on the GPU.

    .venv/bin/python benchmarks/speed_gpu.py [--photos 512] [--small 4096] [--batch-size 256] [--vectors 1000000]
    .venv/bin/python benchmarks/speed_gpu.py --dry-run     # on the CPU, tiny sizes: every code path, in seconds

Needs a CUDA GPU that both torch and FAISS see, and no network (ViT-B-32 at random
weights: the compute of the pretrained model; every image and vector is generated).
Prints, in one table:

- the model alone: fp16 forward images/s on batches already on the GPU;
- ingestion images/s of 512-px JPEGs and of 12 MP JPEGs, two ways, each with reader
  threads on every core that read and hash the files (as the indexer does):
  GPU decode (`clipdex.search.media.gpu_decode.GpuFeeder`: headers read and bytes pinned on the
  reader threads, nvJPEG in batches, resize/crop/normalize as tensors, decode and model on
  two CUDA streams, vectors copied back asynchronously) against CPU decode on all cores
  (Pillow's draft decoding and open_clip's transform on every core, the model on the GPU:
  what the indexer does on CUDA today). Neither writes to a catalog; `index_paths` itself,
  with its catalog commits, is printed for the 12 MP photos as it runs today;
- that the two decodings agree: the GPU path's vectors at cosine >= 0.999 of the CPU
  path's on a sample, and a PNG and a CMYK JPEG sent back to the CPU path;
- FAISS search on the GPU over VECTORS CLIP-like vectors: exact (flat) and IVF, queries/s
  for batches of queries (k=10), IVF recall@10 against the exact results, and the exact
  search on every CPU core for comparison;
- the GPU memory peak: torch's allocator during ingestion, and the device's memory in
  use at the FAISS peak.

`--dry-run` runs the same code on the CPU at tiny sizes (a tiny model, small photos,
10,000 vectors, the feeder on "cpu" without streams or pinned memory), so that the script
is known to work before a GPU is lent; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from ann import clip_like_vectors  # noqa: E402
from speed_data import photo_jpeg, write_photos  # noqa: E402
from speed_report import Figure, at_least, info, report  # noqa: E402

from clipdex.indexer import index_paths  # noqa: E402
from clipdex.search.cores import available_cores  # noqa: E402
from clipdex.search.encoders.torch_clip import TorchClipEncoder as Encoder  # noqa: E402
from clipdex.search.media.gpu_decode import EncodedImage, GpuFeeder, TensorTransform, encoded_image  # noqa: E402
from clipdex.search.media.imaging import decode_image  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")
# the dry run's model: the tests' tiny open_clip config, random weights
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Sizes:
    photo: tuple[int, int]  # the "12 MP" photos
    photos: int
    small: tuple[int, int]  # the "512-px" JPEGs
    smalls: int
    batch_size: int
    vectors: int
    queries: int
    nlist: int
    nprobes: tuple[int, ...]
    forward_repeats: int


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.dry_run:
        return Sizes((320, 240), 12, (96, 72), 16, 4, 10_000, 50, 32, (4,), 2)
    return Sizes((4000, 3000), args.photos, (512, 384), args.small, args.batch_size, args.vectors,
                 args.queries, args.nlist, (16, 64), 20)


# -- data ----------------------------------------------------------------------------


def write_jpegs(folder: Path, count: int, size: tuple[int, int], distinct: int = 8) -> list[Path]:
    """`count` JPEG files of `size`, from `distinct` renderings, each file with its own bytes."""
    return write_photos(folder, count, distinct, size)


def odd_files(folder: Path) -> list[Path]:
    """A PNG and a CMYK JPEG: the tensor path must send both back to the CPU path."""
    from PIL import Image

    image = Image.open(io.BytesIO(photo_jpeg(99, (160, 120)))).convert("RGB")
    png, cmyk = folder / "odd.png", folder / "odd-cmyk.jpg"
    image.save(png)
    image.convert("CMYK").save(cmyk, "JPEG")
    return [png, cmyk]


# -- the model -------------------------------------------------------------------------


def load_encoder(dry_run: bool, scratch: Path) -> tuple[Encoder, ModelSpec]:
    if not dry_run:
        return Encoder(MODEL.resolve(), device="cuda").load(), MODEL
    import open_clip
    import torch

    config = scratch / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    checkpoint = scratch / "tiny-clip.pt"
    torch.save({"state_dict": open_clip.create_model("tiny-clip", pretrained=None).state_dict()}, checkpoint)
    spec = ModelSpec(str(config), str(checkpoint))
    return Encoder(spec.resolve(), device="cpu").load(), spec


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def forward_only(encoder: Encoder, batch_size: int, repeats: int) -> float:
    """Images per second of the model's forward on batches already on its device, in its dtype."""
    import torch

    model = encoder.model
    dtype = next(model.parameters()).dtype
    batch = torch.randn(batch_size, 3, encoder.image_size, encoder.image_size, device=encoder.device).to(dtype)
    with torch.inference_mode():
        model.encode_image(batch, normalize=True)  # warm-up
        synchronize(encoder.device)
        started = time.perf_counter()
        for _ in range(repeats):
            model.encode_image(batch, normalize=True)
        synchronize(encoder.device)
    return repeats * batch_size / (time.perf_counter() - started)


# -- ingestion ---------------------------------------------------------------------------


def ordered_map(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Sequence[T], ahead: int) -> Iterator[R]:
    """`pool.map` with at most `ahead` items in flight, so that memory does not grow with the input."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_and_hash(path: Path) -> bytes:
    data = path.read_bytes()
    hashlib.blake2b(data, digest_size=20).hexdigest()  # the indexer hashes every file it reads
    return data


@dataclass
class Ingested:
    rate: float  # images per second
    vectors: dict[Path, np.ndarray]
    fallbacks: dict[Path, str]


def ingest_gpu_decode(feeder: GpuFeeder, paths: Sequence[Path], batch_size: int, readers: int) -> Ingested:
    """Reader threads read, hash, read headers and pin; the feeder decodes and embeds on the device."""

    def read(path: Path) -> EncodedImage:
        return encoded_image(read_and_hash(path))

    vectors: dict[Path, np.ndarray] = {}
    fallbacks: dict[Path, str] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="reader") as pool:
        images = ordered_map(pool, read, paths, 2 * batch_size + 2 * readers)
        for number, embedded in enumerate(feeder.embed_batches(batched(images, batch_size))):
            chunk = paths[number * batch_size : (number + 1) * batch_size]
            vectors.update({chunk[index]: vector for index, vector in embedded.vectors.items()})
            fallbacks.update({chunk[index]: reason for index, reason in embedded.fallbacks.items()})
    return Ingested(len(paths) / (time.perf_counter() - started), vectors, fallbacks)


def ingest_cpu_decode(encoder: Encoder, paths: Sequence[Path], batch_size: int, workers: int) -> Ingested:
    """Worker threads read, hash, draft-decode and preprocess; the model embeds each batch on its device."""
    import torch

    preprocess, draft = encoder.preprocess, 2 * encoder.image_size

    def prepare(path: Path) -> Any:
        return preprocess(decode_image(read_and_hash(path), draft_size=draft).image)

    vectors: dict[Path, np.ndarray] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decoder") as pool:
        tensors = ordered_map(pool, prepare, paths, batch_size + 2 * workers)
        for number, batch in enumerate(batched(tensors, batch_size)):
            encoded = encoder.encode_tensors(torch.stack(batch))
            vectors.update(zip(paths[number * batch_size : (number + 1) * batch_size], encoded))
    return Ingested(len(paths) / (time.perf_counter() - started), vectors, {})


def index_rate(spec: ModelSpec, device: str, folder: Path, library_path: Path, batch_size: int, count: int) -> float:
    """Images per second of `index_paths` over the folder, model loaded beforehand (catalog commits included)."""
    library = Library.open(library_path, model=spec, create=True, device=device)
    try:
        library.encoder.load()
        started = time.perf_counter()
        indexed = index_paths(library, [folder], batch_size=batch_size, export_text=False)
        seconds = time.perf_counter() - started
    finally:
        library.close()
    if indexed.failed:
        raise SystemExit(f"indexing failed on {indexed.failed[0].path}: {indexed.failed[0].error}")
    return count / seconds


# -- FAISS -------------------------------------------------------------------------------


@dataclass
class SearchFigures:
    flat_qps: float
    cpu_flat_qps: float
    ivf: list[tuple[int, float, float]]  # (nprobe, queries/s, recall@10)
    memory_in_use: int  # bytes of device memory in use at the peak, 0 on the CPU


def faiss_search(sizes: Sizes, gpu: bool) -> SearchFigures:
    import faiss

    data = clip_like_vectors(sizes.vectors + sizes.queries, 512, seed=0)
    database, queries = data[: sizes.vectors], np.ascontiguousarray(data[sizes.vectors :])
    k = 10
    resources = faiss.StandardGpuResources() if gpu else None  # must outlive the GPU indexes

    def on_device(index: Any) -> Any:
        return faiss.index_cpu_to_gpu(resources, 0, index) if gpu else index

    def rate(index: Any, probes: np.ndarray) -> tuple[float, np.ndarray]:
        index.search(probes[:10], k)  # warm-up
        started = time.perf_counter()
        _, ids = index.search(probes, k)
        return len(probes) / (time.perf_counter() - started), ids

    cpu_flat = faiss.IndexFlatIP(512)
    cpu_flat.add(database)
    flat = on_device(cpu_flat)
    flat_qps, truth = rate(flat, queries)
    cpu_flat_qps, _ = rate(cpu_flat, queries[: max(10, sizes.queries // 10)])
    ivf = on_device(faiss.index_factory(512, f"IVF{sizes.nlist},Flat", faiss.METRIC_INNER_PRODUCT))
    ivf.train(database)
    ivf.add(database)
    memory = device_memory_in_use() if gpu else 0
    results = []
    for nprobe in sizes.nprobes:
        if gpu:
            faiss.GpuParameterSpace().set_index_parameter(ivf, "nprobe", nprobe)
        else:
            ivf.nprobe = nprobe
        qps, ids = rate(ivf, queries)
        recall = float(np.mean([len(set(row) & set(expected)) / k for row, expected in zip(ids, truth)]))
        results.append((nprobe, qps, recall))
    return SearchFigures(flat_qps, cpu_flat_qps, results, memory)


def device_memory_in_use() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(total - free)


# -- the run -----------------------------------------------------------------------------


def require_gpus() -> None:
    import faiss
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device: this benchmark needs a GPU (or use --dry-run)")
    if faiss.get_num_gpus() < 1:
        raise SystemExit("FAISS sees no GPU: install faiss-gpu with a CUDA driver (or use --dry-run)")


def agreement(gpu: Ingested, cpu: Ingested) -> float:
    """The lowest cosine between the two paths' vectors of the same file."""
    common = [path for path in gpu.vectors if path in cpu.vectors]
    return min(float(np.dot(gpu.vectors[path], cpu.vectors[path])) for path in common)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=512, help="12 MP JPEGs to ingest")
    parser.add_argument("--small", type=int, default=4096, help="512-px JPEGs to ingest")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors in the FAISS searches")
    parser.add_argument("--queries", type=int, default=1000, help="queries per FAISS search batch")
    parser.add_argument("--nlist", type=int, default=4096, help="IVF lists")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes: checks the code, not the speed")
    args = parser.parse_args(argv)
    sizes = sizes_from(args)
    if not args.dry_run:
        require_gpus()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    cores = available_cores()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-gpu-") as scratch_name:
        scratch = Path(scratch_name)
        photos = write_jpegs(scratch / "photos", sizes.photos, sizes.photo)
        smalls = write_jpegs(scratch / "small", sizes.smalls, sizes.small)
        odd = odd_files(scratch)
        print(f"data written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        encoder, spec = load_encoder(args.dry_run, scratch)
        transform = TensorTransform.from_open_clip(encoder.preprocess)
        if transform is None:
            raise SystemExit(f"{spec.name}'s preprocess is not one the tensor path reproduces")
        feeder = GpuFeeder.for_encoder(encoder) if not args.dry_run else GpuFeeder(encoder.model, transform, "cpu")
        if feeder is None:
            raise SystemExit(f"no GPU feeder for the model on {encoder.device} in {encoder.dtype_name}")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        forward = forward_only(encoder, sizes.batch_size, sizes.forward_repeats)
        rates: dict[str, tuple[float, float]] = {}
        for label, paths in (("12 MP", photos), ("512-px", smalls)):
            ingest_gpu_decode(feeder, paths[: sizes.batch_size], sizes.batch_size, cores)  # warm-up: nvJPEG, kernels
            on_gpu = ingest_gpu_decode(feeder, paths, sizes.batch_size, cores)
            on_cpu = ingest_cpu_decode(encoder, paths, sizes.batch_size, cores)
            if on_gpu.fallbacks:
                raise SystemExit(f"the tensor path sent {len(on_gpu.fallbacks)} {label} JPEGs back: {next(iter(on_gpu.fallbacks.values()))}")
            rates[label] = (on_gpu.rate, on_cpu.rate)
            if label == "12 MP":
                sample = photos[:8] + odd
                checked_gpu = ingest_gpu_decode(feeder, sample, sizes.batch_size, cores)
                checked_cpu = ingest_cpu_decode(encoder, sample, sizes.batch_size, cores)
                lowest = agreement(checked_gpu, checked_cpu)
                sent_back = sorted(path.name for path in checked_gpu.fallbacks)
        torch_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        indexing = index_rate(spec, device, scratch / "photos", scratch / "library", sizes.batch_size, len(photos))
    search = faiss_search(sizes, gpu=not args.dry_run)
    peak_search = search.memory_in_use
    mib = 1 << 20
    batch = f"batch {sizes.batch_size}"
    print(f"model forward alone: {forward:.0f} img/s ({encoder.dtype_name} on {encoder.device}, {batch})")
    figures = [
        info(f"model forward alone ({encoder.dtype_name}, {batch})", f"{forward:.0f} img/s", "-", 1.0),
    ]
    for label, count in (("12 MP", len(photos)), ("512-px", len(smalls))):
        on_gpu, on_cpu = rates[label]
        size = "x".join(str(side) for side in (sizes.photo if label == "12 MP" else sizes.small))
        figures += [
            at_least(f"ingest {count} x {size} JPEGs, GPU decode vs CPU decode on {cores} cores", f"{on_gpu:.0f} img/s",
                     f"{on_cpu:.0f} img/s CPU decode", on_gpu / on_cpu, 1.0),
            info("same, GPU decode vs the model alone", f"{on_gpu:.0f} img/s", f"{forward:.0f} img/s forward", on_gpu / forward),
        ]
    figures += [
        info(f"index_paths today, {len(photos)} photos (CPU decode, catalog commits)", f"{indexing:.0f} img/s",
             f"{rates['12 MP'][1]:.0f} img/s CPU decode ingest", indexing / rates["12 MP"][1]),
        Figure("GPU decode's vectors vs the CPU path's, lowest cosine (8 photos)", f"{lowest:.5f}", "1", lowest,
               ">= 0.999", lowest >= 0.999),
        Figure("files sent back to the CPU path (a PNG and a CMYK JPEG)", f"{len(sent_back)} of 2", "2",
               len(sent_back) / 2, "= 2", len(sent_back) == 2),
        info(f"FAISS GPU exact search, {sizes.vectors} vectors, batches of {sizes.queries} queries, k=10",
             f"{search.flat_qps:.0f} q/s", f"{search.cpu_flat_qps:.0f} q/s same on {cores} CPU cores",
             search.flat_qps / search.cpu_flat_qps),
    ]
    for nprobe, qps, recall in search.ivf:
        figures.append(info(f"FAISS GPU IVF{sizes.nlist},Flat nprobe {nprobe}, same queries",
                            f"{qps:.0f} q/s, recall@10 {recall:.3f}", f"{search.flat_qps:.0f} q/s exact", qps / search.flat_qps))
    figures.append(info("GPU memory peak: torch during ingestion / device in use with the FAISS indexes",
                        f"{torch_peak / mib:.0f} MiB", f"{peak_search / mib:.0f} MiB", torch_peak / max(peak_search, 1)))
    title = "GPU: ingestion and FAISS search (ViT-B-32, random weights)"
    if args.dry_run:
        title = "DRY RUN on the CPU at tiny sizes: the code paths work; the figures mean nothing"
    met = report(title, figures)
    print(f"\nwall time {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.dry_run:  # the speeds mean nothing here, but the two decodings must still agree
        return 0 if lowest >= 0.999 and len(sent_back) == 2 else 1
    return 0 if met else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
