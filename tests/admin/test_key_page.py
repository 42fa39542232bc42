"""The key page in the admin: a state badge per key instead of a red "revoked" cross on healthy keys, the owner
picked with an autocomplete, and the change page's last errors (linked to the request log) and last use.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from accounts.models import User
from gateway_stats.models import UsageRecord
from keys.models import ApiKey
from tests.factories import ApiKeyFactory, UserFactory
from tests.records.conftest import at, usage

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/keys/apikey/"
AUTOCOMPLETE = "/admin/autocomplete/?app_label=keys&model_name=apikey&field_name=owner&term={}"


@pytest.fixture
def admin_client_(admin_for: Callable[[User], Client], root: User) -> Client:
    return admin_for(root)


def _state_cell(page: str, key: ApiKey) -> str:
    """The text of the state badge in ``key``'s changelist row."""
    row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*?{re.escape(key.name)}(?:(?!</tr>).)*</tr>", page, re.S)
    assert row is not None, f"no row for {key.name}"
    badge = re.search(r'<td class="field-state[^"]*"[^>]*>\s*<span class="([^"]*)"[^>]*>\s*(\w+)\s*</span>', row[0])
    assert badge is not None, row[0]
    return f"{badge[2]} {'green' if 'bg-green' in badge[1] else 'red' if 'bg-red' in badge[1] else 'other'}"


def test_the_list_shows_each_keys_state_as_a_badge(admin_client_: Client) -> None:
    now = timezone.now()
    keys = {
        "active green": ApiKeyFactory(name="healthy"),
        "disabled other": ApiKeyFactory(name="switched-off", is_active=False),
        "revoked red": ApiKeyFactory(name="gone", is_active=False, revoked_at=now),
        "expired other": ApiKeyFactory(name="too-old", expires_at=now - timedelta(minutes=1)),
        "active green ": ApiKeyFactory(name="expires-later", expires_at=now + timedelta(days=1)),
    }

    page = admin_client_.get(CHANGELIST).content.decode()

    assert {_state_cell(page, key) for key in keys.values()} == {label.strip() for label in keys}
    assert "icon-no" not in page
    assert "icon-yes" not in page


def _cell(page: str, key: ApiKey, column: str) -> str:
    row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*?{re.escape(key.name)}(?:(?!</tr>).)*</tr>", page, re.S)
    assert row is not None, f"no row for {key.name}"
    cell = re.search(rf'<td class="field-{column}[^"]*"[^>]*>([^<]*)</td>', row[0])
    assert cell is not None, row[0]
    return html.unescape(cell[1]).strip()


def test_the_list_shows_each_keys_limits_and_its_spend_this_period(admin_client_: Client) -> None:
    busy = ApiKeyFactory(name="busy", rpm_limit=60, tpm_limit=10000, max_concurrency=4)
    idle = ApiKeyFactory(name="idle")
    recent = timezone.now() - timedelta(minutes=1)
    for _ in range(2):
        usage(key_id=busy.pk, key_prefix=busy.prefix, user_id=busy.owner_id, started_at=recent)
    usage(key_id=busy.pk, key_prefix=busy.prefix, started_at=recent - timedelta(days=400))  # a past period

    page = admin_client_.get(CHANGELIST).content.decode()

    assert _cell(page, busy, "limits") == "60 rpm · 10,000 tpm · 4 at once"
    assert _cell(page, idle, "limits") == "-"
    assert _cell(page, busy, "spent") == "0.00015 · 30 tokens"
    assert _cell(page, idle, "spent") == "0.0000 · 0 tokens"


def test_the_owner_autocomplete_answers_the_matching_user(admin_client_: Client) -> None:
    carol = UserFactory(username="carol")
    UserFactory(username="dave")

    answer = admin_client_.get(AUTOCOMPLETE.format("car"))

    assert answer.status_code == 200
    assert answer.json()["results"] == [{"id": str(carol.pk), "text": str(carol)}]
    add_page = admin_client_.get(f"{CHANGELIST}add/").content.decode()
    assert 'data-ajax--url="/admin/autocomplete/"' in add_page


def test_the_owner_autocomplete_is_refused_without_the_user_view_permission() -> None:
    staff = UserFactory(username="keys-only", staff=True)
    staff.user_permissions.set(Permission.objects.filter(content_type__app_label="keys"))
    client = Client()
    client.force_login(staff)

    assert client.get(AUTOCOMPLETE.format("car")).status_code == 403


def test_the_change_page_lists_the_last_ten_errors_linked_to_the_request_log(admin_client_: Client) -> None:
    key = ApiKeyFactory(name="flaky", last_used_at=at(99))
    other = ApiKeyFactory(name="other")
    errors = [usage(key=key, status=429, error_code="rate_limited", started_at=at(minute)) for minute in range(12)]
    usage(key=key, status=200, started_at=at(50))
    latest = usage(key=key, status=502, error_code="upstream_error", started_at=at(60))
    usage(key=other, status=500, error_code="other_keys_error", started_at=at(70))

    page = admin_client_.get(reverse("admin:keys_apikey_change", args=[key.pk])).content.decode()

    links = re.findall(r'href="/admin/gateway_stats/usagerecord/(\d+)/change/"', page)
    # The 502, then the 429s newest first: ten in all, so the two oldest 429s are left out.
    assert [int(pk) for pk in links] == [latest.pk, *(row.pk for row in reversed(errors[3:]))]
    assert "502 &middot; upstream_error" in page
    assert "429 &middot; rate_limited" in page
    assert "other_keys_error" not in page
    assert "Last used" in page
    assert "March 1, 2025" in page


