"""The JSON shapes of the HTTP API: requests are validated here, so a request that does not
fit them is a 422, and the OpenAPI document describes exactly what is accepted."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema

from clipdex.search.index.keyed import MAX_KEY_CHARS
from clipdex.search.query import Hit, Query

MAX_TERMS = 16  # per kind of term; a query is a handful of terms, not a payload
MAX_TEXT_CHARS = 2_000  # CLIP reads ~77 tokens; more is never useful
MAX_HITS = 10_000
MAX_OFFSET = 100_000
MAX_ITEM_ID = 2**53 - 1  # the largest integer every JSON client (JavaScript too) holds exactly
MAX_REPORTED_PROBLEMS = 10  # a 422 lists this many fields that do not fit, not all of a huge body's


def _as_list(value: Any) -> Any:
    """Accept one value where a list is expected: `"text": "a dog"` as well as `["a dog"]`."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _valid_unicode(value: Any) -> Any:
    """Refuse lone surrogates (`"\\ud800"` in JSON): they cannot be encoded, stored or tokenized.

    Before the string's own validator, which would refuse them too but without saying why.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("the text holds a lone surrogate (an invalid \\uD800-\\uDFFF escape)") from None
    return value


def _whole_number(value: Any) -> Any:
    """857.0 is an integer to JSON Schema (and to the OpenAPI document); strict pydantic wants 857."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _no_default(schema: dict[str, Any]) -> None:
    """For a field that is either given or left out: its Python default None is not a value to send."""
    schema.pop("default", None)


def _given_or_left_out(schema: dict[str, Any]) -> None:
    """For a field that is either given or left out: neither its default None nor null is a value to send.

    (Declared `X | None` rather than with SkipJsonSchema[None]: a union would name its member
    in every problem's place, `body.text.function-before[...]`, and add "Input should be None".)
    """
    _no_default(schema)
    branches = [branch for branch in schema.pop("anyOf", ()) if branch != {"type": "null"}]
    if len(branches) == 1:
        schema.update({**branches[0], **schema})


# The length bounds belong to the string itself, so a 422 says "at most 2000 characters"
# (bounds placed after a validator are counted as a sequence's "items").
QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS), BeforeValidator(_valid_unicode)]
PathGlob = Annotated[str, StringConstraints(max_length=1_000), BeforeValidator(_valid_unicode)]
DateText = Annotated[str, StringConstraints(max_length=40), BeforeValidator(_valid_unicode)]
# The bounds come before the validator that wraps them, so the schema says them as minimum and maximum.
Count = Annotated[int, BeforeValidator(_whole_number)]
ItemId = Annotated[int, Field(ge=1, le=MAX_ITEM_ID), BeforeValidator(_whole_number)]
Pixels = Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(_whole_number)]
FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]
FLOAT32_MAX = float(np.finfo(np.float32).max)  # vectors are float32: a larger number would become infinite
VectorComponent = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
QueryVector = Annotated[list[VectorComponent], Field(min_length=1, max_length=8_192,
                                                     description="A query vector of the library's dimension")]
# Lists of 1..N that also accept one value; json_schema_input_type makes the schema say both.
TextList = Annotated[list[QueryText], Field(min_length=1, max_length=MAX_TERMS)]
Texts = Annotated[TextList, BeforeValidator(_as_list, json_schema_input_type=QueryText | TextList)]
ItemIdList = Annotated[list[ItemId], Field(min_length=1, max_length=MAX_TERMS)]
ItemIds = Annotated[ItemIdList, BeforeValidator(_as_list, json_schema_input_type=ItemId | ItemIdList)]
WeightList = Annotated[list[FiniteNumber], Field(min_length=1, max_length=4 * MAX_TERMS)]
Weights = Annotated[WeightList, BeforeValidator(_as_list, json_schema_input_type=FiniteNumber | WeightList)]
# What decode_base64_image accepts, said in the document so that a client made from it sends nothing
# else: an optional data: URL prefix, then base64 in groups of four characters, the last one padded
# with "=", spaces and line breaks allowed anywhere after the prefix (as `base64` wraps its output).
_BASE64_CHARACTER = r"[A-Za-z0-9+/][\t\n\r ]*"
BASE64_IMAGE_PATTERN = (
    rf"^(?:data:[^,]*,)?[\t\n\r ]*(?:(?:{_BASE64_CHARACTER}){{4}})*"
    rf"(?:(?:{_BASE64_CHARACTER}){{4}}|(?:{_BASE64_CHARACTER}){{3}}=|(?:{_BASE64_CHARACTER}){{2}}=[\t\n\r ]*=)[\t\n\r ]*$"
)
BASE64_SPACES = str.maketrans("", "", "\t\n\r ")
BASE64_GROUPS = re.compile(r"[A-Za-z0-9+/]+={0,2}")  # and a multiple of 4 characters: the same strings, fast
# The pattern is the document's alone: on a 20 MB image it would take seconds (decode_base64_image does
# the same check in milliseconds); a string that does not match it is a 400, as the document says.
Base64Image = Annotated[str, StringConstraints(min_length=1), Field(json_schema_extra={"pattern": BASE64_IMAGE_PATTERN})]
ImageList = Annotated[list[Base64Image], Field(min_length=1, max_length=4)]
Base64Images = Annotated[ImageList, BeforeValidator(_as_list, json_schema_input_type=Base64Image | ImageList)]
TERM_FIELDS = ("text", "image", "like", "vector", "minus")


