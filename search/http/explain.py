"""`POST /explain` and `POST /explain/overlay`: where in an indexed image a query matches (`Library.explain`)."""

from __future__ import annotations

from typing import Annotated, Any, Callable

from fastapi import APIRouter, HTTPException, Query as QueryParam
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipdex.search.explanation import Explanation
from clipdex.search.http.schemas import (
    TERM_FIELDS,
    Base64Images,
    ItemId,
    ItemIds,
    QueryVector,
    Texts,
    Weights,
    decode_base64_image,
)
from clipdex.search.http.service import SearchService
from clipdex.search.query import Query

OVERLAY_SIDE = 512  # the overlay's longer side by default: the page shows it as a card


class ExplainRequest(BaseModel):
    """An indexed image (`item_id`) and the query terms of `POST /search` (no filters: one image is explained)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "anyOf": [{"required": [name]} for name in TERM_FIELDS],
    })

    item_id: ItemId = Field(description="The indexed image (or video) to explain")
    timestamp: float | None = Field(None, ge=0, le=1e7, allow_inf_nan=False,
                                    description="A video: the moment to explain, seconds from its start (default: the query's best)")
    text: Texts = Field(default_factory=list, description="Texts to look for (one or a list)")
    image: Base64Images = Field(default_factory=list, description="Images as base64 (a data: URL prefix is allowed)")
    like: ItemIds = Field(default_factory=list, description="Ids of indexed items")
    vector: QueryVector = Field(default_factory=list)
    minus: Texts = Field(default_factory=list, description="Texts to steer away from")
    weights: Weights = Field(default_factory=list, description="Weights of the terms in order: texts, images, likes, "
                                                               "vector, minus texts (default 1 each)")

    @model_validator(mode="after")
    def _some_term(self) -> "ExplainRequest":
        if not any(getattr(self, name) for name in TERM_FIELDS):
            raise ValueError(f"give at least one term: {', '.join(TERM_FIELDS)}")
        return self

    def to_query(self, images: list[bytes]) -> Query:
        return Query.build(text=self.text, image=images, like=self.like, vector=[self.vector] if self.vector else None,
                           minus=self.minus, weights=self.weights)


class ExplainOut(BaseModel):
    item_id: int
    path: str | None
    score: float = Field(description="The query's cosine with the image's vector (the hit's score)")
    peak: list[float] = Field(description="[x, y] of the map's peak in pixels of the image as displayed (EXIF orientation applied)")
    width: int = Field(description="The displayed image's width")
    height: int
    rows: int
    cols: int
    grid: list[list[float]] = Field(description="rows x cols cosines of each part of the image with the query, top row first")
    timestamp: float | None = Field(None, description="A video: the time of the frame explained, seconds from its start")


def add_explain_routes(api: APIRouter, service: SearchService, max_upload_bytes: int,
                       errors: Callable[..., dict[int | str, dict[str, Any]]]) -> None:
    def explained(request: ExplainRequest) -> Explanation:
        images = [decode_base64_image(image) for image in request.image]
        if sum(len(image) for image in images) > max_upload_bytes:
            raise HTTPException(413, f"images larger than the server's limit of {max_upload_bytes} bytes")
        return service.explain(request.to_query(images), request.item_id, request.timestamp)

    @api.post("/explain", response_model=ExplainOut, tags=["search"], responses=errors(400, 404, 413, 422, 503))
    def explain(request: ExplainRequest) -> ExplainOut:
        """Where in an indexed image the query matches: a grid of cosines, its peak, the hit's score."""
        return ExplainOut(**explained(request).to_json())

    @api.post("/explain/overlay", tags=["search"], response_class=Response,
              responses={200: {"content": {"image/png": {}}}, **errors(400, 404, 413, 422, 503)})
    def explain_overlay(request: ExplainRequest,
                        size: Annotated[int, QueryParam(ge=64, le=2048)] = OVERLAY_SIDE) -> Response:
        """The image with the map of `POST /explain` laid over it, as a PNG at most `size` pixels on its longer side."""
        return Response(explained(request).overlay_png(max_side=size), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=600"})
