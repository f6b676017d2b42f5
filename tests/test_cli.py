"""The command line: exit codes and the exact output that matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipdex.cli.main import app
from tests.conftest import huge_png

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def indexed(tmp_path: Path, make_images, model_args: list[str]) -> tuple[Path, list[Path]]:
    paths = make_images(tmp_path / "pics", 5)
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--json", *model_args)
    assert result.exit_code == 0, result.output
    return tmp_path / "lib", paths


def test_index_json_summary(tmp_path: Path, make_images, model_args: list[str]) -> None:
    make_images(tmp_path / "pics", 3)
    (tmp_path / "pics" / "broken.jpg").write_text("nope")
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--json", "--quiet", *model_args)
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("added", "updated", "moved", "removed", "unchanged")} == dict(added=3, updated=0, moved=0, removed=0, unchanged=0)
    assert report["failed"] == [{"path": str(tmp_path / "pics" / "broken.jpg"), "error": "not an image Pillow can identify (wrong extension or unsupported format)"}]
    strict = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--strict", "--quiet")
    assert strict.exit_code == 1
    assert "failed: " + str(tmp_path / "pics" / "broken.jpg") in strict.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_library_from_flag_or_environment(tmp_path: Path, make_images, model_args: list[str], monkeypatch, how: str) -> None:
    make_images(tmp_path / "pics", 2)
    where = ["--library", str(tmp_path / "lib")] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("CLIPDEX_LIBRARY", str(tmp_path / "lib"))
    assert run("index", str(tmp_path / "pics"), "--quiet", *where, *model_args).exit_code == 0
    stats = json.loads(run("stats", "--json", *where).stdout)
    assert (stats["images"], stats["vectors"], stats["items"], stats["texts"]) == (2, 2, 2, 0)
    assert stats["model"] == "tiny-clip" and stats["index_type"] == "flat"
    assert (tmp_path / "lib" / "manifest.json").exists()


def test_search_json_hits(indexed) -> None:
    library, paths = indexed
    result = run("search", "--image", str(paths[3]), "-k", "2", "--json", "--library", str(library))
    assert result.exit_code == 0
    hits = json.loads(result.stdout)
    assert len(hits) == 2
    assert {"rank", "score", "id", "kind", "path"} <= set(hits[0])
    assert (hits[0]["rank"], hits[0]["kind"], hits[0]["path"]) == (1, "image", str(paths[3]))
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_table_paths_and_null(indexed) -> None:
    library, paths = indexed
    table = run("search", "a photo", "--library", str(library), "-k", "3")
    assert table.exit_code == 0 and "rank" in table.stdout and str(paths[0].parent) in table.stdout
    listed = run("search", "a photo", "--library", str(library), "-k", "5", "--format", "paths").stdout.splitlines()
    assert sorted(listed) == sorted(map(str, paths))
    nul = run("search", "a photo", "--library", str(library), "-k", "5", "--format", "paths", "-0").stdout
    assert nul.endswith("\0") and sorted(nul.rstrip("\0").split("\0")) == sorted(map(str, paths))


def test_search_html_page(indexed, tmp_path: Path) -> None:
    library, paths = indexed
    page = tmp_path / "out.html"
    result = run("search", "a photo", "--library", str(library), "-k", "4", "--format", "html", "--out", str(page))
    assert result.exit_code == 0
    html = page.read_text()
    assert html.count('<img src="data:image/jpeg;base64,') == 4
    assert "score" in html and str(paths[0].parent) in html


def test_embed_prints_a_normalized_vector(indexed, tiny_model) -> None:
    library, paths = indexed
    for args in (["--text", "a dog"], ["--image", str(paths[0])]):
        result = run("embed", *args, "--library", str(library), "--json")
        data = json.loads(result.stdout)
        assert data["dim"] == 32 and data["model"] == "tiny-clip"
        assert np.linalg.norm(data["vector"]) == pytest.approx(1.0, abs=1e-5)
    plain = run("embed", "--text", "a dog", "--model", tiny_model.name, "--pretrained", tiny_model.pretrained)
    assert len(plain.stdout.split()) == 32
    assert run("embed", "--library", str(library)).exit_code == 1


def test_export_npz(indexed, tmp_path: Path) -> None:
    library, paths = indexed
    result = run("export", "--out", str(tmp_path / "e.npz"), "--library", str(library))
    assert result.exit_code == 0 and "exported 5 items" in result.stdout
    data = np.load(tmp_path / "e.npz")
    assert data["vectors"].shape == (5, 32) and data["vectors"].dtype == np.float32
    assert sorted(data["paths"]) == sorted(map(str, paths)) and set(data["kinds"]) == {"image"}
    assert data["ids"].dtype == np.int64


def test_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    result = run("search", "x", "--library", str(tmp_path / "none"))
    assert result.exit_code == 1
    assert "no clipdex library at" in result.stderr and "Traceback" not in result.stderr
    assert "point --library at an existing library" in result.stderr


def test_model_mismatch_is_a_clear_error(indexed, tmp_path: Path) -> None:
    library, _ = indexed
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    result = run("index", str(tmp_path / "pics"), "--library", str(library), "--pretrained", str(other))
    assert result.exit_code == 1 and "was built with model tiny-clip" in result.stderr
    assert "drop --model/--pretrained to use the library's own model" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--after", "2024-05-01", "--before", "2024-01-01"], "--after 2024-05-01T00:00:00 is not before --before 2024-01-01T00:00:00"),
    (["--after", "last tuesday"], "--after wants a date or time like 2024-07-31 or 2024-07-31T18:30, not 'last tuesday'"),
    (["--like", "0"], "--like 0: item ids are between 1 and 9223372036854775807"),
])
def test_query_errors_name_the_flags(indexed, arguments: list[str], message: str) -> None:
    """The library's errors name its arguments (`after=`); the CLI says its flags."""
    library, _ = indexed
    result = run("search", "x", "--library", str(library), *arguments)
    assert (result.exit_code, result.stderr) == (1, f"Error: {message}\n")


