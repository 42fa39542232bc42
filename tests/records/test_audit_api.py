"""The audit trail over HTTP: staff only, filters and bad filters, newest first, read-only; published on commit."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import zmq
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from gateway_stats.events import bus
from gateway_stats.models import AuditEvent
from gateway_stats.services import audit_record
from tests.observability.conftest import free_port
from tests.records.conftest import at

pytestmark = pytest.mark.django_db

URL = "/api/audit/"
WAIT_S = 5.0


def _event(*, created_minutes: float = 0, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "actor": None,
        "action": "key.create",
        "object_type": "keys.apikey",
        "object_id": 1,
        "object_repr": "key 1",
        "changes": {"name": "key 1"},
        "ip_address": "192.0.2.1",
    }
    values.update(fields)
    event = audit_record(**values)
    AuditEvent.objects.filter(pk=event.pk).update(created_at=at(created_minutes))
    return event


def _ids(answer: Any) -> list[int]:
    assert answer.status_code == 200, answer.content
    return [row["id"] for row in answer.json()["results"]]


@pytest.mark.parametrize(("who", "status"), [(None, 401), ("alice", 403), ("plain_staff", 403)])
def test_only_staff_holding_view_auditevent_read_the_trail(api_for, who, status, request):
    event = _event()
    client = api_for(request.getfixturevalue(who) if who else None)

    assert client.get(URL).status_code == status
    assert client.get(f"{URL}{event.pk}/").status_code == status


@pytest.mark.parametrize("who", ["log_reader", "root"])
def test_staff_read_an_event_with_its_actor_and_address(api_for, who, alice, request):
    event = _event(actor=alice, action="key.update", changes={"name": ["a", "b"]}, ip_address="2001:db8::1")
    client = api_for(request.getfixturevalue(who))

    body = client.get(URL).json()
    detail = client.get(f"{URL}{event.pk}/").json()

    assert set(body) == {"count", "next", "previous", "results"}
    assert body["results"] == [detail]
    assert detail == {
        "id": event.pk,
        "created_at": "2025-03-01T12:00:00Z",
        "actor": alice.pk,
        "actor_username": "alice",
        "action": "key.update",
        "object_type": "keys.apikey",
        "object_id": "1",
        "object_repr": "key 1",
        "changes": {"name": ["a", "b"]},
        "ip_address": "2001:db8::1",
    }


def test_an_event_without_actor_says_null(api_for, root):
    event = _event(actor=None)
    detail = api_for(root).get(f"{URL}{event.pk}/").json()
    assert (detail["actor"], detail["actor_username"]) == (None, None)


def test_unknown_events_are_404(api_for, root):
    assert api_for(root).get(f"{URL}999999/").status_code == 404
    assert api_for(root).get(f"{URL}abc/").status_code == 404


def test_the_trail_is_newest_first_and_filtered(api_for, root, alice, bob):
    first = _event(actor=alice, action="key.create", object_id=1, created_minutes=0)
    second = _event(actor=bob, action="upstream.update", object_type="proxy.upstream", object_id=7, created_minutes=5)
    third = _event(actor=alice, action="key.revoke", object_id=1, created_minutes=10)
    client = api_for(root)

    def shown(**query: Any) -> list[int]:
        return _ids(client.get(URL, query))

    assert shown() == [third.pk, second.pk, first.pk]
    assert shown(actor=alice.pk) == [third.pk, first.pk]
    assert shown(action="upstream.update") == [second.pk]
    assert shown(object_type="keys.apikey", object_id="1") == [third.pk, first.pk]
    assert shown(object_id="7") == [second.pk]
    assert shown(start=at(5).isoformat()) == [third.pk, second.pk]
    assert shown(end=at(5).isoformat()) == [first.pk]
    assert shown(start=at(1).isoformat(), end=at(6).isoformat()) == [second.pk]
    assert shown(action="") == [third.pk, second.pk, first.pk]


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ({"actor": "alice"}, "actor", "Enter a whole number."),
        ({"start": "last week"}, "start", "Enter a valid date/time."),
        ({"start": "2025-03-02T00:00:00Z", "end": "2025-03-01T00:00:00Z"}, "end", "Must be after start."),
    ],
)
def test_a_bad_filter_is_a_400_naming_the_parameter(api_for, root, query, field, message):
    answer = api_for(root).get(URL, query)

    assert answer.status_code == 400, answer.content
    assert answer.json()["fields"] == {field: [message]}


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_trail_is_read_only(api_for, root, method):
    event = _event()
    client = api_for(root)
    assert getattr(client, method)(URL, {}, format="json").status_code == 405
    assert getattr(client, method)(f"{URL}{event.pk}/", {}, format="json").status_code == 405
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_the_list_takes_the_same_queries_for_3_and_30_events(api_for, root, alice, bob):
    client = api_for(root)

    def queries() -> int:
        with CaptureQueriesContext(connection) as context:
            assert client.get(URL).status_code == 200
        return len(context.captured_queries)

    for number in range(3):
        _event(actor=alice if number % 2 else bob)
    few = queries()
    for number in range(27):
        _event(actor=alice if number % 2 else bob)
    # The JWT's user, the count and the page (actors joined); a superuser needs no permission query.
    assert queries() == few == 3


# --- the event bus ---------------------------------------------------------------------------------


@pytest.fixture
def subscriber(settings: Any) -> Any:
    bus.stop()
    settings.EVENTS_ZMQ_PUB = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(settings.EVENTS_ZMQ_PUB)
    yield sock
    sock.close()
    context.term()
    bus.stop()


def _subscribed(sock: Any) -> None:
    """Wait until the publisher knows the subscription (ZeroMQ drops what is published before it)."""
    from gateway_stats.events import event_publish

    sock.setsockopt(zmq.SUBSCRIBE, b"audit")
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        event_publish("audit", {"probe": True})
        if sock.poll(100):
            while sock.poll(50):
                sock.recv_multipart()
            return
    raise AssertionError("the subscription did not reach the publisher in time")


def _received(sock: Any, wait: float) -> list[dict[str, Any]]:
    events = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if sock.poll(100):
            topic, data = sock.recv_multipart()
            assert topic == b"audit"
            events.append(json.loads(data))
    return events


def test_an_audit_event_is_published_on_the_audit_topic_once_committed(
    subscriber, alice, django_capture_on_commit_callbacks
):
    _subscribed(subscriber)

    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            kept = audit_record(actor=alice, action="key.create", object_type="keys.apikey", object_id=5)
        with transaction.atomic():
            audit_record(actor=alice, action="key.delete", object_type="keys.apikey", object_id=5)
            transaction.set_rollback(True)

    (published,) = _received(subscriber, wait=1.0)
    assert published["id"] == kept.pk
    assert (published["action"], published["actor"], published["actor_username"]) == ("key.create", alice.pk, "alice")
    assert (published["object_type"], published["object_id"]) == ("keys.apikey", "5")
    assert not AuditEvent.objects.filter(action="key.delete").exists()
