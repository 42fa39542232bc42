"""Limits enforced by real gateway processes: uvicorn with two workers (``tests.gateway_processes``) sharing Redis.

- A key's ``rpm_limit=N`` and 3N concurrent calls on connections served by both workers: exactly N answered,
  2N refused with ``rate_limit_exceeded``; every answer carries ``x-ratelimit-limit-requests``, every refusal
  a ``Retry-After`` in whole seconds, and the ledger has every one of them.
- ``max_concurrency=2`` with slow streams held by both workers: a third call is refused with
  ``concurrency_limit_exceeded``; once the streams end a call is admitted; a client leaving mid-stream frees
  its slot while the other stream goes on.
- A worker killed (SIGKILL) while holding a key's only slot: its lease outlives it (still refused at once),
  then lapses within ``RATE_LIMIT_LEASE_TTL_S`` (2 s here); a living worker's long stream keeps renewing it.
- The limiter's Redis made unreachable (a private ``redis-server`` stopped with SIGSTOP: connections hang; the
  cache stays on the test's Redis through ``tests/limits/limiter_redis_settings.py``):
  fail open by default (answered promptly, counted in ``/metrics``, one WARNING and no traceback), 429
  ``rate_limiter_unavailable`` with ``Retry-After`` when ``RATE_LIMIT_FAIL_OPEN=false``; never a 500, and
  the limits are exact again once it is back (SIGCONT).

One Redis black-holed for the cache and the limiter together still answers promptly (every call waited 2-3 s
while the cache generation checks ran on the event loop; a poller thread makes them now).
A worker paused for 120 ms while Redis is healthy keeps its
limits (it suspended them for a second while the limiter's read timeout was 50 ms).

PostgreSQL and Redis only (CI): the processes share the database and the limiter's Redis. Every wait is a
bounded loop; every process started is stopped.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from django.conf import settings
from django.db import connection

from gateway_stats.models import UsageRecord
from tests.gateway_processes import GatewayProcess, client_port, free_port
from tests.live_server import process_group_stop
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make
from tests.tcp_forwarder import TcpForwarder

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.redis,
    pytest.mark.skipif(
        not settings.REDIS_URL or connection.vendor != "postgresql",
        reason="needs Redis and PostgreSQL (the worker processes share the limiter's Redis and the database)",
    ),
]

MODEL = "gpt-limited"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "limits across worker processes"}]
WAIT_S = 10.0
PROMPT_S = 2.0  # generous: an answer this slow would mean a TCP timeout was waited for
RETRY_AFTER = re.compile(r"[1-9][0-9]*")
DURATION = re.compile(r"[0-9]+ms|([0-9]+h)?([0-9]+m)?[0-9]+s")  # OpenAI's: 20ms, 1s, 6m0s
LEASE_TTL_S = 2.0


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway: ``gateways(name, workers=2, **env)``; all stopped at the end."""
    started: list[GatewayProcess] = []

    def start(name: str, workers: int = 2, **env: str) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path, name, workers=workers, **env)
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in reversed(started):
        gateway.stop()


_opened: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _clients_closed() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def _model(fake: FakeUpstream) -> None:
    # Committed before a gateway starts: its first call reads them from the database.
    model_make(MODEL, upstream_make(base_url=fake.base_url, timeout_s=10, max_retries=0))


def _headers(secret: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {secret}"}
    if request_id:
        headers["x-request-id"] = request_id
    return headers


def _call(client: httpx.Client, secret: str, request_id: str | None = None) -> httpx.Response:
    return client.post(CHAT, json={"model": MODEL, "messages": MESSAGES}, headers=_headers(secret, request_id))


def _code(response: httpx.Response) -> str | None:
    return response.json()["error"]["code"] if response.status_code != 200 else None


def _assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == code, response.text
    assert RETRY_AFTER.fullmatch(response.headers["retry-after"]), response.headers


def _clients(gateway: GatewayProcess, count: int) -> list[tuple[httpx.Client, int]]:
    """``count`` clients of one connection each, opened at once (so both workers accept some), with the pid
    of the worker that holds each connection."""

    def open_one(_: int) -> tuple[httpx.Client, int]:
        client = httpx.Client(base_url=gateway.base, timeout=WAIT_S, limits=httpx.Limits(max_connections=1))
        _opened.append(client)  # closed after the test
        answer = client.get("/health")
        assert answer.status_code == 200
        owner = gateway.owner(client_port(answer))
        assert owner is not None
        return client, owner

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(open_one, range(count)))


