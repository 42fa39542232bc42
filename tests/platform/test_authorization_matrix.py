"""Who may call which management endpoint: every endpoint under /auth/ and /api/ x every kind of caller.

The endpoints are read from the URL conf (``django.urls.get_resolver()``), with the methods their views
offer, so a new endpoint (or a new method on one) fails ``test_the_matrix_lists_every_management_endpoint``
until its row is added to ``MATRIX``. Each cell then calls the endpoint over HTTP with a JWT for the role,
on real objects, and checks the status.

Roles:
- ``anonymous``: no credentials.
- ``user``: an ordinary user acting on their own objects (``/api/keys/{pk}/`` is their key).
- ``other_user``: an ordinary user acting on someone else's object (the same key, owned by ``user``).
- ``staff``: ``is_staff`` without any model permission, acting on ``user``'s key: treated as an ordinary user.
- ``staff_with_perms``: staff holding the keys and proxy model permissions (view/add/change/delete), not superuser.
- ``superuser``: holds every permission without being given any.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import User
from gateway_stats.models import UsageRecord
from gateway_stats.services import audit_record
from keys.models import ApiKey
from proxy.models import Model, Route, RouteTarget, Upstream
from tests.factories import DEFAULT_PASSWORD, ApiKeyFactory, UserFactory
from tests.proxy.factories import DeploymentFactory, UpstreamFactory

pytestmark = pytest.mark.django_db

ROLES = ("anonymous", "user", "other_user", "staff", "staff_with_perms", "superuser")

# URL-conf prefixes that are not the management API, and are covered by their own tests.
_NOT_MANAGEMENT = ("admin/", "api/schema/", "docs", "redoc", "health", "v1/")


def _row(anonymous: int, user: int, other_user: int, staff: int, staff_with_perms: int, superuser: int) -> dict:
    return dict(zip(ROLES, (anonymous, user, other_user, staff, staff_with_perms, superuser), strict=True))


_PUBLIC = _row(200, 200, 200, 200, 200, 200)  # no authentication at all: credentials are ignored
_ANY_USER = _row(401, 200, 200, 200, 200, 200)
_STAFF_ONLY_READ = _row(401, 403, 403, 403, 200, 200)
_OWN_OR_PERMITTED = _row(401, 200, 404, 404, 200, 200)  # someone else's key is not found without view_apikey

MATRIX: dict[tuple[str, str], dict[str, int]] = {
    # --- auth -------------------------------------------------------------------------------------
    ("/auth/register", "POST"): _row(201, 201, 201, 201, 201, 201),
    ("/auth/register", "OPTIONS"): _PUBLIC,
    ("/auth/login", "POST"): _PUBLIC,
    ("/auth/login", "OPTIONS"): _PUBLIC,
    ("/auth/refresh", "POST"): _PUBLIC,
    ("/auth/refresh", "OPTIONS"): _PUBLIC,
    ("/auth/logout", "POST"): _row(401, 205, 205, 205, 205, 205),
    ("/auth/logout", "OPTIONS"): _ANY_USER,
    ("/auth/me", "GET"): _ANY_USER,
    ("/auth/me", "HEAD"): _ANY_USER,
    ("/auth/me", "OPTIONS"): _ANY_USER,
    # --- keys: everyone manages their own; others' need keys.view_/change_/delete_apikey -----------
    ("/api/keys/", "GET"): _ANY_USER,  # what each role sees: _KEYS_SEEN
    ("/api/keys/", "HEAD"): _ANY_USER,
    ("/api/keys/", "OPTIONS"): _ANY_USER,
    ("/api/keys/", "POST"): _row(401, 201, 201, 201, 201, 201),  # always a key of one's own
    ("/api/keys/{pk}/", "GET"): _OWN_OR_PERMITTED,
    ("/api/keys/{pk}/", "HEAD"): _OWN_OR_PERMITTED,
    ("/api/keys/{pk}/", "OPTIONS"): _ANY_USER,  # describes the endpoint, does not read the key
    ("/api/keys/{pk}/", "PATCH"): _OWN_OR_PERMITTED,
    ("/api/keys/{pk}/", "DELETE"): _row(401, 204, 404, 404, 204, 204),
    ("/api/keys/{pk}/rotate/", "POST"): _OWN_OR_PERMITTED,  # the new secret goes to whoever may rotate
    ("/api/keys/{pk}/rotate/", "OPTIONS"): _ANY_USER,
    # --- upstreams: staff with proxy.*_upstream only -------------------------------------------
    ("/api/upstreams/", "GET"): _STAFF_ONLY_READ,
    ("/api/upstreams/", "HEAD"): _STAFF_ONLY_READ,
    ("/api/upstreams/", "OPTIONS"): _STAFF_ONLY_READ,
    ("/api/upstreams/", "POST"): _row(401, 403, 403, 403, 201, 201),
    ("/api/upstreams/{pk}/", "GET"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}/", "HEAD"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}/", "OPTIONS"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}/", "PATCH"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}/", "DELETE"): _row(401, 403, 403, 403, 204, 204),
    # DefaultRouter's format suffixes: the same views, so the same answers.
    ("/api/upstreams.{format}", "GET"): _STAFF_ONLY_READ,
    ("/api/upstreams.{format}", "HEAD"): _STAFF_ONLY_READ,
    ("/api/upstreams.{format}", "OPTIONS"): _STAFF_ONLY_READ,
    ("/api/upstreams.{format}", "POST"): _row(401, 403, 403, 403, 201, 201),
    ("/api/upstreams/{pk}.{format}", "GET"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}.{format}", "HEAD"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}.{format}", "OPTIONS"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}.{format}", "PATCH"): _STAFF_ONLY_READ,
    ("/api/upstreams/{pk}.{format}", "DELETE"): _row(401, 403, 403, 403, 204, 204),
    # --- models: users read what their keys may call; writes need proxy.add_/change_/delete_model ---
    ("/api/models/", "GET"): _ANY_USER,  # deployments shown only to staff_with_perms and superuser
    ("/api/models/", "HEAD"): _ANY_USER,
    ("/api/models/", "OPTIONS"): _ANY_USER,
    ("/api/models/", "POST"): _row(401, 403, 403, 403, 201, 201),
    ("/api/models/{pk}/", "GET"): _ANY_USER,  # every role holds a key that may call every model
    ("/api/models/{pk}/", "HEAD"): _ANY_USER,
    ("/api/models/{pk}/", "OPTIONS"): _ANY_USER,
    ("/api/models/{pk}/", "PATCH"): _STAFF_ONLY_READ,
    ("/api/models/{pk}/", "DELETE"): _row(401, 403, 403, 403, 204, 204),
    ("/api/models.{format}", "GET"): _ANY_USER,
    ("/api/models.{format}", "HEAD"): _ANY_USER,
    ("/api/models.{format}", "OPTIONS"): _ANY_USER,
    ("/api/models.{format}", "POST"): _row(401, 403, 403, 403, 201, 201),
    ("/api/models/{pk}.{format}", "GET"): _ANY_USER,
    ("/api/models/{pk}.{format}", "HEAD"): _ANY_USER,
    ("/api/models/{pk}.{format}", "OPTIONS"): _ANY_USER,
    ("/api/models/{pk}.{format}", "PATCH"): _STAFF_ONLY_READ,
    ("/api/models/{pk}.{format}", "DELETE"): _row(401, 403, 403, 403, 204, 204),
    # --- request log: everyone reads their own calls; every call needs gateway_stats.view_usagerecord ---
    ("/api/usage/", "GET"): _ANY_USER,  # what each role sees: _USAGE_SEEN
    ("/api/usage/", "HEAD"): _ANY_USER,
    ("/api/usage/", "OPTIONS"): _ANY_USER,
    ("/api/usage/{request_id}/", "GET"): _row(401, 200, 404, 404, 404, 200),  # a call made with user's key
    ("/api/usage/{request_id}/", "HEAD"): _row(401, 200, 404, 404, 404, 200),
    ("/api/usage/{request_id}/", "OPTIONS"): _ANY_USER,  # describes the endpoint, does not read the call
    # --- statistics: everyone reads the stats of their own keys; everyone's needs view_usagerecord ---------
    ("/api/stats/usage", "GET"): _ANY_USER,
    ("/api/stats/usage", "HEAD"): _ANY_USER,
    ("/api/stats/usage", "OPTIONS"): _ANY_USER,
    ("/api/stats/summary", "GET"): _ANY_USER,
    ("/api/stats/summary", "HEAD"): _ANY_USER,
    ("/api/stats/summary", "OPTIONS"): _ANY_USER,
    ("/api/stats/errors", "GET"): _ANY_USER,
    ("/api/stats/errors", "HEAD"): _ANY_USER,
    ("/api/stats/errors", "OPTIONS"): _ANY_USER,
    # --- audit trail: staff holding gateway_stats.view_auditevent only --------------------------------
    ("/api/audit/", "GET"): _row(401, 403, 403, 403, 403, 200),
    ("/api/audit/", "HEAD"): _row(401, 403, 403, 403, 403, 200),
    ("/api/audit/", "OPTIONS"): _row(401, 403, 403, 403, 403, 200),
    ("/api/audit/{pk}/", "GET"): _row(401, 403, 403, 403, 403, 200),
    ("/api/audit/{pk}/", "HEAD"): _row(401, 403, 403, 403, 403, 200),
    ("/api/audit/{pk}/", "OPTIONS"): _row(401, 403, 403, 403, 403, 200),
}

# --- routes: everyone reads (the queryset decides what); writes need proxy.add_/change_/delete_route (or an API key
# naming the route: tests/routes). Each path also answers with (or without) its trailing slash: the same rows.
# An ordinary user reads the active routes their keys may call (keys.selectors.key_route_scopes_for_user).
_ROUTE_READ = _ANY_USER
_ROUTE_ROWS: dict[tuple[str, str], dict[str, int]] = {
    ("/api/routes", "GET"): _ANY_USER,  # internals (targets, headers) shown only to _SEES_DEPLOYMENTS
    ("/api/routes", "HEAD"): _ANY_USER,
    ("/api/routes", "OPTIONS"): _ANY_USER,
    ("/api/register", "POST"): _row(401, 403, 403, 403, 201, 201),
    ("/api/register", "OPTIONS"): _ANY_USER,
    ("/api/unregister", "DELETE"): _row(401, 403, 403, 403, 204, 204),
    ("/api/unregister", "OPTIONS"): _ANY_USER,
    ("/api/routes/{pk}/", "GET"): _ROUTE_READ,
    ("/api/routes/{pk}/", "HEAD"): _ROUTE_READ,
    ("/api/routes/{pk}/", "OPTIONS"): _ANY_USER,
    ("/api/routes/{pk}/", "PATCH"): _STAFF_ONLY_READ,
    ("/api/routes/{pk}/", "DELETE"): _row(401, 403, 403, 403, 204, 204),
    ("/api/routes/{pk}/heartbeat", "POST"): _STAFF_ONLY_READ,
    ("/api/routes/{pk}/heartbeat", "OPTIONS"): _ANY_USER,
}


def _slash_twin(path: str) -> str:
    return path.removesuffix("/") if path.endswith("/") else path + "/"


MATRIX.update(_ROUTE_ROWS)
MATRIX.update({(_slash_twin(path), method): row for (path, method), row in _ROUTE_ROWS.items()})

EXPECTED_CELLS = (79 + 2 * len(_ROUTE_ROWS)) * len(ROLES)

# Whose keys each role finds in GET /api/keys/: its own, or everyone's.
_KEYS_SEEN = {"user": "own", "other_user": "own", "staff": "own", "staff_with_perms": "all", "superuser": "all"}
# Who is answered the staff shape of a model (with deployments).
_SEES_DEPLOYMENTS = {"staff_with_perms", "superuser"}
# How many request-log rows each role finds in GET /api/usage/ (the world has one, a call with user's key).
_USAGE_SEEN = {"user": 1, "other_user": 0, "staff": 0, "staff_with_perms": 0, "superuser": 1}


# --- the URL conf ---------------------------------------------------------------------------------------


def _pattern_text(pattern: str) -> str:
    """``api/^keys/(?P<pk>[^/.]+)/$`` -> ``api/keys/{pk}/``; ``auth/<int:pk>`` -> ``auth/{pk}``."""
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    text = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", text)
    text = text.replace("^", "").replace("$", "").replace("\\.", ".")
    return text.removesuffix("/?")


def _view_methods(callback: Any) -> set[str]:
    view_class = callback.cls
    actions = getattr(callback, "actions", None)
    handlers = (
        set(actions) if actions is not None else {m for m in view_class.http_method_names if hasattr(view_class, m)}
    )
    if "get" in handlers:
        handlers.add("head")  # Django and DRF answer HEAD with the GET handler
    handlers.add("options")
    return {method.upper() for method in handlers if method in view_class.http_method_names}


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry.callback


def _management_endpoints() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for raw, callback in _walk(get_resolver().url_patterns):
        if not raw.startswith(("auth/", "api/")) or raw.startswith(_NOT_MANAGEMENT):
            continue
        path = "/" + _pattern_text(raw)
        assert hasattr(callback, "cls"), f"{path}: not a DRF view; the matrix cannot tell its methods"
        found.update((path, method) for method in _view_methods(callback))
    return found


def test_the_matrix_lists_every_management_endpoint() -> None:
    endpoints = _management_endpoints()
    missing = sorted(endpoints - set(MATRIX))
    stale = sorted(set(MATRIX) - endpoints)
    assert not missing, f"endpoints without a row in MATRIX (add their expected statuses): {missing}"
    assert not stale, f"rows in MATRIX for endpoints that no longer exist: {stale}"
    assert all(set(row) == set(ROLES) for row in MATRIX.values())
    cells = sum(len(row) for row in MATRIX.values())
    print(f"authorization matrix: {len(MATRIX)} endpoint-methods x {len(ROLES)} roles = {cells} cells")  # noqa: T201
    assert cells == EXPECTED_CELLS


# --- the world each cell runs in ------------------------------------------------------------------


@dataclass
class World:
    users: dict[str, User]
    key: ApiKey  # owned by "user"
    upstream: Upstream  # used by no deployment, so it can be deleted
    serving_upstream: Upstream
    model: Model
    route: Route  # leased (ttl_s), so a heartbeat succeeds
    usage_request_id: str  # a call made with user's key
    audit_event_id: int


@pytest.fixture
def world(settings: Any) -> World:
    # Factories and /auth/login hash passwords; the default PBKDF2 cost would dominate the run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    users = {
        "user": UserFactory(username="alice"),
        "other_user": UserFactory(username="bob"),
        "staff": UserFactory(username="staff-plain", staff=True),
        "staff_with_perms": UserFactory(username="staff-perms", staff=True),
        "superuser": UserFactory(username="root", superuser=True),
    }
    users["staff_with_perms"].user_permissions.set(
        Permission.objects.filter(
            content_type__app_label__in=["keys", "proxy"],
            codename__regex=r"^(view|add|change|delete)_(apikey|upstream|model|deployment|route|routetarget)$",
        )
    )
    keys = {role: ApiKeyFactory(owner=user, name=f"{role}'s key") for role, user in users.items()}
    serving = UpstreamFactory(name="serving-up")
    deployment = DeploymentFactory(model__name="matrix-model", upstream=serving)
    call = UsageRecord.objects.create(
        event_id="matrix-call",
        request_id="matrix-request",
        started_at=timezone.now(),
        key_id=keys["user"].pk,
        user_id=users["user"].pk,
        endpoint="/v1/chat/completions",
        status=200,
    )
    event = audit_record(actor=users["superuser"], action="key.create", object_type="keys.apikey", object_id=1)
    route = Route.objects.create(name="matrix-route", path="/matrix", ttl_s=30, lease_expires_at=timezone.now())
    RouteTarget.objects.create(route=route, url="http://matrix-target.internal:8080")
    return World(
        users=users,
        key=keys["user"],
        upstream=UpstreamFactory(name="idle-up"),
        serving_upstream=serving,
        model=deployment.model,
        route=route,
        usage_request_id=call.request_id,
        audit_event_id=event.pk,
    )


def _target(path: str, world: World) -> str:
    if path.startswith("/api/keys/{pk}"):
        pk = world.key.pk
    elif path.startswith("/api/upstreams/{pk}"):
        pk = world.upstream.pk
    elif path.startswith("/api/models/{pk}"):
        pk = world.model.pk
    elif path.startswith("/api/routes/{pk}"):
        pk = world.route.pk
    elif path.startswith("/api/audit/{pk}"):
        pk = world.audit_event_id
    elif path.startswith("/api/usage/{request_id}"):
        return path.replace("{request_id}", world.usage_request_id)
    else:
        assert "{pk}" not in path, f"{path}: say which object the matrix calls it on"
        pk = 0
    return path.replace("{pk}", str(pk)).replace("{format}", "json")


def _body(path: str, method: str, world: World, refresh: str | None) -> dict[str, Any] | None:
    """A valid body, so an allowed call succeeds and the status says only who may."""
    bodies: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
        ("/auth/register", "POST"): lambda: {
            "username": "newcomer",
            "email": "newcomer@example.com",
            "password": DEFAULT_PASSWORD,
        },
        ("/auth/login", "POST"): lambda: {"username": "alice", "password": DEFAULT_PASSWORD},
        ("/auth/refresh", "POST"): lambda: {"refresh": str(RefreshToken.for_user(world.users["user"]))},
        ("/auth/logout", "POST"): lambda: {"refresh": refresh or "none"},
        ("/api/keys/", "POST"): lambda: {"name": "matrix key"},
        ("/api/keys/{pk}/", "PATCH"): lambda: {"name": "renamed"},
        ("/api/keys/{pk}/rotate/", "POST"): lambda: {"grace_seconds": 0},
        ("/api/upstreams/", "POST"): lambda: {"name": "new-up", "kind": "mock"},
        ("/api/upstreams/{pk}/", "PATCH"): lambda: {"timeout_s": 5},
        ("/api/models/", "POST"): lambda: {
            "name": "new-model",
            "deployments": [{"upstream": world.serving_upstream.name, "upstream_model": "x"}],
        },
        ("/api/models/{pk}/", "PATCH"): lambda: {"output_price_per_1k": "0.02"},
        ("/api/register", "POST"): lambda: {
            "name": "matrix-new",
            "path": "/matrix-new",
            "targets": [{"url": "http://matrix-new.internal:8080"}],
        },
        ("/api/routes/{pk}/", "PATCH"): lambda: {"timeout_s": 5},
        ("/api/routes/{pk}/heartbeat", "POST"): dict,
        ("/api/unregister", "DELETE"): lambda: {"name": world.route.name},
    }
    for (known, verb), maker in list(bodies.items()):
        if known.startswith(("/api/routes", "/api/register", "/api/unregister")):
            bodies[(_slash_twin(known), verb)] = maker
    unsuffixed = path.replace(".{format}", "/").replace("//", "/")
    make = bodies.get((unsuffixed, method))
    if make is None:
        assert method not in ("POST", "PATCH", "PUT"), f"{method} {path}: give the matrix a valid body"
        return None
    return make()


def _check_what_is_shown(path: str, method: str, role: str, world: World, answer: Any) -> str | None:
    """Beyond the status: whose keys a list shows, and who is answered model deployments."""
    if method != "GET" or answer.status_code != 200:
        return None
    if path == "/api/keys/":
        owners = {row["owner"] for row in answer.json()["results"]}
        expected = {u.pk for u in world.users.values()} if _KEYS_SEEN[role] == "all" else {world.users[role].pk}
        if owners != expected:
            return f"sees keys of owners {sorted(owners)}, expected {sorted(expected)}"
    if path == "/api/usage/" and answer.json()["count"] != _USAGE_SEEN[role]:
        return f"sees {answer.json()['count']} request-log rows, expected {_USAGE_SEEN[role]}"
    if path.startswith("/api/routes"):
        body = answer.json()
        rows = body["results"] if "results" in body else [body]
        if not rows:
            return "sees no route"
        shown = {"targets" in row for row in rows}
        if rows and shown != {role in _SEES_DEPLOYMENTS}:
            return f"route internals shown: {shown} (rows: {len(rows)})"
    if path.startswith("/api/models"):
        body = answer.json()
        rows = body["results"] if "results" in body else [body]
        shown = any("deployments" in row for row in rows)
        if not rows or shown != (role in _SEES_DEPLOYMENTS):
            return f"deployments shown: {shown} (rows: {len(rows)})"
    return None


def _call(path: str, method: str, role: str, world: World) -> str | None:
    client = APIClient()
    refresh = None
    if role != "anonymous":
        token = RefreshToken.for_user(world.users[role])
        refresh = str(token)
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token.access_token}")
    body = _body(path, method, world, refresh)
    url = _target(path, world)
    if body is None:
        answer = client.generic(method, url)
    else:
        answer = client.generic(method, url, json.dumps(body), content_type="application/json")
    expected = MATRIX[(path, method)][role]
    if answer.status_code != expected:
        return f"{role}: {answer.status_code}, expected {expected}: {answer.content[:200]!r}"
    problem = _check_what_is_shown(path, method, role, world, answer)
    return f"{role}: {problem}" if problem else None


@pytest.mark.parametrize(("path", "method"), sorted(MATRIX), ids=[f"{m} {p}" for p, m in sorted(MATRIX)])
def test_each_role_gets_the_expected_answer(path: str, method: str, world: World) -> None:
    problems = []
    for role in ROLES:
        # Each role starts from the same world: what one call changes (a revoked key, a deleted model) is undone.
        with transaction.atomic():
            problem = _call(path, method, role, world)
            transaction.set_rollback(True)
        if problem:
            problems.append(problem)
    assert not problems, f"{method} {path}:\n" + "\n".join(problems)
