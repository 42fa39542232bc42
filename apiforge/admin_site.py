"""The admin site: Unfold's theme, branded "APIForge", with a sidebar grouped by what staff do.

Apps add their own admin pages (dashboard parts, live traffic, playground, operator tools) with
``admin_page(route, view, name)`` from their ``admin`` module; the site serves each under ``/admin/<route>``,
behind the admin's login and staff check (``admin_view``), named ``admin:<name>``.

The sidebar (``sidebar_navigation``) lists, per group, the registered model admins the user may view and the
registered pages the user may open; what is not registered, or not permitted, is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.templatetags.static import static
from django.urls import URLPattern, path, reverse
from unfold.sites import UnfoldAdminSite

View = Callable[..., HttpResponse]


@dataclass(frozen=True)
class AdminPage:
    route: str
    view: View
    name: str
    # Who may open it (besides being active staff): a permission codename such as "keys.view_apikey", or None.
    permission: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


_PAGES: dict[str, AdminPage] = {}


def admin_page(route: str, view: View, name: str, *, permission: str | None = None) -> None:
    """Serve ``view`` at ``/admin/<route>`` as ``admin:<name>`` (login and staff required)."""
    _PAGES[name] = AdminPage(route=route, view=view, name=name, permission=permission)


def admin_page_allowed(request: HttpRequest, name: str) -> bool:
    page = _PAGES.get(name)
    user = getattr(request, "user", None)
    if page is None or user is None or not (user.is_active and user.is_staff):
        return False
    return page.permission is None or user.has_perm(page.permission)


class AdminSite(UnfoldAdminSite):
    site_header = "APIForge"
    site_title = "APIForge"
    index_title = "Dashboard"

    def extra_urls(self) -> list[URLPattern]:
        return [path(page.route, self.admin_view(page.view), name=page.name) for page in _PAGES.values()]


# The sidebar: (group, [(label, icon, "app_label.model" or "page:<name>"), ...]).
SIDEBAR: list[tuple[str, list[tuple[str, str, str]]]] = [
    (
        "Traffic",
        [
            ("Dashboard", "dashboard", "page:index"),
            ("Live traffic", "monitoring", "page:live"),
            ("Request log", "receipt_long", "gateway_stats.usagerecord"),
            ("Playground", "chat", "page:playground"),
            ("Rollups", "update", "page:rollups"),
        ],
    ),
    (
        "Keys and users",
        [
            ("API keys", "key", "keys.apikey"),
            ("Users", "person", "accounts.user"),
            ("Groups", "group", "auth.group"),
            ("Refresh tokens", "token", "token_blacklist.outstandingtoken"),
            ("Blacklisted tokens", "block", "token_blacklist.blacklistedtoken"),
        ],
    ),
    (
        "Upstreams and models",
        [
            ("Upstreams", "dns", "proxy.upstream"),
            ("Models", "neurology", "proxy.model"),
        ],
    ),
    ("Routes", [("Routes", "alt_route", "proxy.route")]),
    (
        "Audit",
        [
            ("Audit log", "policy", "gateway_stats.auditevent"),
        ],
    ),
]


def _item(request: HttpRequest, label: str, icon: str, target: str) -> dict[str, Any] | None:
    if target == "page:index":
        return {"title": label, "icon": icon, "link": reverse("admin:index")}
    if target.startswith("page:"):
        name = target.removeprefix("page:")
        if not admin_page_allowed(request, name):
            return None
        return {"title": label, "icon": icon, "link": reverse(f"admin:{name}")}
    app_label, _, model_name = target.partition(".")
    try:
        model = apps.get_model(app_label, model_name)
    except LookupError:
        return None
    model_admin = admin.site._registry.get(model)
    if model_admin is None or not model_admin.has_view_or_change_permission(request):
        return None
    return {"title": label, "icon": icon, "link": reverse(f"admin:{app_label}_{model_name}_changelist")}


def sidebar_navigation(request: HttpRequest) -> list[dict[str, Any]]:
    """Unfold's ``SIDEBAR["navigation"]``: the groups above, with what this user may open."""
    groups = []
    for title, entries in SIDEBAR:
        items = [item for entry in entries if (item := _item(request, *entry)) is not None]
        if items:
            groups.append({"title": title, "separator": True, "collapsible": False, "items": items})
    return groups


def chart_script(request: HttpRequest) -> str:
    """Unfold's ``SCRIPTS``: the charts' tick tidying (``gateway_stats/static/gateway_stats/charts.js``), every page."""
    return static("gateway_stats/charts.js")