def _per_worker(gateway: GatewayProcess, each: int) -> dict[int, list[httpx.Client]]:
    """At least ``each`` connected clients on every worker, by worker pid (opened in rounds, bounded)."""
    by_worker: dict[int, list[httpx.Client]] = {}
    for _ in range(5):
        for client, pid in _clients(gateway, 4 * each):
            by_worker.setdefault(pid, []).append(client)
        if len(by_worker) == gateway.workers and all(len(found) >= each for found in by_worker.values()):
            return by_worker
    raise AssertionError(f"the connections did not reach every worker: { {p: len(c) for p, c in by_worker.items()} }")


class _Stream:
    """A streamed chat call held open: ``start()`` reads its first content event, ``next()`` one more."""

    def __init__(self, client: httpx.Client, secret: str) -> None:
        self._stack = ExitStack()
        body = {"model": MODEL, "messages": MESSAGES, "stream": True}
        self.response = self._stack.enter_context(client.stream("POST", CHAT, json=body, headers=_headers(secret)))
        self._lines = self.response.iter_lines()

    def start(self) -> _Stream:
        assert self.response.status_code == 200, self.response.read()
        self.next()
        return self

    def next(self) -> str:
        for line in self._lines:
            if line.startswith("data: "):
                return line
        raise AssertionError("the stream ended")

    def rest(self) -> list[str]:
        return [line for line in self._lines if line.startswith("data: ")]

    def close(self) -> None:
        self._stack.close()


def _poll(what: str, attempt: Callable[[], bool], timeout: float = WAIT_S) -> float:
    """Call ``attempt`` until it is true (every 50 ms, at most ``timeout`` s); the seconds it took."""
    started = time.monotonic()
    while not attempt():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


# --- Requests per minute: exact across workers ---------------------------------------------------------------

N = 20


def test_rpm_limit_admits_exactly_n_of_3n_concurrent_calls_served_by_two_workers(gateways, upstream):
    _model(upstream)
    secret = key_make(rpm_limit=N).secret
    gateway = gateways("rpm")
    clients = _clients(gateway, 3 * N)
    assert len({pid for _, pid in clients}) == 2, "one worker accepted every connection"
    start = threading.Barrier(3 * N)

    def call(index: int) -> tuple[httpx.Response, int | None]:
        client = clients[index][0]
        start.wait(WAIT_S)
        answer = _call(client, secret, f"rpm-{index}")
        return answer, gateway.owner(client_port(answer))

    with ThreadPoolExecutor(3 * N) as pool:
        answers = list(pool.map(call, range(3 * N)))

    assert Counter(answer.status_code for answer, _ in answers) == {200: N, 429: 2 * N}
    assert len({owner for _, owner in answers}) == 2, "one worker answered every call"
    for answer, _ in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == str(N)
        if answer.status_code == 429:
            _assert_refused(answer, "rate_limit_exceeded")
            assert int(answer.headers["retry-after"]) <= 61  # 1 s buckets: freed at most 1 s after 60 s
    # Each admitted call saw its own count (one atomic check across both workers): remaining N-1 down to 0.
    remaining = sorted(
        int(answer.headers["x-ratelimit-remaining-requests"]) for answer, _ in answers if answer.status_code == 200
    )
    assert remaining == list(range(N))
    assert all(DURATION.fullmatch(answer.headers["x-ratelimit-reset-requests"]) for answer, _ in answers)
    assert len(upstream.requests_to(CHAT)) == N  # the refused never reached the upstream

    def all_in_the_ledger() -> bool:
        return UsageRecord.objects.filter(request_id__startswith="rpm-").count() >= 3 * N

    _poll("the ledger rows", all_in_the_ledger)
    rows = UsageRecord.objects.filter(request_id__startswith="rpm-")
    assert Counter((row.status, row.error_code) for row in rows) == {(200, ""): N, (429, "rate_limit_exceeded"): 2 * N}


