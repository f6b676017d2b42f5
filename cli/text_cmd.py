"""`clipdex index-texts`: text corpora into the same library and space."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clipdex.cli.common import Device
from clipdex.cli.common import DeviceOption, JsonOption, LibraryOption, ModelOption, PretrainedOption, err, handles_errors, open_library, out, print_json
from clipdex.cli.progress import finish_run, indexing_run
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB


def register(app: typer.Typer) -> None:
    app.command("index-texts")(index_texts_command)


@handles_errors
def index_texts_command(
    files: List[Path] = typer.Argument(..., metavar="FILE...", help=".txt (a text per line), .csv, .tsv or .jsonl files"),
    column: Optional[str] = typer.Option(None, "--column", help="The text column of .csv/.tsv/.jsonl [default: text]"),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="A column holding each text's stable id"),
    library: Optional[Path] = LibraryOption,
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    device: Device = DeviceOption,
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Texts per model batch and commit"),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any file or row failed"),
    max_file_mb: int = typer.Option(DEFAULT_MAX_FILE_MB, "--max-file-mb", min=1, help="Report larger files as failed instead of reading them"),
    json_output: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Index texts; re-runs update changed texts, skip unchanged ones and remove vanished ones."""
    from clipdex.indexer.texts import index_texts

    lib = open_library(library, model, pretrained, device, create=True)
    with indexing_run(lib, "Embedding texts", quiet) as (stop, progress):
        report = index_texts(lib, files, column=column, id_column=id_column, batch_size=batch_size, progress=progress, stop=stop,
                             max_file_mb=max_file_mb)
    if json_output:
        print_json(report.to_json())
    else:
        out.print(f"{report.added} added, {report.updated} updated, {report.removed} removed, "
                  f"{report.unchanged} unchanged, {len(report.failed)} failed - library {lib.path}")
    if report.truncated:
        err.print(f"note: {report.truncated} texts are longer than the model's {report.context_length}-token context; "
                  "only their beginning is embedded (marked truncated in their metadata)")
    finish_run(report, strict)
