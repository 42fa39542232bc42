"""The admin index (Unfold's ``DASHBOARD_CALLBACK``): the usage of the chosen period (``?period=hour|day|30d``)
from ``gateway_stats.dashboard``, the ingestion state, and every upstream member's health and breaker from
``proxy.dashboard``; drawn by ``apiforge/templates/admin/index.html``.

The usage is what ``/api/stats/*`` would answer this viewer: staff holding ``gateway_stats.view_usagerecord``
see every call, other staff the calls of their own keys. It lives here, not in either app, because it joins
both (``gateway_stats`` may not import ``proxy``: the import contracts' layers).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils import timezone

from apiforge.permissions import staff_has_model_perm
from gateway_stats.dashboard import PERIODS, dashboard_usage, ingestion_state, period_get
from gateway_stats.models import UsageRecord
from gateway_stats.stats import UsageFilter
from proxy.dashboard import member_states


def dashboard_callback(request: HttpRequest, context: dict[str, Any]) -> dict[str, Any]:
    """Add the dashboard's numbers to the admin index's ``context``."""
    period = period_get(request.GET.get("period"))
    sees_all = staff_has_model_perm(request.user, "view", UsageRecord)
    flt = UsageFilter(scope_user_id=None if sees_all else request.user.pk)
    members = member_states()
    context.update(
        periods=list(PERIODS.values()),
        usage=dashboard_usage(period=period, now=timezone.now(), flt=flt),
        usage_scoped=not sees_all,
        ingestion=ingestion_state(),
        members=members,
        members_attention=sum(member.attention for member in members),
    )
    return context
