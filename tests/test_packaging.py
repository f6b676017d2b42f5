"""The distribution: one import package, `clipdex`, and nothing generic in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked files: setuptools reuses ROOT/build/lib, where a file the
    # packaging no longer ships (or never did) may linger from an earlier build and slip into the wheel.
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # --no-build-isolation: the build needs setuptools only, already in the environment (no network)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, cwd=out)
    (built,) = out.glob("clipdex-*.whl")
    return built


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
                   "clipdex/search/analysis/zero_shot.py", "clipdex/indexer/pipeline.py", "clipdex/cli/main.py"):
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
