"""The admin dashboard's usage part: the period's cards (each with its change against the previous period),
the charts' data (Chart.js, drawn by Unfold's chart script), the top keys by spend, and the ingestion state.

Every number comes from the statistics selectors (``gateway_stats.stats``), the ones ``/api/stats/*`` answer
with, over the same ranges: three selector calls per page (the period's summary ranked by cost, the previous
period's summary, the period's time series), each a fixed number of queries on the rollups and the raw tail,
however many calls the ledger holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.urls import reverse

from gateway_stats.metrics import ingestion_lag_latest
from gateway_stats.rollups import DAY, HOUR, MINUTE, STEPS
from gateway_stats.stats import UsageFilter, UsageNumbers, UsageSummary, usage_summary, usage_time_series
from gateway_stats.transport import ledger_transport
from gateway_stats.usage import emitter

# Keys (by spend) and models (by cost) shown.
TOP = 10
# Chart colours: Unfold's theme variables (its chart script resolves them) and a red for errors.
_PRIMARY, _PRIMARY_LIGHT, _RED = "var(--color-primary-600)", "var(--color-primary-300)", "#dc2626"


@dataclass(frozen=True, slots=True)
class Period:
    """A dashboard period: the last ``span`` up to now, drawn per ``interval`` bucket."""

    name: str
    label: str
    span: timedelta
    interval: str
    tick_format: str


PERIODS: dict[str, Period] = {
    period.name: period
    for period in (
        Period("hour", "hour", timedelta(hours=1), MINUTE, "%H:%M"),
        Period("day", "day", timedelta(days=1), HOUR, "%H:00"),
        Period("30d", "30 days", timedelta(days=30), DAY, "%m-%d"),
    )
}
DEFAULT_PERIOD = "day"


@dataclass(frozen=True, slots=True)
class Card:
    """One headline number: ``value`` is the raw figure (what ``/api/stats/summary`` says), ``text`` its display.
    ``trend`` is "up", "down" or "flat"; ``tone`` is "good", "bad" or "neutral" news (more errors are bad, more
    requests just more)."""

    name: str
    title: str
    value: str
    text: str
    change: str
    trend: str
    tone: str


@dataclass(frozen=True, slots=True)
class Chart:
    """A chart for Unfold's chart script: ``data`` is Chart.js ``data`` as JSON (``labels``, ``datasets``);
    ``legend`` the datasets' (label, colour), shown under it (Unfold's chart options hide Chart.js's own)."""

    name: str
    title: str
    type: str
    data: str
    legend: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class TopKey:
    key_id: str | None
    label: str
    requests: int
    tokens: int
    cost: Decimal
    link: str | None

    @property
    def cost_text(self) -> str:
        return money_text(self.cost)


@dataclass(frozen=True, slots=True)
class DashboardUsage:
    period: Period
    start: datetime
    end: datetime
    has_traffic: bool
    cards: list[Card]
    charts: list[Chart]
    top_keys: list[TopKey]


@dataclass(frozen=True, slots=True)
class IngestionState:
    """How far behind the ledger is: the latest committed batch's lag and age (``None`` when no consumer
    has committed one), and what waits in this process (usage events queued, bytes in the spool)."""

    lag_s: float | None
    committed_ago_s: float | None
    queued_events: int
    spool_bytes: int


def period_get(name: str | None) -> Period:
    """The period called ``name``; the default one for a missing or unknown name."""
    return PERIODS.get(name or "", PERIODS[DEFAULT_PERIOD])


# --- cards -----------------------------------------------------------------------------------------------


def _error_rate(numbers: UsageNumbers) -> float | None:
    return numbers.errors / numbers.requests if numbers.requests else None


def _p95(numbers: UsageNumbers) -> float | None:
    return numbers.latency_percentiles()[1]


def _change(current: float | None, previous: float | None, period: Period, *, points: bool = False) -> str:
    """``current`` against ``previous`` in words: "+12% vs previous hour" (percentage points for rates)."""
    versus = f"vs previous {period.label}"
    if current is None and previous is None:
        return f"no calls, as in the previous {period.label}"
    if previous is None:
        return f"none in the previous {period.label}"
    if current is None:
        return f"no calls in this {period.label}, some in the previous one"
    if points:
        return f"{(current - previous) * 100:+.1f} pts {versus}"
    if previous == 0:
        return f"no change {versus}" if current == 0 else f"none in the previous {period.label}"
    return f"{(current - previous) / previous * 100:+.0f}% {versus}"