# --- Concurrency: slow streams on both workers ---------------------------------------------------------------


def test_max_concurrency_holds_across_workers_and_frees_a_slot_when_a_stream_ends_or_its_client_leaves(
    gateways, upstream
):
    _model(upstream)
    secret = key_make(max_concurrency=2).secret
    gateway = gateways("concurrency")
    upstream.chunk_delay = 0.1
    upstream.chunks = 10  # about a second
    (first, first_spare, *_), (second, second_spare, *_) = _per_worker(gateway, 2).values()

    streams = [_Stream(first, secret).start(), _Stream(second, secret).start()]
    owners = {gateway.owner(client_port(stream.response)) for stream in streams}
    assert len(owners) == 2, "both streams on one worker"
    for spare in (first_spare, second_spare):  # each worker refuses a third call
        refused = _call(spare, secret)
        _assert_refused(refused, "concurrency_limit_exceeded")
    for stream in streams:
        assert stream.rest()[-1] == "data: [DONE]"
        stream.close()
    _poll("a call admitted after the streams ended", lambda: _call(first_spare, secret).status_code == 200)

    # A client that leaves mid-stream frees its slot; the other stream goes on.
    upstream.chunks = 200  # 20 s: still running when the test is done with it
    kept, leaving = _Stream(first, secret).start(), _Stream(second, secret).start()
    _assert_refused(_call(first_spare, secret), "concurrency_limit_exceeded")
    leaving.close()
    second.close()

    def admitted() -> bool:
        answer = _call(first_spare, secret)
        assert answer.status_code in (200, 429), answer.text
        return answer.status_code == 200

    _poll("the slot of the client that left", admitted)
    assert kept.next().startswith("data: {")  # still streaming: the freed slot was the one that left
    assert upstream.wait_for_disconnect()
    kept.close()


# --- A killed worker's leases --------------------------------------------------------------------------------


def test_a_killed_workers_lease_lapses_within_its_ttl_while_a_living_workers_stream_keeps_it(gateways, upstream):
    _model(upstream)
    secret = key_make(max_concurrency=1).secret
    gateway = gateways("lease", RATE_LIMIT_LEASE_TTL_S=str(LEASE_TTL_S))
    upstream.chunk_delay = 0.1
    upstream.chunks = 600  # a minute: ended by the kill
    holder = httpx.Client(base_url=gateway.base, timeout=WAIT_S)
    other = httpx.Client(base_url=gateway.base, timeout=WAIT_S)
    _opened.extend((holder, other))
    stream = _Stream(holder, secret).start()
    worker = gateway.owner(client_port(stream.response))
    assert worker in gateway.worker_pids()
    _assert_refused(_call(other, secret), "concurrency_limit_exceeded")
    time.sleep(LEASE_TTL_S + 0.5)  # longer than the lease: the living worker renews it
    stream.next()
    _assert_refused(_call(other, secret), "concurrency_limit_exceeded")

    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()

    def fresh_call() -> httpx.Response:
        with httpx.Client(base_url=gateway.base, timeout=WAIT_S) as fresh:  # never a dead worker's connection
            return _call(fresh, secret)

    _assert_refused(fresh_call(), "concurrency_limit_exceeded")  # the lease outlives its worker
    with pytest.raises(httpx.HTTPError):
        stream.rest()
    stream.close()

    def admitted() -> bool:
        answer = fresh_call()
        assert answer.status_code in (200, 429), answer.text
        return answer.status_code == 200

    _poll("the dead worker's lease lapsing", admitted, timeout=LEASE_TTL_S + 3)
    assert time.monotonic() - killed_at <= LEASE_TTL_S + 1.5