def test_unfetchable_weights_name_the_model_and_the_way_out(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 1)
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--quiet")
    assert result.exit_code == 1
    assert "ViT-B-32" in result.stderr and "laion2b_s34b_b79k" in result.stderr
    assert "--pretrained FILE" in result.stderr
    assert not (tmp_path / "lib").exists(), "a failed first run must not leave a library bound to that model"


def _offline_weights() -> str:
    from clipdex.search.encoders.weights import demo_model_folder

    demo = demo_model_folder()
    return ("Error: cannot fetch the weights of model ViT-B-32 (pretrained tag 'laion2b_s34b_b79k'): they are not "
            "in this machine's cache, and HF_HUB_OFFLINE is set. Use a local checkpoint file (--model ARCHITECTURE "
            "--pretrained FILE; in Python ModelSpec(ARCHITECTURE, FILE)) or the small demo model (--model "
            f"{demo / 'clipdex-demo.json'} --pretrained {demo / 'clipdex-demo.pt'})")


OFFLINE_WEIGHTS = _offline_weights()


def test_an_offline_first_index_checks_the_weights_before_scanning(tmp_path: Path, make_images,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.indexer import pipeline
    from tests.conftest import one_line_error

    make_images(tmp_path / "pics", 2)
    scans: list[object] = []
    real_scan = pipeline.scan
    monkeypatch.setattr(pipeline, "scan", lambda *args, **kwargs: scans.append(args) or real_scan(*args, **kwargs))
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--quiet")
    assert one_line_error(result) == OFFLINE_WEIGHTS
    assert scans == [] and not (tmp_path / "lib").exists()


def test_the_weights_are_checked_without_torch(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 1)
    script = ("import runpy, sys\n"
              f"sys.argv = ['clipdex', 'index', {str(tmp_path / 'pics')!r}, '--library', {str(tmp_path / 'lib')!r}, '-q']\n"
              "try:\n    runpy.run_module('clipdex.cli', run_name='__main__')\n"
              "except SystemExit as end:\n    print('exit', end.code)\n"
              "print(sorted(name for name in ('torch', 'open_clip', 'safetensors.torch') if name in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-2:] == ["exit 1", "[]"], done.stderr
    assert " ".join(done.stderr.split()) == OFFLINE_WEIGHTS


def test_unknown_model_name(tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 1)
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--model", "NoSuchNet", "--pretrained", "none")
    assert result.exit_code == 1 and "unknown open_clip model 'NoSuchNet'" in result.stderr


def test_optimize_says_the_library_is_busy_before_it_starts(indexed) -> None:
    import socket

    from tests.conftest import one_line_error

    library, _ = indexed
    holding = ("import sys\nfrom clipdex.search.library import Library\n"
               f"with Library.open({str(library)!r}).writer():\n    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", holding], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = run("optimize", "--library", str(library))
    finally:
        holder.communicate("", timeout=60)
    assert one_line_error(result) == (f"Error: library {library} is being written by pid {holder.pid} on "
                                      f"{socket.gethostname()}; wait for that run to finish (searching it meanwhile works)")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "search", "x", "--library", str(tmp_path / "none"))
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_installed_command_runs(indexed) -> None:
    library, paths = indexed
    command = Path(sys.executable).with_name("clipdex")
    assert command.exists(), "pip install -e . provides the clipdex command"
    result = subprocess.run([str(command), "search", "--image", str(paths[1]), "-k", "1", "--json", "--library", str(library)],
                            capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["path"] == str(paths[1])


def test_readme_documents_every_command() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    names = [command.name or command.callback.__name__ for command in app.registered_commands]
    names += [f"{group.name} {command.name or command.callback.__name__}" for group in app.registered_groups
              for command in group.typer_instance.registered_commands]  # `clipdex cache info`, say
    assert len(names) >= 6
    missing = [name for name in names if f"clipdex {name}" not in readme]
    assert missing == []


@pytest.mark.parametrize("args", [["   "], ["\t\n"], ["a photo", "--minus", "  "]])
def test_search_refuses_a_blank_text(indexed, args: list[str]) -> None:
    """As "" is refused; the rule lives in the Query, so the HTTP API refuses the same texts."""
    library, _ = indexed
    result = run("search", *args, "--library", str(library))
    assert result.exit_code == 1 and result.stdout == ""
    assert "is empty or only whitespace: give words to look for" in result.stderr


@pytest.mark.parametrize("command", ["search", "embed"])
def test_query_image_over_the_pixel_limit_is_refused(indexed, tmp_path: Path, command: str) -> None:
    library, _ = indexed
    big = tmp_path / "big.png"
    big.write_bytes(huge_png(7_100, 7_100))
    result = run(command, "--image", str(big), "--library", str(library))
    assert result.exit_code == 1 and result.stdout == ""
    assert f"{big}: 7100x7100 pixels is more than the 50,000,000 a query image may have" in result.stderr


# -- hazardous input: FIFOs, devices, sparse giants, names that are not UTF-8 -------------
# These run the command in a child process with a timeout and a memory limit: should a
# FIFO be opened or /dev/zero be read again, the test fails instead of hanging or
# exhausting the machine.

NOT_REGULAR = "not a regular file: only regular files are read"


def limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


def clipdex_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limited_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"clipdex {' '.join(args)} did not finish in {timeout} s")


def corrupt_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF claims more data than it has: Pillow warns while decoding it."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x010F] = "Canon"
    raw = bytearray(exif.tobytes())
    raw[20:24] = (0x100).to_bytes(4, "big")  # the Make tag's count: 256 bytes, past the end
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, exif=bytes(raw))
    return path


