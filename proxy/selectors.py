"""Reads of the proxy app: upstream and model lists for the management API and admin.

``model_names_unknown`` is also what the keys services check key scopes with (registered in
``ProxyConfig.ready()`` through ``keys.scopes``).
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db.models import Count, Prefetch, QuerySet

from apiforge.permissions import staff_has_model_perm
from keys import selectors as keys_selectors
from proxy.models import Deployment, Model, Route, RouteTarget, Upstream


def model_names_unknown(names: Iterable[str]) -> list[str]:
    """The names in ``names`` that are not a configured public model, in the given order."""
    wanted = list(dict.fromkeys(names))
    known = set(Model.objects.filter(name__in=wanted).values_list("name", flat=True))
    return [name for name in wanted if name not in known]


def model_names() -> list[str]:
    """Every public model name, sorted."""
    return list(Model.objects.order_by("name").values_list("name", flat=True))


def route_names() -> list[str]:
    """Every route name, sorted."""
    return list(Route.objects.order_by("name").values_list("name", flat=True))


def catalog_rows() -> tuple[QuerySet[Deployment], QuerySet[Model]]:
    """What the routing catalog is built from (``proxy.catalog.catalog_load``): the active deployments
    of active upstreams, their upstreams joined, and the active models. Two queries."""
    deployments = Deployment.objects.filter(is_active=True, upstream__is_active=True).select_related("upstream")
    return deployments, Model.objects.filter(is_active=True)


def upstream_list() -> QuerySet[Upstream]:
    """Every upstream (staff only: the caller checks)."""
    return Upstream.objects.all()


def model_list() -> QuerySet[Model]:
    """Every model with its deployments (and their upstreams) prefetched: the staff view; the caller checks."""
    deployments = Deployment.objects.select_related("upstream").order_by("pk")
    return Model.objects.prefetch_related(Prefetch("deployments", queryset=deployments))


def model_list_for_user(*, user: AbstractBaseUser | AnonymousUser | None) -> QuerySet[Model]:
    """The models ``user`` may see: all of them (with deployments) for staff holding ``proxy.view_model``
    (see ``model_list_sees_all``); otherwise the active models that one of the user's active keys may call.
    A user without keys sees none."""
    if model_list_sees_all(user=user):
        return model_list()
    if user is None or not user.is_authenticated or user.pk is None:
        return Model.objects.none()
    allows_all, names = keys_selectors.key_model_scopes_for_user(user_id=user.pk)
    visible = Model.objects.filter(is_active=True)
    if allows_all:
        return visible
    if not names:
        return Model.objects.none()
    return visible.filter(name__in=sorted(names))


def model_list_sees_all(*, user: AbstractBaseUser | AnonymousUser | None) -> bool:
    """Whether ``user`` sees every model with its deployments: staff with ``proxy.view_model`` (or change_)."""
    return staff_has_model_perm(user, "view", Model)


def model_list_for_admin() -> QuerySet[Model]:
    """Models with their deployment count, for the admin changelist."""
    return Model.objects.annotate(deployment_count=Count("deployments", distinct=True))


def gateway_rows() -> QuerySet[Route]:
    """What the gateway's route catalog is built from (``proxy.gateway_catalog``): the active routes with
    their targets prefetched. Two queries."""
    return Route.objects.filter(is_active=True).prefetch_related(
        Prefetch("targets", queryset=RouteTarget.objects.order_by("pk"))
    )


def jwt_user_row(user_id: int) -> tuple[str, bool] | None:
    """A user's name and whether they are active (gateway routes with ``auth: jwt``); None: no such user."""
    row = get_user_model().objects.filter(pk=user_id).values_list("username", "is_active").first()
    return None if row is None else (str(row[0]), bool(row[1]))
