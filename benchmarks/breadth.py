"""Recall for any query: every kind of query sent as a raw vector, with the breadth chosen
per query (`clipdex.search.index.breadth`) and, for comparison, with the image breadth
that a vector got before the rule.

For each size: `ann.py`'s CLIP-like vectors (d=512), and three kinds of queries, each
split in a tuning half and a held-out half:

- image-like: vectors held out from the same distribution;
- text-like: `gap_queries` (a stored vector at cosine 0.3, the rest a shared direction
  plus noise: where CLIP's modality gap puts a text);
- a user's own: the same construction with another shared direction and cosine 0.45 (a
  backend's own encoder), given to `optimize_vectors` as `--queries` would.

`optimize_vectors` chooses, builds and tunes the index as `clipdex optimize` does. Then
each kind's held-out half is searched as vectors (`query_kind="image"`, which is what a
raw vector was searched with before the rule), and as one mixed batch; recall@10 against
exact search; single-query throughput on one FAISS thread.

    .venv/bin/python benchmarks/breadth.py [--sizes 100000] [--queries 400] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ann import clip_like_vectors, log  # noqa: E402

from clipdex.search.index.optimize import exact_evaluation, optimize_vectors, queries_per_second, recall_at_k  # noqa: E402
from clipdex.search.index.query_sample import QuerySample, gap_queries  # noqa: E402


def run_size(count: int, queries: int, target: float, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    data = clip_like_vectors(count + 2 * queries, 512, seed)
    database, photos = data[:count], np.ascontiguousarray(data[count:])
    ids = np.arange(1, count + 1, dtype=np.int64)
    rng = np.random.default_rng(seed + 5)
    bases = database[rng.choice(count, size=4 * queries, replace=False)]
    texts = gap_queries(bases[: 2 * queries], seed=seed)
    offset = np.random.default_rng(seed + 77).standard_normal(512).astype(np.float32)
    users = gap_queries(bases[2 * queries :], seed=seed + 1, cosine=0.45, offset=offset)
    kinds = {"image": photos, "text": texts, "queries": users}
    held = {kind: exact_evaluation(vectors[queries:], ids, database) for kind, vectors in kinds.items()}
    mine = QuerySample.empty(512)
    mine.extend("a user's own (cosine 0.45, another direction)", users[:queries])
    log(f"n={count}: optimizing ...")
    index, report = optimize_vectors(ids, database, target, seed=seed, min_seconds=1.0, user_queries=mine,
                                     evaluation=exact_evaluation(photos[:queries], ids, database),
                                     text_evaluation=exact_evaluation(texts[:queries], ids, database))
    rule = index.spec.breadth_rule
    rows: dict[str, dict[str, float]] = {}
    for kind, evaluation in held.items():
        with_rule = recall_at_k(index.search(evaluation.queries, 10, query_kind="image")[1], evaluation)
        qps = queries_per_second(lambda query: index.search(query, 10), evaluation.queries, 1.0)
        rows[kind] = {"recall_with_rule": round(with_rule, 4), "queries_per_second": round(qps, 1)}
    mixed = np.concatenate([evaluation.queries for evaluation in held.values()])
    found = index.search(mixed, 10)[1]
    start = 0
    for kind, evaluation in held.items():
        rows[kind]["recall_in_a_mixed_batch"] = round(recall_at_k(found[start : start + len(evaluation.queries)], evaluation), 4)
        start += len(evaluation.queries)
    index.spec.breadth_rule = None  # as before the rule: a vector gets the image breadth
    for kind, evaluation in held.items():
        rows[kind]["recall_with_image_breadth"] = round(recall_at_k(index.search(evaluation.queries, 10, query_kind="image")[1], evaluation), 4)
        qps = queries_per_second(lambda query: index.search(query, 10, query_kind=kind if kind != "queries" else "text"), evaluation.queries, 1.0)
        rows[kind]["queries_per_second_own_kind_breadth"] = round(qps, 1)
    return {"vectors": count, "index": report.factory, "rule": rule, "report_by_kind": report.by_query_kind,
            "held_out": rows, "optimize_seconds": report.seconds, "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--queries", type=int, default=400, help="per kind: this many tune, as many more measure")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [run_size(int(size), args.queries, args.target_recall, args.seed) for size in args.sizes.split(",")]
    print(f"{'size':>10} {'index':<14} {'kind':<8} {'as vector, rule':>16} {'mixed batch':>12} {'image breadth':>14} {'q/s rule':>9} {'q/s kind':>9}")
    for result in results:
        for kind, row in result["held_out"].items():
            print(f"{result['vectors']:>10,} {result['index']:<14} {kind:<8} {row['recall_with_rule']:>16.3f} "
                  f"{row['recall_in_a_mixed_batch']:>12.3f} {row['recall_with_image_breadth']:>14.3f} "
                  f"{row['queries_per_second']:>9.0f} {row['queries_per_second_own_kind_breadth']:>9.0f}")
    print(f"rules: " + "; ".join(f"n={r['vectors']:,} {r['rule']}" for r in results))
    print(f"{platform.machine()}, {os.cpu_count()} cores; optimize took " + ", ".join(f"{r['optimize_seconds']:.0f}s" for r in results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = all(row["recall_with_rule"] >= args.target_recall - 0.02 for r in results for row in r["held_out"].values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
