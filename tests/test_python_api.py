"""The Python API as an application developer meets it: discoverable names, signatures an IDE
can show, errors that speak of arguments, writers that queue, a closed library that says so."""

from __future__ import annotations

import inspect
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
    assert exceptions <= set(clipdex.__all__)
    assert exceptions <= set(clipdex.search.__all__)
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
    ({"kind": "video"}, "kind= must be one of image, text, any"),
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
