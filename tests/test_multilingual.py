"""Multilingual open_clip models end to end: a tiny Hugging Face text tower (an XLM-R-style
config with random weights, a Unigram tokenizer trained here with `tokenizers`, saved to a
folder), offline (HF_HUB_OFFLINE=1, conftest), through index, the ONNX text export and its
check against open_clip, torch-free queries, the query cache, embed, evaluate and HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")

from clipdex.cli.main import app  # noqa: E402
from clipdex.search.encoders.hf_tokenizer import HfTokenizer, detect_language, query_language  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.encoders.onnx_text import EXPORT_FOLDER, SETTINGS_FILE, OnnxTextEncoder, load_text_export  # noqa: E402
from clipdex.search.encoders.torch_clip import TorchClipEncoder  # noqa: E402
from clipdex.search.errors import ModelUnavailable  # noqa: E402
from clipdex.search.library import Library  # noqa: E402
from tests.conftest import one_line_error, write_image  # noqa: E402

runner = CliRunner()
CONTEXT = 24
CORPUS = ["a red circle", "a blue square on a gray background", "红色的圆", "蓝色的正方形", "un círculo rojo",
          "una estrella azul", "a dog on the beach", "ein Hund am Strand", "東京の夜景", "Кошка сидит на окне"]
TEXTS = ["红色的圆", "a red circle", "un círculo rojo sobre un fondo gris", "", "  two\tspaces  &amp; more ",
         "una estrella azul " * 12]


def make_text_tower(folder: Path) -> Path:
    """An XLM-R-style tower: a trained Unigram tokenizer with XLM-R's special tokens and
    template, and a 2-layer, 32-wide config (no weights: the open_clip checkpoint holds them)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "model_max_length": 512}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "xlm-roberta", "architectures": ["XLMRobertaModel"], "vocab_size": tokenizer.get_vocab_size(),
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": CONTEXT + 2, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "type_vocab_size": 1, "layer_norm_eps": 1e-5, "hidden_act": "gelu"}))
    return folder


def hf_model_config(tower: Path) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"hf_model_name": str(tower), "hf_tokenizer_name": str(tower), "hf_proj_type": "mlp",
                     "hf_pooler_type": "mean_pooler", "context_length": CONTEXT},
    }


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """The tiny multilingual model as config JSON + checkpoint, built with random weights."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny-xlmr")
    tower = make_text_tower(folder / "tower")
    config = folder / "tiny-xlmr-clip.json"
    config.write_text(json.dumps(hf_model_config(tower)))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-xlmr-clip", pretrained=None, pretrained_hf=False)
    checkpoint = folder / "tiny-xlmr-clip.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return ModelSpec(str(config), str(checkpoint))


@pytest.fixture(scope="module")
def indexed(hf_model: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A library of 4 images and a text corpus in three languages, made through the CLI."""
    root = tmp_path_factory.mktemp("multilingual")
    for index in range(4):
        write_image(root / "pics" / f"{index}.jpg", seed=index)
    notes = root / "notes.txt"
    notes.write_text("红色的圆\na blue square on a gray background\nun círculo rojo\n", encoding="utf-8")
    library = root / "library"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        done = runner.invoke(app, ["index", str(root / "pics"), "--library", str(library), "--model", hf_model.name,
                                   "--pretrained", hf_model.pretrained])
        assert done.exit_code == 0, done.output
        done = runner.invoke(app, ["index-texts", str(notes), "--library", str(library)])
        assert done.exit_code == 0, done.output
    return library, root


def test_the_torch_free_tokenizer_gives_open_clips_tokens(hf_model: ModelSpec, indexed: tuple[Path, Path]) -> None:
    library, _ = indexed
    settings = json.loads((library / EXPORT_FOLDER / SETTINGS_FILE).read_text())
    assert (settings["tokenizer"], settings["pad_id"], settings["cleaning"]) == ("hf", 1, "whitespace")
    ours = HfTokenizer(library / EXPORT_FOLDER / "tokenizer.json", CONTEXT, pad_id=1)
    reference = TorchClipEncoder(hf_model.resolve(), "cpu").load()
    assert np.array_equal(ours(TEXTS), reference.tokenize(TEXTS).numpy())
    assert ours(["红色的圆"]).shape == (1, CONTEXT) and ours(TEXTS)[-1, -1] == 2  # truncated: ends with </s>


