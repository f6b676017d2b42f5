"""The HTTP API and the web page over one library."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query as QueryParam, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from clipdex.search.errors import (
    ClipdexError,
    ImageTooLarge,
    InvalidQuery,
    InvalidItems,
    ItemNotFound,
    LibraryBusy,
    LibraryClosed,
    ModelUnavailable,
    ReadOnlyLibrary,
    UnreadableImage,
)
from clipdex.search.http.explain import add_explain_routes
from clipdex.search.http.guard import RequestGuard
from clipdex.search.http.indexing import add_indexing_route
from clipdex.search.http.media import FileUnavailable, ThumbnailCache, open_indexed_file, thumbnail_size
from clipdex.search.http.ranges import RangeNotSatisfiable, byte_range, read_range
from clipdex.search.http.schemas import (
    AddedOut,
    AddImagesRequest,
    AddTextsRequest,
    AddVectorsRequest,
    EmbedRequest,
    EmbedResponse,
    ErrorOut,
    Health,
    HitOut,
    InvalidBase64,
    MAX_ITEM_ID,
    ItemOut,
    ImageSearchForm,
    MAX_REPORTED_PROBLEMS,
    FieldProblem,
    RemovedOut,
    RemoveRequest,
    SearchRequest,
    SearchResponse,
    decode_base64_image,
)
from clipdex.search.http.service import SearchService
from clipdex.search.library import Library
from clipdex.search.query import Query

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
STATIC_DIR = Path(__file__).resolve().parent / "static"
ERROR_STATUS: tuple[tuple[type[ClipdexError], int], ...] = (  # the first that matches
    (ItemNotFound, 404),
    (InvalidQuery, 400),
    (InvalidItems, 400),
    (ReadOnlyLibrary, 409),
    (ImageTooLarge, 413),
    (UnreadableImage, 400),
    (ModelUnavailable, 503),
    (LibraryBusy, 503),
    (LibraryClosed, 503),  # an application closed the library it mounted this app over
)
PAGE_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILE_SECURITY_POLICY = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"
# /docs: Swagger UI's script and style from this server (docs/assets), its icons as data: URLs
DOCS_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# What each error status means, for the OpenAPI document; every one answers ErrorOut.
ERROR_MEANINGS = {
    400: "The request cannot be used as sent: an image that is not base64 (outside its pattern), an empty "
         "upload, or bytes that do not decode as an image; a query the "
         "library cannot answer (a blank text, dates in the wrong order, more weights than terms, terms that "
         "cancel out, a vector of another dimension); keyed items that cannot be added (a blank text, a key twice in "
         "one request, a vector of another dimension or all zeros: nothing of the request is added); a bad Host or Content-Length header, or both Content-Length "
         "and Transfer-Encoding",
    401: "No token or the wrong one: send 'Authorization: Bearer <token>'",
    409: "The library cannot be written here (a read-only mount, another user's folder): it can only be searched",
    404: "No item with that id (also an id in `like`), or its file is gone or changed since it was indexed",
    413: "The body or the image is over the server's upload limit, or the image has more pixels than a query image may",
    416: "The Range asked for lies past the end of the file (Content-Range says its size)",
    422: "The request does not fit this document's schema; `errors` says where (the value sent is not echoed)",
    503: "The model cannot be loaded, or the library is busy (or was closed by the application that mounted this app)",
}
INTERNAL_ERROR = "internal server error (the server's log has the details)"

ItemId = Annotated[int, PathParam(ge=1, le=MAX_ITEM_ID, description="The item's id")]


def create_app(
    library: Library | str | os.PathLike[str],
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    device: str = "auto",
    runtime: str = "auto",
) -> FastAPI:
    """A FastAPI app serving `library` (an open Library or its directory); mountable in another ASGI app.

    `token`: when set, every request but /health and the page's static code needs
    `Authorization: Bearer <token>`. `max_upload_bytes`: the largest image accepted.
    `allowed_hosts`: Host header values to answer (None: any; `*.example.com` patterns
    allowed); a server on loopback should list its loopback names, which stops
    DNS-rebinding pages from reading it. `device` and `runtime`: where and on what the model
    runs when the app opens `library` itself (as `clipdex serve --device --runtime`; see `Library.open`).
    """
    if not isinstance(library, Library):
        library = Library.open(library, device=device, runtime=runtime)
    service = SearchService(library)
    app = FastAPI(
        title="clipdex", version=_version(), summary="Cross-modal CLIP search over a clipdex library",
        docs_url=None, redoc_url=None,  # /docs is served below from local files; ReDoc would load from a CDN
        responses=error_responses(400, 413),  # any request: a bad Host or Content-Length, a body over the limit
    )
    app.state.service = service
    _add_error_handlers(app)
    app.get("/health", response_model=Health, tags=["server"])(_health)
    security = [Security(HTTPBearer(auto_error=False, description="The server's --token"))] if token else []
    api = APIRouter(dependencies=security, responses=error_responses(401) if token else {})
    _add_search_routes(api, service, max_upload_bytes)
    _add_item_routes(api, service)
    add_indexing_route(api)
    add_explain_routes(api, service, max_upload_bytes, error_responses)
    if token:  # writes only where every request must carry the token: a server without one is read-only
        _add_key_routes(api, service, max_upload_bytes)
    app.include_router(api)
    _add_page(app)
    _add_docs(app)
    app.openapi = _openapi_with_multipart(app)  # type: ignore[method-assign]
    # The request body may carry the image as base64 (4/3 of its size) plus the other fields.
    app.add_middleware(RequestGuard, token=token or None, max_body_bytes=max_upload_bytes * 4 // 3 + 64 * 1024,
                       allowed_hosts=allowed_hosts)
    return app


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` for these error statuses: each one's meaning, and the one error model."""
    return {status: {"model": ErrorOut, "description": ERROR_MEANINGS[status]} for status in statuses}


