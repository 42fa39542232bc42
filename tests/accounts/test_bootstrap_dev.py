"""manage.py bootstrap_dev: the development superuser, created once."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command("bootstrap_dev", *args, stdout=out)
    return out.getvalue()


@pytest.fixture(autouse=True)
def _no_superuser_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD", "DJANGO_SUPERUSER_EMAIL"]:
        monkeypatch.delenv(name, raising=False)


def test_creates_admin_with_a_generated_password_printed_once() -> None:
    first = _run()
    second = _run()

    match = re.search(r"Created superuser 'admin' with password: (\S+)", first)
    assert match, first
    password = match.group(1)
    admin = User.objects.get(username="admin")
    assert admin.is_superuser
    assert admin.is_staff
    assert admin.is_active
    assert admin.check_password(password)
    assert "Superuser exists: admin" in second
    assert password not in second
    assert User.objects.count() == 1


def test_takes_credentials_from_the_environment_without_printing_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "ops")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "from-the-env-Secret-1")
    monkeypatch.setenv("DJANGO_SUPERUSER_EMAIL", "ops@corp.example")

    output = _run()

    ops = User.objects.get(username="ops")
    assert ops.is_superuser
    assert ops.email == "ops@corp.example"
    assert ops.check_password("from-the-env-Secret-1")
    assert "from-the-env-Secret-1" not in output
    assert "password from DJANGO_SUPERUSER_PASSWORD" in output


def test_leaves_an_existing_superuser_alone() -> None:
    UserFactory(username="boss", superuser=True, password="unchanged-Passw0rd")

    output = _run()

    assert "Superuser exists: boss" in output
    assert not User.objects.filter(username="admin").exists()
    assert User.objects.get(username="boss").check_password("unchanged-Passw0rd")


def test_does_not_promote_an_ordinary_user_who_has_the_wanted_name() -> None:
    UserFactory(username="admin")

    with pytest.raises(CommandError, match="exists but is not a superuser"):
        _run()

    assert not User.objects.filter(is_superuser=True).exists()


def test_refuses_to_run_in_production_unless_forced(settings: Any) -> None:
    settings.APP_ENV = "production"

    with pytest.raises(CommandError, match="APP_ENV=production"):
        _run()
    assert not User.objects.exists()

    assert "Created superuser 'admin'" in _run("--force")
