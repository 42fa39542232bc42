"""The ledger's sink: each batch of usage events from the emitter's thread to the ledger, durably.

Two transports (``USAGE_TRANSPORT``; ``auto`` picks by whether a Celery broker is configured):

- ``celery``: each batch is published as ``gateway_stats.usage_ingest`` tasks (``USAGE_MESSAGE_ROWS`` rows
  a message) that the worker acknowledges only after its insert committed (``acks_late``); a worker that dies
  before that gets its messages delivered again (``CELERY_VISIBILITY_TIMEOUT_S`` on Redis). The insert ignores
  rows already there, so at-least-once delivery writes each call exactly once.
- ``database``: the embedded default (no broker): the same idempotent insert, done on this thread.

When the transport fails (broker or database unreachable) the batch goes to the local spool
(``gateway_stats.spool``), the transport is left alone for ``USAGE_TRANSPORT_RETRY_S``, and the spool is
replayed in order by the emitter's tick once it answers again. While the spool holds batches, new ones are
spooled behind them, so the ledger receives them in the order they were served; so are batches that arrive
while the in-memory queue is over ``USAGE_MAX_QUEUE`` (memory stays bounded, nothing is dropped).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings

from gateway_stats.ledger import Row, ledger_write, rows_of
from gateway_stats.spool import Spool
from gateway_stats.usage import UsageEvent, emitter

logger = logging.getLogger("gateway_stats.transport")

TRANSPORTS = ("auto", "celery", "database")


def transport_mode() -> str:
    """``celery`` or ``database``: what ``USAGE_TRANSPORT`` means here."""
    mode: str = settings.USAGE_TRANSPORT
    if mode == "auto":
        return "database" if settings.CELERY_TASK_ALWAYS_EAGER else "celery"
    return mode


def spool_directory() -> Path:
    configured: str = settings.USAGE_SPOOL_DIR
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "apiforge-spool"


def _dropped(count: int) -> None:
    from gateway_stats.metrics import usage_dropped_count

    usage_dropped_count(count)


def ingestion_lag_note(rows: Sequence[Row]) -> None:
    """Record how long the newest of ``rows`` took from the end of its call to now (its commit)."""
    if not rows:
        return
    ended = max(float(row["started_at"]) + float(row.get("latency_ms") or 0) / 1000 for row in rows)
    from gateway_stats.metrics import ingestion_lag_observe

    ingestion_lag_observe(max(0.0, time.time() - ended))


class LedgerTransport:
    """The sink (``__call__``) and the tick (``tick``) the ledger registers on the usage emitter."""

    def __init__(self) -> None:
        self._spool: Spool | None = None
        self._spool_lock = threading.Lock()
        self._retry_at = 0.0
        self._down_since = 0.0

    @property
    def spool(self) -> Spool:
        with self._spool_lock:
            if self._spool is None or self._spool.directory != spool_directory():
                self._spool = Spool(spool_directory(), on_drop=_dropped)
            return self._spool

    def __call__(self, batch: list[UsageEvent]) -> None:
        rows = rows_of(batch)
        if emitter.overflowing() or time.monotonic() < self._retry_at or self.spool.own_pending():
            self.spool.append(rows)
            return
        try:
            self.deliver(rows)
        except Exception as exc:
            self._down(exc)
            self.spool.append(rows)
        else:
            self._up()

    def deliver(self, rows: list[Row]) -> None:
        """Hand ``rows`` to the transport; raises when it cannot take them."""
        if transport_mode() == "celery":
            from gateway_stats.tasks import usage_ingest

            size: int = settings.USAGE_MESSAGE_ROWS
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                # argsrepr: Celery would otherwise build a (truncated) repr of every message's rows.
                usage_ingest.apply_async((chunk,), retry=False, argsrepr=f"<{len(chunk)} usage rows>")
        else:
            ledger_write(rows)
            ingestion_lag_note(rows)

    def tick(self) -> None:
        """Replay the spool (this process's, and those of processes that died) when the transport answers."""
        if time.monotonic() < self._retry_at or not self.spool.pending():
            return
        failures: list[Exception] = []

        def deliver(rows: list[Row]) -> None:
            try:
                self.deliver(rows)
            except Exception as exc:
                failures.append(exc)
                raise

        sent = self.spool.replay(deliver)
        if failures:
            self._down(failures[0])
        elif sent:
            logger.info("usage spool: %d records replayed to the %s transport", sent, transport_mode())
            self._up()

    def reset(self) -> None:
        """Forget the transport's state and discard the spool (tests)."""
        self.spool.discard()
        self._retry_at = 0.0
        self._down_since = 0.0

    def _down(self, exc: Exception) -> None:
        self._retry_at = time.monotonic() + settings.USAGE_TRANSPORT_RETRY_S
        if not self._down_since:
            self._down_since = time.monotonic()
            logger.warning(
                "usage transport (%s) unavailable (%s: %s): usage records are spooled to %s until it answers",
                transport_mode(),
                type(exc).__name__,
                exc,
                self.spool.directory,
            )

    def _up(self) -> None:
        if self._down_since:
            logger.info(
                "usage transport (%s) answers again after %.1f s", transport_mode(), time.monotonic() - self._down_since
            )
            self._down_since = 0.0
        self._retry_at = 0.0


ledger_transport = LedgerTransport()


def spool_size_bytes() -> int:
    """Bytes waiting in the spool directory (all processes' files)."""
    return ledger_transport.spool.size_bytes()
