"""Beyond one machine (#15): indexing and `optimize` on a two-node Ray cluster, side by side with one process.

    .venv/bin/python benchmarks/speed_cluster.py [--photos 200] [--small 2000] [--large 20000]
                                                 [--vectors 1000000] [--parts index,memory,optimize]

Needs root and `ip netns`: the cluster is two `ray start` nodes with one CPU each, on this
machine, inside a network namespace of their own (tests/ray_nodes.py), and the cluster
runs' drivers run there too. Each run's driver is a fresh process.

1. Indexing PHOTOS 12 MP JPEGs with ViT-B-32 (random weights saved to a checkpoint, so
   that every worker loads the same ones) on the CPU: the local pipeline (all cores,
   before the cluster starts) against the cluster (`--ray`), each also on the first 40
   of the photos. Throughput leaves start-up out (the local model load; Ray's connection,
   the actors' start and their model loads) by difference: (PHOTOS - 40) files over the
   seconds the whole run took beyond the 40-photo run. (The cluster's results come back
   in order, so its commits bunch up and cannot time a steady state; the local run's
   steady state, first to last commit, is printed.) Whole runs are printed too. Target:
   cluster >= 0.7x local, vectors identical (cosine >= 0.999 for every file).
2. The cluster run's driver memory (peak RSS) indexing LARGE against SMALL 320x240 JPEGs
   with a small model. Target: within 10%.
3. `optimize` on VECTORS CLIP-like vectors (benchmarks/ann.py's generator, d=512): the
   single-process build against the sharded build on the cluster (quantizer trained
   once, vectors added in shards as Ray tasks, merged). Target: recall@10 within 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from speed_data import write_photos, write_small_images  # noqa: E402
from speed_report import Figure, at_least, at_most, info, report  # noqa: E402

from tests.ray_nodes import TwoNodeCluster, netns_unavailable  # noqa: E402

FEW = 40  # photos in the run whose time, taken from a whole run's, leaves out start-up
SMALL_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# argv: folder, library, model, checkpoint, ray address ('' for the local pipeline), batch size
INDEX_RUN = """
import json, resource, sys, time
import clipdex.indexer.cluster, clipdex.indexer.local
from clipdex.indexer import index_paths
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
folder, library_path, model, checkpoint, address, batch_size = sys.argv[1:7]
commits = []  # (time, files committed so far): the steady state is timed by the commits
def timed(commit):
    def wrapper(library, writer, batch, *rest):
        commit(library, writer, batch, *rest)
        commits.append((time.monotonic(), (commits[-1][1] if commits else 0) + len(batch)))
    return wrapper
clipdex.indexer.local._commit = timed(clipdex.indexer.local._commit)
clipdex.indexer.cluster._commit = timed(clipdex.indexer.cluster._commit)
cluster = None
if address:
    cluster = clipdex.indexer.cluster.ClusterOptions(address)
