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
from tests.test_browser import browser  # noqa: F401  (the fixture: the system's chromium through Playwright)

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
    assert failed["cut.dng"].startswith("truncated or damaged RAW photo"), failed
    assert failed["text.nef"].startswith("not a RAW photo LibRaw can read"), failed


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
    (tmp_path / "jpegs").mkdir()
    for index in range(8):  # the same pictures as upright JPEGs: what the model makes of them without a RAW
        Image.fromarray(samples.scene_picture(777, index, 192)[0]).save(tmp_path / "jpegs" / f"{index:02d}.jpg")
    jpegs = demo_library(tmp_path / "jpeg-library")
    assert index_paths(jpegs, [tmp_path / "jpegs"]).added == 8
    ranks, jpeg_ranks = [], []
    for name, caption in captions.items():
        hits = library.search(text=caption, k=8)
        ranks.append([Path(hit.path).name for hit in hits].index(name))
        assert hits[0].metadata["camera_model"] == "Shapes Sensor 1"
        jpeg_ranks.append([Path(hit.path).stem for hit in jpegs.search(text=caption, k=8)].index(Path(name).stem))
    assert sum(rank == 0 for rank in ranks) >= 6, ranks  # the demo model finds 7 of these 8 first
    assert all(rank <= jpeg + 1 for rank, jpeg in zip(ranks, jpeg_ranks)), (ranks, jpeg_ranks)  # as found as the JPEGs


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


# -- videos ------------------------------------------------------------------------------------

SCENE_SECONDS = 3.0


def scenes_video(path: Path, seed: int = 31, count: int = 4, black_intro: bool = True, **options) -> list[str]:
    """A video of `count` shapes scenes of SCENE_SECONDS each (after a black second, which must never be a moment)."""
    scenes = [samples.scene_picture(seed, index, 160) for index in range(count)]
    pictures = [picture for picture, _ in scenes]
    if black_intro:
        pictures = [np.zeros_like(pictures[0])] + pictures
    samples.write_video(path, pictures, seconds_each=SCENE_SECONDS, **options)
    return [caption for _, caption in scenes]


def scene_span(index: int, black_intro: bool = True) -> tuple[float, float]:
    start = (index + black_intro) * SCENE_SECONDS
    return start, start + SCENE_SECONDS


