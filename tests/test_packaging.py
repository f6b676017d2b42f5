"""The distribution: one import package, `clipdex`, and nothing generic in site-packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


BUILD_LOG: list[str] = []  # what the build said, for test_the_build_does_not_warn


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the build needs setuptools only, already in the environment (no network);
    # --verbose: the build backend's own output (its warnings) comes through
    # pip asks `rustc --version` for its user agent; rustup's rustc writes ~/.rustup/settings.toml when
    # it finds none: give it a folder of the test's own, not the session's home
    environment = {**os.environ, "RUSTUP_HOME": str(tmp_path_factory.mktemp("rustup"))}
    # from a copy of the tree: setuptools builds in the source folder, and would pack what an earlier
    # build left in its build/lib (a module since removed, data a package no longer names)
    source = tmp_path_factory.mktemp("source") / "clipdex"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                "demo", ".bench", ".whl", ".gl", ".pytest_cache", ".mypy_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--verbose", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out), str(source)], cwd=out, capture_output=True, text=True, check=False,
                           env=environment)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    BUILD_LOG.append(built.stdout + built.stderr)
    (wheel_file,) = out.glob("clipdex-*.whl")
    return wheel_file


@pytest.mark.slow
def test_the_build_does_not_warn(wheel: Path) -> None:
    """setuptools has nothing to say about the project's packaging: no deprecated setting (a
    `license` table), no folder of data that "would be ignored" because no package names it."""
    import re

    warnings = [line.strip() for line in BUILD_LOG[0].splitlines()
                if re.search(r"\w+Warning\b|would be ignored|deprecated", line)]
    assert warnings == []
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        assert "License-Expression: MIT" in archive.read(metadata).decode().splitlines()


@pytest.mark.slow
def test_wheel_installs_only_clipdex(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["clipdex"]
        entry_points = archive.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"clipdex"}
    for module in ("clipdex/__init__.py", "clipdex/search/library.py", "clipdex/search/http/app.py",
                   "clipdex/search/http/static/index.html", "clipdex/search/encoders/factory.py",
                   "clipdex/search/catalog/database.py", "clipdex/search/index/store.py",
                   "clipdex/search/index/data/everyday_nouns.txt", "clipdex/search/media/imaging.py",
                   "clipdex/search/analysis/zero_shot.py", "clipdex/indexer/pipeline.py", "clipdex/cli/main.py",
                   "clipdex/demo_model/clipdex-demo.json", "clipdex/demo_model/clipdex-demo.pt"):
        assert module in names
    assert "clipdex = clipdex.cli.main:main" in entry_points


@pytest.mark.slow
def test_the_installed_wheel_imports_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    """Installed alone (no checkout on the path), `from clipdex import ...` works and `search` is not installed."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    code = ("import importlib.util, clipdex; from clipdex import open_library, Library, ModelSpec; "
            "assert clipdex.__file__.startswith(%r), clipdex.__file__; "
            "print([name for name in ('search', 'indexer', 'cli') if importlib.util.find_spec(name)])") % str(target)
    result = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(target)!r}] + "
                             f"[p for p in {sys.path!r} if 'site-packages' in p and 'clipdex' not in p]; {code}"],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_make_says_what_each_install_step_does(tmp_path: Path) -> None:
    """`make demo` on a fresh checkout installs for minutes: each step is announced by a line
    before it starts, and pip is not silenced (its progress shows)."""
    planned = subprocess.run(["make", "--dry-run", "--always-make", "demo", "install-dev", f"VENV={tmp_path / 'venv'}"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    steps = [number for number, line in enumerate(planned)
             if " -m venv " in line or " -m pip install -e " in line or line.startswith("bash data/demo.sh")]
    assert len(steps) == 4, planned
    for number in steps:
        assert planned[number - 1].startswith('echo "== '), planned[number - 1: number + 1]
    installs = [line for line in planned if " -m pip install" in line]
    assert installs and all(not {"--quiet", "-q", "-qq"} & set(line.split()) for line in installs)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_model_offline(wheel: Path, tmp_path: Path) -> None:
    """`pip install clipdex` gives a model at once: `--model demo` finds the one in the wheel."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    path = [str(target)] + [p for p in sys.path if "site-packages" in p and "clipdex" not in p]
    code = (f"import sys; sys.path[:0] = {path!r}; sys.argv = ['clipdex', 'embed', '--text', 'a red circle', "
            "'--model', 'demo', '--json']; from clipdex.cli.main import main; main()")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    embedded = json.loads(result.stdout)
    assert (embedded["model"], embedded["dim"]) == ("clipdex-demo", 128)
    assert embedded["weights"] == f"checkpoint {target / 'clipdex' / 'demo_model' / 'clipdex-demo.pt'}"


TYPED_APPLICATION = '''
from __future__ import annotations

import clipdex
from clipdex import ClipdexError, Hit, Library, LibraryBusy, ReadOnlyLibrary, open_library


def first_paths(library: Library, words: str) -> list[str]:
    hits: list[Hit] = library.search(text=words, kind="image", after="2024-06-01", min_width=640, k=5)
    return [hit.path for hit in hits if hit.path is not None]


def serve(directory: str) -> list[str]:
    try:
        with open_library(directory, device="cpu", runtime="onnx", wait=5.0) as library:
            library.search(text="a dog", max_width=3)  # type: ignore
            library.search(text="a dog", kind="photos")  # type: ignore
            return first_paths(library, "a dog on the beach")
    except (LibraryBusy, ReadOnlyLibrary, clipdex.LibraryClosed) as error:
        return [str(error)]
    except ClipdexError:
        return []
'''


@pytest.mark.slow
def test_an_application_type_checks_against_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """`mypy --strict` on an application that uses clipdex as installed from the wheel (PEP 561:
    the wheel's py.typed): it finds clipdex's hints, checks `search`'s keywords, and refuses an
    argument `search` does not take (the `type: ignore`s would be unused otherwise: an error);
    and on the README's FastAPI example."""
    environment = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True)
    (site_packages,) = environment.glob("lib/python*/site-packages")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site_packages)
    # the dependencies (numpy, fastapi...) from this interpreter's environment; clipdex only from the wheel
    (site_packages / "dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    application = tmp_path / "app" / "application.py"
    application.parent.mkdir()
    application.write_text(TYPED_APPLICATION)
    service = application.parent / "service.py"  # the README's embedding example, as written
    readme = (ROOT / "README.md").read_text().split("## Python API\n")[1].split("\n## ")[0]
    (service_code,) = [code for code in (block.split("```")[0] for block in readme.split("```python\n")[1:]) if "FastAPI" in code]
    service.write_text(service_code)
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                             "--python-executable", str(environment / "bin" / "python"), str(application), str(service)],
                            capture_output=True, text=True, cwd=application.parent, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 2 source files" in result.stdout
