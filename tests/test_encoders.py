"""The encoder interface: numpy at the boundary, and one place that picks the encoder for text queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.search.encoders.factory import LibraryEncoders, create_encoder
from clipdex.search.encoders.onnx_text import OnnxTextEncoder
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.encoders.model import ModelSpec
from tests.conftest import write_image


class DictCache:
    """A query cache as a Library passes one in, counting what it is asked."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.gets = 0

    def get(self, text: str) -> np.ndarray | None:
        self.gets += 1
        return self.vectors.get(text)

    def put(self, text: str, vector: np.ndarray) -> None:
        self.vectors[text] = vector


def test_prepared_pixels_encode_as_the_images_do(tiny_model: ModelSpec, tmp_path: Path) -> None:
    encoder = create_encoder(tiny_model.resolve(), "cpu")
    assert isinstance(encoder, TorchClipEncoder) and not encoder.loaded
    images = [Image.open(write_image(tmp_path / f"{seed}.png", seed, (60, 45))).convert("RGB") for seed in range(3)]
    prepared = [encoder.prepare(image) for image in images]
    assert all(type(pixels) is np.ndarray and pixels.dtype == np.float32 for pixels in prepared)
    assert prepared[0].shape == (3, encoder.image_size, encoder.image_size)
    vectors = encoder.encode_prepared(np.stack(prepared))
    assert vectors.dtype == np.float32 and vectors.shape == (3, encoder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors, encoder.encode_images(images))


def test_an_unknown_device_is_refused(tiny_model: ModelSpec) -> None:
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        create_encoder(tiny_model.resolve(), "tpu")


def test_text_queries_use_the_cache_then_the_model_then_the_export(tiny_model: ModelSpec, tmp_path: Path) -> None:
    model = tiny_model.resolve()
    cache = DictCache()
    encoders = LibraryEncoders(tmp_path, model, 32, "cpu", cache)
    assert not encoders.model_loaded
    vector = encoders.encode_text("a red circle")  # no export yet: the model, which then exports its text tower
    assert encoders.model_loaded and isinstance(encoders.text(), TorchClipEncoder)
    assert np.array_equal(cache.vectors["a red circle"], vector)
    cache.vectors["a red circle"] = np.ones(32, dtype=np.float32)
    assert np.array_equal(encoders.encode_text("a red circle"), np.ones(32, dtype=np.float32))
    cache.vectors["a wrong size"] = np.ones(16, dtype=np.float32)  # another model's: not used
    assert encoders.encode_text("a wrong size").shape == (32,)

    fresh = LibraryEncoders(tmp_path, model, 32, "cpu")  # another process: the export answers, the model stays out
    assert isinstance(fresh.text(), OnnxTextEncoder)
    assert float(fresh.encode_text("a blue square") @ encoders.image_text.encode_texts(["a blue square"])[0]) >= 0.999
    assert not fresh.model_loaded


def test_a_model_with_a_checkpoint_skips_random_init_and_loads_every_weight(tiny_model: ModelSpec) -> None:
    import threading

    import open_clip
    import torch

    from clipdex.search.encoders.torch_clip import TorchClipEncoder, _weights_left_uninitialized

    resolved = tiny_model.resolve()
    ours = TorchClipEncoder(resolved, "cpu").load().model.state_dict()
    theirs = open_clip.create_model(resolved.name, pretrained=resolved.checkpoint).state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in theirs)

    elsewhere: list[float] = []
    with _weights_left_uninitialized(True):
        here = torch.nn.init.normal_(torch.zeros(1000))
        thread = threading.Thread(target=lambda: elsewhere.append(float(torch.nn.init.normal_(torch.zeros(1000)).std())))
        thread.start()
        thread.join()
    assert float(here.abs().max()) == 0.0  # skipped in the thread that builds the model
    assert elsewhere[0] > 0.5  # another thread's initialization is untouched
    assert float(torch.nn.init.normal_(torch.zeros(1000)).std()) > 0.5  # and so is this one's, afterwards


@pytest.mark.parametrize("cached", [None, "open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_a_tags_weights_are_looked_up_in_the_hub_cache_without_torch(tmp_path: Path, cached: str | None) -> None:
    """What `ensure_weights` finds offline in the Hugging Face cache (as open_clip's download would: the
    .safetensors file first), in a process of its own that never imports torch."""
    import os
    import subprocess
    import sys

    if cached is not None:
        repository = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
        (repository / "refs").mkdir(parents=True)
        (repository / "refs" / "main").write_text("0123abcd")
        (repository / "snapshots" / "0123abcd").mkdir(parents=True)
        (repository / "snapshots" / "0123abcd" / cached).write_bytes(b"weights")
    script = ("import sys\n"
              "from clipdex.search.encoders.weights import ensure_weights\n"
              "from clipdex.search.errors import ModelUnavailable\n"
              "from clipdex.search.encoders.model import ModelSpec\n"
              "try:\n    ensure_weights(ModelSpec('ViT-B-32', 'laion2b_s34b_b79k').resolve())\n    print('found')\n"
              "except ModelUnavailable as error:\n    print('unavailable:', error)\n"
              "print(sorted(name for name in ('torch', 'open_clip', 'safetensors.torch') if name in sys.modules))\n")
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120)
    lines = done.stdout.splitlines()
    assert lines[-1] == "[]", done.stderr
    if cached is None:
        assert lines[0].startswith("unavailable: cannot fetch the weights of model ViT-B-32 (pretrained tag "
                                   "'laion2b_s34b_b79k'): they are not in this machine's cache, and HF_HUB_OFFLINE is set")
    else:
        assert lines[0] == "found"
