"""The model on onnxruntime: the numpy preprocessing equals open_clip's, the image export
is verified (or refused, with the reason recorded), and an exported library indexes and
answers image queries without importing torch or open_clip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths, local
from clipdex.search.encoders import image_export, model as model_module, onnx_image
from clipdex.search.encoders.factory import LibraryEncoders
from clipdex.search.encoders.onnx_image import IMAGE_EXPORT_FOLDER, OnnxClipEncoder
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.encoders.image_export import IMAGE_REFUSED_FILE, probe_images
from clipdex.search.media.imaging import decode_image
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.encoders.preprocess import ImagePreprocess, UnsupportedPreprocess
from tests.test_fidelity import photo_like, reference_image_vectors


def odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")  # noqa: E731
    return [noise(4000, 3000), noise(3000, 4000), noise(7, 5), noise(256, 256), noise(257, 301), noise(1000, 20),
            noise(33, 1), noise(640, 480).filter(ImageFilter.GaussianBlur(2))]


@pytest.mark.parametrize("size, resize_mode", [(224, "shortest"), (256, "shortest"), (32, "shortest"), (224, "squash")])
def test_numpy_preprocessing_equals_open_clips(size: int, resize_mode: str) -> None:
    import open_clip

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    theirs = open_clip.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=resize_mode)
    ours = ImagePreprocess(size, mean, std, "bicubic", resize_mode)
    for image in odd_images():
        expected = theirs(image).numpy()
        assert ours(image).shape == expected.shape == (3, size, size)
        assert np.abs(ours(image) - expected).max() <= 1e-6, image.size


def test_the_recorded_preprocessing_is_open_clips_own(tiny_model: ModelSpec) -> None:
    import open_clip

    resolved = tiny_model.resolve()
    open_clip.add_model_config(resolved.config_path)
    model, _, transform = open_clip.create_model_and_transforms(resolved.name, pretrained=None)
    ours = ImagePreprocess.of_open_clip_model(model)
    assert ImagePreprocess.from_json(json.loads(json.dumps(ours.to_json()))) == ours
    for image in odd_images():
        assert np.array_equal(ours(image), transform(image).numpy())
    with pytest.raises(UnsupportedPreprocess):
        ImagePreprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", "longest")  # type: ignore[arg-type]


def test_the_probe_images_cover_modes_exif_and_sizes() -> None:
    decoded = {name: decode_image(data, name=name) for name, data in probe_images()}
    assert (decoded["exif-rotated.jpg"].width, decoded["exif-rotated.jpg"].height) == (900, 1200)
    assert all(item.image.mode == "RGB" for item in decoded.values())
    assert {"gray.jpg", "palette.gif", "transparent.png", "sixteen-bit.png", "cmyk.jpg", "small.jpg", "long.png"} <= set(decoded)


@pytest.mark.export_process
def test_the_first_run_exports_and_later_runs_store_open_clips_vectors_on_onnx(library: Library, tiny_model: ModelSpec, tmp_path: Path) -> None:
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir(), later.mkdir()
    photo_like(first / "a.jpg", 1, (300, 200))
    report = index_paths(library, [first])
    assert report.export_seconds > 0 and (library.path / IMAGE_EXPORT_FOLDER / "image_encoder.json").is_file()
    settings = json.loads((library.path / IMAGE_EXPORT_FOLDER / "image_encoder.json").read_text())
    assert settings["preprocess"]["image_size"] == 32 and settings["preprocess"]["interpolation"] == "bicubic"
    assert settings["min_cosine"] >= 0.999 and settings["probe_images"] == len(probe_images())

    reopened = Library.open(library.path, device="cpu")
    assert reopened.stats()["runtime"] == "onnx"
    paths = [photo_like(later / f"p{i}.jpg", i, (1200, 900) if i % 2 else (900, 1200), orientation=(6 if i == 3 else None))
             for i in range(5)]
    paths.append(photo_like(later / "small.jpg", 99, (50, 40)))
    index_paths(reopened, [later])
    assert isinstance(reopened.encoder, OnnxClipEncoder) and reopened.encoders.runtime() == "onnx"
    expected = reference_image_vectors(tiny_model, paths)
    stored = {item.path: item.vector_array() for item in reopened.catalog.get_items(list(range(1, 10))).values()}
    for path, reference in zip(paths, expected):
        assert float(np.dot(stored[str(path)], reference)) >= 0.999, path.name
    query = reopened.encode_image(paths[3])
    assert float(np.dot(query, expected[3])) >= 0.999


def test_the_first_run_exports_first_then_embeds_every_photo_on_onnxruntime(library: Library, tiny_model: ModelSpec, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import weakref

    photos = tmp_path / "photos"
    photos.mkdir()
    paths = [photo_like(photos / f"p{i}.jpg", i, (1200, 900) if i % 2 else (900, 1200), orientation=(6 if i == 3 else None))
             for i in range(5)]
    torch_model = library.encoder
    assert isinstance(torch_model, TorchClipEncoder) and library.encoders.export_pending()
    embedded_on: list[str] = []
    embed = local._embed
    monkeypatch.setattr(local, "_embed", lambda lib, batch: embedded_on.append(type(lib.encoder).__name__) or embed(lib, batch))
    report = index_paths(library, [photos], batch_size=2)
    assert report.added == 5 and not report.failed and report.export_seconds > 0
    assert embedded_on and set(embedded_on) == {"OnnxClipEncoder"}  # every photo on the export, none on torch
    assert isinstance(library.encoder, OnnxClipEncoder) and library.encoders.runtime() == "onnx"
    released = weakref.ref(torch_model)
    del torch_model
    gc.collect()
    assert released() is None  # nothing holds the open_clip model any more: its memory went
    expected = reference_image_vectors(tiny_model, paths)
    stored = {item.path: item.vector_array() for item in library.catalog.get_items(library.catalog.ids().tolist()).values()}
    for path, reference in zip(paths, expected):
        assert float(np.dot(stored[str(path)], reference)) >= 0.999, path.name


def test_the_photos_are_decoded_further_ahead_while_the_first_export_runs(library: Library, tmp_path: Path, make_images,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    photos = 16 + local.EXPORT_AHEAD_BATCHES * 4 + 8  # more than the decoders may get ahead
    make_images(tmp_path / "photos", photos)
    monkeypatch.setattr(local, "plan_threads", lambda device, workers=None: local.ThreadPlan(2, 1, 2, split_batches=True))
    lock, prepared, during_export = threading.Lock(), [0], []
    prepare, export = local._prepare, image_export.ensure_image_export

    def counted_prepare(*args):  # type: ignore[no-untyped-def]
        result = prepare(*args)
        with lock:
            prepared[0] += 1
        return result

    def slow_export(*args):  # type: ignore[no-untyped-def]
        time.sleep(1.5)  # long enough for the decoders to get as far ahead as they may
        with lock:
            during_export.append(prepared[0])
        return export(*args)

    monkeypatch.setattr(local, "_prepare", counted_prepare)
    monkeypatch.setattr(image_export, "ensure_image_export", slow_export)
    report = index_paths(library, [tmp_path / "photos"], batch_size=4)
    assert report.added == photos and report.export_seconds > 1.5 and isinstance(library.encoder, OnnxClipEncoder)
    # without the export: two batches held for the lanes and a batch + 2 per worker decoding (16);
    # while it runs, EXPORT_AHEAD_BATCHES more batches
    assert 16 < during_export[0] <= 16 + local.EXPORT_AHEAD_BATCHES * 4


def test_the_first_run_embeds_on_the_image_export_while_the_text_tower_exports(library: Library, tmp_path: Path, make_images,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from clipdex.search.encoders import text_export

    make_images(tmp_path / "photos", 12)
    monkeypatch.setattr(local, "plan_threads", lambda device, workers=None: local.ThreadPlan(1, 1, 1))
    embedded, text_export_started, text_export_done = threading.Event(), threading.Event(), threading.Event()
    during_text_export: list[str] = []
    embed, export_text_tower = local._embed, text_export.ensure_text_export

    def recorded_embed(lib, batch):  # type: ignore[no-untyped-def]
        if text_export_started.is_set() and not text_export_done.is_set():
            during_text_export.append(type(lib.encoder).__name__)
        vectors = embed(lib, batch)
        embedded.set()
        return vectors

    def waiting_text_export(*args):  # type: ignore[no-untyped-def]
        text_export_started.set()
        embedded.wait(timeout=10)  # the lanes embed meanwhile: they need only the image export
        try:
            return export_text_tower(*args)
        finally:
            text_export_done.set()

    monkeypatch.setattr(local, "_embed", recorded_embed)
    monkeypatch.setattr(text_export, "ensure_text_export", waiting_text_export)
    report = index_paths(library, [tmp_path / "photos"], batch_size=4)
    assert report.added == 12 and not report.failed and report.export_seconds > 0
    assert during_text_export and set(during_text_export) == {"OnnxClipEncoder"}
    assert isinstance(library.encoder, OnnxClipEncoder) and library.encoders.runtime() == "onnx"
    assert library.encoders.text_export() is not None  # both towers exported by the one run


def test_photos_prepared_before_the_model_loaded_are_prepared_again_when_its_preprocessing_differs(
        library: Library, tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from clipdex.indexer import first_export, rules

    photos = tmp_path / "photos"
    photos.mkdir()
    paths = [photo_like(photos / f"p{i}.jpg", i, (1200, 900) if i % 2 else (900, 1200)) for i in range(8)]
    true = ImagePreprocess.of_open_clip_model(TorchClipEncoder(library.model, "cpu").load().model)
    wrong = ImagePreprocess(2 * true.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), true.interpolation, true.resize_mode)
    monkeypatch.setattr(first_export, "expected_preprocess", lambda model: wrong)
    load = TorchClipEncoder.load
    monkeypatch.setattr(TorchClipEncoder, "load", lambda self: time.sleep(0.5) or load(self))  # decoders go first
    again: list[str] = []
    prepare_again = rules._prepare_again
    monkeypatch.setattr(local, "_prepare_again", lambda prepared, encoder: again.append(prepared.job.file.path)
                        or prepare_again(prepared, encoder))
    report = index_paths(library, [photos], batch_size=4)
    assert report.added == 8 and not report.failed and again
    expected = reference_image_vectors(tiny_model, paths)
    stored = {item.path: item.vector_array() for item in library.catalog.get_items(library.catalog.ids().tolist()).values()}
    for path, reference in zip(paths, expected):
        assert float(np.dot(stored[str(path)], reference)) >= 0.999, path.name


def test_the_expected_preprocessing_is_open_clips_own_and_needs_no_open_clip(tiny_model: ModelSpec, tmp_path: Path) -> None:
    import open_clip

    from clipdex.search.encoders.preprocess import expected_preprocess

    resolved = tiny_model.resolve()
    open_clip.add_model_config(resolved.config_path)
    loaded = open_clip.create_model(resolved.name, pretrained=resolved.checkpoint)
    assert expected_preprocess(resolved) == ImagePreprocess.of_open_clip_model(loaded)
    for name in ("ViT-B-32-256", "RN50"):  # from open_clip's registry, read without importing it
        registry = ModelSpec(name, "none").resolve()
        assert expected_preprocess(registry) == ImagePreprocess.of_open_clip_model(open_clip.create_model(name, pretrained=None))
    assert expected_preprocess(ModelSpec("ViT-B-32", "laion2b_s34b_b79k").resolve()) is None  # a tag has its own settings
    code = ("import sys; from clipdex.search.encoders.model import ModelSpec; from clipdex.search.encoders.preprocess import expected_preprocess; "
            "from clipdex.search.manifest import embedding_dim; model = ModelSpec('ViT-B-32-256', 'none').resolve(); "
            "print(expected_preprocess(model).image_size, embedding_dim(model), 'open_clip' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["256", "512", "False", "False"]


def test_a_run_of_many_photos_starts_with_prepacked_weights_and_keeps_them(library: Library, tmp_path: Path, make_images,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "first", 1)
    index_paths(library, [tmp_path / "first"])
    monkeypatch.setattr(onnx_image, "BULK_IMAGES", 4)
    sessions: list[bool] = []
    session = onnx_image._inference_session
    monkeypatch.setattr(onnx_image, "_inference_session",
                        lambda path, threads, prepack=False: sessions.append(prepack) or session(path, threads, prepack=prepack))
    make_images(tmp_path / "many", 10, start=10)
    assert index_paths(Library.open(library.path, device="cpu"), [tmp_path / "many"], batch_size=2).added == 10
    assert sessions == [True]  # prepacked from the first batch on, never remade midway
    sessions.clear()
    make_images(tmp_path / "few", 2, start=50)
    assert index_paths(Library.open(library.path, device="cpu"), [tmp_path / "few"]).added == 2
    assert sessions == [False]  # a few photos: the session that loads fast


def test_a_refused_image_export_falls_back_to_torch_with_the_reason(library: Library, tmp_path: Path, make_images,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_export, "verify", lambda encoder, exported: (0.42, 32, 11))
    make_images(tmp_path / "photos", 2)
    index_paths(library, [tmp_path / "photos"])
    refusal = json.loads((library.path / IMAGE_REFUSED_FILE).read_text())
    assert "cosine 0.42000" in refusal["reason"] and not (library.path / IMAGE_EXPORT_FOLDER).exists()
    monkeypatch.undo()  # a refusal is not retried by later runs
    reopened = Library.open(library.path, device="cpu")
    assert reopened.stats()["runtime"] == "torch"
    make_images(tmp_path / "photos", 1, start=5)
    assert index_paths(reopened, [tmp_path / "photos"]).added == 1
    assert reopened.encoders.runtime() == "torch" and not (library.path / IMAGE_EXPORT_FOLDER).exists()

    result = CliRunner().invoke(app, ["search", "--image", str(tmp_path / "photos" / "img000.jpg"), "--library",
                                      str(library.path), "--runtime", "onnx"])
    assert result.exit_code == 1
    assert "--runtime onnx: this library's model cannot run on onnxruntime (the image encoder cannot be exported faithfully" \
        in " ".join(result.output.split())


def test_runtime_torch_is_kept_when_asked_for(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "photos", 2)
    index_paths(library, [tmp_path / "photos"])
    forced = Library.open(library.path, device="cpu", runtime="torch")
    assert forced.stats()["runtime"] == "torch" and forced.encoders.runtime() == "torch"
    assert not isinstance(forced.encoder, OnnxClipEncoder)
    result = CliRunner().invoke(app, ["stats", "--library", str(library.path), "--runtime", "fast"])
    assert result.exit_code == 2  # a usage error: --runtime takes one of a set (tests/test_cli_conventions.py)
    assert "Error: Invalid value for '--runtime': 'fast' is not one of 'auto', 'torch', 'onnx'." in result.stderr


NO_TORCH_RUN = """
import sys
from clipdex.cli.main import app
for argv in {runs!r}:
    sys.argv = ["clipdex", *argv]
    try:
        app()
    except SystemExit as exit:
        assert not exit.code, (argv, exit.code)
