"""The limiter engine (issue 12): every rate limit, concurrency limit and budget of a request, checked at once.

Not wired into the request path yet. ``admit(limits)`` checks ALL the limits of one request atomically and
all-or-nothing: if one refuses, nothing is reserved for the others. Kinds:

- ``requests`` / ``tokens``: a sliding window of ``window_s`` seconds kept as 1-second buckets (exact counts,
  no 2x burst at a minute boundary). Granularity: a unit reserved at t counts until the bucket
  ``floor(t)`` is more than ``window_s`` seconds old: never earlier than a true rolling window would free it,
  at most 1 s later (reserved at 59.0 or 59.9, freed at 120.0 for a 60 s window).
- ``concurrency``: leases. A sorted set of lease ids scored by expiry (now + ``RATE_LIMIT_LEASE_TTL_S``);
  expired ones are purged on every check, so a crashed worker's slots come back by themselves.
  ``release(decision)`` frees them, ``renew(decision)`` extends them (long streams).
- ``budget``: a counter per period (``period_end`` epoch seconds; the counter's key carries the period
  start, ``period_end - window_s``); admits while spent (reservations included) < limit, so a nearly spent
  budget still serves one call, and refuses once it is reached. Each admitted call reserves ``amount`` (its
  estimate), which calls at the same time see: however many arrive at once, the overshoot stays below one
  call's reservation, plus whatever calls use beyond their reservation (none when the estimate holds).

``settle(decision, actual)`` reconciles a reservation with the real usage: it refunds or charges the
difference on token and budget limits (``actual`` maps a limit's key to what was really used) and releases
the concurrency slots. Callers schedule it off the response path (``asyncio.create_task(settle(...))``) so
it never delays anyone; the function itself is exact.

Backends, chosen by ``settings.REDIS_URL``: in-process (dicts; exact within one process: the embedded
default) and Redis (exact across processes): ONE round trip per admit, a Lua script (``_ADMIT_LUA``, its
semantics documented beside it) sent with EVALSHA, the script loaded again when Redis answers NOSCRIPT. The
admits (and the settles) of one event-loop iteration share that round trip: they go as one pipeline, each its
own atomic script, so a busy worker wakes Redis once per batch rather than once per call. Keys are
``{CACHE_KEY_PREFIX}:lim:<limit key>`` and every one carries a
TTL, so nothing accumulates. Clocks: the caller's ``now`` (time.time()) is used, so workers must have
synchronised clocks (NTP); it also makes the windows testable.

Redis down: a local breaker. After a failure (socket timeouts are ``RATE_LIMIT_REDIS_TIMEOUT_S``, connecting
at least 0.5 s, no client retries) Redis is not asked for ``RATE_LIMIT_REDIS_RETRY_S``: ``admit`` answers
``unavailable=True`` at once and the caller decides with ``decision.proceed`` (allowed, or unavailable and
``RATE_LIMIT_FAIL_OPEN``). The outage is logged at WARNING at most once per interval, never ERROR; limits are
exact again as soon as Redis answers. A timeout is wall time, the event loop's own delays included, so it must
stay well above a worker's ordinary pauses (0.5 s by default; at 50 ms a 120 ms pause of a healthy worker read
as an outage). Concurrency leases an admit may have taken although its answer was lost are released when Redis
answers again.

Why not the ``limits`` library: it checks one limit per call (``hit(item, *identifiers)``), so several limits
at once, all-or-nothing, in one round trip is out of reach with it; it has no leases or budgets either.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

from django.conf import settings

logger = logging.getLogger(__name__)

Kind = Literal["requests", "tokens", "concurrency", "budget"]
_WINDOW_KINDS = ("requests", "tokens")


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of a request: ``key`` names the counter (e.g. ``k:12:rpm``), ``amount`` is what this request
    reserves (1 request, estimated tokens, estimated cost, 1 concurrency slot)."""

    key: str
    kind: Kind
    limit: float
    amount: float = 1
    window_s: float = 60.0  # windows: their length; budgets: the period's length; concurrency: ignored
    period_end: float | None = None  # budgets only: epoch seconds when the period ends

    def counter_key(self) -> str:
        if self.kind == "budget":
            if self.period_end is None:
                raise ValueError(f"budget limit {self.key!r} needs period_end")
            return f"{self.key}:{int(self.period_end - self.window_s)}"
        return self.key


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``admit`` answered. ``remaining`` and ``reset_s`` are per limit key (for x-ratelimit headers)."""

    allowed: bool
    refused: Limit | None = None
    retry_after_s: int = 0
    remaining: Mapping[str, float] = field(default_factory=dict)
    reset_s: Mapping[str, int] = field(default_factory=dict)
    lease: str | None = None
    unavailable: bool = False
    limits: tuple[Limit, ...] = ()
    now: float = 0.0
    backend: Limiter | None = field(default=None, repr=False, compare=False)

    @property
    def proceed(self) -> bool:
        """Whether the caller goes on: allowed, or the limiter was unavailable and RATE_LIMIT_FAIL_OPEN is on."""
        return self.allowed or (self.unavailable and bool(settings.RATE_LIMIT_FAIL_OPEN))

    @property
    def fail_open(self) -> bool:
        """The limiter could not be asked and the configuration says let the request through."""
        return self.unavailable and bool(settings.RATE_LIMIT_FAIL_OPEN)


class Limiter(Protocol):
    async def admit(self, limits: Sequence[Limit], now: float) -> Decision: ...
    async def settle(self, decision: Decision, actual: Mapping[str, float], now: float) -> None: ...
    async def renew(self, decision: Decision, now: float) -> None: ...


def _lease_members(lease: str, amount: float) -> list[str]:
    return [f"{lease}:{i}" for i in range(max(1, math.ceil(amount)))]


def _decision(
    limits: Sequence[Limit],
    now: float,
    used: Sequence[float],
    resets: Sequence[float],
    refused_index: int,
    retry: float,
    lease: str | None,
    backend: Limiter,
) -> Decision:
    allowed = refused_index < 0
    remaining: dict[str, float] = {}
    reset_s: dict[str, int] = {}
    for limit, u, reset in zip(limits, used, resets, strict=True):
        left = limit.limit - u - (limit.amount if allowed else 0)
        remaining[limit.key] = max(0, left)
        if allowed and limit.kind in _WINDOW_KINDS and u <= 0:
            reset = math.floor(now) + limit.window_s + 1 - now  # this request's own bucket is the oldest
        reset_s[limit.key] = max(0, math.ceil(reset))
    return Decision(
        allowed=allowed,
        refused=None if allowed else limits[refused_index],
        retry_after_s=0 if allowed else max(1, math.ceil(retry)),
        remaining=remaining,
        reset_s=reset_s,
        lease=lease if allowed else None,
        limits=tuple(limits),
        now=now,
        backend=backend,
    )


def _lease_for(limits: Sequence[Limit]) -> str | None:
    return secrets.token_hex(8) if any(limit.kind == "concurrency" for limit in limits) else None


class InProcessLimiter:
    """Exact within one process (the embedded default). A lock, not the event loop, keeps it atomic: several
    loops (threads) may share it; nothing inside the lock waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, dict[int, float]] = {}
        self._window_s: dict[str, float] = {}  # each window's length, for the sweep
        # Per window: its buckets' sum and its oldest bucket, so an admit neither sums nor scans the buckets
        # (they are purged when the oldest leaves the window: at most once a second per window).
        self._totals: dict[str, float] = {}
        self._oldest: dict[str, int] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._budgets: dict[str, tuple[float, float]] = {}  # counter key -> (spent, period_end)
        self._checks = 0

    def forget(self) -> None:
        with self._lock:
            self._windows.clear()
            self._window_s.clear()
            self._totals.clear()
            self._oldest.clear()
            self._leases.clear()
            self._budgets.clear()

    def _sweep(self, now: float) -> None:
        # Nothing accumulates: windows left empty, leases all expired and budgets of past periods go.
        sec = math.floor(now)
        for key in [k for k, b in self._windows.items() if not b or max(b) < sec - self._window_s.get(k, 0)]:
            del self._windows[key]
            self._window_s.pop(key, None)
            self._totals.pop(key, None)
            self._oldest.pop(key, None)
        for key in [k for k, members in self._leases.items() if all(exp <= now for exp in members.values())]:
            del self._leases[key]
        for key in [k for k, (_, end) in self._budgets.items() if end < now]:
            del self._budgets[key]

    async def admit(self, limits: Sequence[Limit], now: float) -> Decision:
        sec = math.floor(now)
        lease = _lease_for(limits)
        used: list[float] = []
        resets: list[float] = []
        refused, retry = -1, 0.0
        with self._lock:
            self._checks += 1
            if self._checks % 1000 == 0:
                self._sweep(now)
            for i, limit in enumerate(limits):
                key = limit.counter_key()
                u, reset = 0.0, 0.0
                if limit.kind in _WINDOW_KINDS:
                    first = sec - int(limit.window_s)
                    buckets = self._windows.get(key)
                    if buckets is None:
                        buckets = self._windows[key] = {}
                        self._window_s[key] = limit.window_s
                        self._totals[key] = 0.0
                    oldest = self._oldest.get(key)
                    if oldest is not None and oldest < first:
                        for s in [s for s in buckets if s < first]:
                            del buckets[s]
                        self._totals[key] = sum(buckets.values())
                        oldest = min(buckets) if buckets else None
                        if oldest is None:
                            del self._oldest[key]
                        else:
                            self._oldest[key] = oldest
                    u = self._totals[key]
                    if oldest is not None:
                        reset = oldest + limit.window_s + 1 - now
                    if refused < 0 and u + limit.amount > limit.limit:
                        refused, retry = i, limit.window_s
                        freed = 0.0
                        ordered = sorted(buckets.items())
                        for s, c in ordered if limit.amount <= limit.limit else ():
                            freed += c
                            if u - freed + limit.amount <= limit.limit:
                                retry = s + limit.window_s + 1 - now
                                break
                elif limit.kind == "concurrency":
                    members = self._leases.setdefault(key, {})
                    for m in [m for m, exp in members.items() if exp <= now]:
                        del members[m]
                    u = len(members)
                    if members:
                        reset = min(members.values()) - now
                    if refused < 0 and u + limit.amount > limit.limit:
                        refused, retry = i, 1
                else:
                    end = limit.period_end or now
                    u = self._budgets.get(key, (0.0, end))[0]
                    reset = end - now
                    if refused < 0 and u >= limit.limit:
                        refused, retry = i, end - now
                used.append(u)
                resets.append(reset)
            if refused < 0:
                expiry = now + settings.RATE_LIMIT_LEASE_TTL_S
                for limit in limits:
                    key = limit.counter_key()
                    if limit.kind in _WINDOW_KINDS:
                        buckets = self._windows[key]
                        buckets[sec] = buckets.get(sec, 0) + limit.amount
                        self._totals[key] += limit.amount
                        oldest = self._oldest.get(key)
                        if oldest is None or sec < oldest:
                            self._oldest[key] = sec
                    elif limit.kind == "concurrency":
                        for m in _lease_members(lease or "", limit.amount):
                            self._leases[key][m] = expiry
                    else:
                        spent, _ = self._budgets.get(key, (0.0, 0.0))
                        self._budgets[key] = (spent + limit.amount, limit.period_end or now)
        return _decision(limits, now, used, resets, refused, retry, lease, self)

    async def settle(self, decision: Decision, actual: Mapping[str, float], now: float) -> None:
        self.settle_now(decision, actual, now)

    def settle_now(self, decision: Decision, actual: Mapping[str, float], now: float) -> None:
        """``settle``, without a coroutine: nothing here waits (the admit stage calls it directly)."""
        sec = math.floor(decision.now)
        with self._lock:
            for limit in decision.limits:
                key = limit.counter_key()
                if limit.kind == "concurrency":
                    members = self._leases.get(key, {})
                    for m in _lease_members(decision.lease or "", limit.amount):
                        members.pop(m, None)
                    continue
                if limit.key not in actual or limit.kind == "requests":
                    continue
                delta = actual[limit.key] - limit.amount
                if limit.kind == "tokens":
                    buckets = self._windows.get(key, {})
                    if sec in buckets and sec >= math.floor(now) - limit.window_s:
                        settled = max(0.0, buckets[sec] + delta)
                        self._totals[key] += settled - buckets[sec]
                        buckets[sec] = settled
                elif key in self._budgets:
                    spent, end = self._budgets[key]
                    self._budgets[key] = (max(0.0, spent + delta), end)

    async def renew(self, decision: Decision, now: float) -> None:
        expiry = now + settings.RATE_LIMIT_LEASE_TTL_S
        with self._lock:
            for limit in decision.limits:
                if limit.kind == "concurrency":
                    members = self._leases.get(limit.counter_key(), {})
                    for m in _lease_members(decision.lease or "", limit.amount):
                        if m in members:
                            members[m] = expiry

    # Budget counters read and raised directly (proxy.limit_reconcile rebuilds them from the ledger).

    async def budget_counters_get(self, keys: Sequence[str]) -> BudgetCounters:
        with self._lock:
            return BudgetCounters({key: self._budgets[key][0] if key in self._budgets else None for key in keys})

    async def budget_counters_raise(self, targets: Sequence[tuple[Limit, float]], now: float) -> BudgetCounters:
        previous: dict[str, float | None] = {}
        with self._lock:
            for limit, value in targets:
                key = limit.counter_key()
                found = self._budgets.get(key)
                previous[key] = None if found is None else found[0]
                if found is None or found[0] < value:
                    self._budgets[key] = (value, limit.period_end or now)
        return BudgetCounters(previous)

    async def budget_counter_set(self, limit: Limit, value: float, now: float) -> bool:
        with self._lock:
            self._budgets[limit.counter_key()] = (value, limit.period_end or now)
        return True


