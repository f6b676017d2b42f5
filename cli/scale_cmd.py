"""`clipdex optimize` and `import-vectors`: the index at scale, and embeddings made elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clipdex.cli.common import JsonOption, LibraryOption, err, handles_errors, open_library, out, print_json
from clipdex.cli.progress import progress_bar


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize)
    app.command("import-vectors")(import_vectors)


@handles_errors
def optimize(
    target_recall: float = typer.Option(0.95, "--target-recall", min=0.01, max=1.0, help="Recall@10 to reach against exact search"),
    memory_budget: Optional[str] = typer.Option(
        None, "--memory-budget", help="Largest index size, e.g. 800M or 2G (picks compressed types to fit)", show_default=False
    ),
    library: Optional[Path] = LibraryOption,
    json_output: bool = JsonOption,
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS", show_default=False,
        help="Add the vectors to an IVF index in shards on a Ray cluster (auto, local, ray://host:port or host:port)",
    ),
) -> None:
    """Rebuild the vector index for the library's size and tune it to a target recall."""
    from clipdex.search.index_choice import parse_size
    from clipdex.search.optimize import optimize_library

    budget = parse_size(memory_budget) if memory_budget is not None else None
    lib = open_library(library)
    err.print(f"optimizing the {sum(lib.catalog.counts().values())} vectors of {lib.path} ...", markup=False)
    report = optimize_library(lib, target_recall, budget, cluster=ray)
    if json_output:
        print_json(report.to_json())
        return
    params = ", ".join(f"{key}={value}" for key, value in report.search_params.items()) or "exact"
    met = "met" if report.target_met else "NOT met"
    out.print(f"{'index':>16}: {report.factory or report.index_type} ({report.index_type}, {params}) on {report.device}")
    out.print(f"{'recall@10':>16}: {report.recall_at_10:.3f} (target {report.target_recall:.2f} {met}, {report.held_out_queries} held-out queries)")
    out.print(f"{'queries/s':>16}: {report.queries_per_second:.0f} ({report.speedup:.1f}x exact search's {report.exact_queries_per_second:.0f})")
    out.print(f"{'bytes/vector':>16}: {report.bytes_per_vector:.0f} ({report.vectors} vectors of {report.dim} dimensions)")
    out.print(f"{'time':>16}: {report.seconds:.1f}s (build {report.build_seconds:.1f}s)")


@handles_errors
def import_vectors(
    sources: List[Path] = typer.Argument(..., help="clipdex export .npz files or clip-retrieval output folders"),
    model_name: Optional[str] = typer.Option(
        None, "--model-name", help="Assert the model of clip-retrieval output (it records none), e.g. ViT-B-32", show_default=False
    ),
    library: Optional[Path] = LibraryOption,
    json_output: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Import precomputed embeddings as catalog items (images by path, texts by caption)."""
    from clipdex.search.import_vectors import import_vectors as run_import

    lib = open_library(library)
    with progress_bar("Importing", enabled=not quiet and not json_output) as progress:
        report = run_import(lib, sources, model_name=model_name, progress=progress)
    for note in report.notes:
        err.print(f"note: {note}", markup=False)
    if json_output:
        print_json(report.to_json())
        return
    rebuilt = f", index rebuilt as {report.index_type}" if report.index_rebuilt else ""
    kept = f", {report.kept} kept (indexed from their files)" if report.kept else ""
    out.print(f"{report.added} added, {report.replaced} replaced{kept} from {len(report.files)} files ({report.seconds:.1f}s){rebuilt}")
