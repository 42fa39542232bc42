"""/health and /health/ready: liveness, and readiness of each dependency."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

CLOSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1
REAL_REDIS = os.environ.get("REDIS_URL", "")
CHECKS = {"database", "cache", "broker", "channel_layer"}


def _broken_cache(settings: Any) -> None:
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": CLOSED,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        }
    }


def _broken_broker(settings: Any) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.CELERY_BROKER_URL = CLOSED


def _broken_channel_layer(settings: Any) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [CLOSED]}}
    }


def _embedded(settings: Any) -> None:
    settings.REDIS_URL = ""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.CELERY_TASK_ALWAYS_EAGER = True


def test_liveness_is_200_ok(client: Client) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_probes_answer_other_methods_with_a_json_405(client: Client, path: str) -> None:
    response = client.post(path)

    assert response.status_code == 405
    assert response.json() == {"detail": 'Method "POST" not allowed.', "code": "method_not_allowed"}
    assert response["Allow"] == "GET, HEAD"


def test_ready_on_the_embedded_default_reports_the_redis_backed_checks_disabled(client: Client, settings: Any) -> None:
    _embedded(settings)

    response = client.get("/health/ready")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "cache": "disabled", "broker": "disabled", "channel_layer": "disabled"},
    }


@pytest.mark.skipif(not REAL_REDIS, reason="REDIS_URL is unset: no real Redis to check against")
def test_ready_with_the_real_redis_reports_every_check_ok(client: Client) -> None:
    response = client.get("/health/ready")

    assert response.json() == {"status": "ok", "checks": dict.fromkeys(CHECKS, "ok")}
    assert response.status_code == 200


@pytest.mark.skipif(not REAL_REDIS, reason="REDIS_URL is unset: no real Redis to check against")
def test_ready_stays_ok_when_probed_repeatedly(client: Client) -> None:
    # Each channel-layer probe opens and closes its own pools; nothing piles up between probes.
    for _ in range(5):
        assert client.get("/health/ready").json()["checks"] == dict.fromkeys(CHECKS, "ok")


@pytest.mark.expect_error_log  # django.request logs every 5xx answer, this 503 included
def test_ready_is_503_with_each_check_in_error_when_the_configured_redis_is_unreachable(
    client: Client, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.REDIS_URL = CLOSED
    _broken_cache(settings)
    _broken_broker(settings)
    _broken_channel_layer(settings)

    response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.json() == {
        "status": "error",
        "checks": {"database": "ok", "cache": "error", "broker": "error", "channel_layer": "error"},
    }
    failed = {r.getMessage() for r in caplog.records if r.name == "apiforge.health"}
    assert failed == {f"readiness check {name} failed" for name in ("cache", "broker", "channel_layer")}


@pytest.mark.expect_error_log  # django.request logs every 5xx answer, this 503 included
@pytest.mark.parametrize(
    ("breaks", "failing"),
    [(_broken_cache, "cache"), (_broken_broker, "broker"), (_broken_channel_layer, "channel_layer")],
)
def test_one_failing_dependency_is_enough_for_503(client: Client, settings: Any, breaks: Any, failing: str) -> None:
    _embedded(settings)
    breaks(settings)

    response = client.get("/health/ready")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks[failing] == "error"
    assert [name for name, value in checks.items() if value == "error"] == [failing]
