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
