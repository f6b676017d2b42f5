"""JPEG decoding and preprocessing as tensors, in batches, on the model's device (nvJPEG on a GPU).

On a GPU the model embeds a 12 MP photo far faster than a CPU core decodes it, so on
CUDA the JPEGs are decoded by nvJPEG (torchvision's batched `decode_jpeg(list, device=
"cuda")`) and resized, cropped and normalized as tensors on the GPU, where open_clip's
transform would run on Pillow images on the CPU. The same code runs on "cpu" (there
torchvision decodes with libjpeg-turbo): that is how the tests check, without a GPU,
that its vectors stay at cosine >= 0.999 of open_clip's preprocess.

Why torchvision's decoder and not TorchCodec's: torchvision 0.29 is already a dependency,
built for the pinned torch, and its batched CUDA decode needs nothing more. TorchCodec
(0.16+ decodes JPEGs, on CUDA too) would be one more binary package that must match
torch's exact build, its CUDA builds included, for no gain here. torchvision deprecates
its decoders in 0.29 but still ships them; the one call is in `_decode_jpegs`, so that
moving to TorchCodec's `decode_jpeg(..., device="cuda")` later changes one function.

What is not decoded here falls back to the CPU path (Pillow, `imaging.decode_image`)
file by file, with the reason: other formats, CMYK/YCCK JPEGs (Adobe's inverted CMYK is
Pillow's business), images over Pillow's pixel limit, and JPEGs the decoder refuses
(corrupt or truncated data, or anything nvJPEG cannot do).

`GpuFeeder` adds the mechanics that only matter on CUDA: bytes in pinned memory, decode
and model on two CUDA streams so that decoding batch k+1 overlaps the forward of batch
k, fp16 inputs for fp16 weights, vectors copied back asynchronously, and decode
sub-batches sized to the GPU's free memory. Catalog commits stay with the caller, on the
CPU. torch and torchvision are imported inside the functions.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from clipdex.search.errors import UnreadableImage
from clipdex.search.media.imaging import MAX_IMAGE_PIXELS, ImageHeader, middle_to_resize, read_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera JPEG with a second picture appended; the first is decoded
DECODABLE_MODES = ("RGB", "L")  # YCbCr or grayscale JPEGs; CMYK/YCCK go to Pillow


@dataclass(frozen=True)
class TensorTransform:
    """open_clip's inference transform, as tensor operations.

    Resize the shorter side to `resize_to` (bicubic, antialiased, clamped to [0, 255] as
    Pillow's uint8 output is), center crop to `crop_size`, scale to [0, 1], normalize.
    """

    resize_to: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_open_clip(cls, preprocess: Any) -> "TensorTransform | None":
        """The transform of an open_clip preprocess `Compose`, or None if it is not the one reproduced here.

        Reproduced: Resize(int, bicubic) then CenterCrop then (convert to RGB, to tensor)
        then Normalize, open_clip's default for inference. Anything else (another
        interpolation, "squash" or "longest" resize modes, extra steps) returns None: the
        caller keeps the CPU path, which runs open_clip's transform itself.
        """
        from torchvision import transforms

        steps = list(getattr(preprocess, "transforms", []))
        kinds = [getattr(step, "__name__", type(step).__name__) for step in steps]  # older open_clip: a function
        if kinds not in (["Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"],
                         ["Resize", "CenterCrop", "_convert_to_rgb", "ToTensor", "Normalize"]):
            return None
        resize, crop, normalize = steps[0], steps[1], steps[-1]
        size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
        if not isinstance(size, int) or resize.max_size is not None:
            return None
        if resize.interpolation != transforms.InterpolationMode.BICUBIC:
            return None
        crop_height, crop_width = crop.size
        if crop_height != crop_width:
            return None
        return cls(size, int(crop_height), tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std))


@dataclass
class DecodedBatch:
    """The outcome of `decode_batch` for a list of files' bytes.

    `tensors[row]` is the preprocessed image of input `rows[row]`; `headers` has the
    metadata of each decoded input; `fallbacks` maps every other input's index to the
    reason it must take the CPU path. Every input is in exactly one of `rows` and `fallbacks`.
    """

    tensors: "torch.Tensor"  # (len(rows), 3, crop, crop) float32 on the device
    rows: list[int]
    headers: dict[int, ImageHeader] = field(default_factory=dict)
    fallbacks: dict[int, str] = field(default_factory=dict)


def gpu_header(data: bytes) -> ImageHeader | str:
    """The header of a JPEG this module decodes, or why the file takes the CPU path instead."""
    try:
        header = read_header(data)
    except UnreadableImage as error:
        return error.reason
    if header.format not in JPEG_FORMATS:
        return f"{header.format or 'unknown'} image, not a JPEG"
    if header.mode not in DECODABLE_MODES:
        return f"{header.mode} JPEG (only YCbCr and grayscale JPEGs are decoded as tensors)"
    if header.stored_width * header.stored_height > MAX_IMAGE_PIXELS:
        return "more pixels than allowed (the CPU path says how many)"
    return header


def decode_batch(
    datas: Sequence[Any],
    device: "str | torch.device",
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_size: int | None = None,
    headers: dict[int, ImageHeader | str] | None = None,
) -> DecodedBatch:
    """Decode JPEG bytes on `device` into a batch of model inputs; the rest is reported for the CPU path.

    `datas`: each file's bytes, as `bytes` or a 1-D uint8 CPU tensor (pinned, on CUDA).
    `image_size`: the shorter side after the resize; `crop_size` (default the same) the
    side of the center crop. `headers`: `gpu_header` of each input, when the caller has
    read them already (in its reader threads). The whole batch is decoded in one call;
    if the decoder refuses it (it returns nothing when one image fails), each image is
    decoded alone to find the ones to fall back.
    """
    import torch

    device = torch.device(device)
    transform = TensorTransform(image_size, crop_size or image_size, tuple(mean), tuple(std))
    fallbacks: dict[int, str] = {}
    accepted: dict[int, ImageHeader] = {}
    for index, data in enumerate(datas):
        header = headers[index] if headers is not None and index in headers else gpu_header(_as_bytes(data))
        if isinstance(header, str):
            fallbacks[index] = header
        else:
            accepted[index] = header
    order = list(accepted)
    images = _decode_jpegs([_as_tensor(datas[index]) for index in order], device) if order else []
    decoded: dict[int, "torch.Tensor"] = {}
    if images is None:  # one bad image fails the whole call: decode them one by one
        for index in order:
            single = _decode_jpegs([_as_tensor(datas[index])], device)
            if single is None:
                fallbacks[index] = "the JPEG decoder refused it"
            else:
                decoded[index] = single[0]
    else:
        decoded = dict(zip(order, images))
    rows: list[int] = []
    tensors: list["torch.Tensor"] = []
    for index in order:
        if index not in decoded:
            continue
        image = decoded.pop(index)  # let each full-resolution image go once it is resized
        header = accepted[index]
        if tuple(image.shape[-2:]) != (header.stored_height, header.stored_width):
            fallbacks[index] = f"decoded as {image.shape[-1]}x{image.shape[-2]}, not the {header.stored_width}x{header.stored_height} of its header"
            continue
        tensors.append(preprocess_tensor(orient(image, header.orientation), transform))
        rows.append(index)
    crop = transform.crop_size
    batch = torch.stack(tensors) if tensors else torch.zeros((0, 3, crop, crop), device=device)
    return DecodedBatch(batch, rows, {index: accepted[index] for index in rows}, dict(sorted(fallbacks.items())))


def _decode_jpegs(tensors: list["torch.Tensor"], device: "torch.device") -> list["torch.Tensor"] | None:
    """RGB uint8 (3, H, W) tensors on `device`, or None if the decoder refused any of them."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice, once per call otherwise
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError) as error:
            log.debug("JPEG decoder refused a batch of %d: %s", len(tensors), str(error).splitlines()[0][:200])
            return None


