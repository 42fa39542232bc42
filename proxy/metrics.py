"""Prometheus metrics of the proxy's runtime state: ``apiforge_breaker_state{key}``, and the limiter's counters
``apiforge_ratelimit_rejections_total{limit}`` and ``apiforge_ratelimit_unavailable_total{outcome}``.

0 closed, 1 half-open, 2 open, per breaker key (``dep:<id>`` for a model deployment, ``rt:<id>`` for a route
target); set in each worker whenever its view of a breaker changes (``breaker_listener_register``; the sync's
tick notices open -> half-open). Every worker shares the breakers' state (``proxy.edge.breaker``), so in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) the value shown is the most recent any live worker wrote
(``livemostrecent``). A key appears once its breaker first left closed; label values are bounded by the
deployments and targets configured.

Defined in prometheus_client's default registry like ``gateway_stats.metrics``, so ``/metrics`` shows it.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge

from proxy.edge.breaker import breaker_listener_register

if _multiprocess_directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(_multiprocess_directory, exist_ok=True)

BREAKER_STATE = Gauge(
    "apiforge_breaker_state",
    "Circuit breaker state per deployment (dep:<id>) or route target (rt:<id>): 0 closed, 1 half-open, 2 open.",
    ["key"],
    multiprocess_mode="livemostrecent",
)


def _breaker_changed(key: str, state: int) -> None:
    BREAKER_STATE.labels(key).set(state)


def breaker_metrics_register() -> None:
    """Keep the gauge in step with this process's breakers (the lifespan start; once is enough)."""
    breaker_listener_register(_breaker_changed)


# Calls refused by a limit (proxy.edge.admit), by which: key_rpm, key_tpm, key_concurrency, key_budget_tokens,
# key_budget_cost, user_rpm, user_budget_cost, model_rpm, model_tpm, route_rpm.
RATELIMIT_REJECTIONS = Counter(
    "apiforge_ratelimit_rejections", "Calls refused with a 429 by a rate limit, concurrency limit or budget.", ["limit"]
)
# Calls that met an unreachable limiter (Redis): served anyway ("open", RATE_LIMIT_FAIL_OPEN) or refused ("closed").
RATELIMIT_UNAVAILABLE = Counter(
    "apiforge_ratelimit_unavailable", "Calls the limiter could not check (its Redis unreachable).", ["outcome"]
)
