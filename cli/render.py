"""Rendering hits: a table, JSON, paths, or a self-contained HTML page.

What is for people shows a name's control characters escaped (`controls_escaped`: an
`ESC[2J` in a file name would clear the screen): the table always, `--format paths` on a
terminal. Piped, `--format paths` writes the names exactly, for the next program.
"""

from __future__ import annotations

import base64
import html
import sys
from pathlib import Path
from typing import Literal, Sequence, get_args

from clipdex.cli.common import controls_escaped, out, print_json
from clipdex.search.errors import UnreadableImage
from clipdex.search.query import Hit

Format = Literal["table", "json", "paths", "html"]
FORMATS: tuple[Format, ...] = get_args(Format)


def render_hits(hits: Sequence[Hit], format: str, null: bool = False, html_out: Path | None = None, title: str = "") -> None:
    if format == "json":
        print_json([hit.to_json() for hit in hits])
    elif format == "paths":
        end = "\0" if null else "\n"
        names = [hit_name(hit) for hit in hits]
        if sys.stdout.isatty():
            names = [controls_escaped(name) for name in names]
        sys.stdout.write("".join(f"{name}{end}" for name in names))
        sys.stdout.flush()
    elif format == "html":
        assert html_out is not None
        html_out.write_text(hits_html(hits, title), encoding="utf-8")
        out.print(f"wrote {len(hits)} hits to {controls_escaped(str(html_out))}", markup=False)
    else:
        _table(hits)


def hit_name(hit: Hit) -> str:
    """A hit's path, else its text, else (an image added under an application's key) its key."""
    for name in (hit.path, hit.text):
        if name is not None:
            return name
    return f"key:{hit.key}" if hit.key is not None else ""


def clock(seconds: float) -> str:
    """A moment in a video as mm:ss (h:mm:ss from an hour on)."""
    whole = int(max(0.0, seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _at(hit: Hit) -> str:
    """A video hit's moments after its path: " @ 01:23" (and the next best, with --per-video)."""
    if hit.timestamp is None:
        return ""
    moments = hit.moments or [(hit.timestamp, hit.score)]
    return " @ " + ", ".join(clock(seconds) for seconds, _ in moments)


def _table(hits: Sequence[Hit]) -> None:
    if not hits:
        out.print("no hits")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    matched = any(hit.snippet for hit in hits)  # a hybrid or keyword search: the matched words too
    for column in ("rank", "score", "id", "kind", "path / text") + (("words",) if matched else ()):
        table.add_column(column, justify="right" if column in ("rank", "score", "id") else "left", overflow="fold")
    names = [controls_escaped(hit_name(hit)) + _at(hit) for hit in hits]
    for hit, name in zip(hits, names):
        words = (Text(controls_escaped(hit.snippet or "")),) if matched else ()
        table.add_row(str(hit.rank), f"{hit.score:.4f}", str(hit.id), hit.kind, Text(name), *words)  # Text: not markup
    if out.is_terminal:
        out.print(table)
    else:  # piped: never fold a path across lines
        widest = max(len(name) for name in names) + 40
        Console(file=sys.stdout, width=max(out.width, widest), highlight=False).print(table)


def hits_html(hits: Sequence[Hit], title: str, thumbnail_size: int = 256) -> str:
    """One HTML file with the thumbnails embedded as data URIs: it can be mailed or moved."""
    from clipdex.search.media.imaging import thumbnail_jpeg

    cards = []
    for hit in hits:
        caption = html.escape(hit.path or "")
        if hit.kind == "video" and hit.path:
            from clipdex.search.media.video import video_frame_jpeg

            at = hit.timestamp or 0.0
            link = html.escape(Path(hit.path).as_uri() + f"#t={at:.2f}")
            try:
                data = base64.b64encode(video_frame_jpeg(hit.path, at, thumbnail_size)).decode()
                visual = f'<a href="{link}"><img src="data:image/jpeg;base64,{data}" alt="{caption}"></a>'
            except UnreadableImage as error:
                visual = f'<div class="missing">{html.escape(error.reason)}</div>'
            caption = f'<a href="{link}">{caption}</a> at {html.escape(_at(hit)[3:])}'
        elif hit.kind == "image" and hit.path:
            try:
                data = base64.b64encode(thumbnail_jpeg(Path(hit.path), thumbnail_size)).decode()
                visual = f'<img src="data:image/jpeg;base64,{data}" alt="{caption}">'
            except UnreadableImage as error:
                visual = f'<div class="missing">{html.escape(error.reason)}</div>'
        else:
            visual = f'<blockquote>{html.escape(hit.text or "")}</blockquote>'
        words = ""
        if hit.snippet:  # a hybrid or keyword hit: the matched words, marked
            marked = html.escape(hit.snippet).replace("\u00ab", "<mark>").replace("\u00bb", "</mark>")
            words = f'<br><span class="words">{marked}</span>'
        cards.append(
            f'<figure>{visual}<figcaption><b>#{hit.rank}</b> score {hit.score:.4f} '
            f'<span class="id">id {hit.id}</span><br><span class="path">{caption}</span>{words}</figcaption></figure>'
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipdex: {html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }}
img {{ max-width: 100%; display: block; margin: auto; }}
figcaption {{ font-size: .85rem; margin-top: .4rem; word-break: break-all; }}
.missing {{ color: #a00; }} .id {{ color: #666; }}
</style></head>
<body><h1>{html.escape(title)}</h1><p>{len(hits)} hits</p><main>
{chr(10).join(cards)}
</main></body></html>
"""
