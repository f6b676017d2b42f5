"""The HTTP API (clipdex.search.http) through FastAPI's TestClient, and `clipdex serve`."""

from __future__ import annotations

import base64
import hmac
import importlib.util
import io
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import clipdex.search.http
import clipdex.search.http.guard
import clipdex.search.http.media
from clipdex.indexer import index_paths
from clipdex.search.catalog.database import NewItem
from clipdex.search.http import create_app, serve_in_thread
from clipdex.search.http.connections import ConnectionLimits
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from tests.conftest import huge_png, write_image

TOKEN = "correct-horse-battery-staple"
TEXTS = ("a sunny beach with palm trees", "minutes of the board meeting")
SECRET = "TOP-SECRET-NOT-IN-THE-LIBRARY"


def build_library(folder: Path, model: ModelSpec) -> tuple[Library, list[Path]]:
    """Six 48x40 images (the first two with a capture time) and two texts."""
    library = Library.open(folder / "library", model=model, create=True, device="cpu")
    photos = [write_image(folder / "photos" / f"img{number:03d}.jpg", seed=number) for number in range(6)]
    for path, taken in zip(photos, ("2022:03:15 12:00:00", "2023:07:01 08:30:00")):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = taken
        Image.open(path).save(path, exif=exif.tobytes())
    assert index_paths(library, [folder / "photos"]).added == 6
    with library.writer() as writer:
        writer.commit([NewItem(kind="text", text=text, vector=library.encode_text(text), source="notes.txt",
                               source_key=str(line)) for line, text in enumerate(TEXTS, 1)])
    return library, photos


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelSpec) -> Iterator[tuple[Library, list[Path]]]:
    """One library for the tests that leave it and its files as they are."""
    library, photos = build_library(tmp_path_factory.mktemp("http"), tiny_model)
    yield library, photos
    library.close()


@pytest.fixture(scope="module")
def indexed(shared: tuple[Library, list[Path]]) -> Library:
    return shared[0]


@pytest.fixture(scope="module")
def photos(shared: tuple[Library, list[Path]]) -> list[Path]:
    return shared[1]


@pytest.fixture(scope="module")
def client(indexed: Library) -> TestClient:
    return TestClient(create_app(indexed))


@pytest.fixture
def fresh(tmp_path: Path, tiny_model: ModelSpec) -> Iterator[tuple[Library, list[Path]]]:
    """A library of its own, for tests that change its files or index more."""
    library, photos = build_library(tmp_path, tiny_model)
    yield library, photos
    library.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET)
    return path


def image_id(library: Library, path: Path) -> int:
    return library.catalog.files_under([str(path.parent)])[str(path)].id


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- health, stats, docs ----------------------------------------------------------------


def test_health_stats_and_docs(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    stats = client.get("/stats").json()
    assert (stats["items"], stats["images"], stats["texts"], stats["vectors"], stats["dim"]) == (8, 6, 2, 8, 32)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/stats", "/search", "/search/image", "/embed", "/items/{item_id}",
            "/items/{item_id}/thumbnail", "/items/{item_id}/file"} <= set(paths)
    assert client.get("/docs").status_code == 200


DOCS_REFERENCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.mark.parametrize("mounted", [False, True])
def test_docs_load_nothing_from_another_site(indexed: Library, mounted: bool) -> None:
    """/docs works offline: Swagger UI's script and style come from this server, and its CSP allows only them."""
    from swagger_ui_bundle import swagger_ui_path

    if mounted:
        outer = FastAPI()
        outer.mount("/clipdex", create_app(indexed, token=TOKEN))
        client, docs_url = TestClient(outer), "http://testserver/clipdex/docs"
    else:
        client, docs_url = TestClient(create_app(indexed, token=TOKEN)), "http://testserver/docs"
    page = client.get(docs_url)  # no token: the docs hold no library data
    assert page.status_code == 200
    references = DOCS_REFERENCES.findall(page.text)
    assert {"docs/assets/swagger-ui-bundle.js", "docs/assets/swagger-ui.css", "static/docs.js"} <= set(references)
    assert re.findall(r"<script(?![^>]*\bsrc=)", page.text) == []  # no inline script for the CSP to allow
    for reference in references:
        url = urljoin(docs_url, reference)
        assert urlsplit(url).netloc == "testserver", reference  # nothing from a CDN
        asset = client.get(url)
        assert asset.status_code == 200, reference
        if reference.startswith("docs/assets/"):
            assert asset.content == (Path(str(swagger_ui_path)) / reference.removeprefix("docs/assets/")).read_bytes()
    openapi_url = urljoin(docs_url, "openapi.json")
    assert client.get(openapi_url).json()["info"]["title"] == "clipdex"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "style-src 'self';" in policy and "connect-src 'self';" in policy
    assert "unsafe-inline" not in policy and "http" not in policy
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get(urljoin(docs_url, "redoc"), headers=headers).status_code == 404  # ReDoc would load from a CDN


def test_app_from_a_library_directory(indexed: Library) -> None:
    with TestClient(create_app(indexed.path, device="cpu")) as client:
        assert client.post("/search", json={"text": "beach", "k": 3}).status_code == 200


# -- search -----------------------------------------------------------------------------


def test_text_search_ranks_hits(client: TestClient) -> None:
    response = client.post("/search", json={"text": "a sunny beach with palm trees", "k": 4})
    assert response.status_code == 200
    hits = response.json()["hits"]
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4]
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert hits[0]["kind"] == "text" and hits[0]["text"] == TEXTS[0] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_like_search_finds_the_item_first(client: TestClient, indexed: Library, photos: list[Path]) -> None:
    item = image_id(indexed, photos[2])
    hits = client.post("/search", json={"like": item, "k": 3}).json()["hits"]
    assert hits[0]["id"] == item and hits[0]["path"] == str(photos[2])
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("prefix", ["", "data:image/jpeg;base64,"])
def test_base64_image_search_finds_the_same_file(client: TestClient, photos: list[Path], prefix: str) -> None:
    hits = client.post("/search", json={"image": prefix + b64(photos[3].read_bytes()), "k": 2}).json()["hits"]
    assert hits[0]["path"] == str(photos[3]) and hits[0]["score"] > 0.999


def test_multipart_image_search_with_options(client: TestClient, photos: list[Path]) -> None:
    data = {"k": "2", "kind": "image", "minus": ["a dog", "a cat"], "weights": ["1", "0.1", "0.1"]}
    response = client.post("/search/image", files={"image": ("q.jpg", photos[1].read_bytes(), "image/jpeg")}, data=data)
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert len(hits) == 2 and hits[0]["path"] == str(photos[1]) and all(hit["kind"] == "image" for hit in hits)


