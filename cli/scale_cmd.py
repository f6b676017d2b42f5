"""`clipdex optimize` and `import-vectors`: the index at scale, and embeddings made elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from clipdex.cli.common import JsonOption, LibraryOption, err, handles_errors, open_library, out, print_json
from clipdex.cli.progress import progress_bar
from clipdex.search.errors import ClipdexError, LibraryNotFound

if TYPE_CHECKING:
    from clipdex.search.index.optimize import OptimizeReport


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize)
    app.command("import-vectors")(import_vectors)


@handles_errors
def optimize(
    target_recall: str = typer.Option(
        "0.95", "--target-recall", metavar="RECALL[,KIND=RECALL...]",
        help="Recall@10 to reach against exact search, for each query kind; a kind (image, text, queries) may have its own, e.g. 0.95,text=0.9",
    ),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="Largest index size, e.g. 800M or 2G (picks compressed types to fit)", show_default=False
    ),
    queries: Optional[Path] = typer.Option(
        None, "--queries", help="Text-like query vectors to tune on (.npy, n x dim), e.g. your own embedded queries", show_default=False
    ),
    library: Optional[Path] = LibraryOption,
    json_output: bool = JsonOption,
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS", show_default=False,
        help="Add the vectors to an IVF index in shards on a Ray cluster (auto, local, ray://host:port or host:port)",
    ),
) -> None:
    """Rebuild the vector index for the library's size and tune it to a target recall, for image-like and text-like queries."""
    from clipdex.search.index.choice import parse_size
    from clipdex.search.index.optimize import RecallTargets, optimize_library

    targets = RecallTargets.parse(target_recall)
    budget = parse_size(memory_budget) if memory_budget is not None else None
    lib = open_library(library)
    lib.check_writable()  # busy or read-only: said now, not after the build
    err.print(f"optimizing the {sum(lib.catalog.counts().values())} vectors of {lib.path} ...", markup=False)
    report = optimize_library(lib, targets, budget, queries_file=queries, cluster=ray)
    if json_output:
        print_json(report.to_json())
    else:
        print_optimize_report(report)
    if not report.target_met:
        for line in report.advice:
            err.print(f"target missed: {line}", markup=False)
        err.print("the index was saved as tuned; searches use it", markup=False)
        raise typer.Exit(1)


def print_optimize_report(report: "OptimizeReport") -> None:
    met = "met" if report.target_met else "NOT met"
    out.print(f"{'index':>16}: {report.factory or report.index_type} ({report.index_type}) on {report.device}")
    from clipdex.search.index.optimize import describe_targets

    target = describe_targets(report.target_recall, report.target_recall_by_kind)
    out.print(f"{'recall@10':>16}: {report.recall_at_10:.3f} (the lower of the kinds; target {target} {met})")
    name = "nprobe" if report.index_type == "ivf" else "efSearch"
    for kind, figures in report.by_query_kind.items():
        params = ", ".join(f"{key}={value}" for key, value in figures["search_params"].items()) or "exact"
        chosen = figures.get("breadth_by_query")
        if chosen:  # the per-query rule's breadths, which the recall was measured with
            params = f"{name} per query (median {chosen['median']}, 90% ≤ {chosen['p90']}, max {chosen['max']})"
        best = "" if figures["best_match_cosine"] is None else f", best match at cosine {figures['best_match_cosine']:.2f}"
        own = "" if kind not in report.target_recall_by_kind else f" (its target {figures['target_recall']:.2f})"
        out.print(f"{kind + ' queries':>16}: recall@10 {figures['recall_at_10']:.3f}{own} with {params}, "
                  f"{figures['queries_per_second']:.0f}/s ({figures['speedup']:.1f}x exact); "
                  f"{figures['queries']} queries: {figures['source']}{best}")
    for other in report.alternatives:
        slower = min(other["by_query_kind"].values(), key=lambda figures: figures["queries_per_second"])
        out.print(f"{'also tried':>16}: {other['factory']} (slower kind {slower['queries_per_second']:.0f}/s at recall@10 "
                  f"{slower['recall_at_10']:.3f}{'' if all(f['target_met'] for f in other['by_query_kind'].values()) else ', target NOT met'})")
    if report.breadth_rule:
        out.print(f"{'search breadth':>16}: chosen per query, {name} {report.breadth_rule}")
    out.print(f"{'exact queries/s':>16}: {report.exact_queries_per_second:.0f}")
    out.print(f"{'bytes/vector':>16}: {report.bytes_per_vector:.0f} ({report.vectors} vectors of {report.dim} dimensions)")
    out.print(f"{'time':>16}: {report.seconds:.1f}s (build {report.build_seconds:.1f}s)")


@handles_errors
def import_vectors(
    sources: List[Path] = typer.Argument(..., metavar="FILE_OR_DIR...", help="clipdex export .npz files or clip-retrieval output folders"),
    model_name: Optional[str] = typer.Option(
        None, "--model-name", help="Assert the model of clip-retrieval output (it records none), e.g. ViT-B-32", show_default=False
    ),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="Largest index size, e.g. 800M or 2G (picks compressed types to fit; kept by later rebuilds)",
        show_default=False,
    ),
    float16: bool = typer.Option(
        False, "--float16", help="Store every vector as float16: half the catalog's disk (float16 files are stored so anyway)",
    ),
    library: Optional[Path] = LibraryOption,
    json_output: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Import precomputed embeddings as catalog items (images by path, texts by caption)."""
    from clipdex.search.index.choice import parse_size
    from clipdex.search.index.import_vectors import import_vectors as run_import

    try:
        lib = open_library(library)
    except LibraryNotFound as error:  # someone else's vectors: there is no index run to make the library
        raise ClipdexError(
            f"no clipdex library at {error.path}: make one for the vectors' model first, e.g. "
            f"clipdex init --library {error.path} --model ViT-B-32 --pretrained laion2b_s34b_b79k"
        ) from None
    with progress_bar("Importing", enabled=not quiet and not json_output) as progress:
        report = run_import(lib, sources, model_name=model_name, progress=progress,
                            memory_budget=parse_size(memory_budget) if memory_budget is not None else None, float16=float16)
    for note in report.notes:
        err.print(f"note: {note}", markup=False)
    if json_output:
        print_json(report.to_json())
        return
    rebuilt = f", index rebuilt as {report.index_type}" if report.index_rebuilt else ""
    kept = f", {report.kept} kept (indexed from their files)" if report.kept else ""
    out.print(f"{report.added} added, {report.replaced} replaced{kept} from {len(report.files)} files ({report.seconds:.1f}s){rebuilt}")
