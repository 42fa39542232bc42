"""The admin dashboard's upstream part: the health and circuit-breaker state of every model deployment
(``dep:<id>``) and route target (``rt:<id>``), as this worker sees them (``proxy.edge.breaker``: the state
is shared by every worker when Redis is configured). Two queries, however many members there are.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.urls import reverse

from proxy.edge.breaker import breaker_view, deployment_key, health_view, route_target_key
from proxy.models import Deployment, RouteTarget


@dataclass(frozen=True, slots=True)
class MemberState:
    """One deployment or route target. ``health`` is the active checks' word (healthy, unhealthy, unknown),
    ``configured`` what the operator set (active, inactive; a target's stored healthy, unhealthy, drained);
    ``retry_in_s`` the seconds until an open breaker lets a probe through."""

    key: str
    kind: str
    owner: str
    target: str
    link: str
    configured: str
    health: str
    breaker: str
    retry_in_s: int | None

    @property
    def attention(self) -> bool:
        """Whether an operator should look: a breaker not closed, a failed check, or taken out of service."""
        return self.breaker != "closed" or self.health == "unhealthy" or self.configured in {"unhealthy", "drained"}


def _state(key: str, kind: str, owner: str, target: str, link: str, configured: str) -> MemberState:
    view = breaker_view(key)
    retry = max(0, math.ceil(view.open_until - time.time())) if view.open_until else None
    return MemberState(
        key=key,
        kind=kind,
        owner=owner,
        target=target,
        link=link,
        configured=configured,
        health=health_view(key),
        breaker=view.state,
        retry_in_s=retry,
    )


def member_states() -> list[MemberState]:
    """Every deployment and route target, those needing attention first, then by model or route name."""
    deployments = Deployment.objects.select_related("model", "upstream").order_by("model__name", "pk")
    targets = RouteTarget.objects.select_related("route").order_by("route__name", "pk")
    states = [
        _state(
            deployment_key(one.pk),
            "deployment",
            one.model.name,
            f"{one.upstream.name}:{one.upstream_model}",
            reverse("admin:proxy_model_change", args=[one.model_id]),
            "active" if one.is_active and one.upstream.is_active and one.model.is_active else "inactive",
        )
        for one in deployments
    ]
    states += [
        _state(
            route_target_key(one.pk),
            "route target",
            one.route.name,
            one.url,
            reverse("admin:proxy_route_change", args=[one.route_id]),
            one.health if one.route.is_active else "inactive",
        )
        for one in targets
    ]
    return sorted(states, key=lambda state: not state.attention)
