"""Circuit breakers per route target and per model deployment, and the active health checks' verdicts.

A member (``rt:<id>``, ``dep:<id>``) has a breaker with three states:

- **closed**: calls go through. It opens after ``failure_threshold`` consecutive failures (a 5xx, a connect
  error, a timeout; a 4xx is the client's, not a failure), or when more than ``BREAKER_ERROR_RATE`` of this
  worker's calls to it failed within the last ``BREAKER_WINDOW_S`` (with at least ``BREAKER_MIN_REQUESTS``
  calls in that window);
- **open**: no call at all, for ``cooldown_s``; each trip in a row (a failed probe) doubles it, up to
  ``BREAKER_COOLDOWN_MAX_S``;
- **half-open** (an open breaker whose cooldown ran out): ``half_open_requests`` probe calls are let through;
  a probe's success closes the breaker, a failure opens it again with the longer cooldown.

Everything a request does here is in memory: ``breaker_allow`` / ``breaker_success`` / ``breaker_failure``
never touch the network, and a member that never failed costs one dict lookup (no entry exists for it).

Sharing (``proxy.edge.shared_state``, started by the lifespan when ``REDIS_URL`` is set): every failure,
reset and transition is queued here and written through to Redis by a background task within milliseconds
(a Lua script applies it atomically to the member's shared record, then publishes the new record); every
worker subscribes to those publications and adopts them, and re-reads the whole state when it (re)connects
and every ``BREAKER_SYNC_INTERVAL_S`` while any breaker it knows is not closed. So the consecutive-failure
count is counted across all workers and machines, and a trip anywhere is seen everywhere within a Redis
round trip (or one sync interval after a lost connection comes back). In steady state (closed breakers,
successes) there is no Redis traffic at all. Without Redis the same state machine runs in-process. With Redis
unreachable each worker keeps deciding on its own counts and catches up when it is back.

**The bound.** With N workers, a target that starts failing gets at most

    N x failure_threshold + C

calls before every worker refuses it, where C is the calls already in flight when they trip: each worker
counts its own failures and those it hears of, and opens when the count reaches the threshold, so no worker
sends more than ``failure_threshold`` failing calls however late (or never, Redis being down) it hears from
the others. With Redis up the others' failures arrive within a round trip, so the cluster as a whole sends
about ``failure_threshold`` (the two-worker test, calling the workers in turn, sees exactly that) plus the
calls started during that delay. In half-open each worker admits its own ``half_open_requests`` probes (a
probe claim never waits on Redis), so a recovering target sees at most N x ``half_open_requests`` probes per
cooldown; the first probe result published settles it for all. tests/balance/test_breaker_processes.py checks
the bound with two worker processes.

``health_view`` is the active health checks' word on a target (``proxy.edge.health`` probes; the verdicts are
shared the same way and never written to the database).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.conf import settings

logger = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # also the values of the apiforge_breaker_state gauge
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}
HEALTHY, UNHEALTHY = "healthy", "unhealthy"
UNKNOWN = "unknown"

# Breaker and health keys: a model's deployment, a route's target (by primary key).
DEPLOYMENT_KEY_PREFIX, ROUTE_TARGET_KEY_PREFIX = "dep:", "rt:"


def deployment_key(pk: int) -> str:
    return f"{DEPLOYMENT_KEY_PREFIX}{pk}"


def route_target_key(pk: int) -> str:
    return f"{ROUTE_TARGET_KEY_PREFIX}{pk}"


# Buckets of the error-rate window (BREAKER_WINDOW_S split in this many).
_WINDOW_BUCKETS = 10
# A probe claimed but never reported (its call was lost: a cancelled task, a stream never read) frees its slot
# after this, so a breaker cannot stay half-open with every probe taken forever.
PROBE_CLAIM_TTL_S = 60.0
# Queued write-throughs kept while Redis is unreachable (the oldest are dropped beyond it).
MAX_PENDING_OPS = 10_000


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a member's breaker opens and for how long (an upstream's or a route's breaker settings).

    ``failure_threshold`` 0 turns the breaker off for the member.
    """

    failure_threshold: int = 5
    cooldown_s: float = 30.0
    half_open_requests: int = 1


