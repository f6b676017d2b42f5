"""`clipdex browse`, driven with Textual's pilot on a demo library of data/shapes.py images:
type a query and see the hits, move, open, copy, more like this, filters, stats."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Select, Static
from typer.testing import CliRunner

from clipdex.cli.browse import BrowseApp, HitsTable, Request, folder_glob
from clipdex.cli.main import app as cli_app
from clipdex.cli.preview import tail
from tests.demo_library import shared_demo_library

pytest.importorskip("textual_image")
from textual_image.widget import HalfcellImage  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    library = shared_demo_library(tmp_path_factory.getbasetemp())
    yield library
    library.close()


class Browser:
    """A BrowseApp whose opener records what it was asked to open."""

    def __init__(self, library: Any, pictures: bool = False, **options: Any) -> None:
        self.opened: list[str] = []
        self.app = BrowseApp(library, opener=self.opened.append, picture=HalfcellImage if pictures else None,
                             debounce=0.05, **options)


async def settled(pilot: Any, app: BrowseApp, timeout: float = 20) -> None:
    """Wait until the app shows the hits of its current request."""
    await pilot.pause()  # the edits' messages handled first
    for _ in range(int(timeout / 0.02)):
        if app.shown and app.shown[-1][0] == app.request:
            await pilot.pause()
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{app.request} not shown; the last shown: {app.shown[-1:] or None}")


def rows(app: BrowseApp) -> list[list[str]]:
    table = app.query_one(HitsTable)
    return [[str(cell) for cell in table.get_row_at(index)] for index in range(table.row_count)]


def test_typing_shows_the_same_hits_as_search(demo) -> None:
    expected = demo.search(text="a red circle", k=5)

    async def run() -> None:
        browser = Browser(demo, pictures=True, k=5)
        async with browser.app.run_test(size=(120, 36)) as pilot:
            await pilot.press(*"a red circle")
            await settled(pilot, browser.app)
            request, _, count = browser.app.shown[-1]
            assert (request.text, count) == ("a red circle", 5)
            assert rows(browser.app) == [[str(hit.rank), f"{hit.score:.4f}", hit.kind, tail(hit.path or hit.text, 60)]
                                         for hit in expected]
            assert f"#1  score {expected[0].score:.4f}  id {expected[0].id}" in str(browser.app.query_one("#info").render())

    asyncio.run(run())


async def picture_shown(pilot: Any, app: BrowseApp) -> bool:
    for _ in range(200):
        await pilot.pause()
        if app.query("#picture HalfcellImage"):
            return True
        await asyncio.sleep(0.02)
    return False


def test_typing_faster_than_the_debounce_searches_once(demo) -> None:
    async def run() -> None:
        browser = Browser(demo)
        browser.app.debounce = 3.0
        async with browser.app.run_test(size=(120, 36)) as pilot:
            await pilot.press(*"red")
            await settled(pilot, browser.app)
            assert [request.text for request, _, _ in browser.app.shown] == ["red"]

    asyncio.run(run())


def test_enter_searches_at_once_and_goes_to_the_hits(demo) -> None:
    async def run() -> None:
        browser = Browser(demo)
        browser.app.debounce = 30.0
        async with browser.app.run_test(size=(120, 36)) as pilot:
            browser.app.query_one("#query", Input).value = "a star"
            await pilot.press("enter")
            await settled(pilot, browser.app, timeout=15)
            assert isinstance(browser.app.focused, HitsTable) and len(rows(browser.app)) == 16

    asyncio.run(run())


def test_move_open_copy_and_more_like_this(demo) -> None:
    expected = demo.search(text="a blue square", kind="image", k=6)

    async def run() -> None:
        browser = Browser(demo, pictures=True, k=6)
        app = browser.app
        async with app.run_test(size=(120, 36)) as pilot:
            app.query_one("#kind", Select).value = "image"
            await pilot.press(*"a blue square")
            await settled(pilot, app)
            await pilot.press("down")  # from the query box to the hits
            assert isinstance(app.focused, HitsTable)
            await pilot.press("down", "down")
            assert app.selected() == expected[2]
            assert await picture_shown(pilot, app)
            await pilot.press("enter")
            await pilot.press("o")
            assert browser.opened == [expected[2].path, expected[2].path]
            await pilot.press("c")
            assert app.clipboard == expected[2].path
            await pilot.press("m")
            await settled(pilot, app)
            like = demo.search(like=expected[2].id, kind="image", k=6)
            assert app.shown[-1][0].like == expected[2].id
            assert [row[3] for row in rows(app)] == [tail(hit.path, 60) for hit in like]
            assert like[0].id == expected[2].id  # an item is most like itself
            assert "more like #" in str(app.query_one("#status").render())

    asyncio.run(run())


def test_filters_narrow_the_hits(demo) -> None:
    async def run() -> None:
        browser = Browser(demo, k=20)
        app = browser.app
        async with app.run_test(size=(120, 36)) as pilot:
            app.query_one("#query", Input).value = "a circle"
            await settled(pilot, app)
            assert len(rows(app)) == 16
            app.query_one("#kind", Select).value = "text"
            await settled(pilot, app)
            assert sorted(row[3] for row in rows(app)) == ["a green star on a white background", "a red circle, in words"]
            app.query_one("#kind", Select).value = "image"
            await settled(pilot, app)
            assert len(rows(app)) == 14 and {row[2] for row in rows(app)} == {"image"}
            await pilot.press("ctrl+f")
            assert app.focused is app.query_one("#folder")
            app.query_one("#folder", Input).value = str(Path(demo.path).parent / "photos" / "more")  # as pasted
            await settled(pilot, app)
            assert len(rows(app)) == 2 and all("/photos/more/" in row[3] for row in rows(app))
            await pilot.press("tab")
            assert app.focused is app.query_one("#after")
            app.query_one("#after", Input).value = "2999-01-01"  # nothing is that new
            await settled(pilot, app)
            assert rows(app) == []

    asyncio.run(run())


def test_a_bad_filter_says_why_and_stats_show(demo) -> None:
    async def run() -> None:
        browser = Browser(demo)
        app = browser.app
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press(*"a star")
            await settled(pilot, app)
            await pilot.press("ctrl+f", "tab", *"yesterday")
            for _ in range(200):
                await pilot.pause()
                if "after= wants a date" in str(app.query_one("#status").render()):
                    break
                await asyncio.sleep(0.02)
            assert "after= wants a date or time like 2024-07-31" in str(app.query_one("#status").render())
            assert "16 items (14 images, 2 texts) · clipdex-demo" in str(app.query_one("#status").render())
            app.query_one(HitsTable).focus()
            await pilot.press("s")
            assert "vectors: 16" in str(app.query_one("#info").render())

    asyncio.run(run())


def test_a_text_hit_shows_its_text_and_has_no_file_to_open(demo) -> None:
    async def run() -> None:
        browser = Browser(demo, pictures=True)
        app = browser.app
        async with app.run_test(size=(120, 36)) as pilot:
            app.query_one("#kind", Select).value = "text"
            app.query_one("#query", Input).value = "a red circle, in words"
            await settled(pilot, app)
            assert app.selected() is not None and app.selected().key == "words-1"
            await pilot.pause()
            assert [str(text.render()) for text in app.query(".hit-text")] == ["a red circle, in words"]
            app.query_one(HitsTable).focus()
            await pilot.press("o")
            assert browser.opened == []

    asyncio.run(run())


def test_the_picture_widget_fits_the_terminal() -> None:
    from textual_image import widget

    from clipdex.cli.browse_cmd import picture_widget

    assert picture_widget({"TERM": "xterm-kitty"}) is widget.TGPImage
    assert picture_widget({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default"}) is widget.HalfcellImage
    assert picture_widget({"TERM": "foot"}) is widget.SixelImage
    assert picture_widget({"TERM_PROGRAM": "iTerm.app"}) is widget.SixelImage
    assert picture_widget({"TERM": "xterm-256color"}) is widget.Image  # textual-image's own choice
    assert picture_widget({"TERM": "xterm-kitty", "NO_COLOR": "1"}) is None


def test_folder_filter_is_a_glob_of_the_folder(tmp_path: Path) -> None:
    assert folder_glob("") is None
    assert folder_glob(str(tmp_path) + "/") == f"{tmp_path}/*"
    assert folder_glob("*/2024/*") == "*/2024/*"
    assert Request(text=" ").query(10) is None


def test_browse_refuses_a_pipe() -> None:
    result = CliRunner().invoke(cli_app, ["browse"])
    assert result.exit_code == 1
    assert "clipdex browse needs a terminal; use clipdex search for scripts and pipes" in result.output


class Terminal(io.StringIO):
    """stdin and stdout as terminals, for the command's own checks."""

    def isatty(self) -> bool:
        return True

    @staticmethod
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("sys.stdin", Terminal())
        monkeypatch.setattr("sys.stdout", Terminal())


