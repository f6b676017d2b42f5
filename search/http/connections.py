"""What a client may cost the server: how long it may take to send a request, how many
connections are open at once, and how often the same error reaches the log.

uvicorn's HTTP/1.1 protocol (h11) waits for a request's headers and body as long as the
client likes, and accepts connections until the process runs out of file descriptors, so a
thousand clients sending a byte a second hold the server; and Python's accept loop then logs
every failed accept(), up to its backlog (2,048) a turn of the event loop, with a traceback
each. Here:

- a request's headers must arrive within `header_timeout` of the connection's opening (or
  of a later request's first byte), its body within `body_timeout` of the headers; else the
  client gets a 408 and the connection is closed;
- at most `max_connections` are open at once: one more gets a 503 and is closed before it
  costs more than its socket (the default stays below the open-file limit);
- the same message reaches the log at most once a minute, the next one saying how many
  were held back (RepeatedMessages on the loggers that flood: asyncio's, uvicorn's errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 1_000
# Descriptors kept for everything but client sockets: the catalog, the index, the model's
# files, thumbnails, the log, the worker threads' open files.
RESERVED_DESCRIPTORS = 128
# A refused connection is half-closed and what the client still sends is read and dropped
# for up to this long, so that the refusal reaches it (closing a socket with unread input
# sends a reset, which can destroy the answer before the client reads it) ...
LINGER_SECONDS = 1.0
# ... while at most this many linger; beyond that they are closed at once.
MAX_LINGERING = 64
FLOODING_LOGGERS = ("asyncio", "uvicorn.error", __name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send a request, and how many connections are open at once."""

    # seconds from a connection's opening, or from the first byte of a later request on it,
    # to the end of the request's headers
    header_timeout: float = 10.0
    # seconds from the end of the headers to the end of the body (20 MiB in a minute: 2.8 Mbit/s)
    body_timeout: float = 60.0
    # seconds an idle connection is kept open between requests (uvicorn's timeout_keep_alive)
    keep_alive_timeout: int = 5
    # connections open at once; None: DEFAULT_MAX_CONNECTIONS, fewer where the open-file
    # limit would not leave RESERVED_DESCRIPTORS for the rest
    max_connections: int | None = None

    def connection_cap(self) -> int:
        """max_connections, or the default for this process's open-file limit."""
        if self.max_connections is not None:
            return self.max_connections
        try:
            import resource
        except ImportError:  # Windows: no such limit
            return DEFAULT_MAX_CONNECTIONS
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return DEFAULT_MAX_CONNECTIONS
        return max(8, min(DEFAULT_MAX_CONNECTIONS, soft - RESERVED_DESCRIPTORS))


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's `http` protocol class for a server with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "cap": limits.connection_cap()})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for a request's arrival and a cap on open connections.

    The deadline follows h11's view of the client: while a request's headers are incomplete
    (`IDLE` with bytes received, or a new connection), `header_timeout`; while its body
    arrives (`SEND_BODY`), `body_timeout`; once it is in (or between requests, where
    uvicorn's keep-alive timeout closes an idle connection), none.
    """

    limits: ConnectionLimits
    cap: int

    lingering = 0  # connections of this server being closed with LINGER_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None
        self._closing = False
        if len(self.connections) > self.cap:
            logger.warning("refusing connections: %d open, the limit is %d", len(self.connections) - 1, self.cap)
            self._close_with(503, "the server has too many open connections; try again later")
            return
        self._wait_for("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._wait_for(None)
        if self._closing:
            self._closing = False
            type(self).lingering -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._closing:  # a refused connection's input is dropped
            super().data_received(data)

    def eof_received(self) -> None:
        if self._closing:  # the client has read the refusal and closed its side
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.transport.is_closing():
            self._wait_for(None)
        elif self.conn.their_state is h11.SEND_BODY:
            self._wait_for("body")
        elif self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._wait_for("headers")
        elif self.conn.their_state is not h11.IDLE:  # the request is in: the app's time is not limited here
            self._wait_for(None)

    def _wait_for(self, part: str | None) -> None:
        """Arm the deadline for `part` of a request ("headers", "body"), or none; a running one for the same part stays."""
        if part == self._waiting_for:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = part
        if part is not None:
            seconds = self.limits.header_timeout if part == "headers" else self.limits.body_timeout
            self._deadline = self.loop.call_later(seconds, self._too_slow, part, seconds)

    def _too_slow(self, part: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        answered = self.cycle is not None and self.cycle.response_started and self.conn.their_state is not h11.IDLE
        if answered:  # the app answered before the body came (a refusal): only close
            self.transport.close()
        else:
            self._close_with(408, f"the request's {part} did not arrive within {seconds:g} s")

    def _close_with(self, status: int, detail: str) -> None:
        """Answer `status` outside h11 (which has no request to answer yet, or one still arriving) and close."""
        body = json.dumps({"detail": detail}).encode()
        phrase = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
                b"x-content-type-options: nosniff\r\n\r\n" % (status, phrase, len(body)))
        self.transport.write(head + body)
        self._wait_for(None)
        if type(self).lingering >= MAX_LINGERING or not self.transport.can_write_eof():
            self.transport.close()
            return
        type(self).lingering += 1
        self._closing = True
        self.transport.write_eof()  # the answer, then FIN; the client's input is still read (and dropped)
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


class RepeatedMessages(logging.Filter):
    """Lets a message through once per `interval` seconds; the next one says how many were held back.

    A message is its logger, level, the first line of its unformatted text and its exception
    type: `Too many open files` from accept() is one message however often it happens, and so
    is asyncio's "Exception in callback X" whatever the handle's time on its second line.
    """

    def __init__(self, interval: float = 60.0, remembered: int = 1_000) -> None:
        super().__init__()
        self.interval = interval
        self.remembered = remembered
        self._seen: dict[tuple[Any, ...], tuple[float, int]] = {}  # message -> (last let through, held back since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        exception = record.exc_info[0] if record.exc_info else None
        key = (record.name, record.levelno, str(record.msg).partition("\n")[0], exception)
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-float("inf"), 0))
            if now - last < self.interval:
                self._seen[key] = (last, held + 1)
                return False
            if len(self._seen) >= self.remembered:
                self._seen = {seen: value for seen, value in self._seen.items() if now - value[0] < self.interval}
            self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [and {held} more like this in the last {now - last:.0f} s, not logged]"
        return True


@contextmanager
def quiet_repeats(interval: float = 60.0) -> Iterator[RepeatedMessages]:
    """RepeatedMessages on the loggers that can flood, while the block runs."""
    repeats = RepeatedMessages(interval)
    loggers = [logging.getLogger(name) for name in FLOODING_LOGGERS]
    for each in loggers:
        each.addFilter(repeats)
    try:
        yield repeats
    finally:
        for each in loggers:
            each.removeFilter(repeats)