# The admit script. KEYS[i]: limit i's counter. ARGV[1] now (epoch s, float), ARGV[2] lease id, ARGV[3] lease
# TTL (s), then 5 per limit: kind (w window | c concurrency | b budget), limit, amount, window (s; budgets: the
# seconds left in the period), key TTL (s).
# Phase 1 reads (and purges) every counter: a window's hash holds one field per 1-second bucket, fields of
# seconds before floor(now) - window are deleted; a concurrency sorted set loses leases scored (expiry) <= now;
# a budget is a float string. The first window or concurrency limit where used + amount > limit, or budget where
# used >= limit, refuses; its retry is when enough of the oldest buckets leave the window (windows), 1 s
# (concurrency), the period's end (budgets).
# Phase 2, only when nothing refused: reserve amount on every limit (HINCRBYFLOAT of the bucket floor(now),
# ZADD of the lease members at now + lease TTL, INCRBYFLOAT) and (re)set each key's TTL.
# Returns {allowed 0/1, refused index (1-based, 0 none), retry, then used and reset per limit}, numbers as
# strings (Lua numbers would be truncated to integers on the way back).
_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local lease = ARGV[2]
local lease_exp = now + tonumber(ARGV[3])
local sec = math.floor(now)
local used, resets = {}, {}
local refused, retry = 0, 0
for i = 1, #KEYS do
  local b = 3 + (i - 1) * 5
  local kind, limit, amount, window = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local key = KEYS[i]
  local u, reset = 0, 0
  if kind == 'w' then
    local first = sec - window
    local flat = redis.call('HGETALL', key)
    local buckets = {}
    for j = 1, #flat, 2 do
      local s, c = tonumber(flat[j]), tonumber(flat[j + 1])
      if s < first then redis.call('HDEL', key, flat[j]) else u = u + c; buckets[#buckets + 1] = {s, c} end
    end
    table.sort(buckets, function(x, y) return x[1] < y[1] end)
    if #buckets > 0 then reset = buckets[1][1] + window + 1 - now end
    if refused == 0 and u + amount > limit then
      refused, retry = i, window
      if amount <= limit then
        local freed = 0
        for _, bk in ipairs(buckets) do
          freed = freed + bk[2]
          if u - freed + amount <= limit then retry = bk[1] + window + 1 - now; break end
        end
      end
    end
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    u = redis.call('ZCARD', key)
    if u > 0 then reset = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) - now end
    if refused == 0 and u + amount > limit then refused, retry = i, 1 end
  else
    u = tonumber(redis.call('GET', key) or '0')
    reset = window
    if refused == 0 and u >= limit then refused, retry = i, window end
  end
  used[i], resets[i] = u, reset
