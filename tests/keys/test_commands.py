"""manage.py create_api_key and disable_api_key."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from gateway_stats.models import AuditEvent
from keys.exceptions import KeyRefused
from keys.models import ApiKey
from keys.verification import key_verify
from tests.factories import ApiKeyFactory

pytestmark = pytest.mark.django_db


def test_create_api_key_prints_the_secret_alone_on_stdout(user, public_models):
    out, err = StringIO(), StringIO()

    call_command(
        "create_api_key",
        "--user",
        "alice",
        "--name",
        "cli",
        "--models",
        "gpt-4o",
        "--rpm",
        "30",
        stdout=out,
        stderr=err,
    )

    secret = out.getvalue().strip()
    key = ApiKey.objects.get()
    assert secret.startswith("afk-")
    assert "\n" not in secret
    assert key.prefix in err.getvalue()
    assert secret[4:] not in err.getvalue()
    policy = key_verify(secret, None)
    assert (policy.key_id, policy.owner_id, policy.rpm_limit) == (key.pk, user.pk, 30)
    assert policy.allowed_models == frozenset({"gpt-4o"})
    assert AuditEvent.objects.get().action == "key.create"


def test_create_api_key_refuses_an_unknown_user_or_model(user):
    with pytest.raises(CommandError, match="No user"):
        call_command("create_api_key", "--user", "nobody", "--name", "cli", stdout=StringIO(), stderr=StringIO())
    with pytest.raises(CommandError, match="allowed_models"):
        call_command("create_api_key", "--user", "alice", "--name", "x", "--models", "nope", stdout=StringIO())
    with pytest.raises(CommandError, match="rpm_limit"):
        call_command("create_api_key", "--user", "alice", "--name", "x", "--rpm", "-1", stdout=StringIO())
    assert not ApiKey.objects.exists()


def test_disable_api_key_disables_the_key_with_that_prefix(user, run_on_commit):
    key = ApiKeyFactory(owner=user)
    other = ApiKeyFactory(owner=user)
    key_verify(key.secret, None)

    with run_on_commit():
        call_command("disable_api_key", key.prefix, stdout=StringIO())

    with pytest.raises(KeyRefused) as refused:
        key_verify(key.secret, None)
    assert refused.value.reason == "inactive"
    assert key_verify(other.secret, None).key_id == other.pk
    assert AuditEvent.objects.get().action == "key.disable"


def test_disable_api_key_refuses_an_unknown_or_ambiguous_prefix(user):
    ApiKeyFactory(owner=user, prefix="afk-SAMEsame")
    ApiKeyFactory(owner=user, prefix="afk-SAMEsame")

    with pytest.raises(CommandError, match="No API key"):
        call_command("disable_api_key", "afk-nothing1")
    with pytest.raises(CommandError, match="Several"):
        call_command("disable_api_key", "afk-SAMEsame")
    assert ApiKey.objects.filter(is_active=True).count() == 2
