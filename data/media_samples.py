"""Generated RAW photos (DNG) and videos of `shapes.py` scenes, for the tests, `make demo` and
the benchmarks: nothing is downloaded.

- `write_dng`: a Bayer (RGGB) DNG of an RGB picture, written with tifffile, optionally stored
  sideways with an EXIF orientation and with an embedded RGB preview (as many DNGs have);
- `write_video`: an H.264 (or MPEG-4) video through PyAV, each scene shown for some seconds.

CLI::

    python data/media_samples.py dng OUT.dng [--seed S] [--size PX] [--orientation 6] [--preview]
    python data/media_samples.py video OUT.mp4 [--seed S] [--scenes N] [--seconds 3] [--size PX]
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

WHITE_LEVEL = 4095  # 12-bit sensor values
# XYZ (D65) to linear sRGB, as the DNG's ColorMatrix1 (SRATIONALs over 10000)
_XYZ_TO_SRGB = tuple(value for number in (32406, -15372, -4986, -9689, 18758, 415, 557, -2040, 10570)
                     for value in (number, 10000))
# stored = np.rot90(upright, k) for each EXIF orientation a camera writes
_STORED_TURNS = {1: 0, 3: 2, 6: 1, 8: 3}


def write_dng(path: str | Path, upright: np.ndarray, orientation: int = 1, preview_side: int | None = None,
              make: str = "Clipdex", model: str = "Shapes Sensor 1", taken: str = "2024:07:31 18:30:00") -> Path:
    """Write `upright` (H x W x 3, uint8) as a 12-bit RGGB DNG stored turned for `orientation`
    (1, 3, 6 or 8), with an embedded RGB preview whose shorter side is `preview_side` (None: none)."""
    import tifffile

    stored = np.ascontiguousarray(np.rot90(upright, _STORED_TURNS[orientation]))
    height, width, _ = stored.shape
    linear = (stored.astype(np.float32) / 255.0) ** 2.2 * WHITE_LEVEL
    cfa = np.empty((height, width), np.uint16)
    cfa[0::2, 0::2] = linear[0::2, 0::2, 0]
    cfa[0::2, 1::2] = linear[0::2, 1::2, 1]
    cfa[1::2, 0::2] = linear[1::2, 0::2, 1]
    cfa[1::2, 1::2] = linear[1::2, 1::2, 2]
    cfa_tags = [(33421, "H", 2, (2, 2), True), (33422, "B", 4, (0, 1, 1, 2), True), (50717, "I", 1, WHITE_LEVEL, True)]
    dng_tags = [
        (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
        (50708, "s", 0, f"{make} {model}", True),  # UniqueCameraModel
        (271, "s", 0, make, True), (272, "s", 0, model, True), (274, "H", 1, orientation, True),
        (306, "s", 0, taken, True),
        (50721, "2i", 9, _XYZ_TO_SRGB, True),  # ColorMatrix1: the sensor's colours are linear sRGB
        (50778, "H", 1, 21, True),  # CalibrationIlluminant1: D65
        (50728, "2I", 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        if preview_side is None:
            tif.write(cfa, photometric=32803, extratags=dng_tags + cfa_tags, metadata=None)
        else:
            scale = preview_side / min(height, width)
            preview = Image.fromarray(stored).resize((max(1, round(width * scale)), max(1, round(height * scale))))
            tif.write(np.asarray(preview), photometric="rgb", subfiletype=1, extratags=dng_tags, subifds=1, metadata=None)
            tif.write(cfa, photometric=32803, subfiletype=0, extratags=cfa_tags, metadata=None)
    return path


def scene_picture(seed: int, index: int = 0, size: int = 256) -> tuple[np.ndarray, str]:
    """The `index`-th scene of `seed` as (RGB array, canonical caption)."""
    rng = np.random.default_rng([seed, index])
    scene = shapes.sample_scene(rng)
    return np.asarray(shapes.render(scene, rng, image_size=size).convert("RGB")), shapes.canonical_caption(scene)


def write_video(path: str | Path, pictures: Sequence[np.ndarray], seconds_each: float = 3.0, fps: int = 10,
                codec: str = "h264", rotation: int = 0, noise: float = 2.0, seed: int = 0,
                keyframe_seconds: float | None = None) -> Path:
    """Write `pictures` (equal-sized RGB arrays) as one video, each shown for `seconds_each`,
    with a little pixel noise per frame (a camera's grain); `rotation` (degrees) is stored
    as the stream's display matrix, the way phones store portrait video; `keyframe_seconds`: a
    keyframe this often (phones: about every second; None: the encoder's default)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width, _ = pictures[0].shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        if keyframe_seconds:
            stream.codec_context.gop_size = max(1, round(keyframe_seconds * fps))
        if rotation:
            stream.set_display_rotation(rotation)  # the display matrix, counter-clockwise degrees
        frames_each = max(1, round(seconds_each * fps))
        for picture in pictures:
            for _ in range(frames_each):
                noisy = np.clip(picture.astype(np.float32) + rng.normal(0, noise, picture.shape), 0, 255).astype(np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("dng", "video"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--orientation", type=int, default=1, choices=(1, 3, 6, 8))
    parser.add_argument("--preview", type=int, default=None, help="embed a preview with this shorter side")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.what == "dng":
        picture, caption = scene_picture(args.seed, 0, args.size)
        write_dng(args.out, picture, args.orientation, args.preview)
        print(f"{args.out}\t{caption}")
        return
    scenes = [scene_picture(args.seed, index, args.size) for index in range(args.scenes)]
    write_video(args.out, [picture for picture, _ in scenes], args.seconds)
    for index, (_, caption) in enumerate(scenes):
        print(f"{args.out}\t{index * args.seconds:g}-{(index + 1) * args.seconds:g}s\t{caption}")


if __name__ == "__main__":
    main()
