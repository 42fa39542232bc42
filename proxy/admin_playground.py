"""The admin's Playground (``/admin/playground/``): try a key and a model with a chat message, through the
real proxy, and see the streamed answer, its tokens and its cost.

Keys are stored as digests, so nobody can send a key's secret from here. When the user sends, the page's
script (``proxy/playground.js``) first asks ``/admin/playground/token/`` (POST, the admin session and its
CSRF token) for a playground token bound to the chosen key (``keys.playground``, valid a few minutes,
audited as ``key.playground``), then calls ``/v1/chat/completions`` with it like any client: the key's limits,
budgets and model scopes apply and the ledger records the call under the key. The proxy's answer carries no
cost, so after the stream the script asks ``/admin/playground/usage/?request_id=...`` for the call's ledger
row (it trails the answer by a moment, so a few bounded tries) and shows the cost recorded there.

Any active staff member may open the page; which keys they may pick follows ``keys.selectors.key_list``
(every usable key for staff holding ``keys.view_apikey``, otherwise their own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.views.decorators.http import require_GET, require_POST

from apiforge.admin_site import admin_page
from apiforge.audit import audit_context
from apiforge.errors import json_error
from keys.playground import playground_token_max_age
from proxy.playground_selectors import playground_key, playground_keys, playground_usage
from proxy.playground_services import playground_token_issue

if TYPE_CHECKING:
    from accounts.models import User

CHAT_PATH = "/v1/chat/completions"
# How the script waits for the ledger row: tries and the pause between them (a bounded few seconds in all).
USAGE_TRIES = 10
USAGE_INTERVAL_MS = 500


def _user(request: HttpRequest) -> User:
    return cast("User", request.user)  # the admin's login and staff check ran first


def playground_view(request: HttpRequest) -> HttpResponse:
    """The page: the key and model pickers, the message box, and where the answer, usage and errors go."""
    keys = playground_keys(actor=_user(request))
    context = {
        **admin.site.each_context(request),
        "title": "Playground",
        "keys": keys,
        "key_models": {str(key.key_id): list(key.models) for key in keys},
        "chat_path": CHAT_PATH,
        "usage_tries": USAGE_TRIES,
        "usage_interval_ms": USAGE_INTERVAL_MS,
        "token_minutes": max(1, playground_token_max_age() // 60),
    }
    return TemplateResponse(request, "admin/proxy/playground.html", context)


@require_POST
def playground_token_view(request: HttpRequest) -> JsonResponse:
    """A playground token for the key ``key`` (a form field) if the user may use it: ``{"token", "expires_in"}``."""
    raw = request.POST.get("key", "")
    key = playground_key(actor=_user(request), key_id=int(raw)) if raw.isdigit() and len(raw) < 19 else None
    if key is None:
        return json_error(
            404, "No such key, or you may not use it (it may have been revoked, disabled or expired).", "key_not_found"
        )
    token = playground_token_issue(key=key, **audit_context(request).service_kwargs())
    return JsonResponse({"token": token, "expires_in": playground_token_max_age()})


@require_GET
def playground_usage_view(request: HttpRequest) -> JsonResponse:
    """The ledger row of a call the user may see (``request_id``), or 404 while there is none (yet)."""
    request_id = request.GET.get("request_id", "")
    usage = playground_usage(actor=_user(request), request_id=request_id) if request_id else None
    if usage is None:
        return json_error(404, "The ledger has no such call (yet).", "usage_not_found")
    return JsonResponse(usage.as_json())


admin_page("playground/", playground_view, "playground")
admin_page("playground/token/", playground_token_view, "playground_token")
admin_page("playground/usage/", playground_usage_view, "playground_usage")
