"""The read-only admin pages of the request log and the audit trail: they render, filter, search and link, and
nobody can add, change or delete a row, not even a superuser."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from gateway_stats.models import AuditEvent, UsageRecord
from gateway_stats.services import audit_record
from tests.factories import ApiKeyFactory
from tests.records.conftest import usage

pytestmark = pytest.mark.django_db

LOG = "/admin/gateway_stats/usagerecord/"
TRAIL = "/admin/gateway_stats/auditevent/"


def _page(client: Client, url: str, query: dict[str, Any] | None = None) -> str:
    answer = client.get(url, query or {})
    assert answer.status_code == 200, answer.content[:2000]
    return answer.content.decode()


@pytest.mark.parametrize("who", ["root", "log_reader"])
def test_the_request_log_list_and_detail_render_for_staff_who_may_view(admin_for, alice, who, request):
    key = ApiKeyFactory(owner=alice)
    row = usage(key_id=key.pk, key_prefix=key.prefix, user_id=alice.pk, error_code="rate_limited", status=429)
    client = admin_for(request.getfixturevalue(who))

    listed = _page(client, LOG)
    detail = _page(client, f"{LOG}{row.pk}/change/")

    assert row.request_id in listed
    assert f'href="/admin/keys/apikey/{key.pk}/change/"' in listed
    assert f'href="/admin/accounts/user/{alice.pk}/change/"' in listed
    for text in (row.event_id, "rate_limited", "203.0.113.9", "gpt-4o-2024-08-06", key.prefix):
        assert text in detail
    assert 'name="_save"' not in detail  # read-only: no save button
    assert "Add request log entry" not in listed


def test_a_row_naming_a_deleted_key_and_user_still_renders(admin_for, root):
    row = usage(key_id=987654, key_prefix="afk-gone", user_id=876543)
    client = admin_for(root)

    assert "afk-gone" in _page(client, LOG)
    assert "afk-gone" in _page(client, f"{LOG}{row.pk}/change/")


def test_the_request_log_filters_searches_and_drills_down_by_date(admin_for, root):
    limited = usage(status=429, error_code="rate_limited", request_id="req-limited", upstream="azure")
    streamed = usage(stream=True, model="gpt-4o-mini", request_id="req-streamed")
    client = admin_for(root)

    def shown(query: dict[str, Any]) -> set[str]:
        html = _page(client, LOG, query)
        return {rid for rid in ("req-limited", "req-streamed") if rid in html}

    assert shown({"status": "429"}) == {"req-limited"}
    assert shown({"stream__exact": "1"}) == {"req-streamed"}
    assert shown({"model": "gpt-4o-mini"}) == {"req-streamed"}
    assert shown({"error_code": "rate_limited"}) == {"req-limited"}
    assert shown({"upstream": "azure"}) == {"req-limited"}
    assert shown({"q": "req-streamed"}) == {"req-streamed"}
    assert shown({"q": streamed.event_id}) == {"req-streamed"}
    assert shown({"q": "req-"}) == set()  # request ids are matched exactly
    assert shown({"started_at__year": "2025", "started_at__month": "3"}) == {"req-limited", "req-streamed"}
    assert limited.pk


@pytest.mark.parametrize("url", [LOG, TRAIL])
def test_nobody_adds_changes_or_deletes_rows_not_even_a_superuser(admin_for, root, url):
    row = (
        usage() if url == LOG else audit_record(actor=None, action="key.create", object_type="keys.apikey", object_id=1)
    )
    client = admin_for(root)
    model = UsageRecord if url == LOG else AuditEvent

    assert client.get(f"{url}add/").status_code == 403
    assert client.post(f"{url}add/", {}).status_code == 403
    assert client.get(f"{url}{row.pk}/delete/").status_code == 403
    assert client.post(f"{url}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.post(f"{url}{row.pk}/change/", {}).status_code == 403
    bulk = client.post(url, {"action": "delete_selected", "_selected_action": [str(row.pk)], "post": "yes"})
    assert bulk.status_code in {200, 302}
    assert model.objects.filter(pk=row.pk).exists()


@pytest.mark.parametrize("url", [LOG, TRAIL])
def test_staff_without_the_view_permission_are_refused(admin_for, plain_staff, url):
    assert admin_for(plain_staff).get(url).status_code == 403


def test_the_audit_trail_renders_filters_and_links_to_the_objects(admin_for, root, alice):
    key = ApiKeyFactory(owner=alice, name="linked key")
    audit_record(
        actor=alice, action="key.create", object_type="keys.apikey", object_id=key.pk, object_repr="linked key"
    )
    audit_record(actor=root, action="key.delete", object_type="keys.apikey", object_id=4242, object_repr="gone key")
    audit_record(actor=None, action="user.login_failed", object_type="accounts.user", object_id="", changes={"x": 1})
    audit_record(actor=None, action="thing.made", object_type="elsewhere.unknown", object_id=1, object_repr="odd")
    client = admin_for(root)

    listed = _page(client, TRAIL)

    assert f'<a href="/admin/keys/apikey/{key.pk}/change/">linked key</a>' in listed
    assert "gone key" in listed
    assert "/admin/keys/apikey/4242/change/" not in listed  # deleted: nothing to link to
    assert "odd" in listed  # no admin page for that type: plain text
    assert "linked key" in _page(client, TRAIL, {"action": "key.create"})
    assert "gone key" not in _page(client, TRAIL, {"action": "key.create"})
    assert "gone key" in _page(client, TRAIL, {"q": "gone"})
    assert "linked key" not in _page(client, TRAIL, {"object_type": "accounts.user"})
    assert "linked key" in _page(client, TRAIL, {"actor__id__exact": str(alice.pk)})
    assert "linked key" in _page(client, TRAIL, {"created_at__gte": "2000-01-01 00:00:00+00:00"})

    event = AuditEvent.objects.get(action="user.login_failed")
    detail = _page(client, f"{TRAIL}{event.pk}/change/")
    assert "<pre>{\n  &quot;x&quot;: 1\n}</pre>" in detail
    assert 'name="_save"' not in detail


@pytest.mark.parametrize("url", [LOG, TRAIL])
def test_the_changelists_take_the_same_queries_for_3_and_30_rows(admin_for, root, alice, url):
    client = admin_for(root)

    def add(count: int) -> None:
        for _ in range(count):
            if url == LOG:
                usage(user_id=alice.pk, key_id=1)
            else:
                audit_record(actor=alice, action="key.update", object_type="keys.apikey", object_id=1)

    def queries() -> int:
        with CaptureQueriesContext(connection) as context:
            _page(client, url)
        return len(context.captured_queries)

    add(3)
    few = queries()
    add(27)
    assert queries() == few


def test_a_link_to_a_page_the_admin_does_not_have_is_plain_text():
    from gateway_stats.admin import _change_link

    assert _change_link("nowhere", "nothing", 5, "the text") == "the text"
    assert _change_link("keys", "apikey", None, None) == "-"
