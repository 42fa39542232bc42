"""A stream's accounting when the client leaves: after the final [DONE] it had the whole answer (a 200)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway_stats.usage import UsageEvent
from proxy.edge.relay import _abort, relay_stream
from proxy.errors import ProxyError

CHUNK = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


async def _pieces(fail: bool) -> AsyncIterator[bytes]:
    yield CHUNK
    yield DONE
    if fail:  # the upstream connection, closed by the client's abort, fails on its next read
        raise ProxyError(502, "upstream closed", code="upstream_error")


def _relay(event: UsageEvent, *, fail: bool, leave_after: int) -> list[bytes]:
    async def run() -> list[bytes]:
        got = []
        stream = relay_stream(_pieces(fail), event, 0.0, False)
        async for chunk in stream:
            got.append(chunk)
            if len(got) == leave_after:
                _abort(event, lambda: None)
                await stream.aclose()
                break
        return got

    return asyncio.run(run())


def test_a_client_leaving_after_done_is_a_complete_200():
    event = UsageEvent(request_id="r", endpoint="/v1/chat/completions", status=0)

    assert _relay(event, fail=False, leave_after=2) == [CHUNK, DONE]

    assert (event.status, event.error_code) == (200, "")


def test_an_upstream_error_after_done_does_not_turn_the_call_into_a_502():
    event = UsageEvent(request_id="r", endpoint="/v1/chat/completions", status=0)

    assert _relay(event, fail=True, leave_after=99) == [CHUNK, DONE]

    assert (event.status, event.error_code) == (200, "")


def test_a_client_leaving_before_done_is_a_499():
    event = UsageEvent(request_id="r", endpoint="/v1/chat/completions", status=0)

    assert _relay(event, fail=False, leave_after=1) == [CHUNK]

    assert (event.status, event.error_code) == (499, "client_disconnected")
