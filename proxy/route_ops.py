"""Operator actions on a route's targets from the admin, and the route page's traffic panel.

- ``route_breakers_reset``: close the breakers of a route's targets (and forget their health verdicts), on
  every worker (``proxy.edge.breaker.breaker_reset``).
- ``route_health_check_run``: probe each target now as the active checks do (``GET {target}{health_check.path}``
  within its ``timeout_s``; a 2xx or 3xx is a success, see ``proxy.edge.health``) and record the result as the
  target's verdict at once (an operator's probe decides, it does not wait for the ``healthy`` / ``unhealthy``
  thresholds): in this process, and with Redis in the shared record every worker adopts.
- ``route_connection_test``: the same probe, recorded nowhere. Without a health check it asks for ``/`` within
  ``min(route.timeout_s, CONNECTION_TEST_TIMEOUT_S)``, and any HTTP answer (a 404 too) counts as "connected":
  the question is whether the gateway reaches the target, not whether ``/`` is a page.
- ``route_traffic``: the last 24 h of a route from the ledger (calls, errors, latency percentiles, calls refused
  because no target could take them), in two queries whatever the number of rows.

The probes are synchronous (``httpx``, no redirects, no proxy settings from the environment), one target after
another: the checker's own prober is an aiohttp task on the gateway's event loop and cannot be called from a
sync view. Every action is audited.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Count, Q
from django.utils import timezone

from apiforge.local_cache import CacheUnavailable
from gateway_stats.histogram import percentiles
from gateway_stats.models import UsageRecord
from gateway_stats.services import audit_record
from proxy.edge import breaker as edge_breaker
from proxy.edge import health as edge_health
from proxy.gateway_catalog import HealthCheck
from proxy.models import Route, RouteTarget
from proxy.route_services import AUDIT_OBJECT_TYPE

# A connection test of a route without a health check asks for "/" and waits at most this long.
CONNECTION_TEST_PATH = "/"
CONNECTION_TEST_TIMEOUT_S = 5.0
# The answer the gateway gives when no target of a route can take a call (every breaker open, every target
# drained or unhealthy): proxy.edge.gateway's 503. The panel counts these as the breakers' refusals.
REFUSED_ERROR_CODE = "no_healthy_upstream"
TRAFFIC_WINDOW = timedelta(hours=24)
USER_AGENT = "apiforge-health-check"


class NoHealthCheck(Exception):
    """The route has no ``health_check`` configured."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One target probed: the HTTP status (None: no answer), how long it took, what went wrong."""

    target_id: int
    url: str
    ok: bool
    status: int | None
    ms: float
    error: str = ""
    skipped: str = ""  # why the target was not probed (e.g. "drained")

    def summary(self) -> str:
        if self.skipped:
            return f"{self.url}: skipped ({self.skipped})"
        answer = f"HTTP {self.status}" if self.status is not None else (self.error or "no answer")
        return f"{self.url}: {'ok' if self.ok else 'failed'}, {answer}, {self.ms:.0f} ms"

    def as_audit(self) -> dict[str, Any]:
        return {
            "target": self.target_id,
            "url": self.url,
            "ok": self.ok,
            "status": self.status,
            "ms": round(self.ms, 1),
            "error": self.error,
            "skipped": self.skipped,
        }


def _targets(route: Route) -> list[RouteTarget]:
    return list(RouteTarget.objects.filter(route=route).order_by("pk"))


def probe(url: str, *, path: str, timeout_s: float, healthy_below: int = 400) -> tuple[int | None, float, str]:
    """``GET url+path`` as the health checker asks it: (status or None, milliseconds, error). A status below
    ``healthy_below`` and 200 or above is the caller's success."""
    started = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.get(url.rstrip("/") + path, headers={"user-agent": USER_AGENT})
    except httpx.TimeoutException:
        return None, (time.perf_counter() - started) * 1000, f"no answer within {timeout_s:g} s"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return None, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"[:200]
    return response.status_code, (time.perf_counter() - started) * 1000, ""


def _audit(action: str, route: Route, changes: dict[str, Any], actor: AbstractBaseUser | None, ip: str | None) -> None:
    audit_record(
        actor=actor,
        action=f"route.{action}",
        object_type=AUDIT_OBJECT_TYPE,
        object_id=route.pk,
        object_repr=route.name,
        changes=changes,
        ip_address=ip,
    )


