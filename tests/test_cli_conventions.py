"""The command line's conventions: `-h` everywhere, choices and defaults shown in help,
usage errors as plain lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import typer
from typer.testing import CliRunner

from clipdex.cli.main import app

runner = CliRunner()

BOX_CHARACTERS = set("╭╮╰╯│─┌┐└┘")


def command_paths() -> Iterator[list[str]]:
    """Every command and group of `clipdex`, as the words that name it (`[]` is `clipdex` itself)."""

    def walk(command: Any, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, path + [name])

    yield from walk(typer.main.get_command(app), [])


COMMANDS = list(command_paths())


def test_every_command_is_walked() -> None:
    assert len(COMMANDS) > 15 and ["search"] in COMMANDS and ["cache", "info"] in COMMANDS


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "clipdex")
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_answers_to_h_and_help(words: list[str], flag: str) -> None:
    result = runner.invoke(app, [*words, flag], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Usage: {' '.join(['clipdex', *words])} " in result.stdout
    assert "-h" in result.stdout and "--help" in result.stdout


USAGE_ERRORS = [
    (["search", "--no-such-option"], "clipdex search", "No such option: --no-such-option"),
    (["search", "a cat", "--top"], "clipdex search", "Option '--top' requires an argument."),
    (["search", "a cat", "-k", "0"], "clipdex search", "Invalid value for '-k' / '--top': 0 is not in the range 1<=x<=10000."),
    (["index"], "clipdex index", "Missing argument 'PATH...'."),
    (["no-such-command"], "clipdex", "No such command 'no-such-command'."),
    (["cache", "info", "--bad"], "clipdex cache info", "No such option: --bad"),
]


@pytest.mark.parametrize(("args", "command", "message"), USAGE_ERRORS, ids=[" ".join(args) for args, _, _ in USAGE_ERRORS])
def test_a_usage_error_is_one_line_after_the_usage(args: list[str], command: str, message: str) -> None:
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"Usage: {command} ")
    assert lines[1:] == [f"Try '{command} -h' for help.", f"Error: {message}"]
    assert not BOX_CHARACTERS & set(result.stderr)


def test_the_installed_command_prints_a_usage_error_in_lines(tmp_path: Path) -> None:
    command = Path(sys.executable).with_name("clipdex")
    result = subprocess.run([str(command), "search", "--kind"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "80"}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["Usage: clipdex search [OPTIONS] [TEXT]", "Try 'clipdex search -h' for help.",
                                          "Error: Option '--kind' requires an argument."]


def help_of(words: list[str], columns: int = 80) -> str:
    result = runner.invoke(app, [*words, "-h"], env={"COLUMNS": str(columns)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def parameters(words: list[str]) -> list[Any]:
    command: Any = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    return list(command.params)


def choices_of(parameter: Any) -> list[str] | None:
    choices = getattr(parameter.type, "choices", None)
    return [str(choice) for choice in choices] if choices is not None else None


# Options that take one of a set, wherever a command has them
FIXED_SETS = {"--kind": ["image", "text", "video", "any"], "--format": ["table", "json", "paths", "html"],
              "--device": ["auto", "cpu", "cuda"], "--runtime": ["auto", "torch", "onnx"]}


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "clipdex")
def test_help_shows_the_choices_of_an_option_of_a_fixed_set(words: list[str]) -> None:
    help_text = help_of(words)
    for parameter in parameters(words):
        option = max(parameter.opts, key=len)
        if option in FIXED_SETS:
            assert choices_of(parameter) == FIXED_SETS[option], option
        choices = choices_of(parameter)
        if choices is not None:
            assert f"{option} <{'|'.join(choices)}>" in help_text


def test_search_kinds_are_the_querys() -> None:
    from clipdex.search.query import KIND_CHOICES

    assert sorted(FIXED_SETS["--kind"]) == sorted(KIND_CHOICES)


def test_a_value_outside_the_set_is_a_usage_error() -> None:
    result = runner.invoke(app, ["search", "a cat", "--kind", "images"], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == "Error: Invalid value for '--kind': 'images' is not one of 'image', 'text', 'video', 'any'."


@pytest.mark.parametrize("words", [words for words in COMMANDS if any("--library" in p.opts for p in parameters(words))],
                         ids=lambda words: " ".join(words))
def test_library_help_names_the_variable_and_the_default_folder(words: list[str]) -> None:
    from clipdex.search.paths import user_data_dir

    default = user_data_dir() / "library"
    shown = f"~/{default.relative_to(Path.home())}" if default.is_relative_to(Path.home()) else str(default)
    help_text = " ".join(re.sub(r"-\n +", "-", help_of(words)).split())  # unwrapped: click breaks a long path at hyphens
    assert f"-l, --library <path> Library directory [default: $CLIPDEX_LIBRARY, else {shown}]" in help_text


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "clipdex")
def test_help_is_whole_in_80_columns(words: list[str]) -> None:
    """Nothing is cut short to fit (as typer's panels cut `--catalog`'s URL), and no markup is eaten."""
    help_text = help_of(words, columns=80)
    assert "…" not in help_text and not BOX_CHARACTERS & set(help_text)
    if any("--catalog" in parameter.opts for parameter in parameters(words)):
        assert "(postgresql+psycopg://USER@HOST:PORT/DB)" in help_text
        assert "never from this option" in " ".join(help_text.split())


def test_model_demo_is_the_shipped_demo_model() -> None:
    """`--model demo` needs no --pretrained: the project's own model and its weights (data/demo-model/ here)."""
    import json

    result = runner.invoke(app, ["embed", "--text", "a red circle", "--model", "demo", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    embedded = json.loads(result.stdout)
    weights = Path(__file__).resolve().parents[1] / "data" / "demo-model" / "clipdex-demo.pt"
    assert (embedded["model"], embedded["dim"], embedded["weights"]) == ("clipdex-demo", 128, f"checkpoint {weights}")
