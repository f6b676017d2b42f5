"""RAW photos: the embedded preview against a half-size demosaic, in time and in vectors.

    .venv/bin/python benchmarks/speed_raw.py [--count 4] [--megapixels 24] [--preview-side 1080] [--model vit|demo]

Writes COUNT DNGs of `data/shapes.py` scenes (12-bit RGGB, a camera's `--megapixels`, with an
embedded RGB preview whose shorter side is `--preview-side`, as cameras embed one) and, per
file, times the indexer's decode + preprocess (`decode_image` with the indexer's draft size,
then the model's preparation) by each path: the preview, and `postprocess(half_size=True)`.
Then embeds both with the model (ViT-B-32 at random weights by default: its input size and
cost; `--model demo`: the project's demo model, whose vectors mean something for these
scenes) and prints the cosine between the two paths' vectors of each file. Last, `index_paths`
indexes the folder (the model loaded beforehand) by each path: files per second, whole runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "data")]

import media_samples  # noqa: E402

from clipdex.search.encoders.torch_clip import TorchClipEncoder  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.media.raw import decode_raw  # noqa: E402

DEMO = HERE.parent / "data" / "demo-model"


def picture(seed: int, megapixels: float) -> np.ndarray:
    """A 3:2 picture of a scene at the camera's size."""
    height = int((megapixels * 1e6 / 1.5) ** 0.5) // 2 * 2
    width = int(height * 1.5) // 2 * 2
    scene, _ = media_samples.scene_picture(seed, 0, 512)
    return np.asarray(Image.fromarray(scene).resize((width, height), Image.Resampling.BILINEAR))


def index_rate(folder: Path, spec: ModelSpec, preview: bool) -> float:
    """Files per second of `index_paths` over the folder's DNGs (model loaded beforehand), by one path."""
    import functools

    import clipdex.search.media.imaging as imaging
    from clipdex.indexer import index_paths
    from clipdex.search.library import Library

    decode = imaging.decode_raw
    if not preview:
        imaging.decode_raw = functools.partial(decode, use_preview=False)  # type: ignore[assignment]
    try:
        library = Library.open(folder / f"library-{preview}", model=spec, create=True, device="cpu")
        library.encoder.load()
        started = time.perf_counter()
        report = index_paths(library, [folder], export_text=False)
        seconds = time.perf_counter() - started - report.export_seconds
        assert report.added and not report.failed, report.to_json()
        library.close()
    finally:
        imaging.decode_raw = decode
    return report.added / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--preview-side", type=int, default=1080)
    parser.add_argument("--model", choices=("vit", "demo"), default="vit")
    args = parser.parse_args()
    spec = (ModelSpec("ViT-B-32", "none") if args.model == "vit"
            else ModelSpec(str(DEMO / "clipdex-demo.json"), str(DEMO / "clipdex-demo.pt")))
    encoder = TorchClipEncoder(spec.resolve(), "cpu").load()
    draft = 2 * encoder.image_size
    times: dict[str, list[float]] = {"preview": [], "demosaic": []}
    vectors: dict[str, list[np.ndarray]] = {"preview": [], "demosaic": []}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.count):
            path = media_samples.write_dng(Path(folder) / f"{index}.dng", picture(100 + index, args.megapixels),
                                           orientation=(1, 6)[index % 2], preview_side=args.preview_side)
            data = path.read_bytes()
            for way in ("preview", "demosaic"):
                started = time.perf_counter()
                decoded = decode_raw(data, str(path), min_preview_side=draft, use_preview=way == "preview")
                assert decoded.source == way, (decoded.source, way)
                prepared = encoder.prepare(decoded.image)
                times[way].append(time.perf_counter() - started)
                vectors[way].append(encoder.encode_prepared(prepared[None])[0])
        size = f"{path.stat().st_size / 1e6:.0f} MB"
        indexing = {way: index_rate(Path(folder), spec, way == "preview") for way in ("preview", "demosaic")}
    cosines = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
               for a, b in zip(vectors["preview"], vectors["demosaic"])]
    print(f"{args.count} DNGs of {args.megapixels:g} MP ({size} each), preview shorter side {args.preview_side}, "
          f"model {args.model} (input {encoder.image_size} px)")
    for way in ("preview", "demosaic"):
        print(f"  {way:9s} decode + preprocess: median {statistics.median(times[way]) * 1000:7.0f} ms a file")
    ratio = statistics.median(times["demosaic"]) / statistics.median(times["preview"])
    print(f"  the preview is {ratio:.1f}x faster")
    for way in ("preview", "demosaic"):
        print(f"  clipdex indexing the folder by {way}: {indexing[way]:.2f} files/s")
    print(f"  cosine(preview, demosaic) per file: {', '.join(f'{c:.3f}' for c in cosines)} (mean {statistics.mean(cosines):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
