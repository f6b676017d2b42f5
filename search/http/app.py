"""The HTTP API and the web page over one library."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query as QueryParam, Request, Security
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from clipdex.search.errors import ClipdexError, InvalidQuery, ItemNotFound, LibraryBusy, ModelUnavailable, UnreadableImage
from clipdex.search.http.guard import RequestGuard
from clipdex.search.http.media import FileUnavailable, ThumbnailCache, open_indexed_file, thumbnail_size
from clipdex.search.http.schemas import (
    EmbedRequest,
    EmbedResponse,
    Health,
    HitOut,
    InvalidBase64,
    MAX_ITEM_ID,
    ItemOut,
    ImageSearchForm,
    SearchRequest,
    SearchResponse,
    decode_base64_image,
)
from clipdex.search.http.service import SearchService
from clipdex.search.library import Library
from clipdex.search.query import Query

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ERROR_STATUS: tuple[tuple[type[ClipdexError], int], ...] = (
    (ItemNotFound, 404),
    (InvalidQuery, 422),
    (UnreadableImage, 400),
    (ModelUnavailable, 503),
    (LibraryBusy, 503),
)
PAGE_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILE_SECURITY_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"

ItemId = Annotated[int, PathParam(ge=1, le=MAX_ITEM_ID, description="The item's id")]


def create_app(
    library: Library | str | os.PathLike[str],
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    device: str = "auto",
) -> FastAPI:
    """A FastAPI app serving `library` (an open Library or its directory); mountable in another ASGI app.

    `token`: when set, every request but /health and the page's static code needs
    `Authorization: Bearer <token>`. `max_upload_bytes`: the largest image accepted.
    `allowed_hosts`: Host header values to answer (None: any); a server on loopback
    should list its loopback names, which stops DNS-rebinding pages from reading it.
    """
    if not isinstance(library, Library):
        library = Library.open(library, device=device)
    service = SearchService(library)
    app = FastAPI(title="clipdex", version=_version(), summary="Cross-modal CLIP search over a clipdex library")
    app.state.service = service
    _add_error_handlers(app)
    app.get("/health", response_model=Health, tags=["server"])(_health)
    security = [Security(HTTPBearer(auto_error=False, description="The server's --token"))] if token else []
    api = APIRouter(dependencies=security)
    _add_search_routes(api, service, max_upload_bytes)
    _add_item_routes(api, service)
    app.include_router(api)
    _add_page(app)
    # The request body may carry the image as base64 (4/3 of its size) plus the other fields.
    app.add_middleware(RequestGuard, token=token or None, max_body_bytes=max_upload_bytes * 4 // 3 + 64 * 1024)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    return app


def _health() -> Health:
    """Whether the server is up. The only endpoint that needs no token."""
    return Health()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipdexError)
    async def library_error(_request: Request, error: ClipdexError) -> JSONResponse:
        status = next((code for kind, code in ERROR_STATUS if isinstance(error, kind)), 500)
        return JSONResponse({"detail": str(error)}, status_code=status)

    @app.exception_handler(InvalidBase64)
    async def invalid_base64(_request: Request, error: InvalidBase64) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(FileUnavailable)
    async def file_unavailable(_request: Request, error: FileUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)


def _add_search_routes(api: APIRouter, service: SearchService, max_upload_bytes: int) -> None:
    def check_size(images: Sequence[bytes]) -> None:
        if sum(len(image) for image in images) > max_upload_bytes:
            raise HTTPException(413, f"images larger than the server's limit of {max_upload_bytes} bytes")

    @api.get("/stats", tags=["library"])
    def stats() -> dict[str, Any]:
        """Counts of items, images, texts and vectors; the model; the index type."""
        return service.stats()

    @api.post("/search", response_model=SearchResponse, tags=["search"])
    def search(request: SearchRequest) -> SearchResponse:
        """Rank the library against texts, base64 images, item ids (`like`) and/or a vector, with filters."""
        images = [decode_base64_image(image) for image in request.image]
        check_size(images)
        return _search(service, request.to_query(images, request.vector))

    @api.post("/search/image", response_model=SearchResponse, tags=["search"])
    def search_image(options: Annotated[ImageSearchForm, Form()]) -> SearchResponse:
        """Rank the library against an uploaded image (multipart), with the other terms and filters as form fields."""
        data = options.image.file.read(max_upload_bytes + 1)
        check_size([data])
        return _search(service, options.to_query([data]))

    @api.post("/embed", response_model=EmbedResponse, tags=["search"])
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


def _search(service: SearchService, query: Query) -> SearchResponse:
    started = time.perf_counter()
    hits = service.search(query)
    took = (time.perf_counter() - started) * 1000
    return SearchResponse(hits=[HitOut.from_hit(hit) for hit in hits], took_ms=round(took, 2))


def _add_item_routes(api: APIRouter, service: SearchService) -> None:
    thumbnails = ThumbnailCache(service.library.path)

    @api.get("/items/{item_id}", response_model=ItemOut, tags=["items"])
    def get_item(item_id: ItemId) -> ItemOut:
        """An item's kind, path or text, and metadata."""
        return ItemOut.from_hit(service.library.get_item(item_id))

    @api.get("/items/{item_id}/thumbnail", tags=["items"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def get_thumbnail(item_id: ItemId, size: Annotated[int, QueryParam(ge=16, le=1024)] = 256) -> Response:
        """A JPEG thumbnail, made once and cached under LIBRARY/thumbnails/. `size` is rounded up to 64, 128, 256, 512 or 1024."""
        data = thumbnails.get(service.item(item_id), thumbnail_size(size))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/items/{item_id}/file", tags=["items"], response_class=StreamingResponse,
             responses={200: {"content": {"image/*": {}}}})
    def get_file(item_id: ItemId) -> StreamingResponse:
        """The item's original image file, while it is still the file that was indexed."""
        item = service.item(item_id)
        handle = open_indexed_file(item)
        name = os.path.basename(item.path or "")
        headers = {
            "Content-Length": str(item.size),
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}",
            "Content-Security-Policy": FILE_SECURITY_POLICY,
        }
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return StreamingResponse(_read_chunks(handle), media_type=media_type, headers=headers)


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipdex")
    except PackageNotFoundError:
        return "0"
