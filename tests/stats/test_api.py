"""The statistics API: shapes, numbers (rollups + tail = raw only), permissions, CSV, every validation error."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from rest_framework.test import APIClient

from accounts.models import User
from gateway_stats.models import UsageRollup, UsageRollupState
from gateway_stats.rollups import usage_rollup
from tests.stats.conftest import call, hour_ago, random_calls

pytestmark = pytest.mark.django_db

USAGE, SUMMARY, ERRORS = "/api/stats/usage", "/api/stats/summary", "/api/stats/errors"
Clients = Callable[[User], APIClient]


def _get(client: APIClient, url: str, **params: Any) -> Any:
    response = client.get(url, params)
    assert response.status_code == 200, response.content
    return response.json()


def _window(hours: float = 30) -> dict[str, str]:
    return {"start": hour_ago(hours).isoformat(), "end": (hour_ago(0) + timedelta(minutes=1)).isoformat()}


@pytest.fixture
def traffic(user: User, other_user: User) -> list[Any]:
    """Calls of ``user`` (keys 10*id, 10*id+1) and of ``other_user`` over the last 30 hours."""
    return random_calls(240, start=hour_ago(30), span=timedelta(hours=29, minutes=50), users=(user.pk, other_user.pk))


def _raw_only() -> None:
    UsageRollup.objects.all().delete()
    UsageRollupState.objects.all().delete()


QUERIES: list[tuple[str, dict[str, str]]] = [
    (SUMMARY, {}),
    (SUMMARY, {"top_by": "cost"}),
    (USAGE, {"interval": "hour", "group_by": "model"}),
    (USAGE, {"interval": "day", "group_by": "key"}),
    (USAGE, {"interval": "minute", "group_by": "upstream"}),
    (USAGE, {"interval": "hour", "group_by": "route"}),
    (USAGE, {"interval": "hour"}),
]


def test_rollups_plus_the_tail_answer_what_the_raw_ledger_alone_answers(
    client_for: Clients, staff: User, traffic: list[Any]
) -> None:
    api = client_for(staff)
    window = _window()
    before = [_get(api, url, **window, **params) for url, params in QUERIES]  # no rollup yet: the ledger only
    assert before[0]["totals"]["requests"] == len(traffic)

    usage_rollup()
    rolled = [_get(api, url, **window, **params) for url, params in QUERIES]
    call(started_at=hour_ago(0.2), user_id=traffic[0].user_id, key_id=traffic[0].key_id)  # the tail
    call(started_at=hour_ago(20), model="late-model", status=503)  # late: its buckets were rolled already
    merged = [_get(api, url, **window, **params) for url, params in QUERIES]
    _raw_only()
    raw = [_get(api, url, **window, **params) for url, params in QUERIES]

    assert rolled == before
    assert merged == raw
    assert merged[0]["totals"]["requests"] == len(traffic) + 2


def test_usage_series_shape_and_numbers(client_for: Clients, user: User) -> None:
    bucket = hour_ago(3).replace(minute=0)
    call(started_at=bucket + timedelta(minutes=5), user_id=user.pk, key_id=7, prompt_tokens=100, completion_tokens=50)
    call(started_at=bucket + timedelta(minutes=9), user_id=user.pk, key_id=7, status=429, latency_ms=50)
    call(started_at=bucket + timedelta(minutes=70), user_id=user.pk, key_id=8, status=502)
    usage_rollup()

    body = _get(client_for(user), USAGE, **_window(4), interval="hour", group_by="key")

    assert body["interval"] == "hour"
    assert body["group_by"] == "key"
    assert body["start"] == hour_ago(4).replace(minute=0).isoformat().replace("+00:00", "Z")
    first, second = body["series"]
    assert (first["group"], first["label"]) == ("7", "sk-00000007")
    assert second["group"] == "8"
    (point,) = first["points"]
    assert point["bucket"] == bucket.isoformat().replace("+00:00", "Z")
    assert point["requests"] == 2
    assert (point["errors"], point["errors_4xx"], point["errors_5xx"]) == (1, 1, 0)
    assert (point["prompt_tokens"], point["completion_tokens"], point["total_tokens"]) == (110, 55, 165)
    assert Decimal(point["cost"]) == Decimal("0.00075") + Decimal("0.000075")  # prices: 0.0025 and 0.01 per 1k
    assert (point["request_bytes"], point["response_bytes"]) == (600, 1800)
    assert point["latency_p50_ms"] == pytest.approx(50, rel=0.05)
    assert point["latency_p99_ms"] == pytest.approx(120, rel=0.05)
    assert second["points"][0]["errors_5xx"] == 1


def test_without_group_by_one_series_and_the_interval_follows_the_range(client_for: Clients, user: User) -> None:
    call(started_at=hour_ago(1), user_id=user.pk)
    api = client_for(user)

    short = _get(api, USAGE, start=hour_ago(2).isoformat())
    week = _get(api, USAGE, start=hour_ago(24 * 5).isoformat())
    month = _get(api, USAGE, start=hour_ago(24 * 30).isoformat())

    assert (short["interval"], week["interval"], month["interval"]) == ("minute", "hour", "day")
    assert [series["group"] for series in short["series"]] == [None]
    assert short["series"][0]["points"][0]["requests"] == 1
    assert _get(api, USAGE)["interval"] == "hour"  # default range: the last 24 hours


def test_summary_totals_and_tops(client_for: Clients, staff: User) -> None:
    start = hour_ago(5)
    for index in range(12):
        for _ in range(index + 1):
            call(started_at=start + timedelta(minutes=index), key_id=index + 1, model=f"m{index}", upstream="up")
    call(started_at=start, key_id=99, model="pricey", upstream="up", prompt_tokens=1_000_000)
    usage_rollup()

    by_requests = _get(client_for(staff), SUMMARY, **_window(6))
    by_cost = _get(client_for(staff), SUMMARY, **_window(6), top_by="cost")

    totals = by_requests["totals"]
    assert totals["requests"] == sum(range(1, 13)) + 1
    assert totals["latency_p50_ms"] == pytest.approx(120, rel=0.05)
    assert [entry["group"] for entry in by_requests["top_keys"]] == [str(n) for n in range(12, 2, -1)]
    assert by_requests["top_keys"][0]["label"] == "sk-00000012"
    assert len(by_requests["top_models"]) == 10
    assert by_requests["top_upstreams"] == [{**by_requests["top_upstreams"][0], "group": "up", "label": "up"}]
    assert by_cost["top_models"][0]["group"] == "pricey"
    assert "latency_p50_ms" not in by_cost["top_models"][0]


def test_an_empty_range_answers_zeros(client_for: Clients, user: User) -> None:
    body = _get(client_for(user), SUMMARY)

    assert body["totals"]["requests"] == 0
    assert Decimal(body["totals"]["cost"]) == 0
    assert body["totals"]["latency_p95_ms"] is None
    assert body["top_keys"] == []


def test_errors_by_code_status_upstream_and_model_with_the_latest_request_ids(client_for: Clients, user: User) -> None:
    base = hour_ago(2)
    for minute in range(7):
        call(
            started_at=base + timedelta(minutes=minute),
            user_id=user.pk,
            status=502,
            error_code="upstream_error",
            request_id=f"r{minute}",
        )
    call(started_at=base, user_id=user.pk, status=429, error_code="rate_limited", model="gpt-4o-mini")
    call(started_at=base, user_id=user.pk, status=200)

    body = _get(client_for(user), ERRORS, **_window(3))

    first, second = body["errors"]
    assert (first["error_code"], first["status"], first["upstream"], first["model"]) == (
        "upstream_error",
        502,
        "openai-a",
        "gpt-4o",
    )
    assert first["count"] == 7
    assert first["request_ids"] == ["r6", "r5", "r4", "r3", "r2"]
    assert first["last_at"] == (base + timedelta(minutes=6)).isoformat().replace("+00:00", "Z")
    assert (second["error_code"], second["count"]) == ("rate_limited", 1)


# --- permissions -----------------------------------------------------------------------------------------


def test_a_user_sees_only_their_own_keys_usage(
    client_for: Clients, user: User, other_user: User, traffic: list[Any]
) -> None:
    usage_rollup()
    api = client_for(user)
    mine = [record for record in traffic if record.user_id == user.pk]
    other_key = other_user.pk * 10

    summary = _get(api, SUMMARY, **_window())
    by_user = _get(api, USAGE, **_window(), interval="day", group_by="user")
    by_key = _get(api, USAGE, **_window(), interval="day", group_by="key")
    errors = _get(api, ERRORS, **_window())

    assert summary["totals"]["requests"] == len(mine)
    assert {entry["group"] for entry in summary["top_keys"]} == {str(user.pk * 10), str(user.pk * 10 + 1)}
    assert [series["group"] for series in by_user["series"]] == [str(user.pk)]
    assert {series["group"] for series in by_key["series"]} <= {str(user.pk * 10), str(user.pk * 10 + 1)}
    assert sum(group["count"] for group in errors["errors"]) == sum(record.status >= 400 for record in mine)
    # Naming someone else's key or id matches nothing (and says nothing about them).
    assert _get(api, SUMMARY, **_window(), key=other_key)["totals"]["requests"] == 0
    assert _get(api, SUMMARY, **_window(), user=other_user.pk)["totals"]["requests"] == 0
    assert _get(api, USAGE, **_window(), key=other_key)["series"] == []
    assert _get(api, ERRORS, **_window(), user=other_user.pk)["errors"] == []


def test_staff_see_everyone_and_filter_by_user_key_and_model(
    client_for: Clients, staff: User, user: User, other_user: User, traffic: list[Any]
) -> None:
    usage_rollup()
    api = client_for(staff)
    theirs = [record for record in traffic if record.user_id == other_user.pk]
    key = other_user.pk * 10 + 1

    assert _get(api, SUMMARY, **_window())["totals"]["requests"] == len(traffic)
    assert _get(api, SUMMARY, **_window(), user=other_user.pk)["totals"]["requests"] == len(theirs)
    assert _get(api, SUMMARY, **_window(), key=key)["totals"]["requests"] == sum(r.key_id == key for r in theirs)
    assert _get(api, SUMMARY, **_window(), model="gpt-4o")["totals"]["requests"] == sum(
        r.model == "gpt-4o" for r in traffic
    )
    by_user = _get(api, USAGE, **_window(), interval="day", group_by="user")
    assert {series["group"] for series in by_user["series"]} == {str(user.pk), str(other_user.pk)}


def test_staff_without_the_view_permission_are_treated_as_users(client_for: Clients, traffic: list[Any]) -> None:
    staff_only = User.objects.create_user(username="clerk", password="x-Long-enough-1", is_staff=True)

    assert _get(client_for(staff_only), SUMMARY, **_window())["totals"]["requests"] == 0


@pytest.mark.parametrize("url", [USAGE, SUMMARY, ERRORS])
def test_anonymous_callers_are_refused(url: str) -> None:
    response = APIClient().get(url)

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


# --- CSV -------------------------------------------------------------------------------------------------


def _csv(client: APIClient, url: str, **params: Any) -> list[dict[str, str]]:
    response = client.get(url, {**params, "format": "csv"})
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.content.decode())))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def test_usage_csv_has_one_row_per_point_matching_the_json(
    client_for: Clients, staff: User, traffic: list[Any]
) -> None:
    usage_rollup()
    api = client_for(staff)
    params = {**_window(), "interval": "hour", "group_by": "model"}

    body = _get(api, USAGE, **params)
    rows = _csv(api, USAGE, **params)

    expected = [
        {"group": _text(series["group"]), "label": _text(series["label"]), **{k: _text(v) for k, v in point.items()}}
        for series in body["series"]
        for point in series["points"]
    ]
    assert rows == expected
    assert sum(int(row["requests"]) for row in rows) == len(traffic)


def test_summary_csv_has_the_totals_then_the_tops_matching_the_json(
    client_for: Clients, staff: User, traffic: list[Any]
) -> None:
    api = client_for(staff)

    body = _get(api, SUMMARY, **_window())
    rows = _csv(api, SUMMARY, **_window())

    assert rows[0] == {"section": "total", "group": "", "label": "", **{k: _text(v) for k, v in body["totals"].items()}}
    tops = rows[1:]
    expected = [
        {"section": section, **{k: _text(entry.get(k)) for k in rows[0] if k != "section"}}
        for section in ("top_keys", "top_models", "top_upstreams")
        for entry in body[section]
    ]
    assert tops == expected


def test_csv_cells_that_look_like_formulas_are_quoted(client_for: Clients, staff: User) -> None:
    call(started_at=hour_ago(1), model="=HYPERLINK(1)")

    rows = _csv(client_for(staff), USAGE, group_by="model")

    assert rows[0]["group"] == "'=HYPERLINK(1)"


def test_errors_in_a_csv_request_are_json(client_for: Clients, user: User) -> None:
    response = client_for(user).get(USAGE, {"format": "csv", "interval": "week"})

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["fields"] == {"interval": ['"week" is not a valid choice.']}


# --- validation ------------------------------------------------------------------------------------------

_NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.mark.parametrize(
    ("url", "params", "field", "message"),
    [
        (USAGE, {"start": "yesterday"}, "start", "Datetime has wrong format"),
        (USAGE, {"end": "2024-13-01T00:00:00Z"}, "end", "Datetime has wrong format"),
        (USAGE, {"start": "2024-01-02T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "end", "Must be after start"),
        (SUMMARY, {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "end", "Must be after start"),
        (USAGE, {"start": (_NOW + timedelta(hours=1)).isoformat()}, "end", "it defaults to now"),
        (USAGE, {"start": "1969-12-31T00:00:00Z", "end": "1970-01-02T00:00:00Z"}, "start", "between 1970"),
        (ERRORS, {"end": "0001-01-01T00:00:00Z"}, "end", "between 1970"),
        (SUMMARY, {"start": "2999-12-31T23:59:59Z", "end": "3000-01-01T00:00:01Z"}, "end", "between 1970"),
        (USAGE, {"interval": "week"}, "interval", "not a valid choice"),
        (USAGE, {"group_by": "country"}, "group_by", "not a valid choice"),
        (
            USAGE,
            {"start": "2024-01-01T00:00:00Z", "end": "2024-01-04T00:00:00Z", "interval": "minute"},
            "interval",
            "covers at most 2 days",
        ),
        (
            USAGE,
            {"start": "2024-01-01T00:00:00Z", "end": "2024-06-01T00:00:00Z", "interval": "hour"},
            "interval",
            "covers at most 93 days",
        ),
        (
            USAGE,
            {"start": "2020-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z", "interval": "day"},
            "interval",
            "covers at most 800 days",
        ),
        (USAGE, {"start": "2020-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "start", "at most 800 days"),
        (SUMMARY, {"start": "2020-01-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}, "start", "at most 800 days"),
        (ERRORS, {"start": "2024-01-01T00:00:00Z", "end": "2024-03-01T00:00:00Z"}, "start", "at most 31 days"),
        (USAGE, {"key": "abc"}, "key", "A valid integer is required"),
        (SUMMARY, {"key": "0"}, "key", "greater than or equal to 1"),
        (ERRORS, {"user": "-3"}, "user", "greater than or equal to 1"),
        (USAGE, {"user": str(2**64)}, "user", "less than or equal to"),
        (USAGE, {"model": "m" * 129}, "model", "no more than 128 characters"),
        (SUMMARY, {"top_by": "tokens"}, "top_by", "not a valid choice"),
        (USAGE, {"format": "xml"}, "format", "Must be one of: json, csv"),
        (ERRORS, {"format": "csv"}, "format", "Must be one of: json."),
    ],
)
def test_bad_queries_are_400s_naming_the_parameter(
    client_for: Clients, user: User, url: str, params: dict[str, str], field: str, message: str
) -> None:
    response = client_for(user).get(url, params)

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "invalid"
    assert list(body["fields"]) == [field]
    assert message in body["fields"][field][0], body


def test_a_repeated_parameter_is_a_400(client_for: Clients, user: User) -> None:
    response = client_for(user).get(f"{USAGE}?interval=hour&interval=day")

    assert response.status_code == 400
    assert response.json()["fields"] == {"interval": ["Give this parameter once."]}


def test_empty_parameters_are_no_parameters_and_offsets_and_dates_are_read(client_for: Clients, user: User) -> None:
    api = client_for(user)

    empty = _get(api, USAGE, start="", end="", interval="", group_by="", key="", model="")
    offset = _get(api, SUMMARY, start="2024-01-01T05:00:00+05:00", end="2024-01-02")
    naive = _get(api, SUMMARY, start="2024-01-01T00:00:00", end="2024-01-01T00:00:30")

    assert empty["interval"] == "hour"
    assert (offset["start"], offset["end"]) == ("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z")
    assert (naive["start"], naive["end"]) == ("2024-01-01T00:00:00Z", "2024-01-01T00:01:00Z")


def test_the_stats_endpoints_are_documented(client_for: Clients, user: User) -> None:
    schema = _get(client_for(user), "/api/schema/", format="json")

    for url in (USAGE, SUMMARY, ERRORS):
        operation = schema["paths"][url]["get"]
        assert {"start", "end", "key", "user", "model"} <= {p["name"] for p in operation["parameters"]}
        assert "400" in operation["responses"]
    assert set(schema["paths"][USAGE]["get"]["responses"]["200"]["content"]) == {"application/json", "text/csv"}


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_the_statistics_read_one_snapshot(client_for: Clients) -> None:
    staff = User.objects.create_superuser(username="root2", password="x-Long-enough-1")
    call(started_at=hour_ago(2))
    usage_rollup()
    call(started_at=hour_ago(1))

    assert _get(client_for(staff), SUMMARY)["totals"]["requests"] == 2
