"""Every error is JSON in the project's shape: {"detail", "code"[, "fields"]}, never an HTML page."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.platform.error_urls")]


def _json(response: Any) -> Any:
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    return response.json()


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        (
            "drf-permission",
            403,
            {"detail": "You do not have permission to perform this action.", "code": "permission_denied"},
        ),
        (
            "django-permission",
            403,
            {"detail": "You do not have permission to perform this action.", "code": "permission_denied"},
        ),
        ("http404", 404, {"detail": "Not found.", "code": "not_found"}),
        ("drf-list-detail", 403, {"detail": "Not yours. Ask the owner.", "code": "permission_denied"}),
        ("domain", 409, {"detail": "That name is taken.", "code": "conflict"}),
        (
            "django-validation",
            400,
            {
                "detail": "Bad combination.",
                "code": "invalid",
                "fields": {"name": ["Bad name."], "non_field_errors": ["Bad combination."]},
            },
        ),
        (
            "django-validation-plain",
            400,
            {"detail": "Bad everything.", "code": "invalid", "fields": {"non_field_errors": ["Bad everything."]}},
        ),
        (
            "drf-validation-list",
            400,
            {
                "detail": "First problem.",
                "code": "invalid",
                "fields": {"non_field_errors": ["First problem.", "Second problem."]},
            },
        ),
    ],
)
def test_api_errors_have_the_project_shape(client: Client, kind: str, status: int, body: dict[str, Any]) -> None:
    response = client.get(f"/_test/fail/{kind}")

    assert response.status_code == status
    assert _json(response) == body


def test_a_domain_error_with_retry_after_sets_the_header(client: Client) -> None:
    response = client.get("/_test/fail/domain-retry")

    assert response.status_code == 429
    assert _json(response) == {"detail": "Later.", "code": "slow_down"}
    assert response["Retry-After"] == "7"


def test_a_domain_401_carries_a_bearer_challenge(client: Client) -> None:
    response = client.get("/_test/fail/domain-401")

    assert response.status_code == 401
    assert _json(response) == {"detail": "Say who you are.", "code": "who_are_you"}
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.expect_error_log
def test_a_crash_in_an_api_view_is_a_json_500_and_is_logged(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    response = client.get("/_test/fail/crash")

    assert response.status_code == 500
    assert _json(response) == {"detail": "Internal server error.", "code": "server_error"}
    assert "boom" not in response.content.decode()
    assert any(r.name == "apiforge.errors" and r.exc_info for r in caplog.records)


@pytest.mark.expect_error_log
def test_a_crash_in_a_plain_django_view_is_a_json_500(client: Client) -> None:
    client.raise_request_exception = False

    response = client.get("/_test/plain-crash")

    assert response.status_code == 500
    assert _json(response) == {"detail": "Internal server error.", "code": "server_error"}


def test_a_permission_error_in_a_plain_django_view_is_a_json_403(client: Client) -> None:
    response = client.get("/_test/plain-forbidden")

    assert response.status_code == 403
    assert _json(response) == {
        "detail": "You do not have permission to perform this action.",
        "code": "permission_denied",
    }


def test_an_unknown_url_is_a_json_404(client: Client) -> None:
    response = client.get("/no/such/page")

    assert response.status_code == 404
    assert _json(response) == {"detail": "Not found.", "code": "not_found"}


def test_a_wrong_method_is_a_json_405(client: Client) -> None:
    response = client.put("/auth/login", {}, content_type="application/json")

    assert response.status_code == 405
    assert _json(response) == {"detail": 'Method "PUT" not allowed.', "code": "method_not_allowed"}
    assert "POST" in response["Allow"]


def test_malformed_json_is_a_json_400(client: Client) -> None:
    response = client.post("/auth/login", '{"username": "a", ', content_type="application/json")

    assert response.status_code == 400
    body = _json(response)
    assert body["code"] == "parse_error"
    assert body["detail"].startswith("JSON parse error")


@pytest.mark.parametrize(
    ("content_type", "payload"),
    [("application/x-www-form-urlencoded", "username=a&password=b"), ("text/plain", "username=a")],
)
def test_a_body_that_is_not_json_is_a_json_415(client: Client, content_type: str, payload: str) -> None:
    response = client.post("/auth/login", payload, content_type=content_type)

    assert response.status_code == 415
    assert _json(response) == {
        "detail": f'Unsupported media type "{content_type}" in request.',
        "code": "unsupported_media_type",
    }


def test_an_unacceptable_accept_header_is_a_406(client: Client) -> None:
    response = client.get("/auth/me", HTTP_ACCEPT="application/xml")

    assert response.status_code == 406
    assert response.json()["code"] == "not_acceptable"


def test_unauthenticated_requests_to_jwt_endpoints_get_401_not_403(client: Client) -> None:
    response = client.get("/auth/me")

    assert response.status_code == 401
    assert _json(response)["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.expect_error_log  # django.security.DisallowedHost logs at ERROR
def test_a_disallowed_host_is_a_json_400(client: Client, settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["apiforge.example"]

    response = client.get("/health", HTTP_HOST="evil.example")

    assert response.status_code == 400
    assert _json(response) == {"detail": "Bad request.", "code": "bad_request"}


def test_a_csrf_failure_on_a_session_authenticated_request_is_json() -> None:
    client = Client(enforce_csrf_checks=True)

    response = client.post("/admin/login/", {"username": "x", "password": "y"})

    assert response.status_code == 403
    body = _json(response)
    assert body["code"] == "csrf_failed"
    assert body["detail"].startswith("CSRF verification failed")


def test_a_session_authenticated_api_write_without_csrf_token_is_a_json_403() -> None:
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(UserFactory())

    # DRF authenticates (and checks CSRF for sessions) before it looks at the method.
    response = api.post("/auth/me", {}, format="json")

    assert response.status_code == 403
    assert _json(response) == {
        "detail": "CSRF Failed: CSRF cookie not set.",
        "code": "permission_denied",
    }


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("path", ["/auth/login", "/auth/register", "/auth/refresh"])
def test_deeply_nested_json_is_a_400_parse_error_not_a_500(client: Client, path: str) -> None:
    response = client.post(path, DEEP, content_type="application/json")

    assert response.status_code == 400
    body = _json(response)
    assert body["code"] == "parse_error"
    assert "nesting" in body["detail"]


def test_deeply_nested_json_to_an_authenticated_endpoint_is_a_400() -> None:
    api = APIClient()
    api.force_authenticate(UserFactory())

    response = api.post("/api/keys/", DEEP, content_type="application/json")

    assert response.status_code == 400
    assert _json(response)["code"] == "parse_error"


def test_json_nested_past_the_limit_is_refused_even_when_python_could_parse_it(client: Client) -> None:
    body = '{"username": ' + "[" * 40 + "]" * 40 + ', "password": "x"}'

    response = client.post("/auth/login", body, content_type="application/json")

    assert response.status_code == 400
    assert _json(response)["code"] == "parse_error"


def test_a_body_over_the_upload_limit_is_a_json_413_on_the_api(client: Client) -> None:
    body = json.dumps({"username": "a" * (20 * 1024 * 1024), "password": "x"})

    response = client.post("/auth/login", body, content_type="application/json")

    assert response.status_code == 413
    assert _json(response) == {"detail": "The request body is too large.", "code": "request_too_large"}


@pytest.mark.expect_error_log  # django.security.RequestDataTooBig logs at ERROR
def test_a_body_over_the_upload_limit_is_a_json_413_outside_drf_too(client: Client) -> None:
    body = "username=" + "x" * (3 * 1024 * 1024)
    response = client.post("/admin/login/", body, content_type="application/x-www-form-urlencoded")

    assert response.status_code == 413
    assert _json(response)["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("metadata", "field", "message"),
    [
        ({"note": "a\u0000b"}, "metadata.note", "Null characters are not allowed."),
        ({"no\u0000te": "ab"}, "metadata", "Null characters are not allowed."),
        ({"note": ["ok", "\ud800"]}, "metadata.note.1", "Unpaired surrogate characters are not allowed."),
    ],
)
def test_nul_and_lone_surrogates_anywhere_in_a_json_body_are_field_errors(
    metadata: dict[str, Any], field: str, message: str
) -> None:
    api = APIClient()
    api.force_authenticate(UserFactory())

    response = api.post("/api/keys/", json.dumps({"name": "k", "metadata": metadata}), content_type="application/json")

    assert response.status_code == 400
    assert _json(response) == {"detail": "Invalid input.", "code": "invalid", "fields": {field: [message]}}


def test_a_lone_surrogate_in_a_deployment_upstream_names_the_nested_field() -> None:
    api = APIClient()
    api.force_authenticate(UserFactory(superuser=True))
    body = {"name": "m", "deployments": [{"upstream": "up\ud800", "upstream_model": "x"}]}

    response = api.post("/api/models/", json.dumps(body), content_type="application/json")

    assert response.status_code == 400
    assert _json(response)["fields"] == {"deployments.0.upstream": ["Unpaired surrogate characters are not allowed."]}


def test_nested_validation_errors_are_flattened_to_dotted_paths() -> None:
    api = APIClient()
    api.force_authenticate(UserFactory(superuser=True))
    body = {"name": "m", "deployments": [{"upstream": "nowhere", "upstream_model": "x"}]}

    response = api.post("/api/models/", body, format="json")

    assert response.status_code == 400
    fields = _json(response)["fields"]
    assert list(fields) == ["deployments.0.upstream"]
    assert all(isinstance(message, str) for message in fields["deployments.0.upstream"])


@pytest.mark.parametrize("query", ["is_active=maybe", "revoked=1"])
def test_a_boolean_filter_value_that_is_not_true_or_false_is_a_400_not_ignored(query: str) -> None:
    api = APIClient()
    api.force_authenticate(UserFactory())

    response = api.get(f"/api/keys/?{query}")

    assert response.status_code == 400
    name = query.split("=")[0]
    assert _json(response)["fields"] == {name: ["Must be true or false."]}


def test_an_empty_filter_value_is_no_filter() -> None:
    api = APIClient()
    api.force_authenticate(UserFactory())

    assert api.get("/api/keys/?is_active=&owner=&page=").status_code == 200


def test_an_owner_filter_takes_only_whole_numbers() -> None:
    api = APIClient()
    api.force_authenticate(UserFactory(superuser=True))

    assert api.get("/api/keys/?owner=1.5").status_code == 400
    assert api.get("/api/keys/?owner=1").status_code == 200


def test_a_query_parameter_given_twice_is_a_400() -> None:
    api = APIClient()
    api.force_authenticate(UserFactory())

    response = api.get("/api/keys/?search=a&search=b")

    assert response.status_code == 400
    assert _json(response)["fields"] == {"search": ["Give this parameter once."]}
