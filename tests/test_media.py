"""RAW photos and videos: generated DNGs (tifffile) and videos (PyAV) of data/shapes.py scenes,
decoded, indexed and found by their descriptions with the project's demo model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdex.indexer import index_paths
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.errors import UnreadableImage
from clipdex.search.library import Library
from clipdex.search.media.imaging import decode_image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "demo-model" / "clipdex-demo.json"
WEIGHTS = ROOT / "data" / "demo-model" / "clipdex-demo.pt"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


samples = _load("media_samples")


def demo_library(folder: Path) -> Library:
    return Library.open(folder, model=ModelSpec(str(MODEL), str(WEIGHTS)), create=True, device="cpu")


def tall_picture() -> np.ndarray:
    """An upright 160 x 240 picture whose halves differ (a scene above, another below): turned the wrong way it shows."""
    top, _ = samples.scene_picture(11, 0, 160)
    bottom, _ = samples.scene_picture(11, 1, 160)
    return np.concatenate([top[:120], bottom[:120]], axis=0)


def difference(image: Image.Image, upright: np.ndarray) -> float:
    resized = np.asarray(image.resize((upright.shape[1], upright.shape[0])), dtype=np.float32)
    return float(np.abs(resized - upright.astype(np.float32)).mean())


# -- RAW ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
@pytest.mark.parametrize("preview_side", [None, 140])
def test_a_raw_photo_decodes_upright_by_its_orientation(tmp_path: Path, orientation: int, preview_side: int | None) -> None:
    upright = tall_picture()
    path = samples.write_dng(tmp_path / "photo.dng", upright, orientation=orientation, preview_side=preview_side)
    decoded = decode_image(path, draft_size=128)
    assert decoded.source == ("preview" if preview_side else "demosaic")
    assert (decoded.width, decoded.height) == (160, 240)  # displayed, after the orientation
    assert decoded.image.size[1] > decoded.image.size[0]
    assert difference(decoded.image, upright) < 25, "the decoded picture is the upright one"
    assert difference(decoded.image, upright[::-1, ::-1]) > 40, "and not turned half way round"
    assert str(decoded.taken_at) == "2024-07-31 18:30:00"
    assert (decoded.camera_make, decoded.camera_model) == ("Clipdex", "Shapes Sensor 1")


def test_a_small_preview_is_not_used(tmp_path: Path) -> None:
    path = samples.write_dng(tmp_path / "photo.dng", tall_picture(), orientation=6, preview_side=100)
    assert decode_image(path, draft_size=128).source == "demosaic"  # shorter side 100 < 128 (twice a 64-px model)
    assert decode_image(path, draft_size=64).source == "preview"


def test_damaged_and_unsupported_raw_files_are_failed_with_a_reason(tmp_path: Path) -> None:
    good = samples.write_dng(tmp_path / "photos" / "good.dng", tall_picture())
    (tmp_path / "photos" / "cut.dng").write_bytes(good.read_bytes()[:300])
    (tmp_path / "photos" / "text.nef").write_bytes(b"this is not a raw photo at all" * 10)
    with pytest.raises(UnreadableImage, match="LibRaw"):
        decode_image(tmp_path / "photos" / "text.nef")
    library = demo_library(tmp_path / "library")
    report = index_paths(library, [tmp_path / "photos"])
    assert report.added == 1
    failed = {Path(failure.path).name: failure.error for failure in report.failed}
    assert set(failed) == {"cut.dng", "text.nef"}
    assert all("RAW" in reason for reason in failed.values()), failed


def test_raw_photos_are_found_by_their_description(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    captions = {}
    for index in range(8):
        picture, caption = samples.scene_picture(777, index, 192)
        orientation = (1, 6, 8, 3)[index % 4]  # stored sideways (and upside down) with an orientation flag
        name = f"{index:02d}.dng"
        samples.write_dng(photos / name, picture, orientation=orientation, preview_side=160 if index % 2 else None)
        captions[name] = caption
    library = demo_library(tmp_path / "library")
    report = index_paths(library, [photos])
    assert report.added == 8 and not report.failed
    ranks = []
    for name, caption in captions.items():
        hits = library.search(text=caption, k=8)
        ranks.append([Path(hit.path).name for hit in hits].index(name))
        assert hits[0].metadata["camera_model"] == "Shapes Sensor 1"
    assert sum(rank == 0 for rank in ranks) >= 6, ranks  # the demo model finds 7 of these 8 first (JPEGs alike)
    assert max(ranks) <= 3, ranks


def test_a_raw_beside_its_jpeg_is_one_photo_embedded_from_the_jpeg(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    pictures = {index: samples.scene_picture(303, index, 128) for index in range(3)}
    samples.write_dng(photos / "IMG_1.dng", pictures[1][0])
    Image.fromarray(pictures[1][0]).save(photos / "IMG_1.jpg")
    samples.write_dng(photos / "IMG_2.dng", pictures[2][0])  # a RAW alone
    library = demo_library(tmp_path / "library")
    report = index_paths(library, [photos])
    assert (report.added, report.failed) == (2, [])
    hits = {Path(hit.path).name: hit for hit in library.search(text=pictures[1][1], k=5)}
    assert set(hits) == {"IMG_1.jpg", "IMG_2.dng"}, "the pair is found once, as its JPEG"
    assert hits["IMG_1.jpg"].metadata["pair"] == str(photos / "IMG_1.dng")
    assert "pair" not in hits["IMG_2.dng"].metadata
    vector = library.catalog.get_item(hits["IMG_1.jpg"].id).vector

    # the RAW changes: nothing to re-embed (the photo was embedded from the JPEG)
    samples.write_dng(photos / "IMG_1.dng", pictures[0][0])
    report = index_paths(library, [photos])
    assert (report.added, report.updated, report.removed, report.unchanged) == (0, 0, 0, 2)
    # the JPEG changes: re-embedded
    Image.fromarray(pictures[0][0]).save(photos / "IMG_1.jpg")
    report = index_paths(library, [photos])
    assert (report.added, report.updated, report.unchanged) == (0, 1, 1)
    assert library.catalog.get_item(hits["IMG_1.jpg"].id).vector != vector
    # the RAW goes: the JPEG stays the same item, without a pair
    (photos / "IMG_1.dng").unlink()
    report = index_paths(library, [photos])
    assert (report.added, report.updated, report.removed) == (0, 1, 0)
    assert "pair" not in library.catalog.get_item(hits["IMG_1.jpg"].id).metadata_dict()
    # a JPEG appears beside the RAW that was alone: one item, the RAW's own item removed
    Image.fromarray(pictures[2][0]).save(photos / "IMG_2.JPG")
    report = index_paths(library, [photos])
    assert (report.added, report.removed) == (1, 1)
    paths = {Path(hit.path).name: hit.metadata.get("pair") for hit in library.search(text=pictures[2][1], k=5)}
    assert paths == {"IMG_1.jpg": None, "IMG_2.JPG": str(photos / "IMG_2.dng")}
