"""The library as the HTTP app uses it: one model for every request, searches that see new commits."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from clipdex.search.catalog.types import ItemRow
from clipdex.search.errors import ItemNotFound
from clipdex.search.explanation import Explanation
from clipdex.search.index.keyed import KeyedResult
from clipdex.search.media.imaging import MAX_QUERY_IMAGE_PIXELS, decode_image
from clipdex.search.library import Library
from clipdex.search.query import Hit, Query


class SearchService:
    """Thread-safe access to one open library for the app's worker threads.

    The model runs one call at a time (torch spreads each call over the cores itself).
    Searches run at the same time: the library shares its FAISS index between them, and
    catches it up with commits made elsewhere (an index run in another process) first.
    """

    def __init__(self, library: Library) -> None:
        self.library = library
        self._model_lock = threading.Lock()

    def search(self, query: Query) -> list[Hit]:
        with self._model_lock:
            vector = self.library.query_vector(query)
        return self.library.search_vector(vector, query)  # catches up with other processes' commits first

    def embed_text(self, text: str) -> np.ndarray:
        with self._model_lock:
            return self.library.encode_text(text)

    def embed_image(self, data: bytes) -> np.ndarray:
        image = decode_image(data, name="uploaded image", max_pixels=MAX_QUERY_IMAGE_PIXELS).image
        with self._model_lock:
            return self.library.encoder.encode_images([image])[0]

    def add_texts(self, texts: list[str], keys: list[str], metadata: list[dict[str, Any]]) -> KeyedResult:
        """Add keyed texts (`Library.add_texts`); the model lock is held throughout: one write at a time."""
        with self._model_lock:
            return self.library.add_texts(texts, keys, metadata)

    def add_images(self, images: list[bytes], keys: list[str], metadata: list[dict[str, Any]]) -> KeyedResult:
        with self._model_lock:
            return self.library.add_images(images, keys, metadata)

    def add_vectors(self, keys: list[str], vectors: list[list[float]], metadata: list[dict[str, Any]],
                    kind: str) -> KeyedResult:
        with self._model_lock:
            return self.library.add_vectors(keys, vectors, metadata, kind)

    def remove(self, keys: list[str]) -> int:
        with self._model_lock:
            return self.library.remove(keys)

    def stats(self) -> dict[str, Any]:
        return self.library.stats()  # its vector count comes from the index, caught up first

    def item(self, item_id: int) -> ItemRow:
        item = self.library.catalog.get_item(item_id)
        if item is None:
            raise ItemNotFound(item_id)
        return item

    def explain(self, query: Query, item_id: int, timestamp: float | None = None) -> Explanation:
        """`Library.explain` of an indexed image (or a video at `timestamp`), the model run one call at a time."""
        with self._model_lock:
            return self.library.explain(query, item_id, timestamp=timestamp)

    def load_model(self) -> None:
        """Load the model now rather than on the first request."""
        with self._model_lock:
            self.library.encoder.load()
