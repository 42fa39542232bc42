"""Property-based tests of the management API against its own OpenAPI document (schemathesis).

Every operation of ``/api/schema/`` is called with generated valid and invalid
inputs, in process through the WSGI application, as an ordinary user and as a
superuser (JWT Bearer), with every schemathesis check on: no 5xx, only documented
statuses, content types, headers and bodies, valid data accepted, invalid data refused.

``make test`` runs a few examples per operation (deterministic: the same cases every
run); ``make fuzz`` runs ``FUZZ_EXAMPLES`` (default 200) per operation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given, settings
from rest_framework_simplejwt.tokens import RefreshToken
from schemathesis import GenerationMode
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.factories import ApiKeyFactory, UserFactory
from tests.proxy.factories import DeploymentFactory, ModelFactory, UpstreamFactory

# The proxy's and the gateway's paths (apiforge/schema_proxy.py) are documented too but served by the ASGI edge.
PROXY_PATHS = ("/v1/", "/gw/")
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5"))
# No shrinking: a failure is reported as found, and a run's length stays bounded.
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same cases on every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


# Strings are UTF-8 text without NUL: the API refuses NUL and lone surrogates (PostgreSQL cannot store them;
# apiforge/parsers.py, tested in test_errors.py), so schema-valid data does not hold them.
CONFIG = schemathesis.Config.from_str(
    """
[generation]
allow-x00 = false
codec = "utf-8"
"""
)


@pytest.fixture
def api_schema(db: None, settings: Any) -> Iterator[Any]:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # logins by the hundred
    # As Django's test client does: the requests run inside the test's transaction, which closing the
    # connection at the end of each request (CONN_MAX_AGE=0) would break.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application(), config=CONFIG)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def _bearer(user: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {RefreshToken.for_user(user).access_token}"}


def _seed(*, staff: bool) -> dict[str, str]:
    """A Bearer token for an ordinary user or a superuser, with a few objects for the generated ids to hit."""
    user = UserFactory(superuser=staff)
    ApiKeyFactory(owner=user)
    DeploymentFactory(model=ModelFactory(), upstream=UpstreamFactory())
    return _bearer(user)


# Rules a JSON Schema cannot state, documented in the operations' descriptions: schema-valid input they
# refuse is a 400 naming only these fields (by their top-level name), not a failure of positive_data_acceptance.
_ROUTE_RULES = frozenset(
    {
        "path",
        "version",
        "hosts",
        "targets",
        "request_headers",
        "response_headers",
        "path_rewrite",
        "fallback",
        "health_check",
    }
)
SEMANTIC_RULES: dict[tuple[str, str], frozenset[str]] = {
    # Django's password validators (length, similarity to the username, common, numeric); taken names.
    ("POST", "/auth/register"): frozenset({"password", "username", "email"}),
    # A refresh token must be a real one, of the caller.
    ("POST", "/auth/logout"): frozenset({"refresh"}),
    # allowed_models must exist; ip_allowlist entries must be addresses or networks; expires_at in the future.
    ("POST", "/api/keys/"): frozenset({"allowed_models", "allowed_routes", "ip_allowlist", "expires_at"}),
    ("PATCH", "/api/keys/{id}/"): frozenset({"allowed_models", "allowed_routes", "ip_allowlist", "expires_at"}),
    # A revoked key cannot be rotated.
    ("POST", "/api/keys/{id}/rotate/"): frozenset({"non_field_errors"}),
    # An openai upstream needs a base_url; names are unique; some extra headers are the proxy's own.
    ("POST", "/api/upstreams/"): frozenset({"base_url", "name", "extra_headers"}),
    ("PATCH", "/api/upstreams/{id}/"): frozenset({"base_url", "name", "extra_headers"}),
    # Deployments name existing upstreams, fallbacks existing models; names are unique.
    ("POST", "/api/models/"): frozenset({"deployments", "fallbacks", "name"}),
    ("PATCH", "/api/models/{id}/"): frozenset({"deployments", "fallbacks", "name"}),
    # Routes: paths and versions have a grammar, platform prefixes and another route's path + version + host are
    # taken, target URLs must be http(s) without user info, query or fragment (and not repeat), weights may not
    # all be 0, host names are host names, and the JSON options have rules of their own (see the operations'
    # descriptions and proxy/route_services.py). Names are unique (a PATCH renaming onto another route).
    ("POST", "/api/register"): _ROUTE_RULES,
    ("PATCH", "/api/routes/{id}/"): _ROUTE_RULES | {"name"},
    # The name comes in the body or as ?name= (one of them is needed).
    ("DELETE", "/api/unregister"): frozenset({"name"}),
    # A route without ttl_s has no lease to renew.
    ("POST", "/api/routes/{id}/heartbeat"): frozenset({"ttl_s"}),
    # A time range's end comes after its start; both between 1970 and 3000; ids fit in 64 bits.
    ("GET", "/api/usage/"): frozenset({"start", "end", "key", "user"}),
    ("GET", "/api/audit/"): frozenset({"start", "end", "actor"}),
    # The statistics' ranges: end after start, limited per interval (see each operation's description).
    ("GET", "/api/stats/usage"): frozenset({"start", "end", "interval"}),
    ("GET", "/api/stats/summary"): frozenset({"start", "end"}),
    ("GET", "/api/stats/errors"): frozenset({"start", "end"}),
}


def positive_data_accepted_unless_a_documented_rule_refuses_it(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's ``positive_data_acceptance``, except for a 400 on the fields of ``SEMANTIC_RULES``."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        allowed = SEMANTIC_RULES.get((case.method.upper(), case.path), frozenset())
        if response.status_code == 400 and allowed:
            fields = response.json().get("fields") or {"": []}
            if {path.split(".")[0] for path in fields} <= allowed:
                return None
        raise


def _unique_secrets(case: Any, serial: int) -> None:
    """Make generated passwords and upstream credentials unique to the case.

    Generation reuses strings found in the application ("server_error", a field name), which answers
    legitimately contain; as secrets, tests/secret_leaks.py would report them as leaked.
    """
    body = case.body
    if not isinstance(body, dict):
        return
    for name in ("password", "api_key"):
        if isinstance(body.get(name), str) and body[name]:
            body[name] = f"{body[name]}~fuzz{serial}"
    headers = body.get("extra_headers")
    if isinstance(headers, dict):
        for header, value in headers.items():
            if isinstance(value, str) and value and value != "***":
                headers[header] = f"{value}~fuzz{serial}"


def _fuzz(api_schema: Any, headers: dict[str, str]) -> list[str]:
    """Every operation, valid then invalid inputs, every check; the failures found, one line each."""
    failures: list[str] = []
    serial = [0]
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith(PROXY_PATHS):
            continue  # answered by the edge, not the WSGI app under test (tests/proxy, tests/gateway)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @HYPOTHESIS
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                serial[0] += 1
                _unique_secrets(case, serial[0])
                case.call_and_validate(
                    headers=headers,
                    excluded_checks=[positive_data_acceptance],
                    additional_checks=[positive_data_accepted_unless_a_documented_rule_refuses_it],
                )

            try:
                run()
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{operation.label} ({mode}): {exc}")
    return failures


def test_the_api_answers_an_ordinary_user_as_its_schema_says(api_schema: Any) -> None:
    failures = _fuzz(api_schema, _seed(staff=False))

    assert not failures, "\n\n".join(failures)


def test_the_api_answers_staff_as_its_schema_says(api_schema: Any) -> None:
    failures = _fuzz(api_schema, _seed(staff=True))

    assert not failures, "\n\n".join(failures)
