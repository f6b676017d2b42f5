"""The Textual app behind `clipdex browse`: a query box with live results, the hits, the
selected hit's picture, filters and the library's stats.

Searches run on a worker thread, `debounce` seconds after the last change to the query or a
filter; a search that an edit made stale is dropped when it returns. Text queries go
through `Library.search`, whose text vectors the catalog's query cache keeps, so a query
typed again (or its prefix, on backspace) costs no model run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Input, Select, Static

from clipdex.cli.common import controls_escaped
from clipdex.cli.preview import hit_pictures, tail
from clipdex.search.errors import ClipdexError
from clipdex.search.query import Hit, Query

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

    from clipdex.search.library import Library

Opener = Callable[[str], None]
PictureWidget = Callable[["PILImage.Image"], Widget]
DEBOUNCE_SECONDS = 0.12
PICTURE_PIXELS = 512
NAME_COLUMNS = 60  # a longer path loses its start in the list (the detail pane shows it whole)


def system_opener(path: str) -> None:
    """Open `path` with the system's viewer (`open` on macOS, the file's association on
    Windows, `xdg-open` elsewhere), detached: the browser does not wait for it."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]
        return
    command = ["open" if sys.platform == "darwin" else "xdg-open", path]
    subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


@dataclass(frozen=True)
class Request:
    """What to search: a text, or more like an item; and the filters."""

    text: str = ""
    like: Optional[int] = None
    kind: str = "any"
    folder: str = ""
    after: str = ""
    before: str = ""

    def query(self, k: int) -> Optional[Query]:
        if not self.text.strip() and self.like is None:
            return None
        return Query.build(text=[self.text] if self.like is None else None,
                           like=[self.like] if self.like is not None else None,
                           kind=self.kind, path=folder_glob(self.folder), after=self.after or None,
                           before=self.before or None, k=k)


def folder_glob(folder: str) -> Optional[str]:
    """A folder as the glob of the paths under it; a glob as it is; nothing as no filter."""
    folder = folder.strip()
    if not folder:
        return None
    if any(character in folder for character in "*?["):
        return folder
    return str(Path(folder).expanduser().absolute()).rstrip("/") + "/*"


class HitsTable(DataTable[str]):
    BINDINGS = [
        Binding("o", "app.open_hit", "open"),
        Binding("c", "app.copy_path", "copy path"),
        Binding("m", "app.more_like_this", "more like this"),
        Binding("s", "app.toggle_stats", "stats"),
    ]


