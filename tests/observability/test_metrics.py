"""``GET /metrics``: Prometheus text that counts exactly the calls made, and who may read it."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client

from gateway_stats import metrics
from tests.observability.conftest import MESSAGES, sample, samples_parse
from tests.proxy.fake_upstream import FakeUpstream
from tests.proxy.helpers import usage_flush

TOKEN = "metrics-scrape-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]


def scrape(client: Client, **extra: Any) -> dict[Any, float]:
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples_parse(response.content.decode())


def test_metrics_count_exactly_the_calls_made_with_their_tokens_cost_and_latencies(gateway: Any) -> None:
    client = Client()
    usage_flush()
    before = scrape(client)
    labels = {"endpoint": "/v1/chat/completions", "model": "gpt-obs", "upstream": "obs-upstream", "status": "200"}

    for _ in range(3):
        gateway.client.chat.completions.create(model="gpt-obs", messages=MESSAGES)
    for chunk in gateway.client.chat.completions.create(model="gpt-obs", messages=MESSAGES, stream=True):
        assert chunk is not None
    with pytest.raises(Exception, match="404"):
        gateway.client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    # Counted from the usage thread's batches, not on the request path: nothing moves before the flush.
    unflushed = scrape(client)
    assert sample(unflushed, "apiforge_requests_total", **labels) == sample(before, "apiforge_requests_total", **labels)
    usage_flush()
    after = scrape(client)

    def delta(name: str, **wanted: str) -> float:
        return sample(after, name, **wanted) - sample(before, name, **wanted)

    expected = FakeUpstream.expected_usage(MESSAGES)
    assert delta("apiforge_requests_total", **labels) == 4
    refused = {"endpoint": "/v1/chat/completions", "model": "", "upstream": "", "status": "404"}
    assert delta("apiforge_requests_total", **refused) == 1, "an unknown model is counted without its name"
    assert delta("apiforge_prompt_tokens_total", model="gpt-obs") == 4 * expected["prompt_tokens"]
    assert delta("apiforge_completion_tokens_total", model="gpt-obs") == 4 * expected["completion_tokens"]
    one_call = Decimal(expected["prompt_tokens"]) * Decimal("0.5") + Decimal(expected["completion_tokens"]) * Decimal(
        "1.5"
    )
    cost = 4 * one_call / 1000
    assert delta("apiforge_cost_total", model="gpt-obs") == pytest.approx(float(cost))
    assert delta("apiforge_request_duration_seconds_count", endpoint="/v1/chat/completions") == 5
    assert delta("apiforge_request_duration_seconds_sum", endpoint="/v1/chat/completions") > 0
    assert delta("apiforge_time_to_first_byte_seconds_count", model="gpt-obs") == 1
    assert delta("apiforge_upstream_request_duration_seconds_count", upstream="obs-upstream") == 4
    assert sample(after, "apiforge_usage_queue_depth") == 0
    assert ("apiforge_usage_spool_bytes", frozenset()) in after


def test_the_usage_queue_depth_is_read_at_scrape_time(gateway: Any) -> None:
    usage_flush()
    gateway.client.embeddings.create(model="gpt-obs", input="one two", encoding_format="float")
    gateway.client.embeddings.create(model="gpt-obs", input="three", encoding_format="float")

    assert sample(scrape(Client()), "apiforge_usage_queue_depth") == 2
    usage_flush()
    assert sample(scrape(Client()), "apiforge_usage_queue_depth") == 0


def test_endpoint_labels_are_bounded_whatever_path_a_client_sends() -> None:
    assert metrics.endpoint_label("/v1/models") == "/v1/models"
    assert metrics.endpoint_label("/v1/models/anything-at-all") == "/v1/models/{model}"
    assert metrics.endpoint_label("/gw/v1/embeddings") == "/gw/"
    assert metrics.endpoint_label("/gw/orders/afk-what-a-client-typed") == "/gw/"
    assert metrics.endpoint_label("/v1/afk-what-a-client-typed") == "other"


@pytest.mark.django_db
def test_ingestion_lag_measured_by_another_process_is_shown_as_a_gauge() -> None:
    client = Client()
    before = scrape(client)
    assert ("apiforge_usage_ingestion_lag_seconds", frozenset()) not in before

    metrics.ingestion_lag_observe(1.25)
    after = scrape(client)

    assert sample(after, "apiforge_usage_ingestion_lag_seconds") == 1.25
    assert sample(after, "apiforge_usage_ingestion_last_commit_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    count = "apiforge_usage_ingestion_batch_lag_seconds_count"
    assert sample(after, count) == sample(before, count) + 1
    # What the consumer stored is what any web process shows: the cache is the link between them.
    cache.set(metrics.INGESTION_LAG_CACHE_KEY, {"lag_s": 0.5, "at": 1.0e9}, timeout=None)
    assert sample(scrape(client), "apiforge_usage_ingestion_lag_seconds") == 0.5
    for junk in ("not a lag", {"lag_s": "1", "at": 1.0e9}):
        cache.set(metrics.INGESTION_LAG_CACHE_KEY, junk, timeout=None)
        assert ("apiforge_usage_ingestion_lag_seconds", frozenset()) not in scrape(client)


@pytest.mark.django_db
def test_ingestion_lag_and_scrapes_survive_a_cache_outage(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
        }
    }
    with caplog.at_level(logging.WARNING, logger="gateway_stats.metrics"):
        metrics.ingestion_lag_observe(-3)  # a clock step: never a negative lag
        samples = scrape(Client())
    assert ("apiforge_usage_ingestion_lag_seconds", frozenset()) not in samples
    assert "could not store the usage ingestion lag" in caplog.text
    assert "could not read the usage ingestion lag" in caplog.text


@pytest.mark.django_db
def test_dropped_usage_events_are_counted() -> None:
    client = Client()
    before = sample(scrape(client), "apiforge_usage_dropped_total")
    metrics.usage_dropped_count(3)
    metrics.usage_dropped_count(0)
    assert sample(scrape(client), "apiforge_usage_dropped_total") == before + 3


def test_missing_optional_providers_are_tolerated() -> None:
    assert metrics._optional("gateway_stats.no_such_module", "anything") is None
    assert metrics._optional("gateway_stats.metrics", "INGESTION_LAG_CACHE_KEY") is None  # not callable


@pytest.mark.django_db
def test_a_spool_size_that_cannot_be_read_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from gateway_stats import transport

    def unreadable() -> int:
        raise PermissionError("spool directory")

    monkeypatch.setattr(transport, "spool_size_bytes", unreadable)
    with caplog.at_level(logging.WARNING, logger="gateway_stats.metrics"):
        scrape(Client())
    assert "could not read the usage spool's size" in caplog.text


@pytest.mark.django_db
def test_multiprocess_mode_reads_the_directory_and_still_adds_the_scrape_time_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # This process was not started in multiprocess mode, so its own values are not in the (empty) directory:
    # what /metrics shows is only what the directory holds, plus what is read at scrape time.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics.ingestion_lag_observe(2.0)
    samples = scrape(Client())

    assert sample(samples, "apiforge_usage_ingestion_lag_seconds") == 2.0
    assert not [name for name, _ in samples if name.startswith("apiforge_requests")]


def test_metrics_process_stop_marks_this_process_dead_in_multiprocess_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import asyncio
    import os

    live = tmp_path / f"gauge_livesum_{os.getpid()}.db"
    live.write_bytes(b"")
    other = tmp_path / "counter_1.db"
    other.write_bytes(b"")
    asyncio.run(metrics.metrics_process_stop())  # not in multiprocess mode: nothing to do
    assert live.exists()

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    asyncio.run(metrics.metrics_process_stop())

    assert not live.exists(), "this process's live gauges leave the sums"
    assert other.exists(), "counters stay: the calls were made"


# --- Protection ---


@pytest.mark.django_db
def test_open_without_protection_outside_production() -> None:
    assert Client().get("/metrics").status_code == 200


@pytest.mark.django_db
def test_refused_in_production_without_protection(settings: Any) -> None:
    settings.IS_PRODUCTION = True
    response = Client().get("/metrics")

    assert response.status_code == 403
    assert response.json() == {
        "detail": "Metrics are disabled: set METRICS_TOKEN or METRICS_ALLOWED_IPS.",
        "code": "metrics_not_configured",
    }


@pytest.mark.django_db
@pytest.mark.parametrize("production", [True, False])
def test_a_token_is_required_when_configured(settings: Any, production: bool) -> None:
    settings.IS_PRODUCTION = production
    settings.METRICS_TOKEN = TOKEN
    client = Client()

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["code"] == "not_authenticated"
        assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert b"apiforge_usage_queue_depth" in response.content


@pytest.mark.django_db
def test_only_allowed_addresses_and_networks_may_scrape(settings: Any) -> None:
    settings.IS_PRODUCTION = True
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
    client = Client()

    for address in ("10.20.30.40", "192.0.2.7", "2001:db8::1"):
        assert client.get("/metrics", REMOTE_ADDR=address).status_code == 200, address
    for address in ("192.0.2.8", "127.0.0.1", "not-an-address", ""):
        response = client.get("/metrics", REMOTE_ADDR=address)
        assert response.status_code == 403, address
        assert response.json() == {"detail": "Your address may not read the metrics.", "code": "permission_denied"}


@pytest.mark.django_db
def test_with_both_configured_a_scrape_needs_the_address_and_the_token(settings: Any) -> None:
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    settings.METRICS_TOKEN = TOKEN
    client = Client()
    good = {"Authorization": f"Bearer {TOKEN}"}

    assert client.get("/metrics", REMOTE_ADDR="10.0.0.1", headers=good).status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.0.0.1").status_code == 401
    assert client.get("/metrics", REMOTE_ADDR="172.16.0.1", headers=good).status_code == 403


@pytest.mark.django_db
def test_other_methods_get_a_json_405() -> None:
    response = Client().post("/metrics")

    assert response.status_code == 405
    assert response.json() == {"detail": 'Method "POST" not allowed.', "code": "method_not_allowed"}
    assert response["Allow"] == "GET, HEAD"


def test_bad_metrics_and_event_bus_settings_stop_the_settings_from_loading() -> None:
    for variable, value, message in [
        ("METRICS_ALLOWED_IPS", "10.0.0.0/8,not-a-network", "'not-a-network' is not an IP address or network"),
        ("EVENTS_ZMQ_MODE", "sideways", "EVENTS_ZMQ_MODE must be bind or connect"),
    ]:
        env = {
            variable: value,
            "APP_ENV": "test",
            "PATH": "/usr/bin:/bin",
            "DJANGO_SETTINGS_MODULE": "apiforge.settings",
        }
        done = subprocess.run(
            [sys.executable, "-c", "import django; django.setup()"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0
        assert message in done.stderr
