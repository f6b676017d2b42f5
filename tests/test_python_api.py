"""The Python API as an application developer meets it: discoverable names, signatures an IDE
can show, errors that speak of arguments, writers that queue, a closed library that says so."""

from __future__ import annotations

import inspect
import threading
import time
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest

import clipdex
import clipdex.search
from clipdex.search import errors
from clipdex.search.library import Library


def _public_exceptions() -> set[str]:
    return {name for name, value in vars(errors).items()
            if isinstance(value, type) and issubclass(value, errors.ClipdexError) and not name.startswith("_")}


def test_every_clipdex_error_is_exported_from_clipdex_and_clipdex_search() -> None:
    exceptions = _public_exceptions()
    assert {"ReadOnlyLibrary", "CatalogUnavailable", "FileUnavailable", "LibraryClosed"} <= exceptions
    for package in (clipdex, clipdex.search):
        exported = {name for name in package.__all__ if isinstance(getattr(package, name), type)
                    and issubclass(getattr(package, name), errors.ClipdexError)}
        assert exported == exceptions
    for name in exceptions:
        assert getattr(clipdex, name) is getattr(errors, name)
        assert getattr(clipdex.search, name) is getattr(errors, name)


def test_dir_of_clipdex_lists_its_public_names() -> None:
    """In a fresh interpreter: the names load lazily, yet `dir` and completion see them all."""
    code = "import clipdex; print(' '.join(dir(clipdex)))"
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(clipdex.__all__) <= set(listed)
    assert {"open_library", "Library", "index_paths", "ReadOnlyLibrary"} <= set(listed)
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib"} & set(listed)
    for name in listed:
        getattr(clipdex, name)  # each one listed is there


def test_help_of_library_starts_with_how_to_open_one() -> None:
    text = pydoc.render_doc(Library, renderer=pydoc.plaintext)
    before_constructor = text.split("__init__")[0]
    assert "Library.open(" in before_constructor and "open_library" in before_constructor
    assert "Internal" in (Library.__init__.__doc__ or "")


