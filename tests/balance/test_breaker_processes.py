"""Two real gateway processes sharing Redis agree on a deployment's breaker.

Each gateway is its own uvicorn process (one worker each, so a test can tell which one it talks to) on the
test's PostgreSQL database and Redis, with this run's ``CACHE_KEY_PREFIX``. They check:

- a breaker tripped by calls through worker A is open on worker B too (its ``/health/ready`` says so) without
  B ever calling the failing upstream: B answers 503 with ``Retry-After`` and the fake sees no call from it;
  after the cooldown a probe through B closes it, and A serves again;
- calls alternating between both workers to an upstream that keeps failing stop within the bound in
  ``proxy.edge.breaker``'s docstring: ``N x threshold + C`` with N = 2 workers and C = 0 calls in flight
  (sequential calls). Locally it is the threshold itself (the failures are shared within a round trip), but
  that depends on timing, so only the bound is asserted.

PostgreSQL and Redis only (CI): the processes must share the database and the breakers' Redis.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.db import connection

from proxy.models import Deployment
from tests.live_server import process_group_stop
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import key_make, model_make, upstream_make

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.redis,
    pytest.mark.skipif(
        not settings.REDIS_URL or connection.vendor != "postgresql",
        reason="needs Redis and PostgreSQL (two processes share the breakers and the database)",
    ),
]

BIN = Path(sys.executable).parent
ROOT = Path(settings.BASE_DIR)
START_TIMEOUT_S = 60.0
WAIT_S = 10.0
THRESHOLD = 3
COOLDOWN_S = 1.0
MESSAGES = [{"role": "user", "content": "two workers one breaker"}]
CHAT = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class Worker:
    """One gateway process: ``base`` is its URL; ``call`` makes one chat call and returns the answer."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.name = name
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        skip = ("DATABASE_", "REDIS_", "CELERY_", "USAGE_", "PROMETHEUS_", "EVENTS_")
        env = {key: value for key, value in os.environ.items() if not key.startswith(skip)}
        env.update(
            APP_ENV="test",
            DJANGO_SETTINGS_MODULE="apiforge.settings",
            DATABASE_URL=_database_url(),
            REDIS_URL=settings.REDIS_URL,
            CACHE_KEY_PREFIX=settings.CACHE_KEY_PREFIX,
            CELERY_TASK_ALWAYS_EAGER="true",
            USAGE_TRANSPORT="database",
            USAGE_SPOOL_DIR=str(tmp / f"spool-{name}"),
            ACCESS_LOG="false",
            LOG_LEVEL="WARNING",
            PYTHONDONTWRITEBYTECODE="1",
        )
        command = [
            str(BIN / "uvicorn"),
            "apiforge.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--loop",
            "uvloop",
            "--http",
            "apiforge.server:GuardedHttpToolsProtocol",
            "--lifespan",
            "on",
            "--no-access-log",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.logs()
            assert time.monotonic() < deadline, f"{self.name} did not start:\n{self.logs()}"
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def call(self, secret: str, model: str) -> httpx.Response:
        return httpx.post(
            f"{self.base}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES},
            headers={"Authorization": f"Bearer {secret}"},
            timeout=10,
        )

    def breakers(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.base}/health/ready", timeout=5).json()
        return dict(answer.get("breakers", {}))

    def wait_for_breaker(self, key: str, state: str | None) -> None:
        """Until this worker's ``/health/ready`` shows ``key`` in ``state`` (None: not listed, i.e. closed)."""
        deadline = time.monotonic() + WAIT_S
        while (self.breakers().get(key) or {}).get("state") != state:
            assert time.monotonic() < deadline, f"{self.name}: {key} never {state}: {self.breakers()}"
            time.sleep(0.05)

    def logs(self) -> str:
        return f"--- {self.name}\n" + self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        process_group_stop(self.process)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[Worker, Worker]]:
    started = [Worker(tmp_path, "worker-a"), Worker(tmp_path, "worker-b")]
    try:
        for worker in started:
            worker.wait_started()
        yield started[0], started[1]
    finally:
        for worker in started:
            worker.stop()
        for worker in started:
            assert "ERROR" not in worker.log.read_text(errors="replace"), worker.logs()


def _model(name: str, fake: FakeUpstream) -> str:
    upstream = upstream_make(
        name=f"up-{name}",
        base_url=fake.base_url,
        timeout_s=5,
        max_retries=0,
        breaker_failure_threshold=THRESHOLD,
        breaker_cooldown_s=COOLDOWN_S,
    )
    model_make(name, upstream)
    return f"dep:{Deployment.objects.get(model__name=name).pk}"


def test_a_breaker_tripped_on_one_worker_is_open_on_the_other_which_never_calls_the_upstream(workers, fake_upstream):
    a, b = workers
    key = _model("gpt-shared", fake_upstream)
    secret = key_make().secret
    fake_upstream.fail_next(THRESHOLD, status=500)

    statuses = [a.call(secret, "gpt-shared").status_code for _ in range(THRESHOLD + 1)]

    assert statuses == [502] * THRESHOLD + [503]
    assert len(fake_upstream.requests_to(CHAT)) == THRESHOLD
    b.wait_for_breaker(key, "open")  # B learnt it from Redis, without a call of its own
    refused = b.call(secret, "gpt-shared")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "no_healthy_upstream"
    assert 1 <= int(refused.headers["retry-after"]) <= COOLDOWN_S + 1
    assert len(fake_upstream.requests_to(CHAT)) == THRESHOLD, "worker B called an upstream whose breaker is open"

    # Recovery: after the cooldown B's probe succeeds (the fake answers again) and closes it for A too.
    b.wait_for_breaker(key, "half_open")
    assert b.call(secret, "gpt-shared").status_code == 200
    a.wait_for_breaker(key, None)
    assert a.call(secret, "gpt-shared").status_code == 200
    assert len(fake_upstream.requests_to(CHAT)) == THRESHOLD + 2


def test_calls_alternating_between_workers_stop_within_the_documented_bound(workers, fake_upstream):
    a, b = workers
    key = _model("gpt-bound", fake_upstream)
    secret = key_make().secret
    fake_upstream.fail_next(1000, status=500)
    bound = 2 * THRESHOLD + 0  # N x threshold + C

    refused = {a.name: False, b.name: False}
    for _ in range(4 * THRESHOLD):  # far more calls than the bound
        for worker in (a, b):
            status = worker.call(secret, "gpt-bound").status_code
            assert status in (502, 503)
            refused[worker.name] = refused[worker.name] or status == 503
        if all(refused.values()):
            break

    assert all(refused.values()), "a worker kept calling a failing upstream"
    calls = len(fake_upstream.requests_to(CHAT))
    assert THRESHOLD <= calls <= bound, calls
    for worker in (a, b):
        worker.wait_for_breaker(key, "open")
        assert worker.call(secret, "gpt-bound").status_code == 503
    assert len(fake_upstream.requests_to(CHAT)) == calls
