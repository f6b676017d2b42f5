"""Videos (MP4, MOV, M4V, MKV, WebM, AVI ...) to the moments worth embedding, through PyAV (FFmpeg).

`sample_video(path)` picks frames where the picture changes and at least every
`max_gap` seconds, at most `max_frames` of them, as upright RGB pictures with their times:

1. Keyframes only are decoded (`skip_frame="NONKEY"`): encoders put one at every scene cut
   and at a fixed interval (phones and cameras: about every second), so they are where
   the picture changes, found without decoding the frames between them. A keyframe is
   kept when it differs from the last kept one (a scene change: the mean difference of
   small grey thumbnails over `scene_threshold`) at least `min_gap` after it, or when
   `max_gap` has passed since it.
2. Where keyframes lie further apart than `max_gap` (an encoder's long default interval),
   the gap is filled: a seek to the keyframe before it and a decode forward, keeping a
   frame every `max_gap`.

Black and blank frames (nearly uniform: a fade, a lens cap) are never kept. The stream's
rotation (the display matrix phones write for portrait video) is applied; frames of any
pixel format and size (10-bit, HDR, odd sizes) are converted to 8-bit RGB by FFmpeg. A
frame that fails to decode costs that frame only; a file with no video stream, an
unsupported codec or no frame at all is `UnreadableVideo(path, reason)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from clipdex.search.errors import UnreadableVideo

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts", ".wmv", ".mpg",
                              ".mpeg", ".ogv"})
MISSING = "videos need PyAV: pip install 'clipdex[video]'"
THUMB_SIDE = 32  # the grey thumbnails that scene changes and blank frames are judged on


@dataclass(frozen=True)
class Sampling:
    """How a video's frames are chosen (see the module's docstring)."""

    max_gap: float = 4.0  # seconds: at least one frame this often (unless the picture is blank)
    min_gap: float = 0.5  # seconds: scene changes closer than this to the last kept frame are skipped
    max_frames: int = 300  # per video: a longer video gets a wider max_gap, so ten hours stay bounded
    scene_threshold: float = 12.0  # mean absolute difference (0-255) of the grey thumbnails that is a new scene
    blank_threshold: float = 4.0  # a frame whose grey thumbnail varies less than this (standard deviation) is blank
    picture_side: int = 448  # frames are kept with at most this shorter side (twice a 224-pixel model's input)


@dataclass
class SampledVideo:
    frames: list[tuple[float, Image.Image]] = field(default_factory=list)  # (seconds, upright RGB picture)
    duration: float = 0.0
    width: int = 0  # displayed, after rotation
    height: int = 0
    taken_at: datetime | None = None
    codec: str = ""
    skipped: int = 0  # frames that failed to decode

    def metadata(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "taken_at": self.taken_at}


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise UnreadableVideo("video", MISSING) from None
    return av


def sample_video(path: str | Path, sampling: Sampling = Sampling()) -> SampledVideo:
    """The frames of the video at `path` worth embedding, with its duration and metadata."""
    av = _av()
    name = str(path)
    try:
        container = av.open(name, "r", metadata_errors="ignore")
    except av.FFmpegError as error:
        raise UnreadableVideo(name, f"not a video FFmpeg can read ({_reason(error)})") from None
    with container:
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams})
            raise UnreadableVideo(name, f"no video stream (it holds {', '.join(kinds) or 'nothing'}: audio only?)")
        stream = container.streams.video[0]
        try:
            stream.codec_context.thread_type = "AUTO"
            codec = stream.codec_context.name
        except av.FFmpegError as error:
            raise UnreadableVideo(name, f"unsupported video codec ({_reason(error)})") from None
        result = SampledVideo(duration=_duration(container, stream), taken_at=_creation_time(container), codec=codec)
        sampler = _Sampler(sampling, result)
        try:
            keyframes = _keyframes(av, container, stream, result)
            for time, frame in keyframes:
                sampler.offer(time, frame)
            if sampler.gaps(result.duration):
                _fill_gaps(av, container, stream, sampler, result)
        except av.FFmpegError as error:
            if not sampler.kept:
                raise UnreadableVideo(name, f"cannot decode the video ({_reason(error)})") from None
            logger.debug("%s: the rest of the video is unreadable (%s); kept the frames before", name, _reason(error))
        except UnreadableVideo:
            raise
        result.frames = sorted(sampler.kept, key=lambda item: item[0])
    if not result.frames:
        reason = "no frame could be decoded" if not sampler.seen else "every frame is black or blank"
        raise UnreadableVideo(name, reason)
    if result.duration <= 0:
        result.duration = result.frames[-1][0]
    return result


def _keyframes(av: Any, container: Any, stream: Any, result: SampledVideo) -> Iterator[tuple[float, Any]]:
    """Every keyframe's (seconds, frame), decoding nothing else; a packet that fails to decode is skipped."""
    stream.codec_context.skip_frame = "NONKEY"
    try:
        for packet in container.demux(stream):  # the last, empty packet flushes the decoder's delayed frames
            if not packet.is_keyframe and packet.size:
                continue  # never handed to the decoder: skip_frame alone still costs each packet's parsing
            try:
                frames = packet.decode()
            except av.FFmpegError:
                result.skipped += 1
                continue
            for frame in frames:
                if frame.time is not None:
                    yield float(frame.time), frame
    finally:
        stream.codec_context.skip_frame = "DEFAULT"