_DEFAULT_POLICY = BreakerPolicy()

# A shared record (Redis): state (0 closed, 2 open: half-open is open past its cooldown), consecutive failures,
# open until (epoch ms), trips in a row, version (increasing with every write).
Record = tuple[int, int, int, int, int]  # state (0 closed, 2 open), failures, open_until (ms), trips, version


@dataclass(frozen=True, slots=True)
class BreakerView:
    """A breaker as this worker sees it. ``open_until``: epoch seconds while open, else 0."""

    key: str
    state: str  # "closed" | "open" | "half_open"
    failures: int
    open_until: float
    trips: int


class _Breaker:
    """One member's breaker in this process (mutated on the event loop; see the module docstring)."""

    __slots__ = (
        "buckets_at",
        "calls",
        "errors",
        "failures",
        "key",
        "open_until",
        "parked",
        "pending",
        "policy",
        "probe_at",
        "probes",
        "reported",
        "state",
        "trips",
        "version",
    )

    def __init__(self, key: str, policy: BreakerPolicy) -> None:
        self.key = key
        self.policy = policy
        self.state = CLOSED
        self.failures = 0
        self.open_until = 0.0  # epoch seconds (shared across machines)
        self.trips = 0  # trips in a row (a close resets it): the cooldown doubles with each
        self.probes = 0  # half-open probes in flight
        self.probe_at = 0.0
        self.version = 0  # of the last shared record adopted
        self.pending = 0  # write-throughs queued and not yet acknowledged
        self.parked: Record | None = None  # the latest shared record that arrived while some were pending
        self.reported = CLOSED  # the state last told to the listeners (the gauge)
        self.calls = [0] * _WINDOW_BUCKETS
        self.errors = [0] * _WINDOW_BUCKETS
        self.buckets_at = 0  # absolute index of the newest bucket

    def effective(self, now: float) -> int:
        if self.state == OPEN and now >= self.open_until:
            return HALF_OPEN
        return self.state

    def count(self, failed: bool) -> tuple[int, int]:
        """Note a call in the error-rate window; the window's calls and errors."""
        width = settings.BREAKER_WINDOW_S / _WINDOW_BUCKETS
        index = int(time.monotonic() / width) if width > 0 else 0
        if index != self.buckets_at:
            stale = min(index - self.buckets_at, _WINDOW_BUCKETS)
            for step in range(1, stale + 1):
                slot = (self.buckets_at + step) % _WINDOW_BUCKETS
                self.calls[slot] = self.errors[slot] = 0
            self.buckets_at = index
        slot = index % _WINDOW_BUCKETS
        self.calls[slot] += 1
        if failed:
            self.errors[slot] += 1
        return sum(self.calls), sum(self.errors)


_breakers: dict[str, _Breaker] = {}
# Health verdicts of the active checks: key -> (healthy?, version of the shared record).
_health: dict[str, tuple[bool, int]] = {}
_listeners: list[Callable[[str, int], None]] = []

# Write-through queue, drained by ``proxy.edge.shared_state`` (only while it runs: else nothing is queued).
Op = tuple[str, str, int, int, int]  # kind, key, at (epoch ms), failure_threshold, cooldown (ms)
_outbox: deque[Op] = deque()
_sharing: list[Callable[[], None]] = []  # the sync's wake-up call while it runs
_lock = threading.Lock()  # only for the rare cross-thread callers (breaker_reset from a sync view)


def _now() -> float:
    return time.time()


def _queue(kind: str, breaker: _Breaker, at: float) -> None:
    if not _sharing:
        return
    policy = breaker.policy
    _outbox.append((kind, breaker.key, int(at * 1000), policy.failure_threshold, int(policy.cooldown_s * 1000)))
    breaker.pending += 1
    if len(_outbox) > MAX_PENDING_OPS:
        dropped = _outbox.popleft()
        lost = _breakers.get(dropped[1])
        if lost is not None and lost.pending > 0:
            lost.pending -= 1
    _sharing[0]()