def test_search_has_an_explicit_keyword_signature() -> None:
    parameters = inspect.signature(Library.search).parameters
    for name in ("text", "image", "like", "vector", "minus", "weights", "kind", "path", "after", "before",
                 "min_width", "min_height", "k", "offset", "threshold"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert parameters["k"].default == 10 and parameters["kind"].default == "any"


# -- errors name the library's arguments, not the CLI's flags --------------------------------


def test_an_unknown_filter_is_an_invalid_query_naming_the_valid_ones(library: Library) -> None:
    with pytest.raises(errors.InvalidQuery, match=r"max_width= \(did you mean min_width=\?\).*min_height=") as raised:
        library.search(text="a dog", max_width=3)  # type: ignore[arg-type]
    assert "kind=" in str(raised.value) and "--" not in str(raised.value)
    with pytest.raises(errors.InvalidQuery, match="not both"):
        library.search(clipdex.Query.build(text="a dog"), k=3)


@pytest.mark.parametrize("options, words", [
    ({"after": "2024-05-01", "before": "2024-01-01"}, "after=2024-05-01T00:00:00 is not before before=2024-01-01T00:00:00"),
    ({"after": "last tuesday"}, "after= wants a date or time"),
    ({"before": "2024-01-01T00:00:00+05:00"}, "before= takes a local date or time"),
    ({"like": "x"}, "like= wants an item id"),
    ({"min_width": 2**63}, f"min_width={2**63} is too large"),
    ({"kind": "audio"}, "kind= must be one of image, text, video, any"),
])
def test_query_errors_name_arguments(options: dict[str, object], words: str) -> None:
    with pytest.raises(errors.InvalidQuery) as raised:
        clipdex.Query.build(text="x", **options)  # type: ignore[arg-type]
    assert words in str(raised.value) and "--" not in str(raised.value)


def test_library_errors_name_arguments(library: Library, tmp_path: Path, tiny_model: clipdex.ModelSpec) -> None:
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    with pytest.raises(errors.ModelMismatch) as mismatch:
        Library.open(library.path, model=clipdex.ModelSpec(tiny_model.name, str(other)))
    assert "drop model= to use the library's own model" in str(mismatch.value) and "--" not in str(mismatch.value)
    with pytest.raises(errors.ClipdexError, match="runtime= must be one of auto, torch, onnx, not 'fast'"):
        Library.open(library.path, runtime="fast")
    with pytest.raises(errors.ClipdexError, match="device= must be one of auto, cpu, cuda, not 'gpu'"):
        Library.open(library.path, device="gpu")
    with pytest.raises(errors.LibraryNotFound) as missing:
        Library.open(tmp_path / "none")
    assert "create=True" in str(missing.value) and "--" not in str(missing.value)
    with pytest.raises(errors.ClipdexError, match="catalog= takes a PostgreSQL URL"):
        Library.open(tmp_path / "new", create=True, model=tiny_model, catalog="sqlite:///x.sqlite")


# -- writing alongside others ----------------------------------------------------------------


HOLD_THE_LOCK = ("import sys\nfrom clipdex.search.library import Library\n"
                 "with Library.open(sys.argv[1]).writer():\n    print('held', flush=True)\n    sys.stdin.read()\n")


def _hold(library: Path) -> subprocess.Popen[str]:
    """Another process (a CLI index run, say) writing `library` until its stdin is closed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(library)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_writer_opened_with_wait_queues_behind_another_process(library: Library, tmp_path: Path,
                                                                 make_images) -> None:
    make_images(tmp_path / "pics", 2)
    holder = _hold(library.path)
    try:
        with pytest.raises(errors.LibraryBusy, match=f"being written by pid {holder.pid}"):
            clipdex.index_paths(library, [tmp_path / "pics"])  # wait=0, the default: at once
        waiting = clipdex.open_library(library.path, device="cpu", wait=0.3)
        with pytest.raises(errors.LibraryBusy, match=r"\(waited 0.3 s\)"):
            clipdex.index_paths(waiting, [tmp_path / "pics"])
        queued = clipdex.open_library(library.path, device="cpu", wait=60)
        reports: list[clipdex.IndexReport] = []
        indexing = threading.Thread(target=lambda: reports.append(clipdex.index_paths(queued, [tmp_path / "pics"])))
        indexing.start()
        indexing.join(1.0)
        assert indexing.is_alive() and not reports  # waiting for the other writer
    finally:
        holder.communicate("", timeout=60)
    indexing.join(60)
    assert reports[0].added == 2
    assert queued.search(text="x", k=5)


def test_waiting_for_itself_is_refused_at_once_and_another_thread_is_waited_for(library: Library) -> None:
    with library.writer():
        started = time.monotonic()
        with pytest.raises(errors.LibraryBusy, match="already being written in this thread"):
            with library.writer(wait=30):
                pass
        assert time.monotonic() - started < 5
    released = threading.Event()

    def write_a_while() -> None:
        with library.writer():
            released.wait(10)

    other = threading.Thread(target=write_a_while)
    other.start()
    time.sleep(0.2)
    threading.Timer(0.5, released.set).start()
    with library.writer(wait=30):  # the other thread's write ends, then this one goes on
        assert released.is_set()
    other.join()


def test_a_closed_library_says_so(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 2)
    clipdex.index_paths(library, [tmp_path / "pics"])
    with clipdex.open_library(library.path, device="cpu") as reopened:
        assert reopened.search(text="x", k=1)
    for use in (lambda: reopened.search(text="x"), lambda: reopened.get_item(1), reopened.stats,
                lambda: reopened.encode_text("x"), lambda: reopened.vectors, reopened.check_writable,
                lambda: clipdex.index_paths(reopened, [tmp_path / "pics"])):
        with pytest.raises(errors.LibraryClosed, match="was closed; open it again"):
            use()
    reopened.close()  # twice: nothing to do


# -- the options of the CLI ------------------------------------------------------------------


def test_open_library_takes_the_clis_options(library: Library, tmp_path: Path, tiny_model: clipdex.ModelSpec) -> None:
    torch_run = clipdex.open_library(library.path, device="cpu", runtime="torch")
    assert torch_run.encoders.requested_runtime == "torch" and torch_run.stats()["runtime"] == "torch"
    made = clipdex.open_library(tmp_path / "made", model=tiny_model, device="cpu", create=True)
    assert made.created and made.model.name == "tiny-clip"


def test_create_app_takes_the_clis_options(library: Library) -> None:
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    with TestClient(create_app(library.path, device="cpu", runtime="torch")) as client:
        assert client.get("/stats").json()["runtime"] == "torch"
    with pytest.raises(errors.ClipdexError, match="runtime= must be one of"):
        create_app(library.path, runtime="fast")


# -- the README's embedding example runs as written ------------------------------------------


def test_the_readmes_embedding_example_runs(tmp_path: Path, tiny_model: clipdex.ModelSpec, make_images,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Python API\n")[1].split("\n## ")[0]
    (example,) = [code for code in (block.split("```")[0] for block in section.split("```python\n")[1:]) if "FastAPI" in code]
    opening = 'clipdex.open_library("photos-library", create=True,'
    assert opening in example
    example = example.replace(opening, 'clipdex.open_library("photos-library", create=True, model=TINY_MODEL, device="cpu",')
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"TINY_MODEL": tiny_model}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    (photo,) = make_images(tmp_path / "camera", 1)
    with TestClient(namespace["app"]) as client:  # type: ignore[arg-type]
        assert client.post("/photos", files={"photo": ("beach.jpg", photo.read_bytes())}).json() == {"queued": "beach.jpg"}
        hits = client.get("/find", params={"q": "a beach"}).json()
        assert [hit["path"] for hit in hits] == [str(tmp_path / "uploads" / "beach.jpg")]
        assert client.get("/clipdex/stats").json()["images"] == 1
        assert client.get("/find", params={"q": " "}).status_code == 400
    library = namespace["library"]
    assert isinstance(library, Library) and library.closed  # the lifespan closed it


def test_an_app_over_a_closed_library_answers_503(library: Library) -> None:
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    with TestClient(create_app(library)) as client:
        library.close()
        answer = client.post("/search", json={"text": "a dog"})
        assert answer.status_code == 503 and "was closed" in answer.json()["detail"]
