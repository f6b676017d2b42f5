"""`clipdex search` and `clipdex embed`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Literal, Optional

import typer
from typer.core import TyperCommand

from clipdex.cli.common import Device, Runtime
from clipdex.cli.common import (
    DeviceOption,
    JsonOption,
    LibraryOption,
    ModelOption,
    PretrainedOption,
    RuntimeOption,
    check_runtime,
    model_spec,
    handles_errors,
    open_library,
    opened,
    out,
    print_json,
)
from clipdex.cli.render import Format, render_hits
from clipdex.search.encoders.base import ImageTextEncoder
from clipdex.search.encoders.factory import create_encoder
from clipdex.search.errors import ClipdexError, LibraryNotFound
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.query import Query

LangOption = typer.Option(
    None, "--lang", metavar="CODE",
    help="The query's language as an NLLB code (zho_Hans, spa_Latn, eng_Latn...), for models whose text tower "
         "takes one (multilingual-nllb); detected from the text's script when not given; other models ignore it",
    show_default=False,
)

PreviewChoice = Literal["auto", "kitty", "iterm", "sixel", "blocks"]
Kind = Literal["image", "text", "video", "any"]  # the query's KIND_CHOICES (tests/test_cli_conventions.py)
Mode = Literal["hybrid", "semantic", "keyword"]  # the query's MODE_CHOICES
Sort = Literal["relevance", "date", "-date"]  # the query's SORT_CHOICES


class SearchCommand(TyperCommand):
    """`search`, whose `--preview` takes its protocol after an `=` only: a bare `--preview` is
    `--preview=auto` (typer has no options with an optional value), so `search --preview cats`
    searches for cats."""

    def parse_args(self, ctx: Any, args: List[str]) -> List[str]:
        if "--" in args:
            end = args.index("--")
            args = [_bare_preview(arg) for arg in args[:end]] + args[end:]
        else:
            args = [_bare_preview(arg) for arg in args]
        return super().parse_args(ctx, args)


def _bare_preview(arg: str) -> str:
    return "--preview=auto" if arg == "--preview" else arg


def register(app: typer.Typer) -> None:
    app.command("search", cls=SearchCommand)(search)
    app.command("embed")(embed)


@handles_errors
def search(
    text: Optional[str] = typer.Argument(None, metavar="[TEXT]", help="What to look for, in words"),
    image: List[Path] = typer.Option([], "--image", help="An image file as (part of) the query (repeatable)"),
    like: List[int] = typer.Option([], "--like", help="An indexed item id as (part of) the query (repeatable)"),
    vector: List[Path] = typer.Option([], "--vector", help="A .npy vector as (part of) the query (repeatable)"),
    minus: List[str] = typer.Option([], "--minus", help="A text to steer away from (repeatable)"),
    weight: List[float] = typer.Option(
        [], "--weight", help="Weights of the terms in order: text, images, likes, vectors, minus texts (default 1 each)"
    ),
    kind: Kind = typer.Option("any", "--kind", help="What to return: images, texts, videos or any"),
    path: Optional[str] = typer.Option(None, "--path", help="Only paths matching this glob (e.g. '*/2024/*')"),
    after: Optional[str] = typer.Option(None, "--after", help="Captured at or after this date/time (EXIF)"),
    before: Optional[str] = typer.Option(None, "--before", help="Captured before this date/time (EXIF)"),
    min_width: Optional[int] = typer.Option(None, "--min-width", min=0, help="Minimum image width in pixels"),
    min_height: Optional[int] = typer.Option(None, "--min-height", min=0, help="Minimum image height in pixels"),
    k: int = typer.Option(10, "-k", "--top", min=1, max=10_000, help="How many hits"),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many best hits (paging)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Minimum cosine score"),
    per_video: int = typer.Option(1, "--per-video", min=1, max=1000, help="The N best moments of each video hit"),
    mode: Optional[Mode] = typer.Option(
        None, "--mode", show_default=False,
        help="Match the text by meaning (semantic), by the words of names, texts, EXIF and OCR (keyword), or both "
             "fused (hybrid) [default: hybrid when the library has keyword data]",
    ),
    sort: Sort = typer.Option("relevance", "--sort", help="The best hits by relevance, shown in this order (date: capture time)"),
    confident: bool = typer.Option(False, "--confident", help="Only the hits that stand out from this query's scores over the library"),
    format: Format = typer.Option("table", "--format", "-f", help="Output: a table, JSON, the paths alone, or an HTML page (--out)"),
    null: bool = typer.Option(False, "-0", "--null", help="With --format paths: NUL-separated"),
    html_out: Optional[Path] = typer.Option(None, "--out", "-o", help="With --format html: the file to write"),
    json_output: bool = JsonOption,
    preview: Optional[PreviewChoice] = typer.Option(
        None, "--preview",
        help="Show the hits as pictures in the terminal: a bare --preview (auto) picks what the terminal "
             "draws (kitty, iTerm2, sixel, else half blocks; nothing when stdout is not a terminal); "
             "--preview=kitty|iterm|sixel|blocks (with the '=') forces one"),
    preview_height: int = typer.Option(10, "--preview-height", min=2, max=200, metavar="ROWS",
                                       help="With --preview: each picture's height in terminal rows"),
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    lang: Optional[str] = LangOption,
) -> None:
    """Search by text, image, item or vector - or a weighted mix of them."""
    if json_output:
        format = "json"
    if format == "html" and html_out is None:
        raise ClipdexError("--format html needs --out FILE.html")
    if preview is not None and format != "table":
        raise ClipdexError(f"--preview shows the hits as pictures; leave out --format {format}")
    query = Query.build(
        text=[text] if text else None, image=image, like=like, vector=vector, minus=minus, weights=weight,
        k=k, offset=offset, threshold=threshold, per_video=per_video, mode=mode, sort=sort, confident=confident,
        kind=kind, path=path, after=after, before=before, min_width=min_width, min_height=min_height,
    )
    from clipdex.search.encoders.hf_tokenizer import query_language

    lib = open_library(library, device=device, runtime=runtime)
    with query_language(lang):
        hits = lib.search(query)
    if preview is not None and hits:
        from clipdex.cli.preview import choose_protocol, print_preview

        protocol = choose_protocol(preview)
        if protocol is not None:
            print_preview(lib, hits, protocol, preview_height)
            return
    render_hits(hits, format, null=null, html_out=html_out, title=_title(text, image, like, minus))


def _title(text: Optional[str], image: List[Path], like: List[int], minus: List[str]) -> str:
    parts = ([repr(text)] if text else []) + [f"image {p}" for p in image] + [f"like #{i}" for i in like]
    parts += [f"minus {m!r}" for m in minus]
    return " + ".join(parts) or "search"


@handles_errors
def embed(
    text: Optional[str] = typer.Option(None, "--text", help="A text to embed"),
    image: Optional[Path] = typer.Option(None, "--image", help="An image file to embed"),
    model: Optional[str] = ModelOption,
    pretrained: Optional[str] = PretrainedOption,
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
    json_output: bool = JsonOption,
    lang: Optional[str] = LangOption,
) -> None:
    """Print the normalized vector of a text or an image (the library's model unless --model is given)."""
    if (text is None) == (image is None):
        raise ClipdexError("give exactly one of --text or --image")
    encoder = encoder_for(library, model, pretrained, device, runtime)
    if text is not None:
        from clipdex.search.encoders.hf_tokenizer import query_language

        with query_language(lang):
            vector = encoder.encode_texts([text])[0]
    else:
        from clipdex.search.media.imaging import MAX_QUERY_IMAGE_PIXELS, decode_image

        vector = encoder.encode_images([decode_image(image, max_pixels=MAX_QUERY_IMAGE_PIXELS).image])[0]  # type: ignore[arg-type]
    if json_output:
        print_json({"model": encoder.spec.name, "weights": encoder.spec.weights, "dim": int(vector.shape[0]),
                    "vector": [float(x) for x in vector]})
    else:
        out.print(" ".join(f"{x:.7g}" for x in vector))


def encoder_for(library: Optional[Path], model: Optional[str], pretrained: Optional[str], device: str,
                runtime: str = "auto") -> ImageTextEncoder:
    """The named model's encoder; else the library's (when it exists: on `runtime`); else the default model's."""
    spec = model_spec(model, pretrained)
    if spec is None:
        try:
            return opened(Library.open(library, device=device, runtime=check_runtime(runtime))).encoder
        except LibraryNotFound:
            spec = ModelSpec()
    return create_encoder(spec.resolve(), device)
