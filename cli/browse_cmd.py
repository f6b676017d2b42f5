"""`clipdex browse`: the full-screen terminal browser (cli/browse.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import typer

from clipdex.cli.common import Device, DeviceOption, LibraryOption, Runtime, RuntimeOption, handles_errors, open_library
from clipdex.search.errors import ClipdexError

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.cli.browse import PictureWidget


def register(app: typer.Typer) -> None:
    app.command("browse")(browse)


@handles_errors
def browse(
    k: int = typer.Option(50, "-k", "--top", min=1, max=1000, help="How many hits a search shows"),
    library: Optional[Path] = LibraryOption,
    device: Device = DeviceOption,
    runtime: Runtime = RuntimeOption,
) -> None:
    """Browse the library in the terminal: results as you type, pictures, filters, more like this."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise ClipdexError("clipdex browse needs a terminal; use clipdex search for scripts and pipes")
    try:
        from clipdex.cli.browse import BrowseApp
    except ImportError as error:
        raise ClipdexError("clipdex browse needs Textual: pip install 'clipdex[browse]'") from error
    picture = picture_widget(os.environ)  # before the app starts: textual-image asks the terminal then
    lib = open_library(library, device=device, runtime=runtime)
    lib.text_encoder().encode_texts(["a photo"])  # the cold text tower, loaded once, before the first keystroke
    BrowseApp(lib, picture=picture, k=k).run()


def picture_widget(environ: Mapping[str, str]) -> "Optional[PictureWidget]":
    """The textual-image widget for this terminal: kitty's graphics protocol (its Unicode
    placeholders) in kitty, sixel where the environment names a sixel terminal or iTerm2
    (which draws sixel too), half blocks in tmux, textual-image's own choice (it asks the
    terminal) elsewhere; none with NO_COLOR or without textual-image."""
    from clipdex.cli.preview import in_tmux, protocol_from_environment

    if environ.get("NO_COLOR"):
        return None
    try:
        from textual_image import widget
    except ImportError:
        return None
    protocol = protocol_from_environment(environ)
    if protocol == "kitty" and not in_tmux(environ):
        return widget.TGPImage
    if protocol in ("sixel", "iterm"):
        return widget.SixelImage
    if in_tmux(environ) or protocol == "kitty":
        return widget.HalfcellImage
    return widget.Image
