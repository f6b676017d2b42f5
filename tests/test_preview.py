"""`clipdex search --preview`: the escape sequences of each protocol, how the terminal's
protocol is chosen, the layout, and the command (piped, forced, NO_COLOR)."""

from __future__ import annotations

import base64
import io
import os
import re
import threading
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clipdex.cli import preview
from clipdex.cli.main import app
from clipdex.cli.preview import Cell, Screen
from clipdex.search.query import Hit
from tests.demo_library import shared_demo_library

ESC = "\x1b"
SCREEN = Screen(columns=80, cell_width=10, cell_height=20)
runner = CliRunner()


def two_colours(size: tuple[int, int] = (40, 40)) -> Image.Image:
    """Red above, blue below."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (0, size[1] // 2, size[0], size[1]))
    return image


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


# -- the protocols -----------------------------------------------------------------------------


def test_kitty_sends_a_png_in_chunks_of_4096_shown_in_the_cells() -> None:
    sequence = preview.kitty_image(noise((300, 200)), 20, 10, SCREEN)
    messages = re.findall(f"{ESC}_G([^;]*);([^{ESC}]*){ESC}\\\\", sequence)
    assert "".join(f"{ESC}_G{keys};{data}{ESC}\\" for keys, data in messages) == sequence
    assert len(messages) > 2  # 300x200 random pixels make a PNG of several chunks
    first = dict(pair.split("=") for pair in messages[0][0].split(","))
    # 300x200 in 20x10 cells of 10x20 pixels: 200 pixels wide, 133 high: 20 columns, 7 rows
    assert first == {"a": "T", "f": "100", "c": "20", "r": "7", "C": "1", "q": "2", "m": "1"}
    assert [keys for keys, _ in messages[1:]] == ["m=1"] * (len(messages) - 2) + ["m=0"]
    assert all(len(data) == 4096 for _, data in messages[:-1]) and 0 < len(messages[-1][1]) <= 4096
    png = Image.open(io.BytesIO(base64.b64decode("".join(data for _, data in messages))))
    assert (png.format, png.size) == ("PNG", (200, 133))


def test_kitty_in_tmux_wraps_each_chunk_for_passthrough() -> None:
    plain = preview.kitty_image(noise((300, 200)), 20, 10, SCREEN)
    wrapped = preview.kitty_image(noise((300, 200)), 20, 10, Screen(80, 10, 20, tmux=True))
    parts = re.findall(f"{ESC}Ptmux;(.*?){ESC}\\\\(?={ESC}Ptmux;|$)", wrapped, flags=re.S)
    assert len(parts) == plain.count(f"{ESC}_G")
    for part in parts:
        assert part.startswith(f"{ESC}{ESC}_G") and part.endswith(f"{ESC}{ESC}\\")
        assert ESC not in part.replace(ESC + ESC, "")  # every ESC doubled


def test_iterm_sends_an_inline_file_with_its_size_and_cells() -> None:
    sequence = preview.iterm_image(two_colours((100, 50)), 20, 10, SCREEN)
    match = re.fullmatch(f"{ESC}]1337;File=([^:]*):([A-Za-z0-9+/=]+)\a", sequence)
    assert match is not None
    keys = dict(pair.split("=") for pair in match.group(1).split(";"))
    data = base64.b64decode(match.group(2))
    assert keys == {"inline": "1", "size": str(len(data)), "width": "20", "height": "5", "preserveAspectRatio": "1"}
    assert Image.open(io.BytesIO(data)).size == (200, 100)
    tmux = preview.iterm_image(two_colours((100, 50)), 20, 10, Screen(80, 10, 20, tmux=True))
    assert tmux == f"{ESC}Ptmux;{sequence.replace(ESC, ESC + ESC)}{ESC}\\"


def test_sixel_is_a_device_control_string_in_whole_bands() -> None:
    sequence = preview.sixel_image(two_colours((64, 64)), 8, 4, SCREEN)
    match = re.match(f'{ESC}P0;0;0q"1;1;(\\d+);(\\d+)', sequence)
    assert match is not None and sequence.endswith(f"{ESC}\\")
    width, height = int(match.group(1)), int(match.group(2))
    assert (width, height) == (80, 78)  # 64x64 in 8x4 cells of 10x20: 80x80, its height in whole 6-pixel bands
    assert re.search("#\\d+;2;100;0;0", sequence) and re.search("#\\d+;2;0;0;100", sequence)


def test_half_blocks_put_the_upper_pixel_in_front_and_the_lower_behind() -> None:
    lines = preview.half_blocks(two_colours((4, 4)), 4, 2, SCREEN)
    red, blue = f"{ESC}[38;2;255;0;0m{ESC}[48;2;255;0;0m▀", f"{ESC}[38;2;0;0;255m{ESC}[48;2;0;0;255m▀"
    # 4x4 in 4 columns x 2 rows of 10x20-pixel cells: 4x4 half cells, the upper two rows red, the lower blue
    assert lines == [red * 4 + f"{ESC}[0m", blue * 4 + f"{ESC}[0m"]


def test_half_blocks_keep_proportions_and_pad_to_the_cell() -> None:
    lines = preview.half_blocks(two_colours((40, 10)), 20, 10, SCREEN)
    visible = [re.sub(f"{ESC}\\[[0-9;]*m", "", line) for line in lines]
    assert len(lines) == 10 and all(len(line) == 20 for line in visible)
    # 4:1 in 20x10 cells (200x200 pixels): 200x50 pixels, 20 columns of 5 half cells, made 6: 3 rows
    assert visible[2] == "▀" * 20 and visible[3] == " " * 20


# -- choosing the protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("environ, expected", [
    ({"TERM": "xterm-kitty"}, "kitty"),
    ({"KITTY_WINDOW_ID": "1", "TERM": "tmux-256color", "TMUX": "/tmp/tmux"}, "kitty"),
    ({"TERM_PROGRAM": "ghostty"}, "kitty"),
    ({"TERM_PROGRAM": "iTerm.app"}, "iterm"),
    ({"LC_TERMINAL": "iTerm2", "TERM": "xterm-256color"}, "iterm"),  # over SSH
    ({"TERM_PROGRAM": "WezTerm"}, "iterm"),
    ({"TERM": "foot"}, "sixel"),
    ({"TERM": "mlterm"}, "sixel"),
    ({"TERM": "xterm-256color"}, "blocks"),
    ({"TERM": "xterm-256color", "NO_COLOR": "1"}, None),
    ({"TERM": "dumb", "KITTY_WINDOW_ID": "1"}, None),
])
def test_the_environment_names_the_protocol(environ: dict, expected: str | None) -> None:
    assert preview.detect_protocol(environ, True, True, query=None) == expected


def test_nothing_is_drawn_when_stdout_is_not_a_terminal() -> None:
    asked = []
    assert preview.detect_protocol({"TERM": "xterm-kitty"}, False, True, query=lambda: asked.append(1) or {"kitty"}) is None
    assert asked == []


@pytest.mark.parametrize("answer, expected", [({"kitty", "sixel"}, "kitty"), ({"sixel"}, "sixel"), (set(), "blocks")])
def test_an_unknown_terminal_is_asked(answer: set, expected: str) -> None:
    assert preview.detect_protocol({"TERM": "xterm-256color"}, True, True, query=lambda: answer) == expected


def test_the_terminal_is_not_asked_when_stdin_is_not_one() -> None:
    asked = []
    assert preview.detect_protocol({"TERM": "xterm-256color"}, True, False,
                                   query=lambda: asked.append(1) or {"sixel"}) == "blocks"
    assert asked == []


def test_the_environment_spares_the_question() -> None:
    asked = []
    assert preview.detect_protocol({"TERM": "foot"}, True, True, query=lambda: asked.append(1) or set()) == "sixel"
    assert asked == []


def answering_terminal(answer: bytes | None, timeout: float) -> tuple[set[str], bytes, float]:
    """Run `query_terminal` on a pseudo-terminal whose other end answers `answer` (None: stays silent)."""
    import pty
    import time

    controller, terminal = pty.openpty()
    asked = bytearray()

    def other_end() -> None:
        while b"\x1b[c" not in asked:
            asked.extend(os.read(controller, 1024))
        if answer is not None:
            os.write(controller, answer)

    thread = threading.Thread(target=other_end, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        found = preview.query_terminal(terminal, terminal, timeout=timeout)
        took = time.monotonic() - started
        thread.join(2)
    finally:
        os.close(controller)
        os.close(terminal)
    return found, bytes(asked), took


@pytest.mark.parametrize("answer, expected", [
    (b"\x1b_Gi=31;OK\x1b\\\x1b[?62;22c", {"kitty"}),
    (b"\x1b[?63;1;2;4;6;9;15;22c", {"sixel"}),
    (b"\x1b[?65;1;9c", set()),
])
def test_the_terminal_query_reads_the_answer(answer: bytes, expected: set) -> None:
    found, asked, took = answering_terminal(answer, timeout=3.0)
    assert found == expected
    assert asked == (preview.KITTY_QUERY + preview.DEVICE_ATTRIBUTES_QUERY).encode()
    assert took < 2.0  # the device attributes end the wait, not the timeout


def test_a_silent_terminal_costs_only_the_timeout() -> None:
    found, _, took = answering_terminal(None, timeout=0.5)
    assert found == set() and 0.45 <= took < 3.0


# -- the layout --------------------------------------------------------------------------------


def visible(text: str) -> str:
    """`text` without its escape sequences."""
    text = re.sub(f"{ESC}_G.*?{ESC}\\\\", "", text)
    return re.sub(f"{ESC}(\\[[0-9;]*[A-Za-z]|[78])", "", text)


def cells(count: int) -> list[Cell]:
    return [Cell([f"#{i + 1}  0.{90 - i}00", f"/photos/{i}.jpg"], image=two_colours()) for i in range(count)]


def test_cells_fill_the_width_in_rows_with_captions_below() -> None:
    text = preview.render_preview(cells(5), "blocks", Screen(columns=60), rows=4)
    lines = visible(text).splitlines()
    # cells 16 columns wide (room for a caption), 2 apart: 3 a row in 60 columns
    assert lines[4] == "#1  0.9000        #2  0.8900        #3  0.8800"
    assert lines[5] == "/photos/0.jpg     /photos/1.jpg     /photos/2.jpg"
    assert lines[11] == "#4  0.8700        #5  0.8600"
    assert max(len(line) for line in lines) <= 60


def test_a_narrow_terminal_gets_one_narrower_cell_a_row() -> None:
    text = preview.render_preview(cells(2), "blocks", Screen(columns=10), rows=8)
    lines = visible(text).splitlines()
    assert max(len(line) for line in lines) <= 10
    assert [line for line in lines if line.startswith("#")] == ["#1  0.9000", "#2  0.8900"]


def test_graphics_make_room_then_draw_each_picture_at_its_column() -> None:
    text = preview.render_preview(cells(2), "kitty", Screen(columns=60), rows=4)
    assert text.startswith("\n" * 4 + f"{ESC}[4A{ESC}7{ESC}[1G{ESC}_G")
    assert f"{ESC}8{ESC}7{ESC}[19G{ESC}_G" in text  # the second cell: 16 columns + 2 further
    assert f"{ESC}8{ESC}[4B\r#1  0.9000" in text


def test_text_hits_show_their_text_and_paths_lose_their_start() -> None:
    hits = [Hit(rank=1, score=0.5, id=3, kind="text", text="a poem about\x1b[2J the sea"),
            Hit(rank=2, score=0.25, id=4, kind="image", path="/a/very/long/folder/name/holiday-photo.jpg")]
    made = preview.cells_for_hits(hits, {4: "unavailable"}, width=20)
    assert made[0].text == "a poem about\\033[2J the sea" and made[0].image is None
    assert made[1].caption == ["#2  0.2500", "…e/holiday-photo.jpg"]
    assert made[1].text == "(unavailable)"


# -- the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    library = shared_demo_library(tmp_path_factory.getbasetemp())
    yield library
    library.close()


def search(demo, *options: str, env: dict | None = None):
    return runner.invoke(app, ["search", *options, "--library", str(demo.path), "-k", "3"], env=env or {},
                         catch_exceptions=False)


def test_piped_preview_prints_the_table(demo) -> None:
    result = search(demo, "a red circle", "--preview")
    assert result.exit_code == 0, result.output
    assert ESC not in result.stdout
    assert result.stdout == search(demo, "a red circle").stdout  # the usual table, whatever its columns


def test_a_forced_protocol_draws_even_when_piped(demo) -> None:
    table = search(demo, "a red circle", "--kind", "image", "--mode", "semantic")  # one line a hit (no words column)
    names = [line.split()[-1] for line in table.stdout.splitlines()[1:]]
    result = search(demo, "a red circle", "--kind", "image", "--mode", "semantic", "--preview=blocks", "--preview-height", "4",
                    env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert f"{ESC}[38;2;" in result.stdout and "▀" in result.stdout
    lines = visible(result.stdout).splitlines()
    assert lines[4].split() == ["#1", table.stdout.splitlines()[1].split()[1], "#2",
                                table.stdout.splitlines()[2].split()[1], "#3", table.stdout.splitlines()[3].split()[1]]
    assert [name[-14:] for name in lines[5].split()] == [name[-14:] for name in names]
    from clipdex.search.http.media import ThumbnailCache

    rows = demo.catalog.get_items(hit.id for hit in demo.search(text="a red circle", kind="image", k=3))
    cache = ThumbnailCache(demo.path)
    # made into the library's thumbnail cache, as the server does
    assert all(any(cache.path_for(row, size).exists() for size in (64, 128)) for row in rows.values())


@pytest.mark.parametrize("protocol, start", [("kitty", f"{ESC}_Ga=T,f=100"), ("iterm", f"{ESC}]1337;File=inline=1"),
                                             ("sixel", f"{ESC}P0;0;0q")])
def test_each_protocol_can_be_forced(demo, protocol: str, start: str) -> None:
    result = search(demo, "a red circle", "--kind", "image", f"--preview={protocol}")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(start) == 3


def test_text_hits_are_shown_as_their_text(demo) -> None:
    result = search(demo, "a red circle, in words", "--kind", "text", "--preview=kitty", "--preview-height", "4")
    assert result.exit_code == 0, result.output
    assert f"{ESC}_G" not in result.stdout
    shown = visible(result.stdout)
    assert "a red circle, in" in shown and "words" in shown and "text " in shown  # wrapped in its 16-column cell


def test_a_bare_preview_before_the_query_leaves_it_the_query(demo) -> None:
    assert search(demo, "--preview", "a red circle").stdout == search(demo, "a red circle").stdout


def test_preview_refuses_another_format(demo) -> None:
    result = runner.invoke(app, ["search", "a red circle", "--preview", "--json", "--library", str(demo.path)])
    assert result.exit_code == 1
    assert "--preview shows the hits as pictures; leave out --format json" in result.output


def test_no_color_draws_no_blocks_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", Terminal())
    monkeypatch.setattr("sys.stdin", io.StringIO())  # not a terminal: no query
    assert preview.choose_protocol("auto", {"TERM": "xterm-256color"}) == "blocks"
    assert preview.choose_protocol("auto", {"TERM": "xterm-256color", "NO_COLOR": "1"}) is None
    assert preview.choose_protocol("blocks", {"NO_COLOR": "1"}) == "blocks"


def test_sixel_without_textual_image_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.errors import ClipdexError

    monkeypatch.setitem(__import__("sys").modules, "textual_image._sixel", None)
    with pytest.raises(ClipdexError, match=r"needs textual-image: pip install 'clipdex\[browse\]'"):
        preview.sixel_image(two_colours(), 4, 2, SCREEN)


def test_the_thumbnail_cache_comes_without_fastapi() -> None:
    """--preview uses the server's thumbnail cache; importing it must not import FastAPI (a quarter second)."""
    import subprocess
    import sys

    code = ("import sys, clipdex.search.http.media, clipdex.search.http as http; "
            "print('fastapi' in sys.modules, callable(http.create_app), 'fastapi' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True", "True"]
