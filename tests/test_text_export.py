"""The exported text encoder: torch-free tokens equal open_clip's, vectors match, refusals stick."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipdex.indexer import index_paths
from clipdex.search.encoders import text_export
from clipdex.search.encoders.clip_tokenizer import ClipTokenizer
from clipdex.search.encoders.onnx_text import EXPORT_FOLDER, MODEL_FILE, SETTINGS_FILE, OnnxTextEncoder, load_text_export
from clipdex.search.encoders.torch_clip import TorchClipEncoder
from clipdex.search.library import Library
from clipdex.search.encoders.model import ModelSpec
from clipdex.search.encoders.text_export import REFUSED_FILE, ensure_text_export, export_text_encoder

VARIED_TEXTS = [
    "a dog on the beach",
    "A DOG ON THE BEACH",
    "dogs' toys aren't cheap, they're $12.99!",
    "naïve café déjà vu – “quoted” ‘single’",
    "straße, Ærø, İstanbul, ﬁne ligature",
    "北京烤鸭 and 寿司 と ラーメン",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "ε = mc² ± 0.5 × 10⁻³",
    "👍🏽👨‍👩‍👧 family 🏳️‍🌈",
    "e\u0301 combining accent, zero\u200bwidth",
    "&lt;b&gt;bold&lt;/b&gt; &amp;amp; &#39;entities&#39;",
    "Ã©tÃ© is mojibake for été",
    "tabs\tand\nnewlines\r\n  and   spaces",
    "",
    "   ",
    "<start_of_text><end_of_text> inside a text",
    "12345678901234567890 numbers 3.14159",
    "www.example.com/path?query=1&x=y#anchor",
    "word " * 100,
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 12,
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts drawn from many Unicode blocks, of lengths up to well past the context."""
    rng = np.random.default_rng(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x3040, 0x30FF),
              (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x2000, 0x206F), (0x300, 0x36F)]
    texts = []
    for _ in range(count):
        words = []
        for _ in range(int(rng.integers(1, 40))):
            low, high = blocks[int(rng.integers(len(blocks)))]
            words.append("".join(chr(int(code)) for code in rng.integers(low, high + 1, int(rng.integers(1, 12)))))
        texts.append(" ".join(words))
    return texts


@pytest.fixture(scope="module")
def open_clip_tokenizer():  # type: ignore[no-untyped-def]
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def vocabulary() -> Path:
    from open_clip.tokenizer import default_bpe

    return Path(default_bpe())


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokens_equal_open_clips(open_clip_tokenizer, vocabulary: Path, context_length: int) -> None:  # type: ignore[no-untyped-def]
    texts = VARIED_TEXTS + random_texts(150)
    expected = open_clip_tokenizer(texts, context_length=context_length).numpy()
    ours = ClipTokenizer(vocabulary, context_length)(texts)
    assert ours.dtype == np.int64
    mismatched = [text for text, a, b in zip(texts, expected, ours) if not np.array_equal(a, b)]
    assert mismatched == []


def test_token_ids_without_truncation_equal_open_clips(open_clip_tokenizer, vocabulary: Path) -> None:  # type: ignore[no-untyped-def]
    ours = ClipTokenizer(vocabulary)
    for text in VARIED_TEXTS:
        assert ours.encode(text) == open_clip_tokenizer.encode(text), text