def orient(image: "torch.Tensor", orientation: int) -> "torch.Tensor":
    """Apply EXIF orientation to a (C, H, W) tensor, as Pillow's `ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return image.transpose(-1, -2).flip(-2)
    return image


def preprocess_tensor(image: "torch.Tensor", transform: TensorTransform) -> "torch.Tensor":
    """open_clip's inference transform on one RGB uint8 (3, H, W) tensor: a float32 (3, crop, crop) tensor.

    Of a long thin image, only the middle of its long side is resized (`imaging.middle_to_resize`),
    as on the CPU path: a 1x65000 JPEG would otherwise become 224 x 14.6 million floats on the GPU.
    """
    import torch
    from torchvision.transforms.v2 import functional as F

    box = middle_to_resize(int(image.shape[-1]), int(image.shape[-2]), transform.resize_to)
    if box is not None:
        left, top, right, bottom = box
        image = image[..., top:bottom, left:right]
    resized = F.resize(image.float(), [transform.resize_to], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    cropped = F.center_crop(resized.clamp_(0.0, 255.0), [transform.crop_size, transform.crop_size])
    mean = torch.tensor(transform.mean, device=image.device).view(3, 1, 1) * 255.0
    std = torch.tensor(transform.std, device=image.device).view(3, 1, 1) * 255.0
    return (cropped - mean) / std


def decode_chunks(headers: Sequence[ImageHeader], budget_bytes: int) -> list[list[int]]:
    """Split a batch into runs of consecutive indices whose decoded RGB pixels fit in `budget_bytes`.

    nvJPEG holds every image of a call at full resolution at once: 64 camera photos are
    2.3 GB. A single image larger than the budget gets a run of its own.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, header in enumerate(headers):
        size = 3 * header.stored_width * header.stored_height
        if current and used + size > budget_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        chunks.append(current)
    return chunks