end
if refused == 0 then
  for i = 1, #KEYS do
    local b = 3 + (i - 1) * 5
    local kind, amount, ttl = ARGV[b + 1], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 5])
    local key = KEYS[i]
    if kind == 'w' then
      redis.call('HINCRBYFLOAT', key, sec, amount)
    elseif kind == 'c' then
      for j = 0, math.max(1, math.ceil(amount)) - 1 do redis.call('ZADD', key, lease_exp, lease .. ':' .. j) end
    else
      redis.call('INCRBYFLOAT', key, amount)
    end
    redis.call('EXPIRE', key, math.max(1, math.ceil(ttl)))
  end
end
local out = {refused == 0 and 1 or 0, refused, tostring(retry)}
for i = 1, #KEYS do out[#out + 1] = tostring(used[i]); out[#out + 1] = tostring(resets[i]) end
return out
"""

# The settle script. KEYS[i]: limit i's counter. ARGV[1] now, ARGV[2] the reservation's bucket (floor of its
# now), ARGV[3] lease id, then 3 per limit: kind (w window | c concurrency | b budget | - nothing), delta
# (actual - reserved; concurrency: the slots), window (s). A window's bucket still in the window is adjusted
# (deleted at <= 0); a budget counter still there is adjusted (never below 0); leases are removed. A bucket or
# period that has gone is left alone: what it counted no longer limits anyone.
_SETTLE_LUA = """
local now, bucket, lease = tonumber(ARGV[1]), ARGV[2], ARGV[3]
for i = 1, #KEYS do
  local b = 3 + (i - 1) * 3
  local kind, delta, window = ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local key = KEYS[i]
  if kind == 'w' then
    if tonumber(bucket) >= math.floor(now) - window and redis.call('HEXISTS', key, bucket) == 1 then
      if tonumber(redis.call('HINCRBYFLOAT', key, bucket, delta)) <= 0 then redis.call('HDEL', key, bucket) end
    end
  elseif kind == 'c' then
    for j = 0, math.max(1, math.ceil(delta)) - 1 do redis.call('ZREM', key, lease .. ':' .. j) end
  elseif kind == 'b' then
    if redis.call('EXISTS', key) == 1 then
      if tonumber(redis.call('INCRBYFLOAT', key, delta)) < 0 then redis.call('SET', key, '0', 'KEEPTTL') end
    end
  end
