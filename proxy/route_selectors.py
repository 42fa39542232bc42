"""Reads of the route registry: which routes a caller of the management API or the admin sees.

- Staff holding ``proxy.view_route`` (or ``change_route``) see every route.
- A request authenticated with an API key sees the routes the key names in ``allowed_routes``, active or not
  (a service watching its own registration must see that its lease ran out). A key with an empty
  ``allowed_routes`` (which may *call* every route) sees none here: naming is what makes a route a key's own.
- Any other user sees the active routes one of their usable keys may call, through
  ``keys.selectors.key_route_scopes_for_user``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.db.models import Count, Prefetch, QuerySet

from apiforge.permissions import staff_has_model_perm
from keys import selectors as keys_selectors
from keys.policy import KeyPolicy
from proxy.models import Route, RouteTarget


def route_list() -> QuerySet[Route]:
    """Every route with its targets prefetched in id order (two queries): the staff view; the caller checks."""
    return Route.objects.prefetch_related(Prefetch("targets", queryset=RouteTarget.objects.order_by("pk")))


def route_list_sees_all(*, user: Any) -> bool:
    """Whether ``user`` sees every route with its internals: staff with ``proxy.view_route`` (or change_)."""
    return staff_has_model_perm(user, "view", Route)


def route_list_for_key(*, key: KeyPolicy) -> QuerySet[Route]:
    """The routes ``key`` names explicitly (empty ``allowed_routes``: none)."""
    if not key.allowed_routes:
        return Route.objects.none()
    return route_list().filter(name__in=sorted(key.allowed_routes))


def route_list_for_user(*, user: Any, key: KeyPolicy | None = None) -> QuerySet[Route]:
    """What ``user`` (authenticated with ``key`` when it is a key request) may read; see the module docstring."""
    if key is not None:
        return route_list_for_key(key=key)
    if route_list_sees_all(user=user):
        return route_list()
    if user is None or isinstance(user, AnonymousUser) or not user.is_authenticated or user.pk is None:
        return Route.objects.none()
    allows_all, names = keys_selectors.key_route_scopes_for_user(user_id=user.pk)
    visible = route_list().filter(is_active=True)
    if allows_all:
        return visible
    if not names:
        return Route.objects.none()
    return visible.filter(name__in=sorted(names))


def route_by_name(*, name: str, routes: QuerySet[Route] | None = None) -> Route | None:
    """The route called ``name`` among ``routes`` (all routes when not given), or None."""
    return (route_list() if routes is None else routes).filter(name=name).first()


def route_list_for_admin() -> QuerySet[Route]:
    """Routes with their target count, for the admin changelist."""
    return Route.objects.annotate(target_count=Count("targets", distinct=True))


def route_colliding(*, path: str, version: str, exclude_pk: int | None) -> Iterable[Route]:
    """The other routes with this path (trailing slash ignored) and version; their hosts decide a collision."""
    variants = {path, path.rstrip("/") or "/", (path.rstrip("/") or "") + "/"}
    routes = Route.objects.filter(version=version, path__in=sorted(variants)).only("pk", "name", "hosts")
    if exclude_pk is not None:
        routes = routes.exclude(pk=exclude_pk)
    return list(routes)