def _health() -> Health:
    """Whether the server is up. The only endpoint that needs no token."""
    return Health()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is small JSON, `ErrorOut`; nothing a client sent is echoed back whole."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(error.errors()), status_code=422)

    @app.exception_handler(ClipdexError)
    async def library_error(_request: Request, error: ClipdexError) -> JSONResponse:
        status = next((code for kind, code in ERROR_STATUS if isinstance(error, kind)), 500)
        return _error(status, str(error))

    @app.exception_handler(InvalidBase64)
    async def invalid_base64(_request: Request, error: InvalidBase64) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(FileUnavailable)
    async def file_unavailable(_request: Request, error: FileUnavailable) -> JSONResponse:
        return _error(404, str(error))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, _exception: Exception) -> JSONResponse:
        return _error(500, INTERNAL_ERROR)  # Starlette re-raises it after, for the server's log


def validation_error_body(errors: Sequence[Any]) -> dict[str, Any]:
    """A 422's body: the first few problems, their place and message, never the input (which may be megabytes)."""
    problems = [
        FieldProblem(loc=[_short(part) for part in problem.get("loc", ())], msg=_short(str(problem.get("msg", "")), 300),
                     type=_short(str(problem.get("type", "")))).model_dump()
        for problem in list(errors)[:MAX_REPORTED_PROBLEMS]
    ]
    if not problems:
        return {"detail": "the request does not fit the API's schema"}
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return {"detail": f"{where}: {first['msg']}{more}", "errors": problems}


def _short(value: Any, limit: int = 80) -> Any:
    """A location part or message cut to `limit` characters (an unknown field's name is the client's)."""
    if isinstance(value, int):
        return value
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _add_search_routes(api: APIRouter, service: SearchService, max_upload_bytes: int) -> None:
    def check_size(images: Sequence[bytes]) -> None:
        if sum(len(image) for image in images) > max_upload_bytes:
            raise HTTPException(413, f"images larger than the server's limit of {max_upload_bytes} bytes")

    searching = error_responses(404, 422, 503)

    @api.get("/stats", tags=["library"], responses=error_responses(503))
    def stats() -> dict[str, Any]:
        """Counts of items, images, texts and vectors; the model; the index type."""
        return service.stats()

    @api.post("/search", response_model=SearchResponse, tags=["search"], responses=searching)
    def search(request: SearchRequest) -> SearchResponse:
        """Rank the library against texts, base64 images, item ids (`like`) and/or a vector, with filters."""
        images = [decode_base64_image(image) for image in request.image]
        check_size(images)
        return _search(service, request.to_query(images, request.vector))

    @api.post("/search/image", response_model=SearchResponse, tags=["search"], responses=searching)
    def search_image(options: Annotated[ImageSearchForm, Form()]) -> SearchResponse:
        """Rank the library against an uploaded image (multipart), with the other terms and filters as form fields."""
        data = options.image.file.read(max_upload_bytes + 1)
        check_size([data])
        return _search(service, options.to_query([data]))

    @api.post("/embed", response_model=EmbedResponse, tags=["search"], responses=error_responses(422, 503))
    def embed(request: EmbedRequest) -> EmbedResponse:
        """The normalized vector of a text or a base64 image, with the library's model."""
        if request.text is not None:
            vector = service.embed_text(request.text)
        else:
            data = decode_base64_image(request.image or "")
            check_size([data])
            vector = service.embed_image(data)
        model = service.library.model
        return EmbedResponse(model=model.name, weights=model.weights, dim=int(vector.shape[0]), vector=vector.tolist())


