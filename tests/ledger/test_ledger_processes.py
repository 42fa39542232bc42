"""The ledger across real processes: uvicorn workers, a Celery worker on Redis, PostgreSQL — and faults.

Every test counts ledger rows after a real ``celery worker`` drained the broker: exactly one row per call,
with the upstream's exact tokens and costs, whatever happened in between:

- K concurrent calls, streamed and not, through two uvicorn worker processes;
- the broker unreachable during the traffic (a forwarder in front of Redis, cut and restored): the calls
  are served, their records spooled, then replayed;
- the consumer killed with SIGKILL in the middle of a batch (its insert held by a table lock): the broker
  delivers its unacknowledged messages again to the next worker;
- the gateway stopped with SIGTERM before its usage thread's next flush: the shutdown flush sends it all.

PostgreSQL and Redis only (CI): SQLite's in-memory test database cannot be shared with other processes, and
without Redis there is no broker (the embedded default writes the ledger in-process, tested in test_ledger).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from django.conf import settings
from django.db import connection

from gateway_stats.models import UsageRecord
from tests.live_server import process_group_stop
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make
from tests.tcp_forwarder import TcpForwarder

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not settings.REDIS_URL or connection.vendor != "postgresql",
        reason="needs PostgreSQL and Redis (processes share the database and the broker)",
    ),
]

BIN = Path(sys.executable).parent
ROOT = Path(settings.BASE_DIR)
MESSAGES = [{"role": "user", "content": "five words in this message"}]
EXPECTED = FakeUpstream.expected_usage(MESSAGES)
PRICE_IN, PRICE_OUT = Decimal("0.5"), Decimal("1.5")
DRAIN_TIMEOUT_S = 60.0
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _redis_db() -> str:
    return settings.REDIS_URL.rsplit("/", 1)[1] if settings.REDIS_URL.count("/") > 2 else "0"


class Stack:
    """This test's processes: gateways and Celery workers, with the broker behind a forwarder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = TcpForwarder(
            6379 if "6379" in settings.REDIS_URL else int(settings.REDIS_URL.split(":")[2].split("/")[0])
        )
        self.broker.start()
        self.spool_dir = tmp / "spool"
        self.processes: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        skip = ("DATABASE_", "REDIS_", "CELERY_", "USAGE_", "PROMETHEUS_", "EVENTS_")
        env = {key: value for key, value in os.environ.items() if not key.startswith(skip)}
        env.update(
            APP_ENV="test",
            DJANGO_SETTINGS_MODULE="apiforge.settings",
            DATABASE_URL=_database_url(),
            REDIS_URL=settings.REDIS_URL,
            CELERY_BROKER_URL=f"redis://127.0.0.1:{self.broker.port}/{_redis_db()}",
            CELERY_RESULT_BACKEND=settings.REDIS_URL,
            CELERY_QUEUE=settings.CELERY_TASK_DEFAULT_QUEUE,
            CACHE_KEY_PREFIX=settings.CACHE_KEY_PREFIX,
            USAGE_SPOOL_DIR=str(self.spool_dir),
            USAGE_TRANSPORT="celery",
            USAGE_TRANSPORT_RETRY_S="0.5",
            CELERY_VISIBILITY_TIMEOUT_S="3",
            ACCESS_LOG="false",
            LOG_LEVEL="WARNING",
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.update(extra)
        return env

    def _start(self, command: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes.append(process)
        return process

    def gateway(self, workers: int = 2, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
        port = _free_port()
        command = [
            str(BIN / "uvicorn"),
            "apiforge.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "apiforge.server:GuardedHttpToolsProtocol",
            "--lifespan",
            "on",
            "--no-access-log",
        ]
        process = self._start(command, f"gateway-{port}", self.env(**extra))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, self.logs()
            assert time.monotonic() < deadline, "the gateway did not start:\n" + self.logs()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return process, base
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def worker(self) -> subprocess.Popen[bytes]:
        command = [
            str(BIN / "celery"),
            "-A",
            "apiforge",
            "worker",
            "-Q",
            settings.CELERY_TASK_DEFAULT_QUEUE,
            "--pool",
            "solo",
            "-c",
            "1",
            "-n",
            f"ledger-{uuid.uuid4().hex[:8]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ]
        # The worker reaches Redis directly: the faults here are the gateway's (its broker connection cut), and
        # a worker's own reconnection backoff would only slow the test.
        return self._start(command, "worker", self.env(CELERY_BROKER_URL=settings.REDIS_URL))

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in self.tmp.glob("*.log")
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process_group_stop(process)
        self.broker.cut()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def key(fake_upstream):
    upstream = upstream_make(base_url=fake_upstream.base_url, timeout_s=10)
    model_make("gpt-test", upstream, upstream_model="fake-model-1", input_price="0.5", output_price="1.5")
    return key_make()


def _calls(base: str, secret: str, count: int, tag: str) -> list[str]:
    """``count`` calls, half of them streamed, 16 at a time, through the official client; their request ids."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=30)

    def call(index: int) -> str:
        request_id = f"{tag}-{index}"
        headers = {"x-request-id": request_id}
        if index % 2:
            assert list(
                client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True, extra_headers=headers)
            )
        else:
            answer = client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_headers=headers)
            assert answer.usage is not None
            assert answer.usage.total_tokens == EXPECTED["total_tokens"]
        return request_id

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(call, range(count)))


def _wait_for_rows(tag: str, count: int, stack: Stack) -> list[UsageRecord]:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        found = UsageRecord.objects.filter(request_id__startswith=f"{tag}-").count()
        if found >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(1.5)  # anything more (a double) would arrive now
    rows = list(UsageRecord.objects.filter(request_id__startswith=f"{tag}-"))
    assert len(rows) == count, f"{len(rows)} ledger rows for {count} calls\n{stack.logs()}"
    return rows


def _assert_exact(rows: list[UsageRecord], request_ids: list[str]) -> None:
    assert sorted(row.request_id for row in rows) == sorted(request_ids)
    assert len({row.event_id for row in rows}) == len(rows)
    cost = (EXPECTED["prompt_tokens"] * PRICE_IN + EXPECTED["completion_tokens"] * PRICE_OUT) / 1000
    for row in rows:
        assert (row.prompt_tokens, row.completion_tokens) == (EXPECTED["prompt_tokens"], EXPECTED["completion_tokens"])
        assert row.cost == cost
        assert row.status == 200
    assert sum(row.cost for row in rows) == cost * len(rows)


def test_concurrent_calls_through_two_workers_are_each_in_the_ledger_once(stack, key):
    stack.worker()
    _gateway, base = stack.gateway(workers=2)

    request_ids = _calls(base, key.secret, 80, "two-workers")

    rows = _wait_for_rows("two-workers", 80, stack)
    _assert_exact(rows, request_ids)
    assert {row.stream for row in rows} == {True, False}


def _spooled_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.spool")) if directory.exists() else 0


def test_broker_unreachable_during_traffic_spools_and_replays_every_record_once(stack, key):
    stack.worker()
    _gateway, base = stack.gateway(workers=2)
    stack.broker.cut()

    request_ids = _calls(base, key.secret, 60, "broker-down")

    deadline = time.monotonic() + 15
    while _spooled_bytes(stack.spool_dir) == 0:
        assert time.monotonic() < deadline, "nothing was spooled while the broker was unreachable\n" + stack.logs()
        time.sleep(0.2)
    assert UsageRecord.objects.filter(request_id__startswith="broker-down-").count() == 0
    stack.broker.restore()

    rows = _wait_for_rows("broker-down", 60, stack)
    _assert_exact(rows, request_ids)
    deadline = time.monotonic() + 15
    while _spooled_bytes(stack.spool_dir):
        assert time.monotonic() < deadline, "the spool was not emptied after its replay"
        time.sleep(0.2)


def _locks_waiting() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


def test_a_consumer_killed_in_the_middle_of_a_batch_loses_and_doubles_nothing(stack, key):
    _gateway, base = stack.gateway(workers=1, USAGE_MESSAGE_ROWS="10")
    request_ids = _calls(base, key.secret, 120, "killed")
    time.sleep(2.5)  # the gateway's usage thread has published every batch (12 messages) by now

    holder = psycopg.connect(_database_url().replace("postgres://", "postgresql://"), autocommit=False)
    try:
        holder.execute(f"LOCK TABLE {UsageRecord._meta.db_table} IN SHARE ROW EXCLUSIVE MODE")
        doomed = stack.worker()
        deadline = time.monotonic() + START_TIMEOUT_S
        while _locks_waiting() == 0:
            assert time.monotonic() < deadline, "the consumer never reached its insert\n" + stack.logs()
            time.sleep(0.1)
        os.killpg(doomed.pid, signal.SIGKILL)  # in the middle of its batch: received, not acknowledged
        doomed.wait(10)
    finally:
        holder.rollback()
        holder.close()
    assert UsageRecord.objects.filter(request_id__startswith="killed-").count() == 0

    stack.worker()  # delivers the rest, and the dead one's messages once their visibility timeout passed

    rows = _wait_for_rows("killed", 120, stack)
    _assert_exact(rows, request_ids)


def test_sigterm_flushes_what_the_usage_thread_still_held(stack, key):
    stack.worker()
    gateway, base = stack.gateway(workers=1, USAGE_FLUSH_INTERVAL_S="600")  # only the shutdown flush sends

    request_ids = _calls(base, key.secret, 40, "sigterm")
    time.sleep(1)
    assert UsageRecord.objects.filter(request_id__startswith="sigterm-").count() == 0
    process_group_stop(gateway)  # SIGTERM (uvicorn shuts down, then re-raises it: the exit status says -15)
    assert gateway.returncode in (0, -signal.SIGTERM), stack.logs()

    rows = _wait_for_rows("sigterm", 40, stack)
    _assert_exact(rows, request_ids)
