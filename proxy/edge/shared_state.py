"""Breaker and health state shared through Redis: the background half of ``proxy.edge.breaker``.

One asyncio task per worker process (started by the lifespan, ``shared_start``), never on a request's path:

- it drains the breakers' write-through queue (failures, resets, trips, probe results) into one Lua script
  call that applies them, in order and atomically, to the members' records in the hash
  ``{CACHE_KEY_PREFIX}:breaker`` and publishes every changed record on ``{CACHE_KEY_PREFIX}:breaker-events``;
  it is woken as soon as something is queued, so a failure is shared within a Redis round trip;
- a subscription to that channel hands every other worker's changes to ``breaker.shared_adopt`` (health
  verdicts too: ``{CACHE_KEY_PREFIX}:health``, written by the active checks' prober of the moment);
- on (re)connecting, and every ``BREAKER_SYNC_INTERVAL_S`` while this worker knows of a breaker that is not
  closed or a target that is unhealthy, it re-reads both hashes whole (a publication lost with a dropped
  connection cannot leave a worker behind).

In steady state (every breaker closed and quiet) the task sends nothing at all: the subscription is pushed to.
With Redis unreachable the queue is kept (bounded) and resent once it is back; the outage is logged at WARNING
once per interval. Without ``REDIS_URL`` the task only ticks the breakers (the gauge sees open -> half-open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import orjson
from django.conf import settings

from proxy.edge import breaker

logger = logging.getLogger(__name__)

# Applies queued breaker operations in order. ARGV: channel, now (ms), cooldown cap (ms), ops as JSON
# [[kind, key, at_ms, failure_threshold, cooldown_ms], ...]. Records: "state,failures,open_until_ms,trips,version"
# (state 0 closed, 2 open; an open record past open_until is half-open). Returns each op's resulting record
# ("" for a member with no record, i.e. closed and quiet).
_BREAKER_LUA = """
local ops = cjson.decode(ARGV[4])
local now = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local out = {}
for i, op in ipairs(ops) do
  local kind, key, at, threshold, cooldown = op[1], op[2], op[3], op[4], op[5]
  local raw = redis.call('HGET', KEYS[1], key)
  local s, f, u, t, v = 0, 0, 0, 0, 0
  if raw then
    local a, b, c, d, e = string.match(raw, '^(%d+),(%d+),(%d+),(%d+),(%d+)$')
    if a then s, f, u, t, v = tonumber(a), tonumber(b), tonumber(c), tonumber(d), tonumber(e) end
  end
  local s0, f0, u0, t0 = s, f, u, t
  local expired = s == 2 and at >= u
  local ceiling = math.max(cap, cooldown)
  if kind == 'fail' or (kind == 'reopen' and s == 0) then
    if s == 0 then
      f = f + 1
      if threshold > 0 and f >= threshold then s, f, t, u = 2, 0, 1, at + cooldown end
    end
  elseif kind == 'ok' then
    if s == 0 then f = 0 end
  elseif kind == 'trip' then
    if s == 0 then s, f, t, u = 2, 0, 1, at + cooldown end
  elseif kind == 'reopen' then
    if expired then
      t = t + 1
      local wait = ceiling
      if t < 60 then wait = math.min(cooldown * 2 ^ (t - 1), ceiling) end
      u = at + wait
    end
  elseif kind == 'close' then
    if expired or s == 0 then s, f, t, u = 0, 0, 0, 0 end
  end
  if s ~= s0 or f ~= f0 or u ~= u0 or t ~= t0 then
    v = math.max(v + 1, now)
    raw = string.format('%d,%d,%d,%d,%d', s, f, u, t, v)
    redis.call('HSET', KEYS[1], key, raw)
    redis.call('PUBLISH', ARGV[1], 'B\\t' .. key .. '\\t' .. raw)
  end
  out[i] = raw or ''
end
return out
"""

# One active check's result. ARGV: channel, now (ms), key, ok (1/0), healthy threshold, unhealthy threshold.
# Records: "health,successes,failures,version" (health 0 unknown, 1 healthy, 2 unhealthy). Returns the record
# and the health before this result.
_HEALTH_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[3])
local h, okc, koc, v = 0, 0, 0, 0
if raw then
  local a, b, c, d = string.match(raw, '^(%d+),(%d+),(%d+),(%d+)$')
  if a then h, okc, koc, v = tonumber(a), tonumber(b), tonumber(c), tonumber(d) end
end
local h0 = h
if ARGV[4] == '1' then
  okc, koc = okc + 1, 0
  if h == 0 or (h == 2 and okc >= tonumber(ARGV[5])) then h = 1 end
else
  okc, koc = 0, koc + 1
  if h ~= 2 and koc >= tonumber(ARGV[6]) then h = 2 end
end
v = math.max(v + 1, tonumber(ARGV[2]))
raw = string.format('%d,%d,%d,%d', h, okc, koc, v)
redis.call('HSET', KEYS[1], ARGV[3], raw)
if h ~= h0 then redis.call('PUBLISH', ARGV[1], 'H\\t' .. ARGV[3] .. '\\t' .. raw) end
return {raw, h0}
"""


