"""The rollup re-run page: rebuilds a range's rollups from the raw rows (in the request with in-process Celery,
queued for a worker with a broker), audited; refuses bad ranges with form errors; only staff who may change
rollups get in, and the sidebar lists it for them."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from accounts.models import User
from gateway_stats.ledger import ledger_write, usage_row
from gateway_stats.models import AuditEvent, UsageRecord, UsageRollup
from gateway_stats.rollups import usage_rollup
from gateway_stats.usage import UsageEvent
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PAGE = "/admin/rollups/"
FORMAT = "%Y-%m-%dT%H:%M"


@pytest.fixture(autouse=True)
def _in_process_celery(settings: Any) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = True  # the embedded default; the queued case says otherwise


def _calls(count: int, at: datetime) -> None:
    ledger_write(
        [
            usage_row(
                UsageEvent(
                    request_id=f"req-{uuid.uuid4().hex[:12]}",
                    endpoint="/v1/chat/completions",
                    status=200,
                    model="gpt-4o",
                    latency_ms=30.0,
                    started_at=at.timestamp(),
                    event_id=uuid.uuid4().hex,
                )
            )
            for _ in range(count)
        ]
    )


def _form(start: datetime, end: datetime) -> dict[str, str]:
    return {"start": start.strftime(FORMAT), "end": end.strftime(FORMAT)}


def _minute() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)


def _minute_rollups() -> list[tuple[int, int]]:
    return list(UsageRollup.objects.filter(granularity="minute").values_list("requests", "errors_5xx"))


def test_a_rerun_rebuilds_the_rollups_of_the_range_from_the_fixed_raw_rows_and_is_audited(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    minute = _minute()
    _calls(4, minute + timedelta(seconds=10))
    usage_rollup()  # the beat's run: the rollups exist, with four good calls
    assert _minute_rollups() == [(4, 0)]
    UsageRecord.objects.update(status=502)  # a ledger fix by hand
    client = admin_for(root)

    answer = client.post(PAGE, _form(minute - timedelta(minutes=30), minute + timedelta(minutes=30)))

    assert answer.status_code == 302
    assert _minute_rollups() == [(4, 4)]
    assert UsageRollup.objects.get(granularity="hour").errors_5xx == 4
    assert UsageRollup.objects.get(granularity="day").errors_5xx == 4
    page = client.get(PAGE).content.decode()
    assert "Rebuilt the rollups of" in page
    assert re.search(r"60 minute, [12] hour and [12] day bucket\(s\) recomputed", page)
    (event,) = AuditEvent.objects.filter(action="rollup.rerun")
    assert event.actor == root
    assert event.changes["ran"] is True
    assert event.changes["start"].startswith((minute - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M"))


def test_a_rerun_recreates_rollups_that_were_lost(root: User, admin_for: Callable[[User], Client]) -> None:
    minute = _minute()
    _calls(3, minute + timedelta(seconds=5))
    usage_rollup()
    UsageRollup.objects.all().delete()

    admin_for(root).post(PAGE, _form(minute, minute + timedelta(minutes=1)))

    assert _minute_rollups() == [(3, 0)]


def test_before_the_first_rollup_run_a_rerun_says_there_is_nothing_to_correct(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    minute = _minute()
    _calls(2, minute)
    client = admin_for(root)

    client.post(PAGE, _form(minute, minute + timedelta(minutes=5)))

    assert "Nothing rebuilt: no rollup has run yet" in client.get(PAGE).content.decode()
    assert not UsageRollup.objects.exists()


def test_with_a_broker_the_rerun_is_queued_for_a_worker(
    root: User, admin_for: Callable[[User], Client], settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = False
    minute = _minute()
    client = admin_for(root)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        client.post(PAGE, _form(minute, minute + timedelta(minutes=5)))

    # The task is sent once the request's writes commit (the audit event's publication is the other callback).
    assert [c.__qualname__.split(".")[0] for c in callbacks] == ["rollup_rerun", "audit_record"]
    assert "queued: a worker rebuilds the rollups shortly" in client.get(PAGE).content.decode()
    (event,) = AuditEvent.objects.filter(action="rollup.rerun")
    assert event.changes["queued"] is True


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (timedelta(hours=1), timedelta(hours=2), "The end must be after the start."),
        (timedelta(hours=1), timedelta(hours=1), "The end must be after the start."),
        # Longer than the retention, though starting after its horizon (the end may be ahead of now).
        (timedelta(days=2) - timedelta(minutes=30), -timedelta(hours=1), "At most 2 days at a time"),
        (timedelta(days=4), timedelta(days=3), "the raw rows are no longer kept (2 days)"),
        (-timedelta(hours=1), -timedelta(hours=2), "The start is in the future"),
    ],
)
def test_bad_ranges_are_form_errors_and_rebuild_nothing(
    root: User,
    admin_for: Callable[[User], Client],
    settings: Any,
    start: timedelta,
    end: timedelta,
    message: str,
) -> None:
    settings.USAGE_RAW_RETENTION_DAYS = 2
    now = datetime.now(UTC)
    answer = admin_for(root).post(PAGE, _form(now - start, now - end))

    assert answer.status_code == 200
    assert message in answer.content.decode()
    assert not AuditEvent.objects.filter(action="rollup.rerun").exists()


def test_missing_and_malformed_moments_are_form_errors(root: User, admin_for: Callable[[User], Client]) -> None:
    answer = admin_for(root).post(PAGE, {"start": "", "end": "yesterday"})

    page = answer.content.decode()
    assert answer.status_code == 200
    assert "Give the start of the range." in page
    assert "Not a date and time." in page
    assert not AuditEvent.objects.filter(action="rollup.rerun").exists()


def test_the_page_renders_the_form_and_the_watermark_and_the_sidebar_lists_it(
    root: User, admin_for: Callable[[User], Client]
) -> None:
    _calls(1, _minute())
    usage_rollup()
    page = admin_for(root).get(PAGE)

    html = page.content.decode()
    assert page.status_code == 200
    assert 'type="datetime-local"' in html
    assert "The re-run runs now, in this request." in html
    assert 'href="/admin/rollups/"' in html  # the sidebar's "Rollups"


def test_only_staff_who_may_change_rollups_get_in(admin_for: Callable[[User], Client]) -> None:
    minute = _minute()
    viewer = UserFactory(staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_usagerollup"))
    client = admin_for(viewer)
    assert client.get(PAGE).status_code == 403
    assert client.post(PAGE, _form(minute, minute + timedelta(minutes=5))).status_code == 403
    assert 'href="/admin/rollups/"' not in client.get("/admin/").content.decode()

    allowed = UserFactory(staff=True)
    allowed.user_permissions.set(Permission.objects.filter(codename="change_usagerollup"))
    assert admin_for(allowed).get(PAGE).status_code == 200

    outsider = admin_for(UserFactory())
    answer = outsider.post(PAGE, _form(minute, minute + timedelta(minutes=5)))
    assert answer.status_code == 302
    assert "/admin/login/" in answer.url
    assert not AuditEvent.objects.filter(action="rollup.rerun").exists()