@pytest.mark.parametrize("text", ["   ", "\t\n"])
def test_multipart_blank_text_is_refused(client: TestClient, photos: list[Path], text: str) -> None:
    files = {"image": ("q.jpg", photos[1].read_bytes(), "image/jpeg")}
    response = client.post("/search/image", files=files, data={"text": text})
    assert response.status_code == 400 and "only whitespace" in response.json()["detail"]


def test_text_and_like_combine(client: TestClient, indexed: Library, photos: list[Path]) -> None:
    item = image_id(indexed, photos[0])
    hits = client.post("/search", json={"text": ["beach"], "like": [item], "weights": [0.01, 1], "k": 1}).json()["hits"]
    assert hits[0]["id"] == item


ALL_IMAGES = {f"img{number:03d}.jpg" for number in range(6)}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"kind": "text"}, {"text"}),
        ({"kind": "image"}, ALL_IMAGES),
        ({"path": "*/img001.jpg"}, {"img001.jpg"}),
        ({"path": "../../*"}, set()),
        ({"min_width": 48, "min_height": 40}, ALL_IMAGES),
        ({"min_width": 49}, set()),
        ({"after": "2023-01-01"}, {"img001.jpg"}),
        ({"before": "2023-01-01"}, {"img000.jpg"}),
        ({"after": "2022-01-01", "before": "2023-07-01T09:00"}, {"img000.jpg", "img001.jpg"}),
        ({"after": "2024-01-01", "kind": "image"}, set()),
    ],
)
def test_filters(client: TestClient, filters: dict[str, Any], expected: set[str]) -> None:
    response = client.post("/search", json={"text": "anything", "k": 50, **filters})
    assert response.status_code == 200, response.text
    found = {Path(hit["path"]).name if hit["kind"] == "image" else "text" for hit in response.json()["hits"]}
    assert found == expected


def test_offset_pages_and_threshold(client: TestClient) -> None:
    everything = client.post("/search", json={"text": "beach", "k": 8}).json()["hits"]
    page = client.post("/search", json={"text": "beach", "k": 2, "offset": 2}).json()["hits"]
    assert [hit["id"] for hit in page] == [hit["id"] for hit in everything[2:4]]
    assert [hit["rank"] for hit in page] == [3, 4]
    cutoff = (everything[3]["score"] + everything[4]["score"]) / 2
    above = client.post("/search", json={"text": "beach", "k": 8, "threshold": cutoff}).json()["hits"]
    assert [hit["id"] for hit in above] == [hit["id"] for hit in everything[:4]]


@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "k": 0},
        {"text": "x", "k": 10_001},
        {"text": "x", "k": "5"},
        {"text": "x", "k": True},
        {"text": "x", "offset": -1},
        {"text": "x", "kind": "audio"},
        {"text": "x", "threshold": 1.5},
        {"text": "x", "min_width": -1},
        {"text": "x", "colour": "red"},
        {"text": ""},
        {"text": None},
        {"text": []},
        {"text": "x" * 2_001},
        {},
        {"k": 5},
        {"vector": []},
        {"like": "abc"},
        {"like": [0]},
        {"like": [10**20]},
        {"vector": "/etc/passwd"},
        {"vector": [1e39, 0.5]},  # beyond float32: the document says so (its maximum)
    ],
)
def test_requests_that_do_not_fit_the_schema_are_422(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/search", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] and response.json()["errors"]


@pytest.mark.parametrize(
    ("endpoint", "body", "field", "limit"),
    [
        ("/search", {"text": "x" * 2_001}, "body.text.0", 2_000),
        ("/search", {"text": ["a dog", "x" * 2_001]}, "body.text.1", 2_000),
        ("/search", {"text": "a dog", "minus": "x" * 2_001}, "body.minus.0", 2_000),
        ("/search", {"text": "a dog", "path": "x" * 1_001}, "body.path", 1_000),
        ("/search", {"text": "a dog", "after": "2" * 41}, "body.after", 40),
        ("/embed", {"text": "x" * 2_001}, "body.text", 2_000),
    ],
)
def test_an_over_long_string_is_counted_in_characters(client: TestClient, endpoint: str, body: dict[str, Any],
                                                      field: str, limit: int) -> None:
    """Not "at most 2000 items": a string's limit is in characters (issue #31)."""
    response = client.post(endpoint, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}: String should have at most {limit} characters")
    assert "items" not in response.json()["detail"]


def test_an_over_long_form_text_is_counted_in_characters(client: TestClient, photos: list[Path]) -> None:
    response = client.post("/search/image", files={"image": ("x.jpg", photos[0].read_bytes(), "image/jpeg")},
                           data={"text": "x" * 2_001})
    assert response.status_code == 422, response.text
    assert "at most 2000 characters" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"text": "x", "after": "last tuesday"}, "after= wants a date"),
        ({"text": "x", "after": "2024-05-01", "before": "2024-01-01"}, "is not before"),
        ({"text": "x", "weights": [1, 2]}, "2 weights given for 1 query terms"),
        ({"text": "x", "weights": [0]}, "weight 0"),
        ({"vector": [0.1, 0.2]}, "2 dimensions"),
        ({"text": "x", "minus": "x"}, "cancel each other out"),
        ({"text": "   "}, "only whitespace"),
        ({"text": "a dog", "minus": ["\t\n"]}, "only whitespace"),
    ],
)
def test_queries_the_library_cannot_answer_are_400(client: TestClient, body: dict[str, Any], reason: str) -> None:
    """They fit the schema: the library's own checks (search/query.py) refuse them, with the reason."""
    response = client.post("/search", json=body)
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["detail"] and reason in response.json()["detail"]


def test_vector_search(client: TestClient, indexed: Library, photos: list[Path]) -> None:
    item = image_id(indexed, photos[4])
    vector = indexed.catalog.get_item(item).vector_array().tolist()
    assert client.post("/search", json={"vector": vector, "k": 1}).json()["hits"][0]["id"] == item


def test_unknown_like_id_is_404(client: TestClient) -> None:
    response = client.post("/search", json={"like": [987654]})
    assert response.status_code == 404 and "987654" in response.json()["detail"]


# -- images: undecodable, too large, never a path or URL ----------------------------------