def _trend(current: float | None, previous: float | None) -> str:
    if current is None or previous is None or current == previous:
        return "flat"
    return "up" if current > previous else "down"


def _card(
    name: str,
    title: str,
    values: tuple[Any, Any],
    text: str,
    period: Period,
    *,
    up_is_bad: bool | None,
    points: bool = False,
) -> Card:
    """``up_is_bad``: whether a rise is bad news (``None``: neither good nor bad)."""
    now, before = (None if value is None else float(value) for value in values)
    trend = _trend(now, before)
    return Card(
        name=name,
        title=title,
        value="" if values[0] is None else str(values[0]),
        text=text,
        change=_change(now, before, period, points=points),
        trend=trend,
        tone="neutral" if up_is_bad is None or trend == "flat" else "bad" if (trend == "up") == up_is_bad else "good",
    )


def money_text(value: Decimal) -> str:
    """A cost readable at a glance: four decimals, more for a small but nonzero cost (never "0.0000")."""
    return f"{value:,.4f}" if value == 0 or value >= Decimal("0.01") else f"{value:.6f}".rstrip("0")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.2f} ms"


def _cards(current: UsageNumbers, previous: UsageNumbers, period: Period) -> list[Card]:
    rate, p95 = _error_rate(current), _p95(current)
    return [
        _card(
            "requests",
            "Requests",
            (current.requests, previous.requests),
            f"{current.requests:,}",
            period,
            up_is_bad=None,
        ),
        _card(
            "error_rate",
            "Error rate",
            (rate, _error_rate(previous)),
            "–" if rate is None else f"{rate:.1%}",
            period,
            up_is_bad=True,
            points=True,
        ),
        _card(
            "tokens",
            "Tokens",
            (current.total_tokens, previous.total_tokens),
            f"{current.total_tokens:,}",
            period,
            up_is_bad=None,
        ),
        _card("cost", "Cost", (current.cost, previous.cost), money_text(current.cost), period, up_is_bad=None),
        _card("latency_p95", "Latency p95", (p95, _p95(previous)), _ms(p95), period, up_is_bad=True),
    ]


# --- charts ----------------------------------------------------------------------------------------------


def _chart(name: str, title: str, kind: str, labels: list[str], datasets: list[dict[str, Any]]) -> Chart:
    data = json.dumps({"labels": labels, "datasets": datasets})
    legend = tuple((dataset["label"], dataset["borderColor"]) for dataset in datasets)
    return Chart(name=name, title=title, type=kind, data=data, legend=legend)


def _dataset(label: str, data: list[Any], color: str, **extra: Any) -> dict[str, Any]:
    return {"label": label, "data": data, "borderColor": color, "backgroundColor": color, **extra}