def test_special_and_giant_files_in_a_folder_are_reported_not_read(tmp_path: Path, make_images, model_args: list[str]) -> None:
    pics = tmp_path / "pics"
    make_images(pics, 2)
    corrupt_exif_jpeg(pics / "warns.jpg")
    os.mkfifo(pics / "pipe.jpg")
    (pics / "zero.jpg").symlink_to("/dev/zero")
    with open(pics / "huge.jpg", "wb") as handle:
        handle.truncate(50 << 30)  # sparse: 50 GB claimed, nothing written
    command = ("index", str(pics), "--library", str(tmp_path / "lib"), "--json", "--quiet", *model_args)
    first = clipdex_process(*command)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    expected = {
        str(pics / "pipe.jpg"): f"a FIFO (named pipe), {NOT_REGULAR}",
        str(pics / "zero.jpg"): f"a character device, {NOT_REGULAR}",
        str(pics / "huge.jpg"): "50.0 GB, over the 512.0 MB size limit (--max-file-mb)",
    }
    assert report["added"] == 3 and {f["path"]: f["error"] for f in report["failed"]} == expected
    assert "Warning" not in first.stderr and "EXIF" not in first.stderr, first.stderr  # Pillow's, kept off the terminal
    again = clipdex_process(*command)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["added"], report["unchanged"], report["removed"], len(report["failed"])) == (0, 3, 0, 3)


