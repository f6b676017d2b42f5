"""The HTTP API against its own OpenAPI document: schemathesis with every check (issue #17).

Runs `schemathesis run --checks all` in this process (its click command, through
CliRunner) against the app served from a thread on 127.0.0.1, with a token, a fixed
seed and a bounded number of examples, and fails on any finding: an undocumented status,
a body that does not match its schema, a schema-valid request refused as invalid, an
invalid one accepted, a 5xx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from clipdex.search.http import create_app, serve_in_thread
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from clipdex.indexer import index_paths
from tests.conftest import write_image

schemathesis_cli = pytest.importorskip("schemathesis.cli", reason="the contract test needs schemathesis: pip install -e '.[dev]'")

TOKEN = "contract-test-token"
# positive_data_acceptance expects a request that fits the schema to succeed. Some cannot,
# and no JSON Schema can say so: bytes that are base64 but not an image, `after` later than
# `before`, more weights than terms. The server answers those 400 with the reason, as its
# document says; every other status of schemathesis's default list stays as it is.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def served_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelSpec) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("contract")
    library = Library.open(folder / "library", model=tiny_model, create=True, device="cpu")
    for number in range(4):
        write_image(folder / "photos" / f"img{number}.jpg", seed=number)
    index_paths(library, [folder / "photos"])
    with serve_in_thread(create_app(library, token=TOKEN, allowed_hosts=("127.0.0.1",))) as url:
        yield url
    library.close()


@pytest.mark.slow
def test_the_server_answers_as_its_openapi_document_says(served_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # schemathesis keeps its own state in the working directory
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    arguments = [
        "--config-file", str(config), "--no-color",
        "run", f"{served_url}/openapi.json",
        "--checks", "all",
        "--header", f"Authorization: Bearer {TOKEN}",
        "--max-examples", "25", "--seed", "17", "--generation-database", "none", "--workers", "1",
        "--request-timeout", "30",
    ]
    result = CliRunner().invoke(schemathesis_cli.schemathesis, arguments)
    assert result.exit_code == 0, result.output
    assert "No issues found" in result.output or "passed" in result.output, result.output
