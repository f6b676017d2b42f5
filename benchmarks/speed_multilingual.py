"""What a multilingual model costs on this machine: xlm-roberta-base-ViT-B-32 (the
`--model multilingual` preset) against ViT-B-32, both with random weights, on their
verified ONNX exports (the CPU runtime clipdex uses after a library's first run).

    .venv/bin/python benchmarks/speed_multilingual.py [--queries 40] [--images 96] [--threads 2]

No hub here: the XLM-R text tower is built from XLM-RoBERTa base's own architecture
(config.json written out below: 12 layers, 768 wide, 250,002-word vocabulary) with random
weights (`--pretrained none`), and its tokenizer is a Unigram model trained here with
`tokenizers` on a small multilingual corpus (real XLM-R's SentencePiece splits words
differently, so token counts differ a little; the table shows the counts).

Measured for each model: the export (seconds, sizes), a text query's latency (one new text
at a time through `OnnxTextEncoder.encode_texts`, tokenizer included; median), the text
tower alone on a query of 14 tokens (what both real tokenizers give the benchmark's
queries; the one trained here gives more), and image throughput (batches of 32 preprocessed 224-pixel images through the image export).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402

from speed_report import INFO, Figure, report  # noqa: E402

XLM_R_BASE = {  # FacebookAI/xlm-roberta-base's config.json (architecture only)
    "model_type": "xlm-roberta", "architectures": ["XLMRobertaForMaskedLM"], "vocab_size": 250002,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
QUERY_TOKENS = 14  # "a photo of a dog seen from afar, number 12": CLIP's BPE and XLM-R's SentencePiece alike
THINGS = ("dog", "cat", "beach", "mountain", "red car", "old house", "sailing boat", "bird", "flower", "bicycle")
CORPUS = [f"a photo of a {thing} seen from afar, number {n}" for n, thing in enumerate(THINGS * 5)] + [
    "一只狗在海滩上", "山上的老房子", "una foto de un perro en la playa", "ein Hund am Strand", "Кошка сидит на окне",
] * 10


def query_text(number: int) -> str:
    return f"a photo of a {THINGS[number % len(THINGS)]} seen from afar, number {number}"


def make_xlmr_model(folder: Path) -> str:
    """xlm-roberta-base-ViT-B-32's model config JSON, its tower's files in a folder beside it."""
    import open_clip
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tower = folder / "xlm-roberta-base"
    tower.mkdir(parents=True)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=2000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.save(str(tower / "tokenizer.json"))
    (tower / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "model_max_length": 512}))
    (tower / "config.json").write_text(json.dumps(XLM_R_BASE))
    config = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")
    config["text_cfg"].update(hf_model_name=str(tower), hf_tokenizer_name=str(tower))
    path = folder / "xlmr-b32-random.json"
    path.write_text(json.dumps(config))
    return str(path)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(name: str, spec: Any, library: Path, queries: int, images: int, threads: int) -> dict[str, Any]:
    from clipdex.search.encoders.image_export import export_image_encoder
    from clipdex.search.encoders.onnx_image import load_image_export
    from clipdex.search.encoders.onnx_text import OnnxTextEncoder, load_text_export
    from clipdex.search.encoders.text_export import export_text_encoder
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    library.mkdir(parents=True)
    encoder = TorchClipEncoder(spec.resolve(), "cpu", threads=threads).load()
    parameters = sum(tensor.numel() for tensor in encoder.model.parameters())
    started = time.perf_counter()
    text_settings = export_text_encoder(encoder, library)
    export_image_encoder(encoder, library)
    export_seconds = time.perf_counter() - started
    dim = text_settings.dim
    del encoder
    text = load_text_export(library, spec.resolve(), dim)
    assert isinstance(text, OnnxTextEncoder)
    text.threads = threads
    text.encode_texts([query_text(10_000)])  # session loaded, first run
    latencies = []
    for number in range(queries):
        begun = time.perf_counter()
        text.encode_texts([query_text(number)])
        latencies.append(time.perf_counter() - begun)
    tokens = statistics.median(len(row) for row in text.tokenizer.token_lists([query_text(n) for n in range(queries)]))
    # The tower alone at QUERY_TOKENS tokens: the trained tokenizer here splits words more
    # than real XLM-R's SentencePiece (which gives about as many tokens as CLIP's BPE)
    graph = []
    for number in range(queries):
        ids = text.tokenize([query_text(number)])[:, :QUERY_TOKENS].copy()
        ids[:, -1] = text.tokenizer.token_lists([""])[0][-1]  # the end token last
        begun = time.perf_counter()
        text.session.run(None, {"tokens": ids})
        graph.append(time.perf_counter() - begun)
    image = load_image_export(library, spec.resolve(), dim, lambda: text)
    assert image is not None
    image.set_threads(threads)
    batch = np.random.default_rng(0).standard_normal((32, 3, 224, 224), dtype=np.float32)
    image.encode_prepared(batch[:4])
    begun = time.perf_counter()
    done = 0
    while done < images:
        image.encode_prepared(batch)
        done += len(batch)
    images_per_second = done / (time.perf_counter() - begun)
    return {
        "model": name, "parameters_m": parameters / 1e6, "checkpoint_gb_fp32": parameters * 4 / 1e9,
        "export_s": export_seconds, "text_export_mb": folder_bytes(library / "text_encoder") / 1e6,
        "image_export_mb": folder_bytes(library / "image_encoder") / 1e6, "query_ms": 1000 * statistics.median(latencies),
        "query_tokens": tokens, "tower_ms": 1000 * statistics.median(graph), "images_per_s": images_per_second,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from clipdex.search.encoders.model import ModelSpec

    with tempfile.TemporaryDirectory(prefix="clipdex-multilingual-bench-") as tmp:
        root = Path(tmp)
        config = make_xlmr_model(root / "model")
        rows = [
            measure("ViT-B-32", ModelSpec("ViT-B-32", "none"), root / "b32", args.queries, args.images, args.threads),
            measure("xlm-roberta-base-ViT-B-32", ModelSpec(config, "none"), root / "xlmr", args.queries, args.images,
                    args.threads),
        ]
    for row in rows:
        print(json.dumps(row))
    english, multilingual = rows
    figures = [
        Figure(f"text tower at {QUERY_TOKENS} tokens (ms)", f"{multilingual['tower_ms']:.1f} ms",
               f"{english['tower_ms']:.1f} ms ViT-B-32", multilingual["tower_ms"] / english["tower_ms"], INFO, True),
        Figure("text query latency, multilingual (ms)", f"{multilingual['query_ms']:.1f} ms "
               f"({multilingual['query_tokens']:.0f} tokens)", f"{english['query_ms']:.1f} ms ViT-B-32 "
               f"({english['query_tokens']:.0f} tokens)", multilingual["query_ms"] / english["query_ms"], INFO, True),
        Figure("image throughput, multilingual (images/s)", f"{multilingual['images_per_s']:.1f}/s",
               f"{english['images_per_s']:.1f}/s ViT-B-32", multilingual["images_per_s"] / english["images_per_s"], INFO, True),
        Figure("parameters (M)", f"{multilingual['parameters_m']:.0f} M", f"{english['parameters_m']:.0f} M ViT-B-32",
               multilingual["parameters_m"] / english["parameters_m"], INFO, True),
        Figure("text export on disk (MB)", f"{multilingual['text_export_mb']:.0f} MB",
               f"{english['text_export_mb']:.0f} MB ViT-B-32", multilingual["text_export_mb"] / english["text_export_mb"],
               INFO, True),
        Figure("export of both towers (s)", f"{multilingual['export_s']:.0f} s", f"{english['export_s']:.0f} s ViT-B-32",
               multilingual["export_s"] / english["export_s"], INFO, True),
    ]
    report(f"Multilingual model cost (random weights, ONNX on the CPU, {args.threads} threads)", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
