"""The pointing game of `clipdex explain`, per method, and what an explanation costs.

    .venv/bin/python benchmarks/explain.py [--count 200] [--seed 2026] [--threads 1] [--vit]

Renders `--count` images (data/shapes.py `pointing_scene`: one small target shape among two
clutter shapes of other colours and shapes, 128x128), asks for the target ("a red circle")
with the demo model, and counts the peaks that fall inside the target's box, for:

* maskclip-native: the attention pool's value path at the model's input size (2x2 grid), best cell's centre;
* maskclip-unpooled: the last stage without its stride-2 pool (4x4 grid), best cell's centre;
* maskclip-unpooled+centroid: the same, the peak refined as `clipdex.search.explanation.peak_of` does;
* clipdex (maskclip-unpooled x1.5 + centroid): what `clipdex explain` runs (`DenseTower`, 6x6 grid);
* gradcam-layer4 / gradcam-layer3: Grad-CAM on the last stage (2x2) and the one before (4x4), best cell's centre;

then the centre-point baseline, and the time of one embedding (the library's image export on
onnxruntime) against one explanation's features (the explain export), per image, batch of one;
with `--vit`, the same times for ViT-B-32 with random weights (no pointing game: its weights know nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo-model"


def load_shapes():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("shapes", ROOT / "data" / "shapes.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["shapes"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit", action="store_true", help="also time ViT-B-32 (random weights) on 50 of the images")
    args = parser.parse_args()

    import dataclasses

    import torch
    import torch.nn.functional as F

    from clipdex.search.analysis.explain import PointingCase, inside, pointing_game
    from clipdex.search.encoders.dense_export import TorchDenseEncoder, normalized_grid
    from clipdex.search.encoders.model import ModelSpec
    from clipdex.search.encoders.preprocess import ImagePreprocess
    from clipdex.search.encoders.torch_clip import TorchClipEncoder
    from clipdex.search.explanation import peak_of

    torch.set_num_threads(args.threads)
    shapes = load_shapes()
    encoder = TorchClipEncoder(ModelSpec(str(DEMO / "clipdex-demo.json"), str(DEMO / "clipdex-demo.pt")).resolve(), "cpu",
                               threads=args.threads).load()
    model, visual = encoder.model, encoder.model.visual
    scenes = [shapes.pointing_scene(np.random.default_rng([args.seed, index])) for index in range(args.count)]
    texts = sorted({scene.query for scene in scenes})
    vectors = dict(zip(texts, encoder.encode_texts(texts)))
    cases = [PointingCase(scene.image, vectors[scene.query], scene.box) for scene in scenes]
    native = dataclasses.replace(ImagePreprocess.of_open_clip_model(model), resize_mode="squash")

    def stages(pixels: torch.Tensor) -> torch.Tensor:
        return visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels))))

    def value_path(x: torch.Tensor) -> np.ndarray:
        pool = visual.attnpool
        _, channels, rows, cols = x.shape
        position = pool.positional_embedding[1:]
        side = int(round(position.shape[0] ** 0.5))
        if (rows, cols) != (side, side):
            grid = position.reshape(1, side, side, channels).permute(0, 3, 1, 2)
            position = F.interpolate(grid, size=(rows, cols), mode="bicubic").permute(0, 2, 3, 1).reshape(-1, channels)
        features = pool.c_proj(pool.v_proj(x.flatten(2).permute(0, 2, 1) + position[None]))
        return normalized_grid(features.reshape(rows, cols, -1).detach().numpy())

    unpooled = TorchDenseEncoder.__new__(TorchDenseEncoder)  # the clipdex tower at the model's own input size
    unpooled.encoder, unpooled.tower, unpooled.preprocess = encoder, TorchDenseEncoder(encoder).tower, native

    def maskclip_native(image):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return value_path(visual.layer4(stages(torch.from_numpy(native(image))[None])))

    def gradcam(layer):  # type: ignore[no-untyped-def]
        def grid(image, query):  # type: ignore[no-untyped-def]
            kept = {}
            hook = layer.register_forward_hook(lambda module, inputs, output: kept.setdefault("a", output))
            embedding = F.normalize(model.encode_image(torch.from_numpy(native(image))[None]), dim=-1)
            hook.remove()
            activations = kept["a"]
            gradient, = torch.autograd.grad(embedding[0] @ torch.from_numpy(query), activations)
            return F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activations).sum(1))[0].detach().numpy()
        return grid

    def cell_centre_score(grid_of) -> float:  # type: ignore[no-untyped-def]
        hits = 0
        for case in cases:
            grid = grid_of(case)
            row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
            point = ((col + 0.5) * case.image.size[0] / grid.shape[1], (row + 0.5) * case.image.size[1] / grid.shape[0])
            hits += inside(point, case.box)
        return hits / len(cases)

    def similarity(features):  # type: ignore[no-untyped-def]
        return lambda case: features(case.image) @ case.query

    results = {
        "maskclip-native (2x2), cell centre": cell_centre_score(similarity(maskclip_native)),
        "maskclip-unpooled (4x4), cell centre": cell_centre_score(similarity(unpooled.features)),
        "maskclip-unpooled (4x4), centroid peak": pointing_game(cases, unpooled.features).accuracy,
    }
    clipdex = TorchDenseEncoder(encoder)
    score = pointing_game(cases, clipdex.features)
    results[f"clipdex: maskclip-unpooled x1.5 ({clipdex.preprocess.image_size} px), centroid peak"] = score.accuracy
    results["gradcam-layer4 (2x2), cell centre"] = cell_centre_score(lambda case: gradcam(visual.layer4)(case.image, case.query))
    results["gradcam-layer3 (4x4), cell centre"] = cell_centre_score(lambda case: gradcam(visual.layer3)(case.image, case.query))
    results["centre point (baseline)"] = score.centre_accuracy
    for name, value in results.items():
        print(f"{name:70s} {value:.3f}")

    measure_cost(encoder, clipdex, [case.image for case in cases], args.threads, "demo model")
    if args.vit:
        vit = TorchClipEncoder(ModelSpec("ViT-B-32", "none").resolve(), "cpu", threads=args.threads).load()
        measure_cost(vit, TorchDenseEncoder(vit), [case.image for case in cases[:50]], args.threads, "ViT-B-32, random weights")


def measure_cost(encoder, dense_tower, images, threads: int, label: str) -> None:  # type: ignore[no-untyped-def]
    """One embedding (the image export) against one explanation's features (the explain export), per image, batch of one."""
    from clipdex.search.encoders.dense_export import export_dense_encoder, load_dense_export
    from clipdex.search.encoders.image_export import export_image_encoder
    from clipdex.search.encoders.onnx_image import load_image_export

    with tempfile.TemporaryDirectory() as folder:
        library = Path(folder)
        dim = int(encoder.dim)
        export_image_encoder(encoder, library)
        export_dense_encoder(dense_tower, library, dim)
        embedder = load_image_export(library, encoder.spec, dim, None)
        dense = load_dense_export(library, encoder.spec, dim)
        assert embedder is not None and dense is not None
        embedder.set_threads(threads)
        embedder.expect_images(1)  # a session without prepacked weights, as the explain export's and a query's
        dense.threads = threads
        inputs = [(embedder.prepare(image)[None], dense.preprocess(image)[None]) for image in images]
        embed_ms = dense_ms = float("inf")
        for _ in range(5):  # the best of five passes (the first warms up): the least disturbed by other work
            started = time.perf_counter()
            for embed_input, _unused in inputs:
                embedder.encode_prepared(embed_input)
            embed_ms = min(embed_ms, 1000 * (time.perf_counter() - started) / len(inputs))
            started = time.perf_counter()
            for _unused, dense_input in inputs:
                dense.features_of(dense_input)
            dense_ms = min(dense_ms, 1000 * (time.perf_counter() - started) / len(inputs))
    print(f"{label}: one embedding (image export, onnxruntime, {threads} thread): {embed_ms:.3f} ms; "
          f"one explanation's features (explain export, grid {dense.settings.grid}): {dense_ms:.3f} ms; "
          f"ratio {dense_ms / embed_ms:.2f}")


if __name__ == "__main__":
    main()
