"""uvicorn's httptools protocol with request limits: ``--http apiforge.server:GuardedHttpToolsProtocol``.

httptools has no limit on request headers (uvicorn issue #157): a 64 MiB header is buffered whole and parsed
for seconds on the event loop. uvicorn also has no deadline for receiving a request: a client that sends half
its headers, or part of its body, holds the connection (and whatever the app awaits) for as long as it likes.
This subclass adds, per connection:

* ``MAX_REQUEST_HEADER_BYTES`` (default 16 KiB): the bytes of a request before its headers end (request line
  included). No more than that is ever handed to the parser; one byte past it answers **431** and closes.
* ``REQUEST_HEADER_TIMEOUT_S`` (default 10): a request's headers must arrive within this time of its first
  byte (of the connection's opening, for the first request: a connection that sends nothing is closed too).
* ``REQUEST_BODY_TIMEOUT_S`` (default 30): its whole body within this time of the end of its headers (time
  spent with reading paused by the server, because the app has not taken the body yet, does not count).

A request over a deadline is answered **408** if no response has started (else the connection is just closed).
Refusals use the project's error shape (``{"detail", "code"}``), ``connection: close``, then a short lingering
close: the server half-closes and discards what the client still sends for up to ``LINGER_S``, so a client
still writing reads the answer instead of a connection reset.

The settings live in ``apiforge/settings.py`` like every other. uvicorn imports this module before it loads
the application (Django is not configured yet at import time), but only instantiates the protocol, once per
connection, after the application is loaded: the limits are read from ``django.conf.settings`` then, once per
process (``server_limits``).

Bounds of the byte count: a request's bytes are counted from the end of the previous one, except that when
one read (``data_received``) carries the end of one request and the start of the next (pipelining), that
start is not counted; at most one read (256 KiB with uvloop) escapes the count that way, never more.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

DEFAULT_MAX_REQUEST_HEADER_BYTES = 16 * 1024
DEFAULT_REQUEST_HEADER_TIMEOUT_S = 10.0
DEFAULT_REQUEST_BODY_TIMEOUT_S = 30.0
LINGER_S = 1.0  # after a refusal: how long what the client still sends is read and dropped


@dataclass(frozen=True)
class ServerLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


@functools.cache
def server_limits() -> ServerLimits:
    """The limits from Django's settings (read once per process, at the first connection)."""
    from django.conf import settings

    return ServerLimits(
        max_header_bytes=int(getattr(settings, "MAX_REQUEST_HEADER_BYTES", DEFAULT_MAX_REQUEST_HEADER_BYTES)),
        header_timeout_s=float(getattr(settings, "REQUEST_HEADER_TIMEOUT_S", DEFAULT_REQUEST_HEADER_TIMEOUT_S)),
        body_timeout_s=float(getattr(settings, "REQUEST_BODY_TIMEOUT_S", DEFAULT_REQUEST_BODY_TIMEOUT_S)),
    )


def _refusal(status: int, code: str, detail: str) -> bytes:
    body = orjson.dumps({"detail": detail, "code": code})
    head = STATUS_LINE[status] + (
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


HEADERS_TOO_LARGE = _refusal(431, "request_header_fields_too_large", "The request's headers are too large.")
REQUEST_TIMEOUT = _refusal(408, "request_timeout", "The request was not received in time.")


# The base's hot-path methods, called directly (no super() object per call: this runs for every request).
_base_data_received = HttpToolsProtocol.data_received
_base_on_headers_complete = HttpToolsProtocol.on_headers_complete
_base_on_message_complete = HttpToolsProtocol.on_message_complete


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a header size limit and header/body deadlines (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = server_limits()
        self._max_header_bytes = limits.max_header_bytes
        self._header_timeout_s = limits.header_timeout_s
        self._body_timeout_s = limits.body_timeout_s
        self._awaiting_headers = True  # the next bytes are (still) a request's head
        self._header_bytes = 0  # bytes of the current request's head so far
        self._in_body = False  # headers complete, message not yet
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False  # answered 431/408: what still arrives is dropped
        self._upgraded = False

    # --- the byte count ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self._header_timeout_s, self._header_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers:
            room = self._max_header_bytes - self._header_bytes
            if len(data) > room:
                self._feed_up_to_limit(data, room)
                return
            self._header_bytes += len(data)
        _base_data_received(self, data)
        if self._upgraded:
            return
        if self._awaiting_headers:
            # A request has begun: its head has a deadline. So has a connection whose last answer went out before
            # its request's body ended (uvicorn's keep-alive timer is off then): what followed the body, if
            # anything, was not counted, and may be the start of a head.
            if self._deadline is None and (
                self._header_bytes
                or (self.cycle is not None and self.cycle.response_complete and self.timeout_keep_alive_task is None)
            ):
                self._deadline = self.loop.call_later(self._header_timeout_s, self._header_deadline)
        elif self._in_body and self._deadline is None:
            self._deadline = self.loop.call_later(self._body_timeout_s, self._body_deadline)

    def _feed_up_to_limit(self, data: bytes, room: int) -> None:
        """More than the head may still hold: the parser gets only what fits; if the head is not complete
        by then it is too large, else the rest is fed normally (a body, or a pipelined request, counted)."""
        if room > 0:
            self._header_bytes += room
            _base_data_received(self, data[:room])
        if self._upgraded or self.transport.is_closing():
            return
        if self._awaiting_headers and self._header_bytes >= self._max_header_bytes:
            self._refuse(HEADERS_TOO_LARGE)
            return
        self.data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._in_body = True
        if self._deadline is not None:
            self._cancel_deadline()
        _base_on_headers_complete(self)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._deadline is not None:
            self._cancel_deadline()
        _base_on_message_complete(self)

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True  # the WebSocket protocol owns the transport from here
        self._cancel_deadline()
        super().handle_websocket_upgrade()

    # --- deadlines and refusals ---

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_deadline(self) -> None:
        self._deadline = None
        if self._upgraded or self.transport.is_closing() or not self._awaiting_headers:
            return
        if self._header_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # nothing (counted) was sent, e.g. an idle new connection: nothing to answer
            return
        self._refuse(REQUEST_TIMEOUT)

    def _body_deadline(self) -> None:
        self._deadline = None
        if self._upgraded or self.transport.is_closing() or not self._in_body:
            return
        if self.flow.read_paused:  # the server stopped reading (the app has not taken the body yet): wait
            self._deadline = self.loop.call_later(self._body_timeout_s, self._body_deadline)
            return
        self._refuse(REQUEST_TIMEOUT)

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` (unless a response is under way), then close lingeringly."""
        self._refused = True
        self._cancel_deadline()
        cycle = self.cycle
        if self._in_body:  # the cycle is this request's
            if cycle.response_started:  # the app answered without waiting for the whole body
                self.transport.close()
                return
            cycle.disconnected = True  # the app, waiting for the body, sees a disconnect; its answer is dropped
            cycle.message_event.set()
        elif cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # an earlier (pipelined) request is being answered: close after it
            return
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer, then FIN; eof_received closes when the client is done
            self.loop.call_later(LINGER_S, self._linger_end)
        else:  # pragma: no cover - TLS transports cannot half-close
            self.transport.close()

    def _linger_end(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