class QueryOptions(BaseModel):
    """Query terms other than images, the filters and paging: shared by JSON and form searches."""

    model_config = ConfigDict(extra="forbid")

    text: Texts = Field(default_factory=list, description="Texts to look for (one or a list)")
    like: ItemIds = Field(default_factory=list, description="Ids of indexed items: find more like these")
    minus: Texts = Field(default_factory=list, description="Texts to steer away from")
    weights: Weights = Field(
        default_factory=list, description="Weights of the terms in order: texts, images, likes, vector, minus texts (default 1 each)"
    )
    kind: Literal["image", "text", "video", "any"] = Field("any", description="What to return")
    path: PathGlob | None = Field(
        None, description="Only items whose path matches this glob (SQLite GLOB, e.g. '*/2024/*')"
    )
    after: DateText | None = Field(
        None, description="Captured at or after (ISO date/time)"
    )
    before: DateText | None = Field(
        None, description="Captured before (ISO date/time)"
    )
    min_width: Pixels | None = Field(None, description="Minimum image width in pixels")
    min_height: Pixels | None = Field(None, description="Minimum image height in pixels")
    k: Count = Field(10, ge=1, le=MAX_HITS, description="How many hits")
    offset: Count = Field(0, ge=0, le=MAX_OFFSET, description="Skip this many best hits (paging)")
    threshold: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False, description="Minimum cosine score")
    per_video: Count = Field(1, ge=1, le=1000, description="The best moments given of each video hit (`moments`)")
    mode: Literal["hybrid", "semantic", "keyword"] | None = Field(
        None, description="Match the texts by meaning, by words (names, texts, EXIF, OCR) or both fused "
                          "(default: hybrid when the library has keyword data and the query is texts alone)")
    sort: Literal["relevance", "date", "-date"] = Field(
        "relevance", description="The best hits by relevance, shown in this order (date: capture time)")
    confident: bool = Field(False, description="Only the hits that stand out from this query's scores over the library")

    def to_query(self, images: Sequence[bytes] = (), vector: list[float] | None = None) -> Query:
        """The library's Query; its own checks (dates, weights, blank texts) raise InvalidQuery (a 400)."""
        return Query.build(
            text=self.text, image=list(images), like=self.like, vector=[vector] if vector else None, minus=self.minus,
            weights=self.weights, k=self.k, offset=self.offset, threshold=self.threshold,
            kind=self.kind, path=self.path, after=self.after, before=self.before,
            min_width=self.min_width, min_height=self.min_height, per_video=self.per_video, mode=self.mode, sort=self.sort,
            confident=self.confident,
        )


