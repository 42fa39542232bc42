"""Prometheus metrics of the gateway: their definitions, and the usage sink that updates them.

Nothing here runs on the request path: ``usage_metrics_sink`` is a usage sink (``gateway_stats.usage``), called
on the emitter's thread with each batch of finished calls, so counting a call costs the proxy nothing.

The metrics live in prometheus_client's default registry. With ``PROMETHEUS_MULTIPROC_DIR`` set (``make serve``,
the image: several uvicorn workers) prometheus_client keeps every value in a memory-mapped file per process in
that directory and ``/metrics`` (``apiforge.metrics``) adds them up at scrape time, so any worker answers for
all of them. Gauges say how they are combined across processes (``multiprocess_mode``).

Values that are not per process are read at scrape time by ``ScrapeCollector``: the latest ingestion lag, which
the ledger's consumer (often a Celery worker, another process) stores in the Django cache through
``ingestion_lag_observe``.

Label values are bounded: ``endpoint`` is one of a fixed set (``endpoint_label``), ``model`` and ``upstream``
are names from the catalog (a model the client asked for that does not exist is never one), ``status`` is the
HTTP status code.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from typing import Any

from django.core.cache import cache
from prometheus_client import Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway_stats.usage import UsageEvent

logger = logging.getLogger(__name__)

INGESTION_LAG_CACHE_KEY = "usage:ingestion_lag"

# Multiprocess mode writes each value to a file in this directory as the metric is made (below, at import).
if _multiprocess_directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(_multiprocess_directory, exist_ok=True)

# Seconds. Model calls take from milliseconds (embeddings, cached answers) to minutes (long generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

# The proxy's endpoints as label values; any other path is "other" (the path is the client's to choose).
_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"})
_MODEL_DETAIL = "/v1/models/{model}"
_GATEWAY = "/gw/"

REQUESTS = Counter(
    "apiforge_requests",
    "Proxied calls, by endpoint, model, upstream and HTTP status (counted off the request path).",
    ["endpoint", "model", "upstream", "status"],
)
REQUEST_DURATION = Histogram(
    "apiforge_request_duration_seconds",
    "Time from a proxied call's arrival to the end of its answer (the whole stream for a stream).",
    ["endpoint"],
    buckets=DURATION_BUCKETS,
)
TIME_TO_FIRST_BYTE = Histogram(
    "apiforge_time_to_first_byte_seconds",
    "Streams: time from a call's arrival to the first byte of the upstream's answer relayed to the client.",
    ["model"],
    buckets=TTFB_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "apiforge_upstream_request_duration_seconds",
    "Calls forwarded to an upstream, by upstream: duration as the gateway measures it (its own share is well "
    "under a millisecond), including retries on the same upstream.",
    ["upstream"],
    buckets=DURATION_BUCKETS,
)
PROMPT_TOKENS = Counter("apiforge_prompt_tokens", "Prompt tokens, as the upstream counted them.", ["model"])
COMPLETION_TOKENS = Counter("apiforge_completion_tokens", "Completion tokens, as the upstream counted them.", ["model"])
COST = Counter("apiforge_cost", "Cost of the calls at the prices in force when each was made.", ["model"])
USAGE_QUEUE_DEPTH = Gauge(
    "apiforge_usage_queue_depth",
    "Usage events waiting in the in-process queue of the web processes (summed over live processes).",
    multiprocess_mode="livesum",
)
USAGE_SPOOL_BYTES = Gauge(
    "apiforge_usage_spool_bytes",
    "Bytes of usage batches in the spool directory (every process's file), waiting for the transport.",
    multiprocess_mode="livemax",
)
USAGE_DROPPED = Counter(
    "apiforge_usage_dropped",
    "Usage events that could not be kept anywhere (the spool could not be written): calls missing from the ledger.",
)
INGESTION_BATCH_LAG = Histogram(
    "apiforge_usage_ingestion_batch_lag_seconds",
    "Per committed ledger batch, in the process that committed it: time from the end of its oldest call to the commit.",
    buckets=LAG_BUCKETS,
)
EVENTS_PUBLISHED = Counter("apiforge_events_published", "Events handed to an event bus, by bus.", ["bus"])
EVENTS_DROPPED = Counter(
    "apiforge_events_dropped",
    "Events not published, by bus: queue (the publisher's queue was full), channels (the channel layer failed), "
    "zmq (the socket refused the message or is not bound), encode (not JSON-serialisable).",
    ["bus"],
)


def endpoint_label(path: str) -> str:
    """The bounded label value of a proxied path: a ``/v1/`` endpoint, or ``/gw/`` for every gateway route call
    (the route itself is the usage record's ``route``; the rest of the path is the client's to choose)."""
    if path.startswith(_GATEWAY):
        return _GATEWAY
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return _MODEL_DETAIL
    return "other"


def usage_metrics_sink(batch: list[UsageEvent]) -> None:
    """Usage sink: count a batch of finished calls (aggregated per label set first: one update each)."""
    requests: dict[tuple[str, str, str, str], int] = defaultdict(int)
    prompt: dict[str, int] = defaultdict(int)
    completion: dict[str, int] = defaultdict(int)
    cost: dict[str, Decimal] = defaultdict(Decimal)
    durations: dict[str, list[float]] = defaultdict(list)
    for event in batch:
        endpoint = endpoint_label(event.endpoint)
        requests[(endpoint, event.model, event.upstream, str(event.status))] += 1
        durations[endpoint].append(event.latency_ms / 1000)
        if event.upstream:
            UPSTREAM_DURATION.labels(event.upstream).observe(event.latency_ms / 1000)
        if event.stream and event.ttfb_ms:
            TIME_TO_FIRST_BYTE.labels(event.model).observe(event.ttfb_ms / 1000)
        if event.prompt_tokens or event.completion_tokens:
            prompt[event.model] += event.prompt_tokens
            completion[event.model] += event.completion_tokens
            cost[event.model] += event.cost
    for labels, count in requests.items():
        REQUESTS.labels(*labels).inc(count)
    for endpoint, seconds in durations.items():
        histogram = REQUEST_DURATION.labels(endpoint)
        for value in seconds:
            histogram.observe(value)
    for model, tokens in prompt.items():
        PROMPT_TOKENS.labels(model).inc(tokens)
        COMPLETION_TOKENS.labels(model).inc(completion[model])
        COST.labels(model).inc(float(cost[model]))
    usage_gauges_update()


def _optional(module: str, name: str) -> Callable[[], Any] | None:
    """``module.name`` if both exist (provided by the usage pipeline as it grows), else ``None``."""
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if callable(found) else None


def usage_gauges_update() -> None:
    """Set this process's queue-depth and spool-size gauges (each batch, and at every scrape)."""
    from gateway_stats.usage import emitter

    depth = getattr(emitter, "queue_depth", None)  # the emitter's accessor, when it has one
    if callable(depth):
        USAGE_QUEUE_DEPTH.set(depth())
    spool_size = _optional("gateway_stats.transport", "spool_size_bytes")
    if spool_size is not None:
        try:
            USAGE_SPOOL_BYTES.set(spool_size())
        except OSError:
            logger.warning("could not read the usage spool's size", exc_info=True)