def test_plain_ascii_skips_ftfy_with_the_same_result(open_clip_tokenizer, vocabulary: Path) -> None:  # type: ignore[no-untyped-def]
    """Texts of printable ASCII (the usual query) are cleaned and split without importing ftfy or regex,
    exactly as with them;
    control characters, carriage returns and HTML entities still go through ftfy."""
    import html
    import string
    import subprocess
    import sys

    import ftfy

    from clipdex.search.encoders.clip_tokenizer import NEEDS_FTFY, clean

    rng = np.random.default_rng(1)
    alphabet = list(string.printable + "&\x00\x07\x1b\x7f")
    texts = ["".join(rng.choice(alphabet, int(rng.integers(0, 50)))) for _ in range(2000)]
    texts += ["fish &amp;amp; chips", "a\rb", "bell\x07", "tab\tnew\nline", "&lt;3"]
    for text in texts:
        assert clean(text) == " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower(), text
    assert all(NEEDS_FTFY.search(text) for text in ("a\rb", "bell\x07", "x &amp; y", "café"))
    probe = ("import sys; from clipdex.search.encoders.clip_tokenizer import ClipTokenizer; "
             f"t = ClipTokenizer({str(vocabulary)!r}); t(['a dog on the beach, at 5pm!']); print('ftfy' in sys.modules, 'regex' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False False"
    ours = ClipTokenizer(vocabulary)
    assert ours(texts[:300]).tolist() == open_clip_tokenizer(texts[:300]).numpy().tolist()


def test_over_long_texts_end_with_the_end_token(vocabulary: Path) -> None:
    tokenizer = ClipTokenizer(vocabulary, 16)
    tokens = tokenizer(["word " * 100, "short"])
    assert tokens.shape == (2, 16)
    assert tokens[0, 0] == tokenizer.start_id and tokens[0, -1] == tokenizer.end_id
    assert list(tokens[1, 3:]) == [0] * 13


def reference_text_vectors(encoder: TorchClipEncoder, texts: list[str]) -> np.ndarray:
    """open_clip's own `encode_text(normalize=True)`, on tokens padded to the full context."""
    import torch

    with torch.no_grad():
        return encoder.model.encode_text(encoder.tokenize(texts), normalize=True).numpy()


def test_export_matches_open_clip_on_new_texts(tiny_model: ModelSpec, tmp_path: Path) -> None:
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    settings = export_text_encoder(encoder, tmp_path)
    assert settings.trimmed and settings.min_cosine >= text_export.MIN_COSINE
    assert sorted(path.name for path in tmp_path.iterdir()) == [EXPORT_FOLDER]
    exported = load_text_export(tmp_path, encoder.spec, settings.dim)
    assert isinstance(exported, OnnxTextEncoder)
    texts = ["a bird", "a much longer description of a sunny afternoon by the lake", "ünïcödé ✓", "word " * 50]
    vectors = exported.encode_texts(texts)
    cosines = np.sum(vectors * reference_text_vectors(encoder, texts), axis=1)
    assert cosines.min() >= 0.999, cosines
    one_by_one = np.concatenate([exported.encode_texts([text]) for text in texts])
    assert np.allclose(one_by_one, vectors, atol=1e-5)
    assert exported.tokenize(["a bird", "a red bird"]).shape == (2, 5)  # cut after the longest text


def test_a_tower_that_cannot_be_trimmed_is_exported_whole(tmp_path: Path) -> None:
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                     "no_causal_mask": True, "pool_type": "last"},
    }
    path = tmp_path / "bidirectional-clip.json"
    path.write_text(json.dumps(config))
    encoder = TorchClipEncoder(ModelSpec(str(path), "none").resolve(), "cpu").load()
    settings = export_text_encoder(encoder, tmp_path)
    assert not settings.trimmed
    exported = load_text_export(tmp_path, encoder.spec, settings.dim)
    assert exported is not None and exported.tokenize(["a bird"]).shape == (1, 16)
    cosines = np.sum(exported.encode_texts(["a bird", "two cats"]) * reference_text_vectors(encoder, ["a bird", "two cats"]), axis=1)
    assert cosines.min() >= 0.999


