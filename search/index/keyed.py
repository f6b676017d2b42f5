"""Items an application adds under its own keys: texts, images and vectors that are not files.

An application that keeps its own objects (posts, products, uploads held in its own storage)
indexes them by its own keys, as llm's `Collection.embed(id, content, metadata)` does:
`Library.add_texts`, `add_images`, `add_vectors` and `remove` call the functions here.

- A key is an item's name in the application: a non-empty string, unique in the library
  (whatever the item's kind); adding a key that is there replaces that item in place (it
  keeps its id). Files and corpus texts have no key, and keys never name them.
- Each call is one catalog transaction (one generation): everything is read, decoded, checked
  and embedded first, then committed at once, so a bad input or a failure anywhere leaves
  nothing of the call behind. The in-memory index is kept in step as for files (the writer's
  commit), and other processes catch up from the change log: an item is searchable at once.
- Metadata is a JSON object per item, returned as the hit's `metadata`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

from clipdex.search.catalog.types import NewItem
from clipdex.search.errors import InvalidItems
from clipdex.search.media.imaging import MAX_IMAGE_PIXELS, decode_image, to_rgb

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from clipdex.search.catalog.database import Catalog
    from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder
    from clipdex.search.index.store import LibraryWriter

MAX_KEY_CHARS = 1_000
ENCODE_BATCH = 32  # images decoded and embedded at a time: a call's memory is its vectors, not its pixels
KINDS = ("image", "text")

ImageSource = Union[str, "os.PathLike[str]", bytes, "Image.Image"]


class KeyedLibrary(Protocol):
    """What adding keyed items uses of a library (`clipdex.search.library.Library` is one)."""

    @property
    def dim(self) -> int: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def encoder(self) -> ImageTextEncoder: ...

    def text_encoder(self) -> TextEncoder: ...

    def writer(self) -> AbstractContextManager[LibraryWriter]: ...


@dataclass(frozen=True)
class KeyedResult:
    """What one `add_*` call did: items added, items replaced (their keys were there), and the ids in input order."""

    added: int = 0
    replaced: int = 0
    ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"added": self.added, "replaced": self.replaced, "ids": self.ids}


def add_texts(library: KeyedLibrary, texts: Sequence[str], keys: Sequence[str],
              metadata: Sequence[dict[str, Any] | None] | None = None) -> KeyedResult:
    """Embed `texts` with the library's text encoder and add them under `keys`."""
    texts = list(texts)
    checked_keys = check_keys(keys, len(texts), "texts")
    extras = check_metadata(metadata, len(texts))
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidItems(f"texts[{number}] is a {type(text).__name__}, not a str")
        if not text.strip():
            raise InvalidItems(f"texts[{number}] is empty or only whitespace")
        _check_string(text, f"texts[{number}]")
    if not texts:
        return KeyedResult()
    encoder = library.text_encoder()
    vectors = np.concatenate([encoder.encode_texts(texts[start:start + ENCODE_BATCH])
                              for start in range(0, len(texts), ENCODE_BATCH)])
    items = [NewItem(kind="text", vector=vector, text=text, key=key, extra=extra)
             for text, vector, key, extra in zip(texts, vectors, checked_keys, extras)]
    return _commit(library, items)


def add_images(library: KeyedLibrary, images: Sequence[ImageSource], keys: Sequence[str],
               metadata: Sequence[dict[str, Any] | None] | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> KeyedResult:
    """Decode `images` (paths, bytes or PIL images), embed them with the library's model and add them under `keys`.

    A path is read for its pixels only: the item keeps no path (it is not a file of the library,
    and `clipdex index` never sees it); its width, height and capture time are kept for the filters."""
    images = list(images)
    checked_keys = check_keys(keys, len(images), "images")
    extras = check_metadata(metadata, len(images))
    if not images:
        return KeyedResult()
    items: list[NewItem] = []
    for start in range(0, len(images), ENCODE_BATCH):
        decoded = [_decoded(image, f"images[{number}]", max_pixels)
                   for number, image in enumerate(images[start:start + ENCODE_BATCH], start=start)]
        vectors = library.encoder.encode_images([image for image, _ in decoded])
        for (_, columns), vector, number in zip(decoded, vectors, range(start, len(images))):
            items.append(NewItem(kind="image", vector=vector, key=checked_keys[number], extra=extras[number], **columns))
    return _commit(library, items)


def add_vectors(library: KeyedLibrary, keys: Sequence[str], vectors: Any,
                metadata: Sequence[dict[str, Any] | None] | None = None, kind: str = "image") -> KeyedResult:
    """Add precomputed vectors (of the library's model: an (n, dim) array or n lists) under `keys`;
    each is normalized. `kind`: what they are the vectors of, "image" or "text" (what `kind=` filters)."""
    if kind not in KINDS:
        raise InvalidItems(f"kind is {kind!r}; it is one of {', '.join(KINDS)}")
    if not isinstance(vectors, np.ndarray):  # rows of their own lengths: say which one is wrong
        rows = list(vectors)
        for number, row in enumerate(rows):
            length = len(row) if isinstance(row, (list, tuple, np.ndarray)) else None
            if length is not None and length != library.dim:
                raise InvalidItems(f"vectors[{number}] has {length} dimensions; this library's model has {library.dim}")
        vectors = rows
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InvalidItems(f"vectors are not numbers in rows of equal length ({error})") from None
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, library.dim)
    if array.ndim != 2:
        raise InvalidItems(f"vectors have shape {array.shape}; give one row of {library.dim} numbers per key")
    checked_keys = check_keys(keys, len(array), "vectors")
    extras = check_metadata(metadata, len(array))
    if array.shape[1] != library.dim:
        raise InvalidItems(f"vectors[0] has {array.shape[1]} dimensions; this library's model has {library.dim}")
    items: list[NewItem] = []
    for number, (row, key, extra) in enumerate(zip(array, checked_keys, extras)):
        if not np.all(np.isfinite(row)):
            raise InvalidItems(f"vectors[{number}] holds NaN or infinite values")
        norm = float(np.linalg.norm(row))
        if not norm > 0 or not math.isfinite(norm):
            raise InvalidItems(f"vectors[{number}] is all zeros (or too small or large to normalize)")
        items.append(NewItem(kind=kind, vector=(row / norm).astype(np.float32), key=key, extra=extra))
    if not items:
        return KeyedResult()
    return _commit(library, items)