def _fill_gaps(av: Any, container: Any, stream: Any, sampler: "_Sampler", result: SampledVideo) -> None:
    """Decode every frame inside each gap between keyframes (from the keyframe before it), offering each
    to the sampler: scene changes and the max_gap rule apply there as between keyframes."""
    for start, end in sampler.gaps(result.duration):
        if len(sampler.kept) >= sampler.limit:
            return
        container.seek(int(start / stream.time_base) if stream.time_base else 0, stream=stream, backward=True,
                       any_frame=False)
        stream.codec_context.flush_buffers()
        sampler.reference = None
        done = False
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                result.skipped += 1
                continue
            for frame in frames:
                if frame.time is None or frame.time < start - 1e-6:
                    continue
                if frame.time >= end - sampler.sampling.min_gap:
                    done = True
                    break
                sampler.offer(float(frame.time), frame, fill=True)
            if done or packet.pts is None:
                break


class _Sampler:
    """Which frames are kept, as they are offered in time order (keyframes, then each gap's frames)."""

    def __init__(self, sampling: Sampling, result: SampledVideo) -> None:
        self.sampling = sampling
        self.result = result
        self.gap = sampling.max_gap
        if result.duration > 0 and result.duration / sampling.max_gap > sampling.max_frames:
            self.gap = result.duration / sampling.max_frames  # a long recording: fewer frames, spread over all of it
        self.limit = sampling.max_frames
        self.kept: list[tuple[float, Image.Image]] = []
        self.reference: tuple[float, np.ndarray] | None = None  # the last kept (or gap-opening) frame's time and thumbnail
        self.seen = 0
        self.offered: list[float] = []  # times of the usable (non-blank) keyframes, for the gaps

    def offer(self, time: float, frame: Any, fill: bool = False) -> bool:
        """Keep the frame if it opens a new scene or the gap has passed; False when it is not kept."""
        self.seen += 1
        if len(self.kept) >= self.limit:
            return False
        gray = frame.to_ndarray(format="gray8", width=THUMB_SIDE, height=THUMB_SIDE).astype(np.float32)
        if float(gray.std()) < self.sampling.blank_threshold:
            return False  # black, white or blank: never a moment worth finding
        if fill and self.reference is None:  # a gap's opening keyframe: considered already
            self.reference = (time, gray)
            return False
        if not fill:
            self.offered.append(time)
        if self.reference is not None:
            since = time - self.reference[0]
            changed = float(np.abs(gray - self.reference[1]).mean()) > self.sampling.scene_threshold
            if not (since >= self.gap or (changed and since >= self.sampling.min_gap)):
                return False
        self.kept.append((time, _picture(frame, self.sampling.picture_side, self.result)))
        self.reference = (time, gray)
        return True

    def gaps(self, duration: float) -> list[tuple[float, float]]:
        """(start, end) spans longer than the gap with no usable keyframe inside, as far as they go."""
        times = sorted(self.offered)
        if not times:
            return []
        ends = times[1:] + [max(duration, times[-1])]
        return [(start, end) for start, end in zip(times, ends) if end - start > self.gap + self.sampling.min_gap]


def _picture(frame: Any, side: int, result: SampledVideo) -> Image.Image:
    """The frame as upright 8-bit RGB, its shorter side at most `side`."""
    width, height = int(frame.width), int(frame.height)
    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
    if rotation in (90, 270):
        result.width, result.height = height, width
    else:
        result.width, result.height = width, height
    scale = min(1.0, side / max(1, min(width, height)))
    out_width, out_height = max(2, round(width * scale)), max(2, round(height * scale))
    image = frame.to_image(width=out_width, height=out_height)  # FFmpeg converts any pixel format to RGB24
    if rotation == 90:  # FFmpeg's rotation is counter-clockwise, as the display matrix says
        image = image.transpose(Image.Transpose.ROTATE_90)
    elif rotation == 180:
        image = image.transpose(Image.Transpose.ROTATE_180)
    elif rotation == 270:
        image = image.transpose(Image.Transpose.ROTATE_270)
    return image


def _duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000
    return 0.0


def _creation_time(container: Any) -> datetime | None:
    value = (container.metadata or {}).get("creation_time")
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.replace(tzinfo=None, microsecond=0)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def video_frame_jpeg(path: str | Path, seconds: float, size: int = 256, quality: int = 85) -> bytes:
    """The frame at `seconds` (the first decodable one at or after it) as a JPEG whose longer side is at most `size`."""
    import io

    image, _ = video_frame(path, seconds, size)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def video_frame(path: str | Path, seconds: float, size: int = 256) -> tuple[Image.Image, float]:
    """The frame at `seconds` (the first decodable one at or after it), upright, its longer side at
    most `size`, and its own time in seconds."""
    av = _av()
    name = str(path)
    try:
        with av.open(name, "r", metadata_errors="ignore") as container:
            if not container.streams.video:
                raise UnreadableVideo(name, "no video stream")
            stream = container.streams.video[0]
            if stream.time_base:
                container.seek(int(max(0.0, seconds) / stream.time_base), stream=stream, backward=True)
            holder = SampledVideo()
            for frame in container.decode(stream):
                if frame.time is not None and frame.time + 1e-3 >= seconds:
                    image, shown_at = _picture(frame, size, holder), float(frame.time)
                    break
            else:
                raise UnreadableVideo(name, f"no frame at {seconds:g} s")
    except av.FFmpegError as error:
        raise UnreadableVideo(name, f"cannot decode the video ({_reason(error)})") from None
    image.thumbnail((size, size))
    return image, shown_at
