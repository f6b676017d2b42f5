"""Bad values on the command line: one line naming the value and the problem, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.errors import InvalidQuery
from clipdex.search.library import Library
from tests.conftest import one_line_error

runner = CliRunner()
HUGE = "99999999999999999999"  # past SQLite's 64-bit INTEGER


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["a dog", "--min-width", HUGE], f"--min-width {HUGE} is too large (at most 9223372036854775807)"),
        (["a dog", "--min-height", HUGE], f"--min-height {HUGE} is too large"),
        (["--like", HUGE], f"--like {HUGE}: item ids are between 1 and 9223372036854775807"),
    ],
)
def test_overflowing_integers(library: Library, tmp_path: Path, make_images, arguments: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    make_images(tmp_path / "photos", 2)
    index_paths(library, [tmp_path / "photos"], export_text=False)
    result = runner.invoke(app, ["search", *arguments, "--library", str(library.path)])
    assert message in one_line_error(result)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{0} {x}", "template '{0} {x}' has the unknown field {x}; use {} for the label"),
        ("{} {1}", "has the unknown field {1}"),
        ("a {label}", "has the unknown field {label}"),
        ("a photo of a {", "template 'a photo of a {': Single '{' encountered"),
        ("a photo }", "Single '}' encountered"),
        ("{:d}", "cannot be filled with a label"),
        ("{!z}", "template '{!z}'"),
        ("a photo", "has no {} for the label"),
    ],
)
def test_bad_templates(library: Library, tmp_path: Path, make_images, template: str, message: str) -> None:  # type: ignore[no-untyped-def]
    from clipdex.search.analysis.zero_shot import check_template

    with pytest.raises(InvalidQuery):
        check_template(template)
    image = make_images(tmp_path / "photos", 1)[0]
    result = runner.invoke(app, ["tag", str(image), "--labels", "cat", "--template", template, "--library", str(library.path)])
    assert message in one_line_error(result)


@pytest.mark.parametrize("template", ["{}", "a photo of a {0}.", "{{literal}} {}", "{!s}"])
def test_good_templates(template: str) -> None:
    from clipdex.search.analysis.zero_shot import check_template

    check_template(template)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array(["x"] * 32), "holds text, not real numbers"),
        (np.array(["0.5"] * 32), "holds text, not real numbers"),  # not silently parsed either
        (np.ones(32, np.complex64), "holds complex numbers, not real numbers"),
        (np.full(32, 1e39), "holds a number beyond float32's range"),  # not cast to infinity in silence
    ],
)
def test_a_query_vector_file_of_strings_or_complex_numbers(library: Library, tmp_path: Path, values: np.ndarray, message: str) -> None:
    np.save(tmp_path / "query.npy", values)
    result = runner.invoke(app, ["search", "--vector", str(tmp_path / "query.npy"), "--library", str(library.path)])
    assert f"vector file {tmp_path / 'query.npy'} {message}" in one_line_error(result)


def test_a_damaged_query_cache_row_is_encoded_again(library: Library) -> None:
    import sqlite3

    expected = library.encode_text("a dog")
    connection = sqlite3.connect(library.path / "catalog.sqlite")
    connection.execute("UPDATE query_cache SET vector = ? WHERE query = 'a dog'", (b"\0" * 13,))
    connection.commit()
    connection.close()
    np.testing.assert_allclose(library.encode_text("a dog"), expected, atol=1e-6)
