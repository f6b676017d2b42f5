"""Hybrid ranking on a labelled set: which fusion of meaning and words, and how well `--confident` cuts.

The set: `--images` generated shapes (data/shapes.py, seeds the demo model never saw), indexed
under neutral names (img_0001.jpg: the file name gives nothing away) with the project's demo
model, each with an EXIF description written as people write them: for half the images their
label ("red circle at the beach"), for a tenth a wrong label (a mislabelled photo), for the rest
none; and one image in eight also names a person ("with Grandma Rosa"), which no picture shows.

Two kinds of queries, each with its relevant images known:
- label queries ("red circle"): the relevant images are that class; meaning finds them well,
  words find the described half and some mislabelled ones;
- name queries ("Grandma Rosa"): the relevant images are those described so; only words can.

For each fusion of the semantic ranking (its best 100) and the keyword ranking: nDCG@10 and
precision@10 per kind of query. Fusions: reciprocal-rank fusion with k = 60 (clipdex's, with
each ranking's first kept in the top three; and plain), RRF with k = 10, and linear blends
a*cos' + (1-a)*bm25' of the scores min-max normalised over the candidates (a = 0.3, 0.5, 0.7).
Then `--confident` on the semantic ranking: precision and recall of the hits it keeps, for
the cutoff z (standard deviations above the mean of the query's cosines over the library).

    .venv/bin/python benchmarks/hybrid_ranking.py [--images 400] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from clipdex.indexer import index_paths  # noqa: E402
from clipdex.search import ranking  # noqa: E402
from clipdex.search.catalog.keywords import KeywordQuery  # noqa: E402
from clipdex.search.encoders.model import ModelSpec  # noqa: E402
from clipdex.search.library import Library  # noqa: E402

DEMO = ModelSpec(str(ROOT / "data" / "demo-model" / "clipdex-demo.json"), str(ROOT / "data" / "demo-model" / "clipdex-demo.pt"))
PEOPLE = ["Grandma Rosa", "Uncle Tomasz", "Baby Lena", "Coach Adebayo"]
PLACES = ["at the beach", "in the garden", "on holiday", "at home"]
SEED = 5151
DEPTH = 100


def shapes_module() -> Any:
    spec = importlib.util.spec_from_file_location("shapes", ROOT / "data" / "shapes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("shapes", module)
    spec.loader.exec_module(module)
    return module


def make_set(folder: Path, count: int) -> tuple[dict[str, str], dict[str, str | None]]:
    """Images under neutral names: {path: class label}, {path: person named in its description}."""
    shapes = shapes_module()
    generated = folder / "generated"
    shapes.generate(generated, count=count, seed=SEED, captions_per_image=1)
    rng = np.random.default_rng(SEED)
    labels, people = {}, {}
    out = folder / "photos"
    out.mkdir()
    all_labels = shapes.class_labels()
    for number, source in enumerate(sorted(generated.glob("*.jpg"))):
        label = shapes.class_label(source)
        draw = rng.random()
        described = label if draw < 0.5 else str(rng.choice(all_labels)) if draw < 0.6 else None
        person = str(rng.choice(PEOPLE)) if rng.random() < 0.125 else None
        words = " ".join(part for part in (described, str(rng.choice(PLACES)) if described else None,
                                           f"with {person}" if person else None) if part)
        path = out / f"img_{number:04d}.jpg"
        exif = Image.Exif()
        if words:
            exif[0x010E] = words
        with Image.open(source) as image:
            image.save(path, exif=exif, quality=90)
        labels[str(path)], people[str(path)] = label, person
    return labels, people


def ndcg_at_10(order: Sequence[str], relevant: set[str]) -> float:
    gain = sum(1 / math.log2(rank + 2) for rank, path in enumerate(order[:10]) if path in relevant)
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(10, len(relevant))))
    return gain / ideal if ideal else 0.0


def blend(alpha: float) -> Callable[[list[int], list[int], dict[int, float], dict[int, float]], list[int]]:
    def fused(semantic: list[int], keyword: list[int], cosines: dict[int, float], bm25: dict[int, float]) -> list[int]:
        def normalised(scores: dict[int, float]) -> dict[int, float]:
            if not scores:
                return {}
            low, high = min(scores.values()), max(scores.values())
            return {i: (s - low) / (high - low) if high > low else 1.0 for i, s in scores.items()}

        cos, kw = normalised({i: cosines[i] for i in semantic}), normalised({i: bm25[i] for i in keyword})
        candidates = set(semantic) | set(keyword)
        return sorted(candidates, key=lambda i: -(alpha * cos.get(i, 0.0) + (1 - alpha) * kw.get(i, 0.0)))
    return fused


FUSIONS: dict[str, Callable[[list[int], list[int], dict[int, float], dict[int, float]], list[int]]] = {
    "semantic only": lambda s, k, c, b: s,
    "keyword only": lambda s, k, c, b: k,
    "RRF k=60, firsts kept (clipdex)": lambda s, k, c, b: ranking.fuse([s, k]),
    "RRF k=60, plain": lambda s, k, c, b: plain_rrf([s, k], 60),
    "RRF k=10": lambda s, k, c, b: plain_rrf([s, k], 10),
    "blend a=0.3": blend(0.3),
    "blend a=0.5": blend(0.5),
    "blend a=0.7": blend(0.7),
}


def plain_rrf(rankings: Sequence[Sequence[int]], k: int) -> list[int]:
    scores: dict[int, float] = {}
    for ranked in rankings:
        for rank, item in enumerate(ranked, start=1):
            scores[item] = scores.get(item, 0.0) + 1 / (k + rank)
    return sorted(scores, key=lambda item: -scores[item])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipdex-hybrid-bench-") as folder:
        labels, people = make_set(Path(folder), args.images)
        with Library.open(Path(folder) / "library", model=DEMO, create=True, device="cpu") as library:
            index_paths(library, [Path(folder) / "photos"])
            results = evaluate(library, labels, people)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def evaluate(library: Library, labels: dict[str, str], people: dict[str, str | None]) -> dict[str, Any]:
    ids = library.catalog.ids_at_paths(list(labels))
    path_of = {item_id: path for path, item_id in ids.items()}
    all_ids, all_vectors = library.catalog.all_vectors()
    queries: list[tuple[str, str, set[str]]] = []
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    queries += [("label", label, {p for p, l in labels.items() if l == label}) for label, n in counts.items() if n >= 5]
    queries += [("name", person, {p for p, named in people.items() if named == person}) for person in PEOPLE]
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {}
    cutoffs: dict[float, list[tuple[int, int, int]]] = {z: [] for z in (1.5, 1.75, 2.0, 2.25, 2.5, 3.0)}
    for kind, text, relevant in queries:
        vector = library.encode_text(text)
        semantic_hits = library.search(text=text, mode="semantic", k=DEPTH)
        semantic = [hit.id for hit in semantic_hits]
        cosines = {item_id: float(np.dot(vector, v)) for item_id, v in zip(all_ids.tolist(), all_vectors)}
        found = library.catalog.keyword_search(KeywordQuery.parse(text), DEPTH)
        keyword, bm25 = [i for i, _ in found], dict(found)
        for name, fuse in FUSIONS.items():
            order = [path_of[i] for i in fuse(semantic, keyword, cosines, bm25)]
            precision = sum(path in relevant for path in order[:10]) / 10
            scores.setdefault(name, {}).setdefault(kind, []).append((ndcg_at_10(order, relevant), precision))
        background = np.array(list(cosines.values()))
        for z in cutoffs:
            kept = ranking.standing_out({i: cosines[i] for i in semantic}, background, z=z)
            hits_kept = sum(path_of[i] in relevant for i in kept)
            cutoffs[z].append((len(kept), hits_kept, len(relevant)))
    table = {name: {kind: {"ndcg@10": round(float(np.mean([n for n, _ in values])), 3),
                           "p@10": round(float(np.mean([p for _, p in values])), 3), "queries": len(values)}
                    for kind, values in by_kind.items()}
             for name, by_kind in scores.items()}
    confident = {}
    for z, rows in cutoffs.items():
        kept = sum(k for k, _, _ in rows)
        right = sum(r for _, r, _ in rows)
        relevant = sum(n for _, _, n in rows)
        confident[f"z={z}"] = {"precision": round(right / kept, 3) if kept else None, "recall": round(right / relevant, 3),
                               "kept_per_query": round(kept / len(rows), 1)}
    return {"fusion": table, "confident_semantic": confident, "images": len(labels)}


if __name__ == "__main__":
    sys.exit(main())
