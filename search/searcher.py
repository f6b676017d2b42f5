"""Answering a query: its terms become one vector, the vector finds filtered hits.

The searcher turns each term (a text, an image, a stored item's vector, a raw vector)
into a vector, combines them (`query.combine`), asks the catalog which items pass the
filters and the vector store for the best of those, and returns typed `Hit`s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from clipdex.search.catalog.types import ItemRow
from clipdex.search.errors import FileUnavailable, InvalidQuery, ItemNotFound
from clipdex.search.explanation import Explanation, explanation_of
from clipdex.search.query import Hit, Query, Term, combine, vector_from
from clipdex.search.index.store import VectorStore
from clipdex.search.catalog.vector_rows import vector_of

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.encoders.dense_export import DenseEncoder

TextEncoder = Callable[[str], np.ndarray]
ImageEncoder = Callable[[Any], np.ndarray]
# An explained JPEG is decoded at least this large on both sides (the overlay's photo; far
# more than a dense tower's input, 96 pixels for the demo model, 224 for ViT-B-32).
OVERLAY_DRAFT = 512


class Searcher:
    def __init__(self, catalog: Catalog, store: VectorStore, encode_text: TextEncoder, encode_image: ImageEncoder) -> None:
        self.catalog = catalog
        self.store = store
        self.encode_text = encode_text
        self.encode_image = encode_image

    # -- query terms to one vector ------------------------------------------------------------

    def term_vector(self, term: Term) -> np.ndarray:
        if term.kind == "text":
            return self.encode_text(str(term.value))
        if term.kind == "image":
            return self.encode_image(term.value)
        if term.kind == "like":
            item = self.catalog.get_item(int(term.value))
            if item is None:
                raise ItemNotFound(term.value)
            return vector_of(item.id, item.vector, self.catalog.describe(), self.store.dim)
        return self.vector_term(term.value)

    def vector_term(self, value: Any) -> np.ndarray:
        """A raw query vector (an array, or the path of a .npy file), checked against the library."""
        vector = vector_from(value)  # a .npy read safely; strings, complex numbers and empty arrays refused
        if vector.shape[0] != self.store.dim:
            raise InvalidQuery(f"the query vector has {vector.shape[0]} dimensions; this library's model has {self.store.dim}")
        if not np.all(np.isfinite(vector)):
            raise InvalidQuery("the query vector holds NaN or infinite values")
        return vector

    def query_kind(self, query: Query) -> str:
        """Which tuned search breadth fits the query (see `IndexSpec.search_params_by_kind`):
        "text" when a term is a text or a stored text item, which lie far from the images in
        CLIP space; "image" for images, stored images and raw vectors, which lie among them."""
        for term in query.terms:
            if term.weight == 0:
                continue
            if term.kind == "text":
                return "text"
            if term.kind == "like":
                item = self.catalog.get_item(int(term.value))
                if item is not None and item.kind == "text":
                    return "text"
        return "image"

    def query_vector(self, query: Query) -> np.ndarray:
        return combine([self.term_vector(term) for term in query.terms], [term.weight for term in query.terms])

    # -- one vector to hits -----------------------------------------------------------------

    def search_vector(self, vector: np.ndarray, query: Query) -> list[Hit]:
        """The query's page of hits for `vector`: the best k among the items that pass its filters."""
        allowed = self.catalog.filtered_ids(query.filters)
        if allowed is not None and len(allowed) == 0:
            return []
        wanted = query.k + query.offset
        scores, ids = self.store.search(vector[None, :], wanted, allowed, self.query_kind(query))
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        pairs = pairs[query.offset : query.offset + query.k]
        if query.threshold is not None:
            pairs = [(s, i) for s, i in pairs if s >= query.threshold]
        items = self.catalog.get_items(i for _, i in pairs)
        hits: list[Hit] = []
        for score, item_id in pairs:
            item = items.get(item_id)
            if item is None:  # removed since the index was read
                continue
            hits.append(hit_of(len(hits) + 1 + query.offset, score, item))
        return hits

    def search(self, query: Query) -> list[Hit]:
        return self.search_vector(self.query_vector(query), query)

    def get_item(self, item_id: int) -> Hit:
        item = self.catalog.get_item(item_id)
        if item is None:
            raise ItemNotFound(item_id)
        return hit_of(0, 1.0, item)


def hit_of(rank: int, score: float, item: ItemRow) -> Hit:
    return Hit(rank=rank, score=score, id=item.id, kind=item.kind, path=item.path, text=item.text, metadata=item.metadata_dict(),
               key=item.key)


def explain(searcher: Searcher, query: Query, dense_encoder: Callable[[], "DenseEncoder"], item_id: int | None, path: Any,
            encode_image: Callable[[Any], np.ndarray]) -> Explanation:
    """Where `query` matches inside a stored image item (`item_id`) or an image file (`path`; exactly one).

    The score is the query's cosine with the item's stored vector, or with the file's vector
    (`encode_image` of the decoded image); the map comes from `dense_encoder()` on the same
    pixels, asked for once the query and the image are known to be good (it may load the model).
    """
    from clipdex.search.media.imaging import MAX_QUERY_IMAGE_PIXELS, decode_image

    if (item_id is None) == (path is None):
        raise InvalidQuery("explain needs exactly one image: an item id or a file path")
    vector = searcher.query_vector(query)
    if item_id is not None:
        item = searcher.catalog.get_item(int(item_id))
        if item is None:
            raise ItemNotFound(item_id)
        if item.kind != "image" or not item.path:
            what = "a text" if item.kind == "text" else "an image added under a key"
            raise InvalidQuery(f"item {item.id} is {what}, not an image file: only image files can be explained")
        if not Path(item.path).is_file():
            raise FileUnavailable(f"the file of item {item.id} is gone ({item.path}); re-index to update the library")
        decoded = decode_image(Path(item.path), draft_size=OVERLAY_DRAFT)
        score = float(np.dot(vector, vector_of(item.id, item.vector, searcher.catalog.describe(), searcher.store.dim)))
        source = item.path
    else:
        decoded = decode_image(Path(path), draft_size=OVERLAY_DRAFT, max_pixels=MAX_QUERY_IMAGE_PIXELS)
        score = float(np.dot(vector, encode_image(decoded.image)))
        source = str(path)
    explanation = explanation_of(dense_encoder().features(decoded.image), decoded.image, vector, score, (decoded.width, decoded.height))
    explanation.item_id, explanation.path = (None if item_id is None else int(item_id)), source
    return explanation
