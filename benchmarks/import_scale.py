"""A million vectors end to end: `clipdex import-vectors`, `clipdex optimize`, then recall
measured independently of both.

1. Writes CLIP-like vectors (`ann.clip_like_chunks`, d=512, float32, written a part at a time) in clip-retrieval's
   layout: `img_emb/img_emb_N.npy` and `metadata/metadata_N.parquet` (image_path, caption),
   in parts of 100,000 rows (kept in `--data`, reused when present).
2. Times `clipdex import-vectors DATA` in a fresh process (wall time, and peak resident
   memory of that process by GNU time), and measures the catalog's size against the raw float32 bytes.
3. Runs `clipdex optimize --target-recall 0.95 --queries TEXT.npy --json`, with 400
   text-like queries drawn as CLIP's modality gap places a text (`gap_queries`).
4. Measures recall@10 independently: 1,000 image-like queries (generated vectors that were
   never imported) and 1,000 text-like queries from other stored vectors, another offset
   direction and other noise, searched through the Python API with each kind's tuned
   breadth, against exact search; and single-query throughput against exact search.

Exits 1 when a target is missed: >= 20,000 vectors/s, catalog <= 1.3x and peak memory
<= 2x the raw float32 bytes, and for each query kind recall@10 >= 0.95, >= 10x exact
search's queries/s, and the recall `optimize` reported within 0.03 of the independent one.

    .venv/bin/python benchmarks/import_scale.py [--count 1000000] [--data DIR] [--library DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ann import clip_like_chunks  # noqa: E402

from clipdex.search.library import Library  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.index.optimize import RECALL_K, exact_evaluation, exact_queries_per_second, queries_per_second, recall_at_k  # noqa: E402
from clipdex.search.index.query_sample import gap_queries  # noqa: E402

PART_ROWS = 100_000
HELD_OUT = 1000


def write_layout(folder: Path, count: int, seed: int, dtype: str = "float32") -> np.ndarray:
    """The clip-retrieval folder for `count` vectors, stored as `dtype` (clip-retrieval itself writes
    float16); returns the held-out vectors (float32, never imported)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (folder / "done").exists():
        return np.load(folder / "held-out.npy")
    shutil.rmtree(folder, ignore_errors=True)
    for name in ("img_emb", "metadata"):
        (folder / name).mkdir(parents=True)
    held_out = np.zeros((0, 512), np.float32)
    for start, chunk in clip_like_chunks(count + HELD_OUT, 512, seed, PART_ROWS):  # parts of the data, the last rows held out
        rows = range(start, min(count, start + len(chunk)))
        held_out = np.concatenate([held_out, chunk[len(rows):]])
        if not len(rows):
            continue
        np.save(folder / "img_emb" / f"img_emb_{start // PART_ROWS}.npy", chunk[: len(rows)].astype(dtype))
        table = pa.table({
            "image_path": [f"/data/photos/{row // 10_000:04d}/{row:08d}.jpg" for row in rows],
            "caption": [f"photo {row} of the generated collection" for row in rows],
        })
        pq.write_table(table, folder / "metadata" / f"metadata_{start // PART_ROWS}.parquet")
    np.save(folder / "held-out.npy", held_out)
    (folder / "done").write_text("")
    return held_out


def clipdex(*arguments: str) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Run a clipdex command in a fresh process: its wall time, its peak resident memory
    (bytes, by GNU time: this process's own size must not count) and its result."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "peak-kib %M", sys.executable, "-m", "clipdex.cli", *arguments],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = result.stderr.strip().splitlines()
    peak = int(lines[-1].split()[-1]) * 1024 if lines and lines[-1].startswith("peak-kib") else -1
    return seconds, peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, default=Path(".bench/import-data"))
    parser.add_argument("--library", type=Path, default=Path(".bench/import-library"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = args.count
    held_out = write_layout(args.data / str(count), count, args.seed)
    raw = count * 512 * 4
    shutil.rmtree(args.library, ignore_errors=True)
    Library.open(args.library, model=ModelSpec("ViT-B-32", "none"), create=True, device="cpu").close()

    seconds, peak, result = clipdex("import-vectors", str(args.data / str(count)), "--library", str(args.library), "--quiet", "--json")
    if result.returncode:
        sys.exit(f"import-vectors failed: {result.stderr}")
    catalog = sum(path.stat().st_size for path in args.library.glob("catalog.sqlite*"))
    met = [count / seconds >= 20_000, catalog <= 1.3 * raw, 0 < peak <= 2 * raw]
    print(f"import-vectors: {count:,} vectors in {seconds:.1f}s = {count / seconds:,.0f} vectors/s (target >= 20,000); "
          f"catalog {catalog / 2**30:.2f} GiB = {catalog / raw:.2f}x the raw float32 bytes (target <= 1.3); "
          f"peak memory {peak / 2**30:.2f} GiB = {peak / raw:.2f}x (target <= 2)", flush=True)

    library = Library.open(args.library, device="cpu")
    ids, vectors = library.catalog.all_vectors()
    rng = np.random.default_rng(args.seed + 100)
    tuning_queries = args.library.parent / "text-queries.npy"
    np.save(tuning_queries, gap_queries(vectors[rng.choice(count, 400, replace=False)], seed=args.seed + 1))
    seconds, _, result = clipdex("optimize", "--library", str(args.library), "--target-recall", "0.95", "--queries", str(tuning_queries), "--json")
    report = json.loads(result.stdout)
    print(f"optimize (exit {result.returncode}, {seconds:.0f}s): {report['factory']}, " + "; ".join(
        f"{kind} recall@10 {figures['recall_at_10']:.3f} with {figures['search_params']} ({figures['source']})"
        for kind, figures in report["by_query_kind"].items()), flush=True)

    library.close()
    library = Library.open(args.library, device="cpu")  # the optimized index, as a new process sees it
    fresh = {
        "image": exact_evaluation(held_out, ids, vectors),
        "text": exact_evaluation(gap_queries(vectors[rng.choice(count, HELD_OUT, replace=False)], seed=args.seed + 77), ids, vectors),
    }
    exact = exact_queries_per_second(vectors, held_out[:50], 3.0)
    for kind, evaluation in fresh.items():
        _, found = library.store.search(evaluation.queries, RECALL_K, None, kind)
        recall = recall_at_k(found, evaluation)
        qps = queries_per_second(lambda query: library.store.search(query, RECALL_K, None, kind), evaluation.queries, 3.0)
        reported = report["by_query_kind"][kind]["recall_at_10"]
        met += [recall >= 0.95, qps >= 10 * exact, abs(recall - reported) <= 0.03]
        print(f"independent {kind}-like: recall@10 {recall:.3f} (optimize reported {reported:.3f}, difference {abs(recall - reported):.3f}; "
              f"best match at cosine {np.median(evaluation.best_cosine):.2f}); {qps:.0f} queries/s = {qps / exact:.1f}x exact search's "
              f"{exact:.1f}", flush=True)
    library.close()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; every target met: {'yes' if all(met) else 'NO'}")
    sys.exit(0 if all(met) else 1)


if __name__ == "__main__":
    main()
