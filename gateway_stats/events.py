"""The event bus: usage and audit events published, fire and forget, for whoever listens.

``event_publish(topic, payload)`` (one event) and the usage sink (a whole batch of calls, as one item) put
events on an in-process queue bounded to ``EVENTS_QUEUE_MAX`` events waiting or being published, and return;
one daemon thread per process (``EventBus``) drains it and publishes every event on:

1. the Channels layer, to the group ``staff_events``, one group message per run of events of a topic (up to
   ``GROUP_MESSAGE_MAX`` events): ``{"type": "usage.events" | "audit.events", "events": [payload, ...]}`` (the
   staff live feed's consumers join that group; a consumer's handler is ``usage_events`` / ``audit_events``).
   An in-process layer (the embedded default) is reached on the server's event loop, where its consumers live;
   a Redis layer through a private layer instance on the thread's own loop.
2. a ZeroMQ PUB socket, when ``EVENTS_ZMQ_PUB`` is set: bound to that address (or connected to it, with
   ``EVENTS_ZMQ_MODE=connect``, for several worker processes and a forwarder), one multipart ``[topic, JSON]``
   message per event, topics ``usage`` and ``audit``.

Nobody listening, or a slow listener, never slows anything: a full queue drops the new events, ZeroMQ sends
never block (``SNDHWM``, ``NOBLOCK``: a refused send is dropped), and a failing channel layer is left alone for
``CHANNELS_RETRY_S``. Every drop is counted in ``apiforge_events_dropped_total{bus}``; failures are logged as
warnings, at most once per ``WARN_INTERVAL_S`` each.

This runs in the web process, beside its event loop, once per proxied call: the usage sink only queues the
batch (the calls' payloads are made on the publisher thread, and only for a bus that can take them: none while
the channel layer is paused or ZeroMQ is unset or unbound), a batch's ZeroMQ messages come from one
``orjson.dumps``, and the channel layer gets one message per batch, not one per call. Usage payloads are plain
JSON values; any other payload is made JSON-safe here (``Decimal``, sets, datetimes and the like become
strings or lists) and dropped, counted, if it cannot be. The publisher starts with the server (lifespan hooks,
``gateway_stats.apps``) and lazily on the first event; it stops after the usage emitter's last flush, so those
events still go out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any

import orjson
from django.conf import settings

from gateway_stats.metrics import EVENTS_DROPPED, EVENTS_PUBLISHED, endpoint_label
from gateway_stats.usage import UsageEvent

logger = logging.getLogger(__name__)

GROUP = "staff_events"
TOPICS = ("usage", "audit")
MAX_BATCH = 5000  # events the publisher takes off the queue at a time
GROUP_MESSAGE_MAX = 500  # events in one group message of the channel layer
CHANNELS_TIMEOUT_S = 2.0  # one batch's sends to the channel layer, at most
CHANNELS_RETRY_S = 5.0  # after a channel-layer failure, events are dropped (counted) for this long
WARN_INTERVAL_S = 60.0
STOP_TIMEOUT_S = 5.0
_IN_PROCESS_LAYERS = {"channels.layers.InMemoryChannelLayer"}
# Where one usage payload ends and the next begins in the JSON array of a batch (see ``_usage_messages``).
_USAGE_BOUNDARY = b'},{"event_id":'
_USAGE_START = b'{"event_id":'

# What the queue holds: a topic, its events, and whether they are usage events (``UsageEvent``s, whose payloads
# the publisher makes) or payloads as given (dicts, made JSON-safe by the publisher).
_Item = tuple[str, list[Any], bool]


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
        self._queue: queue.SimpleQueue[_Item | None] | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._limit = 1
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._pending = 0  # events queued or being published: at most ``_limit``
        self._warnings = _Warnings()
        # Set by the lifespan start hook: the server's loop, where an in-process channel layer's consumers live.
        self._server_loop: asyncio.AbstractEventLoop | None = None
        self._zmq_ready = threading.Event()
        self.zmq_state = "disabled"  # disabled | starting | ok | error

    # --- the publishing side (any thread) ---

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Queue one event; never blocks, never raises (a full queue drops it, counted)."""
        self._put(topic, [payload], False)

    def publish_usage(self, batch: list[UsageEvent]) -> None:
        """Queue a batch of usage events as one item (their payloads are made on the publisher thread)."""
        if batch:
            self._put("usage", list(batch), True)

    def _put(self, topic: str, events: list[Any], usage: bool) -> None:
        try:
            target = self._running_queue()
            with self._idle:
                accepted = max(0, min(len(events), self._limit - self._pending))
                self._pending += accepted
            if accepted:
                target.put((topic, events if accepted == len(events) else events[:accepted], usage))
            if accepted < len(events):
                EVENTS_DROPPED.labels("queue").inc(len(events) - accepted)
                self._warnings.warn("queue", "event bus queue full (EVENTS_QUEUE_MAX): events are being dropped")
        except Exception:  # fire and forget: the caller's work is done whatever happens here
            logger.warning("could not queue an event on topic %r", topic, exc_info=True)

    def _running_queue(self) -> queue.SimpleQueue[_Item | None]:
        events = self._queue
        if events is not None and self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return events
        return self.start()

    def start(self, server_loop: asyncio.AbstractEventLoop | None = None) -> queue.SimpleQueue[_Item | None]:
        """Start the publisher thread if it is not running (in this process); returns its queue."""
        with self._lock:
            if server_loop is not None:
                self._server_loop = server_loop
            if self._pid != os.getpid():  # a forked child: the parent's thread and sockets are not ours
                self._thread = None
                self._queue = None
                self._pid = os.getpid()
            if self._queue is None:
                self._limit = max(1, settings.EVENTS_QUEUE_MAX)
                self._queue = queue.SimpleQueue()
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
        events.put(None)  # wakes the thread; what is queued before it still goes out
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

    def _run(self, events: queue.SimpleQueue[_Item | None]) -> None:
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
                    except Exception:  # a bug here must not stop the publisher (nor leave drain() waiting)
                        logger.exception("event bus: publishing a batch failed")
                    finally:
                        self._done(sum(len(item[1]) for item in batch))
                if last:
                    return
        finally:
            publisher.close()
            self.zmq_state = "disabled" if not settings.EVENTS_ZMQ_PUB else "error"

    def _take(self, events: queue.SimpleQueue[_Item | None]) -> tuple[list[_Item], bool]:
        """The next items (waiting for the first one), and whether the stop sentinel ended them."""
        batch: list[_Item] = []
        try:
            item = events.get(timeout=1.0)
        except queue.Empty:
            return batch, self._stopping.is_set()
        count = 0
        while True:
            if item is None:
                return batch, True
            batch.append(item)
            count += len(item[1])
            if count >= MAX_BATCH:
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

    def _zmq_send(self, messages: list[tuple[bytes, bytes]]) -> None:
        import zmq

        send, more, nowait = self._socket.send, zmq.SNDMORE | zmq.NOBLOCK, zmq.NOBLOCK
        sent = 0
        for topic, data in messages:
            try:
                send(topic, more)
                send(data, nowait)
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

    def _channels_target(self, count: int) -> Any:
        """The channel layer to send ``count`` events to, or ``None`` (none configured, or paused: counted)."""
        if time.monotonic() < self._channels_retry_at:
            EVENTS_DROPPED.labels("channels").inc(count)
            return None
        try:
            return self._channel_layer()
        except Exception as exc:
            self._channels_failed(count, exc)
            return None

    def _channels_send(self, layer: Any, runs: list[tuple[str, list[dict[str, Any]]]]) -> None:
        messages = [
            {"type": f"{topic}.events", "events": payloads[start : start + GROUP_MESSAGE_MAX]}
            for topic, payloads in runs
            for start in range(0, len(payloads), GROUP_MESSAGE_MAX)
        ]
        sent = [0]

        async def send_all() -> None:
            for message in messages:
                await layer.group_send(GROUP, message)
                sent[0] += len(message["events"])

        try:
            self._run(send_all())
        except Exception as exc:
            self._channels_failed(sum(len(payloads) for _, payloads in runs) - sent[0], exc)
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

    def publish(self, items: list[_Item]) -> None:
        """Publish a batch of queued items on every bus that can take them (payloads made only for those)."""
        count = sum(len(events) for _, events, _ in items)
        zmq_live = self._socket is not None
        if settings.EVENTS_ZMQ_PUB and not zmq_live:
            EVENTS_DROPPED.labels("zmq").inc(count)
        layer = self._channels_target(count)
        if layer is None and not zmq_live:
            return
        runs: list[tuple[str, list[dict[str, Any]]]] = []  # consecutive events of a topic, in order
        messages: list[tuple[bytes, bytes]] = []
        for topic, events, usage in items:
            if usage:
                payloads = [usage_event_payload(event) for event in events]
                if zmq_live:
                    try:
                        messages.extend(_usage_messages(payloads))
                    except orjson.JSONEncodeError:  # a string orjson refuses: each payload on its own
                        payloads = self._safe(topic, payloads, messages, decoded=layer is not None)
            else:
                payloads = self._safe(topic, events, messages if zmq_live else None, decoded=layer is not None)
            if runs and runs[-1][0] == topic:
                runs[-1][1].extend(payloads)
            elif payloads:
                runs.append((topic, payloads))
        if messages:
            self._zmq_send(messages)
        if layer is not None and runs:
            self._channels_send(layer, runs)

    def _safe(
        self, topic: str, events: list[dict[str, Any]], messages: list[tuple[bytes, bytes]] | None, decoded: bool
    ) -> list[dict[str, Any]]:
        """Payloads given as they are, made JSON-safe (for the channel layer), their ZeroMQ messages added."""
        safe: list[dict[str, Any]] = []
        name = topic.encode()
        for payload in events:
            try:
                data = orjson.dumps(payload, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
            except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
                EVENTS_DROPPED.labels("encode").inc()
                self._warnings.warn("encode", "event bus: an event on %r is not JSON-serialisable: %s", topic, exc)
                continue
            if messages is not None:
                messages.append((name, data))
            if decoded:
                safe.append(orjson.loads(data))
        return safe

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


def _usage_messages(payloads: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    """The ZeroMQ messages of (one or more) usage payloads: one ``orjson.dumps`` of them all, cut into one each.

    A tenth of the cost of one call per event (each allocates and shrinks its own buffer). The cut is exact:
    a usage payload's values are strings, numbers, booleans or null and its first key is ``event_id``, so the
    only ``{`` outside a string opens a payload, and a ``"`` inside a string is escaped: ``},{"event_id":``
    occurs nowhere else.
    """
    parts = orjson.dumps(payloads)[1:-1].split(_USAGE_BOUNDARY)
    last = len(parts) - 1
    topic = b"usage"
    return [
        (topic, (part if index == 0 else _USAGE_START + part) + (b"" if index == last else b"}"))
        for index, part in enumerate(parts)
    ]


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
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
    """What listeners get for one proxied call: the ledger's fields (the path as its bounded endpoint name).

    Plain JSON values only, ``event_id`` first (``_usage_messages`` relies on both).
    """
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
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "cost": str(event.cost),
        "latency_ms": round(event.latency_ms, 3),
        "ttfb_ms": round(event.ttfb_ms, 3),
        "request_bytes": event.request_bytes,
        "response_bytes": event.response_bytes,
        "client_ip": event.client_ip,
    }


def usage_events_sink(batch: list[UsageEvent]) -> None:
    """Usage sink: publish every call of the batch on the topic ``usage`` (queued as one item)."""
    bus.publish_usage(batch)


async def events_bus_start() -> None:
    """Lifespan start hook: start the publisher, on this (the server's) event loop's watch."""
    bus.start(server_loop=asyncio.get_running_loop())


async def events_bus_stop() -> None:
    """Lifespan stop hook, after the usage emitter's: publish what is left, close the sockets (off the loop)."""
    await asyncio.to_thread(bus.stop)
