"""The whole account life cycle over HTTP: register, login, me, refresh, logout."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.live_server import LiveServer, live_gateway, live_server_factory

__all__ = ["live_gateway", "live_server_factory"]  # fixtures used here

pytestmark = pytest.mark.django_db

PASSWORD = "a-Long-and-unusual-passphrase-7"


def _bearer(access: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {access}"}


def test_register_login_me_refresh_logout_then_the_old_refresh_token_is_refused(api: APIClient) -> None:
    registered = api.post(
        "/auth/register",
        {"username": "dev", "email": "dev@example.com", "password": PASSWORD, "display_name": "Dev One"},
        format="json",
    )
    assert registered.status_code == 201, registered.content
    body = registered.json()
    assert body["username"] == "dev"
    assert body["email"] == "dev@example.com"
    assert body["display_name"] == "Dev One"
    assert "password" not in body
    assert PASSWORD not in registered.content.decode()

    logged_in = api.post("/auth/login", {"username": "dev", "password": PASSWORD}, format="json")
    assert logged_in.status_code == 200, logged_in.content
    tokens = logged_in.json()
    assert set(tokens) == {"access", "refresh"}

    me = api.get("/auth/me", **_bearer(tokens["access"]))
    assert me.status_code == 200
    assert me.json() == body

    refreshed = api.post("/auth/refresh", {"refresh": tokens["refresh"]}, format="json")
    assert refreshed.status_code == 200, refreshed.content
    new_tokens = refreshed.json()
    assert {"access", "refresh"} <= set(new_tokens)
    assert new_tokens["refresh"] != tokens["refresh"]
    assert api.get("/auth/me", **_bearer(new_tokens["access"])).status_code == 200

    # Rotation: the refresh token just exchanged is single use.
    reused = api.post("/auth/refresh", {"refresh": tokens["refresh"]}, format="json")
    assert reused.status_code == 401
    assert reused.json()["code"] == "token_not_valid"

    logged_out = api.post(
        "/auth/logout", {"refresh": new_tokens["refresh"]}, format="json", **_bearer(new_tokens["access"])
    )
    assert logged_out.status_code == 205
    assert logged_out.content == b""

    refused = api.post("/auth/refresh", {"refresh": new_tokens["refresh"]}, format="json")
    assert refused.status_code == 401
    assert refused.json() == {"detail": "Token is blacklisted", "code": "token_not_valid"}
    assert refused["WWW-Authenticate"] == 'Bearer realm="api"'


def test_a_user_registered_through_the_api_can_log_into_the_admin_only_when_staff(api: APIClient) -> None:
    api.post("/auth/register", {"username": "dev", "email": "dev@example.com", "password": PASSWORD}, format="json")
    assert api.login(username="dev", password=PASSWORD)
    # Ordinary users are not staff: the admin sends them to its login page.
    assert api.get("/admin/").status_code == 302


def _http(
    method: str, url: str, body: dict[str, str] | None = None, token: str = ""
) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 - http://127.0.0.1
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http://127.0.0.1
            status, headers, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw) if raw else None


def test_the_flow_works_against_the_running_asgi_application(live_gateway: LiveServer) -> None:
    credentials = {"username": "live", "password": PASSWORD}

    status, _, user = _http("POST", live_gateway.url("/auth/register"), {**credentials, "email": "live@example.com"})
    assert status == 201
    status, _, tokens = _http("POST", live_gateway.url("/auth/login"), credentials)
    assert status == 200
    status, headers, me = _http("GET", live_gateway.url("/auth/me"), token=tokens["access"])
    assert (status, me) == (200, user)
    assert headers["x-request-id"]
    status, _, _ = _http("POST", live_gateway.url("/auth/logout"), {"refresh": tokens["refresh"]}, tokens["access"])
    assert status == 205
    status, headers, error = _http("POST", live_gateway.url("/auth/refresh"), {"refresh": tokens["refresh"]})
    assert status == 401
    assert error["code"] == "token_not_valid"
    assert headers["content-type"] == "application/json"