def _as_bytes(data: Any) -> bytes:
    return data if isinstance(data, bytes) else bytes(data.numpy().tobytes())


def _as_tensor(data: Any) -> "torch.Tensor":
    import torch

    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def pinned_bytes(data: bytes) -> "torch.Tensor":
    """A file's bytes as a 1-D uint8 tensor, in page-locked memory when CUDA is there (a faster copy to the GPU)."""
    import torch

    pin = torch.cuda.is_available()
    tensor = torch.empty(len(data), dtype=torch.uint8, pin_memory=pin)
    tensor.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return tensor


@dataclass
class EncodedImage:
    """A file's bytes ready for the tensor path, with its header read (both done on a reader thread)."""

    data: Any  # bytes, or a 1-D uint8 tensor in pinned memory (see `encoded_image`)
    header: ImageHeader | str  # `gpu_header(data)`: the header, or why the CPU path must decode it

    def as_bytes(self) -> bytes:
        """The file's bytes, for the CPU path when the tensor path sends the file back."""
        return _as_bytes(self.data)


def encoded_image(data: bytes) -> EncodedImage:
    """Read the header of a file's bytes and, if the tensor path will decode them, put them in pinned memory."""
    header = gpu_header(data)
    return EncodedImage(data if isinstance(header, str) else pinned_bytes(data), header)


@dataclass
class Embedded:
    """The vectors of one batch given to `GpuFeeder`: by input index, and the inputs for the CPU path."""

    vectors: dict[int, np.ndarray]
    headers: dict[int, ImageHeader]
    fallbacks: dict[int, str]


