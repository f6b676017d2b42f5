"""Approximate search at scale: recall@10 and single-query speed of clipdex's chosen index,
for image-like and for text-like queries.

Generates CLIP-like vectors (normalized, d=512, a shared mean direction, an anisotropic
spectrum, topics split into sub-clusters of Zipf-distributed sizes) and two kinds of
queries: image-like ones, held out from the same distribution, and text-like ones, drawn
as CLIP's modality gap places a text (`clipdex.search.index.query_sample.gap_queries`: a stored
vector at cosine 0.3, the rest a direction shared by every query plus noise of its own, so
the best match lies at a cosine of about 0.3 while an image's neighbours lie at 0.8).
For each size `clipdex.search.index.optimize.optimize_vectors` chooses, builds and tunes the
index exactly as `clipdex optimize` does, each kind on half of its queries; recall@10 is
measured against exact search on the other half. Throughput is single queries one at a
time on one FAISS thread, with the kind's tuned breadth, against FAISS's exact flat search
of the same vectors, measured in the same run.

    .venv/bin/python benchmarks/ann.py                      # 100,000 and 1,000,000 vectors
    .venv/bin/python benchmarks/ann.py --sizes 100000 --gpu on --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipdex.search.index.optimize import OptimizeReport, exact_evaluation, optimize_vectors  # noqa: E402
from clipdex.search.index.query_sample import GAP_COSINE, gap_queries  # noqa: E402
from clipdex.search.index.vectors import faiss_module  # noqa: E402


def clip_like_vectors(count: int, dim: int = 512, seed: int = 0) -> np.ndarray:
    """Normalized vectors with the coarse shape of CLIP embeddings (see the module docstring)."""
    out = np.empty((count, dim), dtype=np.float32)
    for start, chunk in clip_like_chunks(count, dim, seed):
        out[start : start + len(chunk)] = chunk
    return out


def clip_like_chunks(count: int, dim: int = 512, seed: int = 0, chunk_rows: int = 100_000) -> Iterator[tuple[int, np.ndarray]]:
    """`clip_like_vectors` a chunk of 100,000 rows at a time, as (first row, rows): the same
    vectors, without holding them all (10 million are 20 GB)."""
    rng = np.random.default_rng(seed)
    topics, clusters = max(4, count // 50_000), max(16, count // 2_000)
    spectrum = rng.permutation(np.arange(1, dim + 1) ** -0.5).astype(np.float32)
    spectrum /= np.sqrt(np.mean(spectrum**2))
    mean = rng.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    topic_centers = rng.standard_normal((topics, dim)).astype(np.float32) * spectrum
    centers = topic_centers[rng.integers(0, topics, clusters)] + 0.5 * rng.standard_normal((clusters, dim)).astype(np.float32) * spectrum
    spreads = rng.uniform(0.75, 1.25, clusters).astype(np.float32) * 0.9
    sizes = 1.0 / np.sqrt(np.arange(1, clusters + 1))
    members = rng.choice(clusters, size=count, p=sizes / sizes.sum())
    for start in range(0, count, chunk_rows):
        chosen = members[start : start + chunk_rows]
        noise = rng.standard_normal((len(chosen), dim), dtype=np.float32) * spectrum
        chunk = np.ascontiguousarray((centers[chosen] + spreads[chosen, None] * noise) / np.sqrt(dim) + mean, dtype=np.float32)
        faiss_module().normalize_L2(chunk)
        yield start, chunk


def run_size(count: int, dim: int, queries: int, target_recall: float, seed: int, min_seconds: float) -> dict[str, Any]:
    started = time.perf_counter()
    data = clip_like_vectors(count + queries, dim, seed)
    database, held_out = data[:count], np.ascontiguousarray(data[count:])
    ids = np.arange(1, count + 1, dtype=np.int64)
    rng = np.random.default_rng(seed + 5)
    texts = gap_queries(database[np.sort(rng.choice(count, size=queries, replace=False))], seed=seed)
    log(f"n={count}: generated in {time.perf_counter() - started:.0f}s; exact neighbours of 2 x {queries} queries ...")
    images, text = exact_evaluation(held_out, ids, database), exact_evaluation(texts, ids, database)
    shape = data_shape(database, images, text)
    log(f"n={count}: choosing, building and tuning the index ...")
    sources = {"image": f"held out from the generated vectors ({queries})",
               "text": f"generated with a modality gap, cosine {GAP_COSINE} to a stored vector ({queries})"}
    index, report = optimize_vectors(ids, database, target_recall, evaluation=images, text_evaluation=text, sources=sources,
                                     seed=seed, min_seconds=min_seconds)
    for kind, figures in report.by_query_kind.items():
        log(f"n={count}: {kind}: {report.factory or report.index_type} {figures['search_params']} recall@10 "
            f"{figures['recall_at_10']:.3f} {figures['queries_per_second']:.0f} q/s vs exact {report.exact_queries_per_second:.1f} q/s")
    return {"vectors": count, "data": shape, "report": report.to_json(), "seconds": round(time.perf_counter() - started, 1)}


def data_shape(database: np.ndarray, images: Any, texts: Any) -> dict[str, float]:
    """How clustered the data is and how far the queries lie: the mean cosine of random pairs,
    of an image-like query's 1st and 10th exact neighbour, and of a text-like query's 1st."""
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, len(database), (2, 2000))
    rows = images.truth - 1  # ids are rows + 1
    return {
        "random_pair_cosine": round(float(np.mean(np.sum(database[pairs[0]] * database[pairs[1]], axis=1))), 3),
        "image_top1_cosine": round(float(np.mean(np.sum(database[rows[:, 0]] * images.queries, axis=1))), 3),
        "image_top10_cosine": round(float(np.mean(np.sum(database[rows[:, -1]] * images.queries, axis=1))), 3),
        "text_top1_cosine": round(float(np.mean(texts.best_cosine)), 3),
    }


def table(results: list[dict[str, Any]], target_recall: float, target_speedup: float) -> str:
    lines = [f"{'figure':<40} {'target':>10} {'measured':>10} {'ratio':>7}  met?", "-" * 76]
    for result in results:
        report = OptimizeReport(**result["report"])
        for kind, figures in report.by_query_kind.items():
            size = f"{kind} n={result['vectors']:,}"
            recall, speedup = figures["recall_at_10"], figures["speedup"]
            lines.append(f"{'recall@10 ' + size:<40} {'>= ' + str(target_recall):>10} {recall:>10.3f} "
                         f"{recall / target_recall:>7.2f}  {'yes' if recall >= target_recall else 'NO'}")
            lines.append(f"{'q/s vs exact flat ' + size:<40} {f'>= {target_speedup:g}x':>10} {f'{speedup:.1f}x':>10} "
                         f"{speedup / target_speedup:>7.2f}  {'yes' if speedup >= target_speedup else 'NO'}")
    lines.append("")
    lines.append(f"{'size':>10} {'kind':<6} {'index':<14} {'params':<14} {'q/s':>8} {'exact q/s':>10} {'bytes/vec':>10} {'build s':>8} {'device':>8}")
    for result in results:
        report = OptimizeReport(**result["report"])
        for kind, figures in report.by_query_kind.items():
            params = ",".join(f"{key}={value}" for key, value in figures["search_params"].items()) or "-"
            lines.append(f"{result['vectors']:>10,} {kind:<6} {report.factory or report.index_type:<14} {params:<14} "
                         f"{figures['queries_per_second']:>8.0f} {report.exact_queries_per_second:>10.1f} "
                         f"{report.bytes_per_vector:>10.0f} {report.build_seconds:>8.0f} {report.device:>8}")
    return "\n".join(lines)


def met(result: dict[str, Any], target_recall: float, target_speedup: float) -> bool:
    kinds = OptimizeReport(**result["report"]).by_query_kind.values()
    return all(figures["recall_at_10"] >= target_recall and figures["speedup"] >= target_speedup for figures in kinds)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated vector counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="queries of each kind: half tune, half measure recall")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--target-speedup", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time spent measuring each throughput")
    parser.add_argument("--gpu", choices=("auto", "on", "off"), default=None, help="sets CLIPDEX_GPU (on: fail without a GPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.gpu:
        os.environ["CLIPDEX_GPU"] = args.gpu
    started = time.perf_counter()
    results = [
        run_size(int(size), args.dim, args.queries, args.target_recall, args.seed, args.min_seconds)
        for size in args.sizes.split(",")
    ]
    print(table(results, args.target_recall, args.target_speedup))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f}s on {platform.machine()} with {os.cpu_count()} cores; data shape: "
          + "; ".join(f"n={r['vectors']:,} {r['data']}" for r in results))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "wall_seconds": round(wall, 1)}, indent=2) + "\n")
    sys.exit(0 if all(met(result, args.target_recall, args.target_speedup) for result in results) else 1)


if __name__ == "__main__":
    main()
