"""What every request passes before the app sees it: the access token and the body size limit.

Both are checked on the headers alone, before a byte of the body is read, so an
unauthenticated or oversized upload costs the server nothing.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Code and docs that hold no library data: the page must load to ask for the token.
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/",)
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class RequestGuard:
    """ASGI middleware: `Authorization: Bearer <token>` on all but the public paths, and a body limit."""

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        if self.token is not None and not _is_public(scope) and not self._authorized(scope):
            await _respond(send, 401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                           [(b"www-authenticate", b"Bearer")])
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await _respond(send, 400, "invalid Content-Length")
            elif int(length) > self.max_body_bytes:
                await _respond(send, 413, self._too_large())
            else:
                await self.app(scope, receive, send)
            return
        body = await _read_limited(receive, self.max_body_bytes)
        if body is None:
            await _respond(send, 413, self._too_large())
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        scheme, _, credentials = (_header(scope, b"authorization") or "").partition(" ")
        # compare_digest takes the same time wherever the first difference is
        sent = credentials.strip().encode("latin-1")  # the header's own bytes back
        return scheme.lower() == "bearer" and hmac.compare_digest(sent, self.token)

    def _too_large(self) -> str:
        return f"request body larger than the server's limit of {self.max_body_bytes} bytes"


def _is_public(scope: Scope) -> bool:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):  # mounted inside another app
        path = path[len(root):] or "/"
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _with_security_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
        await send(message)

    return sending


async def _respond(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    start: dict[str, Any] = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


async def _read_limited(receive: Receive, limit: int) -> bytes | None:
    """A body sent without Content-Length (chunked), read whole; None once it passes `limit`."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replaying() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying
