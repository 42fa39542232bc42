"""The admin's live traffic page (``/admin/live/``): every proxied call as it happens, from ``/ws/events/``.

The page is a table the browser fills from the staff live feed (``gateway_stats.live``) with
``gateway_stats/live.js``: newest on top, at most ``LIVE_ROWS`` rows. The socket authenticates with the admin
session, so the page carries no secret. Only staff who may view the request log open it.
"""

from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from apiforge.admin_site import admin_page
from gateway_stats.live import PERMISSION

LIVE_ROWS = 200
COLUMNS = ("Time", "Key prefix", "User", "Model or route", "Status", "Latency", "Tokens", "Cost")


def live_view(request: HttpRequest) -> HttpResponse:
    """The live traffic page (the admin's login and staff check run first)."""
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied
    context = {
        **admin.site.each_context(request),
        "title": "Live traffic",
        "columns": COLUMNS,
        "max_rows": LIVE_ROWS,
        "socket_path": "/ws/events/?topics=usage",
    }
    return TemplateResponse(request, "admin/gateway_stats/live.html", context)


admin_page("live/", live_view, "live", permission=PERMISSION)
