"""`clipdex stats`, `check` and `export`: the library itself."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import (
    CatalogOption,
    DeviceOption,
    JsonOption,
    LibraryOption,
    ModelOption,
    PretrainedOption,
    RuntimeOption,
    err,
    handles_errors,
    open_library,
    out,
    print_json,
)
from clipdex.search.errors import ClipdexError
from clipdex.search.manifest import MANIFEST_FILE
from clipdex.search.paths import resolve_library_path


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("stats")(stats)
    app.command("check")(check)
    app.command("export")(export)


@handles_errors
def init(
    library: Optional[Path] = LibraryOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    catalog: Optional[str] = CatalogOption,
    json_output: bool = JsonOption,
) -> None:
    """Make an empty library for a model, or attach a new folder to a shared catalog (a replica)."""
    directory = resolve_library_path(library)
    if (directory / MANIFEST_FILE).exists():
        raise ClipdexError(f"{directory} is a library already; `clipdex stats --library {directory}` describes it")
    lib = open_library(directory, model, pretrained, create=True, catalog=catalog)
    counts = lib.catalog.counts()
    report = {
        "library": str(lib.path), "model": lib.model.name, "weights": lib.model.weights, "dim": lib.dim,
        "catalog": lib.manifest.catalog or str(lib.path / "catalog.sqlite"), "items": sum(counts.values()),
    }
    if json_output:
        print_json(report)
        return
    verb = "attached" if lib.attached else "made"
    out.print(f"{verb} library {lib.path}: model {report['model']} ({report['weights']}, {lib.dim}-d), "
              f"catalog {report['catalog']}, {report['items']} items", markup=False)


@handles_errors
def stats(library: Optional[Path] = LibraryOption, device: Device = DeviceOption, runtime: Runtime = RuntimeOption,
          json_output: bool = JsonOption) -> None:
    """Counts of items, images, texts and vectors; the model, what runs it, and the index type."""
    data = open_library(library, device=device, runtime=runtime).stats()
    if json_output:
        print_json(data)
        return
    for key in ("library", "catalog", "items", "images", "texts", "videos", "video_moments", "vectors", "model", "weights", "runtime", "dim", "index_type"):
        out.print(f"{key:>10}: {data[key]}")
    if "optimized" in data:
        from clipdex.search.index.optimize import describe_targets

        optimized = data["optimized"]
        target = describe_targets(optimized["target_recall"], optimized.get("target_recall_by_kind", {}))
        out.print(f"{'optimized':>10}: {optimized['optimized_at']}, target recall@10 {target}"
                  f" {'met' if optimized['target_met'] else 'NOT met'}")
        for kind, figures in optimized.get("by_query_kind", {}).items():
            params = ", ".join(f"{key}={value}" for key, value in figures["search_params"].items()) or "exact"
            chosen = figures.get("breadth_by_query")
            if chosen:  # the breadth is chosen per query; the recall was measured with it
                params = f"the breadth chosen per query (median {chosen['median']}, max {chosen['max']})"
            out.print(f"{kind:>10}: recall@10 {figures['recall_at_10']:.3f} with {params} ({figures['source']})")
        if not optimized.get("by_query_kind"):  # optimized by a clipdex that tuned one breadth for all queries
            out.print(f"{'':>10}  recall@10 {optimized['recall_at_10']:.3f}, one breadth for all queries: "
                      "run `clipdex optimize` again to tune text queries on their own")
    if data.get("read_only"):
        out.print(f"{'read-only':>10}: yes (cannot be written here: searches work, nothing is saved)")


@handles_errors
def check(
    library: Optional[Path] = LibraryOption,
    repair: bool = typer.Option(False, "--repair", help="Rebuild the vector index from the catalog if they disagree"),
    json_output: bool = JsonOption,
) -> None:
    """Verify that catalog, vector index and manifest agree."""
    report = open_library(library).check(repair=repair)
    if json_output:
        print_json(report)
    else:
        for problem in report["problems"]:
            err.print(f"problem: {problem}", markup=False)
        for repair_done in report.get("repairs", []):
            out.print(f"repaired: {repair_done}", markup=False)
        for cannot in report.get("unrepairable", []):
            err.print(f"cannot repair: {cannot}", markup=False)
        for note in report.get("notes", []):
            out.print(f"note: {note}", markup=False)
        if report["ok"]:
            out.print(f"ok: {report['items']} items, catalog and vectors agree")
        elif report["repaired"]:
            out.print("repaired: the vector index was rebuilt from the catalog")
        elif not report.get("unrepairable"):
            out.print("run `clipdex check --repair` to repair the catalog and rebuild the vector index from it")
    if not report["ok"] and not report["repaired"]:
        raise typer.Exit(1)


@handles_errors
def export(
    out_file: Path = typer.Option(..., "--out", "-o", help="The .npz file to write"),
    library: Optional[Path] = LibraryOption,
) -> None:
    """Write ids, kinds, paths, texts and vectors (float32, as stored) to an .npz file."""
    if out_file.suffix != ".npz":
        out_file = out_file.with_name(out_file.name + ".npz")  # numpy would add it silently
    count = open_library(library).export(out_file)
    out.print(f"exported {count} items to {out_file}")
