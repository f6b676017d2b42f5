"""Make the README's pictures: `clipdex search --preview=blocks` and `clipdex browse`, on a
library of data/shapes.py images and the demo model, in a temporary folder.

    python docs/make_pictures.py      # writes docs/preview-blocks.svg and docs/browse.svg
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

from tests.demo_library import demo_library  # noqa: E402


def preview_picture(library_path: Path) -> None:
    from rich.console import Console
    from rich.text import Text
    from typer.testing import CliRunner

    from clipdex.cli.main import app

    columns = 100
    command = ["search", "a red circle", "--preview=blocks", "--preview-height", "7", "-k", "8", "--kind", "image"]
    result = CliRunner().invoke(app, [*command, "--library", str(library_path)], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    console = Console(record=True, width=columns, file=open(os.devnull, "w"), force_terminal=True, color_system="truecolor")
    console.print(Text.from_ansi(result.stdout), end="")
    console.save_svg(str(DOCS / "preview-blocks.svg"), title="clipdex " + " ".join(command[:2]) + " --preview")


async def browse_picture(library_path: Path) -> None:
    from textual.widgets import Input, Select
    from textual_image.widget import HalfcellImage

    from clipdex.cli.browse import BrowseApp
    from clipdex.search.library import Library

    library = Library.open(library_path)
    app = BrowseApp(library, opener=lambda path: None, picture=HalfcellImage, k=20)
    async with app.run_test(size=(110, 32)) as pilot:
        app.query_one("#kind", Select).value = "image"
        app.query_one("#query", Input).value = "a red circle"
        for _ in range(1000):
            await pilot.pause()
            if app.shown and app.shown[-1][0] == app.request and app.query("#picture HalfcellImage"):
                break
            await asyncio.sleep(0.02)
        await pilot.press("down", "down")
        for _ in range(200):
            await asyncio.sleep(0.02)
            await pilot.pause()
        app.save_screenshot("browse.svg", str(DOCS))
    library.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("CLIPDEX_CACHE_DIR", str(Path(folder) / "cache"))
        library = demo_library(Path(folder), count=24)
        library.close()
        preview_picture(Path(folder) / "library")
        asyncio.run(browse_picture(Path(folder) / "library"))


if __name__ == "__main__":
    main()