def _add_key_routes(api: APIRouter, service: SearchService, max_upload_bytes: int) -> None:
    """Items under the application's own keys (`Library.add_texts` ...): each request one transaction, all or nothing."""
    writing = error_responses(400, 409, 413, 422, 503)

    @api.post("/keys/texts", response_model=AddedOut, tags=["keys"], responses=writing)
    def add_texts(request: AddTextsRequest) -> AddedOut:
        """Embed texts and add them under their keys; a key already there is replaced (same id)."""
        items = request.items
        result = service.add_texts([item.text for item in items], [item.key for item in items],
                                   [item.metadata for item in items])
        return AddedOut(**result.to_json())

    @api.post("/keys/images", response_model=AddedOut, tags=["keys"], responses=writing)
    def add_images(request: AddImagesRequest) -> AddedOut:
        """Embed base64 images and add them under their keys (they have no path: nothing is served as a file)."""
        images = [decode_base64_image(item.image) for item in request.items]
        if sum(len(image) for image in images) > max_upload_bytes:
            raise HTTPException(413, f"images larger than the server's limit of {max_upload_bytes} bytes")
        result = service.add_images(images, [item.key for item in request.items], [item.metadata for item in request.items])
        return AddedOut(**result.to_json())

    @api.post("/keys/vectors", response_model=AddedOut, tags=["keys"], responses=writing)
    def add_vectors(request: AddVectorsRequest) -> AddedOut:
        """Add vectors of the library's model (normalized here) under their keys."""
        items = request.items
        result = service.add_vectors([item.key for item in items], [item.vector for item in items],
                                     [item.metadata for item in items], request.kind)
        return AddedOut(**result.to_json())

    @api.post("/keys/remove", response_model=RemovedOut, tags=["keys"], responses=error_responses(409, 422, 503))
    def remove(request: RemoveRequest) -> RemovedOut:
        """Remove the items with these keys (a key not there is no error); files are never removed here."""
        return RemovedOut(removed=service.remove(request.keys))


def _search(service: SearchService, query: Query) -> SearchResponse:
    started = time.perf_counter()
    hits = service.search(query)
    took = (time.perf_counter() - started) * 1000
    return SearchResponse(hits=[HitOut.from_hit(hit) for hit in hits], took_ms=round(took, 2))


def _add_item_routes(api: APIRouter, service: SearchService) -> None:
    thumbnails = ThumbnailCache(service.library.path)
    missing = error_responses(404, 422)

    @api.get("/items/{item_id}", response_model=ItemOut, tags=["items"], responses=missing)
    def get_item(item_id: ItemId) -> ItemOut:
        """An item's kind, path or text, and metadata."""
        return ItemOut.from_hit(service.library.get_item(item_id))

    @api.get("/items/{item_id}/thumbnail", tags=["items"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, **missing})
    def get_thumbnail(item_id: ItemId, size: Annotated[int, QueryParam(ge=16, le=1024)] = 256,
                      t: Annotated[float, QueryParam(ge=0, le=1e7, description="A video's moment, seconds")] = 0.0) -> Response:
        """A JPEG thumbnail, made once and cached under LIBRARY/thumbnails/. `size` is rounded up to 64, 128, 256, 512 or 1024.
        A video's is its frame at `t` seconds (a hit's `timestamp`)."""
        data = thumbnails.get(service.item(item_id), thumbnail_size(size), at=t)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/items/{item_id}/file", tags=["items"], response_class=StreamingResponse,
             responses={200: {"content": {"image/*": {}, "video/*": {}}},
                        206: {"description": "The bytes of the Range asked for", "content": {"image/*": {}, "video/*": {}}},
                        **error_responses(416), **missing})
    def get_file(item_id: ItemId, request: Request) -> Response:
        """The item's original image or video file, while it is still the file that was indexed. A `Range:
        bytes=FIRST-LAST` header is answered with those bytes (206): a browser seeks in a video so."""
        item = service.item(item_id)
        handle = open_indexed_file(item)
        name = os.path.basename(item.path or "")
        size = int(item.size or 0)
        headers = {
            "Content-Length": str(size),
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}",
            "Content-Security-Policy": FILE_SECURITY_POLICY,
            "Accept-Ranges": "bytes",
        }
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        try:
            wanted = byte_range(request.headers.get("range"), size)
        except RangeNotSatisfiable:
            handle.close()
            return _error(416, f"the range {request.headers.get('range')!r} lies past the end of the file ({size} bytes)",
                          {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
        if wanted is None:
            return StreamingResponse(_read_chunks(handle), media_type=media_type, headers=headers)
        first, last = wanted
        headers.update({"Content-Length": str(last - first + 1), "Content-Range": f"bytes {first}-{last}/{size}"})
        return StreamingResponse(read_range(handle, first, last), status_code=206, media_type=media_type, headers=headers)


def _read_chunks(handle: BinaryIO, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_SECURITY_POLICY, "X-Frame-Options": "DENY"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, all of it from this server (the swagger-ui-bundle-v2 package): it works offline."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        html = (STATIC_DIR / "docs.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": DOCS_SECURITY_POLICY, "X-Frame-Options": "DENY"})

    app.mount("/docs/assets", StaticFiles(directory=Path(str(swagger_ui_path))), name="docs-assets")


def _openapi_with_multipart(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """app.openapi, with /search/image's body declared as the multipart upload it is.

    FastAPI declares a form model that holds an UploadFile as urlencoded, which cannot carry a file.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()  # cached in app.openapi_schema: the change below is made once
            content = document["paths"]["/search/image"]["post"]["requestBody"]["content"]
            if "application/x-www-form-urlencoded" in content:
                content["multipart/form-data"] = content.pop("application/x-www-form-urlencoded")
        assert app.openapi_schema is not None
        return app.openapi_schema

    return openapi


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "0"
