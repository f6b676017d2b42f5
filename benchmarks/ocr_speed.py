"""OCR: speed of the OCR pass on 12-MP photos, and word recall@3 on rendered images by kind.

1. Speed, whole processes: writes `--photos` photo-like 12 MP JPEGs (benchmarks/speed_data.py),
   `--with-text` of them with a sign of two words painted on (white on green, about 2% of the
   photo's height), indexes them (`clipdex index`, the demo model: the model is not what is
   measured) and then runs `clipdex ocr` as its own process: photos/s of the pass (target
   >= 2 on this machine). Then, in this process, the per-photo cost of OCR with and without
   text (decode included), at the default detector size and at `--also-detect-side`.
2. Word recall@3: renders `--per-kind` images of each kind (tests/text_images.py: screenshots,
   signs on photos, tilted receipts, posters, turned text; two words each, DejaVu fonts),
   indexes them with --ocr into a new library, and asks each word by `--mode keyword` and
   `--mode hybrid`: recall@3 is the share of words whose image is among the first 3 hits.

    .venv/bin/python benchmarks/ocr_speed.py [--photos 40] [--with-text 4] [--per-kind 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from speed_data import write_photos  # noqa: E402

from clipdex.indexer import index_paths  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from clipdex.search.media.ocr import OcrSettings, TextReader  # noqa: E402
from tests.text_images import FONTS, render_set  # noqa: E402

DEMO = ModelSpec(str(ROOT / "data" / "demo-model" / "clipdex-demo.json"), str(ROOT / "data" / "demo-model" / "clipdex-demo.pt"))
SIGN_WORDS = [("walnut", "harbour"), ("lantern", "meadow"), ("copper", "violet"), ("saffron", "glacier"),
              ("orchid", "falcon"), ("pepper", "canyon"), ("marble", "thistle"), ("cobalt", "juniper")]


def paint_sign(path: Path, words: Sequence[str]) -> None:
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    draw = ImageDraw.Draw(image)
    size = image.height // 40  # letters ~2% of the photo's height: a shop sign across a street
    font = ImageFont.truetype(str(FONTS / "DejaVuSans-Bold.ttf"), size)
    x, y = image.width // 3, image.height // 3
    draw.rectangle((x - size, y - size, x + size * 9, y + size * 3 * len(words) + size), fill=(16, 90, 40))
    for row, word in enumerate(words):
        draw.text((x, y + row * size * 3), word.upper(), font=font, fill=(250, 250, 250))
    image.save(path, quality=92)


def clipdex(*args: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipdex.cli", *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"clipdex {' '.join(args)} failed: {done.stderr}")
    return wall, json.loads(done.stdout)


def speed(work: Path, photos: int, with_text: int, also_side: int) -> dict[str, Any]:
    paths = write_photos(work / "photos", photos)
    for path, words in zip(paths[:with_text], SIGN_WORDS):
        paint_sign(path, words)
    library = work / "library"
    clipdex("index", str(work / "photos"), "--library", str(library), "--model", DEMO.name, "--pretrained",
            DEMO.pretrained, "--quiet")
    wall, report = clipdex("ocr", "--library", str(library), "--quiet")
    found = 0
    with Library.open(library) as opened:
        for path, words in zip(paths[:with_text], SIGN_WORDS):
            hits = opened.search(text=words[0], mode="keyword", k=3)
            found += str(path) in [hit.path for hit in hits]
    result: dict[str, Any] = {"photos": photos, "with_text": with_text, "ocr_wall_s": round(wall, 2),
                              "photos_per_s": round(photos / wall, 2), "text_found": report["with_text"],
                              "signs_found_by_keyword": found}
    for side in (OcrSettings().detect_side, also_side):
        reader = TextReader(OcrSettings(detect_side=side))
        reader.read(paths[-1])  # loads the models
        costs = {"without_text": [], "with_text": []}
        for number, path in enumerate(paths[: max(with_text, 1) * 2]):
            started = time.perf_counter()
            reader.read(path)
            costs["with_text" if number < with_text else "without_text"].append(time.perf_counter() - started)
        result[f"detect_side_{side}"] = {key: round(median(values), 3) for key, values in costs.items() if values}
    return result


def recall(work: Path, per_kind: int) -> dict[str, Any]:
    made = render_set(work / "rendered", per_kind=per_kind, seed=7)
    with Library.open(work / "rendered-library", model=DEMO, create=True, device="cpu") as library:
        index_paths(library, [work / "rendered"], ocr=True)
        by_kind: dict[str, dict[str, list[int]]] = {}
        for path, (kind, words) in made.items():
            for word in words:
                for mode in ("keyword", "hybrid"):
                    hits = library.search(text=word, mode=mode, k=3)
                    by_kind.setdefault(kind, {}).setdefault(mode, []).append(int(str(path) in [h.path for h in hits]))
    return {kind: {mode: round(sum(found) / len(found), 3) for mode, found in modes.items()} | {"words": len(modes["keyword"])}
            for kind, modes in by_kind.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--with-text", type=int, default=4)
    parser.add_argument("--per-kind", type=int, default=8)
    parser.add_argument("--also-detect-side", type=int, default=736)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-ocr-bench-") as folder:
        work = Path(folder)
        results = {"speed": speed(work, args.photos, args.with_text, args.also_detect_side),
                   "recall_at_3": recall(work, args.per_kind) if args.per_kind else None, "cpus": os.cpu_count(),
                   "load_average": os.getloadavg()}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["speed"]["photos_per_s"] >= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
