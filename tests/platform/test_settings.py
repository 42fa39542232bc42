"""Settings from the environment: each case loads the settings in a fresh interpreter with its own environment."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

from django.conf import settings

PROBE = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({
    "APP_ENV": settings.APP_ENV,
    "DEBUG": settings.DEBUG,
    "cache": settings.CACHES["default"]["BACKEND"],
    "channel_layer": settings.CHANNEL_LAYERS["default"]["BACKEND"],
    "broker": settings.CELERY_BROKER_URL,
    "eager": settings.CELERY_TASK_ALWAYS_EAGER,
    "database": settings.DATABASES["default"]["ENGINE"],
    "atomic_requests": settings.DATABASES["default"]["ATOMIC_REQUESTS"],
    "ssl_redirect": settings.SECURE_SSL_REDIRECT,
    "hsts": settings.SECURE_HSTS_SECONDS,
    "access_minutes": settings.SIMPLE_JWT["ACCESS_TOKEN_LIFETIME"].total_seconds() / 60,
}))
"""

CONFIG_VARS = {
    "APP_ENV", "DEBUG", "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CACHE_KEY_PREFIX",
    "ALLOWED_HOSTS", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "JWT_ACCESS_MINUTES",
}  # fmt: skip


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
    clean.update(DJANGO_SETTINGS_MODULE="apiforge.settings", **env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=settings.BASE_DIR, env=clean, capture_output=True, text=True, timeout=60
    )


def _settings(**env: str) -> dict[str, Any]:
    result = _run(PROBE, **env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_production_refuses_to_start_without_a_secret_key() -> None:
    result = _run(PROBE, APP_ENV="production")

    assert result.returncode != 0
    assert "SECRET_KEY must be set when APP_ENV=production" in result.stderr


def test_production_keeps_debug_off_even_when_asked_and_is_secure_by_default() -> None:
    values = _settings(APP_ENV="production", SECRET_KEY=secrets.token_urlsafe(50), DEBUG="1")

    assert values["DEBUG"] is False
    assert values["ssl_redirect"] is True
    assert values["hsts"] > 0


def test_production_security_can_be_switched_off_for_plain_http_on_loopback() -> None:
    values = _settings(
        APP_ENV="production", SECRET_KEY=secrets.token_urlsafe(50), SECURE_SSL_REDIRECT="0", SECURE_HSTS_SECONDS="0"
    )

    assert values["ssl_redirect"] is False
    assert values["hsts"] == 0


def test_an_unknown_app_env_is_refused() -> None:
    result = _run(PROBE, APP_ENV="staging")

    assert result.returncode != 0
    assert "APP_ENV must be production, development or test" in result.stderr


def test_development_turns_debug_on_and_needs_no_secret_key() -> None:
    assert _settings(APP_ENV="development")["DEBUG"] is True


def test_with_nothing_set_everything_is_embedded() -> None:
    values = _settings(APP_ENV="development")

    assert values["database"] == "django.db.backends.sqlite3"
    assert values["cache"] == "django.core.cache.backends.locmem.LocMemCache"
    assert values["channel_layer"] == "channels.layers.InMemoryChannelLayer"
    assert values["broker"] == "memory://"
    assert values["eager"] is True
    assert values["atomic_requests"] is False
    assert values["access_minutes"] == 30


def test_redis_url_switches_cache_channel_layer_and_broker_to_redis() -> None:
    values = _settings(
        APP_ENV="development",
        REDIS_URL="redis://127.0.0.1:6379/3",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/whatever",
        JWT_ACCESS_MINUTES="5",
    )

    assert values["cache"] == "django_redis.cache.RedisCache"
    assert values["channel_layer"] == "channels_redis.core.RedisChannelLayer"
    assert values["broker"] == "redis://127.0.0.1:6379/3"
    assert values["eager"] is False
    assert values["database"] == "django.db.backends.postgresql"
    assert values["access_minutes"] == 5


def test_check_deploy_passes_with_production_settings() -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=settings.BASE_DIR,
        env={
            **{k: v for k, v in os.environ.items() if k not in CONFIG_VARS},
            "APP_ENV": "production",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "apiforge.example",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # No deployment (security.*) warning either; other apps' warnings are their own tests' business.
    assert "(security." not in output, output
