"""Groups of near-duplicate images: items whose vectors are within a cosine threshold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from clipdex.search.library import Library

NEIGHBOURS = 16  # how many nearest neighbours of each image are compared with the threshold


@dataclass
class DuplicateGroup:
    ids: list[int]
    paths: list[str]
    min_score: float  # the lowest similarity of the links that joined the group

    def to_json(self) -> dict[str, Any]:
        return {"ids": self.ids, "paths": self.paths, "min_score": round(self.min_score, 6)}


def find_duplicates(library: Library, threshold: float = 0.95, kind: str = "image") -> list[DuplicateGroup]:
    """Connected groups of items linked by cosine >= threshold, largest first."""
    ids = library.catalog.ids(kind)
    if len(ids) < 2:
        return []
    parent = {int(i): int(i) for i in ids}
    link_score: dict[int, float] = {}

    def find(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    allowed = ids if len(ids) < library.vectors.ntotal else None
    for chunk_ids, vectors in library.catalog.iter_vectors(ids.tolist()):
        scores, neighbours = library.search_index(vectors, NEIGHBOURS, allowed, query_kind="image")
        for source, row_scores, row_ids in zip(chunk_ids.tolist(), scores, neighbours):
            for score, other in zip(row_scores.tolist(), row_ids.tolist()):
                if other < 0 or other == source or score < threshold or other not in parent:
                    continue
                a, b = find(source), find(other)
                if a != b:
                    parent[b] = a
                    link_score[a] = min(link_score.get(a, 1.0), link_score.get(b, 1.0), score)
    groups: dict[int, list[int]] = {}
    for item in parent:
        groups.setdefault(find(item), []).append(item)
    items = library.catalog.get_items([i for members in groups.values() if len(members) > 1 for i in members])
    result = [
        DuplicateGroup(sorted(members), [items[i].path or "" for i in sorted(members)], link_score.get(root, 1.0))
        for root, members in groups.items()
        if len(members) > 1
    ]
    return sorted(result, key=lambda group: (-len(group.ids), group.ids[0]))