def _report(breaker: _Breaker, now: float) -> None:
    state = breaker.effective(now)
    if state != breaker.reported:
        breaker.reported = state
        for listener in _listeners:
            listener(breaker.key, state)


def _entry(key: str, policy: BreakerPolicy) -> _Breaker:
    breaker = _breakers.get(key)
    if breaker is None:
        breaker = _breakers[key] = _Breaker(key, policy)
    else:
        breaker.policy = policy
    return breaker


def breaker_cooldown_s(policy: BreakerPolicy, trips: int) -> float:
    """How long a breaker under ``policy`` stays open after ``trips`` trips in a row (doubling, capped)."""
    ceiling = max(settings.BREAKER_COOLDOWN_MAX_S, policy.cooldown_s)
    if trips > 60:
        return ceiling
    return min(policy.cooldown_s * 2 ** max(trips - 1, 0), ceiling)


def _open(breaker: _Breaker, now: float, trips: int) -> None:
    breaker.state = OPEN
    breaker.trips = trips
    breaker.failures = 0
    breaker.probes = 0
    breaker.open_until = now + breaker_cooldown_s(breaker.policy, trips)
    # Once per trip (not per request): operators and benchmarks see when and why a member was shed.
    logger.warning(
        "circuit breaker %s opened for %.1f s (trip %d in a row)", breaker.key, breaker.open_until - now, trips
    )
    _report(breaker, now)


# --- The request path (no I/O) -------------------------------------------------------------------------------


def breaker_available(key: str, policy: BreakerPolicy) -> bool:
    """Whether ``key`` could be called now, without claiming a half-open probe (the balancer's filter)."""
    breaker = _breakers.get(key)
    if breaker is None or breaker.state == CLOSED or policy.failure_threshold <= 0:
        return True
    if breaker.state == OPEN:
        if _now() < breaker.open_until:
            return False
        breaker.state = HALF_OPEN
        breaker.probes = 0
    if breaker.probes < max(policy.half_open_requests, 1):
        return True
    return time.monotonic() - breaker.probe_at >= PROBE_CLAIM_TTL_S


def breaker_allow(key: str, policy: BreakerPolicy) -> bool:
    """Whether ``key`` may be called now; in half-open, claims one of its probes (no I/O)."""
    breaker = _breakers.get(key)
    if breaker is None or breaker.state == CLOSED:
        return True
    if not breaker_available(key, policy):
        return False
    if breaker.state == HALF_OPEN and policy.failure_threshold > 0:
        if breaker.probes >= max(policy.half_open_requests, 1):
            breaker.probes = 0  # the claims went stale (PROBE_CLAIM_TTL_S)
        breaker.probes += 1
        breaker.probe_at = time.monotonic()
        breaker.policy = policy
        _report(breaker, _now())
    return True


def breaker_success(key: str, policy: BreakerPolicy) -> None:
    """A call to ``key`` succeeded (or failed on the client's account, a 4xx). No I/O in steady state."""
    breaker = _breakers.get(key)
    if breaker is None or policy.failure_threshold <= 0:
        return  # never failed: nothing to count
    breaker.policy = policy
    if breaker.state == CLOSED:
        if settings.BREAKER_ERROR_RATE > 0:
            breaker.count(False)
        if breaker.failures:
            breaker.failures = 0
            _queue("ok", breaker, _now())
        return
    now = _now()
    if breaker.effective(now) == HALF_OPEN:
        breaker.state = CLOSED
        breaker.failures = breaker.trips = breaker.probes = 0
        breaker.open_until = 0.0
        _queue("close", breaker, now)
        _report(breaker, now)
    # Still open: a call picked before the breaker opened finished well; the cooldown stands.


def breaker_failure(key: str, policy: BreakerPolicy) -> None:
    """A call to ``key`` failed (5xx, connect error, timeout). Never blocks on the network."""
    if policy.failure_threshold <= 0:
        return
    breaker = _entry(key, policy)
    now = _now()
    state = breaker.effective(now)
    if state == CLOSED:
        breaker.failures += 1
        _queue("fail", breaker, now)
        tripped = breaker.failures >= policy.failure_threshold
        if settings.BREAKER_ERROR_RATE > 0:
            calls, errors = breaker.count(True)
            tripped = tripped or (
                calls >= settings.BREAKER_MIN_REQUESTS and errors / calls > settings.BREAKER_ERROR_RATE
            )
        if tripped:
            _open(breaker, now, 1)
            _queue("trip", breaker, now)
    elif state == HALF_OPEN:
        _open(breaker, now, breaker.trips + 1)
        _queue("reopen", breaker, now)
    # Open: a call picked before the breaker opened failed too; nothing more to learn.