def usage_dropped_count(n: int) -> None:
    """Count ``n`` usage events lost for good (the spool could not take them)."""
    if n > 0:
        USAGE_DROPPED.inc(n)


def ingestion_lag_observe(seconds: float) -> None:
    """Note the lag of one committed ledger batch: a histogram here, and the latest value for every ``/metrics``.

    The consumer that commits ledger batches may be another process (a Celery worker) than the one scraped, so
    the latest value goes to the shared Django cache. Never raises: the cache being down loses only this value.
    """
    seconds = max(0.0, float(seconds))
    INGESTION_BATCH_LAG.observe(seconds)
    try:
        cache.set(INGESTION_LAG_CACHE_KEY, {"lag_s": seconds, "at": time.time()}, timeout=None)
    except Exception:
        logger.warning("could not store the usage ingestion lag in the cache", exc_info=True)


def ingestion_lag_latest() -> dict[str, float] | None:
    """The latest ingestion lag any consumer stored (``{"lag_s", "at"}``), or ``None``."""
    try:
        value = cache.get(INGESTION_LAG_CACHE_KEY)
    except Exception:
        logger.warning("could not read the usage ingestion lag from the cache", exc_info=True)
        return None
    if not isinstance(value, dict):
        return None
    if not all(isinstance(value.get(name), int | float) for name in ("lag_s", "at")):
        return None
    return value


class ScrapeCollector(Collector):
    """What ``/metrics`` reads when it is scraped rather than from a process's counters."""

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        latest = ingestion_lag_latest()
        lag = GaugeMetricFamily(
            "apiforge_usage_ingestion_lag_seconds",
            "Latest committed ledger batch: time from the end of its oldest call to its commit.",
        )
        committed = GaugeMetricFamily(
            "apiforge_usage_ingestion_last_commit_timestamp_seconds",
            "When that latest batch was committed (Unix time): stale when no consumer is running.",
        )
        if latest is not None:
            lag.add_metric([], latest["lag_s"])
            committed.add_metric([], latest["at"])
        yield lag
        yield committed


async def metrics_process_stop() -> None:
    """Lifespan stop hook: in multiprocess mode, this process's live gauges leave the sums (its counters stay)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())