def route_breakers_reset(
    *, route: Route, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> list[edge_breaker.BreakerView]:
    """Close every target's breaker and forget its health verdict, on every worker; the breakers as they were.

    Audited before the shared reset: a Redis outage (``CacheUnavailable``) still leaves this process reset and
    the attempt on record.
    """
    targets = _targets(route)
    before = [edge_breaker.breaker_view(edge_breaker.route_target_key(target.pk)) for target in targets]
    _audit(
        "breaker_reset",
        route,
        {
            "targets": [
                {"target": t.pk, "url": t.url, "state": view.state, "failures": view.failures}
                for t, view in zip(targets, before, strict=True)
            ]
        },
        actor,
        ip_address,
    )
    unshared: CacheUnavailable | None = None
    for target in targets:
        try:
            edge_breaker.breaker_reset(edge_breaker.route_target_key(target.pk))
        except CacheUnavailable as exc:  # reset here; the others are reset here too before saying so
            unshared = exc
    if unshared is not None:
        raise unshared
    return before


def _verdict_share(key: str, healthy: bool) -> int:
    """Write ``key``'s verdict to the shared health record (with Redis) and tell every worker; its version (0
    without Redis)."""
    if not settings.REDIS_URL:
        return 0
    from proxy.edge.shared_state import shared_health_set

    return shared_health_set(key, healthy)


def route_health_check_run(
    *, route: Route, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> list[ProbeResult]:
    """Probe every target (drained ones skipped, as the checker does) with the route's health check and record
    each verdict; ``NoHealthCheck`` for a route without one."""
    check = HealthCheck.from_config(route.health_check)
    if check is None:
        raise NoHealthCheck(route.name)
    results: list[ProbeResult] = []
    for target in _targets(route):
        if target.health == RouteTarget.Health.DRAINED:
            results.append(ProbeResult(target.pk, target.url, False, None, 0.0, skipped="drained"))
            continue
        status, ms, error = probe(target.url, path=check.path, timeout_s=check.timeout_s)
        ok = status is not None and 200 <= status < 400
        results.append(ProbeResult(target.pk, target.url, ok, status, ms, error))
    _audit("health_check", route, {"path": check.path, "results": [r.as_audit() for r in results]}, actor, ip_address)
    for result in results:
        if result.skipped:
            continue
        key = edge_breaker.route_target_key(result.target_id)
        before = edge_breaker.health_view(key)
        version = _verdict_share(key, result.ok)
        known = None if before == edge_breaker.UNKNOWN else before == edge_breaker.HEALTHY
        edge_health.health_changed(key, result.ok, version, before=known)
    return results


def route_connection_test(
    *, route: Route, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> tuple[str, list[ProbeResult]]:
    """Probe every target (drained ones too: an operator may test one before restoring it) without recording
    a verdict: the health check's path and timeout, else ``/`` (see the module docstring). (path, results)."""
    check = HealthCheck.from_config(route.health_check)
    if check is not None:
        path, timeout_s = check.path, check.timeout_s
    else:
        path, timeout_s = CONNECTION_TEST_PATH, min(float(route.timeout_s), CONNECTION_TEST_TIMEOUT_S)
    results: list[ProbeResult] = []
    for target in _targets(route):
        status, ms, error = probe(target.url, path=path, timeout_s=timeout_s)
        # With a health check its rule; without one, any HTTP answer shows the target is reachable.
        ok = status is not None and (200 <= status < 400 if check is not None else True)
        results.append(ProbeResult(target.pk, target.url, ok, status, ms, error))
    _audit("connection_test", route, {"path": path, "results": [r.as_audit() for r in results]}, actor, ip_address)
    return path, results


# --- the route page's panel ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteTraffic:
    """A route's calls in ``[start, end)`` from the ledger (by the route's name, as the ledger records it)."""

    start: datetime
    end: datetime
    calls: int
    errors: int  # status 400 and up
    refused: int  # answered 503 no_healthy_upstream: no target could take the call (breakers open, drained...)
    p50_ms: float | None
    p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


def route_traffic(*, route_name: str, now: datetime | None = None) -> RouteTraffic:
    """The last ``TRAFFIC_WINDOW`` of ``route_name``: two queries (the counts, the latency histogram)."""
    end = now or timezone.now()
    start = end - TRAFFIC_WINDOW
    rows = UsageRecord.objects.filter(route=route_name, started_at__gte=start, started_at__lt=end).order_by()
    counts = rows.aggregate(
        calls=Count("id"),
        errors=Count("id", filter=Q(status__gte=400)),
        refused=Count("id", filter=Q(error_code=REFUSED_ERROR_CODE)),
    )
    histogram = dict(rows.values("latency_bucket").annotate(n=Count("id")).values_list("latency_bucket", "n"))
    p50, p95 = percentiles(histogram, (0.5, 0.95))
    return RouteTraffic(
        start=start,
        end=end,
        calls=counts["calls"] or 0,
        errors=counts["errors"] or 0,
        refused=counts["refused"] or 0,
        p50_ms=p50,
        p95_ms=p95,
    )


def target_states(targets: Iterable[RouteTarget]) -> list[tuple[RouteTarget, str, edge_breaker.BreakerView]]:
    """Each target with its health verdict and breaker as this worker sees them (no I/O)."""
    return [
        (
            target,
            edge_breaker.health_view(edge_breaker.route_target_key(target.pk)),
            edge_breaker.breaker_view(edge_breaker.route_target_key(target.pk)),
        )
        for target in targets
    ]
