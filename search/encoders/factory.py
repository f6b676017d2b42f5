"""Which encoder does what: the one factory for a model, and which encoder answers a library's text queries."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder
from clipdex.search.model import ResolvedModel


def create_encoder(model: ResolvedModel, device: str = "auto") -> ImageTextEncoder:
    """The encoder that runs `model` on `device` (auto, cpu or cuda); nothing is loaded yet.

    open_clip on torch is the one backend so far.
    """
    from clipdex.search.encoders.torch_clip import TorchClipEncoder

    return TorchClipEncoder(model, device)


class QueryVectorCache(Protocol):
    """Vectors of texts asked before (the library keeps them in its catalog)."""

    def get(self, text: str) -> np.ndarray | None: ...

    def put(self, text: str, vector: np.ndarray) -> None: ...


class LibraryEncoders:
    """A library's encoders: its model, created on first use and loaded only when something
    must be embedded, and the encoder that answers its text queries.

    A text query is answered by the model when it is loaded anyway, else by the library's
    verified ONNX export of the text tower (no torch, no open_clip; see
    `clipdex.search.text_export`), else by the model, whose text tower is then exported
    for the next process.
    """

    def __init__(self, library_path: Path, model: ResolvedModel, dim: int, requested_device: str = "auto",
                 query_cache: QueryVectorCache | None = None) -> None:
        self.library_path = library_path
        self.model = model
        self.dim = dim
        self.requested_device = requested_device  # auto, cpu or cuda
        self.query_cache = query_cache
        self._image_text: ImageTextEncoder | None = None
        self._text_export: TextEncoder | None = None
        self._text_export_looked_up = False

    @property
    def image_text(self) -> ImageTextEncoder:
        """The library's model (created now, loaded on its first use)."""
        if self._image_text is None:
            self._image_text = create_encoder(self.model, self.requested_device)
        return self._image_text

    @property
    def model_loaded(self) -> bool:
        """Whether this library's model is in memory (torch and open_clip imported)."""
        return self._image_text is not None and self._image_text.loaded

    def text(self) -> TextEncoder:
        """The encoder for text queries: the model when it is loaded, else the library's
        exported text encoder, else the model."""
        if self.model_loaded:
            return self.image_text
        if not self._text_export_looked_up:
            from clipdex.search.encoders.onnx_text import load_text_export

            self._text_export = load_text_export(self.library_path, self.model, self.dim)
            self._text_export_looked_up = True
        return self._text_export or self.image_text

    def encode_text(self, text: str) -> np.ndarray:
        """A text's vector, from the query cache when it was asked before."""
        cached = self.query_cache.get(text) if self.query_cache is not None else None
        if cached is not None and cached.shape == (self.dim,):
            return cached
        encoder = self.text()
        vector = encoder.encode_texts([text])[0]
        if self.query_cache is not None:
            self.query_cache.put(text, vector)
        if encoder is self._image_text:
            self.export_text()
        return vector

    def encode_image(self, image: str | os.PathLike[str] | bytes) -> np.ndarray:
        """The vector of a query image, a file or its bytes (EXIF-oriented RGB; at most
        MAX_QUERY_IMAGE_PIXELS, lower than for indexing: a query must not cost gigabytes)."""
        from clipdex.search.imaging import MAX_QUERY_IMAGE_PIXELS, decode_image

        decoded = decode_image(image if isinstance(image, bytes) else Path(image), max_pixels=MAX_QUERY_IMAGE_PIXELS)
        return self.image_text.encode_images([decoded.image])[0]

    def export_text(self) -> None:
        """Store the loaded model's text tower in the library as ONNX, once (see `clipdex.search.text_export`)."""
        from clipdex.search.encoders.torch_clip import TorchClipEncoder

        if self.model_loaded and isinstance(self._image_text, TorchClipEncoder):
            from clipdex.search.text_export import ensure_text_export

            ensure_text_export(self.library_path, self._image_text, self.dim)
