"""Measure the demo model on freshly generated, held-out shapes images.

Loads the model exactly like the app (``open_clip.add_model_config`` +
``create_model_and_transforms(..., pretrained=...)``), generates images with
a seed the training never used, and prints:

1. text -> image precision@10 for "a <colour> <shape>" queries (over the
   classes with at least 10 held-out images; mean and worst query), and
   precision@5 per caption language ("a red circle", "红色的圆", "un círculo rojo") and
   for queries that mix two ("红色的 circle", "a circle rojo");
2. image -> text zero-shot top-1 accuracy against the colour x shape labels
   ("a photo of a <colour> <shape>" prompts, and bare "a <colour> <shape>");
3. recall@1/5/10 both ways on the held-out captions (``clipdex.search.analysis.evaluate``);
4. image -> image near-duplicates: how often a half-size PNG, a quality-40
   JPEG and a 3-4 pixel crop of a held-out image find that image first.

Usage::

    .venv/bin/python data/check_demo_model.py [--count 600] [--seed 12345] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(DATA_DIR), str(DATA_DIR.parent)]
import shapes  # noqa: E402
from clipdex.search.analysis.evaluate import group_captions, retrieval_recall  # noqa: E402

MODEL_NAME = "clipdex-demo"
PRECISION_K = 10


class Encoder:
    """The demo model loaded through the real open_clip path."""

    def __init__(self, model_dir: Path) -> None:
        open_clip.add_model_config(model_dir / f"{MODEL_NAME}.json")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            MODEL_NAME, pretrained=str(model_dir / f"{MODEL_NAME}.pt")
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    @torch.no_grad()
    def images(self, paths: Sequence[Path], batch_size: int = 256) -> np.ndarray:
        chunks = []
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([_load(path, self.preprocess) for path in paths[start : start + batch_size]])
            chunks.append(self.model.encode_image(batch, normalize=True))
        return torch.cat(chunks).numpy()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode_text(self.tokenizer(list(texts)), normalize=True).numpy()


def _load(path: Path, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    with Image.open(path) as image:
        return preprocess(image.convert("RGB"))


def precision_at_k(image_vectors: np.ndarray, labels: np.ndarray, encoder: Encoder, k: int) -> dict[str, Any]:
    """Text -> image precision@k for "a <label>" queries with >= k relevant images."""
    queries = [label for label in shapes.class_labels() if (labels == label).sum() >= k]
    scores = encoder.texts([f"a {label}" for label in queries]) @ image_vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    per_query = {q: float((labels[top[i]] == q).mean()) for i, q in enumerate(queries)}
    worst = min(per_query, key=per_query.__getitem__)
    return {
        "mean": float(np.mean(list(per_query.values()))),
        "worst": per_query[worst],
        "worst_query": f"a {worst}",
        "queries": len(queries),
    }


def precision_per_language(image_vectors: np.ndarray, labels: np.ndarray, encoder: Encoder, k: int = 5) -> dict[str, Any]:
    """Text -> image precision@k of the short query for each class, in each caption language."""
    queries = [label for label in shapes.class_labels() if (labels == label).sum() >= k]
    results: dict[str, Any] = {}
    for language in (*shapes.LANGUAGES, *shapes.MIXES):
        texts = [shapes.short_query(label, language) if language in shapes.LANGUAGES else shapes.mixed_query(label, language)
                 for label in queries]
        top = np.argsort(-(encoder.texts(texts) @ image_vectors.T), axis=1, kind="stable")[:, :k]
        per_query = [float((labels[top[i]] == label).mean()) for i, label in enumerate(queries)]
        worst = int(np.argmin(per_query))
        results[language] = {"mean": float(np.mean(per_query)), "worst": per_query[worst], "worst_query": texts[worst],
                             "queries": len(queries)}
    return results


def zero_shot_accuracy(image_vectors: np.ndarray, labels: np.ndarray, encoder: Encoder, template: str) -> float:
    """Image -> text top-1 accuracy against all colour x shape prompts."""
    classes = np.asarray(shapes.class_labels())
    prompts = encoder.texts(shapes.zero_shot_prompts(template))
    predicted = classes[np.argmax(image_vectors @ prompts.T, axis=1)]
    return float((predicted == labels).mean())


def near_duplicate_top1(image_vectors: np.ndarray, paths: Sequence[Path], encoder: Encoder, out: Path) -> dict[str, float]:
    """Share of edited copies whose nearest held-out image is their original."""
    variants = {name: [make(path, out) for path in paths] for name, make in NEAR_DUPLICATES.items()}
    truth = np.arange(len(paths))
    return {
        name: float((np.argmax(encoder.images(copies) @ image_vectors.T, axis=1) == truth).mean())
        for name, copies in variants.items()
    }


def _half_size_png(path: Path, out: Path) -> Path:
    with Image.open(path) as image:
        target = out / f"{path.stem}-half.png"
        image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS).save(target)
    return target


def _jpeg_q40(path: Path, out: Path) -> Path:
    with Image.open(path) as image:
        target = out / f"{path.stem}-q40.jpg"
        image.save(target, "JPEG", quality=40)
    return target


def _crop(path: Path, out: Path) -> Path:
    with Image.open(path) as image:
        target = out / f"{path.stem}-crop.jpg"
        image.crop((4, 3, image.width - 3, image.height - 4)).save(target, quality=90)
    return target


NEAR_DUPLICATES: dict[str, Callable[[Path, Path], Path]] = {
    "half-size png": _half_size_png,
    "jpeg quality 40": _jpeg_q40,
    "crop 3-4 px": _crop,
}


def measure(model_dir: Path, count: int, seed: int) -> dict[str, Any]:
    encoder = Encoder(model_dir)
    with tempfile.TemporaryDirectory(prefix="clipdex-heldout-") as tmp:
        photos, edits = Path(tmp) / "photos", Path(tmp) / "edits"
        edits.mkdir()
        rows = shapes.generate(photos, count, seed, captions_per_image=2)
        names, captions, text_to_image = group_captions(rows)
        paths = [photos / name for name in names]
        image_vectors = encoder.images(paths)
        near_duplicates = near_duplicate_top1(image_vectors, paths, encoder, edits)
    labels = np.asarray([shapes.class_label(name) for name in names])
    return {
        "held_out": {"images": len(names), "captions": len(captions), "seed": seed},
        f"text_to_image_precision@{PRECISION_K}": precision_at_k(image_vectors, labels, encoder, PRECISION_K),
        "precision@5_per_language": precision_per_language(image_vectors, labels, encoder),
        "zero_shot_top1": {
            "a photo of a {}": zero_shot_accuracy(image_vectors, labels, encoder, "a photo of a {}"),
            "a {}": zero_shot_accuracy(image_vectors, labels, encoder, "a {}"),
        },
        "caption_retrieval": retrieval_recall(image_vectors, encoder.texts(captions), text_to_image),
        "near_duplicate_top1": near_duplicates,
    }


def _report(results: dict[str, Any]) -> str:
    held = results["held_out"]
    prec = results[f"text_to_image_precision@{PRECISION_K}"]
    zero = results["zero_shot_top1"]
    recall = results["caption_retrieval"]
    lines = [
        f"held-out set: {held['images']} images, {held['captions']} captions (seed {held['seed']})",
        f"text->image precision@{PRECISION_K} ('a <colour> <shape>', {prec['queries']} queries): "
        f"mean {prec['mean']:.3f}, worst {prec['worst']:.2f} ({prec['worst_query']!r})",
        *(f"zero-shot top-1 ({template!r}): {accuracy:.3f}" for template, accuracy in zero.items()),
        *(f"text->image precision@5 in {language} ({figures['queries']} queries): "
          f"mean {figures['mean']:.3f}, worst {figures['worst']:.2f} ({figures['worst_query']!r})"
          for language, figures in results["precision@5_per_language"].items()),
    ]
    for direction in ("image_to_text", "text_to_image"):
        figures = ", ".join(f"{k} {v:.3f}" for k, v in recall[direction].items())
        lines.append(f"caption retrieval {direction}: {figures}")
    copies = ", ".join(f"{name} {share:.3f}" for name, share in results["near_duplicate_top1"].items())
    lines.append(f"near-duplicate finds its original first: {copies}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the clipdex demo model on held-out shapes.")
    parser.add_argument("--model-dir", type=Path, default=DATA_DIR / "demo-model")
    parser.add_argument("--count", type=int, default=600, help="held-out images")
    parser.add_argument("--seed", type=int, default=12345, help="held-out seed (training uses 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results = measure(args.model_dir, args.count, args.seed)
    print(json.dumps(results, indent=2) if args.json else _report(results))


if __name__ == "__main__":
    main()
