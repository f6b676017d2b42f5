"""No work a run does not need: a small library is searched exactly without FAISS, and a
new text query on an exported library imports neither torch, open_clip nor FAISS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from clipdex.indexer import index_paths
from clipdex.search.index.exact_small import SmallExactSearch
from clipdex.search.library import Library
from clipdex.search.index.vectors import IndexSpec, VectorIndex


class FakeCatalog:
    """A catalog's three reads, over fixed vectors."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ids, self.vectors, self.reads, self.gen = ids, vectors, 0, 1

    def generation(self) -> int:
        return self.gen

    def counts(self) -> dict[str, int]:
        return {"image": len(self.ids), "text": 0}

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        self.reads += 1
        return self.ids, self.vectors


def test_small_exact_search_answers_as_a_flat_faiss_index() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(1, 1000))[:300].astype(np.int64)
    flat = VectorIndex(16, IndexSpec("flat"))
    flat.add(ids, vectors)
    catalog = FakeCatalog(ids, vectors)
    small = SmallExactSearch(catalog, 16)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    allowed = np.sort(ids[::7])
    for k, filter_ids in ((10, None), (5, allowed), (1000, None), (1000, allowed)):
        expected_scores, expected_ids = flat.search(queries, k, filter_ids)
        answer = small.search(queries, k, filter_ids)
        assert answer is not None
        assert np.array_equal(answer[1], expected_ids) and np.allclose(answer[0], expected_scores, atol=1e-5)
    assert catalog.reads == 1  # read once per generation
    catalog.gen = 2
    small.search(queries, 3)
    assert catalog.reads == 2
    assert SmallExactSearch(catalog, 16, limit=100).search(queries, 3) is None  # too large: FAISS answers


NEW_QUERY = """
import sys
from clipdex.cli.main import app
sys.argv = ["clipdex", "search", "a brand new question", "--library", {library!r}, "-k", "2", "--format", "paths"]
try:
    app()
except SystemExit as exit:
    assert not exit.code, exit.code
print("IMPORTED", sorted(name for name in ("torch", "open_clip", "faiss") if name in sys.modules))
"""


def test_a_new_text_query_on_a_small_exported_library_imports_no_torch_and_no_faiss(library: Library, tmp_path: Path, make_images) -> None:
    make_images(tmp_path / "photos", 3)
    index_paths(library, [tmp_path / "photos"])
    expected = [hit.path for hit in Library.open(library.path, device="cpu").search(text="a brand new question", k=2)]
    result = subprocess.run([sys.executable, "-c", NEW_QUERY.format(library=str(library.path))], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IMPORTED []" in result.stdout
    assert result.stdout.splitlines()[:2] == expected  # the same hits as the FAISS index gives