def _names() -> tuple[str, str, str]:
    prefix = settings.CACHE_KEY_PREFIX
    return f"{prefix}:breaker", f"{prefix}:health", f"{prefix}:breaker-events"


def health_record_parse(packed: str) -> tuple[bool | None, int] | None:
    """``(healthy, version)`` of a health record (healthy None: never decided), or None if malformed."""
    parts = packed.split(",")
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        return None
    health, version = int(parts[0]), int(parts[3])
    return (None if health == 0 else health == 1), version


class _SharedSync:
    """The background task of one worker process (see the module docstring)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.wake = asyncio.Event()
        self.stopping = False
        self.client: Any = None
        self.apply: Any = None
        self.report: Any = None
        self.connected = False
        self.task: asyncio.Task[None] | None = None

    def wake_up(self) -> None:
        if threading.get_ident() == self.thread:
            self.wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self.wake.set)

    async def start(self) -> None:
        if settings.REDIS_URL:
            import redis.asyncio

            self.client = redis.asyncio.Redis.from_url(
                settings.REDIS_URL,
                decode_responses=True,
                socket_timeout=2.0,
                socket_connect_timeout=1.0,
                health_check_interval=15,
            )
            self.apply = self.client.register_script(_BREAKER_LUA)
            self.report = self.client.register_script(_HEALTH_LUA)
            breaker.sharing_start(self.wake_up)
        self.task = asyncio.create_task(self.run(), name="breaker-sync")

    async def stop(self) -> None:
        self.stopping = True
        breaker.sharing_stop()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def run(self) -> None:
        interval = settings.BREAKER_SYNC_INTERVAL_S
        if self.client is None:
            while True:  # embedded default: nothing to share; keep the gauge right about half-open breakers
                await asyncio.sleep(interval)
                breaker.breakers_tick()
        while not self.stopping:
            try:
                await self.session(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or a dropped connection: keep working locally, retry
                self.connected = False
                logger.warning("breaker state sync: Redis unavailable (%s: %s); retrying", type(exc).__name__, exc)
            await asyncio.sleep(interval)

    async def session(self, interval: float) -> None:
        hash_breakers, _, channel = _names()
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        listener: asyncio.Task[None] | None = None
        try:
            await pubsub.subscribe(channel)
            await self.flush(hash_breakers, channel)
            await self.load()
            self.connected = True
            loaded_at = time.monotonic()
            listener = asyncio.create_task(self.listen(pubsub), name="breaker-sync-listen")
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), interval)
                self.wake.clear()
                if listener.done():
                    listener.result()
                    raise ConnectionError("the subscription ended")
                await self.flush(hash_breakers, channel)
                if breaker.breakers_tick() and time.monotonic() - loaded_at >= interval:
                    await self.load()
                    loaded_at = time.monotonic()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(BaseException):
                    await listener
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def listen(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "message":
                self.receive(str(message["data"]))

    def receive(self, data: str) -> None:
        kind, _, rest = data.partition("\t")
        key, _, packed = rest.partition("\t")
        if kind == "B":
            record = breaker.record_parse(packed)
            if record is not None:
                breaker.shared_adopt(key, record)
        elif kind == "H":
            health = health_record_parse(packed)
            if health is not None and health[0] is not None and settings.HEALTH_CHECKS:
                breaker.health_note(key, health[0], health[1])
        elif kind == "X":
            breaker.health_note(key, None)
        elif kind == "R":
            breaker.shared_drop(key)

    async def flush(self, hash_breakers: str, channel: str) -> None:
        ops = breaker.shared_ops_take()
        if not ops:
            return
        cap_ms = int(settings.BREAKER_COOLDOWN_MAX_S * 1000)
        try:
            results = await self.apply(
                keys=[hash_breakers], args=[channel, int(time.time() * 1000), cap_ms, orjson.dumps(ops).decode()]
            )
        except BaseException:
            breaker.shared_ops_return(ops)
            raise
        sent: dict[str, int] = {}
        latest: dict[str, str] = {}
        for op, packed in zip(ops, results, strict=False):
            sent[op[1]] = sent.get(op[1], 0) + 1
            latest[op[1]] = str(packed)
        for key, count in sent.items():
            breaker.shared_acknowledge(key, count, breaker.record_parse(latest[key]) if latest[key] else None)

    async def load(self) -> None:
        hash_breakers, hash_health, _ = _names()
        records: dict[str, str] = await self.client.hgetall(hash_breakers)
        health: dict[str, str] = await self.client.hgetall(hash_health)
        for key, packed in records.items():
            record = breaker.record_parse(packed)
            if record is not None:
                breaker.shared_adopt(key, record)
        decided: set[str] = set()
        for key, packed in health.items() if settings.HEALTH_CHECKS else ():
            verdict = health_record_parse(packed)
            if verdict is not None and verdict[0] is not None:
                breaker.health_note(key, verdict[0], verdict[1])
                decided.add(key)
        breaker.shared_forget_missing(set(records), decided)

    async def health_claim(self, key: str, ttl_s: float) -> bool:
        """Whether this worker probes ``key`` this interval (one prober per target across all workers)."""
        lock = f"{settings.CACHE_KEY_PREFIX}:health-lock:{key}"
        return bool(await self.client.set(lock, "1", nx=True, px=max(int(ttl_s * 1000), 1)))

    async def health_forget(self, keys: list[str]) -> None:
        """Drop the shared verdicts of targets no longer checked (and tell every worker)."""
        _, hash_health, channel = _names()
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(hash_health, *keys)
            for key in keys:
                pipe.publish(channel, f"X\t{key}")
            await pipe.execute()

    async def health_report(
        self, key: str, ok: bool, healthy: int, unhealthy: int
    ) -> tuple[bool, int, bool | None] | None:
        """Count one probe's result in the shared record: ``(healthy, version, healthy before)`` after it (the
        others hear of a change through the channel), None while undecided."""
        _, hash_health, channel = _names()
        packed, before = await self.report(
            keys=[hash_health],
            args=[channel, int(time.time() * 1000), key, "1" if ok else "0", max(healthy, 1), max(unhealthy, 1)],
        )
        verdict = health_record_parse(str(packed))
        if verdict is None or verdict[0] is None:
            return None
        return verdict[0], verdict[1], None if int(before) == 0 else int(before) == 1


_sync: list[_SharedSync] = []


async def shared_start() -> None:
    """Start this process's sync (the lifespan; a second server in the same process shares the first's). A sync
    left behind by a server whose loop has closed without its shutdown (a forced exit) is replaced."""
    if _sync and not _sync[0].loop.is_closed():
        return
    _sync.clear()
    sync = _SharedSync()
    _sync.append(sync)
    await sync.start()


async def shared_stop() -> None:
    """Stop the sync if it runs on this event loop."""
    if not _sync or _sync[0].loop is not asyncio.get_running_loop():
        return
    sync = _sync.pop()
    await sync.stop()


def shared_sync() -> _SharedSync | None:
    """The running sync when it shares through Redis (and runs on this loop), else None."""
    if not _sync or _sync[0].client is None:
        return None
    sync = _sync[0]
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return sync if sync.loop is running else None


_reset_clients: dict[str, Any] = {}


def _operator_client() -> Any:
    """A short-timeout sync client for the operators' actions (one per Redis URL, kept)."""
    import redis

    url = settings.REDIS_URL
    client = _reset_clients.get(url)
    if client is None:
        client = _reset_clients[url] = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    return client


