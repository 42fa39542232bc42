"""``make run``'s demo data: a mock-backed ``demo`` model and a key printed once, usable at once."""

from __future__ import annotations

import io

import orjson
import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def run_demo(**options) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("bootstrap_demo", stdout=out, stderr=err, **options)
    return out.getvalue().strip(), err.getvalue()


def test_demo_key_calls_the_demo_model_and_is_printed_only_once(settings):
    settings.APP_ENV = "development"
    UserFactory(username="admin", superuser=True)

    secret, _ = run_demo()
    assert secret.startswith("afk-")
    answer = Client().post(
        "/v1/chat/completions",
        data=orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "hello demo"}]}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "echo: hello demo"

    again, notice = run_demo()
    assert again == ""
    assert "already has a key named 'demo'" in notice


def test_demo_refuses_production_and_needs_a_user(settings):
    settings.APP_ENV = "production"
    with pytest.raises(CommandError, match="development"):
        run_demo()
    settings.APP_ENV = "development"
    with pytest.raises(CommandError, match="superuser"):
        run_demo()
