"""Crash safety and concurrency: SIGKILL, Ctrl-C, searching during an index run, check --repair."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.search.library import CATALOG_FILE, Library
from clipdex.search.index.vectors import INDEX_FILE

pytestmark = pytest.mark.slow


def many_images(folder: Path, count: int, size: int = 500) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"big{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, compress_level=1)
        paths.append(path)
    return paths


def clipdex(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipdex.cli", *args]


def committed_items(library: Path, catalog: str | None = None) -> int:
    """Items committed so far, read straight from the catalog (no clipdex code in between)."""
    if catalog is not None:
        import psycopg

        try:
            with psycopg.connect(catalog.replace("postgresql+psycopg", "postgresql"), connect_timeout=5) as connection:
                return int(connection.execute("SELECT count(*) FROM items").fetchone()[0])
        except psycopg.Error:
            return 0
    try:
        with sqlite3.connect(library / CATALOG_FILE, timeout=5) as connection:
            return connection.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def start_index(folder: Path, library: Path, model_args: list[str], catalog: str | None = None) -> subprocess.Popen:
    shared = ["--catalog", catalog] if catalog else []
    return subprocess.Popen(
        clipdex("index", str(folder), "--library", str(library), "--batch-size", "2", "--workers", "1", "--quiet", "--json",
                *model_args, *shared),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_items(library: Path, at_least: int, process: subprocess.Popen, timeout: float = 120,
                   catalog: str | None = None) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = committed_items(library, catalog)
        if count >= at_least:
            return count
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("indexer made no progress")


def test_sigkill_midway_then_rerun_is_consistent_and_complete(tmp_path: Path, model_args: list[str],
                                                              catalog_backend: str | None) -> None:
    folder, library = tmp_path / "pics", tmp_path / "lib"
    paths = many_images(folder, 120)
    process = start_index(folder, library, model_args, catalog_backend)
    wait_for_items(library, 10, process, catalog=catalog_backend)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = committed_items(library, catalog_backend)
    assert 10 <= killed_at < len(paths), "the run was not killed partway"

    rerun = subprocess.run(clipdex("index", str(folder), "--library", str(library), "--json", "--quiet"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["added"] + report["unchanged"] == len(paths)
    assert report["unchanged"] >= killed_at - 2  # nothing committed is redone (at most the batch in flight)
    stats = json.loads(subprocess.run(clipdex("stats", "--library", str(library), "--json"), capture_output=True, text=True).stdout)
    assert stats["images"] == stats["vectors"] == len(paths)
    check = subprocess.run(clipdex("check", "--library", str(library)), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    paths_indexed = {item.path for item in Library.open(library).catalog.get_items(Library.open(library).catalog.ids().tolist()).values()}
    assert paths_indexed == {str(path) for path in paths}


def test_ctrl_c_stops_after_the_batch_and_says_how_to_resume(tmp_path: Path, model_args: list[str]) -> None:
    folder, library = tmp_path / "pics", tmp_path / "lib"
    paths = many_images(folder, 120)
    process = start_index(folder, library, model_args)
    wait_for_items(library, 6, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr.lower()
    assert "Traceback" not in stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    assert 0 < report["added"] < len(paths)
    lib = Library.open(library)
    assert lib.check()["ok"], lib.check()
    assert lib.stats()["images"] == report["added"]


def test_search_while_indexing_never_fails(tmp_path: Path, model_args: list[str], make_images) -> None:
    folder, library = tmp_path / "pics", tmp_path / "lib"
    many_images(folder, 4, size=300)
    first = subprocess.run(clipdex("index", str(folder), "--library", str(library), "--quiet", "--json", *model_args),
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    reader = Library.open(library)
    assert len(reader.search(text="a photo", k=5)) == 4  # its model loaded before the run starts, however busy the machine
    many_images(folder, 360, size=300)  # the first 4 again, unchanged, and 356 more
    process = start_index(folder, library, model_args)
    wait_for_items(library, 6, process)
    searches = 0
    while process.poll() is None and searches < 200:
        hits = reader.search(text="a photo", k=5)
        assert len(hits) >= 1
        searches += 1
    cli = subprocess.run(clipdex("search", "a photo", "--library", str(library), "--json"), capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    process.wait(timeout=120)
    assert process.returncode == 0, process.stderr.read()
    assert searches > 3, searches


def test_check_repair_rebuilds_a_broken_index(tmp_path: Path, library: Library, make_images) -> None:
    from clipdex.indexer import index_paths

    make_images(tmp_path / "pics", 4)
    index_paths(library, [tmp_path / "pics"])
    (library.path / INDEX_FILE).write_bytes(b"garbage")
    result = subprocess.run(clipdex("check", "--library", str(library.path)), capture_output=True, text=True)
    assert result.returncode == 1 and "--repair" in result.stdout
    result = subprocess.run(clipdex("check", "--repair", "--library", str(library.path)), capture_output=True, text=True)
    assert result.returncode == 0 and "repaired" in result.stdout
    assert Library.open(library.path).check()["ok"]


STUCK_READ = """
import sys, threading, time
from pathlib import Path
import clipdex.indexer.rules as rules

MARKER = Path(sys.argv[1])


def stuck_read(path, size):  # a read that never returns, as on a hung network drive
    MARKER.touch()
    threading.Event().wait()

rules._read_file = stuck_read
sys.argv = ["clipdex", *sys.argv[2:]]
from clipdex.cli.main import main
main()
"""


def test_a_second_ctrl_c_aborts_at_once_even_while_a_read_hangs(tmp_path: Path, model_args: list[str], make_images) -> None:
    make_images(tmp_path / "pics", 2)
    marker = tmp_path / "reading"
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK_READ, str(marker), "index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"),
         "--quiet", *model_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the run ended before it read a file"
            assert time.monotonic() < deadline, "the run never read a file"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the second Ctrl-C did not end the run")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Aborted: everything committed so far is kept" in stderr and "Traceback" not in stderr