library = Library.open(library_path, model=ModelSpec(model, checkpoint), create=True, device="cpu")
report = index_paths(library, [folder], batch_size=int(batch_size), export_text=False, cluster=cluster)
first, last = commits[0], commits[-1]
steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
print(json.dumps({"added": report.added, "failed": len(report.failed), "seconds": report.seconds, "steady": steady,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# argv: vectors, ray address ('' for one process)
OPTIMIZE_RUN = """
import json, sys, time
from functools import partial
sys.path.insert(0, "benchmarks")
import numpy as np
from ann import clip_like_vectors
from clipdex.search.index.choice import choose_spec
from clipdex.search.index.optimize import optimize_vectors
count, address = int(sys.argv[1]), sys.argv[2]
vectors = clip_like_vectors(count)
ids = np.arange(count, dtype=np.int64)
spec = choose_spec(count, vectors.shape[1], gpu=False)
if address:
    from clipdex.search.index.optimize_cluster import build_index_on_cluster
    from clipdex.search.ray_cluster import ray_session
    with ray_session(address) as ray:
        index, report = optimize_vectors(ids, vectors, spec=spec, min_seconds=0.5, builder=partial(build_index_on_cluster, ray))
else:
    index, report = optimize_vectors(ids, vectors, spec=spec, min_seconds=0.5)
print(json.dumps({"factory": report.factory, "recall": report.recall_at_10, "params": report.search_params,
                  "build_seconds": report.build_seconds}))
"""


def run_driver(argv: list[str], nodes: TwoNodeCluster | None = None) -> dict[str, Any]:
    command = [sys.executable, "-c", *argv]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    if nodes is not None:
        command = nodes.command(*command)
        environment = {**nodes.environment(), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
    if done.returncode != 0:
        raise SystemExit(f"a driver failed: {done.stderr.strip()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_checkpoint(model: str, folder: Path, config: dict[str, Any] | None = None) -> tuple[str, str]:
    """(model name or config file, checkpoint file) of seeded random weights."""
    import open_clip
    import torch

    name = model
    if config is not None:
        path = folder / f"{model}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
        name = str(path)
    torch.manual_seed(0)
    checkpoint = folder / f"{model}-random.pt"
    torch.save({"state_dict": open_clip.create_model(model, pretrained=None).state_dict()}, checkpoint)
    return name, str(checkpoint)


def min_cosine(first: Path, second: Path) -> float:
    from clipdex.search.library import Library

    def by_path(path: Path) -> dict[str, np.ndarray]:
        library = Library.open(path, device="cpu")
        ids, vectors = library.catalog.all_vectors()
        items = library.catalog.get_items(ids.tolist())
        return {items[i].path: vector for i, vector in zip(ids.tolist(), vectors.reshape(len(ids), library.dim))}

    ours, theirs = by_path(first), by_path(second)
    assert ours.keys() == theirs.keys(), "the two runs indexed different files"
    return min(float(ours[path] @ theirs[path]) for path in ours)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--parts", default="index,memory,optimize")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"cannot make the two-node cluster: {reason}")
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-cluster-") as scratch_name:
        scratch = Path(scratch_name)
        local: dict[str, Any] = {}
        if "index" in parts:
            photos = scratch / "photos"
            few = scratch / "few-photos"  # the first FEW of them again (hard links): a run's start-up cost
            few.mkdir()
            for path in write_photos(photos, args.photos)[:FEW]:
                os.link(path, few / path.name)
            big_model = random_checkpoint("ViT-B-32", scratch)
            log(f"local pipeline: {FEW} and {args.photos} photos")
            local_few = run_driver([INDEX_RUN, str(few), str(scratch / "local-few"), *big_model, "", str(args.batch_size)])
            local = run_driver([INDEX_RUN, str(photos), str(scratch / "local"), *big_model, "", str(args.batch_size)])
        if "optimize" in parts:
            log(f"optimize in one process: {args.vectors} vectors")
            local["optimize"] = run_driver([OPTIMIZE_RUN, str(args.vectors), ""])
        if "memory" in parts:
            small_model = random_checkpoint("small-clip", scratch, SMALL_MODEL)
            for count in (args.small, args.large):
                write_small_images(scratch / f"small-{count}", count, size=(320, 240))
        store = (3 << 30) if "optimize" in parts else (256 << 20)
        nodes = TwoNodeCluster(f"clipdex-bench-{uuid.uuid4().hex[:8]}", scratch, object_store_bytes=store)
        try:
            log("starting the two-node cluster")
            nodes.start()
            if "index" in parts:
                log("cluster: photos")
                remote_few = run_driver([INDEX_RUN, str(few), str(scratch / "cluster-few"), *big_model, nodes.address,
                                         str(args.batch_size)], nodes)
                remote = run_driver([INDEX_RUN, str(photos), str(scratch / "cluster"), *big_model, nodes.address,
                                     str(args.batch_size)], nodes)
                cosine = min_cosine(scratch / "cluster", scratch / "local")
                size = f"{args.photos} x 12 MP, ViT-B-32"
                cluster_rate, local_rate = args.photos / remote["seconds"], args.photos / local["seconds"]
                # the files a run adds to a run of FEW over the seconds they add: start-up cancels out
                cluster_marginal = (args.photos - FEW) / (remote["seconds"] - remote_few["seconds"])
                local_marginal = (args.photos - FEW) / (local["seconds"] - local_few["seconds"])
                figures += [
                    at_least(f"1 cluster (2 nodes x 1 CPU) vs local pipeline ({size}), start-up left out",
                             f"{cluster_marginal:.2f} img/s", f"{local_marginal:.2f} img/s local",
                             cluster_marginal / local_marginal, 0.70),
                    info("1 whole runs, start-up included", f"{cluster_rate:.2f} img/s ({remote['seconds']:.1f} s)",
                         f"{local_rate:.2f} img/s ({local['seconds']:.1f} s) local", cluster_rate / local_rate),
                    info(f"1 start-up: a run of {FEW} photos", f"{remote_few['seconds']:.1f} s cluster",
                         f"{local_few['seconds']:.1f} s local", remote_few["seconds"] / local_few["seconds"]),
                    info("1 local pipeline's steady state (first to last commit)", f"{local['steady']:.2f} img/s",
                         f"{local_marginal:.2f} img/s start-up left out", local["steady"] / local_marginal),
                    at_least("1 vectors: lowest cosine, cluster vs local", f"{cosine:.6f}", "1.0", cosine, 0.999),
                ]
            if "memory" in parts:
                peaks = {}
                for count in (args.small, args.large):
                    log(f"cluster: {count} small files")
                    result = run_driver([INDEX_RUN, str(scratch / f"small-{count}"), str(scratch / f"lib-{count}"),
                                         *small_model, nodes.address, "64"], nodes)
                    if result["added"] != count:
                        raise SystemExit(f"the cluster indexed {result['added']} of {count} files")
                    peaks[count] = result
                    log(f"  {count}: peak {result['peak_mib']:.0f} MiB, {result['seconds']:.1f} s")
                small, large = peaks[args.small]["peak_mib"], peaks[args.large]["peak_mib"]
                figures.append(at_most(f"2 driver peak memory, cluster indexing {args.large} vs {args.small} files",
                                       f"{large:.0f} MiB", f"{small:.0f} MiB", large / small, 1.10))
            if "optimize" in parts:
                log(f"optimize on the cluster: {args.vectors} vectors")
                remote_optimize = run_driver([OPTIMIZE_RUN, str(args.vectors), nodes.address], nodes)
                one = local["optimize"]
                gap = abs(remote_optimize["recall"] - one["recall"])
                figures += [
                    at_most(f"3 recall@10 gap, sharded vs one process ({args.vectors} vectors, {one['factory']})",
                            f"{remote_optimize['recall']:.4f} ({remote_optimize['params']})",
                            f"{one['recall']:.4f} ({one['params']})", gap, 0.01),
                    info("3 build time (train + add), cluster vs one process", f"{remote_optimize['build_seconds']:.1f} s",
                         f"{one['build_seconds']:.1f} s", one["build_seconds"] / max(remote_optimize["build_seconds"], 1e-9)),
                ]
        finally:
            nodes.stop()
    return 0 if report("A two-node Ray cluster against one process", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
