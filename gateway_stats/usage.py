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

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import close_old_connections

logger = logging.getLogger("gateway_stats.usage")

_THOUSAND = Decimal(1000)


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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> Decimal:
        return (
            Decimal(self.prompt_tokens) * self.input_price_per_1k
            + Decimal(self.completion_tokens) * self.output_price_per_1k
        ) / _THOUSAND


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
    """A bounded in-process queue drained by one background thread into the sinks."""

    def __init__(self, *, flush_interval: float = 1.0, max_batch: int = 5000, max_queue: int = 1_000_000) -> None:
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.sinks: list[Sink] = [_log_sink]
        self._queue: deque[UsageEvent] = deque(maxlen=max_queue)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        # False in the test suite (tests/conftest.py): records wait for an explicit flush() there.
        self.autostart = True

    def emit(self, record: UsageEvent) -> None:
        self._queue.append(record)
        if self._thread is None or not self._thread.is_alive():
            if self.autostart:
                self._start()
        elif len(self._queue) >= self.max_batch:
            self._wake.set()

    def _start(self) -> None:
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
        """Hand everything queued so far to the sinks; returns how many records went out."""
        sent = 0
        with self._flush_lock:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                for sink in list(self.sinks):
                    try:
                        sink(batch)
                    except Exception:
                        logger.exception("usage sink %r failed on %d records", sink, len(batch))
                sent += len(batch)
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
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()


emitter = UsageEmitter()


def usage_sink_register(sink: Sink) -> None:
    """Hand every batch to ``sink`` too, after the sinks registered before it (once: registering again is a no-op).

    Called from an ``AppConfig.ready()``; a sink runs on the emitter's thread and may raise (logged, not retried).
    """
    if sink not in emitter.sinks:
        emitter.sinks.append(sink)


def usage_event_emit(event: UsageEvent) -> None:
    """Hand one usage event off the request path. Never blocks, never raises."""
    emitter.emit(event)
