"""Admission: may this request go ahead now? Every rate limit, concurrency limit and budget that applies to it,
checked at once by the limiter (``proxy.edge.limits``: one Redis round trip, or none in-process).

What applies to a call, in the order a refusal names them:

- the key: ``rpm_limit`` (requests per rolling minute), ``tpm_limit`` (tokens per rolling minute),
  ``max_concurrency`` (calls in flight), ``budget_tokens`` / ``budget_cost`` per ``budget_period``;
- the key's owner: ``rpm_limit``, ``budget_cost`` per their ``budget_period`` (shared by all their keys);
- the model: ``rpm_limit`` / ``tpm_limit`` across all keys (the upstream account's own quota);
- a gateway route: ``rate_limit_rpm`` per key, per user (``jwt`` routes) or per client IP (``auth: none``).

Tokens and budgets are reserved before the call from an estimate (the body's bytes / 4 for the prompt, plus
``max_completion_tokens`` / ``max_tokens`` or the model's ``output_tokens_estimate``) and settled after it
with the real usage (``Admission.finish``, scheduled off the answer's path): the difference is refunded or
charged, and the concurrency slot released (a stream's when it ends or the client leaves). A TPM reservation
is capped at the limit itself, so one call larger than the whole limit still goes through alone.

A call with no limit at all costs one attribute check here: no limiter call, no round trip. The answer of a
limited call carries OpenAI's ``x-ratelimit-*`` headers (the tightest requests and tokens limits); a refusal is
a 429 with ``Retry-After`` and the code ``rate_limit_exceeded``, ``concurrency_limit_exceeded``,
``insufficient_quota`` (with ``x-should-retry: false``: retrying cannot help until the period rolls) or, when
the limiter's Redis is unreachable and ``RATE_LIMIT_FAIL_OPEN`` is off, ``rate_limiter_unavailable``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, cast

from django.conf import settings

from gateway_stats.usage import UsageEvent, usage_cost
from keys.periods import budget_period_bounds
from keys.policy import BudgetPeriod, KeyPolicy
from proxy.catalog import ModelTarget
from proxy.edge import limits
from proxy.edge.exchange import Header
from proxy.edge.limits import Decision, Limit
from proxy.errors import ProxyError
from proxy.metrics import RATELIMIT_REJECTIONS, RATELIMIT_UNAVAILABLE

WINDOW_S = 60.0
# A lease is renewed for at most this long: an answer whose end was never seen (a stream the server never
# started) cannot hold its slot for ever.
MAX_RENEWAL_S = 3600.0
_BYTES_PER_TOKEN = 4
# What each limit is called in metrics and messages, by the suffix of its key.
_NAMES = {"r": "requests per minute", "t": "tokens per minute", "c": "concurrent requests"}

# Settle tasks still running (the loop keeps only weak references to tasks).
_pending: set[asyncio.Task[None]] = set()


@dataclass(slots=True)
class Admission:
    """An allowed call's reservation: its answer headers, and what is settled when the answer ends."""

    decision: Decision
    labels: tuple[str, ...]
    headers: list[Header]
    # Limit key -> which usage settles it ("tokens" or "cost"); requests limits settle nothing.
    settles: dict[str, str]
    renewal: asyncio.TimerHandle | None = None
    finished: bool = False
    admitted_at: float = 0.0  # time.monotonic()

    def finish(self, event: UsageEvent) -> None:
        """Settle with the call's real usage, off the answer's path (once; later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        if self.renewal is not None:
            self.renewal.cancel()
        if not self.settles and self.decision.lease is None:
            return  # requests only: nothing to give back
        actual: dict[str, float] = {}
        for key, what in self.settles.items():
            actual[key] = float(event.total_tokens) if what == "tokens" else float(event.cost)
        backend = self.decision.backend
        if isinstance(backend, limits.InProcessLimiter):
            backend.settle_now(self.decision, actual, time.time())  # no I/O: no task needed
        else:
            _schedule(limits.settle(self.decision, actual))


def _schedule(work: Any) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _pending.add(task)
    task.add_done_callback(_pending.discard)


def _renew_later(admission: Admission) -> None:
    # A lease lives RATE_LIMIT_LEASE_TTL_S from its last renewal: a long call renews it at half that, so only a
    # dead worker's slots lapse.
    if admission.finished or time.monotonic() - admission.admitted_at > MAX_RENEWAL_S:
        return
    _schedule(limits.renew(admission.decision))
    loop = asyncio.get_running_loop()
    admission.renewal = loop.call_later(settings.RATE_LIMIT_LEASE_TTL_S / 2, _renew_later, admission)


def _budget(key: str, limit: float, amount: float, period: BudgetPeriod) -> Limit:
    start, end = budget_period_bounds(period)
    return Limit(key=key, kind="budget", limit=limit, amount=amount, window_s=end - start, period_end=end)


def _estimate(payload: dict[str, Any], body_bytes: int, target: ModelTarget, endpoint: str) -> tuple[int, int]:
    """(prompt, completion) tokens to reserve: what the call may use at most, as far as can be told cheaply."""
    prompt = max(1, body_bytes // _BYTES_PER_TOKEN)
    if endpoint == "embeddings":
        return prompt, 0
    for name in ("max_completion_tokens", "max_tokens"):
        given = payload.get(name)
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return prompt, given
    return prompt, target.output_tokens_estimate


def _key_limits(policy: KeyPolicy, out: list[Limit], labels: list[str], tokens: int, cost: float) -> None:
    k = policy.key_id
    if policy.rpm_limit is not None:
        out.append(Limit(f"k{k}:r", "requests", policy.rpm_limit, 1, WINDOW_S))
        labels.append("key_rpm")
    if policy.tpm_limit is not None and tokens:
        out.append(Limit(f"k{k}:t", "tokens", policy.tpm_limit, min(tokens, policy.tpm_limit), WINDOW_S))
        labels.append("key_tpm")
    if policy.max_concurrency is not None:
        out.append(Limit(f"k{k}:c", "concurrency", policy.max_concurrency, 1))
        labels.append("key_concurrency")
    if policy.budget_tokens is not None and tokens:
        out.append(_budget(f"k{k}:bt", policy.budget_tokens, tokens, policy.budget_period))
        labels.append("key_budget_tokens")
    if policy.budget_cost is not None and tokens:
        out.append(_budget(f"k{k}:bc", float(policy.budget_cost), cost, policy.budget_period))
        labels.append("key_budget_cost")
    u = policy.owner_id
    if policy.user_rpm_limit is not None:
        out.append(Limit(f"u{u}:r", "requests", policy.user_rpm_limit, 1, WINDOW_S))
        labels.append("user_rpm")
    if policy.user_budget_cost is not None and tokens:
        out.append(_budget(f"u{u}:bc", float(policy.user_budget_cost), cost, policy.user_budget_period))
        labels.append("user_budget_cost")


async def admit_call(
    policy: KeyPolicy, target: ModelTarget, payload: dict[str, Any], body_bytes: int, endpoint: str
) -> Admission | None:
    """Admit a call to a model, reserving on every limit of the key, its owner and the model; None when none
    applies. A refusal is a 429 ``ProxyError``."""
    if not policy.limited and target.rpm_limit is None and target.tpm_limit is None:
        return None
    prompt, completion = _estimate(payload, body_bytes, target, endpoint)
    tokens = prompt + completion
    cost = float(usage_cost(prompt, completion, target.input_price_per_1k, target.output_price_per_1k))
    out: list[Limit] = []
    labels: list[str] = []
    _key_limits(policy, out, labels, tokens, cost)
    if target.rpm_limit is not None:
        out.append(Limit(f"m:{target.name}:r", "requests", target.rpm_limit, 1, WINDOW_S))
        labels.append("model_rpm")
    if target.tpm_limit is not None:
        out.append(Limit(f"m:{target.name}:t", "tokens", target.tpm_limit, min(tokens, target.tpm_limit), WINDOW_S))
        labels.append("model_tpm")
    return await _admit(out, labels)


async def admit_listing(policy: KeyPolicy) -> Admission | None:
    """Admit a model listing: it counts against the key's and the owner's requests per minute only."""
    if policy.rpm_limit is None and policy.user_rpm_limit is None:
        return None
    out: list[Limit] = []
    labels: list[str] = []
    if policy.rpm_limit is not None:
        out.append(Limit(f"k{policy.key_id}:r", "requests", policy.rpm_limit, 1, WINDOW_S))
        labels.append("key_rpm")
    if policy.user_rpm_limit is not None:
        out.append(Limit(f"u{policy.owner_id}:r", "requests", policy.user_rpm_limit, 1, WINDOW_S))
        labels.append("user_rpm")
    return await _admit(out, labels)


async def admit_route(
    route_name: str, rate_limit_rpm: int | None, policy: KeyPolicy | None, user_id: int | None, client_ip: str | None
) -> Admission | None:
    """Admit a gateway call: the route's ``rate_limit_rpm`` per key / user / client IP, and, with a key, the
    key's and its owner's requests per minute and the key's concurrency (routes carry no tokens)."""
    out: list[Limit] = []
    labels: list[str] = []
    if policy is not None and policy.limited:
        _key_limits(policy, out, labels, 0, 0.0)
    if rate_limit_rpm is not None:
        if policy is not None:
            who = f"k{policy.key_id}"
        elif user_id is not None:
            who = f"u{user_id}"
        else:
            who = f"ip:{client_ip or '-'}"
        out.append(Limit(f"g:{route_name}:{who}:r", "requests", rate_limit_rpm, 1, WINDOW_S))
        labels.append("route_rpm")
    if not out:
        return None
    return await _admit(out, labels)


