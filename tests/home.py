"""A home of the session's own: the suite runs on a machine whose home is empty, and leaves it so.

$HOME and the XDG folders (where open_clip, Hugging Face, torch, pip and Ray keep per-user
files) point into a folder of the session, made before the test modules are imported
(tests/conftest.py) and handed to every child process through the environment. Ray finds
the session's own token through RAY_AUTH_TOKEN_PATH: without one, the first Ray cluster a
test starts writes ~/.ray/auth_token, and a later test run with `RAY_AUTH_MODE=token`
passed only because of it.

This module is imported as `tests.home` by the conftest and by the tests alike (the conftest
itself is imported twice, as `conftest` and as `tests.conftest`), so `SESSION` is one.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import tempfile
from pathlib import Path

SESSION_FOLDERS = {"HOME": "home", "XDG_CACHE_HOME": "cache", "XDG_CONFIG_HOME": "config", "XDG_DATA_HOME": "data",
                   "XDG_STATE_HOME": "state", "CUDA_CACHE_PATH": "cache/nv", "TRITON_CACHE_DIR": "cache/triton",
                   # pip asks `rustc --version` for its user agent (tests/test_packaging.py builds a wheel); where
                   # rustc is rustup's proxy, that writes ~/.rustup/settings.toml into a home without one
                   "RUSTUP_HOME": "rustup"}
RAY_TOKEN_VARIABLES = ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
# where tools keep per-user files: a name new in these (or in the home itself) was written by the session
WATCHED_IN_HOME = (".ray", ".cache", ".config", ".local/share", ".local/state", ".pki", ".nv", ".triton")


class Session:
    def __init__(self) -> None:
        self.root: Path | None = None
        self.real_homes: dict[Path, set[str]] = {}  # each real home: its entries when the session began
        self.before: dict[str, str] = {}  # the variables this changed, as they were


SESSION = Session()


def user_homes() -> set[Path]:
    """The real home folders: $HOME as the session found it, and the account's."""
    homes = {Path(pwd.getpwuid(os.getuid()).pw_dir)}
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]))
    return homes


def home_entries(home: Path) -> set[str]:
    """The names in `home` and in its folders of per-user files (`WATCHED_IN_HOME`), as relative paths."""
    names: set[str] = set()
    for folder in ("", *WATCHED_IN_HOME):
        try:
            names |= {f"{folder}/{entry.name}".lstrip("/") for entry in os.scandir(home / folder)}
        except OSError:
            pass
    return names


def enter() -> None:
    """Point this process (and its children) at the session's home, folders and Ray token."""
    if SESSION.root is not None:
        return
    root = Path(tempfile.mkdtemp(prefix="clipdex-session-"))
    SESSION.root = root
    SESSION.real_homes = {home: home_entries(home) for home in user_homes()}
    SESSION.before = {name: os.environ[name] for name in (*SESSION_FOLDERS, *RAY_TOKEN_VARIABLES) if name in os.environ}
    for variable, folder in SESSION_FOLDERS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(root / folder)
    token = root / "ray-auth-token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.pop("RAY_AUTH_TOKEN", None)


def check_left_empty() -> None:
    """Nothing was written into the session's home (what writes into $HOME would write into a
    user's), and no new name appeared in a real one."""
    assert SESSION.root is not None
    home = SESSION.root / "home"
    written = sorted(str(path.relative_to(home)) for path in home.rglob("*"))
    assert written == [], f"the tests wrote into $HOME: {written[:20]}"
    for real, entries in SESSION.real_homes.items():
        new = sorted(home_entries(real) - entries)
        assert new == [], f"new in the real home {real} during the tests: {new}"


def leave() -> None:
    """Restore the environment, remove the session's folder."""
    if SESSION.root is None:
        return
    for name in (*SESSION_FOLDERS, *RAY_TOKEN_VARIABLES):
        if name in SESSION.before:
            os.environ[name] = SESSION.before[name]
        else:
            os.environ.pop(name, None)
    shutil.rmtree(SESSION.root, ignore_errors=True)
    SESSION.root = None