def _buckets(start: datetime, end: datetime, interval: str) -> list[datetime]:
    step = STEPS[interval]
    return [start + step * index for index in range((end - start) // step)]


def _time_charts(start: datetime, end: datetime, period: Period, points: dict[datetime, UsageNumbers]) -> list[Chart]:
    """Requests and errors, and latency percentiles, per bucket of the period (buckets without calls: 0 calls,
    no latency)."""
    buckets = _buckets(start, end, period.interval)
    labels = [bucket.strftime(period.tick_format) for bucket in buckets]
    empty = UsageNumbers()
    numbers = [points.get(bucket, empty) for bucket in buckets]
    latencies = [one.latency_percentiles() for one in numbers]
    axis = {"displayYAxis": True}
    requests = [
        _dataset("Requests", [one.requests for one in numbers], _PRIMARY, **axis),
        _dataset("Errors", [one.errors for one in numbers], _RED),
    ]
    # A dot on every bucket with calls: Unfold's lines draw no points, so a bucket between two without calls
    # (no latency) was drawn as nothing at all, and a day with calls in one hour showed an empty chart.
    dots = {"pointStyle": "circle", "pointRadius": 3}
    latency = [
        _dataset("p50", [values[0] for values in latencies], _PRIMARY_LIGHT, **axis, **dots),
        _dataset("p95", [values[1] for values in latencies], _PRIMARY, **dots),
        _dataset("p99", [values[2] for values in latencies], _RED, **dots),
    ]
    return [
        _chart("requests", "Requests and errors", "line", labels, requests),
        _chart("latency", "Latency percentiles (ms)", "line", labels, latency),
    ]


def _model_charts(summary: UsageSummary) -> list[Chart]:
    """Tokens and cost of the period's top models by cost ("(no model)": gateway route calls, and calls refused
    before a model was known). One dataset each: Unfold's bars overlap rather than stack."""
    # An entry with neither tokens nor cost (calls refused before a model was known) would be an empty bar.
    models = [entry for entry in summary.top_models if entry.numbers.total_tokens or entry.numbers.cost]
    labels = [entry.label or "(no model)" for entry in models]
    axis = {"displayYAxis": True, "maxBarThickness": 24}
    tokens = [entry.numbers.total_tokens for entry in models]
    cost = [float(entry.numbers.cost) for entry in models]
    return [
        _chart("tokens-by-model", "Tokens by model", "bar", labels, [_dataset("Tokens", tokens, _PRIMARY, **axis)]),
        _chart("cost-by-model", "Cost by model", "bar", labels, [_dataset("Cost", cost, _PRIMARY, **axis)]),
    ]


def _top_keys(summary: UsageSummary) -> list[TopKey]:
    return [
        TopKey(
            key_id=entry.group,
            label=entry.label or ("(no key)" if entry.group is None else f"key {entry.group}"),
            requests=entry.numbers.requests,
            tokens=entry.numbers.total_tokens,
            cost=entry.numbers.cost,
            link=None if entry.group is None else reverse("admin:keys_apikey_change", args=[entry.group]),
        )
        for entry in summary.top_keys
    ]


# --- selectors -------------------------------------------------------------------------------------------


def dashboard_usage(*, period: Period, now: datetime, flt: UsageFilter) -> DashboardUsage:
    """The dashboard's usage numbers for the ``period`` up to ``now`` (the calls ``flt`` lets the viewer see)."""
    start = now - period.span
    current = usage_summary(start=start, end=now, flt=flt, top_by="cost", top=TOP)
    previous = usage_summary(start=start - period.span, end=start, flt=flt, top=1)
    series = usage_time_series(start=start, end=now, interval=period.interval, group_by=None, flt=flt)
    points = dict(series.series[0].points) if series.series else {}
    return DashboardUsage(
        period=period,
        start=current.start,
        end=current.end,
        has_traffic=current.totals.requests > 0,
        cards=_cards(current.totals, previous.totals, period),
        charts=[*_time_charts(series.start, series.end, period, points), *_model_charts(current)],
        top_keys=_top_keys(current),
    )


def key_usage_charts(*, key_id: int, now: datetime) -> tuple[bool, list[Chart]]:
    """One key's last 30 days, per day: requests and errors, and tokens and cost (the key's admin page). Also
    whether it had any call in that time."""
    period = PERIODS["30d"]
    series = usage_time_series(
        start=now - period.span,
        end=now,
        interval=period.interval,
        group_by=None,
        flt=UsageFilter(scope_user_id=None, key_id=key_id),
    )
    points = dict(series.series[0].points) if series.series else {}
    buckets = _buckets(series.start, series.end, period.interval)
    labels = [bucket.strftime(period.tick_format) for bucket in buckets]
    empty = UsageNumbers()
    numbers = [points.get(bucket, empty) for bucket in buckets]
    axis = {"displayYAxis": True}
    requests = [
        _dataset("Requests", [one.requests for one in numbers], _PRIMARY, **axis),
        _dataset("Errors", [one.errors for one in numbers], _RED),
    ]
    bars = {**axis, "maxBarThickness": 16}
    tokens = [_dataset("Tokens", [one.total_tokens for one in numbers], _PRIMARY, **bars)]
    cost = [_dataset("Cost", [float(one.cost) for one in numbers], _PRIMARY, **bars)]
    charts = [
        _chart("key-requests", "Requests and errors per day", "line", labels, requests),
        _chart("key-tokens", "Tokens per day", "bar", labels, tokens),
        _chart("key-cost", "Cost per day", "bar", labels, cost),
    ]
    return bool(points), charts


def ingestion_state() -> IngestionState:
    """The ledger's ingestion lag (the latest batch any consumer committed) and this process's backlog."""
    latest = ingestion_lag_latest()
    return IngestionState(
        lag_s=None if latest is None else latest["lag_s"],
        committed_ago_s=None if latest is None else max(0.0, time.time() - latest["at"]),
        queued_events=emitter.queue_depth(),
        spool_bytes=ledger_transport.spool.size_bytes(),
    )