async def _admit(out: list[Limit], labels: list[str]) -> Admission | None:
    decision = await limits.admit(out)
    if decision.unavailable:
        if decision.fail_open:
            RATELIMIT_UNAVAILABLE.labels("open").inc()
            return None
        RATELIMIT_UNAVAILABLE.labels("closed").inc()
        retry = max(1, math.ceil(settings.RATE_LIMIT_REDIS_RETRY_S))
        raise ProxyError(
            429,
            "The rate limiter is unavailable; try again shortly.",
            code="rate_limiter_unavailable",
            headers=((b"retry-after", str(retry).encode()),),
        )
    headers = _headers(decision)
    if not decision.allowed:
        raise _refusal(decision, labels, headers)
    settles = {
        limit.key: ("cost" if label.endswith("cost") else "tokens")
        for limit, label in zip(out, labels, strict=True)
        if limit.kind in ("tokens", "budget")
    }
    admission = Admission(decision, tuple(labels), headers, settles, admitted_at=time.monotonic())
    if decision.lease is not None:
        loop = asyncio.get_running_loop()
        admission.renewal = loop.call_later(settings.RATE_LIMIT_LEASE_TTL_S / 2, _renew_later, admission)
    return admission


def _refusal(decision: Decision, labels: list[str], headers: list[Header]) -> ProxyError:
    refused = cast(Limit, decision.refused)  # a refused decision names its limit
    label = labels[decision.limits.index(refused)]
    RATELIMIT_REJECTIONS.labels(label).inc()
    retry = decision.retry_after_s
    whose = label.split("_", 1)[0]  # key, user, model, route
    extra: list[Header] = [(b"retry-after", str(retry).encode())]
    if refused.kind == "budget":
        what = "tokens" if label.endswith("tokens") else "cost"
        resets = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(refused.period_end or 0))
        message = (
            f"You exceeded the {whose}'s {what} budget ({_number(refused.limit)}); it resets at {resets}."
            if (refused.period_end or 0) < 4e9
            else f"You exceeded the {whose}'s {what} budget ({_number(refused.limit)})."
        )
        extra.append((b"x-should-retry", b"false"))
        return ProxyError(
            429,
            message,
            code="insufficient_quota",
            error_type="insufficient_quota",
            headers=(*extra, *headers),
        )
    name = _NAMES[refused.key[-1]]
    message = (
        f"Rate limit reached for {name} on the {whose}: limit {_number(refused.limit)}. Please try again in {retry}s."
    )
    code = "concurrency_limit_exceeded" if refused.kind == "concurrency" else "rate_limit_exceeded"
    return ProxyError(429, message, code=code, headers=(*extra, *headers))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _headers(decision: Decision) -> list[Header]:
    """OpenAI's x-ratelimit-* trios for the tightest requests limit and the tightest tokens limit."""
    headers: list[Header] = []
    for kind in ("requests", "tokens"):
        tightest: Limit | None = None
        for limit in decision.limits:
            if limit.kind == kind and (
                tightest is None or decision.remaining.get(limit.key, 0) < decision.remaining.get(tightest.key, 0)
            ):
                tightest = limit
        if tightest is None:
            continue
        name = kind.encode()
        headers.append((b"x-ratelimit-limit-" + name, _number(tightest.limit).encode()))
        headers.append((b"x-ratelimit-remaining-" + name, str(int(decision.remaining.get(tightest.key, 0))).encode()))
        headers.append((b"x-ratelimit-reset-" + name, duration(decision.reset_s.get(tightest.key, 0)).encode()))
    return headers


def duration(seconds: float) -> str:
    """A duration in OpenAI's header format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