def test_max_file_mb_sets_the_limit(tmp_path: Path, make_images, model_args: list[str]) -> None:
    make_images(tmp_path / "pics", 1)
    with open(tmp_path / "pics" / "big.png", "wb") as handle:
        handle.truncate(3 << 20)
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--json", "--quiet", "--max-file-mb", "2", *model_args)
    assert json.loads(result.stdout)["failed"] == [
        {"path": str(tmp_path / "pics" / "big.png"), "error": "3.0 MB, over the 2.0 MB size limit (--max-file-mb)"}]


@pytest.mark.parametrize("special", ["fifo", "device"])
@pytest.mark.parametrize("command", ["index", "search --image", "search --vector", "index-texts"])
def test_a_special_file_named_on_the_command_line_is_a_one_line_error(indexed, tmp_path: Path, model_args: list[str],
                                                                      command: str, special: str) -> None:
    library, _ = indexed
    suffix = {"search --vector": ".npy", "index-texts": ".txt"}.get(command, ".jpg")
    path = tmp_path / f"special{suffix}"
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    args = {"index": ["index", str(path), *model_args], "index-texts": ["index-texts", str(path)],
            "search --image": ["search", "--image", str(path)], "search --vector": ["search", "--vector", str(path)]}[command]
    result = clipdex_process(*args, "--library", str(library), timeout=60)
    assert result.returncode == 1, result.stderr
    kind = "a FIFO (named pipe)" if special == "fifo" else "a character device"
    named = path.resolve() if command == "index-texts" else path  # corpora are recorded by their real path
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and last.endswith(f" {named}: {kind}, {NOT_REGULAR}"), result.stderr
    assert "Traceback" not in result.stderr


def test_an_empty_path_filter_is_an_error(indexed) -> None:
    library, _ = indexed
    result = run("search", "a photo", "--path", "", "--library", str(library))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "Error: the path filter is empty: give a glob such as '*/2024/*', or leave it out to search everything\n"


def write_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


@pytest.mark.parametrize("name,make,reason", [
    ("zero-bytes.npy", lambda p: p.write_bytes(b""), "is empty (0 bytes), not a .npy array"),
    ("no-numbers.npy", lambda p: write_npy(p, np.zeros(0, dtype=np.float32)), "is empty: an array of no numbers"),
    ("strings.npy", lambda p: write_npy(p, np.array(["a", "b"])), "holds text, not real numbers"),
    ("complex.npy", lambda p: write_npy(p, np.ones(32, dtype=np.complex64)), "holds complex numbers, not real numbers"),
    ("garbage.npy", lambda p: p.write_bytes(b"not numpy at all"), "is not a .npy array"),
    ("archive.npy", lambda p: np.savez(open(p, "wb"), v=np.ones(32)), "is an .npz archive"),
])
def test_a_bad_vector_file_is_a_one_line_error(indexed, tmp_path: Path, name: str, make, reason: str) -> None:
    library, _ = indexed
    path = tmp_path / name
    make(path)
    result = run("search", "--vector", str(path), "--library", str(library))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: vector file {path} {reason}") and result.stderr.count("\n") == 1, result.stderr


