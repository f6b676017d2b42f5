"""What clipdex asks of an encoder: numpy in and out, whatever runs the model inside.

Two interfaces: `TextEncoder` (enough to answer text queries and index texts, which the
ONNX export of the text tower provides without torch) and `ImageTextEncoder` (the whole
model: images too, and the split of image encoding into `prepare`, which runs on the
indexer's decode threads, and `encode_prepared`, which runs on its model lanes).
Vectors are always float32 and L2-normalized, one row per input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from clipdex.search.encoders.model import ResolvedModel


class TextEncoder(Protocol):
    """Turns texts into vectors of a CLIP space."""

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        ...

    @property
    def context_length(self) -> int:
        """Tokens per text; longer texts are truncated."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalized float32 vectors, (len(texts), dim)."""
        ...

    def count_tokens(self, text: str) -> int:
        """How many BPE tokens `text` takes, start and end tokens included (0 when unknown)."""
        ...


class ImagePreparer(Protocol):
    """What the indexer's decoders need of the model: its input size and preprocessing."""

    @property
    def device(self) -> str:
        """Where the model runs once loaded: cpu or cuda."""
        ...

    @property
    def image_size(self) -> int:
        """The side of the square the model sees (decoders may draft-decode to twice that)."""
        ...

    def prepare(self, image: "Image.Image") -> np.ndarray:
        """The model's own preprocessing of one RGB image: a float32 (3, H, W) array.

        Thread-safe, and cheap next to `encode_prepared`: the indexer runs it on its decode threads.
        """
        ...


class ImageTextEncoder(TextEncoder, Protocol):
    """A whole CLIP model: texts and images into one space, loaded lazily on first use.

    Subclass it explicitly to inherit `encode_files`.
    """

    spec: "ResolvedModel"  # the model it runs
    threads: int  # CPU threads the model may use

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory (nothing loads it but a use)."""
        ...

    @property
    def device(self) -> str:
        """Where the model runs once loaded: cpu or cuda."""
        ...

    @property
    def image_size(self) -> int:
        """The side of the square the model sees (decoders may draft-decode to twice that)."""
        ...

    def load(self) -> Any:
        """Load the model now rather than on first use; returns the encoder."""
        ...

    def set_threads(self, count: int) -> None:
        """Run the model on `count` CPU threads from now on."""
        ...

    def encode_images(self, images: Sequence["Image.Image"]) -> np.ndarray:
        """Normalized float32 vectors of RGB images, (len(images), dim)."""
        ...

    def prepare(self, image: "Image.Image") -> np.ndarray:
        """The model's own preprocessing of one RGB image: a float32 (3, H, W) array.

        Thread-safe, and cheap next to `encode_prepared`: the indexer runs it on its decode threads.
        """
        ...

    def encode_prepared(self, batch: np.ndarray) -> np.ndarray:
        """Normalized float32 vectors of a stack of `prepare` results, (N, 3, H, W)."""
        ...

    def expect_images(self, count: int) -> None:
        """Say how many images the coming run will embed (the indexer knows from its diff),
        so that the encoder can load the way that pays for that many; none by default."""
        return None

    def encode_files(self, paths: Sequence[Any], batch_size: int = 64,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Decode (EXIF-oriented RGB) and encode image files; an unreadable one raises UnreadableImage."""
        from clipdex.search.media.imaging import decode_image

        parts = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            parts.append(self.encode_images([decode_image(path, draft_size=2 * self.image_size).image for path in chunk]))
            if progress:
                progress(start + len(chunk), len(paths))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)


def normalized(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (a zero row stays zero)."""
    array = features.astype(np.float32, copy=False)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)