@pytest.mark.parametrize("endpoint", ["json", "multipart", "embed"])
def test_undecodable_image_is_400_with_the_reason(client: TestClient, endpoint: str) -> None:
    junk = b"this is not an image at all"
    if endpoint == "json":
        response = client.post("/search", json={"image": b64(junk)})
    elif endpoint == "multipart":
        response = client.post("/search/image", files={"image": ("x.jpg", junk, "image/jpeg")})
    else:
        response = client.post("/embed", json={"image": b64(junk)})
    assert response.status_code == 400
    assert "not an image Pillow can identify" in response.json()["detail"]


def test_the_documents_base64_pattern_is_what_the_server_decodes(client: TestClient) -> None:
    """Every string of up to 6 characters from a base64-ish alphabet, with and without a data: prefix:
    the OpenAPI document's pattern matches it exactly when the server decodes it (issue #31)."""
    from itertools import product

    from clipdex.search.http.schemas import InvalidBase64, decode_base64_image

    pattern = client.get("/openapi.json").json()["components"]["schemas"]["EmbedRequest"]["properties"]["image"]["pattern"]
    matcher = re.compile(pattern)
    strings = ["".join(letters) for size in range(7) for letters in product("A/=\n ,!", repeat=size)]
    strings += ["data:image/png;base64," + value for value in strings[:3000]] + ["data:,QUJD", "data:x", "QUJD\t\r\n"]
    for value in strings:
        try:
            decode_base64_image(value)
            decoded = True
        except InvalidBase64:
            decoded = False
        assert (matcher.search(value) is not None) == decoded, repr(value)