def test_a_command_closes_its_catalog_before_it_exits(tmp_path: Path, model_args: list[str], make_images) -> None:
    """The CLI leaves out the interpreter's last garbage collection (gc.freeze); the catalogs it
    opened are closed first, so SQLite folds its write-ahead log into the catalog file."""
    make_images(tmp_path / "photos", 3)
    library = tmp_path / "library"
    for arguments in (["index", str(tmp_path / "photos"), "--library", str(library), *model_args, "--quiet"],
                      ["search", "a photo", "--library", str(library), "--format", "paths"]):
        result = subprocess.run([sys.executable, "-m", "clipdex.cli", *arguments], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (library / "catalog.sqlite").is_file()
        assert not (library / "catalog.sqlite-wal").exists(), arguments[0]  # checkpointed and removed on close


# -- versions and shell completion -------------------------------------------------------


def test_version_option_is_one_line() -> None:
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"clipdex {version('clipdex')}\n"


def test_version_reports_every_part() -> None:
    import platform
    import sqlite3
    from importlib.metadata import version

    report = json.loads(run("version", "--json").stdout)
    assert report["clipdex"] == version("clipdex") and report["open_clip"] == version("open_clip_torch")
    assert report["torch"] == version("torch") and report["onnxruntime"] == version("onnxruntime")
    import faiss

    assert report["faiss"] == faiss.__version__
    assert (report["sqlite"], report["python"]) == (sqlite3.sqlite_version, platform.python_version())
    import torch

    assert report["torch_cuda"] == torch.version.cuda
    assert set(report["gpu"]) == {"seen", "driver", "devices"}
    lines = run("version").stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["clipdex", "open_clip", "torch", "onnxruntime", "faiss", "sqlite",
                                                   "python", "platform", "gpu"]
    assert lines[0].split() == ["clipdex", version("clipdex")]


def test_version_names_what_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    real = importlib.metadata.version

    def without_torch(name: str) -> str:
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_torch)
    report = json.loads(run("version", "--json").stdout)
    assert report["torch"] is None and report["torch_cuda"] is None and report["open_clip"] is not None
    assert "torch        not installed" in run("version").stdout.splitlines()


