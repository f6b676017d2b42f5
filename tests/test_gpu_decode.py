"""The tensor decode path (nvJPEG on a GPU) run on the CPU: open_clip's vectors, EXIF, per-file fallbacks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from clipdex.search.encoders.torch_clip import TorchClipEncoder as Encoder
from clipdex.search.errors import UnreadableImage
from clipdex.search.media.gpu_decode import DecodedBatch, GpuFeeder, TensorTransform, decode_batch, decode_chunks, encoded_image, gpu_header, orient, thread_feeder, uses_gpu_decoding
from clipdex.search.media.imaging import decode_image, read_header
from clipdex.search.encoders.model import ModelSpec
from test_fidelity import photo_like, reference_image_vectors
from test_formats import bomb_png


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def smooth_image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BICUBIC).convert(mode)


def grainy_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """Sharp-edged shapes under fine grain, like a camera photo at full resolution."""
    rng = np.random.default_rng(seed)
    image = smooth_image(seed, size)
    draw = ImageDraw.Draw(image)
    for _ in range(20):
        x, y, radius = (int(v) for v in rng.integers(0, size[0], 3) // (1, 1, 4))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    grain = rng.normal(0.0, 12.0, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    return jpeg_bytes(Image.fromarray(pixels, "RGB"), quality=90)


def encoder_for(spec: ModelSpec) -> Encoder:
    return Encoder(spec.resolve(), device="cpu").load()


def decoded(encoder: Encoder, datas: list[bytes]) -> DecodedBatch:
    transform = TensorTransform.from_open_clip(encoder.preprocess)
    assert transform is not None
    batch = decode_batch(datas, "cpu", transform.resize_to, transform.mean, transform.std, transform.crop_size)
    assert batch.rows == [index for index in range(len(datas)) if index not in batch.fallbacks]
    return batch


def tensor_vectors(encoder: Encoder, datas: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
    batch = decoded(encoder, datas)
    return encoder.encode_tensors(batch.tensors), batch.fallbacks


def assert_faithful(spec: ModelSpec, paths: list[Path]) -> None:
    """The tensor path's vectors of `paths` are at cosine >= 0.999 of open_clip's preprocess on the full image.

    Its model inputs, too, stay within 3 grey levels of open_clip's (0.012 per level after
    normalization): the cosine alone would let a small brightness error through.
    """
    import torch

    encoder = encoder_for(spec)
    batch = decoded(encoder, [path.read_bytes() for path in paths])
    assert batch.fallbacks == {}
    reference_inputs = torch.stack([encoder.preprocess(ImageOps.exif_transpose(Image.open(p)).convert("RGB")) for p in paths])
    worst = (batch.tensors - reference_inputs).abs().amax(dim=(1, 2, 3)) * 0.27 * 255
    assert float(worst.max()) <= 3.0, dict(zip([p.name for p in paths], worst.tolist()))
    vectors = encoder.encode_tensors(batch.tensors)
    expected = reference_image_vectors(spec, paths)
    cosines = {path.name: float(np.dot(vector, reference)) for path, vector, reference in zip(paths, vectors, expected)}
    assert min(cosines.values()) >= 0.999, cosines


def test_tensor_path_matches_open_clip(tiny_model: ModelSpec, tmp_path: Path) -> None:
    sizes = [(1200, 900), (900, 1200), (50, 40), (641, 479), (224, 224), (33, 500)]
    paths = [photo_like(tmp_path / f"p{i}.jpg", i, size) for i, size in enumerate(sizes)]
    paths += [photo_like(tmp_path / f"turned{o}.jpg", 10 + o, (640, 360), orientation=o) for o in range(1, 9)]
    grainy = tmp_path / "grainy.jpg"  # sharp edges and sensor grain: a resize without antialiasing would alias
    grainy.write_bytes(grainy_jpeg(0, (1600, 1200)))
    assert_faithful(tiny_model, paths + [grainy])


@pytest.mark.slow
def test_tensor_path_matches_open_clip_at_vit_b_32(tmp_path: Path) -> None:
    """The full-size architecture (random weights) on camera-sized photos, turned and not."""
    import open_clip
    import torch

    torch.manual_seed(1)
    checkpoint = tmp_path / "vit-b-32-random.pt"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), checkpoint)
    sizes = [(4000, 3000), (3000, 4000), (1024, 512), (300, 200)]
    paths = [photo_like(tmp_path / f"p{i}.jpg", i, size, orientation=(6 if i == 1 else None)) for i, size in enumerate(sizes)]
    assert_faithful(ModelSpec("ViT-B-32", str(checkpoint)), paths)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow_applies_it(orientation: int) -> None:
    import torch

    rng = np.random.default_rng(orientation)
    image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    stored = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert np.array_equal(orient(stored, orientation).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_header_metadata_equals_the_cpu_paths(tmp_path: Path, orientation: int) -> None:
    data = photo_like(tmp_path / "p.jpg", 3, (64, 40), orientation=orientation).read_bytes()
    header = gpu_header(data)
    assert not isinstance(header, str)
    decoded = decode_image(data)
    assert header.orientation == orientation
    assert header.metadata() == {"width": decoded.width, "height": decoded.height, "taken_at": decoded.taken_at,
                                 "camera_make": decoded.camera_make, "camera_model": decoded.camera_model}


def test_grayscale_and_progressive_jpegs_are_decoded_as_tensors(tiny_model: ModelSpec, tmp_path: Path) -> None:
    gray = tmp_path / "gray.jpg"
    gray.write_bytes(jpeg_bytes(smooth_image(1, (300, 200), "L")))
    progressive = tmp_path / "progressive.jpg"
    progressive.write_bytes(jpeg_bytes(smooth_image(2, (300, 200)), progressive=True, quality=90))
    assert read_header(gray.read_bytes()).mode == "L"
    assert_faithful(tiny_model, [gray, progressive])


def test_a_camera_mpo_decodes_its_first_picture(tiny_model: ModelSpec, tmp_path: Path) -> None:
    """Cameras append a second picture to some JPEGs (MPO); Pillow and the CPU path use the first."""
    first, second = smooth_image(7, (160, 120)), smooth_image(8, (160, 120))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[second])
    data = buffer.getvalue()
    assert read_header(data).format == "MPO"
    encoder = encoder_for(tiny_model)
    vectors, fallbacks = tensor_vectors(encoder, [data])
    assert fallbacks == {}
    expected = encoder.encode_images([decode_image(data).image, decode_image(jpeg_bytes(second)).image])
    assert float(np.dot(vectors[0], expected[0])) >= 0.999
    assert float(np.dot(vectors[0], expected[0])) > float(np.dot(vectors[0], expected[1]))


def test_what_the_tensor_path_cannot_take_falls_back_per_file(tiny_model: ModelSpec) -> None:
    good = jpeg_bytes(smooth_image(3, (120, 90)))
    png = io.BytesIO()
    smooth_image(4, (40, 30)).save(png, "PNG")
    cmyk = jpeg_bytes(smooth_image(5, (40, 30), "CMYK"))
    truncated = jpeg_bytes(smooth_image(6, (120, 90)))[:-300]  # header intact, scan data cut short
    datas = [good, png.getvalue(), cmyk, truncated, b"", b"not an image", good]
    encoder = encoder_for(tiny_model)
    vectors, fallbacks = tensor_vectors(encoder, datas)
    assert sorted(fallbacks) == [1, 2, 3, 4, 5]
    assert fallbacks[1] == "PNG image, not a JPEG"
    assert fallbacks[2].startswith("CMYK JPEG")
    assert fallbacks[3] == "the JPEG decoder refused it"
    assert len(vectors) == 2 and float(np.dot(vectors[0], vectors[1])) > 0.9999
    expected = encoder.encode_images([decode_image(good).image])[0]
    assert float(np.dot(vectors[0], expected)) >= 0.999


def with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0) claiming another size."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height and width
    return jpeg[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[at + 4 :]


def test_decompression_bombs_go_to_the_cpu_path_which_refuses_them(tiny_model: ModelSpec, tmp_path: Path) -> None:
    small = jpeg_bytes(smooth_image(9, (40, 30)))
    beyond_twice, beyond_once = with_size(small, 40_000, 40_000), with_size(small, 15_000, 15_000)
    png = bomb_png(tmp_path / "bomb.png").read_bytes()
    _, fallbacks = tensor_vectors(encoder_for(tiny_model), [small, beyond_twice, beyond_once, png])
    assert sorted(fallbacks) == [1, 2, 3]
    assert fallbacks[1].startswith("refused as a decompression bomb") and fallbacks[3].startswith("refused as a")
    assert fallbacks[2] == "more pixels than allowed (the CPU path says how many)"
    for data in (beyond_twice, beyond_once, png):
        with pytest.raises(UnreadableImage, match="decompression bomb"):
            decode_image(data)


def test_transform_is_read_only_from_open_clips_usual_pipeline() -> None:
    import open_clip

    usual = open_clip.image_transform(224, is_train=False)
    assert TensorTransform.from_open_clip(usual) == TensorTransform(
        224, 224, tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    assert TensorTransform.from_open_clip(open_clip.image_transform(224, is_train=False, resize_mode="squash")) is None
    assert TensorTransform.from_open_clip(open_clip.image_transform(224, is_train=False, interpolation="bilinear")) is None
    assert TensorTransform.from_open_clip(object()) is None


def test_decode_chunks_bound_the_full_resolution_pixels_of_a_call(tmp_path: Path) -> None:
    headers = [read_header(jpeg_bytes(smooth_image(i, size))) for i, size in enumerate([(10, 10), (10, 10), (20, 10), (5, 2)])]
    assert decode_chunks(headers, 3 * 200) == [[0, 1], [2], [3]]
    assert decode_chunks(headers, 3 * 100) == [[0], [1], [2], [3]]  # an image over the budget goes alone
    assert decode_chunks(headers, 10**9) == [[0, 1, 2, 3]]


def test_feeder_pipelines_batches_and_keeps_their_order(tiny_model: ModelSpec, tmp_path: Path) -> None:
    encoder = encoder_for(tiny_model)
    assert GpuFeeder.for_encoder(encoder) is None  # on the CPU, the indexer keeps its own path
    assert thread_feeder(encoder) is None and not uses_gpu_decoding(encoder)
    transform = TensorTransform.from_open_clip(encoder.preprocess)
    assert transform is not None
    feeder = GpuFeeder(encoder.model, transform, "cpu")
    feeder.decode_budget = 3 * 120 * 90  # one image per decode call
    datas = [jpeg_bytes(smooth_image(i, (120, 90))) for i in range(5)]
    batches = [datas[:2], [b"broken", datas[2]], [encoded_image(data) for data in datas[3:]]]  # as reader threads give them
    results = list(feeder.embed_batches(batches))
    assert [sorted(result.vectors) for result in results] == [[0, 1], [1], [0, 1]]
    assert results[1].fallbacks == {0: "not an image Pillow can identify (wrong extension or unsupported format)"}
    expected = encoder.encode_images([decode_image(data).image for data in datas])
    got = [results[0].vectors[0], results[0].vectors[1], results[1].vectors[1], results[2].vectors[0], results[2].vectors[1]]
    assert min(float(np.dot(a, b)) for a, b in zip(got, expected)) >= 0.999
    assert results[2].headers[1].metadata()["width"] == 120
    assert encoded_image(datas[3]).as_bytes() == datas[3]  # what the CPU path decodes when a file is sent back


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU (nvJPEG)")


@needs_cuda
def test_nvjpeg_agrees_with_the_cpu_decoder(tiny_model: ModelSpec, tmp_path: Path) -> None:
    """On a GPU: the same inputs decoded by nvJPEG and by libjpeg-turbo, the same fallbacks and close vectors."""
    paths = [photo_like(tmp_path / f"turned{o}.jpg", 20 + o, (640, 360), orientation=o) for o in range(1, 9)]
    datas = [path.read_bytes() for path in paths]
    datas += [jpeg_bytes(smooth_image(1, (300, 200), "L")), jpeg_bytes(smooth_image(2, (300, 200)), progressive=True),
              grainy_jpeg(3, (1600, 1200)), jpeg_bytes(smooth_image(4, (40, 30), "CMYK")),
              jpeg_bytes(smooth_image(5, (120, 90)))[:-300], b"not an image"]
    encoder = encoder_for(tiny_model)
    transform = TensorTransform.from_open_clip(encoder.preprocess)
    assert transform is not None
    on_cpu = decode_batch(datas, "cpu", transform.resize_to, transform.mean, transform.std)
    on_gpu = decode_batch(datas, "cuda", transform.resize_to, transform.mean, transform.std)
    assert on_gpu.tensors.device.type == "cuda"
    assert on_gpu.rows == on_cpu.rows and sorted(on_gpu.fallbacks) == sorted(on_cpu.fallbacks) == [11, 12, 13]
    worst = (on_gpu.tensors.cpu() - on_cpu.tensors).abs().amax(dim=(1, 2, 3)) * 0.27 * 255
    assert float(worst.max()) <= 8.0, worst.tolist()  # nvJPEG's IDCT and upsampling differ from libjpeg's a little
    gpu_vectors, cpu_vectors = encoder.encode_tensors(on_gpu.tensors.cpu()), encoder.encode_tensors(on_cpu.tensors)
    assert min(float(np.dot(a, b)) for a, b in zip(gpu_vectors, cpu_vectors)) >= 0.999


@needs_cuda
def test_feeder_on_cuda_embeds_like_the_cpu_path(tiny_model: ModelSpec) -> None:
    encoder = Encoder(tiny_model.resolve(), device="cuda").load()
    feeder = thread_feeder(encoder)
    assert uses_gpu_decoding(encoder)
    assert feeder is not None and feeder.dtype == next(encoder.model.parameters()).dtype
    datas = [jpeg_bytes(smooth_image(i, (120 + 8 * i, 90))) for i in range(6)]
    batches = [[encoded_image(data) for data in datas[:3]], [b"broken", *datas[3:]]]
    results = list(feeder.embed_batches(batches))
    assert sorted(results[0].vectors) == [0, 1, 2] and sorted(results[1].vectors) == [1, 2, 3]
    assert list(results[1].fallbacks) == [0]
    expected = encoder_for(tiny_model).encode_images([decode_image(data).image for data in datas])
    got = [results[0].vectors[i] for i in range(3)] + [results[1].vectors[i] for i in range(1, 4)]
    assert min(float(np.dot(a, b)) for a, b in zip(got, expected)) >= 0.99  # fp16 weights on the GPU, fp32 here


def test_the_indexer_embeds_through_the_tensor_path_as_it_would_on_a_gpu(
    tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The indexer's wiring (rules._decode_into / embed_with / local lanes), forced onto the CPU:
    JPEGs go through GpuFeeder, what it refuses is decoded by the CPU path or reported, and the
    library ends up as an index run on the CPU path leaves it."""
    import clipdex.indexer.rules as rules
    from clipdex.indexer import index_paths
    from clipdex.search.media import gpu_decode
    from clipdex.search.library import Library

    photos = tmp_path / "photos"
    photos.mkdir()
    for number in range(5):
        (photos / f"p{number}.jpg").write_bytes(jpeg_bytes(smooth_image(number, (120, 90))))
    smooth_image(7, (40, 30)).save(photos / "drawing.png")
    (photos / "cmyk.jpg").write_bytes(jpeg_bytes(smooth_image(8, (40, 30), "CMYK")))
    (photos / "cut.jpg").write_bytes(jpeg_bytes(smooth_image(9, (120, 90)))[:-300])

    reference = Library.open(tmp_path / "cpu", model=tiny_model, create=True, device="cpu")
    expected_report = index_paths(reference, [photos], export_text=False)

    fed: list[int] = []
    real_embed = GpuFeeder.embed

    def counting_embed(self: GpuFeeder, images: list) -> object:  # type: ignore[type-arg]
        fed.append(len(images))
        return real_embed(self, images)

    def cpu_feeder(encoder: Encoder) -> GpuFeeder:
        transform = TensorTransform.from_open_clip(encoder.preprocess)
        assert transform is not None
        return GpuFeeder(encoder.model, transform, "cpu")

    monkeypatch.setattr(rules, "_decodes_on_gpu", lambda encoder: True)
    monkeypatch.setattr(gpu_decode, "thread_feeder", cpu_feeder)
    monkeypatch.setattr(GpuFeeder, "embed", counting_embed)
    library = Library.open(tmp_path / "gpu", model=tiny_model, create=True, device="cpu")
    report = index_paths(library, [photos], export_text=False, batch_size=4)

    assert sum(fed) == 6  # five JPEGs and the cut one went to the tensor path; the PNG and CMYK JPEG did not (headers)
    assert (report.added, sorted(f.path for f in report.failed)) == (
        expected_report.added, sorted(f.path for f in expected_report.failed))
    expected = {item.path: item for item in reference.catalog.get_items(reference.catalog.ids().tolist()).values()}
    got = {item.path: item for item in library.catalog.get_items(library.catalog.ids().tolist()).values()}
    assert sorted(got) == sorted(expected)
    for path, item in got.items():
        assert float(np.dot(item.vector_array(), expected[path].vector_array())) >= 0.999, path
        assert (item.width, item.height, item.content_hash) == (expected[path].width, expected[path].height,
                                                                 expected[path].content_hash)
    assert library.check()["ok"]