def test_an_empty_upload_is_outside_the_document(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["components"]["schemas"]["ImageSearchForm"]["properties"]["image"]["minLength"] == 1
    response = client.post("/search/image", files={"image": ("x.jpg", b"", "image/jpeg")})
    assert response.status_code == 400 and response.json()["detail"] == "image: empty file (0 bytes)"


def test_truncated_image_is_400(client: TestClient, photos: list[Path]) -> None:
    data = photos[0].read_bytes()[:300]
    response = client.post("/search/image", files={"image": ("x.jpg", data, "image/jpeg")})
    assert response.status_code == 400 and response.json()["detail"]


def test_image_field_is_not_a_path_or_url(client: TestClient, photos: list[Path]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.jpg"
        for value in (url, str(photos[0]), "file:///etc/passwd"):
            response = client.post("/search", json={"image": value})
            assert response.status_code == 400 and "not valid base64" in response.json()["detail"]
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody came: the server fetched nothing


def test_uploads_over_the_limit_are_413(indexed: Library, photos: list[Path]) -> None:
    client = TestClient(create_app(indexed, max_upload_bytes=1_000))
    image = photos[0].read_bytes()
    assert len(image) > 1_000
    assert client.post("/search/image", files={"image": ("x.jpg", image, "image/jpeg")}).status_code == 413
    assert client.post("/search", json={"image": b64(image)}).status_code == 413
    assert client.post("/embed", json={"image": b64(image)}).status_code == 413
    huge = b"x" * 200_000  # beyond the whole-body limit: refused before the body is read
    response = client.post("/search/image", files={"image": ("x.jpg", huge, "image/jpeg")})
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    chunked = client.post("/search", content=iter([b'{"text": "', b"y" * 200_000, b'"}']),
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413


@pytest.fixture(scope="module")
def over_query_limit() -> bytes:
    """Just over MAX_QUERY_IMAGE_PIXELS (and well under the indexing limit): 150 MB of RGB once decoded."""
    from clipdex.search.media.imaging import MAX_IMAGE_PIXELS, MAX_QUERY_IMAGE_PIXELS

    data = huge_png(7_100, 7_100)
    assert MAX_QUERY_IMAGE_PIXELS < 7_100 * 7_100 < MAX_IMAGE_PIXELS and len(data) < 20_000
    return data


@pytest.mark.parametrize("endpoint", ["json", "multipart", "embed"])
def test_query_images_over_the_pixel_limit_are_413(client: TestClient, over_query_limit: bytes, endpoint: str) -> None:
    """Refused from the image's header, before its pixels are decoded."""
    if endpoint == "json":
        response = client.post("/search", json={"image": b64(over_query_limit)})
    elif endpoint == "multipart":
        response = client.post("/search/image", files={"image": ("big.png", over_query_limit, "image/png")})
    else:
        response = client.post("/embed", json={"image": b64(over_query_limit)})
    assert response.status_code == 413, response.text
    assert list(response.json()) == ["detail"]
    assert "7100x7100 pixels is more than the 50,000,000 a query image may have" in response.json()["detail"]


# -- items, thumbnails, files -----------------------------------------------------------------


def test_item_metadata(client: TestClient, indexed: Library, photos: list[Path]) -> None:
    item = image_id(indexed, photos[5])
    body = client.get(f"/items/{item}").json()
    assert body["id"] == item and body["kind"] == "image" and body["path"] == str(photos[5])
    assert body["metadata"]["width"] == 48 and body["metadata"]["height"] == 40


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/items/987654", 404),
        ("/items/987654/thumbnail", 404),
        ("/items/987654/file", 404),
        ("/items/abc", 422),
        ("/items/1.5/file", 422),
        ("/items/0", 422),
        ("/items/-3/file", 422),
        ("/items/99999999999999999999999/file", 422),
        ("/items/1/thumbnail?size=0", 422),
        ("/items/1/thumbnail?size=5000", 422),
        ("/items/1/thumbnail?size=big", 422),
    ],
)
def test_bad_item_requests(client: TestClient, url: str, status: int) -> None:
    assert client.get(url).status_code == status


def test_thumbnail_is_made_once_and_cached(client: TestClient, indexed: Library, photos: list[Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    item = image_id(indexed, photos[0])
    first = client.get(f"/items/{item}/thumbnail", params={"size": 20})
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(first.content)).size) <= 64
    cached = list((indexed.path / "thumbnails" / "64").glob(f"{item}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content

    def must_not_run(*_args: Any, **_kwargs: Any) -> bytes:
        raise AssertionError("the thumbnail was made again")

    monkeypatch.setattr(clipdex.search.http.media, "thumbnail_jpeg", must_not_run)
    again = client.get(f"/items/{item}/thumbnail", params={"size": 64})
    assert again.status_code == 200 and again.content == first.content


def test_thumbnail_without_a_writable_cache(fresh: tuple[Library, list[Path]]) -> None:
    indexed, photos = fresh
    (indexed.path / "thumbnails").write_text("not a directory")
    response = TestClient(create_app(indexed)).get(f"/items/{image_id(indexed, photos[0])}/thumbnail")
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).format == "JPEG"


def test_text_items_have_no_file_or_thumbnail(client: TestClient) -> None:
    text_id = client.post("/search", json={"text": TEXTS[1], "kind": "text", "k": 1}).json()["hits"][0]["id"]
    assert client.get(f"/items/{text_id}").json()["text"] == TEXTS[1]
    for suffix in ("file", "thumbnail"):
        response = client.get(f"/items/{text_id}/{suffix}")
        assert response.status_code == 404 and "text" in response.json()["detail"]


def test_file_serves_the_indexed_bytes_with_safe_headers(client: TestClient, indexed: Library, photos: list[Path]) -> None:
    item = image_id(indexed, photos[2])
    response = client.get(f"/items/{item}/file")
    assert response.status_code == 200 and response.content == photos[2].read_bytes()
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]


def test_file_swapped_after_indexing_is_refused(fresh: tuple[Library, list[Path]], secret_file: Path) -> None:
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    swapped, edited = image_id(indexed, photos[0]), image_id(indexed, photos[1])
    photos[0].unlink()
    photos[0].symlink_to(secret_file)
    with photos[1].open("ab") as handle:
        handle.write(b"appended")
    for item in (swapped, edited):
        for suffix in ("file", "thumbnail"):
            response = client.get(f"/items/{item}/{suffix}")
            assert response.status_code == 404 and SECRET not in response.text
            assert "changed since it was indexed" in response.json()["detail"]


def decoy_like(original: Path, decoy: Path) -> Path:
    """A file of the original's size and modification time, holding SECRET (as `touch -r` and padding make)."""
    size = original.stat().st_size
    decoy.write_bytes((SECRET.encode() * (size // len(SECRET) + 1))[:size])
    os.utime(decoy, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns))
    return decoy


def assert_refused(client: TestClient, item: int) -> None:
    for suffix in ("file", "thumbnail"):
        response = client.get(f"/items/{item}/{suffix}")
        assert response.status_code == 404 and SECRET not in response.text
        assert "changed since it was indexed" in response.json()["detail"]


def test_symlink_swap_to_a_decoy_of_the_same_size_and_time_is_refused(fresh: tuple[Library, list[Path]],
                                                                       tmp_path: Path) -> None:
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    item = image_id(indexed, photos[0])
    decoy = decoy_like(photos[0], tmp_path / "passwd")
    photos[0].unlink()
    photos[0].symlink_to(decoy)
    assert photos[0].stat().st_size == decoy.stat().st_size  # what the old check compared
    assert_refused(client, item)


def test_hard_link_to_a_decoy_is_refused(fresh: tuple[Library, list[Path]], tmp_path: Path) -> None:
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    item = image_id(indexed, photos[1])
    decoy = decoy_like(photos[1], tmp_path / "photos" / ".shadow")
    photos[1].unlink()
    os.link(decoy, photos[1])
    assert_refused(client, item)


def test_parent_folder_swapped_for_a_link_is_refused(fresh: tuple[Library, list[Path]], tmp_path: Path) -> None:
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    item = image_id(indexed, photos[2])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    decoy_like(photos[2], elsewhere / photos[2].name)
    photos[2].parent.rename(tmp_path / "moved-away")
    photos[2].parent.symlink_to(elsewhere, target_is_directory=True)
    assert_refused(client, item)


def test_a_byte_identical_copy_in_place_is_still_served(fresh: tuple[Library, list[Path]], tmp_path: Path) -> None:
    """A restored backup has new inodes: the content hash decides then."""
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    item = image_id(indexed, photos[3])
    original = photos[3].read_bytes()
    copy = tmp_path / "photos" / "copy.tmp"
    copy.write_bytes(original)
    os.utime(copy, ns=(photos[3].stat().st_atime_ns, photos[3].stat().st_mtime_ns))
    os.replace(copy, photos[3])
    response = client.get(f"/items/{item}/file")
    assert response.status_code == 200 and response.content == original


def test_rows_without_a_recorded_inode_are_checked_by_hash(fresh: tuple[Library, list[Path]], tmp_path: Path) -> None:
    """Items indexed before device and inode were recorded (catalog migration 2)."""
    indexed, photos = fresh
    with indexed.catalog.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE items SET device = NULL, inode = NULL")
    client = TestClient(create_app(indexed))
    kept, swapped = image_id(indexed, photos[4]), image_id(indexed, photos[5])
    assert client.get(f"/items/{kept}/file").content == photos[4].read_bytes()
    decoy = decoy_like(photos[5], tmp_path / "decoy")
    os.replace(decoy, photos[5])
    assert_refused(client, swapped)


def test_index_records_the_file_identity(fresh: tuple[Library, list[Path]]) -> None:
    indexed, photos = fresh
    item = indexed.catalog.get_item(image_id(indexed, photos[0]))
    info = photos[0].stat()
    assert item is not None and (item.device, item.inode) == (info.st_dev, info.st_ino)


def test_vanished_file_is_404(fresh: tuple[Library, list[Path]]) -> None:
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    item = image_id(indexed, photos[3])
    photos[3].unlink()
    response = client.get(f"/items/{item}/file")
    assert response.status_code == 404 and "cannot be opened" in response.json()["detail"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_in_place_of_a_file_does_not_hang(fresh: tuple[Library, list[Path]]) -> None:
    indexed, photos = fresh
    client = TestClient(create_app(indexed))
    item = image_id(indexed, photos[4])
    photos[4].unlink()
    os.mkfifo(photos[4])
    assert client.get(f"/items/{item}/file").status_code == 404


def traversal_urls(secret: Path) -> list[str]:
    encoded = str(secret).replace("/", "%2F")
    return [
        f"/items/..%2F..%2F{encoded}/file",
        f"/items/{encoded}/file",
        f"/items/%2e%2e/%2e%2e{secret}",
        f"/items/1%2F..%2F..%2F{encoded}/thumbnail",
        f"/items/1/thumbnail?size=..%2F..%2F{encoded}",
        f"/static/..%2F..%2F..%2F{encoded}",
        f"/static/%2e%2e/%2e%2e/%2e%2e{secret}",
        f"/static/{encoded}",
        "/static/..%2Fhttp%2Fapp.py",
        "/static/%2e%2e/http/app.py",
        f"/{encoded}",
        f"//{secret}",
    ]


def test_path_traversal_serves_nothing(client: TestClient, secret_file: Path) -> None:
    for url in traversal_urls(secret_file):
        response = client.get(url)
        assert 400 <= response.status_code < 500, url
        assert SECRET not in response.text and "create_app" not in response.text, url


def raw_get(url: str, path: str) -> bytes:
    """GET `path` exactly as written (no client normalizes its dot segments), as curl --path-as-is."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_path_traversal_over_a_socket(indexed: Library, secret_file: Path) -> None:
    paths = ["/static/../http/app.py", f"/static/../../../../..{secret_file}", f"/items/../../..{secret_file}",
             f"/items/1/../../..{secret_file}", f"/items/1/file/../../..{secret_file}", f"/static/./../../..{secret_file}"]
    with serve_in_thread(create_app(indexed)) as url:
        for path in paths:
            response = raw_get(url, path)
            status = int(response.split(b" ", 2)[1])
            assert 400 <= status < 500, path
            assert SECRET.encode() not in response and b"create_app" not in response, path


def test_extra_parameters_cannot_pick_another_file(client: TestClient, indexed: Library, photos: list[Path],
                                                   secret_file: Path) -> None:
    item = image_id(indexed, photos[0])
    response = client.get(f"/items/{item}/file", params={"path": str(secret_file), "file": "../secret.txt"})
    assert response.status_code == 200 and response.content == photos[0].read_bytes()


# -- embed --------------------------------------------------------------------------------


def test_embed_text_and_image(client: TestClient, indexed: Library, photos: list[Path]) -> None:
    body = client.post("/embed", json={"text": "a red bicycle"}).json()
    assert body["dim"] == 32 and body["model"] == indexed.model.name
    vector = np.asarray(body["vector"], dtype=np.float32)
    assert np.allclose(vector, indexed.encode_text("a red bicycle"), atol=1e-6)
    stored = indexed.catalog.get_item(image_id(indexed, photos[0])).vector_array()
    image_vector = np.asarray(client.post("/embed", json={"image": b64(photos[0].read_bytes())}).json()["vector"])
    assert float(image_vector @ stored) > 0.999


@pytest.mark.parametrize("body", [{}, {"text": "a", "image": "aGk="}, {"text": ""}, {"url": "http://example.com/x.jpg"}])
def test_embed_needs_exactly_one_input(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/embed", json=body).status_code == 422


# -- every error is small JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"text": "\\ud800"}', "body.text.0"),
        (b'{"text": "a dog", "minus": ["\\udfff"]}', "body.minus.0"),
        (b'{"text": "a dog", "path": "*\\ud83d*"}', "body.path"),
        (b'{"text": "a dog", "threshold": NaN}', "body.threshold"),
        (b'{"text": "a dog", "threshold": -Infinity}', "body.threshold"),
        (b'{"text": "a dog", "weights": [NaN]}', "body.weights"),
        (b'{"text": "a dog", "weights": Infinity}', "body.weights"),
        (b'{"vector": [NaN, 1.0]}', "body.vector.0"),
        (b'{"text": "a dog"', "body"),
        (b"\xff\xfe not JSON at all", "body"),
    ],
)
def test_malformed_values_are_a_json_422(client: TestClient, body: bytes, where: str) -> None:
    """Lone surrogates and NaN/Infinity (which Python's JSON reader accepts) were plain-text 500s."""
    response = client.post("/search", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["detail"].startswith(where) and error["errors"][0]["loc"][0] == "body"
    assert "input" not in error["errors"][0]


def test_embed_lone_surrogate_is_a_json_422(client: TestClient) -> None:
    response = client.post("/embed", content=b'{"text": "\\ud800"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "surrogate" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"vector": [0.5] * 600_000},  # over maxItems: pydantic used to echo all of it back
        {"vector": ["x"] * 20_000},  # 20,000 errors: the first few are listed
        {"text": "a dog", "x" * 500_000: 1},  # an unknown field's name is the client's too
        {"text": ["y" * 3_000] * 16},
    ],
)
def test_validation_errors_do_not_echo_the_request(client: TestClient, body: dict[str, Any]) -> None:
    content = json.dumps(body).encode()
    response = client.post("/search", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert len(response.content) < 4_000 < len(content)
    error = response.json()
    assert set(error) == {"detail", "errors"} and 1 <= len(error["errors"]) <= 10
    assert all(set(problem) == {"loc", "msg", "type"} for problem in error["errors"])


def test_a_bad_host_gets_json(indexed: Library) -> None:
    app = create_app(indexed, allowed_hosts=clipdex.search.http.LOOPBACK_HOSTS)
    for host in ("rebound.example", "127.0.0.1.rebound.example:8000", "[::2]:8000", "", "a b"):
        response = TestClient(app).get("/health", headers={"Host": host})
        assert response.status_code == 400, host
        assert response.json() == {"detail": "invalid Host header: this server answers only its own names"}
    for host in ("127.0.0.1:8000", "LOCALHOST", "[::1]:8000", "localhost"):
        assert TestClient(app).get("/health", headers={"Host": host}).status_code == 200, host
    patterns = TestClient(create_app(indexed, allowed_hosts=["*.photos.example"]))
    assert patterns.get("/health", headers={"Host": "home.photos.example"}).status_code == 200
    assert patterns.get("/health", headers={"Host": "photos.example.evil"}).status_code == 400


def test_an_unexpected_failure_is_a_json_500(indexed: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(indexed)

    def broken(_query: Any) -> None:
        raise RuntimeError("a bug, with /secret/paths in its message")

    monkeypatch.setattr(app.state.service, "search", broken)
    response = TestClient(app, raise_server_exceptions=False).post("/search", json={"text": "a dog"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "internal server error (the server's log has the details)"}


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status"),
    [
        ("POST", "/search", {"json": {}}, 422),
        ("POST", "/search", {"json": {"text": "   "}}, 400),
        ("POST", "/search", {"json": {"like": [987654]}}, 404),
        ("POST", "/search", {"json": {"text": "x", "after": "2024-01-01T00:00:00+05:00", "before": "2024-06-01"}}, 400),
        ("POST", "/search/image", {"data": {"text": "a dog"}}, 422),
        ("POST", "/search/image", {"files": {"image": ("x.jpg", b"", "image/jpeg")}, "data": {"text": " "}}, 400),
        ("POST", "/embed", {"json": {"text": None, "image": "aGk="}}, 422),
        ("POST", "/embed", {"json": {"image": "aGk="}}, 400),
        ("GET", "/items/987654", {}, 404),
        ("GET", "/items/0/thumbnail", {}, 422),
        ("DELETE", "/stats", {}, 405),
        ("GET", "/no/such/endpoint", {}, 404),
        ("GET", "/static/no-such-file.js", {}, 404),
    ],
)
def test_every_error_has_the_documented_shape(client: TestClient, method: str, url: str, kwargs: dict[str, Any],
                                              status: int) -> None:
    from clipdex.search.http.schemas import ErrorOut

    response = client.request(method, url, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    ErrorOut.model_validate(response.json(), strict=True)
    assert set(response.json()) == ({"detail", "errors"} if status == 422 else {"detail"})


def test_the_document_lists_every_status_with_one_error_model(secured: TestClient) -> None:
    document = secured.get("/openapi.json").json()
    expected = {
        ("/health", "get"): {"200", "400", "413"},
        ("/stats", "get"): {"200", "400", "401", "413", "503"},
        ("/search", "post"): {"200", "400", "401", "404", "413", "422", "503"},
        ("/search/image", "post"): {"200", "400", "401", "404", "413", "422", "503"},
        ("/embed", "post"): {"200", "400", "401", "413", "422", "503"},
        ("/items/{item_id}", "get"): {"200", "400", "401", "404", "413", "422"},
        ("/items/{item_id}/thumbnail", "get"): {"200", "400", "401", "404", "413", "422"},
        ("/items/{item_id}/file", "get"): {"200", "206", "400", "401", "404", "413", "416", "422"},
    }
    for (path, method), statuses in expected.items():
        responses = document["paths"][path][method]["responses"]
        assert set(responses) == statuses, (path, method)
        for status in statuses - {"200", "206"}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (path, method, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    body = document["paths"]["/search/image"]["post"]["requestBody"]["content"]
    assert list(body) == ["multipart/form-data"]
    schemas = document["components"]["schemas"]
    assert {"required": ["text"]} in schemas["SearchRequest"]["anyOf"]
    assert schemas["EmbedRequest"]["oneOf"] == [{"required": ["text"]}, {"required": ["image"]}]
    assert not {"ge", "le", "gt", "lt"} & schema_keys(document), "a bound the schema does not say as minimum/maximum"


def schema_keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(schema_keys(value) for key, value in node.items() if key != "properties"),
                               *(schema_keys(value) for value in node.get("properties", {}).values()))
    if isinstance(node, list):
        return set().union(*(schema_keys(value) for value in node))
    return set()


# -- a library that changes while the server runs -----------------------------------------------


def test_search_sees_an_index_run_of_another_process(fresh: tuple[Library, list[Path]], tiny_model: ModelSpec,
                                                     tmp_path: Path, make_images: Callable[..., list[Path]]) -> None:
    indexed = fresh[0]
    client = TestClient(create_app(indexed))
    assert client.get("/stats").json()["images"] == 6
    new_photos = make_images(tmp_path / "more", 3, start=50)
    with Library.open(indexed.path, model=tiny_model, device="cpu") as other:  # as another process would
        assert index_paths(other, [tmp_path / "more"]).added == 3
    hits = client.post("/search", json={"text": "anything", "kind": "image", "k": 50}).json()["hits"]
    assert {str(path) for path in new_photos} <= {hit["path"] for hit in hits}
    assert len(hits) == 9 and client.get("/stats").json()["images"] == 9
    first_new = client.post("/search", json={"image": b64(new_photos[0].read_bytes()), "k": 1}).json()["hits"][0]
    assert first_new["path"] == str(new_photos[0])


# -- the token -------------------------------------------------------------------------------------


PROTECTED = [
    ("GET", "/stats", None),
    ("POST", "/search", {"text": "x"}),
    ("POST", "/embed", {"text": "x"}),
    ("GET", "/items/1", None),
    ("GET", "/items/1/thumbnail", None),
    ("GET", "/items/1/file", None),
    ("GET", "/no/such/endpoint", None),
]


@pytest.fixture(scope="module")
def secured(indexed: Library) -> TestClient:
    return TestClient(create_app(indexed, token=TOKEN))


@pytest.mark.parametrize(("method", "url", "body"), PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer "])
def test_token_is_required(secured: TestClient, method: str, url: str, body: Any, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = secured.request(method, url, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "url", "body"), PROTECTED[:-1])
def test_right_token_is_let_through(secured: TestClient, method: str, url: str, body: Any) -> None:
    response = secured.request(method, url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


def test_multipart_upload_needs_the_token(secured: TestClient, photos: list[Path]) -> None:
    files = {"image": ("x.jpg", photos[0].read_bytes(), "image/jpeg")}
    assert secured.post("/search/image", files=files).status_code == 401
    assert secured.post("/search/image", files=files, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.parametrize("url", ["/health", "/", "/static/app.js", "/static/style.css", "/openapi.json"])
def test_health_and_the_page_code_need_no_token(secured: TestClient, url: str) -> None:
    response = secured.get(url)
    assert response.status_code == 200
    assert SECRET not in response.text and "/tmp" not in response.text  # no library data


def test_token_is_compared_in_constant_time(secured: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(left: bytes, right: bytes) -> bool:
        calls.append((left, right))
        return compare_digest(left, right)

    monkeypatch.setattr(clipdex.search.http.guard.hmac, "compare_digest", spy)
    assert secured.get("/stats", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert calls == [(b"guess", TOKEN.encode())]


def test_non_ascii_token(indexed: Library) -> None:
    client = TestClient(create_app(indexed, token="pässwörd-✓"))
    assert client.get("/stats", headers={"Authorization": "Bearer pässwörd-✓".encode()}).status_code == 200
    assert client.get("/stats", headers={"Authorization": "Bearer passwort-✓".encode()}).status_code == 401


def test_page_has_a_strict_content_security_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and 'id="search-form"' in response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_mounted_in_another_app(indexed: Library) -> None:
    outer = FastAPI()
    outer.mount("/clipdex", create_app(indexed, token=TOKEN))
    client = TestClient(outer)
    assert client.get("/clipdex/health").status_code == 200
    assert client.get("/clipdex/").status_code == 200
    assert client.get("/clipdex/stats").status_code == 401
    assert client.get("/clipdex/stats", headers={"Authorization": f"Bearer {TOKEN}"}).json()["items"] == 8


# -- clipdex serve ----------------------------------------------------------------------------------


class FakeListener:
    """What `open_listener` would bind, without binding it (the tests must not need port 8000 free)."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)

    def getsockname(self) -> tuple[str, int]:
        return self.address

    def close(self) -> None:
        pass


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `clipdex serve` would run, instead of running it."""
    captured: dict[str, Any] = {}

    def fake_run_server(app: Any, listener: FakeListener) -> None:
        captured.update(app=app, host=listener.address[0], port=listener.address[1])

    monkeypatch.setattr(clipdex.search.http, "open_listener", FakeListener)
    monkeypatch.setattr(clipdex.search.http, "run_server", fake_run_server)
    return captured


def invoke_serve(*args: str, env: dict[str, str] | None = None) -> Any:
    from clipdex.cli.main import app

    return CliRunner().invoke(app, ["serve", *args], env=env)


def test_serve_defaults_to_loopback_and_refuses_other_hosts(indexed: Library, served: dict[str, Any]) -> None:
    result = invoke_serve("--library", str(indexed.path))
    assert result.exit_code == 0, result.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 8000)
    assert "http://127.0.0.1:8000/" in result.output
    assert TestClient(served["app"], base_url="http://127.0.0.1:8000").get("/stats").status_code == 200
    assert TestClient(served["app"], base_url="http://localhost:8000").get("/stats").status_code == 200
    assert TestClient(served["app"], base_url="http://rebound.example:8000").get("/stats").status_code == 400


@pytest.mark.parametrize("how", ["option", "environment"])
def test_serve_token_from_option_or_environment(indexed: Library, served: dict[str, Any], how: str) -> None:
    if how == "option":
        result = invoke_serve("--library", str(indexed.path), "--port", "8765", "--token", TOKEN)
    else:
        result = invoke_serve("--library", str(indexed.path), "--port", "8765", env={"CLIPDEX_TOKEN": TOKEN})
    assert result.exit_code == 0, result.output
    assert "token required" in result.output
    client = TestClient(served["app"], base_url="http://127.0.0.1:8765")
    assert client.get("/stats").status_code == 401
    assert client.get("/stats", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_serve_warns_when_open_to_the_network_without_a_token(indexed: Library, served: dict[str, Any]) -> None:
    result = invoke_serve("--library", str(indexed.path), "--host", "0.0.0.0")
    assert result.exit_code == 0 and "without a token" in result.output
    assert TestClient(served["app"], base_url="http://photos.example:8000").get("/stats").status_code == 200


def test_serve_errors(tmp_path: Path, indexed: Library, served: dict[str, Any]) -> None:
    missing = invoke_serve("--library", str(tmp_path / "nothing-here"))
    assert missing.exit_code == 1 and "no clipdex library" in missing.output
    empty = invoke_serve("--library", str(indexed.path), "--token", " ")
    assert empty.exit_code == 1 and "empty" in empty.output
    assert not served


# -- concurrent clients over a real socket ---------------------------------------------------------


def load_module() -> Any:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("clipdex_load_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_concurrent_clients_get_no_errors(indexed: Library, photos: list[Path]) -> None:
    load = load_module()
    ids = indexed.catalog.ids("image").tolist()
    with serve_in_thread(create_app(indexed, token=TOKEN)) as url:
        report = load.run_load(url, ids, photos[0].read_bytes(), clients=6, queries=8, token=TOKEN)
    assert report.errors == [] and report.requests == 48
    assert 0 < report.percentile(0.5) <= report.percentile(0.95)
    assert "p95 ms" in report.table()


def test_serve_on_a_busy_port_says_so_before_serving(indexed: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port is bound before "Serving ..." is printed: a busy one is one line and exit 1."""
    ran: list[Any] = []
    monkeypatch.setattr(clipdex.search.http, "run_server", lambda *args: ran.append(args))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = invoke_serve("--library", str(indexed.path), "--port", str(port))
    assert result.exit_code == 1 and not ran
    assert result.output.strip().splitlines() == [
        f"Error: port {port} is already in use on 127.0.0.1: stop the server there or choose another --port"
    ]


def test_serve_binds_the_port_it_announces(indexed: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --port 0 the system picks a port; the announced URL is the one really bound."""
    bound: list[tuple[str, int]] = []

    def fake_run_server(app: Any, listener: socket.socket) -> None:
        bound.append(listener.getsockname()[:2])

    monkeypatch.setattr(clipdex.search.http, "run_server", fake_run_server)
    result = invoke_serve("--library", str(indexed.path), "--port", "0")
    assert result.exit_code == 0, result.output
    host, port = bound[0]
    assert host == "127.0.0.1" and port > 0 and f"http://127.0.0.1:{port}/" in result.output


# -- HTTP itself: HEAD, one body length, slow clients, floods (issue #31) ---------------------------


@pytest.mark.parametrize("url", ["/health", "/stats", "/items/{image}", "/items/{image}/thumbnail", "/items/{image}/file",
                                 "/", "/static/app.js", "/docs", "/openapi.json"])
def test_head_is_answered_wherever_get_is(client: TestClient, indexed: Library, photos: list[Path], url: str) -> None:
    """RFC 9110 9.3.2: the answer to GET, headers and all, without its body."""
    url = url.format(image=image_id(indexed, photos[0]))
    get, head = client.get(url), client.head(url)
    assert get.status_code == head.status_code == 200 and get.content and head.content == b""
    for name in ("content-type", "content-length", "cache-control", "content-security-policy"):
        assert head.headers.get(name) == get.headers.get(name), name


def test_head_needs_the_token_as_get_does(secured: TestClient) -> None:
    assert secured.head("/stats").status_code == 401
    assert secured.head("/stats", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert secured.head("/health").status_code == 200


def test_head_is_not_allowed_where_get_is_not(client: TestClient) -> None:
    head = client.head("/search")
    assert head.status_code == 405 and head.headers["allow"] == "POST"
    delete = client.delete("/health")
    assert delete.status_code == 405 and delete.headers["allow"] == "GET, HEAD"


def exchange(url: str, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes it (or `timeout`)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


SMUGGLED = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize("lengths", [
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(SMUGGLED)),  # a proxy reading Content-Length
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",  # either order
    b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
])
def test_a_request_with_two_lengths_is_refused_and_its_connection_closed(indexed: Library, lengths: bytes) -> None:
    """RFC 9112 6.1: with both Transfer-Encoding and Content-Length, the request behind the empty chunked
    body must not be answered: one 400, and the connection closed (the read ends, no timeout)."""
    request = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + lengths
               + b"\r\n0\r\n\r\n" + SMUGGLED)
    with serve_in_thread(create_app(indexed, allowed_hosts=("127.0.0.1",))) as url:
        answer = exchange(url, request)
        alone = exchange(url, SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert alone.startswith(b"HTTP/1.1 200 ")  # the hidden request, sent on its own, is answered
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"connection: close" in answer.lower() and b"both Transfer-Encoding and Content-Length" in answer


def test_head_over_a_socket_keeps_the_connection_framed(indexed: Library) -> None:
    """HEAD's answer says GET's Content-Length but sends no body: the next answer on the connection follows at once."""
    request = b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with serve_in_thread(create_app(indexed)) as url:
        answer = exchange(url, request)
    head, get = answer.split(b"HTTP/1.1 ")[1:]
    assert head.startswith(b"200 ") and b"content-length: 15\r\n" in head.lower() and head.endswith(b"\r\n\r\n")
    assert get.startswith(b"200 ") and get.endswith(b'{"status":"ok"}')


SMALL_LIMITS = ConnectionLimits(header_timeout=0.5, body_timeout=1.0, keep_alive_timeout=1, max_connections=8)


def trickle(url: str, head: bytes, slowly: bytes, seconds: float = 4.0) -> tuple[bytes, float]:
    """Send `head`, then `slowly` a byte every 0.05 s for at most `seconds`: what the server answers, and when
    it closed the connection (seconds after it opened)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    answer = b""
    with socket.create_connection((host, int(port)), timeout=seconds) as connection:
        connection.sendall(head)
        connection.setblocking(False)
        for byte in slowly[:int(seconds / 0.05)]:
            try:
                connection.send(bytes([byte]))
                time.sleep(0.05)
                chunk = connection.recv(65536)
            except BlockingIOError:
                continue
            except OSError:  # closed by the server
                break
            answer += chunk
            if not chunk:
                break
        connection.settimeout(seconds)
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer, time.monotonic() - started


@pytest.mark.parametrize(("head", "slowly", "part"), [
    (b"", b"", "headers"),  # a connection that never says anything
    (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n", "headers"),
    (b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 300\r\n\r\n",
     b'{"text": "' + b"a" * 288 + b'"}', "body"),
], ids=["silent", "slow-headers", "slow-body"])
def test_slow_clients_are_timed_out(indexed: Library, head: bytes, slowly: bytes, part: str) -> None:
    """A request's headers must arrive within header_timeout, its body within body_timeout: else 408 and closed."""
    with serve_in_thread(create_app(indexed), limits=SMALL_LIMITS) as url:
        answer, took = trickle(url, head, slowly)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert f"the request's {part} did not arrive within".encode() in answer
    limit = SMALL_LIMITS.header_timeout if part == "headers" else SMALL_LIMITS.body_timeout
    assert limit <= took < limit + 1.5, took


def test_connections_over_the_cap_are_refused_at_once(indexed: Library) -> None:
    """max_connections open at once; one more gets a 503 and is closed; once the silent ones time out, /health answers."""
    with serve_in_thread(create_app(indexed), limits=SMALL_LIMITS) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        holders = [socket.create_connection((host, int(port)), timeout=5) for _ in range(8)]
        try:
            time.sleep(0.1)
            started = time.monotonic()
            refused = exchange(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5)
            assert refused.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in refused, refused
            assert time.monotonic() - started < 0.4  # refused, not kept waiting
            for holder in holders:  # each one times out
                assert holder.recv(65536).startswith(b"HTTP/1.1 408 ")
                holder.close()
            time.sleep(0.2)
            assert exchange(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").startswith(
                b"HTTP/1.1 200 ")
        finally:
            for holder in holders:
                holder.close()


def test_the_default_cap_stays_below_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    for soft, cap in ((1_024, 896), (256, 128), (100, 8), (65_536, 1_000), (resource.RLIM_INFINITY, 1_000)):
        monkeypatch.setattr(resource, "getrlimit", lambda _which, soft=soft: (soft, resource.RLIM_INFINITY))
        assert ConnectionLimits().connection_cap() == cap
    assert ConnectionLimits(max_connections=5).connection_cap() == 5


def test_the_same_message_is_logged_once_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from clipdex.search.http.connections import RepeatedMessages

    logger = logging.getLogger("clipdex.test.repeats")
    repeats = RepeatedMessages(interval=0.2)
    logger.addFilter(repeats)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            for number in range(1_000):
                logger.warning("accept failed on fd %d\nsecond line %d", 6, number)
            logger.warning("another message")
            time.sleep(0.25)
            logger.warning("accept failed on fd %d\nsecond line %d", 6, 1_000)
    finally:
        logger.removeFilter(repeats)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3 and messages[1] == "another message"
    assert messages[2].startswith("accept failed on fd 6\nsecond line 1000 [and 999 more like this in the last 0 s")


# The real server (run_server, as `clipdex serve` runs it) in a process of its own with few open files,
# and a connection cap above them: accept() fails with "Too many open files".
SERVER_WITH_FEW_FILES = """
import resource, sys
from clipdex.search.http import create_app, open_listener, run_server
from clipdex.search.http.connections import ConnectionLimits
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
app = create_app(sys.argv[1], allowed_hosts=("127.0.0.1",))
listener = open_listener("127.0.0.1", 0)
print(listener.getsockname()[1], flush=True)
limits = ConnectionLimits(header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1, max_connections=1_000)
run_server(app, listener, log_level="warning", limits=limits)
"""


def answers_health(url: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            if exchange(url, request, timeout=2).startswith(b"HTTP/1.1 200 "):
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def test_a_flood_of_connections_is_logged_once_and_survived(indexed: Library, tmp_path: Path) -> None:
    """200 connections that announce a body and send nothing more, against a server allowed 96 open files:
    "Too many open files" reaches the log once, not thousands of times a second (issue #31: 213 MB in 25 s),
    and once the flood has gone the server answers again."""
    import subprocess

    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen([sys.executable, "-c", SERVER_WITH_FEW_FILES, str(indexed.path)],
                                  stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        assert answers_health(url, within=30)  # it listens once uvicorn has started
        flood = []
        for _ in range(200):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
            flood.append(connection)
        time.sleep(2.5)
        for connection in flood:
            connection.close()
        assert answers_health(url, within=10)
    finally:
        server.terminate()
        server.wait(timeout=10)
    text = log.read_text(errors="replace")
    assert len(text) < 20_000, f"{len(text)} bytes of log: {text[:2000]}"
    assert 1 <= text.count("Too many open files") <= 2, text
