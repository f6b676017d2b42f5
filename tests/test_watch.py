"""`clipdex watch`: a real watcher (watchfiles) on real folders keeps a library current."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import clipdex.indexer.rules as rules
import clipdex.indexer.watch as watch_module
from clipdex.indexer.watch import WatchBatch, Watcher, WatchOptions
from clipdex.search.errors import LibraryBusy
from clipdex.search.library import Library
from tests.conftest import write_image

SETTLE = 0.3


def aged(*folders: Path) -> None:
    """The files under `folders` last written a minute ago: settled when the watcher starts
    (its catch-up leaves files written within the settle time to settle first)."""
    then = time.time_ns() - 60_000_000_000
    for folder in folders:
        for path in folder.rglob("*"):
            os.utime(path, ns=(then, then))


class Running:
    """A Watcher on a thread (its folders aged first); its batches and notices collected."""

    def __init__(self, library: Library, paths: list[Path], **options: Any) -> None:
        aged(*[path for path in paths if path.exists()])
        self.library = library
        self.batches: queue.Queue[WatchBatch | None] = queue.Queue()
        self.notices: list[str] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        options.setdefault("settle_seconds", SETTLE)
        self.watcher = Watcher(library, paths, WatchOptions(**options), on_batch=self.batches.put,
                               on_notice=self.notices.append, stop=self.stop)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.first = self.next()
        assert self.first.catch_up
        self.wait_watching()

    def _run(self) -> None:
        try:
            self.watcher.run()
        except BaseException as error:  # surfaced by next()
            self.error = error
            self.batches.put(None)

    def wait_watching(self) -> None:
        deadline = time.monotonic() + 10
        while not self.watcher.status().watching:
            assert time.monotonic() < deadline and self.error is None, self.error
            time.sleep(0.01)

    def next(self, timeout: float = 15) -> WatchBatch:
        try:
            batch = self.batches.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no batch within {timeout}s (notices: {self.notices})") from None
        if batch is None:
            raise AssertionError(f"the watcher failed: {self.error!r}")
        return batch

    def until(self, done: Callable[[dict[str, int]], bool], timeout: float = 15) -> dict[str, int]:
        """Batches summed until `done(totals)`; the totals."""
        totals = {"added": 0, "updated": 0, "moved": 0, "removed": 0, "failed": 0, "batches": 0, "kept": 0,
                  "texts_added": 0, "texts_updated": 0}
        deadline = time.monotonic() + timeout
        while not done(totals):
            batch = self.next(max(0.1, deadline - time.monotonic()))
            for key in ("added", "updated", "moved", "removed", "texts_added", "texts_updated"):
                totals[key] += getattr(batch, key)
            totals["failed"] += len(batch.failed)
            totals["kept"] += len(batch.kept)
            totals["batches"] += 1
        return totals

    def quiet(self, seconds: float = 4 * SETTLE) -> None:
        """No batch comes within `seconds`."""
        try:
            batch = self.batches.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"an unexpected batch: {batch}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


@pytest.fixture(scope="module")
def exported_library(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    """An empty library whose model is exported to ONNX already (a first run exports it: seconds)."""
    from clipdex.indexer import index_paths

    folder = tmp_path_factory.mktemp("exported")
    library = Library.open(folder / "library", model=tiny_model, create=True, device="cpu")
    image = write_image(folder / "seed" / "seed.jpg", 0)
    index_paths(library, [image.parent])
    image.unlink()
    index_paths(library, [image.parent], prune_empty_roots=True)
    library.close()
    return folder / "library"


@pytest.fixture
def library(tmp_path: Path, exported_library: Path):
    shutil.copytree(exported_library, tmp_path / "library")
    lib = Library.open(tmp_path / "library", device="cpu")
    yield lib
    lib.close()


@pytest.fixture
def running(library: Library):
    started: list[Running] = []

    def start(paths: list[Path], **options: Any) -> Running:
        run = Running(library, paths, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop.set()
        run.thread.join(timeout=20)


def indexed(library: Library) -> dict[str, int]:
    """path -> item id, read through a library of its own (as another process would)."""
    other = Library.open(library.path)
    try:
        return {path: record.id for path, record in other.catalog.files_under([str(library.path.parent)]).items()}
    finally:
        other.close()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files decoded (for the model) since the test began."""
    decoded: list[str] = []
    real = rules.decode_image

    def counting(data: bytes, *args: Any, **kwargs: Any) -> Any:
        decoded.append(str(kwargs.get("name")))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(rules, "decode_image", counting)
    return decoded


