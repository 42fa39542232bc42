"""Upstream extra headers are encrypted at rest, like the API key; the application sees them unchanged."""

from __future__ import annotations

import pytest
from django.db import connection

from proxy.catalog import catalog_load
from proxy.models import Deployment, Model, Upstream

pytestmark = pytest.mark.django_db

HEADER_SECRET = "org-4f1c9e-very-secret-header-value"


def _raw_headers(upstream_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT extra_headers FROM proxy_upstream WHERE id = %s", [upstream_id])
        return str(cursor.fetchone()[0])


def test_extra_header_values_are_not_stored_in_plaintext_but_read_back_unchanged():
    upstream = Upstream.objects.create(
        name="corp", kind="openai", base_url="https://api.example.com/v1", extra_headers={"X-Org": HEADER_SECRET}
    )

    raw = _raw_headers(upstream.pk)
    assert HEADER_SECRET not in raw
    assert "X-Org" not in raw  # names too: they say which credential is there
    assert Upstream.objects.get(pk=upstream.pk).extra_headers == {"X-Org": HEADER_SECRET}


def test_the_catalog_sends_the_decrypted_headers_upstream():
    upstream = Upstream.objects.create(
        name="corp", kind="openai", base_url="https://api.example.com/v1", extra_headers={"X-Org": HEADER_SECRET}
    )
    model = Model.objects.create(name="m")
    Deployment.objects.create(model=model, upstream=upstream, upstream_model="x")
    target = catalog_load().models["m"].deployments[0].upstream
    assert target.headers["X-Org"] == HEADER_SECRET


def test_rows_written_before_encryption_are_read_and_reencrypted_on_save():
    upstream = Upstream.objects.create(name="legacy", kind="mock")
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE proxy_upstream SET extra_headers = %s WHERE id = %s", ['{"X-Old": "plain-value"}', upstream.pk]
        )
    legacy = Upstream.objects.get(pk=upstream.pk)
    assert legacy.extra_headers == {"X-Old": "plain-value"}
    legacy.save()
    assert "plain-value" not in _raw_headers(upstream.pk)
    assert Upstream.objects.get(pk=upstream.pk).extra_headers == {"X-Old": "plain-value"}


def test_a_value_encrypted_under_another_key_reads_as_empty_with_a_warning(settings, caplog):
    upstream = Upstream.objects.create(name="rotated", kind="mock", extra_headers={"X-A": "b"})
    settings.FIELD_ENCRYPTION_KEY = "0" * 43 + "="  # a valid Fernet key, not the one that encrypted the row
    assert Upstream.objects.get(pk=upstream.pk).extra_headers == {}
    assert any("cannot be decrypted" in record.getMessage() for record in caplog.records)


def test_an_empty_column_reads_as_the_default():
    upstream = Upstream.objects.create(name="empty", kind="mock")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE proxy_upstream SET extra_headers = '' WHERE id = %s", [upstream.pk])
    assert Upstream.objects.get(pk=upstream.pk).extra_headers == {}
