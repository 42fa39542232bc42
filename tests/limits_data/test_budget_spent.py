"""What a key has spent of its budget in the current period, from the usage ledger: the key API's
budget_spent / budget_remaining / budget_resets_at, the admin's read-only view of them, and the selector
(one query for a whole page of keys, each key summed over its own period)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from keys.periods import budget_period_bounds
from keys.selectors import key_budget_spent_many
from tests.factories import ApiKeyFactory, UserFactory
from tests.limits_data.conftest import usage

pytestmark = pytest.mark.django_db

URL = "/api/keys/"
MICROSECOND = timedelta(microseconds=1)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _period_start(period: str) -> datetime:
    return datetime.fromtimestamp(budget_period_bounds(period)[0], UTC)


def _iso_z(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


# --- the selector ------------------------------------------------------------------------------------
def test_only_calls_since_the_day_began_count_against_a_daily_budget() -> None:
    key = ApiKeyFactory(budget_tokens=1000, budget_cost=Decimal("1"), budget_period="day")
    now = _at("2026-06-10T15:00:00+00:00")
    usage(key=key, started_at=_at("2026-06-09T23:59:59.999999+00:00"), total_tokens=500, cost="0.5")  # yesterday
    usage(key=key, started_at=_at("2026-06-10T00:00:00+00:00"), total_tokens=100, cost="0.125")
    usage(key=key, started_at=_at("2026-06-10T14:59:00+00:00"), total_tokens=20, cost="0.0000000001")

    spent = key_budget_spent_many([key], now=now.timestamp())[key.pk]

    assert (spent.tokens, spent.cost) == (120, Decimal("0.1250000001"))
    assert (spent.remaining_tokens, spent.remaining_cost) == (880, Decimal("0.8749999999"))
    assert spent.resets_at == _at("2026-06-11T00:00:00+00:00")

    # Once the day rolls, yesterday's calls no longer count.
    tomorrow = key_budget_spent_many([key], now=_at("2026-06-11T00:00:00+00:00").timestamp())[key.pk]
    assert (tomorrow.tokens, tomorrow.cost, tomorrow.remaining_tokens) == (0, Decimal(0), 1000)
    assert tomorrow.resets_at == _at("2026-06-12T00:00:00+00:00")


def test_a_monthly_budget_starts_again_on_the_first_of_the_month() -> None:
    key = ApiKeyFactory(budget_tokens=50, budget_period="month")
    usage(key=key, started_at=_at("2026-02-28T23:59:59+00:00"), total_tokens=40, cost="0")
    usage(key=key, started_at=_at("2026-03-01T00:10:00+00:00"), total_tokens=7, cost="0")

    in_march = key_budget_spent_many([key], now=_at("2026-03-01T00:30:00+00:00").timestamp())[key.pk]
    in_february = key_budget_spent_many([key], now=_at("2026-02-28T23:59:59.5+00:00").timestamp())[key.pk]

    assert (in_march.tokens, in_march.remaining_tokens, in_march.resets_at) == (
        7,
        43,
        _at("2026-04-01T00:00:00+00:00"),
    )
    # A call of the next period (e.g. from a worker whose clock runs ahead) is not February's.
    assert (in_february.tokens, in_february.resets_at) == (40, _at("2026-03-01T00:00:00+00:00"))


def test_a_total_budget_counts_every_call_and_never_resets() -> None:
    key = ApiKeyFactory(budget_cost=Decimal("2"), budget_period="total")
    usage(key=key, started_at=_at("2001-01-01T00:00:00+00:00"), total_tokens=3, cost="1.5")
    usage(key=key, started_at=_at("2026-06-10T00:00:00+00:00"), total_tokens=4, cost="0.25")

    spent = key_budget_spent_many([key], now=_at("2026-06-10T12:00:00+00:00").timestamp())[key.pk]

    assert (spent.tokens, spent.cost, spent.remaining_cost, spent.resets_at) == (
        7,
        Decimal("1.75"),
        Decimal("0.25"),
        None,
    )
    assert spent.remaining_tokens is None  # no token budget


def test_what_remains_never_goes_below_zero() -> None:
    key = ApiKeyFactory(budget_tokens=10, budget_cost=Decimal("0.01"), budget_period="total")
    usage(key=key, started_at=_at("2026-06-10T00:00:00+00:00"), total_tokens=25, cost="0.5")

    spent = key_budget_spent_many([key])[key.pk]

    assert (spent.tokens, spent.cost) == (25, Decimal("0.5"))
    assert (spent.remaining_tokens, spent.remaining_cost) == (0, Decimal(0))


def test_the_budget_time_zone_decides_where_the_day_starts(settings: Any) -> None:
    key = ApiKeyFactory(budget_tokens=100, budget_period="day")
    usage(key=key, started_at=_at("2026-06-10T21:30:00+00:00"), total_tokens=1, cost="0")  # 23:30 in Paris
    usage(key=key, started_at=_at("2026-06-10T22:30:00+00:00"), total_tokens=10, cost="0")  # 00:30 on the 11th
    now = _at("2026-06-10T23:30:00+00:00").timestamp()

    settings.BUDGET_TIMEZONE = "UTC"
    in_utc = key_budget_spent_many([key], now=now)[key.pk]
    settings.BUDGET_TIMEZONE = "Europe/Paris"
    in_paris = key_budget_spent_many([key], now=now)[key.pk]

    assert (in_utc.tokens, in_utc.resets_at) == (11, _at("2026-06-11T00:00:00+00:00"))
    assert (in_paris.tokens, in_paris.resets_at) == (10, _at("2026-06-11T22:00:00+00:00"))


def test_each_key_on_a_page_is_summed_over_its_own_period_in_one_query() -> None:
    owner = UserFactory()
    now = _at("2026-06-10T12:00:00+00:00")
    daily = ApiKeyFactory(owner=owner, budget_tokens=100, budget_period="day")
    monthly = ApiKeyFactory(owner=owner, budget_tokens=100, budget_period="month")
    total = ApiKeyFactory(owner=owner, budget_tokens=100, budget_period="total")
    idle = ApiKeyFactory(owner=owner, budget_period="day")
    other = ApiKeyFactory()  # another key's calls never count
    for key in (daily, monthly, total, other):
        usage(key=key, started_at=_at("2026-06-10T01:00:00+00:00"), total_tokens=1, cost="0.1")  # today
        usage(key=key, started_at=_at("2026-06-02T01:00:00+00:00"), total_tokens=10, cost="1")  # this month
        usage(key=key, started_at=_at("2025-12-31T01:00:00+00:00"), total_tokens=100, cost="10")  # last year

    with CaptureQueriesContext(connection) as queries:
        spent = key_budget_spent_many([daily, monthly, total, idle], now=now.timestamp())

    assert len(queries.captured_queries) == 1
    assert {key_id: (s.tokens, s.cost) for key_id, s in spent.items()} == {
        daily.pk: (1, Decimal("0.1")),
        monthly.pk: (11, Decimal("1.1")),
        total.pk: (111, Decimal("11.1")),
        idle.pk: (0, Decimal(0)),
    }


def test_no_keys_take_no_query(django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(0):
        assert key_budget_spent_many([]) == {}


def test_rejected_calls_in_the_ledger_count_for_what_they_used() -> None:
    key = ApiKeyFactory(budget_tokens=10, budget_period="total")
    usage(key=key, started_at=_at("2026-06-10T00:00:00+00:00"), total_tokens=0, cost="0", status=429)
    usage(key=key, started_at=_at("2026-06-10T00:00:01+00:00"), total_tokens=4, cost="0", status=500)

    assert key_budget_spent_many([key])[key.pk].tokens == 4


# --- the key API -------------------------------------------------------------------------------------
def test_a_keys_answer_shows_what_it_spent_what_remains_and_when_the_budget_resets(client_for: Any, user: User) -> None:
    key = ApiKeyFactory(owner=user, budget_tokens=1000, budget_cost=Decimal("2.5"), budget_period="day")
    start = _period_start("day")
    usage(key=key, started_at=start - MICROSECOND, total_tokens=900, cost="2")  # the previous day
    usage(key=key, started_at=start, total_tokens=150, cost="0.75")
    usage(key=key, started_at=start, total_tokens=50, cost="0.0000000005")

    body = client_for(user).get(f"{URL}{key.pk}/").json()

    assert body["budget_spent"] == {"tokens": 200, "cost": "0.7500000005"}
    assert body["budget_remaining"] == {"tokens": 800, "cost": "1.7499999995"}
    assert body["budget_resets_at"] == _iso_z(budget_period_bounds("day")[1])


def test_a_key_without_budgets_shows_its_spend_and_no_remaining(client_for: Any, user: User) -> None:
    key = ApiKeyFactory(owner=user)  # monthly period, no budget
    usage(key=key, started_at=_period_start("month"), total_tokens=12, cost="0.5")

    body = client_for(user).get(f"{URL}{key.pk}/").json()

    assert body["budget_spent"] == {"tokens": 12, "cost": "0.5000000000"}
    assert body["budget_remaining"] == {"tokens": None, "cost": None}
    assert body["budget_resets_at"] == _iso_z(budget_period_bounds("month")[1])


def test_a_total_budget_has_no_reset_and_an_overspent_one_shows_zero(client_for: Any, user: User) -> None:
    key = ApiKeyFactory(owner=user, budget_tokens=5, budget_cost=Decimal("0.1"), budget_period="total")
    usage(key=key, started_at=_at("2020-01-01T00:00:00+00:00"), total_tokens=9, cost="0.3")

    body = client_for(user).get(f"{URL}{key.pk}/").json()

    assert body["budget_spent"] == {"tokens": 9, "cost": "0.3000000000"}
    assert body["budget_remaining"] == {"tokens": 0, "cost": "0.0000000000"}
    assert body["budget_resets_at"] is None


def test_create_update_and_rotate_answers_carry_the_budget_too(client_for: Any, user: User) -> None:
    api = client_for(user)
    created = api.post(URL, {"name": "fresh", "budget_tokens": 10, "budget_period": "total"}, format="json").json()
    assert (created["budget_spent"], created["budget_remaining"], created["budget_resets_at"]) == (
        {"tokens": 0, "cost": "0.0000000000"},
        {"tokens": 10, "cost": None},
        None,
    )

    changed = api.patch(f"{URL}{created['id']}/", {"budget_period": "day", "budget_cost": "1"}, format="json").json()
    assert changed["budget_remaining"] == {"tokens": 10, "cost": "1.0000000000"}
    assert changed["budget_resets_at"] == _iso_z(budget_period_bounds("day")[1])

    rotated = api.post(f"{URL}{created['id']}/rotate/", {}, format="json").json()
    assert rotated["budget_remaining"] == {"tokens": 10, "cost": "1.0000000000"}


@pytest.mark.parametrize(
    "body", [{"budget_spent": {"tokens": 0, "cost": "0"}}, {"budget_remaining": None}, {"budget_resets_at": None}]
)
def test_the_budget_state_is_read_only(client_for: Any, user: User, body: dict[str, Any]) -> None:
    key = ApiKeyFactory(owner=user)

    answer = client_for(user).patch(f"{URL}{key.pk}/", body, format="json")

    assert answer.status_code == 400
    assert list(answer.json()["fields"]) == list(body)


def test_the_key_list_shows_each_keys_spend_with_one_query_for_the_whole_page(client_for: Any, user: User) -> None:
    api = client_for(user)

    def _page_queries() -> tuple[int, dict[int, Any]]:
        with CaptureQueriesContext(connection) as queries:
            answer = api.get(URL)
        assert answer.status_code == 200
        return len(queries.captured_queries), {row["id"]: row for row in answer.json()["results"]}

    def _keys_with_calls(count: int) -> None:
        for number in range(count):
            period = ("day", "month", "total")[number % 3]
            key = ApiKeyFactory(owner=user, budget_tokens=100, budget_period=period)
            usage(key=key, started_at=_period_start(period), total_tokens=number + 1, cost="0.01")
            usage(key=key, started_at=_at("2000-01-01T00:00:00+00:00"), total_tokens=1000, cost="1")

    _keys_with_calls(2)
    few, _rows = _page_queries()
    _keys_with_calls(16)
    many, rows = _page_queries()

    assert many == few
    assert len(rows) == 18
    for row in rows.values():
        tokens = row["budget_spent"]["tokens"]
        expected_remaining = max(100 - tokens, 0)
        assert row["budget_remaining"]["tokens"] == expected_remaining
        assert (row["budget_period"] == "total") == (tokens > 1000)


def test_the_schema_documents_the_budget_state() -> None:
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    properties = schema["components"]["schemas"]["ApiKey"]["properties"]
    schemas = schema["components"]["schemas"]

    for field in ("budget_spent", "budget_remaining", "budget_resets_at"):
        assert properties[field]["readOnly"] is True
        assert properties[field].get("description")
    spent = schemas[properties["budget_spent"]["allOf"][0]["$ref"].rsplit("/", 1)[1]]
    remaining = schemas[properties["budget_remaining"]["allOf"][0]["$ref"].rsplit("/", 1)[1]]
    assert spent["properties"]["tokens"]["type"] == "integer"
    assert spent["properties"]["cost"]["type"] == "string"
    assert spent["properties"]["cost"]["format"] == "decimal"
    assert remaining["properties"]["tokens"]["nullable"] is True
    assert remaining["properties"]["cost"]["nullable"] is True
    assert properties["budget_resets_at"]["format"] == "date-time"
    assert properties["budget_resets_at"]["nullable"] is True


# --- the admin ---------------------------------------------------------------------------------------
def test_the_key_admin_shows_the_budget_state_read_only(admin_client_: Client) -> None:
    key = ApiKeyFactory(budget_tokens=1000, budget_cost=Decimal("3"), budget_period="day")
    usage(key=key, started_at=_period_start("day"), total_tokens=250, cost="1.25")
    total_key = ApiKeyFactory(budget_period="total")

    page = admin_client_.get(f"/admin/keys/apikey/{key.pk}/change/")
    total_page = admin_client_.get(f"/admin/keys/apikey/{total_key.pk}/change/")

    assert page.status_code == 200
    form = page.context["adminform"].form
    for field in ("budget_spent", "budget_remaining", "budget_resets_at"):
        assert field not in form.fields  # shown, not editable
    html = page.content.decode()
    assert "250 tokens, 1.2500 cost" in html
    assert "750 tokens, 1.7500 cost" in html
    assert "budget resets at" in html.lower()
    total_html = total_page.content.decode()
    assert "never (total)" in total_html
    assert "- (no budget)" in total_html
