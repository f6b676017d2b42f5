"""Side by side under one memory budget: clipdex `optimize` against autofaiss and DiskANN,
as recall@10 against queries per second per core, for image-like and text-like queries.

    .venv/bin/python benchmarks/ann_peers.py [--count 1000000] [--budget 1G] [--data .bench/import-data]
                                             [--work .bench/ann-peers] [--peers autofaiss,diskann] [--float16]
                                             [--target-recall 0.95[,KIND=RECALL...]] [--peer-build-memory 16G]

The same data for all three: `ann.py`'s CLIP-like vectors (d=512) in clip-retrieval's layout
(`import_scale.py` writes and reuses it; `--float16`: stored as float16, as clip-retrieval
writes it, the exact neighbours those float16 vectors'), 1,000 image-like queries held out of it and 1,000
text-like ones (`gap_queries`: best match at a cosine of about 0.3), their exact top 10 by
brute force. Every search is batched (all queries of a kind at once) on one thread, so the
figure is queries/s per core; each point is timed after one batch untimed.

- clipdex, as a user runs it: `clipdex import-vectors DATA --memory-budget BUDGET`, then `clipdex optimize
  --memory-budget BUDGET --target-recall TARGET --queries TEXT.npy` (its tuning sample: 400
  other text-like queries; `--target-recall`, default 0.95, may name a kind's own, e.g.
  0.95,text=0.9,queries=0.9; another target than the last run's optimizes the imported
  library again), each a process of its own. The curve is the optimized index
  opened as a library (quantized codes reranked by the catalog's vectors, read by id)
  searched at each breadth; the point marked `served` is what a search gets: the breadth
  its rule picks per query.
- autofaiss (clip-retrieval's index builder), in a virtual environment of its own
  (`--peers-venv`, installed from PyPI on first use): `build_index(embeddings=DATA/img_emb,
  file_format="npy", max_index_memory_usage=BUDGET, current_memory_available=BUILD_MEMORY,
  metric_type="ip", save_on_disk=True)`, as its docs say and as clip-retrieval calls it; the
  curve sweeps the nprobe (and efSearch, when its coarse quantizer is HNSW) of the index it
  picked, then the setting it tuned. The saved index is searched again by the next run.
- DiskANN (`diskannpy`): `build_disk_index` with `search_memory_maximum=BUDGET` (its
  compressed vectors in memory, graph and full vectors on disk), graph degree 64,
  build complexity 100, as its docs suggest; `StaticDiskIndex.batch_search` on one thread
  with beam width 2 and a cache of 1% of the nodes, sweeping the search complexity L. Its
  finished build too is kept in the run's folder and searched again by the next run.

Each peer runs in a process of its own, with its log in the run's folder; its peak resident
memory is reported beside its curve (clipdex's: the `optimize` process, and the process
searching the library), and its build's processor time beside the wall time. Every curve
ends at recall 0.995, at a doubling that gains less than 0.002, or below 20 queries/s
(`curves.py`, which the peers' scripts import too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from curves import K, log, peak_rss_gib, recall, timed_batch, worth_going_on  # noqa: E402
from import_scale import clipdex, write_layout  # noqa: E402

QUERIES = 1000
# diskannpy 0.7 pins numpy 1.25 and autofaiss wants numpy < 2: a FAISS and a pyarrow built for numpy 1
PEER_PACKAGES = ("autofaiss==2.18.0", "diskannpy==0.7.0", "numpy==1.25", "faiss-cpu<1.10", "pyarrow<16")


def ground_truth(data: Path, work: Path, count: int, held_out: np.ndarray, seed: int) -> dict[str, Path]:
    """queries-{kind}.npy and truth-{kind}.npy (row numbers of the exact top 10) in `work`."""
    from clipdex.search.index.query_sample import gap_queries
    from clipdex.search.index.vectors import faiss_module

    files = {kind: (work / f"queries-{kind}.npy", work / f"truth-{kind}.npy") for kind in ("image", "text")}
    if all(path.exists() for pair in files.values() for path in pair):
        return {kind: pair[0] for kind, pair in files.items()}
    parts = sorted((data / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    rng = np.random.default_rng(seed + 200)
    queries = {"image": held_out[:QUERIES], "text": gap_queries(data_rows(parts, np.sort(rng.choice(count, QUERIES, replace=False))), seed=seed + 201)}
    np.save(work / "tuning-text.npy", gap_queries(data_rows(parts, np.sort(rng.choice(count, 400, replace=False))), seed=seed + 202))
    faiss = faiss_module()
    best = {kind: (np.full((len(vectors), K), -np.inf, np.float32), np.full((len(vectors), K), -1, np.int64)) for kind, vectors in queries.items()}
    start = 0
    for part in parts:  # a file at a time: 10 million vectors are 20 GB
        flat = faiss.IndexFlatIP(512)
        flat.add(np.ascontiguousarray(np.load(part), dtype=np.float32))
        for kind, vectors in queries.items():
            scores, rows = flat.search(np.ascontiguousarray(vectors, dtype=np.float32), K)
            merged_scores = np.concatenate([best[kind][0], scores], axis=1)
            merged_rows = np.concatenate([best[kind][1], rows + start], axis=1)
            order = np.argsort(-merged_scores, axis=1)[:, :K]
            best[kind] = np.take_along_axis(merged_scores, order, 1), np.take_along_axis(merged_rows, order, 1)
        start += flat.ntotal
    for kind, vectors in queries.items():
        np.save(files[kind][0], np.ascontiguousarray(vectors, dtype=np.float32))
        np.save(files[kind][1], best[kind][1])
        log(f"exact top {K} of the {kind}-like queries: best match at cosine {float(np.median(best[kind][0][:, 0])):.2f}")
    return {kind: pair[0] for kind, pair in files.items()}


def data_rows(parts: list[Path], rows: np.ndarray) -> np.ndarray:
    """The data's `rows` (sorted), read from its parts' memory maps."""
    pieces, start = [], 0
    for part in parts:
        vectors = np.load(part, mmap_mode="r")
        local = rows[(rows >= start) & (rows < start + len(vectors))] - start
        pieces.append(np.asarray(vectors[local], dtype=np.float32))
        start += len(vectors)
    return np.concatenate(pieces)


# -- clipdex ---------------------------------------------------------------------------------

def run_clipdex(data: Path, work: Path, count: int, budget: str, queries: dict[str, Path], target: str = "0.95") -> dict[str, Any]:
    from clipdex.search.encoders.model import ModelSpec
    from clipdex.search.index.vectors import faiss_module
    from clipdex.search.library import Library

    library_path = work / "clipdex-library"
    state = library_path / "optimized.json"
    recorded = json.loads(state.read_text()) if state.exists() else None
    imported = None if recorded is None else recorded.get("import")
    if recorded is None:
        import shutil

        shutil.rmtree(library_path, ignore_errors=True)
        Library.open(library_path, model=ModelSpec("ViT-B-32", "none"), create=True, device="cpu").close()
        seconds, peak, result = clipdex("import-vectors", str(data), "--library", str(library_path), "--memory-budget", budget,
                                        "--quiet", "--json")
        if result.returncode:
            sys.exit(f"import-vectors failed: {result.stderr[-2000:]}")
        log(f"clipdex import-vectors: {count / seconds:,.0f} vectors/s, peak {peak / 2**30:.2f} GiB")
        imported = {"seconds": round(seconds, 1), "vectors_per_second": round(count / seconds), "peak_gib": round(peak / 2**30, 2)}
    if recorded is None or recorded.get("target", "0.95") != target:
        seconds, peak, result = clipdex("optimize", "--library", str(library_path), "--memory-budget", budget,
                                        "--target-recall", target, "--queries", str(work / "tuning-text.npy"), "--json")
        if not result.stdout.strip():
            sys.exit(f"optimize failed: {result.stderr[-2000:]}")
        report = json.loads(result.stdout)
        state.write_text(json.dumps({"report": report, "seconds": seconds, "peak": peak, "import": imported, "target": target}))
    optimized = json.loads(state.read_text())
    report = optimized["report"]
    log(f"clipdex optimize (--target-recall {target}): {report['factory']} in {optimized['seconds']:.0f} s, peak {optimized['peak'] / 2**30:.2f} GiB")
    faiss = faiss_module()
    faiss.omp_set_num_threads(1)
    library = Library.open(library_path, device="cpu")
    index = library.vectors
    ids = library.catalog.ids()  # rows of the data are ids - 1 (imported in order into an empty library)
    assert int(ids.min()) == 1 and int(ids.max()) == count, "the library's ids are not the data's rows + 1"
    curves: dict[str, list[dict[str, Any]]] = {}
    for kind, path in queries.items():
        vectors, truth = np.load(path), np.load(str(path).replace("queries-", "truth-"))
        points = []
        breadth = 1
        while breadth <= index.max_breadth():
            found, qps = timed_batch(lambda q, b=breadth: index.search_with(q, K, b)[1] - 1, vectors)
            points.append({"param": f"nprobe={breadth}", "recall": round(recall(found, truth), 4), "qps": round(qps, 1)})
            log(f"clipdex {kind} nprobe={breadth}: {points[-1]['recall']:.3f} at {qps:,.0f}/s")
            if not worth_going_on(points):
                break
            breadth *= 2
        found, qps = timed_batch(lambda q: library.store.search(q, K, None, None)[1] - 1, vectors)
        points.append({"param": "served (breadth per query)", "recall": round(recall(found, truth), 4), "qps": round(qps, 1)})
        latencies = []
        for query in vectors[:200]:  # single queries, one at a time, as an interactive search sends them
            started = time.perf_counter()
            library.store.search(query[None, :], K, None, None)
            latencies.append(time.perf_counter() - started)
        points[-1]["single_p50_ms"] = round(1000 * float(np.percentile(latencies, 50)), 2)
        points[-1]["single_p95_ms"] = round(1000 * float(np.percentile(latencies, 95)), 2)
        curves[kind] = points
        log(f"clipdex {kind}: " + "; ".join(f"{p['param']} {p['recall']:.3f} {p['qps']:.0f}/s" for p in points))
    library.close()
    return {"system": "clipdex", "index": f"{report['factory']} rerank {index.spec.rerank}", "build_seconds": optimized["seconds"],
            "import": optimized.get("import"), "optimize_report": {kind: {key: figures.get(key) for key in ("recall_at_10", "queries_per_second", "breadth_by_query")}
                                                                     for kind, figures in report["by_query_kind"].items()},
            "build_peak_gib": round(optimized["peak"] / 2**30, 2), "serve_peak_gib": round(peak_rss_gib(), 2), "curves": curves}


# -- the peers, each in a process of the peers' environment ---------------------------------------------

PEER_COMMON = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[6])  # benchmarks/: the curves are measured as clipdex's are
    from curves import K, log, peak_rss_gib as peak_gib, recall, timed_batch, worth_going_on
    data, work, budget, queries = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    build_memory = sys.argv[5]
    def part_number(path):  # img_emb_N.npy: the ground truth numbers the rows part 0, 1, 2, ...
        return int(Path(path).stem.split("_")[-1])
""")

