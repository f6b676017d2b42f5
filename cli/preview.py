"""Hits as images in the terminal: `clipdex search … --preview`.

Four ways to draw a picture, picked from what the terminal is (`detect_protocol`) or forced:

- `kitty`: the kitty graphics protocol (`ESC _G … ESC \\`), a PNG sent in base64 chunks of
  4096 bytes, placed without moving the cursor; kitty, Ghostty, and others that speak it.
- `iterm`: iTerm2's inline images (`ESC ]1337;File=…:BASE64 BEL`); iTerm2, WezTerm, VS Code.
- `sixel`: `ESC P…q … ESC \\`; foot, mlterm, xterm -ti vt340, Windows Terminal, tmux 3.4 …
- `blocks`: Unicode upper half blocks, two pixels a cell in 24-bit colour: any modern
  terminal, over SSH and in tmux.

Inside tmux, kitty's and iTerm2's sequences are wrapped for tmux's passthrough (`ESC Ptmux;`
with each ESC doubled; tmux needs `set -g allow-passthrough on`); sixel is left to tmux,
which draws sixel itself from 3.4.

The sixel encoding is textual-image's (`textual_image._sixel`, numpy-fast, palette-tuned);
the kitty, iTerm2 and half-block writers are this module's own, a few lines each: textual-
image's renderables write straight to `sys.__stdout__`, query the terminal when imported, use
kitty's Unicode placeholders (kitty only, not through tmux) and have no iTerm2 protocol.
"""

from __future__ import annotations

import base64
import io
import math
import os
import select
import sys
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Mapping, Optional, Sequence, get_args

from clipdex.cli.common import controls_escaped

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

    from clipdex.search.library import Library
    from clipdex.search.query import Hit

