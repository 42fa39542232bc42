"""The proxy hot path's I/O in steady state, counted for real around N proxied requests.

Once a key and the model catalog are in the process's memory, a proxied request
must cost no database query in any thread of the process: no lazy loads, no
per-request writes, and nothing from the usage hand-off either (it writes a
key's ``last_used_at`` at most once a minute, and the warm-up already did). Nor
may it cost a Redis command beyond the cache-generation checks that keep every
worker's memory coherent: one GET per cache namespace per
``CACHE_SYNC_INTERVAL_S``, however many requests arrive.

How it is counted, without mocking anything:

- SQL: ``CursorWrapper._execute_with_wrappers`` (the one door every Django query
  goes through, on every connection of every thread) is wrapped to note the
  thread and the SQL before running the query as usual; ``connection_created``
  catches new connections too.
- Redis: a real ``MONITOR`` connection, read in a thread between two sentinel
  commands, keeps the commands whose arguments carry this run's
  ``CACHE_KEY_PREFIX`` (every key the gateway, its caches and its channel layer
  use).

A feature that really needs a Redis round trip per request (a rate limiter,
later) belongs in ``_ALLOWED_PER_REQUEST`` with its reason, so the bound stays explicit.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from django.conf import settings
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorWrapper

from gateway_stats.models import UsageRecord
from gateway_stats.usage import emitter
from proxy.route_services import TargetSpec, route_register
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make

N_REQUESTS = 200
WARM_UP_REQUESTS = 5
MESSAGES = [{"role": "user", "content": "count my queries"}]
# Namespaces of the in-process caches a proxied request reads: verified keys and the model catalog, or the
# route catalog for /gw/ (the unknown-keys cache is consulted only on a miss of the first, which a valid key
# never has in steady state).
_SYNCED_NAMESPACES = ("keys", "proxy-catalog")  # /gw/: "keys", "proxy-gateway" (as many)
# Redis commands a feature needs per proxied request of a key without limits, by name: none. A limited key's
# calls add the limiter's scripts (``test_a_limited_key_costs_exactly_the_limiters_round_trips``): one EVALSHA
# before forwarding for all its limits together, and one after the answer when something must be settled.
_ALLOWED_PER_REQUEST: dict[str, int] = {}
# Limits of a key -> EVALSHA per request: rpm alone settles nothing; tokens and concurrency are settled after.
_LIMITER_ROUND_TRIPS = {
    "rpm": ({"rpm_limit": 1_000_000}, 1),
    "rpm+tpm+concurrency": ({"rpm_limit": 1_000_000, "tpm_limit": 1_000_000_000, "max_concurrency": 1_000}, 2),
}
MONITOR_TIMEOUT_S = 20.0


@pytest.fixture
def gateway(live_gateway, fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, timeout_s=10, max_retries=0)
    model_make("gpt-io", upstream, upstream_model="fake-io")
    # The same upstream as a generic gateway route: /gw/io/chat/completions -> the fake's /v1/chat/completions.
    route_register(data={"name": "io", "path": "/io", "auth": "key"}, targets=[TargetSpec(url=fake_upstream.base_url)])
    key = key_make()
    client = httpx.Client(
        base_url=live_gateway.url("/v1"), headers={"Authorization": f"Bearer {key.secret}"}, timeout=10
    )
    try:
        yield client
    finally:
        client.close()


def _call(client: httpx.Client, *, stream: bool | str) -> None:
    """One call: ``stream`` False (JSON), True (SSE), or "gw" (the JSON call through the /gw/io route)."""
    if stream == "gw":
        gateway_url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/gw/io/chat/completions"
        answer = client.post(gateway_url, json={"model": "gpt-io", "messages": MESSAGES})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == FakeUpstream.expected_content(MESSAGES)
        return
    body = {"model": "gpt-io", "messages": MESSAGES, "stream": stream}
    if not stream:
        answer = client.post("/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == FakeUpstream.expected_content(MESSAGES)
        return
    with client.stream("POST", "/chat/completions", json=body) as answer:
        raw = answer.read()
    assert answer.status_code == 200, raw
    assert raw.endswith(b"data: [DONE]\n\n")


def _steady_state(client: httpx.Client, *, stream: bool | str) -> None:
    """Warm every cache on the path (key, catalog, upstream connection pool), then hand off the warm-up's usage
    (the key's ``last_used_at`` is written then, once a minute at most)."""
    for _ in range(WARM_UP_REQUESTS):
        _call(client, stream=stream)
        _call(client, stream=stream is False)
    emitter.flush()


# --- SQL, every thread ------------------------------------------------------------------------------
@dataclass
class QueryLog:
    queries: list[tuple[str, str]] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> str:
        lines = [f"  [{thread}] {sql[:200]}" for thread, sql in self.queries[:20]]
        lines += [f"  [{thread}] new database connection" for thread in self.connections[:20]]
        return "\n".join(lines)


@contextmanager
def queries_in_every_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[QueryLog]:
    log = QueryLog()
    real = CursorWrapper._execute_with_wrappers

    def counted(self, sql, params, many, executor):  # type: ignore[no-untyped-def]
        with log.lock:
            log.queries.append((threading.current_thread().name, str(sql)))
        return real(self, sql, params, many, executor)

    def connected(sender, connection, **kwargs):  # type: ignore[no-untyped-def]
        with log.lock:
            log.connections.append(threading.current_thread().name)

    monkeypatch.setattr(CursorWrapper, "_execute_with_wrappers", counted)
    connection_created.connect(connected, weak=False, dispatch_uid="test_hot_path_io")
    try:
        yield log
    finally:
        connection_created.disconnect(dispatch_uid="test_hot_path_io")
        monkeypatch.setattr(CursorWrapper, "_execute_with_wrappers", real)


@pytest.mark.parametrize("stream", [False, True, "gw"], ids=["json", "stream", "gw"])
def test_steady_state_proxied_requests_run_no_database_query_in_any_thread(gateway, monkeypatch, settings, stream):
    settings.USAGE_TRANSPORT = "database"  # the embedded default: the usage thread writes the ledger itself
    _steady_state(gateway, stream=stream)

    with queries_in_every_thread(monkeypatch) as log:
        for _ in range(N_REQUESTS):
            _call(gateway, stream=stream)
        requests_done = len(log.queries), len(log.connections)
        emitter.flush()  # the usage hand-off of these requests (what the background thread does each second)

    ledger = [sql for _thread, sql in log.queries if "gateway_stats_usagerecord" in sql]
    transaction = ("BEGIN", "SAVEPOINT", "RELEASE", "COMMIT")  # the ledger's one transaction (SQLite: BEGIN IMMEDIATE)
    others = [
        (thread, sql)
        for thread, sql in log.queries
        if "gateway_stats_usagerecord" not in sql and not sql.startswith(transaction)
    ]
    assert requests_done == (0, 0), (
        f"{requests_done[0]} SQL queries and {requests_done[1]} new connections during {N_REQUESTS} "
        f"requests in steady state:\n{log.describe()}"
    )
    assert others == [], f"the hand-off wrote more than the ledger: {others[:5]}"
    # The ledger's batch: on SQLite which of the ids exist (one SELECT) and multi-row INSERTs (its 999-parameter
    # limit splits them every 35 rows); on PostgreSQL one INSERT through a server-binding psycopg cursor, which
    # Django's cursor wrapper does not see. Either way every call of the batch is in the ledger.
    assert len(ledger) <= 1 + math.ceil(N_REQUESTS / 35), ledger
    assert UsageRecord.objects.count() == N_REQUESTS + 2 * WARM_UP_REQUESTS


def test_query_counter_sees_queries_made_in_other_threads(monkeypatch, transactional_db):
    """The instrument itself: a query in another thread is counted (else a zero above would prove nothing)."""
    from django.db import connection

    def query():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        connection.close()

    with queries_in_every_thread(monkeypatch) as log:
        worker = threading.Thread(target=query, name="elsewhere")
        worker.start()
        worker.join(10)
    assert ("elsewhere", "SELECT 1") in log.queries


# --- Redis, this process's keys ---------------------------------------------------------------------
class RedisMonitor:
    """Commands seen by a real MONITOR connection between a start and a stop sentinel, read in a thread."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=MONITOR_TIMEOUT_S)
        self._token = uuid.uuid4().hex
        self.commands: list[str] = []
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, name="redis-monitor", daemon=True)

    def _sentinel(self, what: str) -> str:
        return f"hot-path-io-probe:{self._token}:{what}"

    def _read(self) -> None:
        try:
            with self._client.monitor() as monitor:
                recording = False
                while True:
                    seen = monitor.next_command()
                    if seen.get("client_type") == "lua":
                        continue  # run by a script inside Redis: part of its one round trip, not another
                    command = seen["command"]
                    if self._sentinel("start") in command:
                        recording = True
                        self._ready.set()
                    elif self._sentinel("stop") in command:
                        return
                    elif recording:
                        self.commands.append(command)
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()

    def __enter__(self) -> RedisMonitor:
        self._thread.start()
        # MONITOR only shows commands sent after it started: repeat the start sentinel until it is seen.
        deadline = time.monotonic() + MONITOR_TIMEOUT_S
        while not self._ready.wait(0.05):
            assert time.monotonic() < deadline, "the MONITOR connection never saw the start sentinel"
            self._client.get(self._sentinel("start"))
        assert self.error is None, f"MONITOR failed: {self.error!r}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.get(self._sentinel("stop"))
        self._thread.join(MONITOR_TIMEOUT_S)
        self._client.close()
        assert not self._thread.is_alive(), "the MONITOR reader did not see the stop sentinel in time"
        assert self.error is None, f"MONITOR failed: {self.error!r}"


@pytest.mark.redis
@pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL is unset: the embedded cache makes no round trips")
@pytest.mark.parametrize("stream", [False, True, "gw"], ids=["json", "stream", "gw"])
def test_steady_state_proxied_requests_send_redis_only_the_cache_generation_checks(gateway, stream):
    _steady_state(gateway, stream=stream)

    with RedisMonitor(settings.REDIS_URL) as monitor:
        started = time.monotonic()
        for _ in range(N_REQUESTS):
            _call(gateway, stream=stream)
        elapsed = time.monotonic() - started

    ours = [command for command in monitor.commands if settings.CACHE_KEY_PREFIX in command]
    generation_checks = [c for c in ours if c.split(" ", 1)[0].upper() == "GET" and ":gen:" in c]
    others = [c for c in ours if c not in generation_checks]
    allowed_others = sum(_ALLOWED_PER_REQUEST.values()) * N_REQUESTS
    assert len(others) <= allowed_others, (
        f"{len(others)} Redis commands beyond the generation checks during {N_REQUESTS} requests: {others[:20]}"
    )
    # One GET per namespace per sync interval (plus one at each edge of the window), independent of N.
    bound = len(_SYNCED_NAMESPACES) * (math.ceil(elapsed / settings.CACHE_SYNC_INTERVAL_S) + 2)
    assert len(generation_checks) <= bound, (
        f"{len(generation_checks)} generation checks in {elapsed:.2f} s (bound {bound}): {generation_checks[:20]}"
    )
    assert len(ours) < N_REQUESTS / 4, "Redis traffic grows with the number of requests"


@pytest.mark.redis
@pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL is unset: no Redis to monitor")
def test_redis_monitor_sees_commands_on_this_runs_keys():
    """The instrument itself: a cache read through Django is seen, with this run's prefix."""
    from django.core.cache import cache

    with RedisMonitor(settings.REDIS_URL) as monitor:
        cache.get("hot-path-io-self-test")
    assert [c for c in monitor.commands if settings.CACHE_KEY_PREFIX in c and "hot-path-io-self-test" in c]


@pytest.mark.redis
@pytest.mark.skipif(not settings.REDIS_URL, reason="REDIS_URL is unset: the embedded limiter makes no round trips")
@pytest.mark.parametrize("limits", sorted(_LIMITER_ROUND_TRIPS))
@pytest.mark.parametrize("stream", [False, True, "gw"], ids=["json", "stream", "gw"])
def test_a_limited_key_costs_exactly_the_limiters_round_trips(gateway, stream, limits):
    fields, per_request = _LIMITER_ROUND_TRIPS[limits]
    if stream == "gw" and "max_concurrency" in fields:
        per_request = 2  # routes carry no tokens: the concurrency slot is what is settled
    key = key_make(**fields)
    gateway.headers["Authorization"] = f"Bearer {key.secret}"
    _steady_state(gateway, stream=stream)
    n = N_REQUESTS // 4

    with RedisMonitor(settings.REDIS_URL) as monitor:
        for _ in range(n):
            _call(gateway, stream=stream)
        time.sleep(0.3)  # the settles run off the answers' path: let the last ones reach Redis

    ours = [command for command in monitor.commands if settings.CACHE_KEY_PREFIX in command]
    limiter = [c for c in ours if ":lim:" in c]
    names = {c.split(" ", 1)[0].strip('"').upper() for c in limiter}
    assert names == {"EVALSHA"}, f"the limiter sends only its scripts: {limiter[:5]}"
    assert len(limiter) == per_request * n, f"{len(limiter)} limiter calls for {n} requests: {limiter[:6]}"
    others = [
        c for c in ours if ":lim:" not in c and not (c.split(" ", 1)[0].upper().strip('"') == "GET" and ":gen:" in c)
    ]
    assert others == [], others[:5]
