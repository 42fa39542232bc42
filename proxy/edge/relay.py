"""Relaying: the upstream's answer passed on to the client, a stream event by event, noting the usage.

A stream's usage comes in its last events: only the last event naming ``"usage"`` in a read is parsed,
and the usage-only chunk the proxy asked for is dropped again unless the client asked for it too.

A stream's end is reported to ``ended(ok, first_byte_at)`` when given (the balancer's ``finished``): ``ok``
False when the upstream broke off or went silent, None when the client left first (no verdict on the
upstream), True otherwise; ``first_byte_at`` is the ``perf_counter`` of its first piece.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import orjson

from gateway_stats.usage import UsageEvent
from proxy.edge.account import account, usage_note
from proxy.edge.backends import UpstreamAnswer
from proxy.edge.exchange import SSE, ProxyResponse
from proxy.errors import ProxyError, internal_error

logger = logging.getLogger(__name__)


StreamEnded = Callable[[bool | None, float], None]


def relay(
    answer: UpstreamAnswer,
    event: UsageEvent,
    started: float,
    keep_usage_chunk: bool,
    ended: StreamEnded | None = None,
) -> ProxyResponse:
    """The client's answer for the upstream's 200."""
    if answer.pieces is None:
        usage_note(event, answer.usage)
        return ProxyResponse(200, answer.body)
    abort = None if answer.close is None else partial(_abort, event, answer.close)
    stream = relay_stream(answer.pieces, event, started, keep_usage_chunk, ended)
    return ProxyResponse(200, content_type=SSE, stream=stream, abort=abort)


_DONE = b"data: [DONE]\n\n"


def _abort(event: UsageEvent, close: Callable[[], None]) -> None:
    # A client that leaves once it read the final [DONE] has its whole answer: that call is not a 499.
    if not event.complete:
        event.status = 499
        event.error_code = "client_disconnected"
    close()


async def relay_stream(
    pieces: AsyncIterator[bytes],
    event: UsageEvent,
    started: float,
    keep_usage_chunk: bool,
    ended: StreamEnded | None = None,
) -> AsyncIterator[bytes]:
    """Pass complete SSE events on as they arrive, noting usage; always accounts for the request."""
    buffer = b""
    event.status = 200
    ok: bool | None = True
    first_byte_at = 0.0
    try:
        async for piece in pieces:
            if not event.ttfb_ms:
                first_byte_at = time.perf_counter()
                event.ttfb_ms = (first_byte_at - started) * 1000
            if b"\r" in piece:
                piece = piece.replace(b"\r\n", b"\n")
            buffer += piece
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            events, buffer = buffer[: end + 2], buffer[end + 2 :]
            if b'"usage"' in events:
                events = usage_in(events, event, keep_usage_chunk)
            if events:
                event.response_bytes += len(events)
                if events.endswith(_DONE):
                    event.complete = True
                yield events
        if buffer.strip():
            tail = usage_in(buffer, event, keep_usage_chunk) if b'"usage"' in buffer else buffer
            event.response_bytes += len(tail)
            event.complete = event.complete or tail.rstrip().endswith(_DONE.rstrip())
            yield tail
    except ProxyError as error:
        # Not after the client left (its abort closed the upstream) nor once the whole answer went out.
        ok = None if event.error_code == "client_disconnected" else event.complete
        if event.error_code != "client_disconnected" and not event.complete:
            event.status = error.status
            event.error_code = error.code
            error_event = error.sse_event()
            event.response_bytes += len(error_event)
            yield error_event
    except Exception:
        # The answer has started (200 is sent): end it with an error event rather than a dropped connection.
        logger.exception("unexpected error while relaying a stream")
        ok = None  # ours, not the upstream's
        failure = internal_error()
        event.status = failure.status
        event.error_code = failure.code
        yield failure.sse_event()
    except (asyncio.CancelledError, GeneratorExit):
        if not event.complete:
            ok = None
            event.status = 499
            event.error_code = "client_disconnected"
        raise
    finally:
        if ended is not None:
            ended(ok, first_byte_at or time.perf_counter())
        account(event, started)


def usage_in(events: bytes, event: UsageEvent, keep_usage_chunk: bool) -> bytes:
    """Note the usage carried by complete SSE ``events``; drop the usage-only chunk unless the client asked.

    Only the last event naming ``"usage"`` is parsed: upstreams that send ``"usage": null`` on every chunk
    (or running totals) put the figure that counts last, and parsing one event instead of all is what keeps
    a stream's relay cheap.
    """
    at = events.rfind(b'"usage"')
    if at < 0:
        return events
    start = events.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = events.find(b"\n\n", at)
    end = len(events) if end < 0 else end + 2
    chunk_bytes = events[start:end].rstrip(b"\n")
    if not chunk_bytes.startswith(b"data: {"):
        return events
    try:
        chunk = orjson.loads(chunk_bytes[6:])
    except orjson.JSONDecodeError:
        return events
    if isinstance(chunk, dict) and chunk.get("usage"):
        usage_note(event, chunk["usage"])
        if not keep_usage_chunk and not chunk.get("choices"):
            return events[:start] + events[end:]
    return events
