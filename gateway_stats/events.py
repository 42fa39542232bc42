"""The event bus: usage and audit events published, fire and forget, for whoever listens.

``event_publish(topic, payload)`` puts the event on a bounded in-process queue (``EVENTS_QUEUE_MAX``) and
returns; one daemon thread per process (``EventBus``) drains it and publishes each event on:

1. the Channels layer, to the group ``staff_events``, as ``{"type": "usage.event" | "audit.event", "event":
   payload}`` (the staff live feed's consumers join that group). An in-process layer (the embedded default) is
   reached on the server's event loop, where its consumers live; a Redis layer through a private layer instance
   on the thread's own loop.
2. a ZeroMQ PUB socket, when ``EVENTS_ZMQ_PUB`` is set: bound to that address (or connected to it, with
   ``EVENTS_ZMQ_MODE=connect``, for several worker processes and a forwarder), multipart ``[topic, JSON]``,
   topics ``usage`` and ``audit``.

Nobody listening, or a slow listener, never slows anything: a full queue drops the new event, ZeroMQ sends never
block (``SNDHWM``, ``NOBLOCK``: a refused send is dropped), and a failing channel layer is left alone for
``CHANNELS_RETRY_S``. Every drop is counted in ``apiforge_events_dropped_total{bus}``; failures are logged as
warnings, at most once per ``WARN_INTERVAL_S`` each.

Payloads are made JSON-safe here (``Decimal``, datetimes and the like become strings). The publisher starts with
the server (lifespan hooks, ``gateway_stats.apps``) and lazily on the first event; it stops after the usage
emitter's last flush, so those events still go out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings

from gateway_stats.metrics import EVENTS_DROPPED, EVENTS_PUBLISHED, endpoint_label
from gateway_stats.usage import UsageEvent

logger = logging.getLogger(__name__)

GROUP = "staff_events"
TOPICS = ("usage", "audit")
MAX_BATCH = 500
CHANNELS_TIMEOUT_S = 2.0  # one batch's sends to the channel layer, at most
CHANNELS_RETRY_S = 5.0  # after a channel-layer failure, events are dropped (counted) for this long
WARN_INTERVAL_S = 60.0
STOP_TIMEOUT_S = 5.0
_IN_PROCESS_LAYERS = {"channels.layers.InMemoryChannelLayer"}


@dataclass(frozen=True, slots=True)
class _Event:
    topic: str
    payload: dict[str, Any]


class _Warnings:
    """Log each kind of failure at most once per interval (a dead Redis would otherwise log every batch)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < WARN_INTERVAL_S:
            return
        self._last[kind] = now
        logger.warning(message, *args)