class BrowseApp(App[None]):
    """`clipdex browse`. `opener` opens a file (the system's viewer; tests pass their own),
    `picture` makes the widget that shows a hit's picture (None: no pictures)."""

    TITLE = "clipdex browse"
    CSS = """
    #query { border: tall $accent; }
    #filters { height: 3; }
    #filters Input { width: 1fr; }
    #filters Select { width: 20; }
    #main { height: 1fr; }
    #hits { width: 3fr; }
    #detail { width: 2fr; border-left: solid $accent; padding: 0 1; }
    #picture { height: 1fr; align: center middle; }
    #picture > * { width: auto; height: 1fr; }
    #info { height: auto; max-height: 12; }
    #status { height: 1; background: $boost; padding: 0 1; }
    """
    BINDINGS = [
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("escape", "focus_query", "query", show=False),
        Binding("ctrl+l", "focus_query", "query"),
        Binding("ctrl+f", "focus_filters", "filters"),
        Binding("down", "focus_hits", "hits", show=False),
    ]

    def __init__(self, library: "Library", opener: Opener = system_opener, picture: Optional[PictureWidget] = None,
                 k: int = 50, debounce: float = DEBOUNCE_SECONDS) -> None:
        super().__init__()
        self.library = library
        self.opener = opener
        self.picture = picture
        self.k = k
        self.debounce = debounce
        self.request = Request()
        self.hits: list[Hit] = []
        self.shown: list[tuple[Request, float, int]] = []  # each search shown: its request, when, how many hits
        self.last_edit = 0.0  # when the query or a filter last changed (time.monotonic)
        self._generation = 0
        self._timer: Optional[Timer] = None
        self._stats: dict[str, Any] = {}
        self._showing_stats = False

    # -- the screen --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search by meaning… (type; ↓ to the hits)", id="query")
        with Horizontal(id="filters"):
            yield Input(placeholder="folder or glob", id="folder")
            yield Input(placeholder="after YYYY-MM-DD", id="after")
            yield Input(placeholder="before YYYY-MM-DD", id="before")
            yield Select([("any kind", "any"), ("images", "image"), ("texts", "text")], value="any",
                         allow_blank=False, id="kind")
        with Horizontal(id="main"):
            yield HitsTable(id="hits", cursor_type="row", zebra_stripes=True)
            with Vertical(id="detail"):
                yield Vertical(id="picture")
                yield Static(id="info")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(HitsTable)
        table.add_columns("#", "score", "kind", "path / text")
        self._stats = self.library.stats()
        self.query_one("#query", Input).focus()
        self._show_status("type a query")

    def _show_status(self, message: str) -> None:
        stats = self._stats
        summary = (f"{stats.get('items', 0):,} items ({stats.get('images', 0):,} images, {stats.get('texts', 0):,} texts)"
                   f" · {stats.get('model', '?')}")
        self.query_one("#status", Static).update(f"{summary} · {message}")

    # -- searching ---------------------------------------------------------------------------

    @on(Input.Changed)
    def _edited(self, event: Input.Changed) -> None:
        field = event.input.id
        if field == "query":
            self.request = replace(self.request, text=event.value, like=None)
        elif field == "folder":
            self.request = replace(self.request, folder=event.value)
        elif field == "after":
            self.request = replace(self.request, after=event.value)
        elif field == "before":
            self.request = replace(self.request, before=event.value)
        self._schedule()

    @on(Input.Submitted, "#query")
    def _submitted(self, event: Input.Submitted) -> None:
        """enter in the query box: search now (no debounce) and go to the hits."""
        if self._timer is not None:
            self._timer.stop()
        self.search_now()
        self.query_one(HitsTable).focus()

    @on(Select.Changed, "#kind")
    def _kind_changed(self, event: Select.Changed) -> None:
        self.request = replace(self.request, kind=str(event.value))
        self._schedule()

    def _schedule(self) -> None:
        self.last_edit = time.monotonic()
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(self.debounce, self.search_now)

    def search_now(self) -> None:
        """Search for the current request on a worker thread (its result shown if still current)."""
        self._generation += 1
        generation, request = self._generation, self.request
        self.run_worker(lambda: self._search(generation, request), thread=True, group="search")

    def _search(self, generation: int, request: Request) -> None:
        started = time.perf_counter()
        try:
            query = request.query(self.k)
            hits = self.library.search(query) if query is not None else []
        except ClipdexError as error:
            self.call_from_thread(self._failed, generation, str(error))
            return
        self.call_from_thread(self._show_hits, generation, request, hits, time.perf_counter() - started)

    def _failed(self, generation: int, message: str) -> None:
        if generation == self._generation:
            self._show_status(controls_escaped(message))

    def _show_hits(self, generation: int, request: Request, hits: list[Hit], seconds: float) -> None:
        if generation != self._generation:  # an edit made it stale
            return
        self.hits = hits
        table = self.query_one(HitsTable)
        table.clear()
        for hit in hits:
            name = hit.path or hit.text or (f"key:{hit.key}" if hit.key is not None else "")
            table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.kind, tail(controls_escaped(name), NAME_COLUMNS),
                          key=str(hit.id))
        self.shown.append((request, time.monotonic(), len(hits)))
        what = f"more like #{request.like}" if request.like is not None else "hits"
        self._show_status(f"{len(hits)} {what} in {seconds * 1000:.0f} ms" if hits or request.text or request.like
                          else "type a query")
        if hits:
            table.move_cursor(row=0)
            self._show_detail(hits[0])
        else:
            self._clear_detail()

    # -- the selected hit --------------------------------------------------------------------

    def selected(self) -> Optional[Hit]:
        table = self.query_one(HitsTable)
        if not self.hits or not 0 <= table.cursor_row < len(self.hits):
            return None
        return self.hits[table.cursor_row]

    @on(DataTable.RowHighlighted, "#hits")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if 0 <= event.cursor_row < len(self.hits):
            self._show_detail(self.hits[event.cursor_row])

    @on(DataTable.RowSelected, "#hits")
    def _chosen(self, event: DataTable.RowSelected) -> None:
        self.action_open_hit()

    def _clear_detail(self) -> None:
        self.query_one("#picture").remove_children()
        self.query_one("#info", Static).update("")

    def _show_detail(self, hit: Hit) -> None:
        self._showing_stats = False
        lines = [f"#{hit.rank}  score {hit.score:.4f}  id {hit.id}  {hit.kind}"]
        if hit.path:
            lines.append(controls_escaped(hit.path))
        metadata = hit.metadata
        if metadata.get("width") and metadata.get("height"):
            lines.append(f"{metadata['width']}×{metadata['height']}")
        for key in ("taken_at", "camera"):
            if metadata.get(key):
                lines.append(f"{key.replace('_', ' ')}: {controls_escaped(str(metadata[key]))}")
        self.query_one("#info", Static).update("\n".join(lines))
        pane = self.query_one("#picture")
        pane.remove_children()
        if hit.kind == "text":
            pane.mount(Static(controls_escaped(hit.text or ""), classes="hit-text"))
        elif self.picture is not None:
            self.run_worker(lambda: self._load_picture(hit), thread=True, exclusive=True, group="picture")

    def _load_picture(self, hit: Hit) -> None:
        picture = hit_pictures(self.library, [hit], PICTURE_PIXELS).get(hit.id)
        self.call_from_thread(self._show_picture, hit, picture)

    def _show_picture(self, hit: Hit, picture: "PILImage.Image | str | None") -> None:
        current = self.selected()
        if current is None or current.id != hit.id:
            return
        pane = self.query_one("#picture")
        pane.remove_children()
        if isinstance(picture, str) or picture is None or self.picture is None:
            pane.mount(Static(f"({picture or 'no picture'})"))
        else:
            pane.mount(self.picture(picture))

    # -- actions -----------------------------------------------------------------------------

    def action_focus_query(self) -> None:
        self.query_one("#query", Input).focus()

    def action_focus_filters(self) -> None:
        self.query_one("#folder", Input).focus()

    def action_focus_hits(self) -> None:
        if self.focused is self.query_one("#query", Input) and self.hits:
            self.query_one(HitsTable).focus()

    def action_open_hit(self) -> None:
        hit = self.selected()
        if hit is None:
            return
        if not hit.path:
            self.notify("a text item has no file of its own", severity="warning")
            return
        try:
            self.opener(hit.path)
        except OSError as error:
            self.notify(f"cannot open {controls_escaped(hit.path)}: {error.strerror or error}", severity="error")
            return
        self.notify(f"opened {controls_escaped(Path(hit.path).name)}")

    def action_copy_path(self) -> None:
        hit = self.selected()
        if hit is None or not hit.path:
            return
        self.copy_to_clipboard(hit.path)  # OSC 52: the terminal's clipboard, also over SSH
        self.notify(f"copied {controls_escaped(hit.path)}")

    def action_more_like_this(self) -> None:
        hit = self.selected()
        if hit is None:
            return
        self.request = replace(self.request, like=hit.id)
        self._show_status(f"more like #{hit.id}…")
        self.search_now()

    def action_toggle_stats(self) -> None:
        info = self.query_one("#info", Static)
        self._showing_stats = not self._showing_stats
        if not self._showing_stats:
            hit = self.selected()
            if hit is not None:
                self._show_detail(hit)
            return
        self._stats = self.library.stats()
        shown = ("library", "items", "images", "texts", "vectors", "model", "weights", "index_type", "runtime", "generation")
        info.update("\n".join(f"{key}: {controls_escaped(str(self._stats[key]))}" for key in shown if key in self._stats))