def test_the_export_is_verified_trimmed_and_matches_open_clip(hf_model: ModelSpec, indexed: tuple[Path, Path]) -> None:
    library, _ = indexed
    encoder = TorchClipEncoder(hf_model.resolve(), "cpu").load()
    exported = load_text_export(library, Library.open(library).model, 32)
    assert isinstance(exported, OnnxTextEncoder) and exported.settings.trimmed
    assert exported.settings.min_cosine >= 0.999
    cosines = np.sum(exported.encode_texts(TEXTS) * encoder.encode_texts(TEXTS), axis=1)
    assert cosines.min() >= 0.999, cosines
    assert exported.tokenize(["红色的圆", "a red circle"]).shape[1] < CONTEXT  # cut after the longest text


def test_queries_embed_and_the_cache_run_without_torch_or_transformers(indexed: tuple[Path, Path]) -> None:
    library, _ = indexed
    script = ("import json, sys\n"
              "from clipdex.search.library import Library\n"
              f"lib = Library.open({str(library)!r})\n"
              "hits = lib.search(text='红色的圆', k=3)\n"
              "again = lib.encode_text('红色的圆')\n"
              "print(json.dumps({'top': hits[0].text, 'cached': lib.catalog.cached_query('红色的圆') is not None,\n"
              "  'heavy': sorted(n for n in ('torch', 'open_clip', 'transformers') if n in sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"top": "红色的圆", "cached": True, "heavy": []}


def test_embed_evaluate_and_http(hf_model: ModelSpec, indexed: tuple[Path, Path]) -> None:
    from fastapi.testclient import TestClient

    from clipdex.search.http import create_app

    library, root = indexed
    done = runner.invoke(app, ["embed", "--text", "un círculo rojo", "--library", str(library), "--json"])
    assert done.exit_code == 0, done.output
    vector = np.asarray(json.loads(done.stdout)["vector"], dtype=np.float32)
    reference = TorchClipEncoder(hf_model.resolve(), "cpu").load().encode_texts(["un círculo rojo"])[0]
    assert vector.shape == (32,) and float(vector @ reference) >= 0.999
    captions = root / "captions.tsv"
    captions.write_text("image\tcaption\n0.jpg\t红色的圆\n1.jpg\ta blue square\n2.jpg\tun círculo rojo\n", encoding="utf-8")
    done = runner.invoke(app, ["evaluate", "--images", str(root / "pics"), "--captions", str(captions),
                               "--model", hf_model.name, "--pretrained", hf_model.pretrained, "--json"])
    assert done.exit_code == 0, done.output
    recall = json.loads(done.stdout)
    assert recall["num_texts"] == 3 and set(recall["text_to_image"]) == {"R@1", "R@5", "R@10"}, recall
    with Library.open(library) as opened:
        hits = TestClient(create_app(opened)).post("/search", json={"text": "un círculo rojo", "k": 2}).json()
    assert hits["hits"][0]["text"] == "un círculo rojo"


def test_a_missing_tokenizer_or_config_is_one_line_naming_what_to_fetch(hf_model: ModelSpec, tmp_path: Path) -> None:
    tower = make_text_tower(tmp_path / "tower")
    (tower / "tokenizer.json").unlink()
    config = tmp_path / "broken-xlmr.json"
    config.write_text(json.dumps(hf_model_config(tower)))
    with pytest.raises(ModelUnavailable, match=r"tokenizer.json of .*tower is missing; the folder .*tower lacks them"):
        TorchClipEncoder(ModelSpec(str(config), hf_model.pretrained).resolve(), "cpu").load()
    hub = hf_model_config(tower)
    hub["text_cfg"].update(hf_model_name="clipdex-test/never-fetched", hf_tokenizer_name="clipdex-test/never-fetched")
    config.write_text(json.dumps(hub))
    done = runner.invoke(app, ["embed", "--text", "hola", "--model", str(config), "--pretrained", hf_model.pretrained])
    assert done.exit_code == 1
    line = one_line_error(done)
    assert "config.json of clipdex-test/never-fetched, tokenizer.json of clipdex-test/never-fetched are missing" in line
    assert "hf download clipdex-test/never-fetched config.json tokenizer.json" in line


def test_without_transformers_the_error_names_the_extra(hf_model: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ModelUnavailable, match=r"needs transformers to load: pip install 'clipdex\[multilingual\]'"):
        TorchClipEncoder(hf_model.resolve(), "cpu").load()


@pytest.mark.parametrize("text, language", [
    ("红色的圆", "zho_Hans"), ("赤い円です", "jpn_Jpan"), ("빨간 원", "kor_Hang"), ("красный круг", "rus_Cyrl"),
    ("un círculo rojo", "eng_Latn"), ("", "eng_Latn"), ("Ein roter Kreis 红色", "zho_Hans"),
])
def test_the_language_is_detected_from_the_script(text: str, language: str) -> None:
    assert detect_language(text) == language


@pytest.mark.parametrize("preset, name, tag", [
    ("multilingual", "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"),
    ("multilingual-large", "xlm-roberta-large-ViT-H-14", "frozen_laion5b_s13b_b90k"),
    ("multilingual-nllb", "nllb-clip-base-siglip", "v1"),
])
def test_presets_name_open_clips_multilingual_models(preset: str, name: str, tag: str) -> None:
    import open_clip

    from clipdex.cli.common import model_spec

    assert model_spec(preset, None) == ModelSpec(name, tag)
    assert tag in open_clip.list_pretrained_tags_by_model(name)


def test_a_preset_offline_says_which_tower_files_to_fetch(tmp_path: Path) -> None:
    done = runner.invoke(app, ["embed", "--text", "红色的圆", "--model", "multilingual", "--library", str(tmp_path / "lib")])
    line = one_line_error(done)
    assert "model xlm-roberta-base-ViT-B-32 cannot load its text tower" in line
    assert "hf download xlm-roberta-base config.json tokenizer.json" in line


NLLB_CODES = ["eng_Latn", "zho_Hans", "spa_Latn", "rus_Cyrl", "jpn_Jpan", "kor_Hang"]


@pytest.fixture(scope="module")
def nllb_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """An NLLB-style model: an M2M100 encoder and a tokenizer that leads each text with a language code."""
    import open_clip
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("tiny-nllb")
    tower = folder / "tower"
    tower.mkdir()
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer.add_special_tokens(NLLB_CODES + ["<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="eng_Latn $A </s>", pair="eng_Latn $A $B </s>",
        special_tokens=[("eng_Latn", tokenizer.token_to_id("eng_Latn")), ("</s>", 2)])
    tokenizer.save(str(tower / "tokenizer.json"))
    (tower / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "NllbTokenizer", "src_lang": "eng_Latn", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "sep_token": "</s>", "cls_token": "<s>",
        "additional_special_tokens": NLLB_CODES, "model_max_length": 512, "legacy_behaviour": False}))
    (tower / "config.json").write_text(json.dumps({
        "model_type": "m2m_100", "vocab_size": tokenizer.get_vocab_size(), "d_model": 32, "encoder_layers": 1,
        "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64, "max_position_embeddings": 64, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": 2, "is_encoder_decoder": True, "scale_embedding": True}))
    config = hf_model_config(tower)
    config["text_cfg"].update(hf_proj_type="linear", hf_pooler_type="cls_pooler")
    path = folder / "tiny-nllb-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-nllb-clip", pretrained=None, pretrained_hf=False)
    torch.save({"state_dict": model.state_dict()}, folder / "tiny-nllb-clip.pt")
    return ModelSpec(str(path), str(folder / "tiny-nllb-clip.pt"))


