"""Search finds what a query means: the project's own demo model on held-out generated images.

The model (data/demo-model) was trained on other seeds of data/shapes.py; every image here
is generated fresh with a seed it never saw.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "demo-model" / "clipdex-demo.json"
WEIGHTS = ROOT / "data" / "demo-model" / "clipdex-demo.pt"
HELD_OUT_SEED = 4242


def load_shapes():
    spec = importlib.util.spec_from_file_location("shapes", ROOT / "data" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("shapes", module)
    spec.loader.exec_module(module)
    return module


shapes = load_shapes()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Library, Path]:
    folder = tmp_path_factory.mktemp("held-out")
    shapes.generate(folder / "photos", count=480, seed=HELD_OUT_SEED, captions_per_image=1)
    library = Library.open(folder / "library", model=ModelSpec(str(MODEL), str(WEIGHTS)), create=True, device="cpu")
    report = index_paths(library, [folder / "photos"])
    assert report.added == 480 and not report.failed
    return library, folder / "photos"


def test_text_to_image_precision_at_10(demo) -> None:
    library, photos = demo
    labels = Counter(shapes.class_label(p) for p in photos.glob("*.jpg"))
    queried = [label for label, count in labels.items() if count >= 10]
    assert len(queried) >= 15
    precisions = []
    for label in queried:
        hits = library.search(text=f"a {label}", kind="image", k=10)
        precisions.append(sum(shapes.class_label(hit.path) == label for hit in hits) / 10)
    assert np.mean(precisions) >= 0.9, dict(zip(queried, precisions))


@pytest.mark.parametrize("language", ["en", "zh", "es", "zh+en"])
def test_queries_in_english_chinese_and_spanish_find_the_same_things(demo, language: str) -> None:
    """"红色的圆", "un círculo rojo" and the mixed "红色的 circle" find red circles as "a red circle"
    does: precision@5 per language."""
    library, photos = demo
    labels = Counter(shapes.class_label(p) for p in photos.glob("*.jpg"))
    queried = [label for label, count in labels.items() if count >= 5]
    precisions = {}
    for label in queried:
        text = shapes.mixed_query(label, language) if "+" in language else shapes.short_query(label, language)
        hits = library.search(text=text, kind="image", k=5)
        precisions[text] = sum(shapes.class_label(hit.path) == label for hit in hits) / 5
    assert np.mean(list(precisions.values())) >= 0.85, precisions


@pytest.fixture(scope="module")
def text_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Library, Path]:
    """One library for the corpora below (its text tower exported once): each test writes its
    corpus into the same file, whose rows then replace the last test's."""
    folder = tmp_path_factory.mktemp("texts")
    library = Library.open(folder / "library", model=ModelSpec(str(MODEL), str(WEIGHTS)), create=True, device="cpu")
    return library, folder / "notes.txt"


@pytest.mark.parametrize("corpus, queries", [("zh", "en"), ("en", "zh"), ("es", "zh")])
def test_texts_in_one_language_are_found_by_queries_in_another(corpus: str, queries: str, text_library) -> None:
    """A Chinese text corpus found by English queries, and the reverse."""
    from clipdex.indexer.texts import index_texts

    library, notes = text_library
    labels = shapes.class_labels()
    notes.write_text("\n".join(shapes.short_query(label, corpus) for label in labels) + "\n", encoding="utf-8")
    report = index_texts(library, [notes])
    assert report.added + report.updated == len(labels) and library.stats()["texts"] == len(labels)
    found = [library.search(text=shapes.short_query(label, queries), kind="text", k=1)[0].text
             == shapes.short_query(label, corpus) for label in labels]
    assert np.mean(found) >= 0.9, [label for label, hit in zip(labels, found) if not hit]


def test_image_to_text_zero_shot_top1(demo) -> None:
    from clipdex.search.analysis.zero_shot import classify, label_vectors

    library, photos = demo
    labels = shapes.class_labels()
    vectors = label_vectors(library.encoder, labels, ["a photo of a {}"])
    paths = sorted(photos.glob("*.jpg"))
    image_vectors = library.encoder.encode_files(paths)
    predicted = [result[0].label for result in classify(image_vectors, labels, vectors, top=1)]
    accuracy = np.mean([p == shapes.class_label(path) for p, path in zip(predicted, paths)])
    assert accuracy >= 0.9


def test_tag_command_names_what_the_image_shows(demo, tmp_path: Path) -> None:
    library, photos = demo
    paths = sorted(photos.glob("*.jpg"))[:8]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(shapes.class_labels()))
    result = CliRunner().invoke(app, ["tag", *map(str, paths), "--labels", str(labels), "--template", "a photo of a {}",
                                      "--json", "--library", str(library.path)])
    assert result.exit_code == 0, result.output
    correct = sum(entry["labels"][0]["label"] == shapes.class_label(entry["image"]) for entry in json.loads(result.stdout))
    assert correct >= 7


def variants(path: Path, out: Path) -> list[Path]:
    image = Image.open(path).convert("RGB")
    width, height = image.size
    made = []
    resized = out / f"{path.stem}-resized.png"
    image.resize((width // 2, height // 2), Image.Resampling.LANCZOS).save(resized)
    reencoded = out / f"{path.stem}-q40.jpg"
    image.save(reencoded, "JPEG", quality=40)
    cropped = out / f"{path.stem}-cropped.jpg"
    image.crop((4, 3, width - 3, height - 4)).save(cropped, quality=90)
    made += [resized, reencoded, cropped]
    return made


def test_image_to_image_near_duplicates_rank_their_original_first(demo, tmp_path: Path) -> None:
    library, photos = demo
    originals = sorted(photos.glob("*.jpg"))[:12]
    misses = []
    for original in originals:
        for variant in variants(original, tmp_path):
            top = library.search(image=variant, kind="image", k=1)[0]
            if top.path != str(original):
                misses.append(variant.name)
    assert misses == []


def test_evaluate_reports_the_models_real_recall(demo, tmp_path: Path) -> None:
    """The command's figures equal an independent computation with open_clip and numpy."""
    import open_clip
    import torch

    library, photos = demo
    captions = photos / shapes.CAPTIONS_FILE
    result = CliRunner().invoke(app, ["evaluate", "--images", str(photos), "--captions", str(captions), "--json",
                                      "--model", str(MODEL), "--pretrained", str(WEIGHTS), "--quiet"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)

    rows = [line.split("\t") for line in captions.read_text().splitlines()[1:]]
    names = list(dict.fromkeys(name for name, _ in rows))
    owner = np.array([names.index(name) for name, _ in rows])
    open_clip.add_model_config(MODEL)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL.stem, pretrained=str(WEIGHTS))
    model.eval()
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(Image.open(photos / n).convert("RGB")) for n in names]), normalize=True).numpy()
        texts = model.encode_text(open_clip.get_tokenizer(MODEL.stem)([c for _, c in rows]), normalize=True).numpy()
    similarity = texts @ images.T
    text_rank = np.array([(similarity[j] > similarity[j, owner[j]]).sum() for j in range(len(rows))])
    image_rank = np.array([min((similarity[:, i] > similarity[j, i]).sum() for j in np.flatnonzero(owner == i)) for i in range(len(names))])
    assert reported["num_images"] == 480 and reported["num_texts"] == 480
    for k in (1, 5, 10):
        assert reported["text_to_image"][f"R@{k}"] == pytest.approx((text_rank < k).mean(), abs=0.01)
        assert reported["image_to_text"][f"R@{k}"] == pytest.approx((image_rank < k).mean(), abs=0.01)
    assert reported["text_to_image"]["R@10"] > 0.2  # far above chance (10/480)
