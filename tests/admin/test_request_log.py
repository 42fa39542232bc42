"""The request log's filters and badges: status class, route, a typed key prefix or user (no list of every key or
user), the exact request id search, the status as a coloured badge, and a query count that stays flat as the
ledger grows.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from gateway_stats.models import UsageRecord
from tests.factories import UserFactory
from tests.records.conftest import at, usage

pytestmark = pytest.mark.django_db

LOG = "/admin/gateway_stats/usagerecord/"
_clone_ids = itertools.count(1)


@pytest.fixture
def client_(admin_for: Callable[[User], Client], root: User) -> Client:
    return admin_for(root)


@pytest.fixture
def calls() -> dict[str, UsageRecord]:
    carol = UserFactory(username="carol")
    return {
        "ok": usage(request_id="req-ok", key_prefix="afk_aaaa1111", user_id=carol.pk, route="billing"),
        "limited": usage(request_id="req-limited", status=429, error_code="rate_limited", key_prefix="afk_bbbb2222"),
        "failed": usage(request_id="req-failed", status=502, error_code="upstream_error", route="search"),
        "prefix-of-another": usage(request_id="req-ok-2", key_prefix="afk_aaaa9999"),
    }


def _shown(client: Client, query: dict[str, str]) -> set[str]:
    answer = client.get(LOG, query)
    assert answer.status_code == 200, answer.content[:2000]
    return {row.request_id for row in answer.context["cl"].result_list}


@pytest.mark.parametrize(
    ("status_class", "expected"),
    [
        ("2xx", {"req-ok", "req-ok-2"}),
        ("4xx", {"req-limited"}),
        ("5xx", {"req-failed"}),
        ("9xx", {"req-ok", "req-ok-2", "req-limited", "req-failed"}),  # not a class: no filter, no error
    ],
)
def test_the_status_class_filter_narrows_the_list(client_, calls, status_class, expected):
    assert _shown(client_, {"status_class": status_class}) == expected


def test_the_filter_panel_offers_the_status_classes_routes_and_text_fields(client_, calls):
    page = client_.get(LOG).content.decode()

    for choice in ("?status_class=2xx", "?status_class=4xx", "?status_class=5xx", "?route=billing", "?route=search"):
        assert choice in page
    assert 'name="key_prefix"' in page
    assert 'name="user"' in page


def test_the_route_filter_narrows_the_list(client_, calls):
    assert _shown(client_, {"route": "search"}) == {"req-failed"}
    assert _shown(client_, {"route": "billing"}) == {"req-ok"}


def test_the_key_prefix_filter_matches_the_start_of_the_prefix(client_, calls):
    assert _shown(client_, {"key_prefix": "afk_aaaa"}) == {"req-ok", "req-ok-2"}
    assert _shown(client_, {"key_prefix": " afk_bbbb2222 "}) == {"req-limited"}
    assert _shown(client_, {"key_prefix": "aaaa"}) == set()


def test_the_user_filter_takes_an_id_or_a_username(client_, calls):
    carol = User.objects.get(username="carol")

    assert _shown(client_, {"user": str(carol.pk)}) == {"req-ok"}
    assert _shown(client_, {"user": "carol"}) == {"req-ok"}
    assert _shown(client_, {"user": "nobody"}) == set()
    assert _shown(client_, {"user": "9" * 30}) == set()  # beyond any id: nothing, not a database error
    assert _shown(client_, {"user": " "}) == {"req-ok", "req-ok-2", "req-limited", "req-failed"}


def test_the_request_id_search_finds_exactly_that_call(client_, calls):
    assert _shown(client_, {"q": "req-ok"}) == {"req-ok"}
    assert _shown(client_, {"q": "req-ok-2"}) == {"req-ok-2"}


def test_each_status_is_a_badge_coloured_by_its_class(client_, calls):
    page = client_.get(LOG).content.decode()

    badge = re.compile(
        r'<td class="field-status_badge[^"]*"[^>]*>'
        r'\s*<span class="[^"]*bg-(\w+)-100[^"]*"[^>]*>\s*(\d+)'
    )
    badges = {int(status): colour for colour, status in badge.findall(page)}
    assert badges == {200: "green", 429: "orange", 502: "red"}


def _ledger(rows: int, users: list[User]) -> None:
    """``rows`` ledger rows spread over ``users`` and keys, written in one statement."""
    template = usage(user_id=users[0].pk, key_id=1, key_prefix="afk_template")
    clones = []
    for number in range(rows - 1):
        clone = UsageRecord(**{f.attname: getattr(template, f.attname) for f in UsageRecord._meta.concrete_fields})
        clone.pk = None
        clone.event_id = f"clone{next(_clone_ids):020d}"
        clone.request_id = f"req-clone-{clone.event_id}"
        clone.user_id = users[number % len(users)].pk
        clone.key_id = number % 7 + 1
        clone.status = (200, 429, 502)[number % 3]
        clone.started_at = at(number % 600)
        clones.append(clone)
    UsageRecord.objects.bulk_create(clones)


def _changelist_queries(client: Client, query: dict[str, str]) -> int:
    with CaptureQueriesContext(connection) as context:
        answer = client.get(LOG, query)
    assert answer.status_code == 200
    return len(context.captured_queries)


@pytest.mark.parametrize("query", [{}, {"status_class": "4xx", "user": "carol", "key_prefix": "afk_"}])
def test_the_changelist_takes_the_same_queries_for_10_and_1000_rows(client_, query):
    users = [UserFactory(username="carol"), *UserFactory.create_batch(4)]

    _ledger(10, users)
    few = _changelist_queries(client_, query)
    _ledger(990, users)
    many = _changelist_queries(client_, query)

    assert UsageRecord.objects.count() == 1000
    assert many == few


def test_a_call_that_is_not_streamed_carries_no_red_cross_and_its_cost_reads_as_on_the_dashboard(client_):
    plain = usage(request_id="req-plain", stream=False, cost="0.000008", total_tokens=1234, latency_ms=12.34)
    usage(request_id="req-streamed", stream=True, cost="1.5")

    page = client_.get(LOG).content.decode()
    detail = client_.get(f"{LOG}{plain.pk}/change/").content.decode()

    costs = re.findall(r'<td class="field-cost_text[^"]*"[^>]*>([^<]*)</td>', page)
    assert sorted(costs) == ["0.000008", "1.5000"]
    assert "1,234" in re.findall(r'<td class="field-tokens[^>]*>([^<]*)</td>', page)
    assert "12.3 ms" in re.findall(r'<td class="field-latency[^>]*>([^<]*)</td>', page)
    assert "0.000008" in detail
    assert "0.0000080000" not in detail
    stream = re.search(r">Stream</label>.*?<div class=\"readonly[^>]*>([^<]*)</div>", detail, re.S)
    assert stream is not None
    assert stream[1] == "–"  # a word, not a boolean's red cross


def test_the_model_and_the_route_share_one_column_and_a_key_prefix_never_wraps(client_, calls):
    usage(request_id="req-both", model="gpt-4o", route="chat-route")
    usage(request_id="req-neither", model="", route="")

    page = client_.get(LOG).content.decode()

    targets = re.findall(r'<td class="field-target[^"]*"[^>]*>([^<]*)</td>', page)
    expected = ["gpt-4o (billing)", "gpt-4o", "gpt-4o (search)", "gpt-4o", "gpt-4o (chat-route)", "-"]
    assert sorted(targets) == sorted(expected)
    assert '<span class="whitespace-nowrap">afk_aaaa1111</span>' in page
    started = re.findall(r'<[a-z]+ class="field-started[^"]*"[^>]*>(?:<a [^>]*>)?<span[^>]*>([^<]*)</span>', page)
    assert len(started) == 6
    assert all(re.fullmatch(r"\d\d-\d\d \d\d:\d\d:\d\d", moment) for moment in started)  # to the second
