"""Stored vectors are open_clip's own: preprocess + encode_*(normalize=True), cosine >= 0.999."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from clipdex.indexer import index_paths
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec


def photo_like(path: Path, seed: int, size: tuple[int, int], orientation: int | None = None) -> Path:
    """A smooth, photo-like JPEG (noise alone would be unlike any photo)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    image = small.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=92, exif=exif.tobytes())
    return path


def reference_image_vectors(spec: ModelSpec, paths: list[Path]) -> np.ndarray:
    import open_clip
    import torch

    resolved = spec.resolve()
    if resolved.config_path:
        open_clip.add_model_config(resolved.config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(resolved.name, pretrained=resolved.checkpoint)
    model.eval()
    batch = torch.stack([preprocess(ImageOps.exif_transpose(Image.open(p)).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.encode_image(batch, normalize=True).numpy()


def test_image_vectors_match_open_clip(library: Library, tiny_model: ModelSpec, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [photo_like(folder / f"p{i}.jpg", i, (1200, 900) if i % 2 else (900, 1200), orientation=(6 if i == 3 else None)) for i in range(6)]
    paths.append(photo_like(folder / "small.jpg", 99, (50, 40)))
    index_paths(library, [folder])
    expected = reference_image_vectors(tiny_model, paths)
    by_path = {hit.path: hit for hit in library.search(like=[1], k=len(paths))}
    items = {item.path: item.vector_array() for item in library.catalog.get_items([h.id for h in by_path.values()]).values()}
    for path, reference in zip(paths, expected):
        cosine = float(np.dot(items[str(path)], reference))
        assert cosine >= 0.999, (path.name, cosine)
    rotated = library.get_item(library.search(image=paths[3], k=1)[0].id)
    assert (rotated.metadata["width"], rotated.metadata["height"]) == (900, 1200)


def test_text_vectors_match_open_clip(library: Library, tiny_model: ModelSpec) -> None:
    import open_clip
    import torch

    texts = ["a dog on the beach", "a red circle", "ein Hund am Strand"]
    resolved = tiny_model.resolve()
    open_clip.add_model_config(resolved.config_path)
    model, _, _ = open_clip.create_model_and_transforms(resolved.name, pretrained=resolved.checkpoint)
    model.eval()
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer(resolved.name)(texts), normalize=True).numpy()
    for text, reference in zip(texts, expected):
        assert float(np.dot(library.encode_text(text), reference)) >= 0.999
        # the second time comes from the library's query cache
        assert float(np.dot(library.encode_text(text), reference)) >= 0.999


@pytest.mark.slow
def test_vit_b_32_fidelity_with_draft_decoding(tmp_path: Path) -> None:
    """The full-size architecture, random weights saved to a checkpoint: draft JPEG decoding stays exact enough."""
    import open_clip
    import torch

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    checkpoint = tmp_path / "vit-b-32-random.pt"
    torch.save(model.state_dict(), checkpoint)
    spec = ModelSpec("ViT-B-32", str(checkpoint))
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [photo_like(folder / f"p{i}.jpg", i, (4000, 3000)) for i in range(3)]
    library = Library.open(tmp_path / "lib", model=spec, create=True, device="cpu")
    index_paths(library, [folder])
    expected = reference_image_vectors(spec, paths)
    for path, reference in zip(paths, expected):
        hit = library.search(image=path, k=1)[0]
        stored = library.catalog.get_item(hit.id).vector_array()
        assert hit.path == str(path)
        assert float(np.dot(stored, reference)) >= 0.999
