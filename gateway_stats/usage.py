"""Usage events: what every proxied call cost, handed off without blocking the answer.

``usage_event_emit(event)`` appends to an in-process deque (O(1), no I/O, no
lock contention worth the name). A daemon thread drains it every
``USAGE_FLUSH_INTERVAL_S`` (or sooner when a batch fills) and hands each batch to
the registered sinks. The default sink logs each one at DEBUG; the apps that
need the usage register theirs at startup with ``usage_sink_register`` (the keys
app its ``last_used_at`` writer, the statistics issue the durable ledger), so
this module imports no other app.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import close_old_connections

logger = logging.getLogger("gateway_stats.usage")

_THOUSAND = Decimal(1000)


def usage_cost(
    prompt_tokens: int, completion_tokens: int, input_price_per_1k: Decimal, output_price_per_1k: Decimal
) -> Decimal:
    """What a call cost at the prices per 1000 tokens in force when it was made (the ledger's formula too)."""
    return (prompt_tokens * input_price_per_1k + completion_tokens * output_price_per_1k) / _THOUSAND


@dataclass(slots=True)
class UsageEvent:
    """One proxied call. Prices ride along so the cost is computed off the request path."""

    request_id: str
    endpoint: str
    status: int
    method: str = "POST"
    key_id: int | None = None
    key_prefix: str = ""
    user_id: int | None = None
    model: str = ""
    upstream: str = ""
    upstream_model: str = ""
    route: str = ""
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    ttfb_ms: float = 0.0
    started_at: float = field(default_factory=time.time)
    client_ip: str = ""
    error_code: str = ""
    request_bytes: int = 0
    response_bytes: int = 0
    input_price_per_1k: Decimal = Decimal(0)
    output_price_per_1k: Decimal = Decimal(0)
    # The call's unique id in the ledger: given by the emitter's thread when it first takes the event.
    event_id: str = ""
    # A stream's final event ([DONE]) went out: a client leaving after it had the whole answer (not a 499).
    complete: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> Decimal:
        return usage_cost(self.prompt_tokens, self.completion_tokens, self.input_price_per_1k, self.output_price_per_1k)


Sink = Callable[[list[UsageEvent]], None]


def _log_sink(batch: list[UsageEvent]) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        for record in batch:
            logger.debug(
                "usage %s %s %s status=%s prompt=%s completion=%s cost=%s latency_ms=%.2f",
                record.request_id,
                record.endpoint,
                record.model,
                record.status,
                record.prompt_tokens,
                record.completion_tokens,
                record.cost,
                record.latency_ms,
            )


class UsageEmitter:
    """An in-process queue drained by one background thread into the sinks.

    The queue has no ``maxlen`` (a full deque would silently drop the oldest events): past ``max_queue``
    events the ledger's sink spools batches to disk instead of sending them (``overflowing``), which is
    what keeps memory bounded when the transport is slower than the traffic. Each event gets its ledger id
    (``event_id``) here, on this thread, before any sink sees it, so every retry of it carries the same id.
    """

    def __init__(self, *, flush_interval: float = 1.0, max_batch: int = 5000, max_queue: int = 200_000) -> None:
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.sinks: list[Sink] = [_log_sink]
        # Called after every flush (also when nothing was queued): the ledger replays its spool there.
        self.ticks: list[Callable[[], None]] = []
        self._queue: deque[UsageEvent] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # False in the test suite (tests/conftest.py): records wait for an explicit flush() there.
        self.autostart = True

    def emit(self, record: UsageEvent) -> None:
        self._queue.append(record)
        if self._thread is None or not self._thread.is_alive():
            if self.autostart:
                self.start()
        elif len(self._queue) >= self.max_batch:
            self._wake.set()

    def queue_depth(self) -> int:
        """Events waiting for the next flush."""
        return len(self._queue)

    def overflowing(self) -> bool:
        """More is queued than ``max_queue``: the ledger spools instead of sending until the queue drains."""
        return len(self._queue) > self.max_queue

    def start(self) -> None:
        """Start the background thread (at server startup, or on the first event)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="usage-emitter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()
            # This thread is not a request: release its database connection as CONN_MAX_AGE says.
            close_old_connections()

    def flush(self) -> int:
        """Hand everything queued so far to the sinks, then run the ticks; returns how many events went out."""
        sent = 0
        with self._flush_lock:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                for event in batch:
                    if not event.event_id:
                        event.event_id = event_id_new()
                for sink in list(self.sinks):
                    try:
                        sink(batch)
                    except Exception:
                        logger.exception("usage sink %r failed on %d records", sink, len(batch))
                sent += len(batch)
            for tick in list(self.ticks):
                try:
                    tick()
                except Exception:
                    logger.exception("usage tick %r failed", tick)
        return sent

    def discard(self) -> int:
        """Drop what is queued without handing it on (tests: one test's records never reach the next)."""
        with self._flush_lock:
            dropped = len(self._queue)
            self._queue.clear()
        return dropped

    def stop(self) -> None:
        """Flush what is left and stop the thread (called at server shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()


# Ledger ids: a random tag per process (renewed in a forked child) and a counter, made on the emitter's
# thread. 16 + 12 hex digits: unique across processes and restarts in practice (a 64-bit random tag).
_event_tag = secrets.token_hex(8)
_event_sequence = itertools.count(1)


def _event_tag_renew() -> None:
    global _event_tag, _event_sequence
    _event_tag = secrets.token_hex(8)
    _event_sequence = itertools.count(1)


os.register_at_fork(after_in_child=_event_tag_renew)


def event_id_new() -> str:
    return f"{_event_tag}{next(_event_sequence):012x}"


emitter = UsageEmitter()


def usage_tick_register(tick: Callable[[], None]) -> None:
    """Run ``tick`` after every flush of the emitter's thread, also when nothing was queued (once per tick)."""
    if tick not in emitter.ticks:
        emitter.ticks.append(tick)


def usage_sink_register(sink: Sink) -> None:
    """Hand every batch to ``sink`` too, after the sinks registered before it (once: registering again is a no-op).

    Called from an ``AppConfig.ready()``; a sink runs on the emitter's thread and may raise (logged, not retried).
    """
    if sink not in emitter.sinks:
        emitter.sinks.append(sink)


def usage_event_emit(event: UsageEvent) -> None:
    """Hand one usage event off the request path. Never blocks, never raises."""
    emitter.emit(event)
