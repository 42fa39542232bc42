"""drf-spectacular postprocessing hook: the error answers every operation can give, and strict request bodies.

Views document their specific answers with ``extend_schema``; what follows from the
project's wiring is added here to every operation that does not already say it, so
the document says what the API really does:

- 400 on operations with a body (bad JSON, field errors) or query parameters (bad filter values);
- 413 (body over ``DATA_UPLOAD_MAX_MEMORY_SIZE``) and 415 (not JSON) on operations with a body;
- 401 (with its ``WWW-Authenticate`` challenge) where a view needs an authenticated user;
- 403 where a permission beyond "authenticated" applies, or a session may fail its CSRF check;
- 404 on routes with path parameters (an object that does not exist or is not yours) and on
  paginated lists (a page past the end);
- 429 (with ``Retry-After``) where DRF throttles apply.

Request bodies of serializers that refuse unknown fields (``refuses_unknown_fields = True``,
e.g. ``apiforge.serializers.StrictFieldsMixin``) get ``additionalProperties: false``. Decimal fields with
``min_value >= 0`` (sent as strings, whose minimum JSON Schema cannot state) get a pattern without
the minus sign, and lists that may not be empty (``allow_empty=False``) ``minItems: 1``.

Query parameters get ``allowEmptyValue: true``: DRF's pagination, search and ordering and
django-filter read ``?page=`` or ``?kind=`` as the parameter's absence.
"""

from __future__ import annotations

from typing import Any

from rest_framework import permissions, serializers
from rest_framework.authentication import SessionAuthentication

ERROR_COMPONENT = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}
# The shape of apiforge.errors.ErrorResponseSerializer, for a document built without any view referencing it.
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "fields": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
    },
    "required": ["detail", "code"],
}
_METHODS = {"get", "put", "post", "patch", "delete", "head", "options", "trace"}
_DESCRIPTIONS = {
    "400": "Malformed JSON, JSON nested too deeply, or invalid fields or query parameters; `fields` says which.",
    "401": "No, bad or expired credentials.",
    "403": "Not allowed: a missing permission, or a session request without a valid CSRF token.",
    "404": "No such object (or not yours), or a page past the end.",
    "413": "The request body is too large.",
    "415": "The body is not JSON.",
    "429": "Throttled; see `Retry-After`.",
}
_HEADERS = {
    "401": {
        "WWW-Authenticate": {"schema": {"type": "string"}, "description": "The authentication challenge."},
    },
    "429": {
        "Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait before trying again."},
    },
}
_PLAIN_PERMISSIONS = (permissions.AllowAny, permissions.IsAuthenticated)


def _error_response(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": dict(_ERROR_REF)}},
    }
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


def _statuses(path: str, method: str, operation: dict[str, Any], view: Any) -> list[str]:
    parameters = operation.get("parameters", [])
    query = [p for p in parameters if p.get("in") == "query"]
    statuses: list[str] = []
    if "requestBody" in operation:
        statuses += ["400", "413", "415"]
    elif query:
        statuses.append("400")
    if view is not None:
        perms = view.get_permissions()
        if not all(isinstance(perm, permissions.AllowAny) for perm in perms):
            statuses.append("401")
            # Only unsafe methods check a session's CSRF token.
            csrf = method.upper() not in permissions.SAFE_METHODS and any(
                isinstance(auth, SessionAuthentication) for auth in view.get_authenticators()
            )
            if csrf or not all(isinstance(perm, _PLAIN_PERMISSIONS) for perm in perms):
                statuses.append("403")
        if view.get_throttles():
            statuses.append("429")
    if "{" in path or any(p.get("name") == "page" for p in query):
        statuses.append("404")
    return statuses


def _views(generator: Any) -> dict[tuple[str, str], Any]:
    """``(path, method) -> view instance`` as the generator built them (empty without a generator)."""
    if generator is None or getattr(generator, "endpoints", None) is None:
        return {}
    return {
        (path, method.lower()): view
        for path, _regex, method, view in generator._get_paths_and_endpoints()  # noqa: SLF001 - drf-spectacular's own
    }


def _serializer_components(generator: Any) -> list[tuple[str, Any]]:
    registry = getattr(generator, "registry", None)
    if registry is None:
        return []
    return [
        (component.name, component.object)
        for component in registry._components.values()  # noqa: SLF001 - the registry has no public iterator
        if component.type == "schemas" and isinstance(component.object, serializers.BaseSerializer)
    ]


def _constraints(schema: dict[str, Any], serializer: Any) -> None:
    """What drf-spectacular leaves out: unsigned decimal strings, and lists that may not be empty."""
    fields = getattr(serializer, "fields", {})
    for name, prop in schema.get("properties", {}).items():
        field = fields.get(name)
        min_value = getattr(field, "min_value", None)
        pattern = prop.get("pattern", "")
        if isinstance(field, serializers.DecimalField) and pattern and field.max_whole_digits:
            # drf-spectacular's pattern also admits "" and "." (all its parts are optional), which DRF refuses.
            sign = "" if min_value is not None and min_value >= 0 else "-?"
            whole, places = field.max_whole_digits, field.decimal_places
            prop["pattern"] = rf"^{sign}(?:\d{{1,{whole}}}(?:\.\d{{0,{places}}})?|\.\d{{1,{places}}})$"
        if (
            isinstance(field, serializers.ListSerializer | serializers.ListField)
            and not field.allow_empty
            and prop.get("type") == "array"
        ):
            prop["minItems"] = max(prop.get("minItems", 0), 1)


def error_responses_and_strict_bodies(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """``POSTPROCESSING_HOOKS`` entry: see the module docstring."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault(ERROR_COMPONENT, _ERROR_SCHEMA)
    views = _views(generator)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "query":
                    parameter.setdefault("allowEmptyValue", True)
            responses = operation.setdefault("responses", {})
            for status in _statuses(path, method, operation, views.get((path, method))):
                responses.setdefault(status, _error_response(status))
    for name, serializer in _serializer_components(generator):
        if name not in schemas:
            continue
        _constraints(schemas[name], serializer)
        if name.endswith("Request") and getattr(serializer, "refuses_unknown_fields", False):
            schemas[name]["additionalProperties"] = False
    return result
