"""`clipdex index`: photo folders into the library."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

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
    discard_new_library_on_error,
    err,
    handles_errors,
    open_library,
    out,
    print_json,
)
from clipdex.cli.progress import finish_run, indexing_run
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB


def register(app: typer.Typer) -> None:
    app.command("index")(index)


@handles_errors
def index(
    paths: List[Path] = typer.Argument(..., metavar="PATH...", help="Folders (recursively) or image and video files to index"),
    library: Optional[Path] = LibraryOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    catalog: Optional[str] = CatalogOption,
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096, help="Images per model batch and commit"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decode threads [default: one per core; on the CPU they take turns with the model's lanes]"),
    exclude: List[str] = typer.Option([], "--exclude", help="Skip files and folders matching this glob (repeatable)"),
    include_hidden: bool = typer.Option(False, "--include-hidden", help="Also index hidden files and folders"),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any file failed"),
    prune_empty_roots: bool = typer.Option(
        False, "--prune-empty-roots", help="Remove the items of a folder that has no images left (kept by default: it may be an unmounted drive)"
    ),
    max_file_mb: int = typer.Option(
        DEFAULT_MAX_FILE_MB, "--max-file-mb", min=1, help="Report larger files as failed instead of reading them"
    ),
    json_output: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS", show_default=False,
        help="Decode and embed on a Ray cluster: auto (the running cluster), local (one started here), "
             "ray://host:port or host:port. The files must be at the same paths on every node",
    ),
    ocr: bool = typer.Option(
        False, "--ocr", help="Also read the text in the images (after embedding them), for keyword search; "
                             "recorded in the library, so later runs do too",
    ),
    ray_gpus_per_worker: float = typer.Option(0.0, "--ray-gpus-per-worker", min=0.0, help="With --ray: GPUs per embedding actor (0: the model runs on the CPUs)"),
) -> None:
    """Index photo and video folders: new files are added, changed ones re-embedded, deleted ones removed."""
    from clipdex.indexer import index_paths

    cluster = None
    if ray is not None:
        from clipdex.indexer.cluster import ClusterOptions

        cluster = ClusterOptions(ray, gpus_per_worker=ray_gpus_per_worker)
    lib = open_library(library, model, pretrained, device, create=True, catalog=catalog, runtime=runtime)
    if cluster is None and not any(lib.catalog.counts().values()):
        with discard_new_library_on_error(lib):
            lib.encoders.ensure_weights()  # offline: the one-line error now, before any notice or progress bar
    if not quiet and lib.encoders.export_pending():
        how = ("also exports the model to ONNX, once for this library" if cluster is not None else
               "first exports the model to ONNX, once for this library (the photos are decoded meanwhile, then embedded "
               "with the export)")
        err.print(f"This run {how}: later runs and queries then need neither torch nor open_clip")
    with indexing_run(lib, "Indexing", quiet) as (stop, progress):
        report = index_paths(
            lib, paths, exclude=exclude, include_hidden=include_hidden, batch_size=batch_size,
            workers=workers, progress=progress, stop=stop, prune_empty_roots=prune_empty_roots, max_file_mb=max_file_mb,
            cluster=cluster, ocr=ocr,
        )
    if report.export_seconds and not quiet:
        err.print(f"exported the model to ONNX in {report.export_seconds:.1f}s (once for this library: "
                  "later runs and queries need neither torch nor open_clip)")
    if json_output:
        print_json(report.to_json())
    else:
        out.print(
            f"{report.added} added, {report.updated} updated, {report.moved} moved, {report.removed} removed, "
            f"{report.unchanged} unchanged, {len(report.failed)} failed ({report.seconds:.1f}s) - library {lib.path}"
        )
    if report.ocr is not None and not json_output:
        out.print(f"read text in {report.ocr.read} images: {report.ocr.with_text} with text "
                  f"({report.ocr.seconds:.1f}s)")
    finish_run(report, strict)