# --- The limiter's Redis unreachable ------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of this test on a free port; ``freeze()`` (SIGSTOP) makes it a black hole."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with (tmp / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def answers() -> bool:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=0.5) as client:
                    return bool(client.ping())
            except redis.RedisError:
                return False

        _poll("the private redis-server", answers)

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.thaw()  # a stopped process would hold its SIGTERM until continued
        process_group_stop(self.process)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _metric(gateway: GatewayProcess, name: str, labels: str) -> float:
    text = httpx.get(gateway.url("/metrics"), timeout=WAIT_S).text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _assert_limiter_warned_without_traceback(gateway: GatewayProcess) -> int:
    """The limiter said so in one WARNING line (per worker and retry interval), with no traceback attached and
    none passing through the limiter or the admission; nothing logged an ERROR. (Other users of the same Redis,
    the cache among them, log their own warnings with tracebacks: not the limiter's.)"""
    lines = gateway.log.read_text(errors="replace").splitlines()
    warned = [index for index, line in enumerate(lines) if "proxy.edge.limits: rate limits: Redis unavailable" in line]
    assert warned, gateway.logs()
    assert all(" WARNING " in lines[index] for index in warned)
    assert not [index for index in warned if index + 1 < len(lines) and lines[index + 1].startswith("Traceback")]
    assert not [line for line in lines if "proxy/edge/limits.py" in line or "proxy/edge/admit.py" in line]
    assert not [line for line in lines if " ERROR " in line or line.startswith("ERROR")], gateway.logs()
    return len(warned)


