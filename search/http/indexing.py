"""`GET /indexing`: what an indexer running beside the server (`clipdex serve --watch`) is doing.

The server only reports it: whoever runs the indexer (the CLI, an application) sets
`app.state.indexing` to a callable answering an `IndexingOut` (the indexer may not be
imported here: `clipdex.indexer` sits above this room). Without one, nothing is indexing.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel


class IndexingOut(BaseModel):
    enabled: bool = False  # the server runs an indexer (--watch)
    watching: bool = False  # folders are followed: new files appear in the answers without a restart
    polling: bool = False  # some folders are polled rather than notified
    pending: int = 0  # files seen changing, waiting to settle
    indexing: int = 0  # files in the batch being indexed now
    batches: int = 0  # batches done since the server started


IndexingStatus = Callable[[], IndexingOut]


def add_indexing_route(router: APIRouter) -> None:
    @router.get("/indexing", response_model=IndexingOut, tags=["server"])
    def indexing(request: Request) -> IndexingOut:
        """What the server's own indexer (`clipdex serve --watch`) is doing: the page shows
        "indexing N files" from it. All zero and false when the server watches nothing."""
        status: IndexingStatus | None = getattr(request.app.state, "indexing", None)
        return status() if status is not None else IndexingOut()
