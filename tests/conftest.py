"""Shared fixtures: a tiny open_clip model with random weights saved to a checkpoint (the
real loading path), small images, a default library pointed at a temp folder, and a home of
the session's own (tests/home.py)."""

from __future__ import annotations

import json
import os
import subprocess
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from tests import home

home.enter()  # before anything that reads $HOME or the XDG folders when imported (tests/home.py)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from clipdex.search.library import Library  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# -- a home of the session's own (tests/home.py) ---------------------------------------------


def pytest_unconfigure(config: pytest.Config) -> None:
    home.leave()


@pytest.fixture(scope="session", autouse=True)
def homes_left_empty() -> Iterator[None]:
    """After the session: nothing was written into the session's home (whatever writes into
    $HOME would write into a user's), and nothing new appeared in the real one."""
    yield
    home.check_left_empty()


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPDEX_LIBRARY", str(tmp_path / "default-library"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never wait on a model hub in tests
    monkeypatch.delenv("CLIPDEX_TOKEN", raising=False)


@pytest.fixture(scope="module", autouse=True)
def export_cache_per_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The export cache (`clipdex.search.encoders.export_cache`) of a module's own fixtures,
    which run before any test's monkeypatch: never the user's, and new for each module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path_factory.mktemp("clipdex-cache")))
        yield


@pytest.fixture(autouse=True)
def export_cache_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own, empty export cache, outside tmp_path (which some tests use as a
    library): a shared one would let an earlier test's export stand in for a later test's
    (whose monkeypatches of the export would then not be reached)."""
    monkeypatch.setenv("CLIPDEX_CACHE_DIR", str(tmp_path_factory.mktemp("clipdex-cache")))


class ThreadExportProcess:
    """`ExportProcess` with the export process's own code on a thread of this process, so
    that a test's monkeypatches of the export reach it; the messages as the process tells them."""

    def __init__(self) -> None:
        import queue
        import threading

        self.messages: "queue.Queue[dict | None]" = queue.Queue()
        self.thread: threading.Thread | None = None

    def export(self, library_path: Path, model_json: dict, dim: int, threads: int) -> Iterator[dict]:
        import threading

        from clipdex.search.encoders import export_process

        def run() -> None:
            try:
                export_process.export(library_path, model_json, dim, threads, tell=self.messages.put)
            except Exception as error:  # as the process says it
                self.messages.put({"error": f"{type(error).__name__}: {error}"})
            finally:
                self.messages.put(None)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        while (message := self.messages.get()) is not None:
            yield message

    def close(self) -> int:
        if self.thread is not None:
            self.thread.join()
        return 0


@pytest.fixture(autouse=True)
def export_on_a_thread(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first index run's export process runs on a thread of the test's process
    (`ThreadExportProcess`): the same code, told the same way, reached by the test's
    monkeypatches, without a second import of torch for each test's new library (which
    took the suite from 8 to 14 minutes). Tests marked `export_process` get the real one, as
    do the CLI's in subprocesses and the process's own tests (`tests/test_onnx_image.py`)."""
    if request.node.get_closest_marker("export_process") is None:
        from clipdex.indexer import first_export

        monkeypatch.setattr(first_export, "ExportProcess", ThreadExportProcess)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """A 32-dim open_clip model with seeded random weights, as config JSON + checkpoint."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny-model")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    checkpoint = folder / "tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return ModelSpec(str(config), str(checkpoint))


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB", format: str | None = None) -> Path:
    """A random-noise image with blocks of colour, distinct per seed."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=format)
    return path


def huge_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG: tens of megapixels in a few kilobytes, the shape of a decompression bomb."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the packed pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture
def make_images() -> Callable[..., list[Path]]:
    def make(folder: Path, count: int, start: int = 0, suffix: str = ".jpg") -> list[Path]:
        return [write_image(folder / f"img{start + i:03d}{suffix}", seed=start + i) for i in range(count)]

    return make


@pytest.fixture
def library(tmp_path: Path, tiny_model: ModelSpec) -> Library:
    lib = Library.open(tmp_path / "library", model=tiny_model, create=True, device="cpu")
    yield lib
    lib.close()


@pytest.fixture
def model_args(tiny_model: ModelSpec) -> list[str]:
    """CLI options selecting the tiny model."""
    return ["--model", tiny_model.name, "--pretrained", tiny_model.pretrained]


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresServer"]:
    """One PostgreSQL server for the whole session (tests/postgres.py). Clients find its
    password in PGPASSWORD, as a user's would; the URLs the tests use carry none."""
    from tests.postgres import PASSWORD, start_server

    try:
        server = start_server()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or ""
        pytest.fail(f"cannot start a PostgreSQL server for the tests: {error} {detail}".strip())
    before = os.environ.get("PGPASSWORD")
    os.environ["PGPASSWORD"] = PASSWORD
    yield server
    server.stop()
    if before is None:
        os.environ.pop("PGPASSWORD", None)
    else:
        os.environ["PGPASSWORD"] = before


@pytest.fixture
def postgres_url(postgres: "PostgresServer") -> str:
    """A fresh, empty database on the session's server (its URL, without password)."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_backend(request: pytest.FixtureRequest) -> str | None:
    """Run a test on each catalog backend: None (the library's own SQLite file) or a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    """The one line a failed CLI command printed on stderr (exit code 1, no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]