def test_browse_loads_the_text_tower_then_runs_the_app(demo, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.library import Library

    events: list[str] = []
    loaded = Library.text_encoder

    def text_encoder(self: Library) -> Any:
        events.append("text tower")
        return loaded(self)

    def run(self: BrowseApp) -> None:
        events.append(f"run k={self.k} picture={self.picture}")

    monkeypatch.setattr(Library, "text_encoder", text_encoder)
    monkeypatch.setattr(BrowseApp, "run", run)
    monkeypatch.setenv("NO_COLOR", "1")
    Terminal.patch(monkeypatch)
    from clipdex.cli.browse_cmd import browse

    from clipdex.cli.common import close_opened

    try:
        browse.__wrapped__(k=7, library=demo.path, device="cpu", runtime="auto")  # type: ignore[attr-defined]
    finally:
        close_opened()
    assert events == ["text tower", "run k=7 picture=None"]


def test_browse_without_textual_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "clipdex.cli.browse", None)
    Terminal.patch(monkeypatch)
    from clipdex.cli.browse_cmd import browse
    from clipdex.search.errors import ClipdexError

    with pytest.raises(ClipdexError, match=r"needs Textual: pip install 'clipdex\[browse\]'"):
        browse.__wrapped__(k=5, library=None, device="cpu", runtime="auto")  # type: ignore[attr-defined]