class EventBus:
    """A bounded queue and the one thread that publishes what is put on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Event | None] | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0
        self._warnings = _Warnings()
        # Set by the lifespan start hook: the server's loop, where an in-process channel layer's consumers live.
        self._server_loop: asyncio.AbstractEventLoop | None = None
        self._zmq_ready = threading.Event()
        self.zmq_state = "disabled"  # disabled | starting | ok | error

    # --- the publishing side (any thread) ---

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Queue one event; never blocks, never raises (a full queue drops it, counted)."""
        try:
            events = self._running_queue()
            with self._idle:
                self._pending += 1
            try:
                events.put_nowait(_Event(topic, payload))
            except queue.Full:
                self._done(1)
                EVENTS_DROPPED.labels("queue").inc()
                self._warnings.warn("queue", "event bus queue full (EVENTS_QUEUE_MAX): events are being dropped")
        except Exception:  # fire and forget: the caller's work is done whatever happens here
            logger.warning("could not queue an event on topic %r", topic, exc_info=True)

    def _running_queue(self) -> queue.Queue[_Event | None]:
        events = self._queue
        if events is not None and self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return events
        return self.start()

    def start(self, server_loop: asyncio.AbstractEventLoop | None = None) -> queue.Queue[_Event | None]:
        """Start the publisher thread if it is not running (in this process); returns its queue."""
        with self._lock:
            if server_loop is not None:
                self._server_loop = server_loop
            if self._pid != os.getpid():  # a forked child: the parent's thread and sockets are not ours
                self._thread = None
                self._queue = None
                self._pid = os.getpid()
            if self._queue is None:
                self._queue = queue.Queue(maxsize=max(1, settings.EVENTS_QUEUE_MAX))
                with self._idle:
                    self._pending = 0
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._zmq_ready.clear()
                self._warnings = _Warnings()  # a new publisher says again what fails for it
                self.zmq_state = "starting" if settings.EVENTS_ZMQ_PUB else "disabled"
                self._thread = threading.Thread(target=self._run, args=(self._queue,), name="event-bus", daemon=True)
                self._thread.start()
            return self._queue

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Publish what is queued (for at most ``timeout`` seconds), then stop the thread and close the sockets."""
        with self._lock:
            thread, events = self._thread, self._queue
            self._thread = None
            self._queue = None
            self._server_loop = None
        if thread is None or events is None:
            return
        self._stopping.set()
        try:
            events.put(None, timeout=timeout)  # wakes the thread; what is queued before it still goes out
        except queue.Full:
            pass
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("the event bus did not stop within %.0f s", timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until every queued event was handled (published or dropped); ``False`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def zmq_status(self, timeout: float) -> str:
        """``ok`` when the ZeroMQ socket is bound (or connected), ``error`` otherwise, ``disabled`` if not set."""
        if not settings.EVENTS_ZMQ_PUB:
            return "disabled"
        self._running_queue()
        self._zmq_ready.wait(timeout)
        return "ok" if self.zmq_state == "ok" else "error"

    def _done(self, count: int) -> None:
        with self._idle:
            self._pending -= count
            if self._pending <= 0:
                self._pending = 0
                self._idle.notify_all()

    # --- the publisher thread ---

    def _run(self, events: queue.Queue[_Event | None]) -> None:
        publisher = _Publisher(self._warnings, self._server_loop)
        try:
            self.zmq_state = publisher.zmq_open()
        finally:
            self._zmq_ready.set()
        try:
            while True:
                batch, last = self._take(events)
                if batch:
                    try:
                        publisher.publish(batch)
                    finally:
                        self._done(len(batch))
                if last:
                    return
        finally:
            publisher.close()
            self.zmq_state = "disabled" if not settings.EVENTS_ZMQ_PUB else "error"

    def _take(self, events: queue.Queue[_Event | None]) -> tuple[list[_Event], bool]:
        """The next batch (waiting for its first event), and whether the stop sentinel ended it."""
        batch: list[_Event] = []
        try:
            item = events.get(timeout=1.0)
        except queue.Empty:
            return batch, self._stopping.is_set()
        while True:
            if item is None:
                return batch, True
            batch.append(item)
            if len(batch) >= MAX_BATCH:
                return batch, False
            try:
                item = events.get_nowait()
            except queue.Empty:
                return batch, False


class _Publisher:
    """What the publisher thread owns: its event loop, its channel layer, its ZeroMQ socket."""

    def __init__(self, warnings: _Warnings, server_loop: asyncio.AbstractEventLoop | None) -> None:
        self._warnings = warnings
        self._server_loop = server_loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._layer: Any = None
        self._layer_shared = False
        self._channels_retry_at = 0.0
        self._context: Any = None
        self._socket: Any = None

    # --- ZeroMQ ---

    def zmq_open(self) -> str:
        address: str = settings.EVENTS_ZMQ_PUB
        if not address:
            return "disabled"
        import zmq

        self._context = zmq.Context()
        sock = self._context.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, max(1, settings.EVENTS_ZMQ_SNDHWM))
        sock.setsockopt(zmq.LINGER, 0)  # closing never waits for a subscriber
        try:
            if settings.EVENTS_ZMQ_MODE == "connect":
                sock.connect(address)
            else:
                sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close()
            self._warnings.warn(
                "zmq-bind",
                "event bus: cannot %s the ZeroMQ socket to %s (%s); with several worker processes only one can "
                "bind an address: use EVENTS_ZMQ_MODE=connect and a forwarder",
                settings.EVENTS_ZMQ_MODE,
                address,
                exc,
            )
            return "error"
        self._socket = sock
        return "ok"

    def _zmq_send(self, batch: list[tuple[str, bytes, dict[str, Any]]]) -> None:
        import zmq

        if self._socket is None:
            EVENTS_DROPPED.labels("zmq").inc(len(batch))
            return
        sent = 0
        for topic, data, _ in batch:
            try:
                self._socket.send_multipart([topic.encode(), data], flags=zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                EVENTS_DROPPED.labels("zmq").inc()
            except zmq.ZMQError as exc:
                EVENTS_DROPPED.labels("zmq").inc()
                self._warnings.warn("zmq-send", "event bus: ZeroMQ send failed: %s", exc)
        if sent:
            EVENTS_PUBLISHED.labels("zmq").inc(sent)

    # --- Channels ---

    def _channel_layer(self) -> Any:
        if self._layer is None:
            config = settings.CHANNEL_LAYERS.get("default") if settings.CHANNEL_LAYERS else None
            if not config:
                return None
            from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer

            if config.get("BACKEND") in _IN_PROCESS_LAYERS:
                # The consumers' own instance: an in-process layer's groups live in it.
                self._layer, self._layer_shared = get_channel_layer(), True
            else:
                self._layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        return self._layer

    def _channels_send(self, batch: list[tuple[str, bytes, dict[str, Any]]]) -> None:
        if time.monotonic() < self._channels_retry_at:
            EVENTS_DROPPED.labels("channels").inc(len(batch))
            return
        try:
            layer = self._channel_layer()
        except Exception as exc:
            self._channels_failed(len(batch), exc)
            return
        if layer is None:
            return
        messages = [{"type": f"{topic}.event", "event": safe} for topic, _, safe in batch]
        sent = [0]

        async def send_all() -> None:
            for message in messages:
                await layer.group_send(GROUP, message)
                sent[0] += 1

        try:
            self._run(send_all())
        except Exception as exc:
            self._channels_failed(len(batch) - sent[0], exc)
        if sent[0]:
            EVENTS_PUBLISHED.labels("channels").inc(sent[0])

    def _channels_failed(self, dropped: int, exc: BaseException) -> None:
        EVENTS_DROPPED.labels("channels").inc(dropped)
        self._channels_retry_at = time.monotonic() + CHANNELS_RETRY_S
        self._warnings.warn(
            "channels", "event bus: the channel layer failed (%s); events are dropped for now", repr(exc)
        )

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        bounded = asyncio.wait_for(coroutine, CHANNELS_TIMEOUT_S)
        server_loop = self._server_loop
        if self._layer_shared and server_loop is not None and server_loop.is_running():
            try:
                future = asyncio.run_coroutine_threadsafe(bounded, server_loop)
            except RuntimeError:  # the loop closed meanwhile
                bounded.close()
                raise
            future.result(CHANNELS_TIMEOUT_S + 1)
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(bounded)

    # --- both ---

    def publish(self, events: list[_Event]) -> None:
        encoded: list[tuple[str, bytes, dict[str, Any]]] = []
        for event in events:
            try:
                data = json.dumps(event.payload, default=_json_default, separators=(",", ":")).encode()
            except (TypeError, ValueError) as exc:
                EVENTS_DROPPED.labels("encode").inc()
                self._warnings.warn(
                    "encode", "event bus: an event on %r is not JSON-serialisable: %s", event.topic, exc
                )
                continue
            encoded.append((event.topic, data, json.loads(data)))
        if not encoded:
            return
        if settings.EVENTS_ZMQ_PUB:
            self._zmq_send(encoded)
        self._channels_send(encoded)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None
        loop, layer = self._loop, self._layer
        if loop is not None:
            close_pools = getattr(layer, "close_pools", None) if not self._layer_shared else None
            if close_pools is not None:
                try:
                    loop.run_until_complete(asyncio.wait_for(close_pools(), CHANNELS_TIMEOUT_S))
                except Exception:
                    logger.debug("event bus: closing the channel layer's connections failed", exc_info=True)
            loop.close()
            self._loop = None
        self._layer = None


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


bus = EventBus()


def event_publish(topic: str, payload: dict[str, Any]) -> None:
    """Publish ``payload`` on ``topic`` ("usage", "audit") on every configured bus; fire and forget.

    Returns at once (a bounded in-process queue); never raises. Call it after the transaction that made the
    event committed (``transaction.on_commit``), so listeners never hear of a write that was rolled back.
    """
    bus.publish(topic, payload)


def usage_event_payload(event: UsageEvent) -> dict[str, Any]:
    """What listeners get for one proxied call: the ledger's fields (the path as its bounded endpoint name)."""
    return {
        "event_id": event.event_id,
        "request_id": event.request_id,
        "started_at": event.started_at,
        "key_id": event.key_id,
        "key_prefix": event.key_prefix,
        "user_id": event.user_id,
        "method": event.method,
        "endpoint": endpoint_label(event.endpoint),
        "route": event.route,
        "model": event.model,
        "upstream": event.upstream,
        "upstream_model": event.upstream_model,
        "status": event.status,
        "error_code": event.error_code,
        "stream": event.stream,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.total_tokens,
        "cost": str(event.cost),
        "latency_ms": round(event.latency_ms, 3),
        "ttfb_ms": round(event.ttfb_ms, 3),
        "request_bytes": event.request_bytes,
        "response_bytes": event.response_bytes,
        "client_ip": event.client_ip,
    }


def usage_events_sink(batch: list[UsageEvent]) -> None:
    """Usage sink: publish every call of the batch on the topic ``usage``."""
    for event in batch:
        bus.publish("usage", usage_event_payload(event))


async def events_bus_start() -> None:
    """Lifespan start hook: start the publisher, on this (the server's) event loop's watch."""
    bus.start(server_loop=asyncio.get_running_loop())


async def events_bus_stop() -> None:
    """Lifespan stop hook, after the usage emitter's: publish what is left, close the sockets (off the loop)."""
    await asyncio.to_thread(bus.stop)
