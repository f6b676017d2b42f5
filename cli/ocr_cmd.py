"""`clipdex ocr`: read the words in a library's images (the OCR pass, on its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clipdex.cli.common import JsonOption, LibraryOption, handles_errors, open_library, out, print_json
from clipdex.cli.progress import finish_run, progress_bar, stop_on_interrupt
from clipdex.search.media.ocr import OcrSettings
from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB


def register(app: typer.Typer) -> None:
    app.command("ocr")(ocr)


@handles_errors
def ocr(
    library: Optional[Path] = LibraryOption,
    batch_size: int = typer.Option(16, "--batch-size", min=1, max=4096, help="Images read per commit"),
    max_file_mb: int = typer.Option(DEFAULT_MAX_FILE_MB, "--max-file-mb", min=1, help="Report larger files as failed instead of reading them"),
    detect_side: int = typer.Option(
        OcrSettings().detect_side, "--detect-side", min=64, max=4096,
        help="The detector sees each image at most this many pixels a side: larger finds smaller text, at a cost",
    ),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any image could not be read"),
    json_output: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Read the text in the library's images not read yet (new or changed ones), for keyword search;
    stop with Ctrl-C and run again to go on. Turns OCR on for later index runs too."""
    from clipdex.indexer.ocr_pass import enable_ocr, read_texts

    lib = open_library(library)
    enable_ocr(lib)
    with stop_on_interrupt() as stop, progress_bar("Reading text", enabled=not quiet) as progress:
        report = read_texts(lib, batch_size=batch_size, settings=OcrSettings(detect_side=detect_side),
                            progress=progress, stop=stop, max_file_mb=max_file_mb)
    if json_output:
        print_json(report.to_json())
    else:
        out.print(f"{report.read} images read, {report.with_text} with text ({report.lines} lines), "
                  f"{report.changed} changed since indexed, {len(report.failed)} failed ({report.seconds:.1f}s) - "
                  f"library {lib.path}")
    finish_run(report, strict)
