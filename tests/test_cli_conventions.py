"""The command line's conventions: `-h` everywhere, choices and defaults shown in help,
usage errors as plain lines."""

from __future__ import annotations

import os
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