def test_nllb_texts_lead_with_their_language_detected_or_given(nllb_model: ModelSpec, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    library = Library.open(tmp_path / "nllb", model=nllb_model, create=True, device="cpu")
    detected = library.encode_text("红色的圆")  # loads the model once, and exports its text tower
    settings = json.loads((library.path / EXPORT_FOLDER / SETTINGS_FILE).read_text())
    assert settings["languages"] and settings["tokenizer"] == "hf"
    reopened = Library.open(library.path)
    exported = reopened.text_encoder()
    assert isinstance(exported, OnnxTextEncoder)
    codes = Tokenizer.from_file(str(library.path / EXPORT_FOLDER / "tokenizer.json")).token_to_id
    assert exported.tokenize(["红色的圆"])[0, 0] == codes("zho_Hans")
    assert exported.tokenize(["a red circle"])[0, 0] == codes("eng_Latn")
    torch_model = TorchClipEncoder(nllb_model.resolve(), "cpu").load()
    assert float(reopened.encode_text("红色的圆") @ detected) >= 0.999
    with query_language("spa_Latn"):
        assert exported.tokenize(["红色的圆"])[0, 0] == codes("spa_Latn")
        given = reopened.encode_text("红色的圆")
        assert float(given @ torch_model.encode_texts(["红色的圆"])[0]) >= 0.999
    assert float(given @ detected) < 0.999  # another language code, another vector
    assert reopened.catalog.cached_query("[spa_Latn] 红色的圆") is not None
    assert np.allclose(reopened.catalog.cached_query("红色的圆"), detected, atol=1e-5)
    assert not reopened.encoders.model_loaded


def test_random_weights_never_fetch_the_towers_pretrained_weights(hf_model: ModelSpec) -> None:
    """`--pretrained none`: the tower's folder has no weights, and none are looked for."""
    encoder = TorchClipEncoder(ModelSpec(hf_model.name, "none").resolve(), "cpu").load()
    assert encoder.encode_texts(["红色的圆"]).shape == (1, 32)
