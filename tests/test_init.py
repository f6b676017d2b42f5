"""`clipdex init`: an empty library for a model, for vectors made elsewhere (import-vectors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from clipdex.cli.main import app
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec

runner = CliRunner()


def test_init_makes_an_empty_library_for_the_model(tmp_path: Path, tiny_model: ModelSpec, model_args: list[str]) -> None:
    result = runner.invoke(app, ["init", "--library", str(tmp_path / "lib"), *model_args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["items"] == 0 and report["dim"] == 32 and report["model"] == "tiny-clip"
    assert report["catalog"] == str(tmp_path / "lib" / "catalog.sqlite")
    library = Library.open(tmp_path / "lib")
    assert library.model.same_model(tiny_model.resolve()) and library.stats()["vectors"] == 0
    assert not library.encoders.model_loaded  # making a library loads no model
    again = runner.invoke(app, ["init", "--library", str(tmp_path / "lib"), *model_args])
    assert again.exit_code == 1 and "is a library already" in again.stderr


def test_import_vectors_into_a_missing_library_says_to_init(tmp_path: Path) -> None:
    np.savez(tmp_path / "vectors.npz", vectors=np.eye(4, dtype=np.float32), kinds=np.array(["text"] * 4),
             texts=np.array(list("abcd")), ids=np.arange(4), paths=np.array([""] * 4))
    result = runner.invoke(app, ["import-vectors", str(tmp_path / "vectors.npz"), "--library", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert f"no clipdex library at {tmp_path / 'none'}: make one for the vectors' model first" in result.stderr
    assert "clipdex init --library" in result.stderr and not (tmp_path / "none").exists()


def test_import_into_an_initialized_library(tmp_path: Path, tiny_model: ModelSpec, model_args: list[str]) -> None:
    from tests.test_import_vectors import clip_retrieval_folder

    assert runner.invoke(app, ["init", "--library", str(tmp_path / "lib"), *model_args]).exit_code == 0
    folder = clip_retrieval_folder(tmp_path / "clip-retrieval", count=6, dim=32)
    result = runner.invoke(app, ["import-vectors", str(folder), "--library", str(tmp_path / "lib"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 12  # 6 images and 6 captions
    vector = np.load(folder / "text_emb" / "text_emb_0.npy").astype(np.float32)[3]
    assert Library.open(tmp_path / "lib").search(vector=vector, k=1, kind="text")[0].text == "caption 3"
