"""The HTTP API against its own OpenAPI document: schemathesis with every check (issues #17, #31).

Runs `schemathesis run --checks all` (its default checks and all the others) in this
process (its click command, through CliRunner) against the app served from a thread on
127.0.0.1, with a token, a fixed seed and about 1,000 generated requests, and fails on any
finding: an undocumented status, a body that does not match its schema, a schema-valid
request refused, an invalid one accepted, a 5xx.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from clipdex.search.http import create_app, serve_in_thread
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from clipdex.indexer import index_paths
from tests.conftest import write_image

schemathesis_cli = pytest.importorskip("schemathesis.cli", reason="the contract test needs schemathesis: pip install -e '.[dev]'")
import schemathesis  # noqa: E402  (after the skip above)

TOKEN = "contract-test-token"
MAX_EXAMPLES = 40  # per operation and phase: about 1,000 requests in all, 10-20 s
# A request that fits the schema should succeed; some cannot, and no JSON Schema can say
# which: base64 or a file whose bytes are not an image, `after` later than `before` or not
# a date, more weights than terms, terms that cancel out, a vector of another dimension,
# a text or path of only whitespace, a key twice in one request (POST /keys/...). The server answers those 400 with the reason, as its
# document says, so schemathesis's positive_data_acceptance lets 400 through, and
# `refused_only_for_what_no_schema_says` below holds each such 400 to one of those reasons.
# Anything the document can say (base64, a file that is not empty) it must say instead.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""
REASONS_NO_SCHEMA_SAYS = re.compile("|".join([
    r"(uploaded )?image: (?!empty file)",  # the image's bytes do not decode (an empty file: the document says minLength)
    r"(after|before)= wants a date or time", r"(after|before)= takes a local date or time",
    r"after=.* is not before before=",
    r"\d+ weights given for \d+ query terms", r"every query term has weight 0",
    r"the query terms cancel each other out",
    r"the query vector has \d+ dimensions",
    r"the query text .* is empty or only whitespace", r"the path filter is empty",
    r"mode=(hybrid|keyword) needs a text",  # words to match: a text term, which a schema cannot demand with mode
    r"item \d+ is an? [\w ]+, not an image file",  # POST /explain of a text or keyed item: which ids those are, no schema says
    # items added under keys (POST /keys/...): what no JSON Schema says of one item or of one among others
    r"images\[\d+\]: (?!empty file)", r"texts\[\d+\] is empty or only whitespace",
    r"keys\[\d+\] .* appears twice in the call", r"vectors\[\d+\] has \d+ dimensions; this library's model has \d+",
    r"vectors\[\d+\] is all zeros",
]))


@schemathesis.check
def refused_only_for_what_no_schema_says(ctx: Any, response: Any, case: Any) -> bool | None:
    """A request that fits the schema may be refused (400) only for a reason its schema cannot say."""
    meta = case.meta
    if response.status_code != 400 or meta is None or not meta.generation.mode.is_positive:
        return None
    try:
        detail = str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        detail = response.text[:200]
    if not REASONS_NO_SCHEMA_SAYS.match(detail):
        raise AssertionError(f"a request that fits the schema was refused for a reason the schema could say: {detail}")
    return None


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
        "--max-examples", str(MAX_EXAMPLES), "--seed", "17", "--generation-database", "none", "--workers", "1",
        "--request-timeout", "30",
    ]
    result = CliRunner().invoke(schemathesis_cli.schemathesis, arguments)
    assert result.exit_code == 0, result.output
    generated = re.search(r"(\d+) generated, (\d+) passed", result.output)
    assert generated and int(generated[1]) >= 800 and generated[1] == generated[2], result.output