def remove(library: KeyedLibrary, keys: Sequence[str]) -> int:
    """Remove the items with these keys, in one transaction; how many there were (a key not there is no error)."""
    checked = check_keys(keys, None, "keys", unique=False)
    if not checked:
        return 0
    with library.writer() as writer:
        found = library.catalog.ids_of_item_keys(sorted(set(checked)))
        if found:
            writer.commit(remove_ids=sorted(found.values()))
    return len(found)


def item_ids(library: KeyedLibrary, keys: Sequence[str]) -> dict[str, int]:
    """The item ids of those of `keys` that are in the library (for `search(like=...)`, `get_item`)."""
    return library.catalog.ids_of_item_keys(sorted(set(check_keys(keys, None, "keys", unique=False))))


def check_keys(keys: Sequence[str], count: int | None, what: str, unique: bool = True) -> list[str]:
    """`keys` as a list of valid keys: as many as `count` (when given), each a string of 1 to
    MAX_KEY_CHARS characters without NUL (PostgreSQL refuses it), unique in the call (when `unique`)."""
    if isinstance(keys, (str, bytes)):
        raise InvalidItems("keys is one string; give a list of keys, one per item")
    checked = list(keys)
    if count is not None and len(checked) != count:
        raise InvalidItems(f"{len(checked)} keys given for {count} {what}; give one key per item")
    seen: set[str] = set()
    for number, key in enumerate(checked):
        if not isinstance(key, str):
            raise InvalidItems(f"keys[{number}] is a {type(key).__name__}; keys are strings")
        if not key or len(key) > MAX_KEY_CHARS:
            raise InvalidItems(f"keys[{number}] has {len(key)} characters; a key has 1 to {MAX_KEY_CHARS}")
        _check_string(key, f"keys[{number}]")
        if unique and key in seen:
            raise InvalidItems(f"keys[{number}] {key!r} appears twice in the call; each item needs its own key")
        seen.add(key)
    return checked


def check_metadata(metadata: Sequence[dict[str, Any] | None] | None, count: int) -> list[dict[str, Any]]:
    """One JSON object per item (None: none), as stored: it must go to JSON and back unchanged in kind."""
    if metadata is None:
        return [{} for _ in range(count)]
    if isinstance(metadata, dict):
        raise InvalidItems("metadata is one dict; give a list of them, one per item (or None)")
    given = list(metadata)
    if len(given) != count:
        raise InvalidItems(f"{len(given)} metadata given for {count} items; give one per item (or None)")
    checked: list[dict[str, Any]] = []
    for number, value in enumerate(given):
        if value is None:
            checked.append({})
            continue
        if not isinstance(value, dict):
            raise InvalidItems(f"metadata[{number}] is a {type(value).__name__}, not a dict")
        try:
            stored = json.dumps(value, allow_nan=False, ensure_ascii=False)
            stored.encode("utf-8")  # a lone surrogate could be stored escaped, but never sent back as JSON
            checked.append(json.loads(stored))
        except (TypeError, ValueError) as error:  # UnicodeEncodeError is a ValueError
            raise InvalidItems(f"metadata[{number}] cannot be stored as JSON ({error})") from None
    return checked


def _check_string(value: str, name: str) -> None:
    if "\x00" in value:
        raise InvalidItems(f"{name} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidItems(f"{name} holds a lone surrogate (not valid Unicode)") from None


def _decoded(image: ImageSource, name: str, max_pixels: int) -> tuple[Image.Image, dict[str, Any]]:
    """An RGB image to embed, and the columns an item keeps of it."""
    from PIL import Image

    if isinstance(image, Image.Image):
        width, height = image.size
        if width * height == 0:
            raise InvalidItems(f"{name} has no pixels")
        return to_rgb(image), {"width": width, "height": height}
    if not isinstance(image, (bytes, str, os.PathLike)):
        raise InvalidItems(f"{name} is a {type(image).__name__}; give a path, bytes or a PIL image")
    decoded = decode_image(image if isinstance(image, bytes) else os.fspath(image), name=name, max_pixels=max_pixels)
    return decoded.image, {"width": decoded.width, "height": decoded.height, "taken_at": decoded.taken_at,
                           "camera_make": decoded.camera_make, "camera_model": decoded.camera_model}


def _commit(library: KeyedLibrary, items: list[NewItem]) -> KeyedResult:
    """One transaction: the items whose key is there replace those items (and keep their ids), the others are added."""
    with library.writer() as writer:
        existing = library.catalog.ids_of_item_keys([item.key for item in items if item.key is not None])
        for item in items:
            item.id = existing.get(item.key or "")
        ids = writer.commit(items=items)
    return KeyedResult(added=len(items) - len(existing), replaced=len(existing), ids=[int(i) for i in ids])

