"""Train clipdex's small offline demo/test CLIP model on the synthetic shapes data.

Writes ``data/demo-model/clipdex-demo.json`` (an open_clip model config) and
``data/demo-model/clipdex-demo.pt`` (an fp16 state dict), which load through
the ordinary open_clip path::

    open_clip.add_model_config("data/demo-model/clipdex-demo.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "clipdex-demo", pretrained="data/demo-model/clipdex-demo.pt")
    tokenizer = open_clip.get_tokenizer("clipdex-demo")

Training is seeded and runs a fixed number of steps of open_clip's own
contrastive loss (``open_clip.loss.ClipLoss``) on 2 CPU threads. The captions are in
English, Chinese and Spanish (``shapes.LANGUAGES``), so the model answers queries in
all three; the tokenizer stays open_clip's byte-level BPE, which spells any language (a
Han character is two to three tokens), so the context grows to 48 tokens for the longest
Chinese captions.

Usage::

    .venv/bin/python data/train_demo_model.py [--out DIR] [--steps N] [--images N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# The CPU is often shared: idle OpenMP threads should sleep, not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402  (sibling module, imported after the path tweak)

MODEL_NAME = "clipdex-demo"
DEFAULT_OUT = Path(__file__).resolve().parent / "demo-model"

#: open_clip model config (model_configs/*.json format): a small ModifiedResNet
#: image tower (a convnet learns shapes from little data far faster than a tiny
#: ViT) and a 2-layer text transformer. The 49408 x 64 token embedding is most
#: of the checkpoint. 48 tokens hold the longest Chinese caption (45 tokens).
MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 64,
        "layers": [1, 1, 1, 1],
        "width": 16,
        "patch_size": None,
    },
    "text_cfg": {
        "context_length": 48,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
}


@dataclass(frozen=True)
class Settings:
    """Training hyper-parameters (defaults are the shipped model's)."""

    seed: int = 0
    images: int = 16000
    captions_per_image: int = 4  # per language
    languages: tuple[str, ...] = shapes.LANGUAGES
    steps: int = 2400
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    max_zoom: float = 1.15
    threads: int = 2


@dataclass
class TrainData:
    """Preprocessed training tensors."""

    images: torch.Tensor  # (N, 3, H, W) float16, already normalised
    tokens: torch.Tensor  # (T, context_length) int64
    captions_of: list[list[int]]  # image index -> indices into ``tokens``


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_config(out_dir: Path) -> Path:
    """Write the open_clip model config JSON and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{MODEL_NAME}.json"
    path.write_text(json.dumps(MODEL_CONFIG, indent=4) + "\n", encoding="utf-8")
    return path


def create_model(config_path: Path) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """Randomly initialised model and its eval preprocessing, by registered name."""
    open_clip.add_model_config(config_path)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
    return model, preprocess


def load_data(settings: Settings, preprocess: Callable[[Image.Image], torch.Tensor]) -> TrainData:
    """Generate the shapes data set in a temporary folder and preprocess it."""
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    with tempfile.TemporaryDirectory(prefix="clipdex-shapes-") as tmp:
        rows = shapes.generate(
            tmp,
            settings.images,
            settings.seed,
            captions_per_image=settings.captions_per_image,
            languages=settings.languages,
        )
        names = list(dict.fromkeys(name for name, _ in rows))
        index_of = {name: i for i, name in enumerate(names)}
        images = torch.stack([_load_image(Path(tmp) / name, preprocess) for name in names])
    captions_of: list[list[int]] = [[] for _ in names]
    for row, (name, _) in enumerate(rows):
        captions_of[index_of[name]].append(row)
    tokens = tokenizer([text for _, text in rows])
    return TrainData(images=images.half(), tokens=tokens, captions_of=captions_of)


def _load_image(path: Path, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    with Image.open(path) as image:
        return preprocess(image.convert("RGB"))


def make_optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """AdamW without weight decay on gains, biases, embeddings' scale and logit_scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "ln" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(step: int, settings: Settings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * settings.lr * (1.0 + math.cos(math.pi * progress))


def sample_batch(data: TrainData, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct images (channels-last), each with one of its captions drawn at random."""
    picks = torch.randperm(len(data.captions_of), generator=generator)[:batch_size]
    choices = torch.randint(0, 1 << 30, (batch_size,), generator=generator).tolist()
    rows = [data.captions_of[i][c % len(data.captions_of[i])] for i, c in zip(picks.tolist(), choices)]
    images = data.images[picks].float().contiguous(memory_format=torch.channels_last)
    return images, data.tokens[rows]


def augment(images: torch.Tensor, generator: torch.Generator, max_zoom: float) -> torch.Tensor:
    """Random zoom-in (up to ``max_zoom``) and shift, like a slight crop and resize.

    Keeps the image embedding stable under the crops and re-encodings people
    make of their photos, so near-duplicates still find their original.
    """
    count = images.shape[0]
    scale = 1.0 - torch.rand(count, generator=generator) * (1.0 - 1.0 / max_zoom)
    shift = (torch.rand(count, 2, generator=generator) * 2.0 - 1.0) * (1.0 - scale[:, None])
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def train(model: torch.nn.Module, data: TrainData, settings: Settings) -> None:
    """Run ``settings.steps`` steps of contrastive training."""
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    model.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        images, tokens = sample_batch(data, generator, settings.batch_size)
        images = augment(images, generator, settings.max_zoom)
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {logit_scale.item():6.2f}  {elapsed:6.1f}s", flush=True)


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Save the state dict with floating-point tensors in fp16."""
    state = {
        key: (value.half() if value.is_floating_point() else value).contiguous()
        for key, value in model.state_dict().items()
    }
    torch.save(state, path)


def check_reload(model: torch.nn.Module, config_path: Path, checkpoint: Path) -> float:
    """Reload through the real open_clip path and return the max feature difference."""
    open_clip.add_model_config(config_path)
    loaded, _, _ = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    size = MODEL_CONFIG["vision_cfg"]["image_size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(["a red circle", "a small blue star on a gray background", "红色的圆", "un círculo rojo"])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        diffs = [
            (model.encode_image(images, normalize=True) - loaded.encode_image(images, normalize=True)).abs().max(),
            (model.encode_text(tokens, normalize=True) - loaded.encode_text(tokens, normalize=True)).abs().max(),
        ]
    return float(max(diffs))


def _parse_args(argv: Sequence[str] | None) -> tuple[Path, Settings]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description="Train the clipdex demo CLIP model.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    args = parser.parse_args(argv)
    settings = Settings(
        seed=args.seed, images=args.images, steps=args.steps, batch_size=args.batch_size, lr=args.lr
    )
    return args.out, settings


def main(argv: Sequence[str] | None = None) -> None:
    out_dir, settings = _parse_args(argv)
    torch.set_num_threads(settings.threads)
    seed_everything(settings.seed)
    started = time.perf_counter()
    config_path = write_config(out_dir)
    model, preprocess = create_model(config_path)
    data = load_data(settings, preprocess)
    print(f"data: {len(data.captions_of)} images, {len(data.tokens)} captions "
          f"({time.perf_counter() - started:.1f}s)", flush=True)
    train(model, data, settings)
    checkpoint = out_dir / f"{MODEL_NAME}.pt"
    save_checkpoint(model, checkpoint)
    diff = check_reload(model, config_path, checkpoint)
    size_mb = checkpoint.stat().st_size / 1e6
    print(f"saved {checkpoint} ({size_mb:.1f} MB); fp16 reload max feature diff {diff:.4f}")
    print(f"total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