def breaker_release(key: str) -> None:
    """A call ended without a verdict (the client left first): frees its half-open probe, counts nothing."""
    breaker = _breakers.get(key)
    if breaker is not None and breaker.state == HALF_OPEN and breaker.probes > 0:
        breaker.probes -= 1


# --- Reading and operating -----------------------------------------------------------------------------------


def breaker_view(key: str) -> BreakerView:
    """``key``'s breaker as this worker sees it (no I/O)."""
    breaker = _breakers.get(key)
    if breaker is None:
        return BreakerView(key=key, state="closed", failures=0, open_until=0.0, trips=0)
    state = breaker.effective(_now())
    return BreakerView(
        key=key,
        state=STATE_NAMES[state],
        failures=breaker.failures,
        open_until=breaker.open_until if state == OPEN else 0.0,
        trips=breaker.trips,
    )


def breakers_not_closed() -> list[BreakerView]:
    """Every breaker this worker knows that is open or half-open, by key."""
    now = _now()
    return [breaker_view(key) for key, b in sorted(_breakers.items()) if b.effective(now) != CLOSED]


def breaker_retry_after_s(keys: Iterable[str]) -> int | None:
    """Whole seconds until the soonest of ``keys``' open breakers half-opens (at least 1); None if none is open."""
    now = _now()
    waits = [b.open_until - now for key in keys if (b := _breakers.get(key)) is not None and b.state != CLOSED]
    if not waits:
        return None
    return max(1, math.ceil(min(waits)))


def breaker_reset(key: str) -> None:
    """Close ``key``'s breaker and forget its health verdict, here and (with Redis) on every worker.

    An operator's action, callable from sync code (a view, the admin, a command): with Redis, the shared
    records are deleted at once (one short round trip, off the proxy's path) and the deletion published.
    """
    with _lock:
        _breakers.pop(key, None)
        _health.pop(key, None)
    for listener in _listeners:
        listener(key, CLOSED)
    if settings.REDIS_URL:
        from proxy.edge.shared_state import shared_reset

        shared_reset(key)


def breakers_forget() -> None:
    """Forget every breaker and health verdict of this process (server stop, and between tests)."""
    with _lock:
        _breakers.clear()
        _health.clear()
        _outbox.clear()


def breaker_listener_register(listener: Callable[[str, int], None]) -> None:
    """Call ``listener(key, state)`` whenever a breaker's state here changes (state: CLOSED/HALF_OPEN/OPEN)."""
    if listener not in _listeners:
        _listeners.append(listener)


def breakers_tick() -> bool:
    """Report breakers whose cooldown ran out (open -> half-open) to the listeners; True if any is not closed.

    Called by the background sync every ``BREAKER_SYNC_INTERVAL_S`` (the request path notices by itself).
    """
    now = _now()
    interesting = False
    for breaker in list(_breakers.values()):
        _report(breaker, now)
        interesting = interesting or breaker.state != CLOSED or breaker.failures > 0
    return interesting or any(not healthy for healthy, _ in _health.values())


# --- Health verdicts -----------------------------------------------------------------------------------------


def health_view(key: str) -> str:
    """The active health checks' word on ``key``: "healthy", "unhealthy" or "unknown" (never checked)."""
    verdict = _health.get(key)
    if verdict is None:
        return UNKNOWN
    return HEALTHY if verdict[0] else UNHEALTHY


def health_unhealthy(key: str, stored: bool) -> bool:
    """Whether the balancer should treat ``key`` as unhealthy: the checks' verdict, else the stored health."""
    verdict = _health.get(key)
    return stored if verdict is None else not verdict[0]