def shared_health_set(key: str, healthy: bool) -> int:
    """Set ``key``'s shared health record to a decided verdict and tell every worker; its version (sync; an
    operator's "health check now"). The checkers' next probes count from it. ``CacheUnavailable`` if Redis is
    down."""
    import redis

    from apiforge.local_cache import CacheUnavailable

    client = _operator_client()
    _, hash_health, channel = _names()
    version = int(time.time() * 1000)
    try:
        current = client.hget(hash_health, key)
        if current:
            known = health_record_parse(current.decode() if isinstance(current, bytes) else str(current))
            if known is not None:
                version = max(version, known[1] + 1)
        packed = f"{1 if healthy else 2},{1 if healthy else 0},{0 if healthy else 1},{version}"
        pipe = client.pipeline(transaction=True)
        pipe.hset(hash_health, key, packed)
        pipe.publish(channel, f"H\t{key}\t{packed}")
        pipe.execute()
    except redis.RedisError as exc:
        raise CacheUnavailable("proxy-health", committed=True) from exc
    return version


def shared_reset(key: str) -> None:
    """Delete ``key``'s shared breaker and health records and tell every worker (sync; an operator's action)."""
    import redis

    from apiforge.local_cache import CacheUnavailable

    client = _operator_client()
    hash_breakers, hash_health, channel = _names()
    try:
        pipe = client.pipeline(transaction=True)
        pipe.hdel(hash_breakers, key)
        pipe.hdel(hash_health, key)
        pipe.publish(channel, f"R\t{key}")
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("breaker reset of %s not shared: Redis unavailable (%s)", key, exc)
        raise CacheUnavailable("proxy-breakers", committed=True) from exc