AUTOFAISS = PEER_COMMON + textwrap.dedent("""
    import faiss
    from autofaiss import build_index
    def cpu_seconds():  # the build's processor time: unchanged by a pause (SIGSTOP) while something else runs
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    index_file, done = work / "autofaiss.index", work / "autofaiss-done.json"
    if done.exists():  # built by an earlier run (ten million take hours): searched again, not rebuilt
        built = json.loads(done.read_text())
        index, infos = faiss.read_index(str(index_file)), built["infos"]
        log(f"searching the {infos['index_key']} an earlier run built")
    else:
        started = time.perf_counter()
        # the parts as clip-retrieval hands them over: a folder of .npy files, read a batch at a time;
        # the index saved as clip-retrieval saves it
        index, infos = build_index(embeddings=str(Path(data) / "img_emb"), file_format="npy", save_on_disk=True,
                                   index_path=str(index_file), index_infos_path=str(work / "autofaiss-infos.json"),
                                   max_index_memory_usage=budget, current_memory_available=build_memory,
                                   metric_type="ip", verbose=20)
        built = {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds(), "peak_gib": peak_gib(),
                 "infos": {"index_key": infos["index_key"], "index_param": infos.get("index_param", "")}}
        done.write_text(json.dumps(built))
    build_seconds, build_cpu, build_peak = built["seconds"], built["cpu_seconds"], built["peak_gib"]
    # autofaiss numbers the vectors in the order its embedding_reader reads the parts, their paths
    # sorted as text (img_emb_10.npy before img_emb_2.npy; clip-retrieval reads the metadata beside
    # them in the same order); the ground truth's rows are in part_number order: ids are translated
    from embedding_reader import EmbeddingReader
    headers = EmbeddingReader(str(Path(data) / "img_emb"), file_format="npy").reader.headers
    counts = headers["count"].to_numpy()
    order = np.argsort(headers["filename"].map(part_number).to_numpy())
    starts = np.empty_like(counts)
    starts[order] = np.cumsum(counts[order]) - counts[order]  # each part's first row in the ground truth
    # (the last entry, -1, keeps the -1 of a result list shorter than K)
    row_of = np.concatenate([np.arange(start, start + count) for start, count in zip(starts, counts)] + [[-1]])
    faiss.omp_set_num_threads(1)
    tuned = infos.get("index_param", "")
    space = faiss.ParameterSpace()
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # a small collection: autofaiss chose a flat index, searched in one way only
        nlist = 0
    curves = {}
    for kind, path in queries.items():
        vectors, truth = np.load(path), np.load(path.replace("queries-", "truth-"))
        points, nprobe = [], 1
        while nprobe <= nlist:
            params = f"nprobe={nprobe}" + (",efSearch=" + str(max(2 * nprobe, 16)) if "HNSW" in infos["index_key"] else "")
            space.set_index_parameters(index, params)
            found, qps = timed_batch(lambda q: index.search(q, K)[1], vectors)
            points.append({"param": params, "recall": round(recall(row_of[found], truth), 4), "qps": round(qps, 1)})
            log(f"autofaiss {kind} {params}: {points[-1]['recall']:.3f} at {qps:,.0f}/s")
            if not worth_going_on(points):
                break
            nprobe *= 2
        space.set_index_parameters(index, tuned)
        found, qps = timed_batch(lambda q: index.search(q, K)[1], vectors)
        points.append({"param": "tuned: " + tuned, "recall": round(recall(row_of[found], truth), 4), "qps": round(qps, 1)})
        curves[kind] = points
    print(json.dumps({"system": "autofaiss", "index": infos["index_key"], "build_seconds": round(build_seconds, 1),
                      "build_cpu_seconds": round(build_cpu, 1), "build_memory": build_memory,
                      "build_peak_gib": round(build_peak, 2), "serve_peak_gib": round(peak_gib(), 2), "curves": curves}))
""")

