"""Items an application adds under its own keys (issue #32, point 6): texts, images and vectors
that are not files, replaced by key, removed by key, searchable at once, all or nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.search.catalog.types import NewItem
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.errors import InvalidItems, UnreadableImage
from clipdex.search.library import Library
from clipdex.indexer import index_paths
from tests.conftest import write_image


@pytest.fixture
def keyed_library(tmp_path: Path, tiny_model: ModelSpec, catalog_backend: str | None) -> Library:
    library = Library.open(tmp_path / "library", model=tiny_model, create=True, device="cpu", catalog=catalog_backend)
    yield library
    library.close()


def unit(seed: int, dim: int = 32) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def keys_of(library: Library, **query: object) -> list[str | None]:
    return [hit.key for hit in library.search(k=50, **query)]


def test_texts_images_and_vectors_are_added_replaced_and_removed_by_key(keyed_library: Library, tmp_path: Path) -> None:
    library = keyed_library
    photo = write_image(tmp_path / "photo.jpg", seed=1)
    result = library.add_texts(["a red bicycle", "a bowl of soup"], keys=["post:1", "post:2"],
                               metadata=[{"author": "ann", "tags": ["x", 1], "score": 0.5}, None])
    assert (result.added, result.replaced, len(result.ids)) == (2, 0, 2)
    images = library.add_images([photo, photo.read_bytes(), Image.new("RGB", (20, 10), "blue")],
                                keys=["upload:a", "upload:b", "upload:c"])
    assert (images.added, images.replaced) == (3, 0)
    vectors = library.add_vectors(["vec:1"], unit(7)[None, :] * 3.0, metadata=[{"origin": "elsewhere"}], kind="text")
    assert vectors.added == 1
    # searchable at once, with their keys; the metadata comes back as it went in
    hits = library.search(text="a red bicycle", k=10)
    assert {hit.key for hit in hits} == {"post:1", "post:2", "upload:a", "upload:b", "upload:c", "vec:1"}
    first = library.get_item(result.ids[0])
    assert first.key == "post:1" and first.text == "a red bicycle" and first.path is None
    assert first.metadata == {"author": "ann", "tags": ["x", 1], "score": 0.5}
    assert library.get_item(images.ids[2]).metadata == {"width": 20, "height": 10}
    top = library.search(vector=unit(7), k=1)[0]
    assert top.key == "vec:1" and top.kind == "text" and top.score == pytest.approx(1.0, abs=1e-5)
    assert top.metadata == {"origin": "elsewhere"}
    # adding a key that is there replaces that item, in place
    again = library.add_texts(["a green bicycle"], keys=["post:1"], metadata=[{"author": "bob"}])
    assert (again.added, again.replaced, again.ids) == (0, 1, [result.ids[0]])
    replaced = library.get_item(result.ids[0])
    assert replaced.text == "a green bicycle" and replaced.metadata == {"author": "bob"}
    assert library.search(text="a green bicycle", kind="text", k=1)[0].key == "post:1"
    assert library.stats()["items"] == 6
    # found again by key, and searched for what is like it
    ids = library.item_ids(["post:1", "vec:1", "never-added"])
    assert ids == {"post:1": result.ids[0], "vec:1": vectors.ids[0]}
    assert library.search(like=ids["vec:1"], k=1)[0].key == "vec:1"
    # removed by key; a key that is not there is no error
    assert library.remove(["post:2", "upload:a", "never-added"]) == 2
    assert sorted(filter(None, keys_of(library, text="soup"))) == ["post:1", "upload:b", "upload:c", "vec:1"]
    assert library.stats()["items"] == library.stats()["vectors"] == 4
    assert library.check()["ok"]


def test_files_have_no_key_and_keys_never_touch_them(library: Library, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "photos" / "a.jpg", seed=3)
    index_paths(library, [tmp_path / "photos"])
    library.add_images([photo], keys=[str(photo)])  # a key that looks like the file's path is still a key
    hits = library.search(image=photo, k=5)
    assert {(hit.key, hit.path) for hit in hits} == {(None, str(photo)), (str(photo), None)}
    assert library.remove([str(photo)]) == 1
    assert [(hit.key, hit.path) for hit in library.search(image=photo, k=5)] == [(None, str(photo))]
    assert "key" not in library.search(image=photo, k=1)[0].to_json()


def test_another_process_sees_the_added_items_on_its_next_search(library: Library) -> None:
    reader = Library.open(library.path)
    assert reader.search(vector=unit(1), k=5) == []
    library.add_vectors(["a", "b"], np.stack([unit(1), unit(2)]))
    assert [hit.key for hit in reader.search(vector=unit(1), k=5)] == ["a", "b"]
    library.remove(["a"])
    assert [hit.key for hit in reader.search(vector=unit(1), k=5)] == ["b"]
    reader.close()


@pytest.mark.parametrize("call, message", [
    (lambda lib: lib.add_texts(["a", "b"], keys=["k"]), "1 keys given for 2 texts"),
    (lambda lib: lib.add_texts(["a", "b"], keys=["k", "k"]), "appears twice"),
    (lambda lib: lib.add_texts(["a"], keys="k"), "keys is one string"),
    (lambda lib: lib.add_texts(["a"], keys=[""]), "a key has 1 to 1000"),
    (lambda lib: lib.add_texts(["a"], keys=[7]), "keys are strings"),
    (lambda lib: lib.add_texts(["a"], keys=["k\x00"]), "NUL"),
    (lambda lib: lib.add_texts(["  "], keys=["k"]), r"texts\[0\] is empty or only whitespace"),
    (lambda lib: lib.add_texts(["a"], keys=["k"], metadata=[{"when": object()}]), "cannot be stored as JSON"),
    (lambda lib: lib.add_texts(["a"], keys=["k"], metadata={"a": 1}), "metadata is one dict"),
    (lambda lib: lib.add_texts(["a"], keys=["k"], metadata=[{"x": "\ud800"}]), "cannot be stored as JSON"),
    (lambda lib: lib.add_texts(["a"], keys=["k"], metadata=[{"x": float("nan")}]), "cannot be stored as JSON"),
    (lambda lib: lib.add_vectors(["k"], np.ones((1, 31))), "has 31 dimensions; this library's model has 32"),
    (lambda lib: lib.add_vectors(["k"], np.zeros((1, 32))), "all zeros"),
    (lambda lib: lib.add_vectors(["k"], np.full((1, 32), np.nan)), "NaN"),
    (lambda lib: lib.add_vectors(["k"], np.ones((1, 32)), kind="video"), "kind is 'video'"),
    (lambda lib: lib.add_images([12], keys=["k"]), "give a path, bytes or a PIL image"),
])
def test_bad_items_are_refused_with_what_to_fix(library: Library, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidItems, match=message):
        call(library)
    assert library.stats()["items"] == 0 and library.catalog.generation() == 0


def test_one_bad_image_leaves_nothing_of_the_call(library: Library, tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.jpg", seed=1).read_bytes()
    library.add_images([good], keys=["kept"])
    with pytest.raises(UnreadableImage, match=r"images\[2\]"):
        library.add_images([good, good, b"not an image"], keys=["new1", "kept", "new2"])
    assert [hit.key for hit in library.search(image=io.BytesIO(good).getvalue(), k=5)] == ["kept"]
    assert library.catalog.generation() == 1


def test_a_failure_in_the_middle_of_the_transaction_leaves_nothing_half_added(
        keyed_library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    library = keyed_library
    library.add_vectors(["a"], unit(1)[None, :], metadata=[{"version": 1}])
    generation = library.catalog.generation()
    columns = NewItem.columns
    seen: list[str | None] = []

    def failing(item: NewItem) -> dict[str, object]:
        seen.append(item.key)
        if len(seen) == 3:  # the first two rows are written in the transaction by now
            raise OSError("the disk went away")
        return columns(item)

    monkeypatch.setattr(NewItem, "columns", failing)
    with pytest.raises(OSError, match="the disk went away"):
        library.add_vectors(["a", "b", "c"], np.stack([unit(2), unit(3), unit(4)]), metadata=[{"version": 2}, None, None])
    monkeypatch.setattr(NewItem, "columns", columns)
    assert len(seen) == 3
    assert library.catalog.generation() == generation
    assert [(hit.key, hit.metadata) for hit in library.search(vector=unit(2), k=5)] == [("a", {"version": 1})]
    reopened = Library.open(library.path)
    assert [hit.key for hit in reopened.search(vector=unit(1), k=5)] == ["a"] and reopened.check()["ok"]
    reopened.close()


def test_a_catalog_of_the_previous_schema_is_migrated_and_takes_keys(tmp_path: Path, library: Library) -> None:
    """A library made before keys (schema version 2): opened, its catalog gains the key column and keeps its items."""
    import sqlite3

    from sqlalchemy import create_engine

    from clipdex.search.catalog.database import MIGRATIONS
    from clipdex.search.catalog.local import LocalCatalog

    path = library.path
    library.close()
    (path / "catalog.sqlite").unlink()
    engine = create_engine(f"sqlite:///{path / 'catalog.sqlite'}")
    with engine.begin() as connection:  # the catalog as schema version 2 left it, with one item
        connection.exec_driver_sql("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for number, migration in enumerate(MIGRATIONS[:2], start=1):
            migration(connection)
            connection.exec_driver_sql(f"INSERT INTO schema_version (version) VALUES ({number})")
        connection.exec_driver_sql("INSERT INTO items (kind, text, vector, indexed_at) VALUES ('text', 'old', ?, 0)",
                                   (unit(5).tobytes(),))
    engine.dispose()
    migrated = Library.open(path)
    assert [(hit.text, hit.key) for hit in migrated.search(vector=unit(5), k=5)] == [("old", None)]
    migrated.add_vectors(["new"], unit(6)[None, :])
    migrated.close()
    with sqlite3.connect(path / "catalog.sqlite") as connection:
        assert connection.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(MIGRATIONS)
        with pytest.raises(sqlite3.IntegrityError):  # keys are unique in the library
            connection.execute("INSERT INTO items (kind, key, vector, indexed_at) VALUES ('text', 'new', x'00', 0)")
    reopened = Library.open(path)
    assert isinstance(reopened.catalog, LocalCatalog)  # current now: the everyday path
    assert [hit.key for hit in reopened.search(vector=unit(6), k=1)] == ["new"]
    reopened.close()


# -- over HTTP: POST /keys/texts, /keys/images, /keys/vectors, /keys/remove ----------------------

TOKEN = "keyed-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_a_service_adds_searches_replaces_and_removes_by_key_over_http(library: Library, tmp_path: Path) -> None:
    import base64

    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    client = TestClient(create_app(library, token=TOKEN))
    photo = base64.b64encode(write_image(tmp_path / "a.jpg", seed=2).read_bytes()).decode()
    response = client.post("/keys/texts", headers=AUTH, json={"items": [
        {"key": "post:1", "text": "a red bicycle", "metadata": {"author": "ann", "likes": 3, "draft": False, "note": None}},
        {"key": "post:2", "text": "a bowl of soup"}]})
    assert response.status_code == 200 and response.json()["added"] == 2
    assert client.post("/keys/images", headers=AUTH, json={"items": [{"key": "upload:1", "image": photo}]}).json()["added"] == 1
    added = client.post("/keys/vectors", headers=AUTH, json={"kind": "text", "items": [{"key": "vec:1", "vector": (3 * unit(9)).tolist()}]})
    assert added.json()["added"] == 1
    hits = client.post("/search", headers=AUTH, json={"vector": unit(9).tolist(), "k": 10}).json()["hits"]
    assert hits[0]["key"] == "vec:1" and hits[0]["kind"] == "text"
    assert {hit["key"] for hit in hits} == {"post:1", "post:2", "upload:1", "vec:1"}
    post = next(hit for hit in hits if hit["key"] == "post:1")
    assert post["metadata"] == {"author": "ann", "likes": 3, "draft": False, "note": None} and post["path"] is None
    again = client.post("/keys/texts", headers=AUTH, json={"items": [{"key": "post:1", "text": "a green bicycle"}]}).json()
    assert again == {"added": 0, "replaced": 1, "ids": [post["id"]]}
    assert client.get(f"/items/{post['id']}", headers=AUTH).json()["text"] == "a green bicycle"
    assert client.get(f"/items/{post['id']}/file", headers=AUTH).status_code == 404  # no file behind a keyed item
    assert client.post("/keys/remove", headers=AUTH, json={"keys": ["post:1", "nope"]}).json() == {"removed": 1}
    assert library.stats()["items"] == 3


def test_writes_need_a_token_and_refuse_what_is_over_the_limits(library: Library, tmp_path: Path) -> None:
    import base64

    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    one = {"items": [{"key": "k", "text": "a text"}]}
    open_server = TestClient(create_app(library))  # no token: read-only, the write routes are not there
    assert open_server.post("/keys/texts", json=one).status_code == 404
    assert "/keys/texts" not in open_server.get("/openapi.json").json()["paths"]
    client = TestClient(create_app(library, token=TOKEN, max_upload_bytes=2_000))
    assert client.post("/keys/texts", json=one).status_code == 401
    assert client.post("/keys/texts", json=one, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/keys/remove", json={"keys": ["k"]}).status_code == 401
    assert "/keys/texts" in client.get("/openapi.json").json()["paths"]

    def refused(path: str, body: object, status: int, words: str) -> None:
        response = client.post(path, headers=AUTH, json=body)
        assert response.status_code == status and words in response.text, response.text

    refused("/keys/texts", {"items": [{"key": f"k{n}", "text": "t"} for n in range(65)]}, 422, "at most 64 items")
    refused("/keys/texts", {"items": [{"key": "k", "text": "x" * 10_001}]}, 422, "at most 10000 characters")
    refused("/keys/texts", {"items": [{"key": "k" * 1001, "text": "t"}]}, 422, "at most 1000 characters")
    refused("/keys/texts", {"items": [{"key": "", "text": "t"}]}, 422, "at least 1 character")
    refused("/keys/texts", {"items": [{"key": "a\u0000b", "text": "t"}]}, 422, "should match pattern")
    refused("/keys/texts", {"items": [{"key": "k", "text": "t", "metadata": {"m": {"nested": 1}}}]}, 422, "metadata")
    refused("/keys/texts", {"items": [{"key": "k", "text": "t"}, {"key": "k", "text": "u"}]}, 400, "appears twice")
    refused("/keys/texts", {"items": [{"key": "k", "text": "   "}]}, 400, "texts[0] is empty or only whitespace")
    refused("/keys/vectors", {"items": [{"key": "k", "vector": [1.0] * 31}]}, 400, "vectors[0] has 31 dimensions")
    refused("/keys/vectors", {"items": [{"key": "k", "vector": [0.0] * 32}]}, 400, "vectors[0] is all zeros")
    refused("/keys/vectors", {"items": [{"key": "k", "vector": [1.0] * 8193}]}, 422, "at most 8192 items")
    big = base64.b64encode(write_image(tmp_path / "big.png", seed=1, size=(64, 64), format="PNG").read_bytes()).decode()
    assert len(base64.b64decode(big)) > 2_000
    refused("/keys/images", {"items": [{"key": "k", "image": big}]}, 413, "larger than the server's limit")
    refused("/keys/images", {"items": [{"key": "k", "image": "aGVsbG8="}]}, 400, "images[0]: ")
    refused("/keys/images", {"items": [{"key": f"k{n}", "image": "aGVsbG8="} for n in range(17)]}, 422, "at most 16 items")
    assert library.stats()["items"] == 0 and library.catalog.generation() == 0


def test_the_cli_names_a_keyed_image_by_its_key(library: Library) -> None:
    """An image added under a key has no path and no text: `clipdex search` shows its key, never 'None'."""
    from typer.testing import CliRunner

    from clipdex.cli.main import app

    library.add_images([Image.new("RGB", (16, 16), "red")], keys=["upload:7"])
    library.add_texts(["a note"], keys=["note:1"])
    for format in ("paths", "table"):
        result = CliRunner().invoke(app, ["search", "red", "--library", str(library.path), "--format", format])
        assert result.exit_code == 0, result.output
        assert "key:upload:7" in result.output and "a note" in result.output and "None" not in result.output
    listed = CliRunner().invoke(app, ["search", "red", "--library", str(library.path), "--json"])
    assert {hit.get("key") for hit in json.loads(listed.stdout)} == {"upload:7", "note:1"}


def test_items_committed_before_the_index_could_be_saved_are_found_after_a_restart(
        keyed_library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for files: the catalog commit is what counts; the vector index is caught up from the change log."""
    from clipdex.search.index.store import VectorStore

    library = keyed_library
    library.add_vectors(["a"], unit(1)[None, :])
    assert library.vectors.ntotal == 1  # the index loaded: this process keeps it in step and saves it

    def no_space(_store: VectorStore) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VectorStore, "save", no_space)
    with pytest.raises(OSError, match="No space left"):
        library.add_vectors(["b", "c"], np.stack([unit(2), unit(3)]))
    monkeypatch.undo()
    reopened = Library.open(library.path)
    assert [hit.key for hit in reopened.search(vector=unit(2), k=5)][:1] == ["b"]
    assert {hit.key for hit in reopened.search(vector=unit(2), k=5)} == {"a", "b", "c"}
    assert reopened.remove(["c"]) == 1 and reopened.check()["ok"]
    reopened.close()
