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
