"""Zero-shot labels: which of a set of labels fits an image best, with prompt templates."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from clipdex.search.errors import InvalidQuery

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# CLIP's learned logit scale is about 100; softmax over cosine * 100 gives CLIP-style probabilities.
LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class Label:
    label: str
    probability: float  # softmax over all labels
    score: float  # cosine between the image and the label's (template-averaged) vector

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "probability": round(self.probability, 6), "score": round(self.score, 6)}


def label_vectors(encoder: Any, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
    """One normalized vector per label: the mean of its prompts' vectors (prompt ensembling)."""
    if not labels:
        raise InvalidQuery("no labels given")
    for template in templates:
        check_template(template)
    prompts = [template.format(label) for label in labels for template in templates]
    vectors = encoder.encode_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def check_template(template: str) -> None:
    """A prompt template holds `{}` (or `{0}`) for the label and no other field; `{{`/`}}` are literal braces."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:  # a lone { or }
        raise InvalidQuery(f"template {template!r}: {error}; write {{}} for the label and {{{{ or }}}} for a literal brace") from None
    unknown = [name for name in fields if name not in ("", "0")]
    if unknown:
        raise InvalidQuery(f"template {template!r} has the unknown field {{{unknown[0]}}}; use {{}} for the label")
    if not fields:
        raise InvalidQuery(f"template {template!r} has no {{}} for the label")
    try:
        template.format("label")
    except (ValueError, IndexError, KeyError) as error:  # a format spec or conversion that does not apply to a text
        raise InvalidQuery(f"template {template!r} cannot be filled with a label: {error}") from None


def classify(image_vectors: np.ndarray, labels: Sequence[str], vectors: np.ndarray, top: int = 5) -> list[list[Label]]:
    """The `top` labels for each image, best first."""
    scores = np.asarray(image_vectors, dtype=np.float32) @ vectors.T
    logits = LOGIT_SCALE * scores
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    results = []
    for row_scores, row_probabilities in zip(scores, probabilities):
        order = np.argsort(-row_scores)[:top]
        results.append([Label(labels[i], float(row_probabilities[i]), float(row_scores[i])) for i in order])
    return results