DISKANN = PEER_COMMON + textwrap.dedent("""
    import shutil
    import diskannpy
    def base_of(data):
        files = sorted((Path(data) / "img_emb").glob("img_emb_*.npy"), key=part_number)
        return np.concatenate([np.load(p).astype(np.float32) for p in files])
    def gib_of(text):
        text = text.lower().rstrip("ib")
        scale = {"k": 2**-20, "m": 2**-10, "g": 1.0, "t": 2**10}.get(text[-1])
        return float(text[:-1]) * scale if scale else float(text) / 2**30
    folder = work / "diskann-index"
    started = time.perf_counter()
    if not (folder / "done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        base = base_of(data)
        diskannpy.build_disk_index(data=base, distance_metric="l2", index_directory=str(folder), complexity=100,
                                   graph_degree=64, search_memory_maximum=gib_of(budget),
                                   build_memory_maximum=gib_of(build_memory),
                                   num_threads=2, pq_disk_bytes=0)
        del base
        (folder / "done").write_text(json.dumps({"seconds": time.perf_counter() - started, "peak_gib": peak_gib()}))
    built = json.loads((folder / "done").read_text())  # a build of an earlier run is searched again, not rebuilt
    build_seconds, build_peak = built["seconds"], built["peak_gib"]
    count = sum(np.load(p, mmap_mode="r").shape[0] for p in (Path(data) / "img_emb").glob("img_emb_*.npy"))
    # two thread contexts, though each search runs on one thread: with one, the load never ends (diskannpy 0.7:
    # gdb shows it waiting in read_nodes, from use_medoids_data_as_centroids, for a free thread context)
    index = diskannpy.StaticDiskIndex(index_directory=str(folder), num_threads=2, num_nodes_to_cache=count // 100,
                                      cache_mechanism=1, distance_metric="l2", vector_dtype=np.float32, dimensions=512)
    curves = {}
    for kind, path in queries.items():
        vectors, truth = np.load(path), np.load(path.replace("queries-", "truth-"))
        points = []
        for complexity in (10, 20, 40, 80, 160, 320, 640):
            found, qps = timed_batch(lambda q: index.batch_search(q, k_neighbors=K, complexity=complexity, num_threads=1,
                                                                  beam_width=2).identifiers.astype(np.int64), vectors)
            points.append({"param": f"L={complexity}", "recall": round(recall(found, truth), 4), "qps": round(qps, 1)})
            log(f"diskann {kind} L={complexity}: {points[-1]['recall']:.3f} at {qps:,.0f}/s")
            if not worth_going_on(points):
                break
        curves[kind] = points
    print(json.dumps({"system": "diskann", "index": "disk index R=64 L=100, PQ in memory within the budget",
                      "build_seconds": round(build_seconds, 1), "build_peak_gib": build_peak and round(build_peak, 2),
                      "serve_peak_gib": round(peak_gib(), 2), "curves": curves}))
""")