class SearchRequest(QueryOptions):
    """`POST /search`: any mix of texts, base64 images, item ids and a raw vector, with filters.

    At least one term (text, image, like, vector or minus). Strict: JSON's types as the
    schema says them, no `"5"` for 5 or `true` for 1.
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "anyOf": [{"required": [name]} for name in TERM_FIELDS],
    })

    image: Base64Images = Field(default_factory=list, description="Images as base64 (a data: URL prefix is allowed)")
    vector: QueryVector = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_term(self) -> "SearchRequest":
        if not any(getattr(self, name) for name in TERM_FIELDS):
            raise ValueError(f"give at least one term: {', '.join(TERM_FIELDS)}")
        return self


def _form_fields_are_never_null(schema: dict[str, Any]) -> None:
    """A form field is sent or left out; it has no null (the JSON body's `"path": null` is a left-out field here)."""
    for name, field_schema in schema.get("properties", {}).items():
        branches = [branch for branch in field_schema.get("anyOf", ()) if branch != {"type": "null"}]
        if len(branches) == 1 and len(field_schema["anyOf"]) == 2:
            del field_schema["anyOf"]
            field_schema.pop("default", None)
            schema["properties"][name] = {**branches[0], **field_schema}


class ImageSearchForm(QueryOptions):
    """`POST /search/image`: a multipart upload; repeat a field (`-F minus=a -F minus=b`) for a list."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_form_fields_are_never_null)

    image: UploadFile = Field(description="The query image (not empty)", json_schema_extra={"minLength": 1})


class EmbedRequest(BaseModel):
    """`POST /embed`: exactly one of a text or a base64 image."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["text"]}, {"required": ["image"]}],
    })

    # null is not a value the schema offers (_given_or_left_out); _no_null refuses it when sent
    text: QueryText | None = Field(None, json_schema_extra=_given_or_left_out, description="A text")
    image: Base64Image | None = Field(
        None, json_schema_extra=_given_or_left_out, description="An image as base64 (a data: URL prefix is allowed)"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_null(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(name, "") is None for name in ("text", "image")):
            raise ValueError("text and image are strings; leave out the one not given rather than send null")
        return data

    @model_validator(mode="after")
    def _one_input(self) -> "EmbedRequest":
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text or image")
        return self


class ItemOut(BaseModel):
    id: int
    kind: str = Field(description="image, text or video")
    key: str | None = Field(None, description="The application's own key of an item added under one (POST /keys/...); null for files")
    path: str | None = Field(None, description="The image or video file (images and videos)")
    text: str | None = Field(None, description="The text (texts)")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_hit(cls, hit: Hit) -> "ItemOut":
        return cls(id=hit.id, kind=hit.kind, key=hit.key, path=hit.path, text=hit.text, metadata=hit.metadata)


class MomentOut(BaseModel):
    timestamp: float = Field(description="Seconds from the video's start")
    score: float = Field(description="Cosine similarity of that moment to the query")


class HitOut(ItemOut):
    rank: int
    score: float = Field(description="Cosine similarity to the query")
    timestamp: float | None = Field(None, description="A video: its best-matching moment, seconds from its start")
    moments: list[MomentOut] | None = Field(None, description="A video, with per_video > 1: its best moments, best first")
    semantic_score: float | None = Field(None, description="Hybrid and keyword searches: the cosine (as score)")
    keyword_rank: int | None = Field(None, description="Hybrid and keyword searches: the place in the keyword "
                                                       "ranking (1 is best), or null when the words do not match")
    snippet: str | None = Field(None, description="The matched text, each match between « and »")
    boxes: list[list[list[float]]] | None = Field(
        None, description="The OCR lines that matched: four [x, y] corners each, in the image's pixels")

    @classmethod
    def from_hit(cls, hit: Hit) -> "HitOut":
        moments = None
        if hit.moments is not None and len(hit.moments) > 1:
            moments = [MomentOut(timestamp=round(seconds, 3), score=round(score, 6)) for seconds, score in hit.moments]
        timestamp = None if hit.timestamp is None else round(hit.timestamp, 3)
        return cls(rank=hit.rank, score=round(hit.score, 6), timestamp=timestamp, moments=moments,
                   semantic_score=hit.semantic_score, keyword_rank=hit.keyword_rank, snippet=hit.snippet, boxes=hit.boxes,
                   **ItemOut.from_hit(hit).model_dump())


class SearchResponse(BaseModel):
    hits: list[HitOut]
    took_ms: float


class EmbedResponse(BaseModel):
    model: str
    weights: str | None
    dim: int
    vector: list[float]


# -- items under the application's own keys (`Library.add_texts` ...): what one request may carry --

MAX_KEYED_ITEMS = 64  # texts or vectors per request
MAX_KEYED_IMAGES = 16  # images per request (and all of them within the upload limit)
MAX_KEYS_REMOVED = 1_000
MAX_ITEM_TEXT_CHARS = 10_000  # a longer text is embedded by its beginning anyway
MAX_VECTOR_DIM = 8_192
MAX_METADATA_FIELDS = 32
MAX_METADATA_NAME_CHARS = 100
MAX_METADATA_TEXT_CHARS = 2_000
NO_NUL = r"^[^\x00]+$"  # PostgreSQL cannot store NUL in text

ItemKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY_CHARS, pattern=NO_NUL),
                    BeforeValidator(_valid_unicode)]
