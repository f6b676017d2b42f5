"""A long thin image (1 pixel by hundreds of thousands: a PNG of a few kilobytes, under every
pixel limit) costs what the model needs of it on every path: the preprocessing itself, an index
run, a query image from the CLI or over HTTP, thumbnails, the tensor decode path.

open_clip's transform resizes the shorter side to the model's input before its center crop: of
a 1x300000 image that is 32 x 9.6 million pixels for the tiny test model and 224 x 67 million
(60 GB) for ViT-B-32. Only the middle of the long side is resized now, and the model sees the
same square. Paths that run in this process check every resize before it allocates
(`bounded_resizes`); whole commands run in a child process under a memory limit.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipdex.indexer import index_paths
from clipdex.search.encoders.preprocess import ImagePreprocess
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.http import create_app
from clipdex.search.library import Library
from clipdex.search.media.gpu_decode import TensorTransform, decode_batch
from clipdex.search.media.imaging import MAX_RESIZED_PIXELS, decode_image
from clipdex.search.encoders.model import ModelSpec

# Above what any path may make (a 1024-pixel thumbnail; the model's resize, MAX_RESIZED_PIXELS),
# far below what a thin image's whole resize takes (307 million pixels with the tiny model).
RESIZE_BOUND = 10_000_000
TINY_SIZE = 32  # the tiny test model's input


def thin_image(width: int, height: int) -> Image.Image:
    """A greyscale stripe with a pattern along it (so that which part is kept shows)."""
    long = max(width, height)
    values = ((np.arange(long) * 7) % 251).astype(np.uint8)
    pixels = values.reshape(long, 1) if height >= width else values.reshape(1, long)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(pixels, (height, width))), "L")


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


@pytest.fixture
def bounded_resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every Pillow resize in this process (open_clip's, the port's, thumbnails'), checked before
    it allocates: one over RESIZE_BOUND pixels raises MemoryError instead of taking gigabytes."""
    original = Image.Image.resize
    sizes: list[tuple[int, int]] = []

    def resize(self: Image.Image, size: Any, *args: Any, **kwargs: Any) -> Image.Image:
        width, height = (int(side) for side in size)
        sizes.append((width, height))
        if width * height > RESIZE_BOUND:
            raise MemoryError(f"a resize of {self.width}x{self.height} to {width}x{height} pixels")
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    return sizes


def middle(image: Image.Image, image_size: int = TINY_SIZE) -> Image.Image:
    """The part of a thin image the model's preprocessing keeps: the middle of its long side,
    as long as resizing it makes at most MAX_RESIZED_PIXELS pixels."""
    width, height = image.size
    keep = MAX_RESIZED_PIXELS * min(width, height) // image_size**2
    start = (max(width, height) - keep) // 2
    return image.crop((0, start, width, start + keep) if height > width else (start, 0, start + keep, height))


@pytest.mark.parametrize("size", [(1, 300_000), (300_000, 1), (3, 200_000)], ids=["tall", "wide", "three-wide"])
def test_the_model_sees_open_clips_transform_of_the_middle(tiny_model: ModelSpec, bounded_resizes: list, size: tuple[int, int]) -> None:
    """The torch encoder (open_clip's own transform) and the numpy port give open_clip's
    preprocessing of the middle of the image, without resizing the rest."""
    image = thin_image(*size).convert("RGB")
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    expected = encoder.preprocess(middle(image)).numpy()  # open_clip's transform of the part kept
    port = ImagePreprocess.of_open_clip_model(encoder.model)
    np.testing.assert_allclose(encoder.prepare(image), expected, atol=1e-5)
    np.testing.assert_allclose(port(image), expected, atol=1e-4)
    vector = encoder.encode_images([image])[0]
    assert float(np.dot(vector, encoder.encode_images([middle(image)])[0])) > 0.9999
    assert max(width * height for width, height in bounded_resizes) <= MAX_RESIZED_PIXELS


def test_images_within_the_limit_are_preprocessed_whole(tiny_model: ModelSpec, bounded_resizes: list) -> None:
    """Up to MAX_RESIZED_PIXELS made by the resize (at 32 pixels: 7812:1), an image is open_clip's as ever."""
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    port = ImagePreprocess.of_open_clip_model(encoder.model)
    longest = MAX_RESIZED_PIXELS // TINY_SIZE**2
    for size in [(1, longest), (3 * longest, 3), (4000, 1000)]:
        image = thin_image(*size).convert("RGB")
        assert port(image).shape == (3, TINY_SIZE, TINY_SIZE)
        np.testing.assert_allclose(port(image), encoder.preprocess(image).numpy(), atol=1e-4)
    assert (TINY_SIZE, TINY_SIZE * longest) in bounded_resizes  # the first was resized whole


