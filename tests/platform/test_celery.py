"""Celery: a task round-trips through the real Redis broker and a real worker process.

Without ``REDIS_URL`` there is no broker: tasks run in-process (eager), which is
what the embedded default does, and that is tested instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.result import EagerResult
from django.conf import settings

from apiforge.tasks import ping

BASE_DIR = Path(settings.BASE_DIR)
CELERY = Path(sys.executable).with_name("celery")
ROUND_TRIP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

needs_redis = pytest.mark.skipif(
    not os.environ.get("REDIS_URL"), reason="REDIS_URL is unset: no broker, Celery tasks run in-process (eager)"
)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real ``celery worker`` on this run's queue, with this process's environment; stopped afterwards."""
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    env = {
        **os.environ,
        "APP_ENV": "test",
        "DJANGO_SETTINGS_MODULE": "apiforge.settings",
        # The same prefix and queue as this process (the test default derives them from the pid).
        "CACHE_KEY_PREFIX": settings.CACHE_KEY_PREFIX,
        "CELERY_QUEUE": queue,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(CELERY),
                "-A",
                "apiforge",
                "worker",
                "-Q",
                queue,
                "--pool",
                "solo",
                "-c",
                "1",
                "-n",
                f"test-{uuid.uuid4().hex[:8]}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
            ],
            cwd=BASE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, log_path
    finally:
        process.terminate()  # SIGTERM: warm shutdown
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        _queue_keys_delete(queue)


def _queue_keys_delete(queue: str) -> None:
    """Remove what kombu keeps in Redis for this run's queue (the queue itself and its bindings)."""
    from django_redis import get_redis_connection

    get_redis_connection("default").delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


@needs_redis
def test_ping_round_trips_through_the_redis_broker_and_a_real_worker(
    worker: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log_path = worker
    assert not settings.CELERY_TASK_ALWAYS_EAGER

    result = ping.delay("x")
    try:
        deadline = time.monotonic() + ROUND_TRIP_TIMEOUT_S
        while not result.ready():
            if process.poll() is not None:
                pytest.fail(f"the worker exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no answer within {ROUND_TRIP_TIMEOUT_S} s; worker log:\n{log_path.read_text()}")
            time.sleep(0.05)

        assert result.get(timeout=1) == "pong:x"
        assert not isinstance(result, EagerResult)
        # The worker logs the success just after storing the result: give it a moment.
        line = f"Task apiforge.ping[{result.id}] succeeded"
        deadline = time.monotonic() + 5
        while line not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert line in log_path.read_text()
    finally:
        result.forget()


@pytest.mark.skipif(bool(os.environ.get("REDIS_URL")), reason="REDIS_URL is set: tasks go through the broker")
def test_without_a_broker_tasks_run_in_process() -> None:
    assert settings.CELERY_TASK_ALWAYS_EAGER

    result = ping.delay("x")

    assert isinstance(result, EagerResult)
    assert result.get(timeout=1) == "pong:x"