class GpuFeeder:
    """Decode on one stream, embed on another, copy vectors back asynchronously; one batch in flight.

    `model`: an open_clip model already on `device` (fp16 on CUDA, as `Encoder` loads it).
    On "cpu" there are no streams, no pinned memory and nothing asynchronous; the same
    code runs, which is what the tests and the benchmark's dry run check. Use
    `GpuFeeder.for_encoder`, which gives one only when the model runs on CUDA.
    """

    MEMORY_SHARE = 0.25  # of the GPU memory free at start, for one decode call's full-resolution images
    CPU_BUDGET = 1 << 30

    def __init__(self, model: Any, transform: TensorTransform, device: "str | torch.device") -> None:
        import torch

        self.model = model
        self.transform = transform
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        cuda = self.device.type == "cuda"
        self.decode_stream = torch.cuda.Stream(self.device) if cuda else None
        self.model_stream = torch.cuda.Stream(self.device) if cuda else None
        self.decode_budget = int(torch.cuda.mem_get_info(self.device)[0] * self.MEMORY_SHARE) if cuda else self.CPU_BUDGET

    @classmethod
    def for_encoder(cls, encoder: Any) -> "GpuFeeder | None":
        """A feeder for a loaded `Encoder` whose model runs on CUDA with open_clip's usual transform; else None."""
        if getattr(encoder, "device", "cpu") != "cuda":
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        transform = TensorTransform.from_open_clip(encoder.preprocess)
        return cls(encoder.model, transform, "cuda") if transform is not None else None

    def embed(self, images: Sequence[EncodedImage | bytes]) -> Embedded:
        """Embed one batch of files (see `embed_batches`)."""
        return next(self.embed_batches([images]))

    def embed_batches(self, batches: Iterable[Sequence[EncodedImage | bytes]]) -> Iterator[Embedded]:
        """Embed batches of files in order, decoding batch k+1 while the model runs batch k.

        Each file is an `EncodedImage` (from `encoded_image`, on the caller's reader
        threads) or plain bytes (their header is then read here). Each result says, by
        index in its batch, the vectors and headers of the files decoded here and the
        reason for each file that the CPU path must decode instead.
        """
        pending: tuple[DecodedBatch, Any, Any] | None = None
        for datas in batches:
            decoded = self._decode(datas)  # overlaps the forward launched last round
            if pending is not None:
                yield self._collect(*pending)
            pending = (decoded, *self._launch(decoded))
        if pending is not None:
            yield self._collect(*pending)

    def _decode(self, images: Sequence[EncodedImage | bytes]) -> DecodedBatch:
        import torch

        encoded = [image if isinstance(image, EncodedImage) else encoded_image(image) for image in images]
        datas = [image.data for image in encoded]
        headers_of = {index: image.header for index, image in enumerate(encoded)}
        accepted = {index: header for index, header in headers_of.items() if not isinstance(header, str)}
        fallbacks = {index: header for index, header in headers_of.items() if isinstance(header, str)}
        good = list(accepted)
        parts: list[DecodedBatch] = []
        with _on_stream(self.decode_stream):  # every kernel of the batch, the final cat too, on the decode stream
            for chunk in decode_chunks(list(accepted.values()), self.decode_budget):
                members = [good[position] for position in chunk]
                part = decode_batch([datas[index] for index in members], self.device, self.transform.resize_to,
                                    self.transform.mean, self.transform.std, self.transform.crop_size,
                                    headers={position: headers_of[index] for position, index in enumerate(members)})
                part.rows = [members[row] for row in part.rows]
                part.headers = {members[row]: header for row, header in part.headers.items()}
                fallbacks.update({members[row]: reason for row, reason in part.fallbacks.items()})
                parts.append(part)
            tensors = [part.tensors for part in parts if len(part.rows)]
            crop = self.transform.crop_size
            batch = torch.cat(tensors) if tensors else torch.zeros((0, 3, crop, crop), device=self.device)
        rows = [row for part in parts for row in part.rows]
        headers = {index: header for part in parts for index, header in part.headers.items()}
        return DecodedBatch(batch, rows, headers, dict(sorted(fallbacks.items())))

    def _launch(self, decoded: DecodedBatch) -> tuple[Any, Any]:
        """Start the forward of a decoded batch on the model stream; returns (host vectors, done event)."""
        import torch

        if not decoded.rows:
            return None, None
        if self.model_stream is not None and self.decode_stream is not None:
            self.model_stream.wait_stream(self.decode_stream)
        with _on_stream(self.model_stream), torch.inference_mode():
            inputs = decoded.tensors.to(self.dtype)
            features = self.model.encode_image(inputs, normalize=True).float()
            if self.model_stream is None:
                return features, None
            decoded.tensors.record_stream(self.model_stream)
            host = torch.empty(features.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(features, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.model_stream)
            return host, done

    def _collect(self, decoded: DecodedBatch, host: Any, done: Any) -> Embedded:
        if done is not None:
            done.synchronize()
        vectors = host.numpy().astype(np.float32, copy=False) if host is not None else np.zeros((0, 0), np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True) if len(vectors) else vectors
        vectors = vectors / np.maximum(norms, 1e-12) if len(vectors) else vectors
        return Embedded({index: vectors[row] for row, index in enumerate(decoded.rows)}, decoded.headers, decoded.fallbacks)


def uses_gpu_decoding(encoder: Any) -> bool:
    """Whether files for `encoder` go to the tensor path: its model runs on CUDA with open_clip's usual transform.

    Loads the model (its device is known only then). Reader threads ask this before
    `encoded_image`; model lanes then embed through `thread_feeder`.
    """
    return encoder.preprocess is not None and encoder.device == "cuda" and (
        TensorTransform.from_open_clip(encoder.preprocess) is not None)


_feeders = threading.local()


def thread_feeder(encoder: Any) -> GpuFeeder | None:
    """This thread's `GpuFeeder` for `encoder` (`GpuFeeder.for_encoder`: None unless it runs on CUDA).

    One per thread: each model lane gets its own pair of streams, so one lane's decoding
    overlaps another's forward.
    """
    cached = getattr(_feeders, "value", None)
    if cached is None or cached[0] is not encoder:
        cached = (encoder, GpuFeeder.for_encoder(encoder))
        _feeders.value = cached
    return cached[1]


class _on_stream:
    """`torch.cuda.stream(stream)`, or nothing when there is no stream (on the CPU)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.context: Any = None

    def __enter__(self) -> None:
        if self.stream is not None:
            import torch

            self.context = torch.cuda.stream(self.stream)
            self.context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)