def _timed(client: httpx.Client, secret: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = _call(client, secret)
    return answer, time.monotonic() - started


def _limiter_redis_env(url: str, **extra: str) -> dict[str, str]:
    """Only the limiter on ``url``: the cache and the channel layer stay on the test's Redis."""
    return {
        "DJANGO_SETTINGS_MODULE": "tests.limits.limiter_redis_settings",
        "REDIS_URL": url,
        "CACHE_REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.REDIS_URL,
        **extra,
    }


def _answers_while_frozen(
    clients: list[httpx.Client], secret: str, span_s: float
) -> list[tuple[httpx.Response, float]]:
    """Calls alternating between the workers for ``span_s`` seconds (several breaker retry intervals)."""
    answers: list[tuple[httpx.Response, float]] = []
    started = time.monotonic()
    while time.monotonic() - started < span_s:
        answers.append(_timed(clients[len(answers) % len(clients)], secret))
        time.sleep(0.05)
    return answers


FROZEN_S = 2.5  # longer than RATE_LIMIT_REDIS_RETRY_S (1 s) twice over, and than CACHE_SYNC_INTERVAL_S


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail_open", "fail_closed"])
def test_limiter_redis_black_holed_answers_promptly_never_500_and_limits_are_exact_once_it_is_back(
    gateways, upstream, private_redis, fail_open
):
    _model(upstream)
    limited = key_make(rpm_limit=3).secret
    probe = key_make(rpm_limit=1).secret
    fresh = key_make(rpm_limit=5).secret
    extra = {} if fail_open else {"RATE_LIMIT_FAIL_OPEN": "false"}
    gateway = gateways("limiter-redis-down", **_limiter_redis_env(private_redis.url, **extra))
    clients = [found[0] for found in _per_worker(gateway, 1).values()]
    for client in clients:
        assert _call(client, limited).status_code == 200

    private_redis.freeze()
    answers = _answers_while_frozen(clients, limited, FROZEN_S)
    assert len(answers) > 10
    for answer, took in answers:
        assert took < PROMPT_S, f"an answer took {took:.2f} s"
        if fail_open:
            assert answer.status_code == 200, answer.text  # far more than rpm_limit=3: served, not counted
        else:
            _assert_refused(answer, "rate_limiter_unavailable")
    outcome = "open" if fail_open else "closed"
    assert _metric(gateway, "apiforge_ratelimit_unavailable_total", f'outcome="{outcome}"') > 0
    warnings = _assert_limiter_warned_without_traceback(gateway)
    assert warnings <= gateway.workers * (math.ceil(FROZEN_S / 1.0) + 1)  # once per worker and retry interval

    private_redis.thaw()
    counting: set[int | None] = set()

    def both_workers_count_again() -> bool:
        for client in clients:
            answer = _call(client, probe)
            assert answer.status_code in (200, 429), answer.text
            if _code(answer) == "rate_limit_exceeded":
                counting.add(gateway.owner(client_port(answer)))
        return len(counting - {None}) == 2

    _poll("the limiter counting again on both workers", both_workers_count_again)
    statuses = [_call(clients[index % 2], fresh).status_code for index in range(6)]
    assert statuses == [200] * 5 + [429]  # exact again: the fresh key's sixth call within the minute


def test_one_redis_black_holed_for_cache_and_limiter_still_answers_promptly(gateways, upstream, private_redis):
    _model(upstream)
    limited = key_make(rpm_limit=3).secret
    gateway = gateways("redis-down", REDIS_URL=private_redis.url)
    clients = [found[0] for found in _per_worker(gateway, 1).values()]
    for client in clients:
        assert _call(client, limited).status_code == 200

    private_redis.freeze()
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # past CACHE_SYNC_INTERVAL_S (0.5 s)
        for client in clients:
            try:
                answer, took = _timed(client, limited)
            except httpx.TimeoutException as exc:
                raise AssertionError(f"no answer within {WAIT_S} s") from exc
            assert answer.status_code == 200, answer.text
            assert took < PROMPT_S, f"an answer took {took:.2f} s"


# --- A worker stalled for a moment while Redis is healthy ---------------------------------------------------


def test_a_worker_stalled_for_a_moment_does_not_suspend_the_limits_while_redis_is_healthy(request, gateways, upstream):
    _model(upstream)
    limit = 10
    secret = key_make(rpm_limit=limit).secret
    # The limiter's Redis a network hop away (~1 ms, as on another host), the cache's on the loopback.
    hop = TcpForwarder(int(urlsplit(settings.REDIS_URL).port or 6379)).start()
    request.addfinalizer(hop.cut)
    limiter_url = urlsplit(settings.REDIS_URL)._replace(netloc=f"127.0.0.1:{hop.port}").geturl()
    gateway = gateways("stalled", workers=1, **_limiter_redis_env(limiter_url))
    (worker,) = gateway.worker_pids()
    stop = threading.Event()

    def caller(_: int) -> Counter[int]:
        seen: Counter[int] = Counter()
        with httpx.Client(base_url=gateway.base, timeout=WAIT_S) as client:
            while not stop.is_set():
                seen[_call(client, secret).status_code] += 1
        return seen

    # Four callers keep calls in flight (more would slow the forwarder past the timeout without any pause).
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(caller, index) for index in range(4)]
        try:
            time.sleep(0.5)  # the limit is reached: every call now is a 429 after one round trip to Redis
            for _ in range(20):  # 120 ms pauses (a GC, a busy host, a VM's steal) while calls are in flight
                os.kill(worker, signal.SIGSTOP)
                time.sleep(0.12)
                os.kill(worker, signal.SIGCONT)
                time.sleep(0.3)
                if "rate limits: Redis unavailable" in gateway.log.read_text(errors="replace"):
                    time.sleep(0.5)
                    break
        finally:
            os.kill(worker, signal.SIGCONT)
            stop.set()
        statuses = sum((future.result() for future in running), Counter())

    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] == limit, f"{statuses}\n{gateway.logs()}"