def test_version_reads_the_gpu_from_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.cli import version_cmd

    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                                      "GCC version:  gcc version 12.2.0\n")
    (tmp_path / "gpus" / "0000:01:00.0" / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\n")
    monkeypatch.setattr(version_cmd, "NVIDIA_PROC", tmp_path)
    report = json.loads(run("version", "--json").stdout)
    assert report["gpu"] == {"seen": True, "driver": "550.54.15", "devices": ["NVIDIA H100 80GB HBM3"]}
    assert "gpu          NVIDIA H100 80GB HBM3 (NVIDIA driver 550.54.15)" in run("version").stdout.splitlines()
    monkeypatch.setattr(version_cmd, "NVIDIA_PROC", tmp_path / "none")
    assert json.loads(run("version", "--json").stdout)["gpu"] == {"seen": False, "driver": None, "devices": []}


def test_version_imports_none_of_the_heavy_parts() -> None:
    script = ("import runpy, sys\n"
              "sys.argv = ['clipdex', 'version', '--json']\n"
              "try:\n    runpy.run_module('clipdex.cli', run_name='__main__')\n"
              "except SystemExit as end:\n    assert not end.code, end.code\n"
              "print(sorted(name for name in ('torch', 'open_clip', 'onnxruntime', 'faiss', 'sqlalchemy') if name in sys.modules),"
              " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["clipdex"] and done.stderr.strip().splitlines()[-1] == "[]"


def test_shell_completion_is_on() -> None:
    assert "--install-completion" in run("--help").stdout
    command = Path(sys.executable).with_name("clipdex")
    environment = {**os.environ, "_CLIPDEX_COMPLETE": "complete_bash", "COMP_WORDS": "clipdex ver", "COMP_CWORD": "1"}
    done = subprocess.run([str(command)], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["version"]


# -- hostile file names on a terminal ---------------------------------------------------

HOSTILE_NAMES = ["\x1b[2Jclear.jpg", "\x1b]0;pwned\x07title.jpg", "[b]markup[/b].jpg", "two\nlines.jpg"]
SHOWN_NAMES = ["\\033[2Jclear.jpg", "\\033]0;pwned\\atitle.jpg", "[b]markup[/b].jpg", "two\\nlines.jpg"]


@pytest.fixture
def hostile(tmp_path: Path, model_args: list[str]) -> tuple[Path, Path, str]:
    """A library of images with hostile names, and what its first index run said on stderr."""
    from tests.conftest import write_image

    for seed, name in enumerate(HOSTILE_NAMES):
        write_image(tmp_path / "pics" / name, seed)
    (tmp_path / "pics" / "\x1b[2Jbroken.jpg").write_bytes(b"not a jpeg")
    result = run("index", str(tmp_path / "pics"), "--library", str(tmp_path / "lib"), "--quiet", *model_args)
    assert result.exit_code == 0, result.output
    return tmp_path / "lib", tmp_path / "pics", result.stderr


def test_a_failed_files_name_is_escaped_on_stderr(hostile: tuple[Path, Path, str]) -> None:
    _, pics, said = hostile
    assert said == f"failed: {pics}/\\033[2Jbroken.jpg: not an image Pillow can identify (wrong extension or unsupported format)\n"


def on_a_terminal(*args: str) -> str:
    """What `clipdex ARGS` writes on stdout when stdout is a terminal (a pseudo-terminal here)."""
    import pty

    master, follower = pty.openpty()
    try:
        done = subprocess.run([str(Path(sys.executable).with_name("clipdex")), *args], stdout=follower,
                              stderr=subprocess.PIPE, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    finally:
        os.close(follower)
    assert done.returncode == 0, done.stderr
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the terminal's other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.parametrize("where", ["piped", "terminal"])
def test_paths_are_exact_through_a_pipe_and_escaped_on_a_terminal(hostile: tuple[Path, Path, str], where: str) -> None:
    library, pics, _ = hostile
    args = ("search", "--image", str(pics / HOSTILE_NAMES[0]), "--format", "paths", "--library", str(library))
    if where == "piped":
        assert sorted(run(*args, "-0").stdout.split("\0")[:-1]) == sorted(str(pics / name) for name in HOSTILE_NAMES)
        lines = run(*args).stdout.split("\n")  # exact: the name with a newline is two lines (-0 is for such names)
        assert sorted(lines[:-1]) == sorted("".join(f"{pics / name}\n" for name in HOSTILE_NAMES).split("\n")[:-1])
    else:
        shown = on_a_terminal(*args)
        assert "\x1b" not in shown and "\x07" not in shown
        assert sorted(shown.splitlines()) == sorted(f"{pics}/{name}" for name in SHOWN_NAMES)


@pytest.mark.parametrize("where", ["piped", "terminal"])
def test_the_table_shows_names_escaped_and_never_as_markup(hostile: tuple[Path, Path, str], where: str) -> None:
    library, pics, _ = hostile
    args = ("search", "--image", str(pics / HOSTILE_NAMES[0]), "--library", str(library))
    shown = run(*args).stdout if where == "piped" else on_a_terminal(*args)
    for name in HOSTILE_NAMES[:2]:
        assert name[:4] not in shown  # ESC [ 2 J, ESC ] 0 ;
    assert "\x07" not in shown
    rows = [line.split(maxsplit=4)[-1].rstrip() for line in shown.splitlines()[1:]]
    assert sorted(rows) == sorted(f"{pics}/{name}" for name in SHOWN_NAMES)