def peers_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / "installed").exists():
        log(f"installing {', '.join(PEER_PACKAGES)} into {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        (venv / "installed").write_text("")
    return python


def run_peer(python: Path, name: str, script: str, data: Path, work: Path, budget: str, queries: dict[str, Path],
             timeout: float, build_memory: str) -> dict[str, Any]:
    path, log_path = work / f"peer_{name}.py", work / f"peer_{name}.log"
    path.write_text(script)
    log(f"{name}: building and searching (its log: {log_path}) ...")
    environment = dict(os.environ, OMP_NUM_THREADS="2")
    command = [str(python), str(path), str(data), str(work), budget, json.dumps({k: str(v) for k, v in queries.items()}),
               build_memory, str(HERE)]
    with log_path.open("w") as peer_log:
        try:
            result = subprocess.run(command, stdout=subprocess.PIPE, stderr=peer_log, text=True, env=environment, timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = log_path.read_text()[-300:]
            log(f"{name}: no answer within {timeout:.0f} s; its last words: {tail!r}")
            return {"system": name, "error": f"no answer within {timeout:.0f} s (last output: {tail!r})"}
    if result.returncode:
        tail = log_path.read_text()
        log(f"{name} failed: {tail[-3000:]}")
        return {"system": name, "error": tail[-500:]}
    # the last line that is the peer's answer: DiskANN's C++ may print after Python does
    outcome = next(json.loads(line) for line in reversed(result.stdout.splitlines()) if line.startswith('{"system"'))
    for kind, points in outcome["curves"].items():
        log(f"{name} {kind}: " + "; ".join(f"{p['param']} {p['recall']:.3f} {p['qps']:.0f}/s" for p in points))
    return outcome


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        if "error" in result:
            lines.append(f"{result['system']}: failed ({result['error'][-200:]})")
            continue
        cpu = f", {result['build_cpu_seconds']:.0f} s of processor time" if "build_cpu_seconds" in result else ""
        peak = "peak not recorded" if result["build_peak_gib"] is None else f"peak {result['build_peak_gib']} GiB"
        lines.append(f"{result['system']}: {result['index']}; built in {result['build_seconds']:.0f} s{cpu} ({peak}), "
                     f"searching peak {result['serve_peak_gib']} GiB")
        if result.get("import"):
            imported = result["import"]
            lines.append(f"  import-vectors: {imported['vectors_per_second']:,} vectors/s ({imported['seconds']:.0f} s), peak {imported['peak_gib']} GiB")
        for kind, points in result["curves"].items():
            lines.append(f"  {kind:<6} " + " | ".join(f"{p['param']}: {p['recall']:.3f} @ {p['qps']:,.0f}/s" for p in points))
            if "single_p95_ms" in points[-1]:
                lines.append(f"  {kind:<6} single queries (served): p50 {points[-1]['single_p50_ms']} ms, p95 {points[-1]['single_p95_ms']} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--budget", default="1G", help="the memory budget every system builds its index within")
    parser.add_argument("--data", type=Path, default=Path(".bench/import-data"))
    parser.add_argument("--work", type=Path, default=Path(".bench/ann-peers"))
    parser.add_argument("--peers", default="autofaiss,diskann")
    parser.add_argument("--peers-venv", type=Path, default=Path(".bench/ann-peers-venv"))
    parser.add_argument("--peer-timeout", type=float, default=3600, help="seconds a peer may take to build and search")
    parser.add_argument("--peer-build-memory", default="16G",
                        help="the memory each peer is told it may build with (autofaiss's current_memory_available, "
                             "DiskANN's build_memory_maximum)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-recall", default="0.95", help="clipdex optimize's target: one recall@10, or e.g. 0.95,text=0.9,queries=0.9")
    parser.add_argument("--float16", action="store_true", help="the data as clip-retrieval writes it: float16 parts (half the disk)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    suffix = "-f16" if args.float16 else ""
    data = args.data / f"{args.count}{suffix}"
    work = args.work / f"{args.count}{suffix}-{args.budget}"
    work.mkdir(parents=True, exist_ok=True)
    held_out = write_layout(data, args.count, args.seed, "float16" if args.float16 else "float32")
    queries = ground_truth(data, work, args.count, held_out, args.seed)
    results = [run_clipdex(data, work, args.count, args.budget, queries, args.target_recall)]
    peers = [name for name in args.peers.split(",") if name]
    if peers:
        python = peers_python(args.peers_venv.resolve())
        scripts = {"autofaiss": AUTOFAISS, "diskann": DISKANN}
        results += [run_peer(python, name, scripts[name], data.resolve(), work.resolve(), args.budget, queries, args.peer_timeout,
                             args.peer_build_memory) for name in peers]
    print(f"{args.count:,} vectors of 512 dimensions, memory budget {args.budget}, recall@{K} @ queries/s on one core "
          f"(batches of {QUERIES}); machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
