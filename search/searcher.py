"""Answering a query: its terms become one vector, the vector finds filtered hits.

The searcher turns each term (a text, an image, a stored item's vector, a raw vector)
into a vector, combines them (`query.combine`), asks the catalog which items pass the
filters and the vector store for the best of those, and returns typed `Hit`s.

A query with a text is also matched by its words (`Query.mode`): the catalog's keyword
index ranks the items whose words match, and `clipdex.search.ranking` fuses that ranking
with the semantic one; each hit then says why it was found (its cosine, its keyword rank,
a snippet of the matched text, the boxes of the OCR lines that matched).
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from clipdex.search import ranking
from clipdex.search.catalog.keywords import KeywordQuery, matched_boxes, snippet
from clipdex.search.catalog.types import VIDEO_KINDS, ItemRow
from clipdex.search.errors import FileUnavailable, InvalidQuery, ItemNotFound
from clipdex.search.explanation import Explanation, explanation_of
from clipdex.search.query import Hit, Query, Term, combine, vector_from
from clipdex.search.index.store import VectorStore
from clipdex.search.catalog.vector_rows import vector_of

if TYPE_CHECKING:  # pragma: no cover
    from clipdex.search.catalog.database import Catalog
    from clipdex.search.encoders.dense_export import DenseEncoder

CANDIDATES = 100  # of each ranking fused (more when a page reaches past them)
CONFIDENT_SAMPLE = 2_000  # items whose cosines are the background `--confident` compares with
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
        self._background: tuple[int, np.ndarray, np.ndarray] | None = None  # (generation, sampled vectors) for --confident

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
        """The query's page of hits for `vector` (the query's own): the best k among the items that
        pass its filters; by meaning, words or both as its mode says (`ranked_search`).

        A video is one hit however many of its moments match: its frames' hits are gathered
        into it (`_videos_collapsed`), scored by its best moment."""
        mode = self.mode_of(query)
        if mode != "semantic" or query.sort != "relevance" or query.confident:
            return self.ranked_search(vector, query, mode)
        allowed = self.catalog.filtered_ids(query.filters)
        if allowed is not None and len(allowed) == 0:
            return []
        wanted = query.k + query.offset
        breadth = wanted
        moments: dict[int, list[tuple[float, float]]] = {}
        while True:
            scores, ids = self.store.search(vector[None, :], breadth, allowed, self.query_kind(query))
            pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
            items = self.catalog.get_items(i for _, i in pairs)
            if not any(item.kind in VIDEO_KINDS for item in items.values()):
                break  # no video among them: each item is a hit of its own
            pairs, items, moments = self._videos_collapsed(vector, pairs, items, query.per_video)
            if len(pairs) >= wanted or len(ids[0]) < breadth or breadth >= 50 * wanted + 1000:
                break
            breadth *= 4  # frames of the same videos filled the breadth: look further
        pairs = pairs[query.offset : query.offset + query.k]
        if query.threshold is not None:
            pairs = [(s, i) for s, i in pairs if s >= query.threshold]
        hits: list[Hit] = []
        for score, item_id in pairs:
            item = items.get(item_id)
            if item is None:  # removed since the index was read
                continue
            hits.append(hit_of(len(hits) + 1 + query.offset, score, item, moments.get(item_id)))
        return hits

    def _videos_collapsed(self, vector: np.ndarray, pairs: list[tuple[float, int]], items: dict[int, ItemRow],
                          per_video: int) -> tuple[list[tuple[float, int]], dict[int, ItemRow], dict[int, list[tuple[float, float]]]]:
        """The hits with each video's frames (and its own mean vector) gathered into the video, scored by its
        best moment; every moment of each such video scored exactly from the catalog (`moments_of`)."""
        parents = {item_id: item.parent_id for item_id, item in items.items() if item.kind == "frame" and item.parent_id}
        videos = {parent for parent in parents.values()} | {i for i, item in items.items() if item.kind == "video"}
        items = {**items, **self.catalog.get_items(videos - set(items))}
        frames = self.catalog.frames_of(videos)
        moments = {video: moments_of(vector, frames.get(video, []), per_video) for video in videos}
        best: dict[int, float] = {}
        for score, item_id in pairs:
            target = parents.get(item_id, item_id)
            if target in videos and moments.get(target):
                score = moments[target][0][1]
            if target in items and target not in best:
                best[target] = score
        collapsed = sorted(((score, item_id) for item_id, score in best.items()), key=lambda pair: -pair[0])
        return collapsed, items, moments
    def search(self, query: Query) -> list[Hit]:
        return self.search_vector(self.query_vector(query), query)

    def mode_of(self, query: Query) -> str:
        """The query's mode, or its default: hybrid when it is made of texts alone (an image, item or
        vector term makes the text a modifier of a query by meaning) and the library has keyword data."""
        if query.mode is not None:
            return query.mode
        only_texts = all(term.kind == "text" for term in query.terms)
        if only_texts and KeywordQuery.parse(query.keyword_text()) and self.catalog.has_keywords():
            return "hybrid"
        return "semantic"

    # -- hybrid and keyword search, the adaptive cutoff, date order ----------------------------------

    def ranked_search(self, vector: np.ndarray, query: Query, mode: str) -> list[Hit]:
        """The query's page of hits ranked by meaning, by words or both fused (`ranking.fuse`)."""
        allowed = self.catalog.filtered_ids(query.filters)
        if allowed is not None and len(allowed) == 0:
            return []
        depth = max(CANDIDATES, query.k + query.offset)
        cosines: dict[int, float] = {}
        semantic: list[int] = []
        moments: dict[int, list[tuple[float, float]]] = {}
        if mode != "keyword":
            scores, ids = self.store.search(vector[None, :], depth, allowed, self.query_kind(query))
            pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
            found = self.catalog.get_items(i for _, i in pairs)
            if any(item.kind in VIDEO_KINDS for item in found.values()):  # a video's moments: one hit, the video
                pairs, _, moments = self._videos_collapsed(vector, pairs, found, query.per_video)
            for score, item_id in pairs:
                cosines[item_id] = score
                semantic.append(item_id)
        words = KeywordQuery.parse(query.keyword_text()) if mode != "semantic" else KeywordQuery(())
        keyword = self._keyword_ranking(words, allowed, depth) if words else []
        order = ranking.fuse([semantic, keyword]) if mode == "hybrid" else keyword if mode == "keyword" else semantic
        unscored = [item_id for item_id in order if item_id not in cosines]  # found by their words alone
        for item_id, vector_bytes in self.catalog.get_vectors(unscored).items():
            cosines[item_id] = float(np.dot(vector, vector_of(item_id, vector_bytes, self.catalog.describe(), self.store.dim)))
        order = [item_id for item_id in order if item_id in cosines]  # removed since the index was read
        if query.threshold is not None:
            order = [item_id for item_id in order if cosines[item_id] >= query.threshold]
        keyword_rank = {item_id: rank for rank, item_id in enumerate(keyword, start=1)}
        if query.confident:
            kept = ranking.standing_out({i: cosines[i] for i in order}, self._background_cosines(vector, allowed),
                                        keep=set(keyword_rank))
            order = [item_id for item_id in order if item_id in kept]
        items = self.catalog.get_items(order[query.offset : query.offset + query.k])
        page = [item_id for item_id in order[query.offset : query.offset + query.k] if item_id in items]
        documents = self.catalog.keyword_documents(page) if words else {}
        lines = self.catalog.ocr_lines(page) if words else {}
        hits: list[Hit] = []
        for item_id in page:
            hit = hit_of(query.offset + len(hits) + 1, cosines[item_id], items[item_id], moments.get(item_id))
            if mode != "semantic":
                hit.semantic_score = cosines[item_id]
                hit.keyword_rank = keyword_rank.get(item_id)
                hit.snippet = snippet(words, documents.get(item_id, []))
                hit.boxes = matched_boxes(words, lines.get(item_id, [])) or None
            hits.append(hit)
        if query.sort != "relevance":
            hits = ranking.date_order(hits, newest_first=query.sort == "-date")
        return hits

    def _keyword_ranking(self, words: KeywordQuery, allowed: np.ndarray | None, depth: int) -> list[int]:
        """The ids whose words match, best first, among `allowed` (None: all), at most `depth`."""
        if allowed is None:
            return [item_id for item_id, _ in self.catalog.keyword_search(words, depth)]
        permitted = set(allowed.tolist())
        return [item_id for item_id, _ in self.catalog.keyword_search(words, None) if item_id in permitted][:depth]

    def _background_cosines(self, vector: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The query's cosines over a fixed sample of the library (of the allowed items when filtered)."""
        generation = self.catalog.generation()
        if self._background is None or self._background[0] != generation:
            ids = self.catalog.ids()
            if len(ids) > CONFIDENT_SAMPLE:
                ids = np.sort(np.random.default_rng(0).choice(ids, CONFIDENT_SAMPLE, replace=False))
            sampled = list(self.catalog.iter_vectors(ids.tolist()))
            sample_ids = np.concatenate([ids for ids, _ in sampled]) if sampled else np.zeros(0, np.int64)
            vectors = np.concatenate([v for _, v in sampled]) if sampled else np.zeros((0, self.store.dim), np.float32)
            self._background = (generation, sample_ids, vectors)
        _, sample_ids, vectors = self._background
        if allowed is not None:
            vectors = vectors[np.isin(sample_ids, allowed)]
        return vectors @ vector

    def get_item(self, item_id: int) -> Hit:
        item = self.catalog.get_item(item_id)
        if item is None:
            raise ItemNotFound(item_id)
        return hit_of(0, 1.0, item)


def hit_of(rank: int, score: float, item: ItemRow, moments: list[tuple[float, float]] | None = None) -> Hit:
    hit = Hit(rank=rank, score=score, id=item.id, kind=item.kind, path=item.path, text=item.text,
              metadata=item.metadata_dict(), key=item.key)
    if item.kind == "video" and moments:
        hit.timestamp, hit.moments = moments[0][0], moments
    return hit


MOMENT_SPACING = 1.0  # seconds: a video's best moments are at least this far apart


def moments_of(vector: np.ndarray, frames: list[tuple[float, np.ndarray]], count: int) -> list[tuple[float, float]]:
    """A video's `count` best moments for the query `vector`, (seconds, cosine) best first, at least
    MOMENT_SPACING apart (the frames of one scene are alike: the next moment is another scene)."""
    if not frames:
        return []
    times = np.array([seconds for seconds, _ in frames])
    matrix = np.stack([frame for _, frame in frames]).astype(np.float32)
    scores = matrix @ vector.astype(np.float32) / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
    chosen: list[tuple[float, float]] = []
    for index in np.argsort(-scores, kind="stable"):
        if all(abs(times[index] - seconds) >= MOMENT_SPACING for seconds, _ in chosen):
            chosen.append((float(times[index]), float(scores[index])))
            if len(chosen) >= count:
                break
    return chosen


def explain(searcher: Searcher, query: Query, dense_encoder: Callable[[], "DenseEncoder"], item_id: int | None, path: Any,
            encode_image: Callable[[Any], np.ndarray], timestamp: float | None = None) -> Explanation:
    """Where `query` matches inside a stored image item (`item_id`) or an image file (`path`; exactly one).
    A stored video is explained at its frame at `timestamp` seconds (default: the query's best
    moment, the hit's `timestamp`), scored by the moment sampled nearest to it.

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
        if item.kind not in ("image", "video") or not item.path:
            what = {"text": "a text", "frame": "a video's moment"}.get(item.kind, "an image added under a key")
            raise InvalidQuery(f"item {item.id} is {what}, not an image file: only image and video files can be explained")
        if not Path(item.path).is_file():
            raise FileUnavailable(f"the file of item {item.id} is gone ({item.path}); re-index to update the library")
        if item.kind == "video":
            return _explain_video_moment(searcher, item, vector, dense_encoder, timestamp)
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


VIDEO_FRAME_SIDE = 512  # a video's frame is decoded this large on its longer side to be explained


def _explain_video_moment(searcher: Searcher, item: ItemRow, vector: np.ndarray, dense_encoder: Callable[[], "DenseEncoder"],
                          timestamp: float | None) -> Explanation:
    """A video explained at one moment: its frame there, scored by the sampled moment nearest to it."""
    from clipdex.search.media.video import video_frame

    frames = searcher.catalog.frames_of([item.id]).get(item.id, [])
    if not frames:
        raise InvalidQuery(f"video {item.id} has no sampled moments to explain; re-index it")
    if timestamp is None:
        timestamp = moments_of(vector, frames, 1)[0][0]
    if not math.isfinite(timestamp) or timestamp < 0:
        raise InvalidQuery(f"timestamp must be a number of seconds from the video's start, not {timestamp}")
    nearest = min(frames, key=lambda moment: abs(moment[0] - timestamp))
    score = float(moments_of(vector, [nearest], 1)[0][1])
    picture, shown_at = video_frame(str(item.path), timestamp, VIDEO_FRAME_SIDE)
    picture = picture.convert("RGB")
    size = (item.width, item.height) if item.width and item.height else picture.size
    explanation = explanation_of(dense_encoder().features(picture), picture, vector, score, size)
    explanation.item_id, explanation.path, explanation.timestamp = item.id, item.path, round(shown_at, 3)
    return explanation
