"""An upstream as operators run it from the admin: what its last day looked like, its deployments' breakers
and health checks right now, and the two operator actions (reset the breakers, test the connection).

Reads (selectors):

- ``upstreams_usage`` — calls, error rate and latency percentiles of every upstream over the last 24 hours,
  from the statistics selectors (``gateway_stats.stats.usage_time_series`` grouped by upstream, per hour:
  rollups plus the raw tail, a fixed handful of queries however many calls or upstreams there are). The range
  is whole UTC hours, so it reaches back to the start of the hour 24 hours ago (at most 25 hours).
- ``upstream_panel`` — that, plus every deployment of one upstream with its breaker and health as this worker
  sees them (``proxy.edge.breaker``; shared by every worker when Redis is configured) and the calls for its
  model that the proxy refused with every breaker open (ledger rows with ``BREAKER_OPEN_CODE``; the proxy names
  no upstream on those rows, so the count is per model, not per deployment).

Writes (services), each audited:

- ``upstream_breakers_reset`` — close every deployment's breaker of an upstream (``upstream.breaker_reset``).
- ``upstream_connection_test`` — ``GET {base_url}/models`` with the upstream's credentials, as the proxy sends
  them (``upstream.test_connection``). The answer names the status and the time, never the key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Count, Max

from gateway_stats.models import UsageRecord
from gateway_stats.rollups import HOUR
from gateway_stats.services import audit_record
from gateway_stats.stats import UsageFilter, UsageNumbers, usage_time_series
from proxy.edge.breaker import (
    BreakerPolicy,
    BreakerView,
    breaker_cooldown_s,
    breaker_reset,
    breaker_view,
    deployment_key,
    health_view,
)
from proxy.errors import secret_blank
from proxy.models import Deployment, Upstream

logger = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
# The error code of a call the proxy refused because every deployment's breaker (and its fallbacks') was open.
BREAKER_OPEN_CODE = "no_healthy_upstream"
# As proxy.services names an upstream in the audit trail.
AUDIT_OBJECT_TYPE = "proxy.upstream"
# A connection test never waits longer than this, whatever the upstream's own timeout.
TEST_TIMEOUT_CAP_S = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamUsage:
    """What an upstream's calls did over the window. Rates and percentiles are ``None`` without calls."""

    calls: int
    errors: int
    errors_5xx: int
    p50_ms: float | None
    p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None

    @property
    def error_rate_5xx(self) -> float | None:
        return self.errors_5xx / self.calls if self.calls else None


NO_USAGE = UpstreamUsage(calls=0, errors=0, errors_5xx=0, p50_ms=None, p95_ms=None)


@dataclass(frozen=True, slots=True)
class UsageWindow:
    start: datetime
    end: datetime
    by_upstream: dict[str, UpstreamUsage]

    def of(self, name: str) -> UpstreamUsage:
        return self.by_upstream.get(name, NO_USAGE)


@dataclass(frozen=True, slots=True)
class DeploymentOps:
    """One deployment now: its breaker and health check (this worker's view), and the calls for its model refused
    with every breaker open within the window. ``opened_at``: when its breaker last tripped, known only while
    it is open (an open breaker's end minus its cooldown); a closed breaker keeps no trip time."""

    deployment_id: int
    key: str
    model_id: int
    model: str
    upstream_model: str
    is_active: bool
    breaker: BreakerView
    health: str
    refused: int
    last_refused_at: datetime | None
    opened_at: datetime | None

    @property
    def open_until(self) -> datetime | None:
        return datetime.fromtimestamp(self.breaker.open_until, UTC) if self.breaker.open_until else None


@dataclass(frozen=True, slots=True)
class UpstreamPanel:
    start: datetime
    end: datetime
    usage: UpstreamUsage
    deployments: list[DeploymentOps]


