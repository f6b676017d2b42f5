"""What every request passes before the app sees it: its framing, the Host, the access token and the body size limit.

All are checked on the headers alone, before a byte of the body is read, so an
unauthenticated or oversized upload costs the server nothing. Each refusal is JSON,
`{"detail": ...}`, like every other error of the API. HEAD is answered wherever GET is.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Code and docs that hold no library data: the page must load to ask for the token.
PUBLIC_PATHS = frozenset({"/health", "/", "/docs", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/", "/docs/assets/")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
# A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
HOST_HEADER = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/@]+)(?::\d{1,5})?")


class RequestGuard:
    """ASGI middleware: one body length, the Host, `Authorization: Bearer <token>` on all but the public paths, and a body limit.

    A request with both Transfer-Encoding and Content-Length is refused and its connection
    closed (RFC 9112 6.1): a proxy in front that reads the other length would take what
    follows the body as another request, smuggled past it. HEAD runs as GET without the
    body (RFC 9110 9.3.2).

    `allowed_hosts`: the Host names to answer (None or "*": any); "*.example.com" allows its subdomains.
    """

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int,
                 allowed_hosts: Sequence[str] | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        hosts = [host.lower() for host in allowed_hosts or ["*"]]
        self.allowed_hosts = None if "*" in hosts else hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        if scope["method"] == "HEAD":
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        if _header(scope, b"transfer-encoding") is not None and _header(scope, b"content-length") is not None:
            await _respond(send, 400, "a request may not have both Transfer-Encoding and Content-Length",
                           [(b"connection", b"close")])
            return
        if self.allowed_hosts is not None and not self._host_allowed(scope):
            await _respond(send, 400, "invalid Host header: this server answers only its own names")
            return
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

    def _host_allowed(self, scope: Scope) -> bool:
        assert self.allowed_hosts is not None
        match = HOST_HEADER.fullmatch(_header(scope, b"host") or "")
        if match is None:
            return False
        host = match["host"].lower()
        return any(host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
                   for pattern in self.allowed_hosts)

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
    """The security headers on every answer, and HEAD beside GET in a 405's Allow."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), *SECURITY_HEADERS]
            if message["status"] == 405:
                headers = [(name, _allow_head(value)) if name.lower() == b"allow" else (name, value)
                           for name, value in headers]
            message["headers"] = headers
        await send(message)

    return sending


def _allow_head(allow: bytes) -> bytes:
    methods = [method.strip() for method in allow.split(b",")]
    return allow + b", HEAD" if b"GET" in methods and b"HEAD" not in methods else allow


def _without_body(send: Send) -> Send:
    """The answer to GET with its headers (Content-Length included) and no body: the answer to HEAD."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
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