print("IMPORTED", sorted(name for name in ("torch", "open_clip", "torchvision") if name in sys.modules))
"""


def test_an_exported_library_indexes_and_answers_without_torch(library: Library, tmp_path: Path, make_images) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 3)
    index_paths(library, [photos])
    assert (library.path / IMAGE_EXPORT_FOLDER).is_dir()
    make_images(photos, 1, start=10)
    labels = tmp_path / "labels.txt"
    labels.write_text("a dog\na cat\n")
    where = ["--library", str(library.path), "--device", "cpu"]  # auto would pick torch on a GPU machine
    runs = [["index", str(photos), *where, "-q"], ["search", "--image", str(photos / "img010.jpg"), *where],
            ["search", "a dog", *where], ["tag", str(photos / "img001.jpg"), "--labels", str(labels), *where],
            ["embed", "--image", str(photos / "img001.jpg"), *where], ["stats", *where]]
    result = subprocess.run([sys.executable, "-c", NO_TORCH_RUN.format(runs=runs)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORTED []" in result.stdout and "runtime: onnx" in result.stdout
    assert "1 added" in result.stdout


def test_the_checkpoint_is_hashed_again_only_when_its_size_or_mtime_changes(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    hashed: list[Path] = []
    real = model_module.file_sha256
    monkeypatch.setattr(model_module, "file_sha256", lambda path: hashed.append(path) or real(path))
    spec = library.model
    assert spec.checkpoint_mtime_ns is not None and spec.checkpoint
    assert spec.checkpoint_verified() and hashed == []
    same = ModelSpec(spec.config_path or "", spec.checkpoint).resolve(known=spec)
    assert same.checkpoint_sha256 == spec.checkpoint_sha256 and hashed == []
    info = os.stat(spec.checkpoint)
    os.utime(spec.checkpoint, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    try:
        assert spec.checkpoint_verified() and len(hashed) == 1
    finally:
        os.utime(spec.checkpoint, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_the_first_index_run_says_it_exports_and_what_it_cost(tmp_path: Path, make_images, model_args: list[str]) -> None:
    make_images(tmp_path / "photos", 2)
    where = ["--library", str(tmp_path / "lib")]
    first = CliRunner().invoke(app, ["index", str(tmp_path / "photos"), *where, *model_args, "--device", "cpu"])
    assert first.exit_code == 0, first.output
    said = " ".join(first.output.split())
    assert "This run first exports the model to ONNX, once for this library" in said
    assert "exported the model to ONNX in " in said
    make_images(tmp_path / "photos", 1, start=7)
    later = CliRunner().invoke(app, ["index", str(tmp_path / "photos"), *where, "--device", "cpu"])
    assert later.exit_code == 0 and "1 added" in later.output and "ONNX" not in later.output
    stats = CliRunner().invoke(app, ["stats", *where, "--device", "cpu"])
    assert "runtime: onnx" in stats.output


def test_an_image_decoded_for_the_expected_size_is_prepared_as_expected_even_if_the_model_loads_between(
        library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.indexer.first_export import FirstExport

    expected = ImagePreprocess(40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    own = ImagePreprocess(32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    export = FirstExport(library, 1, 10)
    monkeypatch.setattr(export, "_begin", lambda: None)  # no model, no thread: the states are set by hand
    export._expected = expected
    assert export.image_size == 40  # the decoder decodes for the expected size...
    export._preprocess, export.expected_wrong = own, True
    export._loaded.set()  # ...the model loads meanwhile, its own settings differ...
    pixels = export.prepare(Image.new("RGB", (90, 60)))
    assert pixels.shape == (3, 40, 40) and export.prepared_wrongly(pixels)  # ...so it is prepared again later
    assert export.image_size == 32  # the next image: the model's own, from the start
    later = export.prepare(Image.new("RGB", (90, 60)))
    assert later.shape == (3, 32, 32) and not export.prepared_wrongly(later)


def test_a_text_export_refused_after_the_photos_started_on_the_image_export_ends_the_run_on_torch(
        library: Library, tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.search.encoders import text_export

    photos = tmp_path / "photos"
    photos.mkdir()
    paths = [photo_like(photos / f"p{i}.jpg", i, (900, 1200)) for i in range(6)]
    monkeypatch.setattr(text_export, "_worst_cosine", lambda encoder, reference: 0.5)
    report = index_paths(library, [photos], batch_size=2)
    assert report.added == 6 and not report.failed
    assert "cosine 0.50000" in json.loads((library.path / text_export.REFUSED_FILE).read_text())["reason"]
    assert isinstance(library.encoder, TorchClipEncoder) and library.encoders.runtime() == "torch"
    expected = reference_image_vectors(tiny_model, paths)
    stored = {item.path: item.vector_array() for item in library.catalog.get_items(library.catalog.ids().tolist()).values()}
    for path, reference in zip(paths, expected):
        assert float(np.dot(stored[str(path)], reference)) >= 0.999, path.name
    assert library.encode_text("a photo").shape == (library.dim,)  # texts on the torch model


def test_the_first_run_exports_in_a_process_of_its_own_and_never_imports_torch(tmp_path: Path, make_images,
                                                                                model_args: list[str]) -> None:
    photos, where = tmp_path / "photos", tmp_path / "library"
    make_images(photos, 3)
    runs = [["index", str(photos), "--library", str(where), *model_args, "--device", "cpu", "-q"]]
    result = subprocess.run([sys.executable, "-c", NO_TORCH_RUN.format(runs=runs)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORTED []" in result.stdout and "3 added" in result.stdout
    library = Library.open(where)
    assert library.encoders.runtime() == "onnx" and isinstance(library.encoder, OnnxClipEncoder)
    assert library.encoders.text_export() is not None
    assert not [path.name for path in where.iterdir() if path.name.startswith(".")]  # no scratch folder left


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_the_export_process_stops_when_the_indexing_process_goes(library: Library, sigint: str) -> None:
    import signal
    import time

    from clipdex.search.encoders.export_process import ExportProcess

    # an indexing run started as a script's background job has SIGINT ignored, and its children inherit that
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        child = ExportProcess()
    finally:
        signal.signal(signal.SIGINT, previous)
    child.export(library.path, library.model.to_json(), library.dim, 1)  # the request is sent
    started = time.monotonic()
    status = child.close()  # what it sees when the indexing process is gone: its input closes
    assert status == 130 and time.monotonic() - started < 20
    assert not [path.name for path in library.path.iterdir() if path.name.startswith(".")]  # no scratch folder
    assert library.encoders.runtime() == "torch"  # nothing half-made installed


class SaysAndEnds:
    """An export process that tells `messages`, then ends with `status`."""

    def __init__(self, messages: list[dict], status: int) -> None:
        self.messages, self.status = messages, status

    def export(self, *args):  # type: ignore[no-untyped-def]
        yield from self.messages

    def close(self) -> int:
        return self.status


def test_the_first_run_exports_here_when_the_export_process_says_it_failed(
        library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.indexer import first_export

    monkeypatch.setattr(first_export, "ExportProcess", lambda: SaysAndEnds([{"error": "OSError: [Errno 24] Too many open files"}], 1))
    make_images(tmp_path / "photos", 3)
    report = index_paths(library, [tmp_path / "photos"])
    assert report.added == 3 and not report.failed and report.export_seconds > 0
    assert isinstance(library.encoder, OnnxClipEncoder) and library.encoders.text_export() is not None


def test_the_first_run_exports_here_when_the_export_process_ends_at_once_without_a_word(
        library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.indexer import first_export

    monkeypatch.setattr(first_export, "ExportProcess", lambda: SaysAndEnds([], 1))  # cannot import clipdex, say
    make_images(tmp_path / "photos", 3)
    report = index_paths(library, [tmp_path / "photos"])
    assert report.added == 3 and isinstance(library.encoder, OnnxClipEncoder)


def test_an_export_process_failing_after_the_photos_started_ends_the_run_with_its_error(
        library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.indexer import first_export
    from clipdex.search.errors import ClipdexError

    told = [{"loaded": 0.1, "preprocess": ImagePreprocess.of_open_clip_model(TorchClipEncoder(library.model, "cpu").load().model).to_json()},
            {"image": False, "exported": False}, {"error": "MemoryError: "}]
    monkeypatch.setattr(first_export, "ExportProcess", lambda: SaysAndEnds(told, 1))
    make_images(tmp_path / "photos", 3)
    with pytest.raises(ClipdexError, match="exporting the model of .* failed: MemoryError"):
        index_paths(library, [tmp_path / "photos"])


def test_a_first_run_whose_export_process_is_killed_ends_with_a_clear_error(
        library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipdex.indexer import first_export
    from clipdex.search.errors import ClipdexError

    monkeypatch.setattr(first_export, "ExportProcess", lambda: SaysAndEnds([], -9))
    make_images(tmp_path / "photos", 3)
    with pytest.raises(ClipdexError, match="exporting the model of .* ended unexpectedly \\(signal 9\\)"):
        index_paths(library, [tmp_path / "photos"])


def test_an_image_export_whose_preprocessing_differs_from_open_clips_is_refused_naming_the_probe(
        library: Library, tmp_path: Path, make_images, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare = OnnxClipEncoder.prepare
    monkeypatch.setattr(OnnxClipEncoder, "prepare", lambda self, image: prepare(self, image) + 0.01)
    make_images(tmp_path / "photos", 2)
    report = index_paths(library, [tmp_path / "photos"])
    assert report.added == 2 and isinstance(library.encoder, TorchClipEncoder)
    reason = json.loads((library.path / IMAGE_REFUSED_FILE).read_text())["reason"]
    assert "probe image landscape.jpg differs from open_clip's by 0.01" in reason


def test_an_export_removes_the_scratch_folders_of_killed_exports_but_not_a_recent_one(
        library: Library, tmp_path: Path, make_images) -> None:
    import os
    import time

    from clipdex.search.encoders.onnx_files import STALE_SCRATCH_SECONDS

    stale = [library.path / ".image_encoder-killed", library.path / ".text_encoder-killed"]
    recent = library.path / ".text_encoder-running"  # another process's export, say
    for folder in [*stale, recent]:
        folder.mkdir()
        (folder / "raw.onnx").write_bytes(b"half")
    for folder in stale:
        old = time.time() - STALE_SCRATCH_SECONDS - 60
        os.utime(folder, (old, old))
    make_images(tmp_path / "photos", 2)
    index_paths(library, [tmp_path / "photos"])
    assert library.encoders.runtime() == "onnx"
    assert [path.name for path in library.path.iterdir() if path.name.startswith(".")] == [recent.name]
