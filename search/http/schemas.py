"""The JSON shapes of the HTTP API: requests are validated here, so bad input is a 422."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

from clipdex.search.query import Hit, Query

MAX_TERMS = 16  # per kind of term; a query is a handful of terms, not a payload
MAX_TEXT_CHARS = 2_000  # CLIP reads ~77 tokens; more is never useful
MAX_HITS = 10_000
MAX_OFFSET = 100_000
MAX_ITEM_ID = 2**63 - 1  # SQLite's largest integer


def _as_list(value: Any) -> Any:
    """Accept one value where a list is expected: `"text": "a dog"` as well as `["a dog"]`."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return value
    return [value]


QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
Texts = Annotated[list[QueryText], BeforeValidator(_as_list), Field(max_length=MAX_TERMS)]
ItemIds = Annotated[list[Annotated[int, Field(ge=1, le=MAX_ITEM_ID)]], BeforeValidator(_as_list), Field(max_length=MAX_TERMS)]
Weights = Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], BeforeValidator(_as_list), Field(max_length=4 * MAX_TERMS)]
Base64Images = Annotated[list[str], BeforeValidator(_as_list), Field(max_length=4)]


class QueryOptions(BaseModel):
    """Query terms other than images, the filters and paging: shared by JSON and form searches."""

    model_config = ConfigDict(extra="forbid")

    text: Texts = Field(default_factory=list, description="Texts to look for (one or a list)")
    like: ItemIds = Field(default_factory=list, description="Ids of indexed items: find more like these")
    minus: Texts = Field(default_factory=list, description="Texts to steer away from")
    weights: Weights = Field(
        default_factory=list, description="Weights of the terms in order: texts, images, likes, vector, minus texts (default 1 each)"
    )
    kind: Literal["image", "text", "any"] = Field("any", description="What to return")
    path: Annotated[str, StringConstraints(max_length=1_000)] | None = Field(
        None, description="Only items whose path matches this glob (SQLite GLOB, e.g. '*/2024/*')"
    )
    after: Annotated[str, StringConstraints(max_length=40)] | None = Field(None, description="Captured at or after (ISO date/time)")
    before: Annotated[str, StringConstraints(max_length=40)] | None = Field(None, description="Captured before (ISO date/time)")
    min_width: int | None = Field(None, ge=0, le=1_000_000, description="Minimum image width in pixels")
    min_height: int | None = Field(None, ge=0, le=1_000_000, description="Minimum image height in pixels")
    k: int = Field(10, ge=1, le=MAX_HITS, description="How many hits")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Skip this many best hits (paging)")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="Minimum cosine score")

    def to_query(self, images: Sequence[bytes] = (), vector: list[float] | None = None) -> Query:
        """The library's Query; its own checks (dates, weights, empty queries) raise InvalidQuery."""
        return Query.build(
            text=self.text, image=list(images), like=self.like, vector=[vector] if vector else None, minus=self.minus,
            weights=self.weights, k=self.k, offset=self.offset, threshold=self.threshold,
            kind=self.kind, path=self.path, after=self.after, before=self.before,
            min_width=self.min_width, min_height=self.min_height,
        )


class SearchRequest(QueryOptions):
    """`POST /search`: any mix of texts, base64 images, item ids and a raw vector, with filters."""

    image: Base64Images = Field(default_factory=list, description="Images as base64 (a data: URL prefix is allowed)")
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, max_length=8_192, description="A query vector of the library's dimension"
    )


class ImageSearchForm(QueryOptions):
    """`POST /search/image`: a multipart upload; repeat a field (`-F minus=a -F minus=b`) for a list."""

    image: UploadFile = Field(description="The query image")


class EmbedRequest(BaseModel):
    """`POST /embed`: exactly one of a text or a base64 image."""

    model_config = ConfigDict(extra="forbid")

    text: QueryText | None = None
    image: str | None = Field(None, description="An image as base64 (a data: URL prefix is allowed)")

    @model_validator(mode="after")
    def _one_input(self) -> "EmbedRequest":
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text or image")
        return self


class ItemOut(BaseModel):
    id: int
    kind: str = Field(description="image or text")
    path: str | None = Field(None, description="The image file (images)")
    text: str | None = Field(None, description="The text (texts)")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_hit(cls, hit: Hit) -> "ItemOut":
        return cls(id=hit.id, kind=hit.kind, path=hit.path, text=hit.text, metadata=hit.metadata)


class HitOut(ItemOut):
    rank: int
    score: float = Field(description="Cosine similarity to the query")

    @classmethod
    def from_hit(cls, hit: Hit) -> "HitOut":
        return cls(rank=hit.rank, score=round(hit.score, 6), **ItemOut.from_hit(hit).model_dump())


class SearchResponse(BaseModel):
    hits: list[HitOut]
    took_ms: float


class EmbedResponse(BaseModel):
    model: str
    weights: str | None
    dim: int
    vector: list[float]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class InvalidBase64(ValueError):
    """An image field that is not base64."""


def decode_base64_image(value: str) -> bytes:
    """The bytes of a base64 image, with or without a `data:image/...;base64,` prefix."""
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64("image is not valid base64 (send the file's bytes base64-encoded, not a path or URL)") from None
