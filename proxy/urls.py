"""Management API routes of the proxy app, mounted under ``/api/``.

Upstreams and models through the router. The route registry keeps the seed's paths (``/api/routes``,
``/api/register``, ``/api/unregister``, ``/api/routes/{id}/heartbeat``) and ``/api/routes/{id}/``; each also
answers with (or without) the trailing slash. The OpenAPI document lists each path once, in the form above
(the other form is left out of the schema with ``schema=None``).
"""

from collections.abc import Callable, Mapping
from typing import Any

from django.urls import URLPattern, path
from rest_framework.routers import DefaultRouter

from proxy.apis import PublicModelViewSet, UpstreamViewSet
from proxy.route_apis import RouteViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("upstreams", UpstreamViewSet, basename="upstream")
router.register("models", PublicModelViewSet, basename="model")


def _both(documented: str, actions: Mapping[str, str], name: str) -> list[URLPattern]:
    """``documented`` (in the schema) and the same path with its trailing slash added or removed (not in it)."""
    view: Callable[..., Any] = RouteViewSet.as_view(dict(actions))
    other = documented.removesuffix("/") if documented.endswith("/") else documented + "/"
    return [
        path(documented, view, name=name),
        path(other, RouteViewSet.as_view(dict(actions), schema=None)),
    ]


urlpatterns = [
    *router.urls,
    *_both("routes", {"get": "list"}, "route-list"),
    *_both("register", {"post": "register"}, "route-register"),
    *_both("unregister", {"delete": "unregister"}, "route-unregister"),
    *_both("routes/<int:pk>/", {"get": "retrieve", "patch": "partial_update", "delete": "destroy"}, "route-detail"),
    *_both("routes/<int:pk>/heartbeat", {"post": "heartbeat"}, "route-heartbeat"),
]
