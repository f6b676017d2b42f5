"""The suite runs in a home of its own (tests/home.py): it needs nothing in the user's home,
and writes nothing there (`homes_left_empty` in tests/conftest.py checks both homes once the
session ends)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.home import SESSION, SESSION_FOLDERS


def test_the_session_has_a_home_of_its_own() -> None:
    root = SESSION.root
    assert root is not None
    for variable, folder in SESSION_FOLDERS.items():
        assert os.environ[variable] == str(root / folder), variable
    assert Path.home() == root / "home" and Path.home() not in SESSION.real_homes
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token.parent == root and len(token.read_text()) == 64


def test_child_processes_get_the_sessions_home() -> None:
    script = "import os, pathlib; print(pathlib.Path.home()); print(os.environ['XDG_CACHE_HOME'])"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [os.environ["HOME"], os.environ["XDG_CACHE_HOME"]]