end
return 1
"""


def _connect_timeout() -> float:
    # A burst on a cold pool opens many connections at once (handshake included): tens of ms are too tight for
    # that on a busy loop. A refused connection (Redis down) fails at once anyway; a black-holed one costs this once,
    # then the breaker answers at once for RATE_LIMIT_REDIS_RETRY_S.
    return max(settings.RATE_LIMIT_REDIS_TIMEOUT_S, 0.5)


class RedisLimiter:
    """Exact across processes: one Lua script call per admit (see ``_ADMIT_LUA``), behind a local breaker."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, Any, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._down_until = 0.0
        self._warned_at = -math.inf
        # Leases an admit may have taken in Redis although its answer was lost (a timeout): released once Redis
        # answers again, so they do not hold their slots until they lapse.
        self._orphans: list[tuple[str, list[str]]] = []
        self._batches: dict[tuple[asyncio.AbstractEventLoop, str], list[Any]] = {}

    def _prefix(self) -> str:
        return f"{settings.CACHE_KEY_PREFIX}:lim:"

    def _client(self) -> tuple[Any, Any, Any]:
        # A redis.asyncio client belongs to the loop it was made on: one per loop.
        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = redis.asyncio.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=settings.RATE_LIMIT_REDIS_TIMEOUT_S,
                socket_connect_timeout=_connect_timeout(),
                retry=Retry(NoBackoff(), 0),
            )
            found = (client, client.register_script(_ADMIT_LUA), client.register_script(_SETTLE_LUA))
            self._clients[loop] = found
        return found

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        retry_s = settings.RATE_LIMIT_REDIS_RETRY_S
        at = time.monotonic()
        self._down_until = at + retry_s
        if at - self._warned_at >= retry_s:
            self._warned_at = at
            logger.warning(
                "rate limits: Redis unavailable (%s: %s); not asked again for %.1fs",
                type(exc).__name__,
                exc,
                retry_s,
            )

    async def admit(self, limits: Sequence[Limit], now: float) -> Decision:
        if not self._available():
            return Decision(allowed=False, unavailable=True, limits=tuple(limits), now=now, backend=self)
        lease = _lease_for(limits)
        prefix = self._prefix()
        lease_ttl = settings.RATE_LIMIT_LEASE_TTL_S
        keys: list[str] = []
        args: list[Any] = [repr(float(now)), lease or "", repr(float(lease_ttl))]
        for limit in limits:
            keys.append(prefix + limit.counter_key())
            if limit.kind in _WINDOW_KINDS:
                args += ["w", limit.limit, limit.amount, int(limit.window_s), limit.window_s + 2]
            elif limit.kind == "concurrency":
                args += ["c", limit.limit, limit.amount, 0, lease_ttl + 1]
            else:
                left = (limit.period_end or now) - now
                args += ["b", limit.limit, limit.amount, left, left + 60]
        try:
            reply = await self._batched("admit", keys, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection refused, timeout, any Redis error: the breaker
            self._failed(exc)
            if lease is not None:
                self._orphans += [
                    (key, _lease_members(lease, limit.amount))
                    for key, limit in zip(keys, limits, strict=True)
                    if limit.kind == "concurrency"
                ]
            return Decision(allowed=False, unavailable=True, limits=tuple(limits), now=now, backend=self)
        if self._orphans:
            orphans, self._orphans = self._orphans, []
            task = asyncio.get_running_loop().create_task(self._orphans_release(orphans))
            _background.add(task)
            task.add_done_callback(_background.discard)
        refused = int(reply[1]) - 1
        used = [float(reply[3 + 2 * i]) for i in range(len(limits))]
        resets = [float(reply[4 + 2 * i]) for i in range(len(limits))]
        return _decision(limits, now, used, resets, refused, float(reply[2]), lease, self)

    async def _orphans_release(self, orphans: list[tuple[str, list[str]]]) -> None:
        try:
            client, _, _ = self._client()
            async with asyncio.timeout(_connect_timeout() + settings.RATE_LIMIT_REDIS_TIMEOUT_S + 0.05):
                pipe = client.pipeline(transaction=False)
                for key, members in orphans:
                    pipe.zrem(key, *members)
                await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            self._orphans += orphans

    async def settle(self, decision: Decision, actual: Mapping[str, float], now: float) -> None:
        prefix = self._prefix()
        keys: list[str] = []
        args: list[Any] = [repr(float(now)), math.floor(decision.now), decision.lease or ""]
        for limit in decision.limits:
            keys.append(prefix + limit.counter_key())
            if limit.kind == "concurrency":
                args += ["c", limit.amount, 0]
            elif limit.kind == "requests" or limit.key not in actual:
                args += ["-", 0, 0]
            else:
                kind = "w" if limit.kind == "tokens" else "b"
                args += [kind, repr(float(actual[limit.key] - limit.amount)), int(limit.window_s)]
        if not self._available():
            return
        try:
            await self._batched("settle", keys, args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)

    async def _batched(self, which: str, keys: list[str], args: list[Any]) -> Any:
        """Run the ``which`` script ("admit" or "settle") with ``keys`` and ``args``; its reply.

        The calls of one loop iteration go together, as one pipeline: one round trip, and one wake-up of Redis,
        for all of them (each stays its own atomic script). The first one schedules the batch's send (a task,
        so a caller cancelled meanwhile cannot strand the others); each waits for its own reply.
        """
        loop = asyncio.get_running_loop()
        slot = (loop, which)
        future: asyncio.Future[Any] = loop.create_future()
        batch = self._batches.get(slot)
        if batch is None:
            batch = self._batches[slot] = []
            loop.call_soon(self._batch_send, slot)
        batch.append((keys, args, future))
        return await future

    def _batch_send(self, slot: tuple[asyncio.AbstractEventLoop, str]) -> None:
        items = self._batches.pop(slot)
        task = slot[0].create_task(self._batch_run(slot[1], items))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _batch_run(self, which: str, items: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        from redis.exceptions import NoScriptError

        try:
            client, admit_script, settle_script = self._client()
            script, source = (admit_script, _ADMIT_LUA) if which == "admit" else (settle_script, _SETTLE_LUA)
            async with asyncio.timeout(_connect_timeout() + settings.RATE_LIMIT_REDIS_TIMEOUT_S * 3 + 0.05):
                results = await self._pipeline(client, script.sha, items)
                if any(isinstance(result, NoScriptError) for result in results):
                    await client.script_load(source)  # Redis forgot the script (a restart, SCRIPT FLUSH)
                    again = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
                    retried = await self._pipeline(client, script.sha, [items[i] for i in again])
                    for i, result in zip(again, retried, strict=True):
                        results[i] = result
        except Exception as exc:  # the connection, a timeout: every call of the batch fails alike
            for _, _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(items, results, strict=True):
            if future.done():
                continue  # its caller was cancelled
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    @staticmethod
    async def _pipeline(client: Any, sha: str, items: list[tuple[list[str], list[Any], Any]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for keys, args, _ in items:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def renew(self, decision: Decision, now: float) -> None:
        if decision.lease is None or not self._available():
            return
        expiry = now + settings.RATE_LIMIT_LEASE_TTL_S
        ttl = math.ceil(settings.RATE_LIMIT_LEASE_TTL_S) + 1
        try:
            client, _, _ = self._client()
            async with asyncio.timeout(_connect_timeout() + settings.RATE_LIMIT_REDIS_TIMEOUT_S + 0.05):
                pipe = client.pipeline(transaction=True)
                for limit in decision.limits:
                    if limit.kind == "concurrency":
                        key = self._prefix() + limit.counter_key()
                        pipe.zadd(key, dict.fromkeys(_lease_members(decision.lease, limit.amount), expiry), xx=True)
                        pipe.expire(key, ttl)
                await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)

    async def close(self) -> None:
        """Close this loop's client (tests, shutdown)."""
        with_loop = self._clients.pop(asyncio.get_running_loop(), None)
        if with_loop is not None:
            await with_loop[0].aclose()

    # Budget counters read and raised directly (proxy.limit_reconcile rebuilds them from the ledger). Same breaker
    # as admit: unavailable at once while it is open, a failure opens it (one WARNING per interval).

    def _budget_timeout(self) -> float:
        return _connect_timeout() + settings.RATE_LIMIT_REDIS_TIMEOUT_S * 4 + 0.05

    async def budget_counters_get(self, keys: Sequence[str]) -> BudgetCounters:
        if not keys:
            return BudgetCounters({})
        if not self._available():
            return BudgetCounters({}, unavailable=True)
        prefix = self._prefix()
        try:
            client, _, _ = self._client()
            async with asyncio.timeout(self._budget_timeout()):
                pipe = client.pipeline(transaction=False)  # one round trip, MGETs of _BUDGET_CHUNK keys
                for start in range(0, len(keys), _BUDGET_CHUNK):
                    pipe.mget([prefix + key for key in keys[start : start + _BUDGET_CHUNK]])
                replies = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return BudgetCounters({}, unavailable=True)
        values = [value for reply in replies for value in reply]
        return BudgetCounters({key: None if v is None else float(v) for key, v in zip(keys, values, strict=True)})

    async def budget_counters_raise(self, targets: Sequence[tuple[Limit, float]], now: float) -> BudgetCounters:
        if not targets:
            return BudgetCounters({})
        if not self._available():
            return BudgetCounters({}, unavailable=True)
        prefix = self._prefix()
        keys = [limit.counter_key() for limit, _ in targets]
        args: list[Any] = []
        for limit, value in targets:
            args += [repr(float(value)), _budget_ttl(limit, now)]
        try:
            client, _, _ = self._client()
            script = client.register_script(_RAISE_LUA)
            async with asyncio.timeout(self._budget_timeout()):
                pipe = client.pipeline(transaction=False)  # one round trip; each chunk atomic on its own
                for start in range(0, len(keys), _BUDGET_CHUNK):
                    chunk = [prefix + key for key in keys[start : start + _BUDGET_CHUNK]]
                    await script(keys=chunk, args=args[2 * start : 2 * (start + _BUDGET_CHUNK)], client=pipe)
                replies = await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return BudgetCounters({}, unavailable=True)
        values = [value for reply in replies for value in reply]
        return BudgetCounters({key: None if v == "-" else float(v) for key, v in zip(keys, values, strict=True)})

    async def budget_counter_set(self, limit: Limit, value: float, now: float) -> bool:
        if not self._available():
            return False
        try:
            client, _, _ = self._client()
            async with asyncio.timeout(self._budget_timeout()):
                await client.set(self._prefix() + limit.counter_key(), repr(float(value)), ex=_budget_ttl(limit, now))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return False
        return True


_in_process = InProcessLimiter()
_background: set[asyncio.Task[None]] = set()
_redis_limiters: dict[str, RedisLimiter] = {}


def limiter() -> Limiter:
    """The backend for the current settings: Redis when ``REDIS_URL`` is set, else the in-process one."""
    url = settings.REDIS_URL
    if not url:
        return _in_process
    found = _redis_limiters.get(url)
    if found is None:
        found = _redis_limiters[url] = RedisLimiter(url)
    return found


def limits_forget() -> None:
    """Forget the in-process counters and the Redis breakers' state (tests)."""
    _in_process.forget()
    _redis_limiters.clear()


async def admit(limits: Sequence[Limit], now: float | None = None) -> Decision:
    """Check every limit of one request at once; reserve on all of them or on none. Never raises for Redis."""
    at = time.time() if now is None else now
    if not limits:
        return Decision(allowed=True, now=at)
    return await limiter().admit(limits, at)


async def settle(decision: Decision, actual: Mapping[str, float], now: float | None = None) -> None:
    """Refund or charge the difference between reserved and ``actual`` usage (token and budget limits, by limit
    key) and release the concurrency slots. Callers schedule it (``asyncio.create_task``); it never raises."""
    if not decision.allowed or decision.backend is None:
        return
    await decision.backend.settle(decision, actual, time.time() if now is None else now)


async def release(decision: Decision, now: float | None = None) -> None:
    """Free the concurrency slots of an allowed decision (no usage to reconcile)."""
    await settle(decision, {}, now)


async def renew(decision: Decision, now: float | None = None) -> None:
    """Extend the decision's concurrency leases by RATE_LIMIT_LEASE_TTL_S from now (long streams)."""
    if not decision.allowed or decision.backend is None or decision.lease is None:
        return
    await decision.backend.renew(decision, time.time() if now is None else now)


# --- Budget counters read and raised directly: proxy.limit_reconcile rebuilds them from the ledger -----------

# Counters per MGET / per raise script call (a pipeline sends them all in one round trip).
_BUDGET_CHUNK = 500

# The raise script. KEYS[i]: a budget counter; ARGV[2i - 1] the value it must hold at least, ARGV[2i] its TTL (s).
# A counter missing or below its value is set to it (with the TTL); one at or above it is left alone, so a
# reservation or a charge made since the caller read it is never lost. Returns each counter's previous value
# as a string, "-" for a missing one.
_RAISE_LUA = """
local out = {}
for i = 1, #KEYS do
  local value, ttl = ARGV[2 * i - 1], ARGV[2 * i]
  local was = redis.call('GET', KEYS[i])
  if not was or tonumber(was) < tonumber(value) then redis.call('SET', KEYS[i], value, 'EX', ttl) end
  out[i] = was or '-'
end
return out
"""


@dataclass(frozen=True, slots=True)
class BudgetCounters:
    """Budget counters by counter key (``Limit.counter_key()``): their values, None for a missing one. When the
    limiter's Redis could not be asked, ``unavailable`` and no values."""

    values: Mapping[str, float | None]
    unavailable: bool = False


def _budget_ttl(limit: Limit, now: float) -> int:
    # What admit gives a budget counter: the seconds left in its period, plus a minute.
    return max(1, math.ceil((limit.period_end or now) - now + 60))


def _budget_backend() -> InProcessLimiter | RedisLimiter:
    # limiter() answers one of the two (typed as the Protocol, which the admit path needs only).
    return cast("InProcessLimiter | RedisLimiter", limiter())


async def budget_counters_get(limits: Sequence[Limit]) -> BudgetCounters:
    """The current values of these budget limits' counters (None: missing, which admit reads as 0). Never
    raises for Redis: ``unavailable`` instead."""
    return await _budget_backend().budget_counters_get([limit.counter_key() for limit in limits])


async def budget_counters_raise(targets: Sequence[tuple[Limit, float]], now: float | None = None) -> BudgetCounters:
    """Make each budget counter hold at least its value (a missing one is created with admit's TTL); counters
    already at or above it are left alone. Atomic per counter: a reservation made meanwhile is kept whenever
    the counter holds more than the value. Answers the previous values. Never raises for Redis."""
    return await _budget_backend().budget_counters_raise(targets, time.time() if now is None else now)


async def budget_counter_set(limit: Limit, value: float, now: float | None = None) -> bool:
    """Set one budget counter to ``value`` (admit's TTL); False when the limiter's Redis is unavailable."""
    return await _budget_backend().budget_counter_set(limit, value, time.time() if now is None else now)
