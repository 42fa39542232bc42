"""The admin's rollup re-run page (``/admin/rollups/``): recompute the rollups of a range from the raw ledger rows.

For when ledger rows were fixed by hand, or a rollup run is suspected of having missed rows: the form takes a
start and an end (UTC, ``datetime-local``), refuses a range the raw rows no longer cover (older than
``USAGE_RAW_RETENTION_DAYS``: those buckets are frozen, ``gateway_stats.rollups``), and then
``rollup_rerun`` runs ``usage_rollup_range`` in the request when Celery runs tasks in-process
(``CELERY_TASK_ALWAYS_EAGER``, the embedded default) and shows how many buckets it rebuilt, or enqueues the
``gateway_stats.rollup`` task with the range (a broker is configured: a re-run may take minutes, and the task
retries while the beat's run holds the lock). Either way the re-run is audited (``rollup.rerun``). Only staff
who may change rollups (``gateway_stats.change_usagerollup``) open the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from unfold.widgets import DATETIME_CLASSES

from apiforge.admin_site import admin_page
from apiforge.audit import audit_context
from gateway_stats.rollups import DAY, RollupResult, bucket_floor, rollup_task, usage_rollup_range, usage_watermark
from gateway_stats.services import audit_record

PERMISSION = "gateway_stats.change_usagerollup"
AUDIT_OBJECT_TYPE = "gateway_stats.usagerollup"
_INPUT_FORMATS = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"]


def _moment_field(label: str) -> forms.DateTimeField:
    return forms.DateTimeField(
        label=label,
        input_formats=_INPUT_FORMATS,
        widget=forms.DateTimeInput(
            attrs={"type": "datetime-local", "step": 60, "class": " ".join(DATETIME_CLASSES)},
            format="%Y-%m-%dT%H:%M",
        ),
        help_text=f"{settings.TIME_ZONE}, to the minute.",
        error_messages={"required": f"Give the {label.lower()} of the range.", "invalid": "Not a date and time."},
    )


def raw_horizon(now: datetime) -> datetime:
    """The oldest instant whose raw rows are kept (``gateway_stats.rollups``: older buckets are frozen)."""
    return bucket_floor(now - timedelta(days=settings.USAGE_RAW_RETENTION_DAYS), DAY)


class RollupRerunForm(forms.Form):
    start = _moment_field("Start")
    end = _moment_field("End")

    def __init__(self, *args: Any, now: datetime | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.now = now or timezone.now()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        start, end = cleaned.get("start"), cleaned.get("end")
        if start is None or end is None:
            return cleaned
        days: int = settings.USAGE_RAW_RETENTION_DAYS
        horizon = raw_horizon(self.now)
        if end <= start:
            self.add_error("end", "The end must be after the start.")
        elif end - start > timedelta(days=days):
            self.add_error(None, f"At most {days} days at a time (the raw rows' retention, USAGE_RAW_RETENTION_DAYS).")
        if start < horizon:
            self.add_error(
                "start",
                f"Before {horizon:%Y-%m-%d %H:%M} the raw rows are no longer kept ({days} days): those rollups "
                "cannot be rebuilt.",
            )
        if start > self.now:
            self.add_error("start", "The start is in the future: there is nothing to roll up yet.")
        return cleaned


@dataclass(frozen=True, slots=True)
class RollupRerun:
    """What a re-run did: ran here (``result``) or was queued for a worker (``result`` None)."""

    start: datetime
    end: datetime
    queued: bool
    result: RollupResult | None = None


def rollup_rerun(
    *, start: datetime, end: datetime, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> RollupRerun:
    """Re-run the rollups of ``[start, end)``: here when Celery runs tasks in-process, else through the queue
    (once the surrounding transaction commits); audited as ``rollup.rerun``."""
    if settings.CELERY_TASK_ALWAYS_EAGER:
        result = usage_rollup_range(start=start, end=end)
        rerun = RollupRerun(start=start, end=end, queued=False, result=result)
        outcome: dict[str, Any] = {
            "ran": result.ran,
            "reason": result.reason,
            "minutes": result.minutes,
            "hours": result.hours,
            "days": result.days,
        }
    else:
        arguments = {"start": start.isoformat(), "end": end.isoformat()}
        transaction.on_commit(lambda: rollup_task.apply_async(kwargs=arguments))
        rerun = RollupRerun(start=start, end=end, queued=True)
        outcome = {"queued": True}
    audit_record(
        actor=actor,
        action="rollup.rerun",
        object_type=AUDIT_OBJECT_TYPE,
        object_id=f"{start:%Y-%m-%dT%H:%M}..{end:%Y-%m-%dT%H:%M}",
        object_repr=f"rollups {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M}",
        changes={"start": start, "end": end, **outcome},
        ip_address=ip_address,
    )
    return rerun


def _report(request: HttpRequest, rerun: RollupRerun) -> None:
    span = f"{rerun.start:%Y-%m-%d %H:%M} to {rerun.end:%Y-%m-%d %H:%M}"
    result = rerun.result
    if result is None:
        messages.success(request, f"Re-run of {span} queued: a worker rebuilds the rollups shortly.")
    elif result.ran:
        messages.success(
            request,
            f"Rebuilt the rollups of {span}: {result.minutes} minute, {result.hours} hour and {result.days} day "
            "bucket(s) recomputed from the raw rows.",
        )
    elif result.reason == "locked":
        messages.error(request, "Another rollup run holds the lock right now: nothing was rebuilt. Try again shortly.")
    else:
        messages.warning(request, f"Nothing rebuilt: {result.reason} (the first regular run makes the rollups).")


def rollups_view(request: HttpRequest) -> HttpResponse:
    """The re-run form (GET), the re-run (POST: then back to the page, with the outcome as a message)."""
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    now = timezone.now()
    if request.method == "POST":
        form = RollupRerunForm(request.POST, now=now)
        if form.is_valid():
            rerun = rollup_rerun(
                start=form.cleaned_data["start"],
                end=form.cleaned_data["end"],
                **audit_context(request).service_kwargs(),
            )
            _report(request, rerun)
            return HttpResponseRedirect(reverse("admin:rollups"))
    else:
        end = now.replace(second=0, microsecond=0)
        form = RollupRerunForm(initial={"start": end - timedelta(hours=1), "end": end}, now=now)
    context = {
        **admin.site.each_context(request),
        "title": "Rollups",
        "form": form,
        "watermark": usage_watermark(),
        "horizon": raw_horizon(now),
        "retention_days": settings.USAGE_RAW_RETENTION_DAYS,
        "queued": not settings.CELERY_TASK_ALWAYS_EAGER,
    }
    return TemplateResponse(request, "admin/gateway_stats/rollups.html", context)


admin_page("rollups/", rollups_view, "rollups", permission=PERMISSION)
