"""Cross-modal retrieval metrics (pure numpy) and caption-file reading.

Protocol (the standard COCO / Flickr30k one, as in CLIP and open_clip's
``retrieval`` benchmarks):

* every caption belongs to exactly one image; an image may have several
  captions (COCO and Flickr30k have five);
* similarities are cosine similarities: both sides are L2-normalised here;
* **text -> image recall@k**: for every caption, rank *all* images; a hit if
  the caption's own image is among the top ``k``. Averaged over captions;
* **image -> text recall@k**: for every image, rank *all* captions; a hit if
  *any* of its captions is among the top ``k``. Averaged over the images
  that have at least one caption (images without captions still act as
  distractors for text -> image);
* ties are counted in the query's favour: the rank of the best ground truth
  is the number of candidates with a strictly higher score.

Nothing here imports torch, so the module is cheap to import.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
_CHUNK = 1024  # query rows scored at once, bounds memory for large sets


def read_captions(path: str | Path) -> list[tuple[str, str]]:
    """Read ``(image, caption)`` pairs from a caption file.

    Formats: TSV or CSV with a header naming the columns ``image`` and
    ``caption`` (other columns are ignored; ``.tsv`` is tab-separated,
    ``.csv`` comma-separated, other suffixes are sniffed), or JSON Lines
    (``.jsonl`` / ``.ndjson``: one object per line with string keys
    ``image`` and ``caption``). An image may appear on several rows. Blank
    lines are skipped.

    Raises ``ValueError`` naming the file (and line) for a missing header
    column, a bad row, an empty value or a file without captions.
    """
    file = Path(path)
    text = file.read_text(encoding="utf-8-sig")
    if _is_jsonl(file, text):
        pairs = _read_jsonl(file, text)
    else:
        pairs = _read_delimited(file, text, _delimiter(file, text))
    if not pairs:
        raise ValueError(f"{file}: no captions found")
    return pairs


def _is_jsonl(file: Path, text: str) -> bool:
    if file.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if file.suffix.lower() in (".tsv", ".csv"):
        return False
    return text.lstrip().startswith("{")


def _delimiter(file: Path, text: str) -> str:
    suffix = file.suffix.lower()
    if suffix == ".tsv":
        return "\t"
    if suffix == ".csv":
        return ","
    first_line = text.split("\n", 1)[0]
    return "\t" if "\t" in first_line else ","


def _read_jsonl(file: Path, text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{file}:{number}: expected a JSON object with 'image' and 'caption'")
        pairs.append(_pair(file, number, record.get("image"), record.get("caption")))
    return pairs


def _read_delimited(file: Path, text: str, delimiter: str) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = next(reader, None)
    columns = [name.strip().lower() for name in header or []]
    missing = [name for name in ("image", "caption") if name not in columns]
    if missing:
        raise ValueError(
            f"{file}:1: header must name the columns 'image' and 'caption' "
            f"(missing {', '.join(missing)}; found {columns or 'nothing'})"
        )
    image_col, caption_col = columns.index("image"), columns.index("caption")
    pairs: list[tuple[str, str]] = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(image_col, caption_col):
            raise ValueError(f"{file}:{reader.line_num}: expected {len(columns)} columns, got {len(row)}")
        pairs.append(_pair(file, reader.line_num, row[image_col], row[caption_col]))
    return pairs


def _pair(file: Path, number: int, image: object, caption: object) -> tuple[str, str]:
    return _field(file, number, "image", image), _field(file, number, "caption", caption)


def _field(file: Path, number: int, key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{file}:{number}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def group_captions(pairs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str], np.ndarray]:
    """Split pairs into ``(images, captions, text_to_image)``.

    ``images`` are the distinct image names in order of first appearance,
    ``captions`` the captions in input order, and ``text_to_image[j]`` the
    index in ``images`` of caption ``j``'s image, ready for
    :func:`retrieval_recall`.
    """
    index_of: dict[str, int] = {}
    captions: list[str] = []
    owners: list[int] = []
    for image, caption in pairs:
        owners.append(index_of.setdefault(image, len(index_of)))
        captions.append(caption)
    return list(index_of), captions, np.asarray(owners, dtype=np.int64)


def retrieval_recall(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Recall@k in both directions (COCO / Flickr30k protocol, see module doc).

    Args:
        image_vectors: ``(num_images, dim)`` image embeddings.
        text_vectors: ``(num_texts, dim)`` caption embeddings.
        text_to_image: ``(num_texts,)`` integer index of each caption's image.
        ks: cut-offs, e.g. ``(1, 5, 10)``.

    Returns:
        ``{"image_to_text": {"R@1": r, ...}, "text_to_image": {"R@1": r, ...},
        "num_images": int, "num_texts": int}`` with recalls as fractions in
        ``[0, 1]``. ``image_to_text`` is averaged over images that have at
        least one caption.
    """
    images, texts, owners = _validate(image_vectors, text_vectors, text_to_image, ks)
    text_ranks = _text_to_image_ranks(images, texts, owners)
    image_ranks = _image_to_text_ranks(images, texts, owners)
    return {
        "image_to_text": _recalls(image_ranks, ks),
        "text_to_image": _recalls(text_ranks, ks),
        "num_images": int(images.shape[0]),
        "num_texts": int(texts.shape[0]),
    }


def _validate(
    image_vectors: np.ndarray, text_vectors: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.asarray(image_vectors, dtype=np.float32)
    texts = np.asarray(text_vectors, dtype=np.float32)
    owners = np.asarray(text_to_image)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"expected 2-D vectors of equal width, got {images.shape} and {texts.shape}")
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise ValueError("need at least one image and one text")
    if owners.shape != (texts.shape[0],) or not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(f"text_to_image must be {texts.shape[0]} integers, got shape {owners.shape}")
    if owners.min() < 0 or owners.max() >= images.shape[0]:
        raise ValueError("text_to_image holds an index outside the image range")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    return _normalise(images), _normalise(texts), owners.astype(np.int64)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _text_to_image_ranks(images: np.ndarray, texts: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """0-based rank of each caption's own image among all images."""
    ranks = np.empty(texts.shape[0], dtype=np.int64)
    for start in range(0, texts.shape[0], _CHUNK):
        scores = texts[start : start + _CHUNK] @ images.T
        rows = np.arange(scores.shape[0])
        truth = scores[rows, owners[start : start + _CHUNK]]
        ranks[start : start + _CHUNK] = (scores > truth[:, None]).sum(axis=1)
    return ranks


def _image_to_text_ranks(images: np.ndarray, texts: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """0-based rank of each captioned image's best caption among all captions."""
    captioned = np.unique(owners)
    ranks = np.empty(captioned.shape[0], dtype=np.int64)
    for start in range(0, captioned.shape[0], _CHUNK):
        chosen = captioned[start : start + _CHUNK]
        scores = images[chosen] @ texts.T
        own = owners[None, :] == chosen[:, None]
        best = np.where(own, scores, -np.inf).max(axis=1)
        ranks[start : start + _CHUNK] = (scores > best[:, None]).sum(axis=1)
    return ranks


def _recalls(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}
