"""Videos: indexing a 1080p H.264 video at default sampling, against its running time.

    .venv/bin/python benchmarks/speed_video.py [--minutes 10] [--fps 30] [--keyframe-seconds 1] [--scene-seconds 20]

Writes a 1920 x 1080 H.264 video of `--minutes` (x264 preset veryfast, a keyframe every
`--keyframe-seconds` as phones and cameras write them: about every second; 0 leaves x264's
default of 250 frames), showing `data/shapes.py` scenes that change every `--scene-seconds`,
each panning slowly (every frame differs from the last, so P-frames carry real motion). Then,
with ViT-B-32 at random weights on the CPU (the compute of the pretrained model; the model is
loaded beforehand), it times:

- `sample_video` alone: the moments clipdex's default sampling keeps, and their decoding;
- `index_paths` on the folder: sampling, preprocessing, embedding and committing, as
  `clipdex index` does it.

Target: indexing at >= 20x real time (a 10-minute video in at most 30 s).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "data")]

import media_samples  # noqa: E402
from speed_report import at_least, info, report  # noqa: E402

from clipdex.indexer import index_paths  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.media.video import sample_video  # noqa: E402

MODEL = ModelSpec("ViT-B-32", "none")
WIDTH, HEIGHT = 1920, 1080


def write_long_video(path: Path, minutes: float, fps: int, keyframe_seconds: float, scene_seconds: float) -> float:
    """The benchmark's video; the seconds it took to make."""
    import av

    started = time.perf_counter()
    total = int(minutes * 60 * fps)
    per_scene = int(scene_seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = Fraction(1, fps)
        if keyframe_seconds:
            stream.codec_context.gop_size = max(1, round(keyframe_seconds * fps))
        canvas = None
        for index in range(total):
            if index % per_scene == 0:
                scene, _ = media_samples.scene_picture(2024, index // per_scene, 540)
                canvas = np.asarray(Image.fromarray(scene).resize((WIDTH + 240, HEIGHT + 240), Image.Resampling.BILINEAR))
            assert canvas is not None
            shift = (index % per_scene) * 240 // per_scene  # a slow pan across the scene
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas[shift:shift + HEIGHT, shift:shift + WIDTH]),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--keyframe-seconds", type=float, default=1.0)
    parser.add_argument("--scene-seconds", type=float, default=20.0)
    args = parser.parse_args()
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="clipdex-speed-video-") as scratch:
        folder = Path(scratch) / "videos"
        folder.mkdir()
        path = folder / "long.mp4"
        made = write_long_video(path, args.minutes, args.fps, args.keyframe_seconds, args.scene_seconds)
        size = path.stat().st_size / 1e6
        print(f"wrote {args.minutes:g} min of 1080p{args.fps} H.264 ({size:.0f} MB, keyframe every "
              f"{args.keyframe_seconds:g} s) in {made:.0f} s", flush=True)
        started = time.perf_counter()
        sampled = sample_video(path)
        sampling = time.perf_counter() - started
        print(f"sample_video: {len(sampled.frames)} moments in {sampling:.1f} s", flush=True)
        library = Library.open(Path(scratch) / "library", model=MODEL, create=True, device="cpu")
        library.encoder.load()  # loading the model is not part of any figure
        started = time.perf_counter()
        result = index_paths(library, [folder], export_text=False)
        indexing = time.perf_counter() - started - result.export_seconds
        assert result.added == 1 and not result.failed, result.to_json()
        library.close()
    label = f"{args.minutes:g} min 1080p H.264, keyframe every {args.keyframe_seconds:g} s"
    figures = [
        at_least(f"video indexing vs real time ({label})", f"{seconds / indexing:.1f}x ({indexing:.1f} s)",
                 "20x real time", seconds / indexing / 20, 1.0),
        info("sampling alone (decode keyframes, pick moments)", f"{sampling:.1f} s, {len(sampled.frames)} moments",
             f"{seconds:.0f} s of video", seconds / sampling),
    ]
    return 0 if report("Video indexing (ViT-B-32, random weights, CPU)", figures) else 1


if __name__ == "__main__":
    sys.exit(main())