def test_a_refused_export_is_recorded_and_not_retried(tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    monkeypatch.setattr(text_export, "MIN_COSINE", 1.5)  # no export can reach it
    assert ensure_text_export(tmp_path, encoder, 32) is None
    refusal = json.loads((tmp_path / REFUSED_FILE).read_text())
    assert "below 1.5" in refusal["reason"]
    assert not (tmp_path / EXPORT_FOLDER).exists()
    assert [path.name for path in tmp_path.iterdir()] == [REFUSED_FILE]  # no scratch folder left behind
    monkeypatch.setattr(text_export, "export_text_encoder", lambda *args: pytest.fail("retried a refused export"))
    assert ensure_text_export(tmp_path, encoder, 32) is None


def test_an_export_of_another_model_or_a_damaged_one_is_not_used(tiny_model: ModelSpec, tmp_path: Path) -> None:
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    export_text_encoder(encoder, tmp_path)
    other = ModelSpec("ViT-B-32", "none").resolve()
    assert load_text_export(tmp_path, other, 32) is None
    assert load_text_export(tmp_path, encoder.spec, 64) is None
    (tmp_path / EXPORT_FOLDER / MODEL_FILE).write_bytes(b"not an onnx graph")
    assert load_text_export(tmp_path, encoder.spec, 32) is None


def test_the_first_index_run_exports_and_queries_then_use_the_export(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 3)
    index_paths(library, [tmp_path / "pics"])
    settings = json.loads((library.path / EXPORT_FOLDER / SETTINGS_FILE).read_text())
    assert settings["model"] == library.model.to_json()
    reopened = Library.open(library.path)
    assert isinstance(reopened.text_encoder(), OnnxTextEncoder)
    vector = reopened.encode_text("a small green triangle")
    reference = library.encoder.encode_texts(["a small green triangle"])[0]
    assert float(vector @ reference) >= 0.999
    assert not reopened.encoders.model_loaded  # the open_clip model was never needed


def test_a_text_query_without_an_export_makes_one(library: Library) -> None:
    assert isinstance(library.text_encoder(), TorchClipEncoder)
    library.encode_text("a query that loads the model")
    assert (library.path / EXPORT_FOLDER / SETTINGS_FILE).exists()
    assert isinstance(Library.open(library.path).text_encoder(), OnnxTextEncoder)


def test_queries_after_the_export_do_not_collect_garbage(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the model loaded, each text query looks for the export it would make: once made,
    a query costs no whole collection of the heap (a quarter of a second and more each)."""
    import gc

    from clipdex.search.encoders import factory

    collections: list[int] = []
    monkeypatch.setattr(factory, "gc", type("CountingGc", (), {"collect": staticmethod(lambda: collections.append(1) or gc.collect())}))
    library.encode_text("a query that loads the model and makes the export")
    assert collections == [1] and (library.path / EXPORT_FOLDER / SETTINGS_FILE).exists()
    assert library.encoders.model_loaded
    for text in ("a red circle", "a blue square", "a green triangle"):
        library.encode_text(text)
    assert collections == [1]


def test_index_runs_can_skip_the_export(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "pics", 2)
    report = index_paths(library, [tmp_path / "pics"], export_text=False)
    assert report.model_loaded
    assert not (library.path / EXPORT_FOLDER).exists()


def test_export_leaves_the_model_in_eval_mode(tiny_model, tmp_path) -> None:
    """torch.onnx.export restores the wrapper's (training) mode recursively; batch-norm models
    such as the demo model's ResNet would then embed each batch differently."""
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu")
    export_text_encoder(encoder, tmp_path)
    assert not encoder._model.training


def test_index_texts_uses_the_export_and_never_loads_the_model(library: Library, tmp_path: Path) -> None:
    from clipdex.indexer.texts import index_texts

    library.encode_text("a query that makes the export")  # loads the model once, exports its text tower
    corpus = tmp_path / "notes.txt"
    long_text = " ".join(["pneumonoultramicroscopicsilicovolcanoconiosis"] * 12)
    corpus.write_text(f"a red circle\na blue square on grey\n{long_text}\n")
    reopened = Library.open(library.path)
    report = index_texts(reopened, [corpus])
    assert report.added == 3 and report.truncated == 1 and report.context_length == library.encoder.context_length
    assert not reopened.encoders.model_loaded  # torch and open_clip were never needed
    texts = ["a red circle", "a blue square on grey", long_text]
    reference = library.encoder.encode_texts(texts)
    items = reopened.catalog.get_items(reopened.catalog.ids().tolist()).values()
    stored = {item.text: item.vector_array() for item in items}
    for text, expected in zip(texts, reference):
        assert float(stored[text] @ expected) >= 0.999, text


def test_index_texts_without_an_export_makes_one(library: Library, tmp_path: Path) -> None:
    from clipdex.indexer.texts import index_texts

    corpus = tmp_path / "notes.txt"
    corpus.write_text("a red circle\n")
    assert index_texts(library, [corpus]).added == 1
    assert isinstance(Library.open(library.path).text_encoder(), OnnxTextEncoder)


def test_the_exports_token_count_equals_open_clips(tiny_model: ModelSpec, tmp_path: Path) -> None:
    encoder = TorchClipEncoder(tiny_model.resolve(), "cpu").load()
    export_text_encoder(encoder, tmp_path)
    exported = load_text_export(tmp_path, encoder.spec, 32)
    assert exported is not None and exported.context_length == encoder.context_length
    for text in VARIED_TEXTS:
        assert exported.count_tokens(text) == encoder.count_tokens(text), text


def test_index_texts_can_skip_the_export(library: Library, tmp_path: Path) -> None:
    from clipdex.indexer.texts import index_texts

    corpus = tmp_path / "notes.txt"
    corpus.write_text("a red circle\n")
    assert index_texts(library, [corpus], export_text=False).added == 1
    assert library.encoder.loaded and not (library.path / EXPORT_FOLDER).exists()
