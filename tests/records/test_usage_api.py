"""The request log over HTTP: who sees which rows, every filter and every bad filter, order, detail lookups."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.factories import ApiKeyFactory
from tests.records.conftest import at, usage

pytestmark = pytest.mark.django_db

URL = "/api/usage/"

FIELDS = {
    "request_id",
    "event_id",
    "started_at",
    "ingested_at",
    "key",
    "key_prefix",
    "user",
    "model",
    "upstream",
    "upstream_model",
    "route",
    "endpoint",
    "method",
    "status",
    "error_code",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_price_per_1k",
    "output_price_per_1k",
    "cost",
    "latency_ms",
    "ttfb_ms",
    "request_bytes",
    "response_bytes",
    "client_ip",
}


def _ids(answer: Any) -> list[str]:
    assert answer.status_code == 200, answer.content
    return [row["event_id"] for row in answer.json()["results"]]


def test_a_row_shows_what_a_logs_page_shows_with_the_cost_as_a_decimal_string(api_for, alice):
    key = ApiKeyFactory(owner=alice)
    row = usage(key_id=key.pk, key_prefix=key.prefix, user_id=alice.pk, stream=True, ttfb_ms=42.0)

    body = api_for(alice).get(URL).json()

    assert set(body) == {"count", "next", "previous", "results"}
    assert body["count"] == 1
    (shown,) = body["results"]
    assert set(shown) == FIELDS
    assert shown["event_id"] == row.event_id
    assert (shown["key"], shown["key_prefix"], shown["user"]) == (key.pk, key.prefix, alice.pk)
    assert shown["cost"] == "0.0000750000"
    assert shown["input_price_per_1k"] == "0.002500"
    assert (shown["prompt_tokens"], shown["completion_tokens"], shown["total_tokens"]) == (10, 5, 15)
    assert (shown["stream"], shown["ttfb_ms"], shown["latency_ms"]) == (True, 42.0, 120.5)
    assert shown["started_at"] == "2025-03-01T12:00:00Z"
    assert shown["client_ip"] == "203.0.113.9"


def test_a_user_sees_the_rows_of_their_calls_and_of_their_keys_never_anyone_elses(api_for, alice, bob):
    alices_key = ApiKeyFactory(owner=alice)
    mine = usage(user_id=alice.pk, key_id=alices_key.pk)
    by_my_key = usage(user_id=None, key_id=alices_key.pk)  # a row that names only the key
    bobs = usage(user_id=bob.pk, key_id=ApiKeyFactory(owner=bob).pk)
    anonymous = usage(user_id=None, key_id=None, status=401, error_code="invalid_api_key")

    assert sorted(_ids(api_for(alice).get(URL))) == sorted([mine.event_id, by_my_key.event_id])
    assert _ids(api_for(bob).get(URL)) == [bobs.event_id]
    # Not even a filter on someone else's key shows their rows.
    assert _ids(api_for(alice).get(URL, {"key": bobs.key_id})) == []
    for row in (bobs, anonymous):
        for lookup in (row.request_id, row.event_id):
            answer = api_for(alice).get(f"{URL}{lookup}/")
            assert answer.status_code == 404, answer.content
            assert answer.json()["code"] == "not_found"


def test_staff_without_the_permission_see_only_their_own_rows(api_for, plain_staff, alice):
    usage(user_id=alice.pk)
    own = usage(user_id=plain_staff.pk)

    assert _ids(api_for(plain_staff).get(URL)) == [own.event_id]


@pytest.mark.parametrize("who", ["log_reader", "root"])
def test_staff_holding_view_usagerecord_see_every_row(api_for, alice, bob, who, request):
    rows = [usage(user_id=alice.pk), usage(user_id=bob.pk), usage(user_id=None)]

    reader = request.getfixturevalue(who)
    assert sorted(_ids(api_for(reader).get(URL))) == sorted(row.event_id for row in rows)
    assert api_for(reader).get(f"{URL}{rows[1].request_id}/").json()["user"] == bob.pk


def test_anonymous_callers_are_refused(api_for, alice):
    row = usage(user_id=alice.pk)
    assert api_for(None).get(URL).status_code == 401
    assert api_for(None).get(f"{URL}{row.request_id}/").status_code == 401


def test_the_log_is_newest_first_across_pages(api_for, alice):
    rows = [usage(user_id=alice.pk, started_at=at(minute)) for minute in range(25)]
    same_instant = [usage(user_id=alice.pk, started_at=at(30)) for _ in range(2)]
    expected = [row.event_id for row in reversed(same_instant)] + [row.event_id for row in reversed(rows)]

    first = api_for(alice).get(URL).json()
    second = api_for(alice).get(first["next"]).json()

    assert first["count"] == 27
    assert first["previous"] is None
    assert [row["event_id"] for row in first["results"] + second["results"]] == expected
    assert second["next"] is None
    assert api_for(alice).get(URL, {"page": 3}).status_code == 404


def test_each_filter_narrows_the_log(api_for, alice):
    key = ApiKeyFactory(owner=alice)
    other_key = ApiKeyFactory(owner=alice)
    plain = usage(user_id=alice.pk, key_id=key.pk, started_at=at(0))
    mini = usage(user_id=alice.pk, key_id=key.pk, model="gpt-4o-mini", started_at=at(10))
    limited = usage(user_id=alice.pk, key_id=other_key.pk, status=429, error_code="rate_limited", started_at=at(20))
    streamed = usage(user_id=alice.pk, key_id=other_key.pk, stream=True, started_at=at(30))
    client = api_for(alice)

    def shown(**query: Any) -> list[str]:
        return _ids(client.get(URL, query))

    assert shown(key=key.pk) == [mini.event_id, plain.event_id]
    assert shown(model="gpt-4o-mini") == [mini.event_id]
    assert shown(status=429) == [limited.event_id]
    assert shown(error_code="rate_limited") == [limited.event_id]
    assert shown(stream="true") == [streamed.event_id]
    assert shown(stream="false") == [limited.event_id, mini.event_id, plain.event_id]
    # start is included, end is not.
    assert shown(start=at(10).isoformat(), end=at(30).isoformat()) == [limited.event_id, mini.event_id]
    assert shown(start="2025-03-01T12:20:00Z") == [streamed.event_id, limited.event_id]
    assert shown(end="2025-03-01T14:15:00+02:00") == [mini.event_id, plain.event_id]  # 12:15 UTC
    assert shown(start="2025-03-01T12:30:00") == [streamed.event_id]  # no offset: UTC
    assert shown(key=other_key.pk, stream="false", status=429) == [limited.event_id]
    # An empty value is no filter.
    assert len(shown(model="", status="", stream="")) == 4


def test_staff_filter_by_user_and_route(api_for, log_reader, alice, bob):
    alices = usage(user_id=alice.pk, route="billing", started_at=at(1))
    bobs = usage(user_id=bob.pk, started_at=at(2))
    client = api_for(log_reader)

    assert _ids(client.get(URL, {"user": bob.pk})) == [bobs.event_id]
    assert _ids(client.get(URL, {"route": "billing"})) == [alices.event_id]
    assert _ids(client.get(URL, {"user": alice.pk, "route": "other"})) == []


def test_a_users_filter_by_user_or_route_only_narrows_their_own_rows(api_for, alice, bob):
    mine = usage(user_id=alice.pk, route="billing")
    usage(user_id=bob.pk, route="billing")
    client = api_for(alice)

    assert _ids(client.get(URL, {"user": alice.pk})) == [mine.event_id]
    assert _ids(client.get(URL, {"user": bob.pk})) == []
    assert _ids(client.get(URL, {"route": "billing"})) == [mine.event_id]


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"key": "abc"}, "key", "Enter a whole number."),
        ({"key": "1.5"}, "key", "Enter a whole number."),
        ({"status": "ok"}, "status", "Enter a whole number."),
        ({"status": "99"}, "status", "greater than or equal to 100"),
        ({"status": "600"}, "status", "less than or equal to 599"),
        ({"stream": "maybe"}, "stream", "Must be true or false."),
        ({"start": "yesterday"}, "start", "Enter a valid date/time."),
        ({"start": "2025-13-01T00:00:00Z"}, "start", "Enter a valid date/time."),
        ({"end": "2025-03-01T25:00"}, "end", "Enter a valid date/time."),
        ({"start": "2025-03-02T00:00:00Z", "end": "2025-03-01T00:00:00Z"}, "end", "Must be after start."),
        ({"start": "2025-03-01T00:00:00Z", "end": "2025-03-01T00:00:00Z"}, "end", "Must be after start."),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_parameter(api_for, alice, query, field, message):
    usage(user_id=alice.pk)

    answer = api_for(alice).get(URL, query)

    assert answer.status_code == 400, answer.content
    body = answer.json()
    assert body["code"] == "invalid"
    assert list(body["fields"]) == [field]
    assert any(message in text for text in body["fields"][field]), body


def test_a_parameter_given_twice_is_a_400(api_for, alice):
    answer = api_for(alice).get(f"{URL}?model=a&model=b")
    assert answer.status_code == 400
    assert answer.json()["fields"] == {"model": ["Give this parameter once."]}


def test_staff_get_a_400_for_a_bad_user_id_too(api_for, log_reader):
    answer = api_for(log_reader).get(URL, {"user": "bob"})
    assert answer.status_code == 400
    assert list(answer.json()["fields"]) == ["user"]


def test_the_detail_names_a_call_by_event_id_or_by_its_latest_request_id(api_for, alice):
    older = usage(user_id=alice.pk, request_id="reused-id", started_at=at(0), status=200)
    newer = usage(user_id=alice.pk, request_id="reused-id", started_at=at(5), status=502, error_code="upstream_error")
    client = api_for(alice)

    by_request_id = client.get(f"{URL}reused-id/")
    assert by_request_id.status_code == 200
    assert by_request_id.json()["event_id"] == newer.event_id
    assert client.get(f"{URL}{older.event_id}/").json()["status"] == 200
    assert client.get(f"{URL}{newer.event_id}/").json()["error_code"] == "upstream_error"


def test_a_request_id_with_dots_and_colons_is_found(api_for, alice):
    row = usage(user_id=alice.pk, request_id="trace:a1.b2-c3_d")
    assert api_for(alice).get(f"{URL}trace:a1.b2-c3_d/").json()["event_id"] == row.event_id


def test_a_users_reused_request_id_never_shows_another_users_call(api_for, alice, bob):
    mine = usage(user_id=alice.pk, request_id="shared", started_at=at(0))
    usage(user_id=bob.pk, request_id="shared", started_at=at(5))  # newer, but bob's

    assert api_for(alice).get(f"{URL}shared/").json()["event_id"] == mine.event_id


def test_an_unknown_call_is_a_404(api_for, alice):
    answer = api_for(alice).get(f"{URL}no-such-request/")
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found"


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_log_is_read_only(api_for, root, method):
    row = usage(user_id=root.pk)
    client = api_for(root)
    assert getattr(client, method)(URL, {}, format="json").status_code == 405
    assert getattr(client, method)(f"{URL}{row.request_id}/", {}, format="json").status_code == 405


# The JWT's user, the permission checks (user and group permissions) for staff, the count and the page.
@pytest.mark.parametrize(("who", "baseline"), [("alice", 3), ("log_reader", 5)])
def test_the_list_takes_the_same_queries_for_3_and_30_rows(api_for, alice, who, baseline, request):
    reader = request.getfixturevalue(who)
    key = ApiKeyFactory(owner=alice)
    client = api_for(reader)

    def queries() -> int:
        with CaptureQueriesContext(connection) as context:
            assert client.get(URL).status_code == 200
        return len(context.captured_queries)

    for _ in range(3):
        usage(user_id=alice.pk, key_id=key.pk)
    few = queries()
    for _ in range(27):
        usage(user_id=alice.pk, key_id=key.pk)
    assert queries() == few == baseline


def test_the_log_is_in_the_schema(api_for, alice):
    answer = api_for(alice).get("/api/schema/", {"format": "json"})
    paths = answer.json()["paths"]
    parameters = {p["name"] for p in paths["/api/usage/"]["get"]["parameters"]}
    assert {"key", "user", "model", "route", "status", "error_code", "stream", "start", "end", "page"} <= parameters
    assert "/api/usage/{request_id}/" in paths