MEMORY_LIMIT = 1 << 30  # the address space of a child's heap: Python, numpy and Pillow need a tenth of it


def test_the_numpy_preprocessing_of_a_thin_image_fits_in_little_memory() -> None:
    """At ViT-B-32's 224 pixels, in a process that may not allocate 1 GiB: a 1x2000000 image
    resized whole would take 224 x 448 million pixels."""
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_DATA, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        import numpy as np
        from PIL import Image
        from clipdex.search.encoders.preprocess import DEFAULT_MEAN, DEFAULT_STD, ImagePreprocess
        image = Image.new("L", (1, 2_000_000), 128).convert("RGB")
        pixels = ImagePreprocess(224, DEFAULT_MEAN, DEFAULT_STD)(image)
        print(pixels.shape, bool(np.isfinite(pixels).all()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(3, 224, 224) True"


def limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


def clipdex_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limited_memory)


def test_index_and_search_by_a_thin_image_in_bounded_memory(tmp_path: Path, make_images: Callable, model_args: list[str]) -> None:
    """Under a 3 GiB limit: the whole resize of a 1x2000000 PNG would take 8 GB with the tiny
    model (a MemoryError: the file reported as failed, the search a traceback)."""
    make_images(tmp_path / "pics", 2)
    thin = tmp_path / "pics" / "thin.png"
    thin.write_bytes(encoded(thin_image(1, 2_000_000)))
    assert thin.stat().st_size < 50_000
    library = str(tmp_path / "lib")
    indexed = clipdex_process("index", str(tmp_path / "pics"), "--library", library, "--json", "--quiet", *model_args)
    assert indexed.returncode == 0, indexed.stderr[-2000:]
    report = json.loads(indexed.stdout)
    assert (report["added"], report["failed"]) == (3, []), report
    for runtime in ("onnx", "torch"):
        searched = clipdex_process("search", "--image", str(thin), "--library", library, "--runtime", runtime, "--format", "paths")
        assert searched.returncode == 0, searched.stderr[-2000:]
        assert searched.stdout.splitlines()[0] == str(thin)


def test_an_upload_and_a_thumbnail_of_a_thin_image(library: Library, tmp_path: Path, make_images: Callable,
                                                   bounded_resizes: list) -> None:
    make_images(tmp_path / "pics", 2)
    thin = tmp_path / "pics" / "thin.png"
    thin.write_bytes(encoded(thin_image(1, 300_000)))
    index_paths(library, [tmp_path / "pics"])
    client = TestClient(create_app(library), raise_server_exceptions=False)
    response = client.post("/search/image", files={"image": ("thin.png", thin.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["hits"][0]["path"] == str(thin)
    item = response.json()["hits"][0]["id"]
    thumbnail = client.get(f"/items/{item}/thumbnail", params={"size": 1024})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (1, 1024)


def test_the_tensor_path_resizes_only_the_middle(tiny_model: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's decode path, run on the CPU: a 1x60000 JPEG (nearly the most JPEG allows) would
    be resized whole to 32 x 1.9 million floats, 224 x 13 million on a real model's GPU."""
    from torchvision.transforms.v2 import functional

    original = functional.resize
    sizes: list[tuple[int, ...]] = []

    def resize(image: Any, size: list[int], *args: Any, **kwargs: Any) -> Any:
        height, width = image.shape[-2:]
        short, long = min(height, width), max(height, width)
        sizes.append((short, long))
        if size[0] * int(size[0] * long / short) > RESIZE_BOUND:
            raise MemoryError(f"a resize of {width}x{height} to a short side of {size[0]}")
        return original(image, size, *args, **kwargs)

    monkeypatch.setattr(functional, "resize", resize)
    data = encoded(thin_image(1, 60_000).convert("RGB"), "JPEG")
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    transform = TensorTransform.from_open_clip(encoder.preprocess)
    assert transform is not None
    batch = decode_batch([data], "cpu", transform.resize_to, transform.mean, transform.std, transform.crop_size)
    assert batch.fallbacks == {} and tuple(batch.tensors.shape) == (1, 3, 32, 32)
    assert sizes == [(1, MAX_RESIZED_PIXELS // TINY_SIZE**2)]
    cpu_path = encoder.encode_images([decode_image(data).image])[0]
    assert float(np.dot(encoder.encode_tensors(batch.tensors)[0], cpu_path)) >= 0.999

