"""`clipdex evaluate`: retrieval recall of a model on images with captions (COCO/Flickr30k style)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import (
    DeviceOption,
    JsonOption,
    LibraryOption,
    ModelOption,
    PretrainedOption,
    RuntimeOption,
    handles_errors,
    out,
    print_json,
)
from clipdex.cli.progress import progress_bar
from clipdex.search.errors import ClipdexError


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


@handles_errors
def evaluate(
    images: Path = typer.Option(..., "--images", help="Folder holding the images the captions file names"),
    captions: Path = typer.Option(..., "--captions", help="TSV/CSV with columns image, caption (or JSONL with those keys)"),
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per model batch"),
    json_output: bool = JsonOption,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
) -> None:
    """Recall@1/5/10 image->text and text->image of a model on a captioned image set."""
    from clipdex.cli.search_cmd import encoder_for
    from clipdex.search.analysis.evaluate import group_captions, read_captions, retrieval_recall

    try:
        pairs = read_captions(captions)
    except (OSError, ValueError) as error:
        raise ClipdexError(str(error)) from None
    names, texts, owners = group_captions(pairs)
    missing = [name for name in names if not (images / name).is_file()]
    if missing:
        raise ClipdexError(f"{len(missing)} images named in {captions} are not in {images}, e.g. {missing[0]}")
    encoder = encoder_for(library, model, pretrained, device, runtime)
    with progress_bar("Encoding images", enabled=not quiet) as progress:
        image_vectors = encoder.encode_files([images / name for name in names], batch_size, progress)
    text_vectors = encoder.encode_texts(texts)
    result = retrieval_recall(image_vectors, text_vectors, owners)
    result["model"] = encoder.spec.describe()
    if json_output:
        print_json(result)
        return
    out.print(f"{result['num_images']} images, {result['num_texts']} captions, model {result['model']}")
    for direction in ("image_to_text", "text_to_image"):
        recalls = "  ".join(f"{k} {100 * v:5.1f}%" for k, v in result[direction].items())
        out.print(f"{direction.replace('_', ' '):>14}: {recalls}")
