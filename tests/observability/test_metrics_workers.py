"""``/metrics`` with two worker processes: ``make serve``'s command line, multiprocess mode, exact counts.

One ``make serve``-style server (read from ``make -n serve``, WEB_CONCURRENCY=2) runs in a subprocess on a
throwaway SQLite database with production settings; its upstream is a fake one in this process. Calls are
made on fresh connections from several threads, so both workers serve some; every scrape, whichever worker
answers it, must show exactly the calls made, and each worker's own file must hold a share of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from tests.live_server import process_group_stop
from tests.observability.conftest import MESSAGES, free_port, sample, samples_parse
from tests.proxy.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TOKEN = "two-workers-metrics-token-0123456789"
CALLS = 24
WAIT_S = 20.0

SEED = """
import django, json, sys
from decimal import Decimal
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from accounts.models import User
from keys.services import key_create
from proxy.models import Deployment, Model, Upstream
user = User.objects.create_user(username="workers", email="workers@example.com", password=None)
key = key_create(owner=user, name="workers")
upstream = Upstream.objects.create(name="fake-up", kind="openai", base_url=sys.argv[1], timeout_s=10, max_retries=0)
model = Model.objects.create(name="gpt-two", input_price_per_1k=Decimal("0.5"), output_price_per_1k=Decimal("1.5"))
Deployment.objects.create(model=model, upstream=upstream, upstream_model="fake-two")
print(json.dumps({"key": key.secret}))
"""


def _serve_command(port: int) -> list[str]:
    """``make serve``'s server line (metrics directory set-up included) for 127.0.0.1:``port``, two workers."""
    dry = subprocess.run(
        ["make", "-s", "-n", "serve", "HOST=127.0.0.1", f"PORT={port}", "WEB_CONCURRENCY=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (line,) = [line for line in dry.stdout.replace("\\\n", " ").splitlines() if "uvicorn apiforge.asgi" in line]
    assert "PROMETHEUS_MULTIPROC_DIR" in line
    return ["sh", "-c", line.replace(".venv/bin/uvicorn", str(VENV_BIN / "uvicorn"), 1)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("two-workers")
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # a previous run's file: make serve removes it
    upstream = FakeUpstream().start()
    skip = ("DATABASE_", "REDIS_", "CELERY_", "FORWARDED_ALLOW_IPS", "METRICS_", "EVENTS_", "USAGE_", "PROMETHEUS_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(skip)}
    env.update(
        APP_ENV="production",
        SECRET_KEY="test-only-secret-key-for-the-two-workers-metrics-check",
        ALLOWED_HOSTS="*",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        STATIC_ROOT=str(tmp / "static"),
        CACHE_KEY_PREFIX=f"apiforge-two-workers-{os.getpid()}",
        USAGE_SPOOL_DIR=str(tmp / "spool"),
        LOG_LEVEL="WARNING",
        PYTHONDONTWRITEBYTECODE="1",
        METRICS_TOKEN=TOKEN,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    seed_env = {key: value for key, value in env.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    seeded = subprocess.run(
        [sys.executable, "-c", SEED, upstream.base_url],
        cwd=ROOT,
        env=seed_env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    key = json.loads(seeded.stdout.strip().splitlines()[-1])["key"]
    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            _serve_command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start within 60 s:\n" + log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield type("Served", (), {"base": base, "key": key, "metrics_dir": metrics_dir, "log": log})
    finally:
        process_group_stop(process)
        upstream.stop()


def _scrape(base: str) -> dict[Any, float]:
    # A new connection each time: any of the two workers may answer.
    response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Connection": "close"})
    assert response.status_code == 200, response.text
    return samples_parse(response.text)


def _call(base: str, key: str, n: int) -> None:
    # Its own client (and connection) per call, so the kernel spreads the calls over both workers.
    with openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=20) as client:
        if n % 3 == 0:
            assert list(client.chat.completions.create(model="gpt-two", messages=MESSAGES, stream=True))
        else:
            client.chat.completions.create(model="gpt-two", messages=MESSAGES)


def _requests(samples: dict[Any, float]) -> float:
    labels = {"endpoint": "/v1/chat/completions", "model": "gpt-two", "upstream": "fake-up", "status": "200"}
    return sample(samples, "apiforge_requests_total", **labels)


def test_make_serve_emptied_the_metrics_directory_of_the_previous_run(served: Any) -> None:
    assert not (served.metrics_dir / "counter_999999.db").exists()


def test_metrics_count_exactly_the_calls_made_through_two_workers(served: Any) -> None:
    assert _requests(_scrape(served.base)) == 0
    barrier = threading.Barrier(8)

    def call(n: int) -> None:
        if n < 8:
            barrier.wait(10)  # the first eight at once: both workers are busy from the start
        _call(served.base, served.key, n)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(call, range(CALLS)))

    # The workers' usage threads flush every second: wait for the count, then see it is exact on every scrape.
    deadline = time.monotonic() + WAIT_S
    while _requests(_scrape(served.base)) < CALLS and time.monotonic() < deadline:
        time.sleep(0.2)
    scrapes = [_scrape(served.base) for _ in range(6)]
    expected = FakeUpstream.expected_usage(MESSAGES)
    for samples in scrapes:
        assert _requests(samples) == CALLS
        assert sample(samples, "apiforge_prompt_tokens_total", model="gpt-two") == CALLS * expected["prompt_tokens"]
        assert sample(samples, "apiforge_completion_tokens_total", model="gpt-two") == (
            CALLS * expected["completion_tokens"]
        )
        streams = len(range(0, CALLS, 3))
        assert sample(samples, "apiforge_time_to_first_byte_seconds_count", model="gpt-two") == streams
        assert sample(samples, "apiforge_request_duration_seconds_count", endpoint="/v1/chat/completions") == CALLS
        assert sample(samples, "apiforge_usage_queue_depth") == 0

    # Each worker counted its own share in its own file: both served calls.
    per_worker = []
    for path in sorted(served.metrics_dir.glob("counter_*.db")):
        merged = MultiProcessCollector.merge([str(path)])
        per_worker.append(
            sum(
                s.value
                for family in merged
                for s in family.samples
                if s.name == "apiforge_requests_total" and s.labels.get("model") == "gpt-two"
            )
        )
    served_calls = [count for count in per_worker if count]
    assert sum(served_calls) == CALLS
    assert len(served_calls) == 2, f"both workers should have served calls: {per_worker}"


def test_the_two_workers_scrape_is_protected_in_production(served: Any) -> None:
    assert httpx.get(f"{served.base}/metrics").status_code == 401
    assert httpx.get(f"{served.base}/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
