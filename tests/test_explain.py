"""`clipdex explain`: where in an image the query matches (README, "Why is this a hit").

The demo model on images of data/shapes.py's `pointing_scene` (one target shape among
clutter, its box known): the map's shape, its peak in displayed pixels (EXIF orientation
applied), the dense tower's ONNX export against torch, the pointing game, bad queries and
the CLI's output files.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.analysis.explain import PointingCase, inside, pointing_game
from clipdex.search.encoders.dense import ExplainUnsupported, tower_kind
from clipdex.search.encoders.dense_export import OnnxDenseEncoder, TorchDenseEncoder, export_dense_encoder, load_dense_export
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.errors import InvalidQuery, ItemNotFound
from clipdex.search.library import Library
from clipdex.search.query import Query

from conftest import one_line_error

ROOT = Path(__file__).resolve().parents[1]
DEMO = ModelSpec(str(ROOT / "data" / "demo-model" / "clipdex-demo.json"), str(ROOT / "data" / "demo-model" / "clipdex-demo.pt"))
SEED = 2026  # benchmarks/explain.py's seed: its first 200 scenes gave 0.86 (benchmarks/README.md, "explain")


def load_shapes():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("shapes", ROOT / "data" / "shapes.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules.setdefault("shapes", module)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


shapes = load_shapes()
SCENES = [shapes.pointing_scene(np.random.default_rng([SEED, index])) for index in range(8)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Library:
    folder = tmp_path_factory.mktemp("explain")
    photos = folder / "photos"
    photos.mkdir()
    for index, scene in enumerate(SCENES):
        scene.image.save(photos / f"{index}.png")
    library = Library.open(folder / "library", model=DEMO, create=True, device="cpu")
    assert index_paths(library, [photos]).added == len(SCENES)
    return library


def item_of(library: Library, name: str) -> int:
    return next(hit.id for hit in library.search(text="a shape", k=100) if hit.path and Path(hit.path).name == name)


def test_the_peak_points_at_the_target_in_displayed_pixels(demo: Library) -> None:
    hits = 0
    for index, scene in enumerate(SCENES):
        explanation = demo.explain(scene.query, item_of(demo, f"{index}.png"))
        assert (explanation.rows, explanation.cols) == (6, 6)  # the demo model's 96-pixel dense input, stride 16
        assert (explanation.width, explanation.height) == (128, 128)
        assert explanation.score == pytest.approx(float(np.dot(demo.encode_text(scene.query),
                                                                demo.encoder.encode_images([scene.image])[0])), abs=1e-4)
        hits += inside(explanation.peak, scene.box)
    assert hits >= 6


def test_an_exif_rotated_photo_gets_its_peak_in_displayed_coordinates(demo: Library, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed: rotated 90 degrees clockwise
    hits = 0
    for index, scene in enumerate(SCENES):
        stored = scene.image.transpose(Image.Transpose.ROTATE_90)  # 90 counter-clockwise as stored
        path = tmp_path / f"rotated-{index}.jpg"
        stored.save(path, quality=95, exif=exif.tobytes())
        explanation = demo.explain(scene.query, path=path)
        hits += inside(explanation.peak, scene.box)
    assert hits >= 6
    wide = tmp_path / "wide.jpg"
    SCENES[0].image.crop((0, 0, 128, 96)).transpose(Image.Transpose.ROTATE_90).save(wide, exif=exif.tobytes())
    explanation = demo.explain(SCENES[0].query, path=wide)
    assert (explanation.width, explanation.height) == (128, 96)  # stored 96 x 128, displayed 128 x 96


def test_the_onnx_export_gives_torch_features_and_runs_without_torch(demo: Library, tmp_path: Path, tiny_model: ModelSpec) -> None:
    for name, spec in (("resnet", DEMO), ("vit", tiny_model)):  # a ModifiedResNet tower and a ViT one
        folder = tmp_path / name
        folder.mkdir()
        torch_dense = TorchDenseEncoder(TorchClipEncoder(spec.resolve(), "cpu").load())
        settings = export_dense_encoder(torch_dense, folder, 0)
        exported = load_dense_export(folder, spec.resolve(), 0)
        assert exported is not None and settings.min_cosine >= 0.999
        for scene in SCENES[:3]:
            ours, theirs = exported.features(scene.image), torch_dense.features(scene.image)
            assert ours.shape == theirs.shape == (*settings.grid, ours.shape[-1])
            assert float(np.min(np.sum(ours * theirs, axis=-1))) >= 0.999
    item = item_of(demo, "0.png")
    expected = demo.explain(SCENES[0].query, item)  # the library's first explanation exports the dense tower
    assert isinstance(Library.open(demo.path).encoders.dense(), OnnxDenseEncoder)
    code = ("import sys; from clipdex import Library; "
            f"e = Library.open({str(demo.path)!r}).explain({SCENES[0].query!r}, {item}); "
            "print(e.peak[0], e.peak[1], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    x, y, torch_imported = result.stdout.split()
    assert (float(x), float(y)) == pytest.approx(expected.peak, abs=0.2) and torch_imported == "False"


@pytest.mark.slow  # 100 scenes: 10 to 40 s on a shared 2-core machine
def test_pointing_game_beats_the_centre() -> None:
    dense = TorchDenseEncoder(TorchClipEncoder(DEMO.resolve(), "cpu").load())
    scenes = [shapes.pointing_scene(np.random.default_rng([SEED, index])) for index in range(100)]
    texts = sorted({scene.query for scene in scenes})
    vectors = dict(zip(texts, dense.encoder.encode_texts(texts)))
    score = pointing_game([PointingCase(s.image, vectors[s.query], s.box) for s in scenes], dense.features)
    assert score.accuracy >= 0.8 and score.centre_accuracy <= 0.2


def test_bad_queries_and_ids(demo: Library, tmp_path: Path) -> None:
    with pytest.raises(ItemNotFound):
        demo.explain("a red circle", 999_999)
    with pytest.raises(InvalidQuery, match="exactly one image"):
        demo.explain("a red circle")
    with pytest.raises(InvalidQuery, match="exactly one image"):
        demo.explain("a red circle", 1, path=tmp_path / "x.png")
    with pytest.raises(InvalidQuery, match="empty"):
        demo.explain("   ", 1)
    with pytest.raises(InvalidQuery, match="at least one term"):
        demo.explain(None, 1)
    with pytest.raises(InvalidQuery, match="explain"):
        demo.explain("a red circle", 1, colour="red")  # type: ignore[call-arg]
    with pytest.raises(InvalidQuery, match="not both"):
        demo.explain(Query.build(text="a red circle"), 1, like=1)
    with pytest.raises(InvalidQuery, match="weights given for"):
        demo.explain("a red circle", 1, weights=[1, 2])


def test_cli_writes_json_and_the_overlay(demo: Library, tmp_path: Path) -> None:
    runner = CliRunner()
    item = item_of(demo, "0.png")
    overlay = tmp_path / "overlay.png"
    result = runner.invoke(app, ["explain", SCENES[0].query, "--item", str(item), "--out", str(overlay), "--json",
                                 "--library", str(demo.path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["item_id"] == item and len(data["grid"]) == data["rows"] == 6 and len(data["grid"][0]) == data["cols"] == 6
    expected = demo.explain(SCENES[0].query, item)
    assert data["peak"] == list(expected.peak) and data["grid"] == expected.grid and data["score"] == expected.score
    with Image.open(overlay) as written:
        assert written.format == "PNG" and written.size == (128, 128)
        assert np.asarray(written).tolist() != np.asarray(SCENES[0].image).tolist()  # the map is drawn on it
    mixed = runner.invoke(app, ["explain", SCENES[0].query, "--like", str(item), "--weight", "1", "--weight", "0.5",
                                "--path", str(Path(demo.path).parent / "photos" / "0.png"), "--library", str(demo.path)])
    assert mixed.exit_code == 0 and mixed.stdout.startswith("score ")
    assert "exactly one of --item" in one_line_error(runner.invoke(app, ["explain", "a red circle", "--library", str(demo.path)]))
    assert "999999" in one_line_error(runner.invoke(app, ["explain", "a red circle", "--item", "999999", "--library", str(demo.path)]))
    missing = tmp_path / "missing.jpg"
    assert "missing.jpg" in one_line_error(runner.invoke(app, ["explain", "a red circle", "--path", str(missing),
                                                               "--library", str(demo.path)]))


def test_a_tower_without_dense_features_says_so() -> None:
    class TimmModel:  # open_clip's timm towers (ConvNeXt ...) have no pooling layer to apply per position
        pass

    with pytest.raises(ExplainUnsupported, match="TimmModel"):
        tower_kind(SimpleNamespace(visual=TimmModel()))


def test_http_explain_needs_the_token_and_answers_bad_ids(demo: Library) -> None:
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    client = TestClient(create_app(demo, token="secret"))
    auth = {"Authorization": "Bearer secret"}
    item = item_of(demo, "1.png")
    body = {"item_id": item, "text": SCENES[1].query}
    assert client.post("/explain", json=body).status_code == 401
    assert client.post("/explain", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    answer = client.post("/explain", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    expected = demo.explain(SCENES[1].query, item)
    assert answer.json()["grid"] == expected.grid and answer.json()["peak"] == list(expected.peak)
    overlay = client.post("/explain/overlay?size=64", json=body, headers=auth)
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    with Image.open(__import__("io").BytesIO(overlay.content)) as picture:
        assert picture.size == (64, 64)
    assert client.post("/explain", json={**body, "item_id": 999_999}, headers=auth).status_code == 404
    assert client.post("/explain", json={**body, "item_id": 0}, headers=auth).status_code == 422
    assert client.post("/explain", json={**body, "item_id": "1"}, headers=auth).status_code == 422
    assert client.post("/explain", json={"item_id": item}, headers=auth).status_code == 422  # no term
    assert client.post("/explain", json={**body, "text": "  "}, headers=auth).status_code == 400
    assert client.post("/explain", json={**body, "like": [999_999]}, headers=auth).status_code == 404
    text_item = demo.add_texts(["a red circle"], ["explain:text"]).ids[0]
    refused = client.post("/explain", json={**body, "item_id": text_item}, headers=auth)
    assert refused.status_code == 400 and "is a text, not an image file" in refused.json()["detail"]


def test_a_video_is_explained_at_its_moment(tmp_path: Path) -> None:
    """A video hit is explained at the frame of its best moment (or `--at` one): each scene's
    query points at its own target in that scene's frame, in the video's pixels."""
    pytest.importorskip("av")
    spec = importlib.util.spec_from_file_location("media_samples", ROOT / "data" / "media_samples.py")
    samples = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(samples)  # type: ignore[union-attr]
    scenes = SCENES[:3]
    samples.write_video(tmp_path / "clips" / "scenes.mp4", [np.asarray(scene.image) for scene in scenes], seconds_each=4.0)
    library = Library.open(tmp_path / "library", model=DEMO, create=True, device="cpu")
    assert index_paths(library, [tmp_path / "clips"]).added == 1
    video = library.search(text="a shape", kind="video", k=1)[0].id
    hits = 0
    for index, scene in enumerate(scenes):
        explanation = library.explain(scene.query, video, timestamp=4.0 * index + 2.0)
        assert 4.0 * index + 2.0 <= explanation.timestamp < 4.0 * index + 2.5  # the frame at that moment
        assert (explanation.width, explanation.height) == (128, 128)
        hits += inside(explanation.peak, scene.box)
    assert hits >= 2
    best = library.explain(scenes[1].query, video)  # no moment given: the query's best, the hit's timestamp
    assert best.timestamp == pytest.approx(library.search(text=scenes[1].query, kind="video", k=1)[0].timestamp, abs=0.15)
    result = CliRunner().invoke(app, ["explain", scenes[2].query, "--item", str(video), "--at", "9", "--json",
                                      "--library", str(tmp_path / "library")])
    assert result.exit_code == 0, result.output
    assert 9.0 <= json.loads(result.stdout)["timestamp"] < 9.5
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    answer = TestClient(create_app(library)).post("/explain", json={"item_id": video, "text": scenes[0].query, "timestamp": 1.0})
    assert answer.status_code == 200 and 1.0 <= answer.json()["timestamp"] < 1.5, answer.text
    frame = next(item.id for item in library.catalog.get_items(range(1, 20)).values() if item.kind == "frame")
    with pytest.raises(InvalidQuery, match="a video's moment"):
        library.explain(scenes[0].query, frame)
    library.close()