@dataclass(frozen=True, slots=True)
class ConnectionTest:
    """A connection test's outcome: ``status`` and ``elapsed_ms`` when the upstream answered, else ``error``."""

    upstream: str
    url: str
    status: int | None = None
    elapsed_ms: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def message(self) -> str:
        if self.status is not None:
            verdict = "" if self.ok else " (not a 2xx)"
            return f"{self.upstream}: GET {self.url} answered {self.status}{verdict} in {self.elapsed_ms:.0f} ms."
        if not self.url:
            return f"{self.upstream}: not tested, {self.error}"
        return f"{self.upstream}: GET {self.url} failed: {self.error}"


# --- selectors -------------------------------------------------------------------------------------------


def _usage(numbers: UsageNumbers) -> UpstreamUsage:
    p50, p95, _ = numbers.latency_percentiles()
    return UpstreamUsage(
        calls=numbers.requests, errors=numbers.errors, errors_5xx=numbers.errors_5xx, p50_ms=p50, p95_ms=p95
    )


def upstreams_usage(*, now: datetime | None = None) -> UsageWindow:
    """Every upstream's numbers over the last 24 hours (whole hours), by upstream name."""
    now = now or datetime.now(UTC)
    series = usage_time_series(
        start=now - WINDOW, end=now, interval=HOUR, group_by="upstream", flt=UsageFilter(scope_user_id=None)
    )
    by_upstream: dict[str, UpstreamUsage] = {}
    for one in series.series:
        if not one.group:
            continue  # calls refused before an upstream was picked
        total = UsageNumbers()
        for _, numbers in one.points:
            total.add(numbers)  # adds the latency histograms too: the percentiles are the calls' own
        by_upstream[one.group] = _usage(total)
    return UsageWindow(start=series.start, end=series.end, by_upstream=by_upstream)


def _opened_at(view: BreakerView, upstream: Upstream) -> datetime | None:
    """When an open breaker tripped: its end minus the cooldown it got (the breaker's own rule: the upstream's
    cooldown as set now, doubled for each trip in a row, capped)."""
    if view.state != "open" or not view.open_until:
        return None
    cooldown = breaker_cooldown_s(BreakerPolicy(cooldown_s=upstream.breaker_cooldown_s), view.trips)
    return datetime.fromtimestamp(view.open_until - cooldown, UTC)


def upstream_panel(*, upstream: Upstream, now: datetime | None = None) -> UpstreamPanel:
    """``upstream``'s last day and its deployments now (a fixed number of queries)."""
    now = now or datetime.now(UTC)
    window = upstreams_usage(now=now)
    deployments = list(
        Deployment.objects.filter(upstream=upstream).select_related("model").order_by("model__name", "pk")
    )
    refused = (
        {
            row["model"]: row
            for row in UsageRecord.objects.filter(
                started_at__gte=window.start,  # the same whole hours as the usage numbers
                started_at__lt=window.end,
                error_code=BREAKER_OPEN_CODE,
                model__in={d.model.name for d in deployments},
            )
            .order_by()
            .values("model")
            .annotate(count=Count("id"), last=Max("started_at"))
        }
        if deployments
        else {}
    )
    rows = []
    for deployment in deployments:
        key = deployment_key(deployment.pk)
        view = breaker_view(key)
        refusals = refused.get(deployment.model.name, {})
        rows.append(
            DeploymentOps(
                deployment_id=deployment.pk,
                key=key,
                model_id=deployment.model_id,
                model=deployment.model.name,
                upstream_model=deployment.upstream_model,
                is_active=deployment.is_active,
                breaker=view,
                health=health_view(key),
                refused=int(refusals.get("count", 0)),
                last_refused_at=refusals.get("last"),
                opened_at=_opened_at(view, upstream),
            )
        )
    return UpstreamPanel(start=window.start, end=window.end, usage=window.of(upstream.name), deployments=rows)


def breakers_summary(deployment_ids: Iterable[int]) -> str:
    """The breakers of these deployments in a few words: "all closed", "1 open", "2 open, 1 half-open"."""
    states = [breaker_view(deployment_key(pk)).state for pk in deployment_ids]
    if not states:
        return "no deployments"
    opened, half = states.count("open"), states.count("half_open")
    if not opened and not half:
        return "all closed"
    parts = [f"{opened} open"] if opened else []
    if half:
        parts.append(f"{half} half-open")
    return ", ".join(parts)