def health_note(key: str, healthy: bool | None, version: int = 0) -> bool:
    """Set ``key``'s verdict (None: forget it); True when it changed. ``version`` orders shared records."""
    current = _health.get(key)
    if healthy is None:
        return _health.pop(key, None) is not None
    if current is not None and version and current[1] > version:
        return False
    _health[key] = (healthy, version)
    return current is None or current[0] != healthy


def health_unhealthy_keys() -> list[str]:
    return sorted(key for key, (healthy, _) in _health.items() if not healthy)


def health_keys() -> set[str]:
    """Every key with a verdict here."""
    return set(_health)


# --- Adopting shared records (proxy.edge.shared_state, on the event loop) -----------------------------------


def shared_ops_take() -> list[Op]:
    """The queued write-throughs, oldest first (the sync sends them, then calls ``shared_acknowledge``)."""
    ops: list[Op] = []
    while _outbox:
        ops.append(_outbox.popleft())
    return ops


def shared_ops_return(ops: list[Op]) -> None:
    """Put back write-throughs that could not be sent (Redis unreachable), ahead of newer ones."""
    _outbox.extendleft(reversed(ops[-MAX_PENDING_OPS:]))


def record_parse(packed: str) -> Record | None:
    parts = packed.split(",")
    if len(parts) != 5 or not all(part.isdigit() for part in parts):
        return None
    state, failures, until, trips, version = (int(part) for part in parts)
    return state, failures, until, trips, version


def shared_acknowledge(key: str, sent: int, record: Record | None) -> None:
    """``sent`` write-throughs of ``key`` were applied; ``record`` is its shared state after them."""
    breaker = _breakers.get(key)
    if breaker is None:
        return
    breaker.pending = max(0, breaker.pending - sent)
    if breaker.pending > 0:
        if record is not None:
            shared_adopt(key, record)  # parked until the rest is acknowledged
        return
    parked, breaker.parked = breaker.parked, None
    for candidate in sorted((r for r in (record, parked) if r is not None), key=lambda r: r[4]):
        shared_adopt(key, candidate)


def shared_adopt(key: str, record: Record) -> None:
    """Take ``record`` (published by a worker, or read back) as ``key``'s state, unless this worker has newer
    news of its own still being written, or already took a later record."""
    state, failures, until_ms, trips, version = record
    breaker = _breakers.get(key)
    if breaker is None:
        if state == CLOSED and failures == 0:
            return
        breaker = _breakers[key] = _Breaker(key, _DEFAULT_POLICY)
    if version <= breaker.version:
        return
    if breaker.pending > 0:
        if breaker.parked is None or version > breaker.parked[4]:
            breaker.parked = record
        return
    breaker.version = version
    now = _now()
    if state == OPEN:
        until = until_ms / 1000
        if breaker.state == CLOSED or abs(until - breaker.open_until) > 0.001:
            breaker.state = OPEN
            breaker.open_until = until
            breaker.probes = 0
        breaker.trips = trips
        breaker.failures = 0
    else:
        breaker.state = CLOSED
        breaker.failures = failures
        breaker.trips = breaker.probes = 0
        breaker.open_until = 0.0
    _report(breaker, now)


def shared_forget_missing(keys: set[str], health_keys: set[str]) -> None:
    """After a full read: drop what Redis no longer holds (deleted by an operator or a flush), unless queued."""
    for key, breaker in list(_breakers.items()):
        if key not in keys and breaker.pending == 0:
            del _breakers[key]
            if breaker.reported != CLOSED:
                for listener in _listeners:
                    listener(key, CLOSED)
    for key in list(_health):
        if key not in health_keys:
            _health.pop(key, None)


def shared_drop(key: str) -> None:
    """A reset published by another worker."""
    breaker = _breakers.pop(key, None)
    _health.pop(key, None)
    if breaker is not None and breaker.reported != CLOSED:
        for listener in _listeners:
            listener(key, CLOSED)


def sharing_start(wake: Callable[[], None]) -> None:
    _sharing[:] = [wake]


def sharing_stop() -> None:
    _sharing.clear()
    _outbox.clear()
    for breaker in _breakers.values():
        breaker.pending = 0
        breaker.parked = None
