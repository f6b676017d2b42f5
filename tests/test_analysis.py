"""tag (zero-shot labels) and duplicates, checked against answers computed in the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.indexer import index_paths
from clipdex.search.analysis.duplicates import find_duplicates
from clipdex.search.library import Library
from clipdex.search.analysis.zero_shot import classify, label_vectors

runner = CliRunner()


def test_tag_ranks_labels_by_template_averaged_cosine(library: Library, tmp_path: Path, make_images) -> None:
    images = make_images(tmp_path / "pics", 2)
    index_paths(library, [tmp_path / "pics"])
    labels = ["cat", "dog", "car", "tree"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(labels[:3]) + "\n\n")
    result = runner.invoke(app, ["tag", *map(str, images), "--labels", str(labels_file), "--labels", "tree",
                                 *sum((["--template", t] for t in templates), []), "--top", "4", "--json",
                                 "--library", str(library.path)])
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    encoder = library.encoder
    for entry, image in zip(output, images):
        image_vector = library.encode_image(image)
        expected = []
        for label in labels:
            vectors = encoder.encode_texts([t.format(label) for t in templates]).mean(axis=0)
            expected.append(float(image_vector @ (vectors / np.linalg.norm(vectors))))
        assert [l["label"] for l in entry["labels"]] == [labels[i] for i in np.argsort(expected)[::-1]]
        assert [l["score"] for l in entry["labels"]] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
        assert sum(l["probability"] for l in entry["labels"]) == pytest.approx(1.0, abs=1e-4)


def test_classify_softmax() -> None:
    vectors = np.eye(3, dtype=np.float32)
    result = classify(np.array([[0.9, 0.1, 0.0]], dtype=np.float32), ["a", "b", "c"], vectors, top=2)[0]
    assert [l.label for l in result] == ["a", "b"]
    assert result[0].probability == pytest.approx(1 / (1 + np.exp(-80) + np.exp(-90)), rel=1e-6)


def test_bad_template_and_no_labels(library: Library) -> None:
    from clipdex.search.errors import InvalidQuery

    with pytest.raises(InvalidQuery, match="no {}"):
        label_vectors(library.encoder, ["cat"], ["a photo"])
    with pytest.raises(InvalidQuery, match="no labels"):
        label_vectors(library.encoder, [], ["{}"])


def test_duplicates_groups_exact_copies(library: Library, tmp_path: Path, make_images) -> None:
    images = make_images(tmp_path / "pics", 4)
    shutil.copy(images[0], tmp_path / "pics" / "copy-a.jpg")
    shutil.copy(images[0], tmp_path / "pics" / "copy-b.jpg")
    shutil.copy(images[2], tmp_path / "pics" / "copy-c.jpg")
    index_paths(library, [tmp_path / "pics"])
    ids, vectors = library.catalog.all_vectors()
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    threshold = float(np.nextafter(np.float32(1.0), np.float32(0)))  # only identical vectors
    assert threshold > similarity[similarity < 0.999999].max()
    groups = find_duplicates(library, threshold=threshold)
    assert [sorted(Path(p).name for p in g.paths) for g in groups] == [
        ["copy-a.jpg", "copy-b.jpg", "img000.jpg"], ["copy-c.jpg", "img002.jpg"]]
    result = runner.invoke(app, ["duplicates", "--threshold", str(threshold), "--json", "--library", str(library.path)])
    assert [len(g["ids"]) for g in json.loads(result.stdout)] == [3, 2]


def test_labels_after_one_option_say_to_repeat_it(library: Library, tmp_path: Path, make_images) -> None:
    images = make_images(tmp_path / "pics", 1)
    result = runner.invoke(app, ["tag", str(images[0]), "--labels", "cat", "dog", "--library", str(library.path)])
    assert result.exit_code == 1
    assert result.stderr == ("Error: dog: no such image file; to give several labels repeat the option "
                             "(--labels cat --labels dog) or pass a file with one label per line\n")
    missing = runner.invoke(app, ["tag", str(tmp_path / "gone.jpg"), "--labels", "cat", "--library", str(library.path)])
    assert missing.exit_code == 1 and missing.stderr == f"Error: {tmp_path / 'gone.jpg'}: no such image file\n"


def test_a_labels_file_over_the_size_limit_is_an_error(library: Library, tmp_path: Path, make_images) -> None:
    from tests.test_cli import clipdex_process

    images = make_images(tmp_path / "pics", 1)
    labels = tmp_path / "labels.txt"
    with open(labels, "wb") as handle:
        handle.truncate(600 << 20)  # sparse, over the 512 MB limit
    result = clipdex_process("tag", str(images[0]), "--labels", str(labels), "--library", str(library.path), timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"Error: {labels}: 600.0 MB, over the 512.0 MB size limit\n", result.stderr