def test_a_key_without_errors_says_none(admin_client_: Client) -> None:
    key = ApiKeyFactory(name="quiet")
    usage(key=key, status=200)

    page = admin_client_.get(reverse("admin:keys_apikey_change", args=[key.pk])).content.decode()

    assert re.search(r"Last 10 errors.*?none", page, re.S)
    assert not re.search(r"/admin/gateway_stats/usagerecord/\d+/change/", page)


def test_the_scopes_are_picked_from_the_models_and_routes_that_exist(admin_client_: Client) -> None:
    from proxy.models import Model, Route

    Model.objects.create(name="gpt-pick")
    Model.objects.create(name="gpt-other")
    Route.objects.create(name="weather", path="/weather")
    key = ApiKeyFactory(name="scoped", allowed_models=["gpt-pick"])
    url = reverse("admin:keys_apikey_change", args=[key.pk])

    page = admin_client_.get(url).content.decode()

    models = re.search(r'<select name="allowed_models"[^>]*multiple[^>]*>(.*?)</select>', page, re.S)
    routes = re.search(r'<select name="allowed_routes"[^>]*multiple[^>]*>(.*?)</select>', page, re.S)
    assert models is not None
    assert routes is not None
    assert re.findall(r'<option value="([^"]+)"', models[1]) == ["gpt-other", "gpt-pick"]
    assert re.search(r'<option value="gpt-pick"[^>]*selected', models[1])
    assert re.findall(r'<option value="([^"]+)"', routes[1]) == ["weather"]

    form = {
        "name": "scoped",
        "is_active": "on",
        "allowed_models": ["gpt-pick", "gpt-other"],
        "allowed_routes": ["weather"],
        "budget_period": "month",
        "metadata": "{}",
    }
    assert admin_client_.post(url, form).status_code == 302
    key.refresh_from_db()
    assert (key.allowed_models, key.allowed_routes) == (["gpt-pick", "gpt-other"], ["weather"])

    answer = admin_client_.post(url, {**form, "allowed_models": ["gpt-gone"]})
    assert answer.status_code == 200
    assert "Unknown model: gpt-gone." in answer.content.decode()


def test_the_change_page_charts_the_keys_last_30_days_and_its_headroom(admin_client_: Client) -> None:
    now = timezone.now()
    key = ApiKeyFactory(name="busy", rpm_limit=10, tpm_limit=1000)
    quiet = ApiKeyFactory(name="quiet-one")
    for seconds in (5, 10, 20):
        usage(
            key=key,
            started_at=now - timedelta(seconds=seconds),
            prompt_tokens=60,
            completion_tokens=40,
            total_tokens=100,
        )
    usage(key=key, started_at=now - timedelta(days=3), status=502, error_code="upstream_error")
    usage(key=key, started_at=now - timedelta(days=40))  # outside the window

    page = admin_client_.get(reverse("admin:keys_apikey_change", args=[key.pk])).content.decode()

    charts = dict(re.findall(r'<canvas id="chart-(key-[\w-]+)"[^>]*data-value="([^"]+)"', page))
    assert set(charts) == {"key-requests", "key-tokens", "key-cost"}
    requests = json.loads(html.unescape(charts["key-requests"]))
    assert len(requests["labels"]) >= 30
    assert sum(requests["datasets"][0]["data"]) == 4  # the 40-day-old call is left out
    assert sum(requests["datasets"][1]["data"]) == 1
    assert sum(json.loads(html.unescape(charts["key-tokens"]))["datasets"][0]["data"]) == 315
    assert "7 of 10 requests left; 700 of 1,000 tokens left" in page

    page = admin_client_.get(reverse("admin:keys_apikey_change", args=[quiet.pk])).content.decode()
    assert "No calls in the last 30 days." in page
    assert "no per-minute limit" in page


def test_the_change_page_queries_do_not_grow_with_the_keys_calls(admin_client_: Client) -> None:
    key = ApiKeyFactory(name="counted", rpm_limit=10)
    now = timezone.now()
    url = reverse("admin:keys_apikey_change", args=[key.pk])

    def queries_with(rows: int) -> int:
        while UsageRecord.objects.filter(key_id=key.pk).count() < rows:
            n = UsageRecord.objects.count()
            usage(key=key, started_at=now - timedelta(hours=n % 700), status=200 if n % 3 else 500)
        admin_client_.get(url)  # warm: session, content types
        with CaptureQueriesContext(connection) as queries:
            assert admin_client_.get(url).status_code == 200
        return len(queries)

    assert queries_with(10) == queries_with(100)