Protocol = Literal["kitty", "iterm", "sixel", "blocks"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
PreviewChoice = Literal["auto", "kitty", "iterm", "sixel", "blocks"]

ESC = "\x1b"
ST = ESC + "\\"  # the string terminator of kitty's and sixel's sequences
GAP = 2  # columns between two cells
MIN_CAPTION = 16  # a cell is at least this wide, for its caption
KITTY_CHUNK = 4096  # base64 bytes per kitty message, as the protocol asks
QUERY_TIMEOUT = 0.2  # seconds to wait for a terminal's answer
DEFAULT_CELL = (10, 20)  # a cell's pixels where the terminal does not say (VT340, as textual-image assumes)

KITTY_TERMS = {"xterm-kitty", "xterm-ghostty"}
KITTY_PROGRAMS = {"ghostty"}
ITERM_PROGRAMS = {"iTerm.app", "WezTerm", "vscode", "mintty"}
SIXEL_TERMS = {"foot", "foot-extra", "mlterm", "contour", "yaft-256color", "xterm-sixel"}


# -- which protocol ----------------------------------------------------------------------------


def protocol_from_environment(environ: Mapping[str, str]) -> Optional[Protocol]:
    """The protocol the environment names the terminal for, or None when it does not tell.

    Variables a terminal sets survive tmux (started from it) and, for `LC_TERMINAL`, SSH."""
    term = environ.get("TERM", "")
    program = environ.get("TERM_PROGRAM", "")
    if environ.get("KITTY_WINDOW_ID") or term in KITTY_TERMS or program in KITTY_PROGRAMS:
        return "kitty"
    if program in ITERM_PROGRAMS or environ.get("LC_TERMINAL") == "iTerm2" or environ.get("ITERM_SESSION_ID"):
        return "iterm"
    if term in SIXEL_TERMS:
        return "sixel"
    return None


def detect_protocol(
    environ: Mapping[str, str],
    stdout_is_terminal: bool,
    stdin_is_terminal: bool,
    query: Optional[Callable[[], set[str]]] = None,
) -> Optional[Protocol]:
    """The protocol to draw with, or None to draw nothing (print the table).

    Nothing when stdout is not a terminal or is a dumb one. Else what the environment says;
    else, where stdin and stdout are both terminals, what the terminal answers to `query`
    (kitty's graphics query and the device attributes, whose `4` means sixel); else half
    blocks, unless `NO_COLOR` asks for no colour (then nothing)."""
    if not stdout_is_terminal or environ.get("TERM") == "dumb":
        return None
    named = protocol_from_environment(environ)
    if named is not None:
        return named
    if stdin_is_terminal and query is not None:
        answered = query()
        if "kitty" in answered:
            return "kitty"
        if "sixel" in answered:
            return "sixel"
    if environ.get("NO_COLOR"):
        return None
    return "blocks"


def in_tmux(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("TMUX")) or environ.get("TERM_PROGRAM") == "tmux"


KITTY_QUERY = f"{ESC}_Gi=31,s=1,v=1,a=q,t=d,f=24;AAAA{ST}"
DEVICE_ATTRIBUTES_QUERY = f"{ESC}[c"


def query_terminal(input_fd: int, output_fd: int, timeout: float = QUERY_TIMEOUT) -> set[str]:
    """Ask the terminal on `input_fd`/`output_fd` what it draws: {"kitty", "sixel"} or fewer.

    Sends kitty's graphics query, then the primary device attributes request (`ESC [c`) that
    every VT100-like terminal answers: its answer ends the wait, so a terminal that ignores
    kitty's query costs no timeout. Reads at most `timeout` seconds, with echo off and the
    terminal's mode put back after; callers make sure both are terminals."""
    import termios
    import tty

    saved = termios.tcgetattr(input_fd)
    answer = b""
    try:
        tty.setcbreak(input_fd, termios.TCSANOW)
        os.write(output_fd, (KITTY_QUERY + DEVICE_ATTRIBUTES_QUERY).encode())
        deadline = _now() + timeout
        while not _device_attributes(answer):
            left = deadline - _now()
            if left <= 0 or not select.select([input_fd], [], [], left)[0]:
                break
            chunk = os.read(input_fd, 1024)
            if not chunk:
                break
            answer += chunk
    finally:
        termios.tcsetattr(input_fd, termios.TCSANOW, saved)
    return parse_terminal_answer(answer.decode("latin-1"))


def _now() -> float:
    import time

    return time.monotonic()


def _device_attributes(answer: bytes) -> Optional[list[str]]:
    start = answer.find(b"\x1b[?")
    end = answer.find(b"c", start + 3) if start >= 0 else -1
    if end < 0:
        return None
    return answer[start + 3 : end].decode("latin-1").split(";")


def parse_terminal_answer(answer: str) -> set[str]:
    """What a terminal's answer to `KITTY_QUERY` + `DEVICE_ATTRIBUTES_QUERY` says it draws."""
    found: set[str] = set()
    if f"{ESC}_Gi=31;OK" in answer:
        found.add("kitty")
    attributes = _device_attributes(answer.encode("latin-1"))
    if attributes is not None and "4" in attributes:
        found.add("sixel")
    return found


def choose_protocol(choice: str, environ: Mapping[str, str] = os.environ) -> Optional[Protocol]:
    """`--preview`'s protocol: the one forced, else detected for this process's stdout/stdin."""
    if choice in PROTOCOLS:
        return choice
    stdout_is_terminal = sys.stdout.isatty()
    stdin_is_terminal = sys.stdin is not None and sys.stdin.isatty()

    def query() -> set[str]:
        try:
            return query_terminal(sys.stdin.fileno(), sys.stdout.fileno())
        except (OSError, ValueError, ImportError):  # termios is POSIX; a terminal may refuse the mode
            return set()

    return detect_protocol(environ, stdout_is_terminal, stdin_is_terminal, query)


# -- the terminal's geometry -------------------------------------------------------------------


@dataclass(frozen=True)
class Screen:
    """What the layout needs of the terminal: its width and a cell's size in pixels."""

    columns: int = 80
    cell_width: int = DEFAULT_CELL[0]
    cell_height: int = DEFAULT_CELL[1]
    tmux: bool = False

    @classmethod
    def of_stdout(cls, environ: Mapping[str, str] = os.environ) -> "Screen":
        import shutil

        columns = shutil.get_terminal_size((80, 24)).columns
        cell = DEFAULT_CELL
        if sys.stdout.isatty():
            cell = _cell_pixels(sys.stdout.fileno()) or cell
        return cls(max(1, columns), cell[0], cell[1], in_tmux(environ))


def _cell_pixels(fd: int) -> Optional[tuple[int, int]]:
    """A cell's width and height in pixels, from the terminal's window size (TIOCGWINSZ)."""
    try:
        import fcntl
        import struct
        import termios

        rows, columns, width, height = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except (OSError, ImportError):
        return None
    if not (rows and columns and width and height):
        return None
    return max(1, width // columns), max(1, height // rows)


# -- one cell: a picture (or a text) with its caption -----------------------------------------


@dataclass
class Cell:
    caption: list[str]
    image: Optional["PILImage.Image"] = None
    text: Optional[str] = None  # shown in the picture's place: a text hit, or why there is no picture
    dim: bool = field(default=False)


def cells_for_hits(hits: Sequence["Hit"], images: Mapping[int, "PILImage.Image | str"], width: int) -> list[Cell]:
    """A cell per hit: its picture (or text, or the reason it has none), then rank, score and path."""
    cells = []
    for hit in hits:
        name = controls_escaped(hit.path or (f"key:{hit.key}" if hit.key is not None else f"item {hit.id}"))
        caption = [f"#{hit.rank}  {hit.score:.4f}", tail(name, width)]
        picture = images.get(hit.id)
        if hit.kind == "text":
            cells.append(Cell([caption[0], tail(f"text {hit.id}" if hit.path is None else name, width)],
                              text=controls_escaped(hit.text or "")))
        elif isinstance(picture, str) or picture is None:
            cells.append(Cell(caption, text=f"({picture or 'no picture'})", dim=True))
        else:
            cells.append(Cell(caption, image=picture))
    return cells


def tail(text: str, width: int) -> str:
    """`text` cut from the left to `width` columns (a path's file name is its end)."""
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    kept = text
    while kept and cell_len(kept) > width - 1:
        kept = kept[1:]
    return "…" + kept


def pad(text: str, width: int) -> str:
    from rich.cells import cell_len, set_cell_size

    return set_cell_size(text, width) if cell_len(text) > width else text + " " * (width - cell_len(text))


# -- the layout --------------------------------------------------------------------------------


def cell_columns(rows: int, screen: Screen) -> int:
    """A cell's width in columns: a square picture `rows` high, and room for a file name's end
    (`MIN_CAPTION` columns); no wider than the screen."""
    return max(1, min(screen.columns, max(MIN_CAPTION, round(rows * screen.cell_height / screen.cell_width))))


def render_preview(cells: Sequence[Cell], protocol: Protocol, screen: Screen, rows: int, colour: bool = True) -> str:
    """The whole preview: rows of cells as wide as the screen allows, each a picture `rows` high
    with its caption below. `colour`: False writes no colour (NO_COLOR) for what is text."""
    width = cell_columns(rows, screen)
    per_row = max(1, (screen.columns + GAP) // (width + GAP))
    parts = []
    for start in range(0, len(cells), per_row):
        row = cells[start : start + per_row]
        if protocol == "blocks":
            parts.append(_joined([_block_lines(cell, width, rows, screen, colour) for cell in row], width))
        else:
            parts.append(_graphics_row(row, protocol, width, rows, screen, colour))
        parts.append(_joined([[pad(line, width) for line in cell.caption] for cell in row], width))
        parts.append("\n")
    return "".join(parts)


def _joined(columns: list[list[str]], width: int) -> str:
    """Cells' lines side by side, `GAP` apart (each line already `width` columns)."""
    height = max((len(lines) for lines in columns), default=0)
    blank = " " * width
    lines = []
    for index in range(height):
        lines.append((" " * GAP).join(column[index] if index < len(column) else blank for column in columns).rstrip())
    return "".join(line + "\n" for line in lines)


def _text_lines(cell: Cell, width: int, rows: int, colour: bool) -> list[str]:
    wrapped = textwrap.wrap(cell.text or "", width=width, max_lines=rows, placeholder="…") or [""]
    style = f"{ESC}[2m" if colour and cell.dim else ""
    reset = f"{ESC}[0m" if style else ""
    return [style + pad(line, width) + reset for line in wrapped] + [" " * width] * (rows - len(wrapped))


def _block_lines(cell: Cell, width: int, rows: int, screen: Screen, colour: bool) -> list[str]:
    if cell.image is None:
        return _text_lines(cell, width, rows, colour)
    return half_blocks(cell.image, width, rows, screen)


def _graphics_row(row: Sequence[Cell], protocol: Protocol, width: int, rows: int, screen: Screen, colour: bool) -> str:
    """Room made for the pictures (`rows` new lines), then each drawn from its cell's top-left
    corner with the cursor saved and restored, then the cursor below them all."""
    out = ["\n" * rows, f"{ESC}[{rows}A"]
    for index, cell in enumerate(row):
        column = index * (width + GAP) + 1
        if cell.image is None:
            for line_number, line in enumerate(_text_lines(cell, width, rows, colour)):
                down = f"{ESC}[{line_number}B" if line_number else ""
                out.append(f"{ESC}7{down}{ESC}[{column}G{line}{ESC}8")
            continue
        out.append(f"{ESC}7{ESC}[{column}G{graphic(cell.image, protocol, width, rows, screen)}{ESC}8")
    out.append(f"{ESC}[{rows}B\r")
    return "".join(out)


# -- the protocols -----------------------------------------------------------------------------


def fitted(image_width: int, image_height: int, columns: int, rows: int, screen: Screen) -> tuple[int, int, int, int]:
    """The picture's (columns, rows, pixel width, pixel height) within `columns` x `rows` cells, its
    proportions kept."""
    box_width, box_height = columns * screen.cell_width, rows * screen.cell_height
    scale = min(box_width / max(1, image_width), box_height / max(1, image_height))
    pixel_width = max(1, min(box_width, round(image_width * scale)))
    pixel_height = max(1, min(box_height, round(image_height * scale)))
    return (max(1, min(columns, math.ceil(pixel_width / screen.cell_width))),
            max(1, min(rows, math.ceil(pixel_height / screen.cell_height))), pixel_width, pixel_height)


def graphic(image: "PILImage.Image", protocol: Protocol, columns: int, rows: int, screen: Screen) -> str:
    """The escape sequence that draws `image` within `columns` x `rows` cells from the cursor."""
    if protocol == "kitty":
        return kitty_image(image, columns, rows, screen)
    if protocol == "iterm":
        return iterm_image(image, columns, rows, screen)
    if protocol == "sixel":
        return sixel_image(image, columns, rows, screen)
    raise ValueError(f"{protocol} is not a graphics protocol")


def _png(image: "PILImage.Image", size: tuple[int, int]) -> bytes:
    from PIL import Image as PILImageModule

    buffer = io.BytesIO()
    image.convert("RGB").resize(size, PILImageModule.Resampling.LANCZOS).save(buffer, "PNG")
    return buffer.getvalue()


def tmux_wrapped(sequence: str) -> str:
    """`sequence` for tmux to pass through to the terminal it runs in."""
    return f"{ESC}Ptmux;{sequence.replace(ESC, ESC + ESC)}{ST}"


def kitty_image(image: "PILImage.Image", columns: int, rows: int, screen: Screen) -> str:
    """kitty's graphics protocol: a PNG (f=100) transmitted and shown at once (a=T) in
    columns x rows cells (c, r), quietly (q=2), the cursor left where it was (C=1); base64 in
    chunks of 4096, every one but the last with m=1."""
    cells_wide, cells_high, pixel_width, pixel_height = fitted(*image.size, columns, rows, screen)
    data = base64.standard_b64encode(_png(image, (pixel_width, pixel_height))).decode("ascii")
    chunks = [data[offset : offset + KITTY_CHUNK] for offset in range(0, len(data), KITTY_CHUNK)] or [""]
    messages = []
    for index, chunk in enumerate(chunks):
        more = int(index < len(chunks) - 1)
        keys = f"a=T,f=100,c={cells_wide},r={cells_high},C=1,q=2,m={more}" if index == 0 else f"m={more}"
        message = f"{ESC}_G{keys};{chunk}{ST}"
        messages.append(tmux_wrapped(message) if screen.tmux else message)
    return "".join(messages)


def iterm_image(image: "PILImage.Image", columns: int, rows: int, screen: Screen) -> str:
    """iTerm2's inline image: the PNG's size in bytes, its width and height in cells, its
    proportions kept, then the base64 and BEL."""
    cells_wide, cells_high, pixel_width, pixel_height = fitted(*image.size, columns, rows, screen)
    png = _png(image, (pixel_width, pixel_height))
    data = base64.standard_b64encode(png).decode("ascii")
    sequence = (f"{ESC}]1337;File=inline=1;size={len(png)};width={cells_wide};height={cells_high};"
                f"preserveAspectRatio=1:{data}\a")
    return tmux_wrapped(sequence) if screen.tmux else sequence


def sixel_image(image: "PILImage.Image", columns: int, rows: int, screen: Screen) -> str:
    """Sixel (textual-image's encoder), the picture scaled to its pixels in the cells; its height
    a multiple of 6 (a sixel band) that stays within them."""
    from PIL import Image as PILImageModule

    image_to_sixels = _sixel_encoder()
    _, _, pixel_width, pixel_height = fitted(*image.size, columns, rows, screen)
    pixel_height = max(6, pixel_height - pixel_height % 6)
    scaled = image.convert("RGB").resize((pixel_width, pixel_height), PILImageModule.Resampling.LANCZOS)
    return image_to_sixels(scaled)


def _sixel_encoder() -> Callable[["PILImage.Image"], str]:
    try:
        from textual_image._sixel import image_to_sixels
    except ImportError as error:
        from clipdex.search.errors import ClipdexError

        raise ClipdexError("--preview=sixel needs textual-image: pip install 'clipdex[browse]'") from error
    return image_to_sixels


def half_blocks(image: "PILImage.Image", columns: int, rows: int, screen: Screen) -> list[str]:
    """`rows` lines of `columns` cells: each an upper half block (▀) whose foreground is the pixel
    above and background the pixel below, in 24-bit colour (`ESC[38;2;R;G;Bm`, `ESC[48;2;…m`).
    A half cell is about square (cells are twice as high as wide), so the picture is scaled to
    `columns` x 2·`rows` such pixels, its proportions kept."""
    import numpy as np
    from PIL import Image as PILImageModule

    half_height = screen.cell_height / 2
    scale = min(columns * screen.cell_width / max(1, image.width), 2 * rows * half_height / max(1, image.height))
    wide = max(1, min(columns, round(image.width * scale / screen.cell_width)))
    high = max(2, min(2 * rows, round(image.height * scale / half_height)))
    high += high % 2
    pixels = np.asarray(image.convert("RGB").resize((wide, high), PILImageModule.Resampling.LANCZOS))
    lines = []
    for top in range(0, high, 2):
        segments = []
        for upper, lower in zip(pixels[top], pixels[top + 1]):
            segments.append(f"{ESC}[38;2;{upper[0]};{upper[1]};{upper[2]}m{ESC}[48;2;{lower[0]};{lower[1]};{lower[2]}m▀")
        lines.append("".join(segments) + f"{ESC}[0m" + " " * (columns - wide))
    return lines + [" " * columns] * (rows - len(lines))


# -- pictures of the hits ----------------------------------------------------------------------


def hit_pictures(library: "Library", hits: Iterable["Hit"], pixels: int) -> dict[int, "PILImage.Image | str"]:
    """Each image or video hit's thumbnail (from the library's thumbnail cache, made there when
    missing, as the server does; a video's is its frame at the hit's moment), or why it has none."""
    from PIL import Image as PILImageModule

    from clipdex.search.errors import FileUnavailable
    from clipdex.search.http.media import ThumbnailCache, thumbnail_size

    hits = list(hits)
    moments = {hit.id: hit.timestamp or 0.0 for hit in hits if hit.kind == "video"}
    wanted = [hit.id for hit in hits if hit.kind in ("image", "video")]
    rows = library.catalog.get_items(wanted)
    cache = ThumbnailCache(library.path)
    pictures: dict[int, PILImage.Image | str] = {}
    for item_id in wanted:
        row = rows.get(item_id)
        if row is None:
            pictures[item_id] = "removed"
            continue
        try:
            data = cache.get(row, thumbnail_size(pixels), moments.get(item_id, 0.0))
            pictures[item_id] = PILImageModule.open(io.BytesIO(data))
        except FileUnavailable:
            pictures[item_id] = "unavailable" if row.path else "no file"
        except OSError:
            pictures[item_id] = "unreadable"
    return pictures


def print_preview(library: "Library", hits: Sequence["Hit"], protocol: Protocol, rows: int,
                  environ: Mapping[str, str] = os.environ) -> None:
    screen = Screen.of_stdout(environ)
    width = cell_columns(rows, screen)
    pixels = max(width * screen.cell_width, rows * screen.cell_height)
    if protocol == "blocks":
        pixels = max(width, 2 * rows)
    cells = cells_for_hits(hits, hit_pictures(library, hits, pixels), width)
    sys.stdout.write(render_preview(cells, protocol, screen, rows, colour=not environ.get("NO_COLOR")))
    sys.stdout.flush()
