"""`clipdex tag` (zero-shot labels) and `clipdex duplicates` (near-duplicate groups)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import (
    DeviceOption,
    JsonOption,
    LibraryOption,
    ModelOption,
    PretrainedOption,
    RuntimeOption,
    controls_escaped,
    handles_errors,
    out,
    print_json,
)
from clipdex.search.errors import ClipdexError, UnreadableImage


def register(app: typer.Typer) -> None:
    app.command("tag")(tag)
    app.command("duplicates")(duplicates)


def read_labels(values: List[str]) -> list[str]:
    """Each value is a label, or a (regular, UTF-8) file with one label per line."""
    from clipdex.search.media.safe_read import DEFAULT_MAX_FILE_MB, MB, read_regular_file

    labels: list[str] = []
    for value in values:
        path = Path(value)
        if not path.is_file():
            labels.append(value)
            continue
        try:
            text = read_regular_file(path, DEFAULT_MAX_FILE_MB * MB)[0].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ClipdexError(f"{path}: labels file is not UTF-8 text ({error.reason} at byte {error.start})") from None
        labels += [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ClipdexError("no labels: pass --labels FILE (a label per line) or --labels TEXT (repeatable)")
    return list(dict.fromkeys(labels))


def _check_images_exist(images: List[Path], labels: List[str]) -> None:
    """Before any work: `--labels cat dog` makes `dog` an image; say how to give several labels."""
    from clipdex.search.media.imaging import is_image_path

    for image in images:
        if not image.exists() and not image.is_symlink():
            hint = ""
            if not is_image_path(image):
                hint = (f"; to give several labels repeat the option (--labels {labels[-1]} --labels {image}) "
                        "or pass a file with one label per line")
            raise ClipdexError(f"{image}: no such image file{hint}")


@handles_errors
def tag(
    images: List[Path] = typer.Argument(..., metavar="IMAGE...", help="Image files to label"),
    labels: List[str] = typer.Option(..., "--labels", help="A label, or a file with a label per line (repeatable)"),
    template: List[str] = typer.Option([], "--template", help="Prompt template with {} for the label (repeatable) [default: 'a photo of a {}.']"),
    top: int = typer.Option(3, "--top", min=1, help="Labels to show per image"),
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    json_output: bool = JsonOption,
) -> None:
    """Zero-shot labels for images: the best labels, with probabilities and cosine scores."""
    from clipdex.cli.search_cmd import encoder_for
    from clipdex.search.media.imaging import decode_image
    from clipdex.search.analysis.zero_shot import DEFAULT_TEMPLATES, classify, label_vectors

    names = read_labels(labels)
    _check_images_exist(images, labels)
    encoder = encoder_for(library, model, pretrained, device, runtime)
    vectors = label_vectors(encoder, names, template or DEFAULT_TEMPLATES)
    results: list[dict[str, Any]] = []
    for image in images:
        try:
            image_vector = encoder.encode_images([decode_image(image).image])
        except UnreadableImage as error:
            results.append({"image": str(image), "error": error.reason, "labels": []})
            continue
        results.append({"image": str(image), "labels": [label.to_json() for label in classify(image_vector, names, vectors, top)[0]]})
    if json_output:
        print_json(results)
    else:
        for result in results:
            described = "; ".join(f"{l['label']} {l['probability']:.2f}" for l in result["labels"]) or f"error: {result['error']}"
            out.print(controls_escaped(f"{result['image']}: {described}"), markup=False)
    if any("error" in result for result in results):
        raise typer.Exit(1)


@handles_errors
def duplicates(
    threshold: float = typer.Option(0.95, "--threshold", min=-1.0, max=1.0, help="Minimum cosine for two images to be near-duplicates"),
    library: Optional[Path] = LibraryOption,
    json_output: bool = JsonOption,
) -> None:
    """Group near-duplicate images of the library (resized, re-encoded, lightly edited copies)."""
    from clipdex.cli.common import open_library
    from clipdex.search.analysis.duplicates import find_duplicates

    groups = find_duplicates(open_library(library), threshold)
    if json_output:
        print_json([group.to_json() for group in groups])
        return
    if not groups:
        out.print(f"no near-duplicates at cosine >= {threshold}")
    from rich.table import Table
    from rich.text import Text

    for number, group in enumerate(groups, start=1):
        table = Table(title=f"group {number}: {len(group.ids)} images, min cosine {group.min_score:.4f}", box=None, show_header=False)
        for item_id, path in zip(group.ids, group.paths):
            table.add_row(str(item_id), Text(controls_escaped(path)))  # as the search table shows names
        out.print(table)
