"""Rough edges a new user hit (issue 13): each test failed before its fix.

- ``manage.py`` from a checkout runs with development settings, and a configuration error is one line;
- an API key sent to the management API says a JWT is expected there;
- the browsable API's key form starts with an active key.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import User
from keys.models import ApiKey
from tests.proxy.helpers import key_make

REPO = Path(__file__).resolve().parents[2]


def _manage(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"APP_ENV", "SECRET_KEY", "DATABASE_URL", "REDIS_URL"}}
    clean.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", **env})
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=clean, capture_output=True, text=True, timeout=120
    )


def test_manage_py_from_a_checkout_runs_the_readme_commands_with_development_settings(tmp_path: Path) -> None:
    assert _manage("migrate", "--noinput", "-v", "0", tmp_path=tmp_path).returncode == 0
    made = _manage(
        "createsuperuser",
        "--noinput",
        "--username",
        "ada",
        "--email",
        "ada@example.com",
        tmp_path=tmp_path,
        DJANGO_SUPERUSER_PASSWORD="a-long-passphrase-42",
    )
    assert made.returncode == 0, made.stderr
    issued = _manage("create_api_key", "--user", "ada", "--name", "laptop", tmp_path=tmp_path)
    assert issued.returncode == 0, issued.stderr
    assert "afk-" in issued.stdout
    assert "Traceback" not in issued.stderr


def test_a_configuration_error_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = _manage("check", tmp_path=tmp_path, APP_ENV="production")
    assert result.returncode == 2
    assert result.stderr == "error: SECRET_KEY must be set when APP_ENV=production\n"


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["HTTP_AUTHORIZATION", "HTTP_X_API_KEY"])
def test_an_api_key_sent_to_the_management_api_says_a_jwt_is_expected(header: str) -> None:
    key = key_make()
    value = f"Bearer {key.secret}" if header == "HTTP_AUTHORIZATION" else key.secret
    response = APIClient().get("/api/keys/", **{header: value})
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "api_key_not_accepted"
    assert "expects a JWT access token" in body["detail"]
    assert "/v1/" in body["detail"]


@pytest.mark.django_db
def test_the_browsable_api_key_form_starts_active_and_a_name_alone_makes_an_active_key(client: Client) -> None:
    user = User.objects.create_user(username="ada", password="a-long-passphrase-42")
    client.force_login(user)
    page = client.get("/api/keys/", HTTP_ACCEPT="text/html").content.decode()
    # The browsable API's form (JSON only: the API parses nothing else) as it is pre-filled for a new key.
    start = page.index('name="_content"')
    start = page.index(">", start) + 1
    prefilled = json.loads(html.unescape(page[start : page.index("</textarea>", start)]))
    assert prefilled["is_active"] is True
    response = client.post(
        "/api/keys/", json.dumps({**prefilled, "name": "from-the-form"}), content_type="application/json"
    )
    assert response.status_code == 201, response.content
    assert ApiKey.objects.get(name="from-the-form").is_active is True


def test_make_run_says_what_it_is_doing_step_by_step(tmp_path: Path) -> None:
    # A fresh checkout: no virtualenv yet, so the install steps are part of the run.
    result = subprocess.run(
        ["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith('echo "==> ')]
    assert [step.split()[2] for step in steps] == ["creating", "installing", "migrating", "creating", "serving"]
