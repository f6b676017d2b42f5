"""`clipdex explain`: where in an image a query matches."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import DeviceOption, JsonOption, LibraryOption, RuntimeOption, handles_errors, open_library, out, print_json
from clipdex.search.atomic import write_bytes_atomic
from clipdex.search.errors import ClipdexError
from clipdex.search.query import Query


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)


@handles_errors
def explain(
    text: Optional[str] = typer.Argument(None, metavar="[QUERY]", help="What to look for, in words"),
    item: Optional[int] = typer.Option(None, "--item", help="The indexed image to explain (its id, as search shows it)"),
    path: Optional[Path] = typer.Option(None, "--path", help="An image file to explain (indexed or not)"),
    image: List[Path] = typer.Option([], "--image", help="An image file as (part of) the query (repeatable)"),
    like: List[int] = typer.Option([], "--like", help="An indexed item id as (part of) the query (repeatable)"),
    vector: List[Path] = typer.Option([], "--vector", help="A .npy vector as (part of) the query (repeatable)"),
    minus: List[str] = typer.Option([], "--minus", help="A text to steer away from (repeatable)"),
    weight: List[float] = typer.Option(
        [], "--weight", help="Weights of the terms in order: text, images, likes, vectors, minus texts (default 1 each)"
    ),
    overlay_out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the photo with the map overlaid (PNG)"),
    at: Optional[float] = typer.Option(None, "--at", min=0, help="A video: the moment to explain, in seconds [default: the query's best]",
                                       show_default=False),
    json_output: bool = JsonOption,
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
) -> None:
    """Show where in an image the query matches: a grid of cosines, its peak, the hit's score."""
    if (item is None) == (path is None):
        raise ClipdexError("give exactly one of --item ID or --path FILE: the image to explain")
    query = Query.build(text=[text] if text else None, image=image, like=like, vector=vector, minus=minus, weights=weight)
    lib = open_library(library, device=device, runtime=runtime)
    explanation = lib.explain(query, item, path=path, timestamp=at)
    if overlay_out is not None:
        write_bytes_atomic(overlay_out, explanation.overlay_png())
    if json_output:
        print_json(explanation.to_json())
        return
    moment = "" if explanation.timestamp is None else f"  at {explanation.timestamp:.2f}s"
    out.print(f"score {explanation.score:.4f}{moment}  peak x={explanation.peak[0]:g} y={explanation.peak[1]:g} "
              f"of {explanation.width}x{explanation.height}  grid {explanation.rows}x{explanation.cols}")
    for row in explanation.grid:
        out.print(" ".join(f"{value:6.3f}" for value in row))
    if overlay_out is not None:
        out.print(f"overlay written to {overlay_out}")
