"""A shared PostgreSQL catalog: init and attach, replicas that follow one writer, one writer
across machines, nothing lost on a kill, clear errors; against a real server (conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.errors import LibraryBusy, ModelMismatch
from clipdex.search.http import create_app
from clipdex.search.library import Library
from clipdex.search.manifest import MANIFEST_FILE
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.index.store import VectorStore
from tests.postgres import PASSWORD

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@")


def test_init_records_the_catalog_without_its_password(tmp_path: Path, tiny_model: ModelSpec, postgres_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD")  # the password now comes from $CLIPDEX_CATALOG_URL alone
    monkeypatch.setenv("CLIPDEX_CATALOG_URL", with_password(postgres_url))
    code, stdout, stderr = cli("init", "--library", str(tmp_path / "a"), "--catalog", with_password(postgres_url),
                               "--model", tiny_model.name, "--pretrained", tiny_model.pretrained)
    assert code == 0, stderr
    assert stdout.startswith(f"made library {tmp_path / 'a'}: model tiny-clip") and PASSWORD not in stdout
    manifest = (tmp_path / "a" / MANIFEST_FILE).read_text()
    assert PASSWORD not in manifest and json.loads(manifest)["catalog"] == postgres_url
    assert not (tmp_path / "a" / "catalog.sqlite").exists()
    code, stdout, _ = cli("stats", "--library", str(tmp_path / "a"), "--json")
    assert code == 0 and json.loads(stdout)["catalog"] == postgres_url and PASSWORD not in stdout


def test_a_replica_reads_the_model_from_the_catalog(tmp_path: Path, tiny_model: ModelSpec, postgres_url: str) -> None:
    writer = Library.open(tmp_path / "a", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    code, stdout, stderr = cli("init", "--library", str(tmp_path / "b"), "--catalog", postgres_url)  # no --model
    assert code == 0, stderr
    assert stdout.startswith(f"attached library {tmp_path / 'b'}: model tiny-clip")
    replica = Library.open(tmp_path / "b")
    assert replica.model.same_model(writer.model) and replica.dim == writer.dim == 32
    with pytest.raises(ModelMismatch, match="was built with model tiny-clip"):
        Library.open(tmp_path / "c", model=ModelSpec("RN50", "none"), create=True, catalog=postgres_url)
    code, _, stderr = cli("init", "--library", str(tmp_path / "d"), "--catalog", postgres_url, "--model", "RN50", "--pretrained", "none")
    assert code == 1 and "was built with model tiny-clip" in stderr and "Traceback" not in stderr


def test_replicas_answer_with_new_items_on_their_next_query(tmp_path: Path, tiny_model: ModelSpec, postgres_url: str,
                                                            make_images) -> None:
    """Target 1: index on A; B's very next search (API and HTTP, no restart) has the new items."""
    a = Library.open(tmp_path / "a", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    b = Library.open(tmp_path / "b", create=True, catalog=postgres_url)
    client = TestClient(create_app(b))
    make_images(tmp_path / "pics", 3)
    index_paths(a, [tmp_path / "pics"])
    assert len(b.search(vector=a.catalog.all_vectors()[1][0], k=10)) == 3
    assert len(client.post("/search", json={"text": "a photo", "k": 10}).json()["hits"]) == 3
    new = make_images(tmp_path / "pics", 2, start=3)
    index_paths(a, [tmp_path / "pics"])
    paths = {hit.path for hit in b.search(text="a photo", k=10)}
    assert {str(path) for path in new} <= paths and len(paths) == 5
    assert len(client.post("/search", json={"text": "a photo", "k": 10}).json()["hits"]) == 5
    new[0].unlink()
    index_paths(a, [tmp_path / "pics"])
    assert str(new[0]) not in {hit["path"] for hit in client.post("/search", json={"text": "a photo", "k": 10}).json()["hits"]}


def test_a_replica_catches_up_from_the_change_log_alone(tmp_path: Path, tiny_model: ModelSpec, postgres_url: str,
                                                        make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Library.open(tmp_path / "a", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    b = Library.open(tmp_path / "b", create=True, catalog=postgres_url)
    make_images(tmp_path / "pics", 3)
    index_paths(a, [tmp_path / "pics"])
    assert b.vectors.ntotal == 3
    make_images(tmp_path / "pics", 3, start=3)
    index_paths(a, [tmp_path / "pics"])  # A saves its index: a SQLite library would trim the log here

    def no_rebuild(_store: VectorStore) -> None:
        raise AssertionError("the replica read every vector instead of the change log")

    monkeypatch.setattr(VectorStore, "_build", no_rebuild)
    assert b.vectors.ntotal == 6 and a.catalog.changed_since(0)  # the log still reaches back


def test_a_second_writer_is_refused_and_told_who_writes(tmp_path: Path, tiny_model: ModelSpec, postgres_url: str,
                                                        make_images) -> None:
    a = Library.open(tmp_path / "a", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    b = Library.open(tmp_path / "b", create=True, catalog=postgres_url)
    make_images(tmp_path / "pics", 2)
    holding = ("import sys\nfrom clipdex.search.library import Library\n"
               f"with Library.open({str(a.path)!r}).writer():\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LibraryBusy, match=f"is being written by clipdex writer pid {holder.pid} on .*server pid"):
            index_paths(b, [tmp_path / "pics"])
    finally:
        holder.communicate("", timeout=60)
    with a.writer():  # this process's own writer, through another Library object
        with pytest.raises(LibraryBusy, match="is already being written in this thread, by a write that has not ended"):
            index_paths(b, [tmp_path / "pics"])
    assert index_paths(b, [tmp_path / "pics"]).added == 2  # released


def test_a_writer_opened_with_wait_queues_behind_the_catalogs_writer(tmp_path: Path, tiny_model: ModelSpec,
                                                                     postgres_url: str, make_images) -> None:
    """The advisory lock of a shared catalog is waited for as the folder's file lock is (`wait=`)."""
    import threading

    a = Library.open(tmp_path / "a", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    Library.open(tmp_path / "b", create=True, catalog=postgres_url).close()
    make_images(tmp_path / "pics", 2)
    holding = ("import sys\nfrom clipdex.search.library import Library\n"
               f"with Library.open({str(a.path)!r}).writer():\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LibraryBusy, match=r"catalog .* is being written by clipdex writer .*\(waited 0.3 s\)"):
            index_paths(Library.open(tmp_path / "b", device="cpu", wait=0.3), [tmp_path / "pics"])
        queued = Library.open(tmp_path / "b", device="cpu", wait=60)
        reports = []
        indexing = threading.Thread(target=lambda: reports.append(index_paths(queued, [tmp_path / "pics"])))
        indexing.start()
        indexing.join(1.0)
        assert indexing.is_alive() and not reports
    finally:
        holder.communicate("", timeout=60)
    indexing.join(60)
    assert reports[0].added == 2


@pytest.mark.slow
def test_sigkill_of_the_writer_loses_nothing_on_any_replica(tmp_path: Path, model_args: list[str], postgres_url: str,
                                                            make_images) -> None:
    """Target 3: kill -9 the indexer at several moments, re-run: catalog = folder, vectors = catalog, everywhere."""
    from tests.test_crash import committed_items, many_images, start_index, wait_for_items

    folder = tmp_path / "pics"
    paths = many_images(folder, 60, size=300)
    replica_dir = tmp_path / "replica"
    for at_least in (4, 20, 40):
        process = start_index(folder, tmp_path / "writer", model_args, postgres_url)
        wait_for_items(tmp_path / "writer", at_least, process, catalog=postgres_url)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not replica_dir.exists():
            Library.open(replica_dir, create=True, catalog=postgres_url).close()
        replica = Library.open(replica_dir)
        assert replica.vectors.ntotal == committed_items(replica_dir, postgres_url)
        report = replica.check()
        assert report["ok"], report
        replica.close()
    rerun = subprocess.run([sys.executable, "-m", "clipdex.cli", "index", str(folder), "--library", str(tmp_path / "writer"),
                            "--json", "--quiet"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    for directory in (tmp_path / "writer", replica_dir):
        library = Library.open(directory)
        ids, vectors = library.catalog.all_vectors()
        assert {item.path for item in library.catalog.get_items(ids.tolist()).values()} == {str(p) for p in paths}
        assert np.array_equal(np.sort(library.vectors.ids()), np.sort(ids))
        report = library.check()
        assert report["ok"], (directory, report)


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg://postgres@127.0.0.1:1/nothing", "connection"),
    ("postgresql+psycopg://postgres@127.0.0.1:{port}/no_such_database", 'database "no_such_database" does not exist'),
    ("not a url", "not a url"),
    ("sqlite:///elsewhere.sqlite", "--catalog takes a PostgreSQL URL"),
])
def test_a_bad_url_or_a_dead_server_is_one_line(tmp_path: Path, tiny_model: ModelSpec, postgres, url: str, message: str) -> None:
    code, stdout, stderr = cli("init", "--library", str(tmp_path / "lib"), "--catalog", url.format(port=postgres.port),
                               "--model", tiny_model.name, "--pretrained", tiny_model.pretrained)
    assert code == 1 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "lib").exists()


def test_check_tells_a_healthy_replica_from_a_damaged_one(tmp_path: Path, tiny_model: ModelSpec, postgres_url: str,
                                                         make_images) -> None:
    """A freshly attached replica of a small library searches exactly and saves no index: sound.
    One that loaded its index (and saved it) and lags behind the writer: sound, caught up from
    the log. One whose index file was lost, its stamp left: damaged, repaired by --repair."""
    from clipdex.search.index.vectors import INDEX_FILE, STAMP_FILE

    writer = Library.open(tmp_path / "a", model=tiny_model, create=True, device="cpu", catalog=postgres_url)
    make_images(tmp_path / "pics", 3)
    index_paths(writer, [tmp_path / "pics"])
    replica = tmp_path / "b"
    assert cli("init", "--library", str(replica), "--catalog", postgres_url)[0] == 0
    with Library.open(replica, device="cpu") as attached:
        assert len(attached.search(text="a photo", k=5)) == 3  # exactly, from the catalog
    assert not (replica / INDEX_FILE).exists()
    assert cli("check", "--library", str(replica)) == (0, "ok: 3 items, catalog and vectors agree\n", "")
    with Library.open(replica, device="cpu") as attached:
        assert attached.stats()["vectors"] == 3  # loads FAISS: the index is built and saved
    assert (replica / INDEX_FILE).exists()
    make_images(tmp_path / "pics", 2, start=3)
    index_paths(writer, [tmp_path / "pics"])
    assert cli("check", "--library", str(replica)) == (0, "ok: 5 items, catalog and vectors agree\n", "")
    (replica / INDEX_FILE).unlink()
    assert cli("check", "--library", str(replica)) == (
        1, "run `clipdex check --repair` to repair the catalog and rebuild the vector index from it\n",
        f"problem: {INDEX_FILE} or {STAMP_FILE} is missing or unreadable\n")
    assert cli("check", "--repair", "--library", str(replica))[0] == 0
    assert cli("check", "--library", str(replica)) == (0, "ok: 5 items, catalog and vectors agree\n", "")
    writer.close()