ItemText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ITEM_TEXT_CHARS, pattern=NO_NUL),
                     BeforeValidator(_valid_unicode)]
MetadataName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_NAME_CHARS),
                         BeforeValidator(_valid_unicode)]
MetadataText = Annotated[str, StringConstraints(max_length=MAX_METADATA_TEXT_CHARS), BeforeValidator(_valid_unicode)]
MetadataNumber = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MetadataValue = MetadataText | MetadataNumber | FiniteNumber | bool | None
Metadata = Annotated[dict[MetadataName, MetadataValue], Field(
    max_length=MAX_METADATA_FIELDS,
    description=f"Up to {MAX_METADATA_FIELDS} fields of text, number, boolean or null; given back as the hit's metadata",
)]


class KeyedItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: ItemKey = Field(description="The application's own key: a new one adds an item, one already there replaces it")
    metadata: Metadata = Field(default_factory=dict)


class TextItem(KeyedItem):
    text: ItemText = Field(description="The text to embed")


class ImageItem(KeyedItem):
    image: Base64Image = Field(description="The image as base64 (a data: URL prefix is allowed)")


class VectorItem(KeyedItem):
    vector: list[VectorComponent] = Field(min_length=1, max_length=MAX_VECTOR_DIM,
                                         description="A vector of the library's model and dimension (normalized here)")


class AddTextsRequest(BaseModel):
    """`POST /keys/texts`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[TextItem] = Field(min_length=1, max_length=MAX_KEYED_ITEMS, description="Each key once")


class AddImagesRequest(BaseModel):
    """`POST /keys/images`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[ImageItem] = Field(min_length=1, max_length=MAX_KEYED_IMAGES, description="Each key once")


class AddVectorsRequest(BaseModel):
    """`POST /keys/vectors`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[VectorItem] = Field(min_length=1, max_length=MAX_KEYED_ITEMS, description="Each key once")
    kind: Literal["image", "text"] = Field("image", description="What the vectors are of (for the `kind` filter)")


class RemoveRequest(BaseModel):
    """`POST /keys/remove`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[ItemKey] = Field(min_length=1, max_length=MAX_KEYS_REMOVED, description="Keys of items to remove")


class AddedOut(BaseModel):
    added: int = Field(description="Items with a new key")
    replaced: int = Field(description="Items whose key was there: replaced in place, keeping their ids")
    ids: list[int] = Field(description="The items' ids, in the request's order")


class RemovedOut(BaseModel):
    removed: int = Field(description="How many of the keys named an item (the others are no error)")


class FieldProblem(BaseModel):
    """One way a request does not fit the schema. The value sent is never echoed back."""

    loc: list[str | int] = Field(description="Where: ['body', 'k'], ['query', 'size'], ['path', 'item_id']")
    msg: str = Field(description="What is wrong with it")
    type: str = Field(description="Pydantic's error type, e.g. less_than_equal")


class ErrorOut(BaseModel):
    """Every error answer of the API, whatever its status."""

    detail: str = Field(description="What went wrong, in one line")
    errors: list[FieldProblem] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=_no_default,
        description=f"422 only: the fields that do not fit the schema (the first {MAX_REPORTED_PROBLEMS})",
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class InvalidBase64(ValueError):
    """An image field that is not base64."""


def decode_base64_image(value: str) -> bytes:
    """The bytes of a base64 image, with or without a `data:image/...;base64,` prefix.

    It accepts exactly the strings that BASE64_IMAGE_PATTERN, the document's pattern, matches.
    """
    if value.startswith("data:"):
        value = value.partition(",")[2]
    compact = value.translate(BASE64_SPACES)
    try:
        if len(compact) % 4 or not BASE64_GROUPS.fullmatch(compact):
            raise ValueError("not base64")
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64("image is not valid base64 (send the file's bytes base64-encoded, not a path or URL)") from None