# --- services --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakersReset:
    """A reset's outcome: how many deployments' breakers were reset, and how many were not closed before."""

    deployments: int
    not_closed: int

    @property
    def message(self) -> str:
        return f"{self.deployments} breaker(s) reset, {self.not_closed} of them open or half-open before."


def upstream_breakers_reset(
    *, upstream: Upstream, actor: AbstractBaseUser | None, ip_address: str | None
) -> BreakersReset:
    """Close the breaker (and forget the health verdict) of every deployment of ``upstream``, on every worker
    (``breaker_reset``). Audited, with the keys that were open or half-open."""
    keys = [deployment_key(pk) for pk in Deployment.objects.filter(upstream=upstream).values_list("pk", flat=True)]
    not_closed = [key for key in keys if breaker_view(key).state != "closed"]
    for key in keys:
        breaker_reset(key)
    audit_record(
        actor=actor,
        action="upstream.breaker_reset",
        object_type=AUDIT_OBJECT_TYPE,
        object_id=upstream.pk,
        object_repr=str(upstream),
        changes={"deployments": len(keys), "not_closed": not_closed},
        ip_address=ip_address,
    )
    return BreakersReset(deployments=len(keys), not_closed=len(not_closed))


def _models_url(base_url: str) -> str:
    """``{base_url}/models``, keeping a query string (e.g. Azure's ``api-version``), as the proxy builds URLs."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/models", parts.query, ""))


def _shown_url(url: str) -> str:
    """``url`` as messages and the audit trail show it: no user info, no query string (either may hold a
    credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:  # a malformed port: the request fails on it too, and says so
        port = None
    if port:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _headers(upstream: Upstream, api_key: str) -> dict[str, str]:
    # As proxy.catalog sends them: the extra headers, then the key as a Bearer token.
    headers = {str(name): str(value) for name, value in (upstream.extra_headers or {}).items()}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def _failure_text(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s ({type(exc).__name__})."
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect ({exc or type(exc).__name__})."
    return f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__}."


def _probe(upstream: Upstream) -> ConnectionTest:
    if upstream.kind == Upstream.Kind.MOCK:
        return ConnectionTest(upstream=upstream.name, url="", error="a mock upstream answers locally.")
    if not upstream.base_url:
        return ConnectionTest(upstream=upstream.name, url="", error="it has no base URL.")
    url = _models_url(upstream.base_url)
    shown = _shown_url(url)
    api_key = upstream.api_key
    timeout_s = min(upstream.timeout_s, TEST_TIMEOUT_CAP_S)
    started = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.get(url, headers=_headers(upstream, api_key))
    except Exception as exc:  # noqa: BLE001 - any failure (DNS, TLS, refused, a bad header value) is the answer
        error = secret_blank(_failure_text(exc, timeout_s), api_key)
        return ConnectionTest(upstream=upstream.name, url=shown, error=error)
    return ConnectionTest(
        upstream=upstream.name,
        url=shown,
        status=response.status_code,
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )


def upstream_connection_test(
    *, upstream: Upstream, actor: AbstractBaseUser | None, ip_address: str | None
) -> ConnectionTest:
    """``GET {base_url}/models`` with ``upstream``'s credentials (the timeout: its own, at most 10 s). Never raises
    for the upstream's failure: the outcome says what happened. Audited (status, time or error; never the key)."""
    result = _probe(upstream)
    logger.info("connection test of upstream %s: %s", upstream.name, result.status or result.error)
    audit_record(
        actor=actor,
        action="upstream.test_connection",
        object_type=AUDIT_OBJECT_TYPE,
        object_id=upstream.pk,
        object_repr=str(upstream),
        changes={
            "url": result.url,
            "status": result.status,
            "elapsed_ms": None if result.elapsed_ms is None else round(result.elapsed_ms, 1),
            "error": result.error,
        },
        ip_address=ip_address,
    )
    return result