def test_a_video_is_found_at_the_moment_each_scene_shows(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from clipdex.cli.main import app

    captions = scenes_video(tmp_path / "media" / "party.mp4")
    picture, photo_caption = samples.scene_picture(32, 0, 128)
    Image.fromarray(picture).save(tmp_path / "media" / "photo.jpg")
    library = demo_library(tmp_path / "library")
    report = index_paths(library, [tmp_path / "media"])
    assert (report.added, report.failed) == (2, [])
    for index, caption in enumerate(captions):
        hits = library.search(text=caption, k=3)
        assert [hit.kind for hit in hits] == ["video", "image"], "the video is one hit, however many moments match"
        start, end = scene_span(index)
        assert start <= hits[0].timestamp < end, (caption, hits[0].timestamp)
        assert hits[0].metadata["duration"] == pytest.approx(15.0, abs=0.2)
    assert all(hit.kind == "image" for hit in library.search(text=captions[0], kind="image", k=3))
    assert [hit.kind for hit in library.search(text=photo_caption, kind="video", k=3)] == ["video"]

    runner = CliRunner()
    arguments = ["search", captions[2], "--library", str(tmp_path / "library"), "-k", "1"]
    result = runner.invoke(app, [*arguments, "--json", "--per-video", "3"])
    assert result.exit_code == 0, result.output
    hit = __import__("json").loads(result.output)[0]
    assert (hit["kind"], hit["path"]) == ("video", str(tmp_path / "media" / "party.mp4"))
    assert scene_span(2)[0] <= hit["timestamp"] < scene_span(2)[1]
    assert len(hit["moments"]) == 3 and hit["moments"][0]["timestamp"] == hit["timestamp"]
    assert all(moment["timestamp"] >= SCENE_SECONDS for moment in hit["moments"]), "never the black intro"
    table = runner.invoke(app, arguments)
    assert table.exit_code == 0 and f"party.mp4 @ 00:{int(hit['timestamp']):02d}" in table.output, table.output
    page = tmp_path / "hits.html"
    assert runner.invoke(app, [*arguments, "--format", "html", "--out", str(page)]).exit_code == 0
    assert f"party.mp4#t={hit['timestamp']:.2f}" in page.read_text()
    shown = runner.invoke(app, [*arguments, "--preview=kitty"])  # the video hit drawn as its frame at the moment
    assert shown.exit_code == 0 and shown.stdout.count("\x1b_Ga=T,f=100") == 1, shown.output
    from clipdex.search.http.media import ThumbnailCache

    video = library.catalog.get_items([hit["id"]])[hit["id"]]
    assert any(ThumbnailCache(library.path).path_for(video, size, hit["timestamp"]).exists() for size in (64, 128, 256))


def test_videos_are_indexed_incrementally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clipdex.indexer.rules as rules

    media = tmp_path / "media"
    captions = scenes_video(media / "a.mp4", black_intro=False)
    library = demo_library(tmp_path / "library")
    assert index_paths(library, [media]).added == 1
    video = library.search(text=captions[1], k=1)[0]
    frames = library.catalog.frames_of([video.id])[video.id]
    assert len(frames) >= 4
    assert library.check()["ok"] and library.vectors.ntotal == 1 + len(frames), "each moment is a vector"

    opened = []
    sample_video = rules.sample_video
    monkeypatch.setattr(rules, "sample_video", lambda *args, **kw: opened.append(args) or sample_video(*args, **kw))
    report = index_paths(library, [media])
    assert (report.unchanged, opened) == (1, []), "an unchanged video is not opened again"
    (media / "a.mp4").rename(media / "b.mp4")
    report = index_paths(library, [media])
    assert (report.moved, report.added, report.removed, opened) == (1, 0, 0, [])
    moved = library.search(text=captions[1], k=1)[0]
    assert (moved.id, moved.path, moved.timestamp) == (video.id, str(media / "b.mp4"), video.timestamp)

    new_captions = scenes_video(media / "b.mp4", seed=77, count=2, black_intro=False)  # changed: sampled again
    report = index_paths(library, [media])
    assert (report.updated, len(opened)) == (1, 1)
    assert library.catalog.frames_of([video.id])[video.id] != frames
    assert library.check()["ok"], "the vector index holds the new moments, not the old"
    assert library.catalog.counts()["frame"] == len(library.catalog.frames_of([video.id])[video.id]) < len(frames)
    hit = library.search(text=new_captions[1], k=1)[0]
    assert hit.id == video.id and scene_span(1, False)[0] <= hit.timestamp < scene_span(1, False)[1]

    (media / "b.mp4").unlink()
    Image.fromarray(samples.scene_picture(1, 0, 64)[0]).save(media / "keep.jpg")
    report = index_paths(library, [media])
    assert report.removed == 1
    assert library.catalog.counts()["frame"] == 0 and library.catalog.counts()["video"] == 0, "its moments went with it"
    assert library.check()["ok"] and library.vectors.ntotal == 1


def test_bad_videos_are_failed_with_a_reason_and_a_bad_frame_costs_only_itself(tmp_path: Path) -> None:
    import av

    media = tmp_path / "media"
    scenes_video(media / "good.mp4", black_intro=False)
    (media / "cut.mp4").write_bytes((media / "good.mp4").read_bytes()[:400])
    (media / "notes.mkv").write_text("not a video\n" * 50)
    with av.open(str(media / "song.m4a.mp4"), "w") as container:  # audio only, with a video extension
        stream = container.add_stream("aac", rate=8000)
        for index in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    # a damaged stretch in the middle of a video whose every second is a keyframe
    captions = scenes_video(media / "damaged.mp4", seed=5, count=4, black_intro=False, keyframe_seconds=1.0)
    data = bytearray((media / "damaged.mp4").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 3000] = bytes(3000)
    (media / "damaged.mp4").write_bytes(bytes(data))

    library = demo_library(tmp_path / "library")
    report = index_paths(library, [media])
    failed = {Path(failure.path).name: failure.error for failure in report.failed}
    assert set(failed) == {"cut.mp4", "notes.mkv", "song.m4a.mp4"}, failed
    assert "no video stream" in failed["song.m4a.mp4"] and "audio" in failed["song.m4a.mp4"]
    assert report.added == 2
    found = [library.search(text=caption, kind="video", k=2) for caption in (captions[0], captions[3])]
    assert all(Path(hits[0].path).name == "damaged.mp4" for hits in found), "the scenes around the damage are found"


def test_a_portrait_video_is_sampled_upright(tmp_path: Path) -> None:
    from clipdex.search.media.video import sample_video

    upright = tall_picture()  # 160 wide, 240 tall
    stored = np.ascontiguousarray(np.rot90(upright, -1))  # turned a quarter clockwise; shown turned back
    samples.write_video(tmp_path / "portrait.mp4", [stored], seconds_each=1.0, rotation=90)
    video = sample_video(tmp_path / "portrait.mp4")
    assert (video.width, video.height) == (160, 240)
    assert difference(video.frames[0][1], upright) < 25


def test_video_hits_over_http_and_the_file_in_ranges(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from clipdex.search.http.app import create_app

    captions = scenes_video(tmp_path / "media" / "clip.mp4")
    library = demo_library(tmp_path / "library")
    index_paths(library, [tmp_path / "media"])
    client = TestClient(create_app(library))
    response = client.post("/search", json={"text": captions[1], "kind": "video", "k": 1, "per_video": 2})
    assert response.status_code == 200, response.text
    hit = response.json()["hits"][0]
    assert hit["kind"] == "video" and scene_span(1)[0] <= hit["timestamp"] < scene_span(1)[1]
    assert hit["metadata"]["duration"] == pytest.approx(15.0, abs=0.2) and len(hit["moments"]) == 2
    assert client.post("/search", json={"text": captions[1], "kind": "image"}).json()["hits"] == []

    data = (tmp_path / "media" / "clip.mp4").read_bytes()
    whole = client.get(f"/items/{hit['id']}/file")
    assert (whole.status_code, whole.content, whole.headers["accept-ranges"]) == (200, data, "bytes")
    assert whole.headers["content-type"] == "video/mp4"
    part = client.get(f"/items/{hit['id']}/file", headers={"Range": "bytes=100-1099"})
    assert (part.status_code, part.content) == (206, data[100:1100])
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    tail = client.get(f"/items/{hit['id']}/file", headers={"Range": "bytes=-50"})
    assert (tail.status_code, tail.content) == (206, data[-50:])
    assert client.get(f"/items/{hit['id']}/file", headers={"Range": f"bytes={len(data)}-"}).status_code == 416

    frame = client.get(f"/items/{hit['id']}/thumbnail", params={"size": 128, "t": hit["timestamp"]})
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    import io

    shown = Image.open(io.BytesIO(frame.content)).convert("RGB")
    picture = samples.scene_picture(31, 1, 160)[0]
    assert difference(shown, picture) < 25, "the thumbnail is the frame at the hit's moment"


def test_migration_4_keeps_a_catalogs_items_and_id_counter_and_takes_videos(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import clipdex.search.catalog.database as database
    from clipdex.search.catalog.types import NewItem

    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    monkeypatch.setattr(database, "MIGRATIONS", database.MIGRATIONS[:3])
    database.Catalog(url, vector_dim=4).close()  # a catalog of schema 3, its rows written as that version's code did
    import sqlite3

    with sqlite3.connect(tmp_path / "catalog.sqlite") as connection:
        blob = np.ones(4, np.float32).tobytes()
        ids = [int(connection.execute("INSERT INTO items (kind, path, vector, indexed_at) VALUES ('image', ?, ?, 0)",
                                      (f"/p/{n}.jpg", blob)).lastrowid or 0) for n in range(3)]
        connection.execute("DELETE FROM items WHERE id = ?", (ids[-1],))  # the highest id is gone: never to be given again
    monkeypatch.undo()
    catalog = database.Catalog(url, vector_dim=4)
    assert sorted(catalog.get_items(ids)) == ids[:2]
    video = NewItem(kind="video", vector=np.ones(4), path="/p/v.mp4", frames=[(0.0, np.ones(4)), (4.0, -np.ones(4))])
    new = catalog.commit_batch(items=[video]).ids[0]
    assert new > ids[-1]
    assert [seconds for seconds, _ in catalog.frames_of([new])[new]] == [0.0, 4.0]
    assert catalog.counts() == {"image": 2, "text": 0, "video": 1, "frame": 2}
    assert catalog.commit_batch(remove_ids=[new]) and catalog.counts()["frame"] == 0
    assert catalog.get_items(ids[:1])[ids[0]].path == "/p/0.jpg"


def test_without_rawpy_or_pyav_the_files_fail_naming_the_extra_to_install(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    samples.write_dng(tmp_path / "media" / "photo.dng", tall_picture())
    scenes_video(tmp_path / "media" / "clip.mp4", count=1, black_intro=False)
    monkeypatch.setitem(sys.modules, "rawpy", None)  # import rawpy raises ImportError
    monkeypatch.setitem(sys.modules, "av", None)
    report = index_paths(demo_library(tmp_path / "library"), [tmp_path / "media"])
    failed = {Path(failure.path).name: failure.error for failure in report.failed}
    assert failed == {"photo.dng": "RAW photos need rawpy: pip install 'clipdex[raw]'",
                      "clip.mp4": "videos need PyAV: pip install 'clipdex[video]'"}


@pytest.mark.parametrize("backend", ["sqlite", "local", "postgresql"])
def test_every_catalog_stores_videos_and_filters_their_moments_alike(tmp_path: Path, backend: str,
                                                                     request: pytest.FixtureRequest) -> None:
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.catalog.local import LocalCatalog
    from clipdex.search.catalog.types import NewItem
    from clipdex.search.query import Filters

    if backend == "postgresql":
        catalog = Catalog(request.getfixturevalue("postgres").new_database(), vector_dim=4)
    else:
        Catalog(tmp_path / "catalog.sqlite", vector_dim=4).close()  # made and migrated
        catalog = LocalCatalog(tmp_path / "catalog.sqlite", vector_dim=4) if backend == "local" else \
            Catalog(tmp_path / "catalog.sqlite", vector_dim=4)
    one = np.ones(4, dtype=np.float32)
    photo, video = catalog.commit_batch(items=[
        NewItem(kind="image", vector=one, path="/trip/a.jpg", width=640, height=480),
        NewItem(kind="video", vector=one, path="/party/v.mp4", width=1920, height=1080,
                frames=[(0.0, one), (4.0, one), (8.0, -one)]),
    ]).ids
    frames = sorted(i for i in map(int, catalog.ids("frame")))
    assert len(frames) == 3 and catalog.counts() == {"image": 1, "text": 0, "video": 1, "frame": 3}

    def ids(**filters) -> set[int] | None:
        found = catalog.filtered_ids(Filters(**filters))
        return None if found is None else set(map(int, found))

    assert ids() is None
    assert ids(kind="video") == {video, *frames}
    assert ids(kind="image") == {photo}
    assert ids(path="/party/*") == {video, *frames}, "a video's moments pass what their video passes"
    assert ids(path="/trip/*") == {photo}
    assert ids(min_width=1000) == {video, *frames}
    assert ids(kind="video", path="/trip/*") == set()
    replaced = catalog.commit_batch(items=[NewItem(kind="video", vector=one, id=video, path="/party/v.mp4",
                                                   frames=[(1.0, one)])])
    assert replaced.frames_changed and [seconds for seconds, _ in catalog.frames_of([video])[video]] == [1.0]
    removed = catalog.commit_batch(remove_ids=[video])
    assert removed.frames_changed and catalog.counts()["frame"] == 0
    catalog.close()


@pytest.mark.parametrize(("name", "codec", "pixel_format", "size"), [
    ("ten-bit.mp4", "h264", "yuv420p10le", (160, 96)),  # 10-bit, as HDR phone video is
    ("odd.mov", "h264", "yuv444p", (161, 97)),  # odd sizes
    ("clip.webm", "libvpx-vp9", "yuv420p", (161, 97)),
    ("old.avi", "mpeg4", "yuv420p", (160, 96)),
    ("film.mkv", "mpeg4", "yuv420p", (162, 98)),
])
def test_odd_video_formats_are_converted_to_rgb(tmp_path: Path, name: str, codec: str, pixel_format: str,
                                                size: tuple[int, int]) -> None:
    import av

    from clipdex.search.media.video import sample_video

    width, height = size
    picture = np.zeros((height, width, 3), np.uint8)
    picture[:, : width // 2], picture[:, width // 2:] = (200, 30, 30), (30, 30, 200)
    with av.open(str(tmp_path / name), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
        for index in range(20):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format=pixel_format)
            frame.pts = index + index // 3  # a variable frame rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = sample_video(tmp_path / name)
    assert (video.width, video.height) == size
    assert difference(video.frames[0][1], picture) < 8


def test_a_long_video_is_bounded_by_the_cap_and_its_moments_spread_over_all_of_it(tmp_path: Path) -> None:
    from clipdex.search.media.video import Sampling, sample_video

    scenes_video(tmp_path / "long.mp4", count=4, black_intro=False, keyframe_seconds=1.0)  # 12 s
    every = sample_video(tmp_path / "long.mp4")
    capped = sample_video(tmp_path / "long.mp4", Sampling(max_frames=3))
    assert len(every.frames) >= 4 and len(capped.frames) == 3
    times = [seconds for seconds, _ in capped.frames]
    assert times[0] < 3.0 and times[-1] >= 6.0, times  # spread out, not the first three seconds


def test_the_web_page_shows_a_video_moment_and_plays_from_it(tmp_path: Path, browser) -> None:
    from clipdex.search.http import create_app, serve_in_thread

    captions = scenes_video(tmp_path / "media" / "party.mp4")
    library = demo_library(tmp_path / "library")
    index_paths(library, [tmp_path / "media"])
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    with serve_in_thread(create_app(library)) as url:
        page.goto(f"{url}/")
        page.fill("#query", captions[2])
        page.press("#query", "Enter")
        page.wait_for_function("""() => {
            const image = document.querySelector('.hit[data-kind="video"] img');
            return image && image.complete && image.naturalWidth > 0;
        }""")  # the frame at the moment, from the thumbnail route
        name = page.text_content('.hit[data-kind="video"] .name')
        assert name == "party.mp4 @ 00:09", name  # the third scene shows from 00:09 to 00:12
        page.click('.hit[data-kind="video"] .play')
        video = page.wait_for_selector('.hit[data-kind="video"] video')
        source = video.get_attribute("src")
        assert source.endswith("/items/" + page.get_attribute('.hit[data-kind="video"]', "data-id") + "/file#t=9")
    context.close()
    library.close()
    assert errors == []