def test_catches_up_then_follows_adds_changes_and_deletions(library: Library, tmp_path: Path, running, decodes) -> None:
    pics = tmp_path / "pics"
    first = write_image(pics / "a.jpg", 1)
    write_image(pics / "b.jpg", 2)
    run = running([pics])
    assert (run.first.added, run.first.removed) == (2, 0)
    ids = indexed(library)

    write_image(pics / "c.jpg", 3)
    assert run.until(lambda t: t["added"] >= 1)["added"] == 1

    decodes.clear()
    os.utime(first, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # same bytes, a new mtime
    totals = run.until(lambda t: t["updated"] >= 1)
    assert totals["added"] == 0 and decodes == []  # touched: its vector kept
    write_image(first, 42)  # other bytes
    run.until(lambda t: t["updated"] >= 1)
    assert decodes == [str(first)]
    assert indexed(library)[str(first)] == ids[str(first)]  # re-embedded in place

    (pics / "b.jpg").unlink()
    run.until(lambda t: t["removed"] >= 1)
    run.close()
    assert sorted(indexed(library)) == sorted(str(path) for path in pics.iterdir())


def test_moves_within_and_across_folders_keep_items_without_decoding(library: Library, tmp_path: Path, running,
                                                                     decodes) -> None:
    left, right = tmp_path / "left", tmp_path / "right"
    for index in range(3):
        write_image(left / "album" / f"p{index}.jpg", index)
    write_image(left / "solo.jpg", 10)
    write_image(right / "r.jpg", 11)
    run = running([left, right])
    before = indexed(library)
    decodes.clear()

    (left / "solo.jpg").rename(left / "renamed.jpg")  # within a folder
    shutil.move(str(left / "album"), str(right / "album"))  # a folder, across watched folders
    totals = run.until(lambda t: t["moved"] >= 4)
    assert (totals["moved"], totals["added"], totals["removed"]) == (4, 0, 0)
    assert decodes == []
    after = indexed(library)
    assert after[str(left / "renamed.jpg")] == before[str(left / "solo.jpg")]
    for index in range(3):
        assert after[str(right / "album" / f"p{index}.jpg")] == before[str(left / "album" / f"p{index}.jpg")]
    run.quiet()
    run.close()
    assert sorted(indexed(library)) == sorted(str(p) for p in tmp_path.rglob("*.jpg") if "library" not in p.parts)


def test_new_folders_are_followed_and_removed_ones_removed(library: Library, tmp_path: Path, running) -> None:
    pics = tmp_path / "pics"
    write_image(pics / "keep.jpg", 1)
    run = running([pics])
    (pics / "new" / "deeper").mkdir(parents=True)
    time.sleep(0.2)  # the new folders are watched now
    write_image(pics / "new" / "deeper" / "x.jpg", 2)
    write_image(pics / "new" / "y.jpg", 3)
    assert run.until(lambda t: t["added"] >= 2)["added"] == 2
    shutil.rmtree(pics / "new")
    assert run.until(lambda t: t["removed"] >= 2)["removed"] == 2
    run.close()
    assert sorted(indexed(library)) == [str(pics / "keep.jpg")]


def test_a_file_written_slowly_is_indexed_once_complete(library: Library, tmp_path: Path, running) -> None:
    pics = tmp_path / "pics"
    write_image(pics / "seed.jpg", 0)
    source = write_image(tmp_path / "source.jpg", 5, size=(64, 64))
    data = source.read_bytes()
    run = running([pics])
    with open(pics / "slow.jpg", "wb") as handle:
        for start in range(0, len(data), len(data) // 6 + 1):  # pieces further apart than the watcher's tick
            handle.write(data[start:start + len(data) // 6 + 1])
            handle.flush()
            time.sleep(SETTLE / 2)
    totals = run.until(lambda t: t["added"] >= 1)
    assert (totals["added"], totals["failed"], totals["updated"]) == (1, 0, 0)
    run.quiet()
    run.close()
    assert indexed(library).keys() == {str(pics / "seed.jpg"), str(pics / "slow.jpg")}


def test_a_part_file_is_indexed_when_renamed(library: Library, tmp_path: Path, running, decodes) -> None:
    pics = tmp_path / "pics"
    write_image(pics / "seed.jpg", 0)
    run = running([pics])
    (pics / "download.jpg").write_bytes(b"")  # a browser's placeholder, then its .part renamed over it
    part = pics / "download.jpg.part"
    data = write_image(tmp_path / "source.jpg", 6).read_bytes()
    part.write_bytes(data[:100])
    time.sleep(2 * SETTLE)
    with open(part, "ab") as handle:
        handle.write(data[100:])
    part.rename(pics / "download.jpg")
    totals = run.until(lambda t: t["added"] >= 1)
    assert (totals["added"], totals["failed"]) == (1, 0)
    run.quiet()
    run.close()
    assert str(pics / "download.jpg") in indexed(library)
    assert decodes.count(str(pics / "download.jpg")) == 1


def test_a_gone_folder_keeps_its_items_and_is_caught_up_when_back(library: Library, tmp_path: Path, running,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "ROOT_CHECK_SECONDS", 0.2)
    drive, other = tmp_path / "drive", tmp_path / "other"
    for index in range(2):
        write_image(drive / f"d{index}.jpg", index)
    write_image(other / "o.jpg", 9)
    run = running([drive, other])
    ids = indexed(library)
    away = tmp_path / "unplugged"
    drive.rename(away)  # an unmounted drive: the folder is gone
    time.sleep(1.0)
    assert any("is gone" in notice for notice in run.notices), run.notices
    assert indexed(library) == ids
    write_image(away / "new.jpg", 7)  # added while away: caught up on return
    away.rename(drive)
    totals = run.until(lambda t: t["added"] >= 1)
    assert (totals["added"], totals["removed"]) == (1, 0)
    assert any("is back" in notice for notice in run.notices)
    run.close()
    assert indexed(library) == {**ids, str(drive / "new.jpg"): indexed(library)[str(drive / "new.jpg")]}


def test_emptied_folder_keeps_its_items_as_index_does(library: Library, tmp_path: Path, running) -> None:
    drive = tmp_path / "drive"
    write_image(drive / "a.jpg", 1)
    write_image(drive / "b.jpg", 2)
    run = running([drive])
    for path in list(drive.iterdir()):
        path.unlink()
    totals = run.until(lambda t: t["kept"] >= 1)
    assert totals["removed"] == 0
    run.close()
    assert len(indexed(library)) == 2


def test_polling_forced(library: Library, tmp_path: Path, running) -> None:
    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    run = running([pics], poll_seconds=0.1)
    assert run.watcher.status().polling
    write_image(pics / "b.jpg", 2)
    assert run.until(lambda t: t["added"] >= 1)["added"] == 1
    (pics / "a.jpg").unlink()
    assert run.until(lambda t: t["removed"] >= 1)["removed"] == 1
    run.close()


def test_refused_notifications_fall_back_to_polling(library: Library, tmp_path: Path, running,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify's max_user_watches cannot be lowered without root here: the refusal watchfiles
    raises then is raised for real by the native watcher's start, polling then runs for real."""
    real = watch_module.start_watch

    def refusing(paths: list[str], recursive: bool, polling: bool, *args: Any) -> Any:
        if not polling:
            raise OSError("OS file watch limit reached. about [...]")
        return real(paths, recursive, polling, *args)

    monkeypatch.setattr(watch_module, "start_watch", refusing)
    monkeypatch.setattr(watch_module, "DEFAULT_POLL_SECONDS", 0.1)  # a quicker poll for the test
    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    run = running([pics], poll_seconds=None)
    assert run.watcher.status().polling
    assert [notice for notice in run.notices if "refused" in notice] == [
        "change notifications refused (OS file watch limit reached. about [...]; raise it with sudo sysctl "
        "fs.inotify.max_user_watches=524288): polling every 0.1 s instead"
    ]
    write_image(pics / "b.jpg", 2)
    assert run.until(lambda t: t["added"] >= 1)["added"] == 1
    run.close()


def test_network_file_system_is_polled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "file_system_type", lambda path: "nfs4")
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    notices: list[str] = []
    notifications = watch_module.Notifications([str(tmp_path)], [], None, events, notices.append)
    notifications.poll_seconds = None
    notifications.start()
    try:
        assert notifications.polling
        assert notices == [f"{tmp_path} is on a network file system (nfs4), where change notifications do not "
                           "arrive: polling it every 5 s"]
    finally:
        notifications.close()


def test_write_lock_held_while_watching_and_search_works(library: Library, tmp_path: Path, running) -> None:
    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    run = running([pics])
    other = Library.open(library.path)
    try:
        with pytest.raises(LibraryBusy):
            with other.writer(wait=0):
                pass
        new = write_image(pics / "new.jpg", 5)
        run.until(lambda t: t["added"] >= 1)
        hits = other.search(image=new, k=1)
        assert hits[0].path == str(new)
    finally:
        other.close()
    run.close()


def test_texts_file_is_watched(library: Library, tmp_path: Path, running) -> None:
    pics, notes = tmp_path / "pics", tmp_path / "notes" / "notes.txt"
    write_image(pics / "a.jpg", 1)
    notes.parent.mkdir()
    notes.write_text("a red bicycle\na blue boat\n")
    run = running([pics], texts=[notes])
    assert run.first.texts_added == 2
    replacement = notes.with_name("notes.txt.tmp")  # an editor saves by renaming a new file over the old
    replacement.write_text("a red bicycle\na blue boat\na green tent\n")
    replacement.replace(notes)
    assert run.until(lambda t: t["texts_added"] >= 1)["texts_added"] == 1
    run.close()
    assert library.catalog.counts()["text"] == 3


def test_stop_ends_after_the_batch_in_flight(library: Library, tmp_path: Path, running) -> None:
    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    run = running([pics])
    run.stop.set()
    run.thread.join(timeout=10)
    assert not run.thread.is_alive() and run.error is None
    with library.writer(wait=0):  # let go of the lock
        pass


# -- the command ---------------------------------------------------------------------------


class WatchProcess:
    """`clipdex watch` in a process of its own; its JSON events read as they come."""

    def __init__(self, library: Path, *args: str) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen(
            [sys.executable, "-m", "clipdex.cli", "watch", *args, "--library", str(library), "--settle", str(SETTLE),
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        import json

        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def event(self, timeout: float = 30) -> dict[str, Any]:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no event from clipdex watch") from None
        if event is None:
            self.process.wait(timeout=10)
            raise AssertionError(f"clipdex watch ended: {self.process.returncode} {self.process.stderr.read()}")  # type: ignore[union-attr]
        return event

    def stderr_after(self, timeout: float = 20) -> tuple[int, str]:
        self.process.wait(timeout=timeout)
        assert self.process.stderr is not None
        return self.process.returncode, self.process.stderr.read()


def test_killed_during_a_burst_the_next_watch_catches_up_exactly(library: Library, tmp_path: Path) -> None:
    import signal

    pics = tmp_path / "pics"
    for index in range(4):
        write_image(pics / f"old{index}.jpg", index)
    aged(pics)
    library.close()
    watcher = WatchProcess(library.path, str(pics), "--batch-size", "4", "--workers", "1")
    assert watcher.event()["event"] == "catch-up"
    for index in range(80):  # a burst
        write_image(pics / "burst" / f"b{index:02d}.jpg", 100 + index, size=(320, 240))
    reader = Library.open(library.path)
    try:
        deadline = time.monotonic() + 30
        while (committed := len(reader.catalog.files_under([str(pics / "burst")]))) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        reader.close()
    watcher.process.kill()  # SIGKILL, in the middle of the burst
    watcher.process.wait(timeout=10)
    assert 0 < committed < 80
    (pics / "old0.jpg").unlink()  # and changes while nothing watches
    write_image(pics / "later.jpg", 500)
    aged(pics)

    again = WatchProcess(library.path, str(pics))
    caught_up = again.event()
    assert caught_up["event"] == "catch-up" and caught_up["removed"] == 1 and caught_up["failed"] == []
    again.process.send_signal(signal.SIGTERM)  # stops after the batch in flight
    code, stderr = again.stderr_after()
    assert code == 0 and "Stopped: everything indexed so far is kept." in stderr
    assert "caught up: " in stderr
    assert sorted(indexed(library)) == sorted(str(path) for path in pics.rglob("*.jpg"))


def test_a_second_writer_is_refused_while_watching(library: Library, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    library.close()
    watcher = WatchProcess(library.path, str(pics))
    assert watcher.event()["event"] == "catch-up"
    other = subprocess.run([sys.executable, "-m", "clipdex.cli", "index", str(pics), "--library", str(library.path)],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 1
    assert f"library {library.path} is being written by pid {watcher.process.pid}" in other.stderr
    watcher.process.send_signal(signal.SIGINT)
    code, _ = watcher.stderr_after()
    assert code == 0


def test_serve_watch_answers_with_a_photo_added_after_it_started(library: Library, tmp_path: Path) -> None:
    import base64
    import json
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    pics = tmp_path / "pics"
    write_image(pics / "old.jpg", 1)
    aged(pics)
    library.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "clipdex.cli", "serve", "--library", str(library.path), "--port",
                               str(port), "--watch", str(pics), "--settle", str(SETTLE), "--device", "cpu"],
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert server.stderr is not None
        for line in server.stderr:
            if line.startswith("Serving"):
                break
        deadline = time.monotonic() + 20
        while True:  # listening
            try:
                urllib.request.urlopen(f"{url}/health", timeout=10).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        new = write_image(pics / "new.jpg", 77)
        request = json.dumps({"image": base64.b64encode(new.read_bytes()).decode(), "k": 1}).encode()
        deadline = time.monotonic() + 20
        while True:
            asked = urllib.request.Request(f"{url}/search", data=request, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(asked, timeout=10) as response:
                hits = json.load(response)["hits"]
            if hits and hits[0]["path"] == str(new):
                break
            assert time.monotonic() < deadline, hits
            time.sleep(0.1)
        with urllib.request.urlopen(f"{url}/indexing", timeout=10) as response:
            assert json.load(response) == {"enabled": True, "watching": True, "polling": False, "pending": 0,
                                           "indexing": 0, "batches": 2}
    finally:
        server.send_signal(signal.SIGTERM)  # as a service manager stops it: the watcher stops after its batch
        try:
            server.wait(timeout=20)
        finally:
            server.kill()
    assert server.returncode == 0
    assert "Stopping the watcher once its batch in flight is committed..." in server.stderr.read()
    assert sorted(indexed(library)) == [str(pics / "new.jpg"), str(pics / "old.jpg")]


def test_python_api_watch_paths(library: Library, tmp_path: Path) -> None:
    import clipdex

    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    aged(pics)
    batches: queue.Queue[clipdex.WatchBatch] = queue.Queue()
    stop = threading.Event()
    thread = threading.Thread(target=clipdex.watch_paths, args=(library, [pics], clipdex.WatchOptions(settle_seconds=SETTLE)),
                              kwargs={"on_batch": batches.put, "stop": stop})
    thread.start()
    try:
        assert batches.get(timeout=15).to_json()["event"] == "catch-up"
        write_image(pics / "b.jpg", 2)
        event = batches.get(timeout=15).to_json()
        assert (event["event"], event["added"], event["failed"]) == ("batch", 1, [])
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()


def test_a_move_keeps_its_item_while_other_files_still_settle(library: Library, tmp_path: Path, running,
                                                              decodes) -> None:
    """The new path settles in a batch before the deletion is due (another file is still being
    written): its bytes are found among the gone files all the same."""
    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    data = write_image(tmp_path / "source.jpg", 5, size=(64, 64)).read_bytes()
    run = running([pics])
    before = indexed(library)
    decodes.clear()
    with open(pics / "slow.jpg", "wb") as handle:
        handle.write(data[:10])
        handle.flush()
        (pics / "a.jpg").rename(pics / "b.jpg")
        for start in range(10, len(data), 200):
            time.sleep(SETTLE / 3)
            handle.write(data[start:start + 200])
            handle.flush()
            if start > 10 and run.batches.qsize():
                break  # the move's batch came while this file was still being written
        handle.write(data[start + 200:])
    totals = run.until(lambda t: t["moved"] >= 1 and t["added"] >= 1)
    assert (totals["moved"], totals["added"], totals["removed"]) == (1, 1, 0)
    assert decodes == [str(pics / "slow.jpg")]
    assert indexed(library)[str(pics / "b.jpg")] == before[str(pics / "a.jpg")]
    run.close()


def test_without_watchfiles_one_line_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from clipdex.search.errors import ClipdexError

    monkeypatch.setitem(sys.modules, "watchfiles._rust_notify", None)  # as if not installed
    notifications = watch_module.Notifications([str(tmp_path)], [], None, queue.Queue(), print)
    with pytest.raises(ClipdexError, match=r"^watching folders needs watchfiles: pip install 'clipdex\[watch\]'$"):
        notifications.start()


def test_notifications_failing_while_watching_fall_back_to_polling(library: Library, tmp_path: Path, running,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify refuses a watch for a folder made later (the limit reached meanwhile): watchfiles'
    watcher raises from its next wait; polling takes over, after a catch-up for what was missed."""
    real = watch_module.start_watch

    def failing_later(paths: list[str], recursive: bool, polling: bool, *args: Any) -> Any:
        changes = real(paths, recursive, polling, *args)
        if polling:
            return changes

        def fail() -> Any:
            yield from []
            raise RuntimeError("error in underlying watcher: OS file watch limit reached.")
        return fail()

    monkeypatch.setattr(watch_module, "start_watch", failing_later)
    monkeypatch.setattr(watch_module, "DEFAULT_POLL_SECONDS", 0.1)
    pics = tmp_path / "pics"
    write_image(pics / "a.jpg", 1)
    run = running([pics])
    deadline = time.monotonic() + 10
    while not run.watcher.status().polling:
        assert time.monotonic() < deadline, run.notices
        time.sleep(0.02)
    assert "change notifications failed (error in underlying watcher: OS file watch limit reached.; raise it with " \
           "sudo sysctl fs.inotify.max_user_watches=524288): polling every 0.1 s instead" in run.notices
    write_image(pics / "b.jpg", 2)
    assert run.until(lambda t: t["added"] >= 1)["added"] == 1
    run.close()


def test_a_folder_missing_at_the_start_is_caught_up_when_it_appears(library: Library, tmp_path: Path, running,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "ROOT_CHECK_SECONDS", 0.2)
    drive = tmp_path / "drive"
    run = running([drive])
    assert run.notices == [f"{drive} is not there: its indexed items are kept, and it is caught up when it appears"]
    staged = write_image(tmp_path / "staged" / "a.jpg", 3).parent
    aged(staged)
    staged.rename(drive)  # mounted
    totals = run.until(lambda t: t["added"] >= 1)
    assert totals["added"] == 1
    write_image(drive / "b.jpg", 4)  # and followed from then on
    assert run.until(lambda t: t["added"] >= 1)["added"] == 1
    run.close()
    assert sorted(indexed(library)) == [str(drive / "a.jpg"), str(drive / "b.jpg")]


def test_a_burst_keeps_the_light_session_a_single_photo_loaded(library: Library, tmp_path: Path, running,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A watcher's runs, catch-up and bursts alike, embed on the session without prepacked
    weights: a burst must not load a second copy of the model's weights beside the one a
    single photo loaded (the 300 MB bound on a burst's memory growth)."""
    import clipdex.search.encoders.onnx_image as onnx_image

    sessions: list[bool] = []
    real = onnx_image._inference_session

    def recording(path: Path, threads: int, prepack: bool = False) -> Any:
        sessions.append(prepack)
        return real(path, threads, prepack)

    monkeypatch.setattr(onnx_image, "_inference_session", recording)
    burst = onnx_image.BULK_IMAGES + 6
    pics = tmp_path / "pics"
    for number in range(burst):
        write_image(pics / f"old{number}.jpg", number)
    run = running([pics])
    assert run.first.added == burst
    staging = tmp_path / "staging"
    for number in range(burst):
        write_image(staging / f"new{number}.jpg", 1000 + number)
    aged(staging)
    for path in staging.iterdir():
        os.rename(path, pics / path.name)
    assert run.until(lambda t: t["added"] >= burst)["added"] == burst
    run.close()
    assert sessions == [False], sessions  # one session, made once (the catch-up embedded), never prepacked
    assert type(library.encoder).__name__ == "OnnxClipEncoder"
