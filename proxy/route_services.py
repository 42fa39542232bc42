"""Writes of the route registry: register (create or update by name), change, unregister, heartbeat, lease expiry,
and the admin's activate / deactivate / drain / restore (of a route's targets, or of one), lease extension; each
audited.

Every write runs in a transaction, locks the route's row, validates with ``route_validate`` (Django
``ValidationError``s keyed by field, nested values by dotted path: ``targets.1.url``, ``health_check.path``)
and calls ``gateway_invalidate_on_commit()`` inside its transaction, so every worker's gateway catalog follows
within ``CACHE_SYNC_INTERVAL_S`` (or the write fails with 503).

Leases: a route with ``ttl_s`` serves until ``lease_expires_at``; a register, a heartbeat or an activation
renews the lease (now + ``ttl_s``). ``route_leases_expire`` (the beat task) deactivates the routes whose lease
ran out with ``deactivated_reason="lease_expired"``, and a later heartbeat or re-register brings them back. A
route deactivated by staff (``"operator"``) stays down whatever its service sends; one deactivated by its own
key (``"key"``) may be reactivated by that key.

Writes by an API key (``key=``): the key's ``allowed_routes`` must name the route explicitly (an empty list,
which lets a key *call* every route, grants no registration), and on a register or change every target's host
must match ``settings.ROUTE_TARGET_ALLOWLIST`` (host names, ``host:port`` or CIDRs for IP literals; empty =
registration by key refused). ``RouteKeyRefused`` (403) otherwise. The audit trail names the key's prefix.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Field
from django.utils import timezone

from gateway_stats.services import audit_record
from keys.policy import KeyPolicy
from proxy.gateway_catalog import gateway_invalidate_on_commit
from proxy.models import Route, RouteTarget
from proxy.route_exceptions import RouteKeyRefused
from proxy.route_selectors import route_colliding
from proxy.services import FORBIDDEN_EXTRA_HEADERS, HEADER_VALUE_MASK, MAX_HEADER_VALUE_LENGTH, MAX_RETRIES_LIMIT

AUDIT_OBJECT_TYPE = "proxy.route"
TARGET_AUDIT_OBJECT_TYPE = "proxy.routetarget"

# Writable fields of a route (targets apart); the API's serializers and the admin's form use the same list.
ROUTE_FIELDS = (
    "name",
    "path",
    "version",
    "methods",
    "hosts",
    "auth",
    "balancer",
    "strip_path",
    "path_rewrite",
    "timeout_s",
    "retries",
    "retry_non_idempotent",
    "max_body_bytes",
    "request_headers",
    "response_headers",
    "fallback",
    "deprecated",
    "sunset_at",
    "health_check",
    "breaker_failure_threshold",
    "breaker_cooldown_s",
    "breaker_half_open_requests",
    "ttl_s",
    "rate_limit_rpm",
    "is_active",
)

# Why a route is inactive (``Route.deactivated_reason``).
REASON_LEASE_EXPIRED = "lease_expired"
REASON_OPERATOR = "operator"  # staff deactivated it: only staff bring it back
REASON_KEY = "key"  # its own key deactivated it

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
# First path segments that belong to the platform; a route path may not start with one (case-insensitive).
PLATFORM_SEGMENTS = frozenset(
    {"admin", "api", "auth", "v1", "gw", "health", "metrics", "docs", "redoc", "ws", "static"}
)
MIN_TTL_S = 5
MAX_TTL_S = 30 * 24 * 3600
MAX_TIMEOUT_S = 3600.0
MAX_COOLDOWN_S = 24 * 3600.0
MAX_HALF_OPEN_REQUESTS = 100
MAX_TARGETS = 100
MAX_HOSTS = 50
MAX_HEADERS = 50
MAX_URL_LENGTH = 500
MAX_REGEX_LENGTH = 500
MAX_FALLBACK_BODY_CHARS = 64 * 1024
MAX_HEALTH_INTERVAL_S = 3600.0

# Headers a route's transforms may not touch: our credentials, framing, hop-by-hop, and what the gateway sets
# itself (the identity it vouches for, the request id, X-Forwarded-*). Content-Type and Accept-Encoding may be
# transformed (the upstreams' list refuses them because the proxy builds those bodies itself).
FORBIDDEN_TRANSFORM_HEADERS = (FORBIDDEN_EXTRA_HEADERS - {"content-type", "accept-encoding"}) | {
    "x-api-key",
    "api-key",
    "proxy-authenticate",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-authenticated-user",
    "x-authenticated-user-id",
}
# A fallback answer is framed by the gateway: these it sets itself.
FORBIDDEN_FALLBACK_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade", "x-request-id"}
)

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
# RFC 3986 path characters, decoded (the gateway matches the decoded path): no "%", "?", "#", space or controls.
_PATH_CHARS = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")
_GROUP_REFERENCE = re.compile(r"\\(\d{1,2})|\\g<([^>]*)>")


class RouteFields(TypedDict, total=False):
    """Writable route fields (``ROUTE_FIELDS``); JSON fields as documented on ``proxy.models.Route``."""

    name: str
    path: str
    version: str
    methods: list[str]
    hosts: list[str]
    auth: str
    balancer: str
    strip_path: bool
    path_rewrite: dict[str, Any]
    timeout_s: float
    retries: int
    retry_non_idempotent: bool
    max_body_bytes: int | None
    request_headers: dict[str, Any]
    response_headers: dict[str, Any]
    fallback: dict[str, Any]
    deprecated: bool
    sunset_at: datetime | None
    health_check: dict[str, Any]
    breaker_failure_threshold: int
    breaker_cooldown_s: float
    breaker_half_open_requests: int
    ttl_s: int | None
    rate_limit_rpm: int | None
    is_active: bool


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One wanted target of a route, identified by its URL. ``health`` None: keep the current (new: healthy)."""

    url: str
    weight: int = 1
    health: str | None = None


@dataclass(frozen=True, slots=True)
class RouteRegistered:
    route: Route
    created: bool


# --- validation ------------------------------------------------------------------------------------------


class _Errors:
    """Field path -> messages, in the order found."""

    def __init__(self) -> None:
        self.by_field: dict[str, list[str]] = {}

    def add(self, field: str, message: str) -> None:
        messages = self.by_field.setdefault(field, [])
        if message not in messages:
            messages.append(message)

    def has(self, field: str) -> bool:
        return field in self.by_field

    def raise_any(self) -> None:
        if self.by_field:
            raise ValidationError(self.by_field)


def route_path_normalized(path: str) -> str:
    """The stored form of a route path: without a trailing slash (``/`` stays ``/``)."""
    return path.rstrip("/") or "/"


def _host_name_valid(host: str) -> bool:
    return bool(_HOST_NAME.match(host))


def _path_errors(path: Any) -> list[str]:
    if not isinstance(path, str) or not path:
        return ["Give a path starting with “/”, e.g. /orders."]
    errors: list[str] = []
    if not path.startswith("/"):
        errors.append("Must start with “/”.")
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in path):
        errors.append("Must not contain whitespace or control characters.")
    if "?" in path or "#" in path:
        errors.append("Must not contain “?” or “#”: a route matches paths, not query strings or fragments.")
    if "//" in path:
        errors.append("Must not contain “//”.")
    if any(segment in {".", ".."} for segment in path.split("/")):
        errors.append("Must not contain “.” or “..” segments.")
    if "%" in path:
        errors.append("Write the path decoded, without percent-escapes (the gateway matches decoded paths).")
    if not errors and not _PATH_CHARS.match(path):
        errors.append("Contains characters a URL path may not hold unescaped.")
    first = path.lstrip("/").split("/", 1)[0].lower()
    if first in PLATFORM_SEGMENTS:
        errors.append(f"“/{first}” is one of the platform's own paths; choose another prefix.")
    return errors


def _string_list(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _header_name_errors(name: Any, forbidden: frozenset[str], label: str) -> list[str]:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        return [f"{label}: “{name}” is not a valid header name."]
    if name.lower() in forbidden:
        return [
            f"{label}: “{name}” is one of the gateway's own headers (credentials, framing, hop-by-hop or what it "
            "sets itself) and cannot be transformed."
        ]
    return []


def _header_value_errors(name: str, value: Any, label: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{label}: the value of “{name}” must be a string."]
    if any(char in value for char in ("\r", "\n", "\x00")):
        return [f"{label}: the value of “{name}” contains a line break or NUL."]
    if len(value) > MAX_HEADER_VALUE_LENGTH:
        return [f"{label}: the value of “{name}” is longer than {MAX_HEADER_VALUE_LENGTH} characters."]
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return [f"{label}: the value of “{name}” must be ISO-8859-1 text (HTTP header values are bytes)."]
    return []


def header_transform_errors(config: Any) -> list[str]:
    """What is wrong with a ``{"add": {}, "set": {}, "remove": []}`` header transform ({} = none)."""
    if not isinstance(config, dict):
        return ['Must be an object: {"add": {name: value}, "set": {name: value}, "remove": [name, ...]}.']
    errors: list[str] = [
        f"Unknown key “{key}” (use add, set, remove)." for key in config if key not in {"add", "set", "remove"}
    ]
    count = 0
    for part in ("add", "set"):
        values = config.get(part, {})
        if not isinstance(values, dict):
            errors.append(f"{part}: must be an object mapping header names to values.")
            continue
        count += len(values)
        for name, value in values.items():
            found = _header_name_errors(name, FORBIDDEN_TRANSFORM_HEADERS, part)
            errors.extend(found or _header_value_errors(name, value, part))
    remove = config.get("remove", [])
    names = _string_list(remove)
    if names is None:
        errors.append("remove: must be a list of header names.")
    else:
        count += len(names)
        for name in names:
            errors.extend(_header_name_errors(name, FORBIDDEN_TRANSFORM_HEADERS, "remove"))
    if count > MAX_HEADERS:
        errors.append(f"At most {MAX_HEADERS} headers in all.")
    return errors


def _regex_replacement_errors(pattern: re.Pattern[str], replacement: str) -> list[str]:
    errors: list[str] = []
    if replacement.endswith("\\") and not replacement.endswith("\\\\"):
        errors.append("replacement: ends with a lone backslash.")
    for number, name in _GROUP_REFERENCE.findall(replacement):
        if number and int(number) > pattern.groups:
            errors.append(f"replacement: \\{number} names a group the regex does not have.")
        elif name and not (name.isdigit() and int(name) <= pattern.groups) and name not in pattern.groupindex:
            errors.append(f"replacement: \\g<{name}> names a group the regex does not have.")
    return errors


def path_rewrite_errors(config: Any) -> list[str]:
    """``{"template": "/..."}`` or ``{"regex": ..., "replacement": ...}``; {} = none."""
    if not isinstance(config, dict):
        return ['Must be an object: {"template": "/api/{path}"} or {"regex": "...", "replacement": "..."}.']
    if not config:
        return []
    keys = set(config)
    if keys == {"template"}:
        template = config["template"]
        if not isinstance(template, str) or not template.startswith("/"):
            return ["template: must be a string starting with “/” ({path} stands for the forwarded path)."]
        if any(char.isspace() or ord(char) < 32 for char in template) or "#" in template or "?" in template:
            return ["template: must not contain whitespace, control characters, “?” or “#”."]
        return []
    if keys == {"regex", "replacement"}:
        regex, replacement = config["regex"], config["replacement"]
        if not isinstance(regex, str) or not regex or len(regex) > MAX_REGEX_LENGTH:
            return [f"regex: must be a regular expression of 1 to {MAX_REGEX_LENGTH} characters."]
        if not isinstance(replacement, str):
            return ["replacement: must be a string."]
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            return [f"regex: does not compile: {exc}."]
        if any(char in replacement for char in ("\r", "\n", "\x00")):
            return ["replacement: must not contain line breaks or NUL."]
        return _regex_replacement_errors(pattern, replacement)
    return ['Give either {"template": ...} or {"regex": ..., "replacement": ...}, nothing else.']


def fallback_errors(config: Any) -> list[str]:
    """``{"status": 100-599, "body": string or JSON, "headers": {name: value}}``; {} = none."""
    if not isinstance(config, dict):
        return ['Must be an object: {"status": 503, "body": "...", "headers": {}}.']
    if not config:
        return []
    errors = [
        f"Unknown key “{key}” (use status, body, headers)."
        for key in config
        if key not in {"status", "body", "headers"}
    ]
    status = config.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        errors.append("status: must be an HTTP status code, 100 to 599.")
    body = config.get("body", "")
    if len(body if isinstance(body, str) else json.dumps(body, default=str)) > MAX_FALLBACK_BODY_CHARS:
        errors.append(f"body: at most {MAX_FALLBACK_BODY_CHARS} characters.")
    headers = config.get("headers", {})
    if not isinstance(headers, dict):
        errors.append("headers: must be an object mapping header names to values.")
    else:
        if len(headers) > MAX_HEADERS:
            errors.append(f"headers: at most {MAX_HEADERS}.")
        for name, value in headers.items():
            found = _header_name_errors(name, FORBIDDEN_FALLBACK_HEADERS, "headers")
            errors.extend(found or _header_value_errors(name, value, "headers"))
    return errors


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def health_check_errors(config: Any) -> list[str]:
    """``{"path": "/...", "interval_s" > 0, "timeout_s" > 0, "healthy" >= 1, "unhealthy" >= 1}``; {} = none."""
    if not isinstance(config, dict):
        return [
            'Must be an object: {"path": "/healthz", "interval_s": 10, "timeout_s": 2, "healthy": 2, "unhealthy": 3}.'
        ]
    if not config:
        return []
    known = {"path", "interval_s", "timeout_s", "healthy", "unhealthy"}
    errors = [f"Unknown key “{key}” (use {', '.join(sorted(known))})." for key in config if key not in known]
    path = config.get("path")
    if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() or ord(c) < 32 for c in path):
        errors.append("path: must be a path starting with “/” (a query string is allowed), without whitespace.")
    for field, maximum in (("interval_s", MAX_HEALTH_INTERVAL_S), ("timeout_s", MAX_TIMEOUT_S)):
        if field in config and not (_positive_number(config[field]) and config[field] <= maximum):
            errors.append(f"{field}: must be a number of seconds greater than 0 (at most {maximum:g}).")
    for field in ("healthy", "unhealthy"):
        value = config.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            errors.append(f"{field}: must be a whole number from 1 to 100.")
    return errors


def _host_port(url: str) -> tuple[str, int | None, str]:
    """(host, port, scheme) of a valid target URL; the host lower-case, without brackets or a trailing dot."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    return host, parts.port, parts.scheme.lower()


def target_url_errors(url: Any) -> list[str]:
    """What is wrong with a target's base URL: http(s), a host, no user info, query or fragment."""
    if not isinstance(url, str) or not url:
        return ["Enter a URL, e.g. http://orders.internal:8080."]
    if len(url) > MAX_URL_LENGTH:
        return [f"At most {MAX_URL_LENGTH} characters."]
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        return ["Must not contain whitespace or control characters."]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"Not a valid URL: {exc}."]
    if parts.scheme.lower() not in {"http", "https"}:
        return ["Must start with http:// or https://."]
    errors: list[str] = []
    if "@" in parts.netloc:
        errors.append("Must not contain a user name or password.")
    if parts.fragment or "#" in url:
        errors.append("Must not have a fragment (#...).")
    if parts.query or "?" in url:
        errors.append("Must not have a query string (the client's query is passed on).")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        errors.append("Needs a host name or address.")
    elif not (_is_ip(host) or _host_name_valid(host)):
        errors.append(f"“{host}” is not a valid host name or IP address.")
    if port == 0:
        errors.append("Port 0 is not a port.")
    if "//" in parts.path or any(segment in {".", ".."} for segment in parts.path.split("/")):
        errors.append("The path must not contain “//”, “.” or “..” segments.")
    return errors


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _target_key(url: str) -> str:
    """What makes two target URLs the same: scheme and host case-insensitive, trailing slash ignored."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def targets_errors(targets: Sequence[TargetSpec]) -> dict[str, list[str]]:
    """What is wrong with a route's wanted targets on their own, by field path (``targets``, ``targets.1.url``)."""
    errors = _Errors()
    if not targets:
        errors.add("targets", "A route needs at least one target.")
    if len(targets) > MAX_TARGETS:
        errors.add("targets", f"At most {MAX_TARGETS} targets.")
    seen: dict[str, int] = {}
    for index, target in enumerate(targets):
        for message in target_url_errors(target.url):
            errors.add(f"targets.{index}.url", message)
        if not errors.has(f"targets.{index}.url"):
            key = _target_key(target.url)
            if key in seen:
                errors.add(f"targets.{index}.url", f"The same URL as target {seen[key]}: each target may appear once.")
            seen.setdefault(key, index)
        if isinstance(target.weight, bool) or not isinstance(target.weight, int) or target.weight < 0:
            errors.add(f"targets.{index}.weight", "Must be a whole number, 0 or more.")
        if target.health is not None and target.health not in RouteTarget.Health.values:
            errors.add(f"targets.{index}.health", f"Must be one of {', '.join(RouteTarget.Health.values)}.")
    weights = [t.weight for t in targets if isinstance(t.weight, int) and not isinstance(t.weight, bool)]
    if targets and weights and all(weight == 0 for weight in weights) and len(weights) == len(targets):
        errors.add("targets", "At least one target needs a weight above 0.")
    return errors.by_field


def _hosts_overlap(mine: Iterable[str], theirs: Iterable[str]) -> bool:
    a = {h.lower() for h in mine}
    b = {h.lower() for h in theirs if isinstance(h, str)}
    return not a or not b or bool(a & b)


def route_validate(*, route: Route, targets: Sequence[TargetSpec] | None = None, model_checks: bool = True) -> None:
    """Raise ``ValidationError`` (by field path) unless ``route`` (with ``targets``, when given) may be saved.

    ``model_checks=False`` leaves out the model's own field and unique checks (a ``ModelForm`` runs those).
    """
    errors = _Errors()
    if model_checks:
        try:
            route.full_clean(exclude=["lease_expires_at", "deactivated_reason", "registered_by_key_id"])
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                for message in messages:
                    errors.add(field, message)
    if not errors.has("path"):
        for message in _path_errors(route.path):
            errors.add("path", message)
    if route.version and not errors.has("version"):
        if not isinstance(route.version, str) or not _VERSION.match(route.version):
            errors.add("version", "A short slug such as v2 (letters, digits, “.”, “_”, “-”; up to 32).")
    methods = _string_list(route.methods)
    if methods is None:
        errors.add("methods", "Must be a list of HTTP methods.")
    else:
        for method in methods:
            if method.upper() not in HTTP_METHODS:
                errors.add(
                    "methods", f"“{method}” is not an HTTP method the gateway forwards ({', '.join(HTTP_METHODS)})."
                )
    hosts = _string_list(route.hosts)
    if hosts is None:
        errors.add("hosts", "Must be a list of host names.")
    else:
        if len(hosts) > MAX_HOSTS:
            errors.add("hosts", f"At most {MAX_HOSTS} hosts.")
        for host in hosts:
            if not _host_name_valid(host):
                errors.add("hosts", f"“{host}” is not a host name (no scheme, port or path).")
    for field, check in (
        ("request_headers", header_transform_errors),
        ("response_headers", header_transform_errors),
        ("path_rewrite", path_rewrite_errors),
        ("fallback", fallback_errors),
        ("health_check", health_check_errors),
    ):
        for message in check(getattr(route, field)):
            errors.add(field, message)
    _numbers_validate(route, errors)
    if not errors.has("path") and not errors.has("version") and hosts is not None:
        for other in route_colliding(path=route.path, version=route.version or "", exclude_pk=route.pk):
            if _hosts_overlap(hosts, other.hosts or []):
                errors.add(
                    "path",
                    f"Route “{other.name}” already serves this path and version for these hosts "
                    "(give the routes different hosts, versions or paths).",
                )
    if targets is not None:
        for field, messages in targets_errors(targets).items():
            for message in messages:
                errors.add(field, message)
    errors.raise_any()


def _numbers_validate(route: Route, errors: _Errors) -> None:
    def number(field: str) -> Any:
        value = getattr(route, field)
        return None if errors.has(field) else value

    timeout = number("timeout_s")
    if timeout is not None and not (_positive_number(timeout) and timeout <= MAX_TIMEOUT_S):
        errors.add("timeout_s", f"Must be greater than 0 and at most {MAX_TIMEOUT_S:g} seconds.")
    retries = number("retries")
    if retries is not None and not 0 <= retries <= MAX_RETRIES_LIMIT:
        errors.add("retries", f"Must be between 0 and {MAX_RETRIES_LIMIT}.")
    ttl = number("ttl_s")
    if ttl is not None and not MIN_TTL_S <= ttl <= MAX_TTL_S:
        errors.add("ttl_s", f"A lease lasts {MIN_TTL_S} to {MAX_TTL_S} seconds (leave empty for no lease).")
    threshold = number("breaker_failure_threshold")
    if threshold is not None and threshold < 1:
        errors.add("breaker_failure_threshold", "Must be at least 1.")
    cooldown = number("breaker_cooldown_s")
    if cooldown is not None and not (
        isinstance(cooldown, int | float) and math.isfinite(cooldown) and 0 <= cooldown <= MAX_COOLDOWN_S
    ):
        errors.add("breaker_cooldown_s", f"Must be between 0 and {MAX_COOLDOWN_S:g} seconds.")
    probes = number("breaker_half_open_requests")
    if probes is not None and not 1 <= probes <= MAX_HALF_OPEN_REQUESTS:
        errors.add("breaker_half_open_requests", f"Must be between 1 and {MAX_HALF_OPEN_REQUESTS}.")
    for field in ("max_body_bytes", "rate_limit_rpm"):
        value = number(field)
        if value is not None and value < 1:
            errors.add(field, "Must be at least 1 (leave empty for no limit).")


# --- keys: who may register what ---------------------------------------------------------------------------


def _allowlist_entries(allowlist: Iterable[str]) -> list[tuple[str, Any]]:
    """``ROUTE_TARGET_ALLOWLIST`` parsed: ("net", network), ("host", name) or ("hostport", (name, port))."""
    entries: list[tuple[str, Any]] = []
    for raw in allowlist:
        entry = str(raw).strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            entries.append(("net", ipaddress.ip_network(entry.strip("[]"), strict=False)))
            continue
        except ValueError:
            pass
        if entry.startswith("["):  # [v6]:port
            address, _, port = entry[1:].partition("]:")
            try:
                entries.append(("ipport", (ipaddress.ip_address(address), int(port))))
            except ValueError:
                continue
        elif entry.count(":") == 1:
            name, _, port = entry.partition(":")
            if port.isdigit():
                entries.append(("hostport", (name.rstrip("."), int(port))))
        else:
            entries.append(("host", entry))
    return entries


def target_allowed(url: str, allowlist: Iterable[str]) -> bool:
    """Whether a (valid) target URL's host matches ``allowlist``: a host name (any port), ``host:port``, or a
    CIDR / address for IP literals. Host names are compared by name, never resolved."""
    host, port, scheme = _host_port(url)
    effective_port = port if port is not None else (443 if scheme == "https" else 80)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, value in _allowlist_entries(allowlist):
        if kind == "net" and address is not None and address.version == value.version and address in value:
            return True
        if kind == "ipport" and address is not None and (address, effective_port) == value:
            return True
        if kind == "host" and address is None and host == value:
            return True
        if kind == "hostport" and address is None and (host, effective_port) == value:
            return True
    return False


def _key_names(key: KeyPolicy, names: Iterable[str]) -> None:
    for name in names:
        if name not in key.allowed_routes:
            raise RouteKeyRefused(
                f"This API key's allowed_routes does not name the route “{name}”. A key may register, change, "
                "renew or remove only the routes it names explicitly (an empty allowed_routes names none)."
            )


def _key_targets(key: KeyPolicy, urls: Iterable[str]) -> None:
    allowlist = list(settings.ROUTE_TARGET_ALLOWLIST)
    if not allowlist:
        raise RouteKeyRefused(
            "Registration by API key is turned off: ROUTE_TARGET_ALLOWLIST is empty. Ask an operator to register "
            "the route, or to allow your targets' hosts.",
            code="route_registration_by_key_disabled",
        )
    for url in urls:
        if not target_allowed(url, allowlist):
            raise RouteKeyRefused(
                f"The target “{url}” is not in ROUTE_TARGET_ALLOWLIST: a key may point routes only at the hosts "
                "operators allowed.",
                code="route_target_not_allowed",
            )


def _key_reactivation(key: KeyPolicy, route: Route) -> None:
    if not route.is_active and route.deactivated_reason == REASON_OPERATOR:
        raise RouteKeyRefused(
            f"Route “{route.name}” was deactivated by an operator; only staff can activate it again.",
            code="route_deactivated_by_operator",
        )


# --- the audit trail ---------------------------------------------------------------------------------------


def _masked_transform(config: Any) -> Any:
    """A header transform with the values masked (they may carry credentials for the target)."""
    if not isinstance(config, dict):
        return config
    masked = dict(config)
    for part in ("add", "set"):
        if isinstance(masked.get(part), dict):
            masked[part] = dict.fromkeys(masked[part], HEADER_VALUE_MASK)
    return masked


def _targets_snapshot(route: Route) -> list[dict[str, Any]]:
    return [
        {"url": t.url, "weight": t.weight, "health": t.health}
        for t in RouteTarget.objects.filter(route=route).order_by("pk")
    ]


def _route_snapshot(route: Route) -> dict[str, Any]:
    snapshot: dict[str, Any] = {field: getattr(route, field) for field in ROUTE_FIELDS}
    for field in ("request_headers", "response_headers"):
        snapshot[field] = _masked_transform(snapshot[field])
    snapshot["lease_expires_at"] = route.lease_expires_at
    snapshot["deactivated_reason"] = route.deactivated_reason
    return snapshot


def _diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    return {field: [before[field], after[field]] for field in after if before.get(field) != after[field]}


def _audit(
    action: str,
    route_pk: int,
    name: str,
    changes: dict[str, Any],
    *,
    actor: AbstractBaseUser | None,
    ip_address: str | None,
    key: KeyPolicy | None,
) -> None:
    if key is not None:
        changes = {**changes, "key_prefix": key.prefix}
    audit_record(
        actor=actor,
        action=f"route.{action}",
        object_type=AUDIT_OBJECT_TYPE,
        object_id=route_pk,
        object_repr=name,
        changes=changes,
        ip_address=ip_address,
    )


# --- writes ------------------------------------------------------------------------------------------------


def _normalized(field: str, value: Any) -> Any:
    """Canonical forms, so that equal routes compare equal and collisions are found."""
    if field == "path" and isinstance(value, str) and value.startswith("/"):
        return route_path_normalized(value)
    if field == "methods" and _string_list(value) is not None:
        return list(dict.fromkeys(method.upper() for method in value))
    if field == "hosts" and _string_list(value) is not None:
        return list(dict.fromkeys(host.lower().rstrip(".") for host in value))
    return value


def _apply(route: Route, data: Mapping[str, Any], *, fields: Iterable[str]) -> None:
    for field in fields:
        if field in data:
            setattr(route, field, _normalized(field, data[field]))


def _lease_renew(route: Route, now: datetime) -> None:
    route.lease_expires_at = None if route.ttl_s is None else now + timedelta(seconds=route.ttl_s)


def _targets_replace(*, route: Route, targets: Sequence[TargetSpec]) -> None:
    """Make ``route``'s targets exactly ``targets``, keeping the rows (and ids, so breaker and health state) of
    the URLs that stay; a kept target's health changes only when the spec gives one."""
    existing = {_target_key(target.url): target for target in RouteTarget.objects.filter(route=route).order_by("pk")}
    wanted = {_target_key(spec.url): spec for spec in targets}
    stale = [target.pk for key, target in existing.items() if key not in wanted]
    if stale:
        RouteTarget.objects.filter(pk__in=stale).delete()
    for key, spec in wanted.items():
        current = existing.get(key)
        if current is None:
            RouteTarget.objects.create(
                route=route, url=spec.url, weight=spec.weight, health=spec.health or RouteTarget.Health.HEALTHY
            )
            continue
        health = spec.health or current.health
        if (current.url, current.weight, current.health) != (spec.url, spec.weight, health):
            current.url, current.weight, current.health = spec.url, spec.weight, health
            current.save(update_fields=["url", "weight", "health"])


def _activation(
    route: Route, *, was_active: bool, was_reason: str, switched_off: bool, staff: bool, now: datetime
) -> None:
    """Keep ``deactivated_reason`` in step with ``is_active`` after a write that may have changed it.

    ``switched_off``: the write asked for ``is_active=false`` itself. A key never turns an operator's
    deactivation into its own (which it could then undo).
    """
    if route.is_active:
        route.deactivated_reason = ""
        if not was_active:
            _lease_renew(route, now)  # reactivated: a fresh lease, or the sweep would take it down again
    elif switched_off or was_active or not was_reason:
        if staff:
            route.deactivated_reason = REASON_OPERATOR
        elif was_reason != REASON_OPERATOR or was_active:
            route.deactivated_reason = REASON_KEY


@transaction.atomic
def route_create(
    *,
    data: RouteFields,
    targets: Sequence[TargetSpec],
    key: KeyPolicy | None = None,
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
) -> Route:
    """Create a route with its targets; with ``ttl_s``, its lease runs from now."""
    if key is not None:
        _key_names(key, [str(data.get("name", ""))])
    route = Route()
    _apply(route, data, fields=ROUTE_FIELDS)
    route_validate(route=route, targets=targets)
    if key is not None:
        _key_targets(key, [spec.url for spec in targets])
        route.registered_by_key_id = key.key_id
    now = timezone.now()
    _lease_renew(route, now)
    if not route.is_active:
        route.deactivated_reason = REASON_KEY if key is not None else REASON_OPERATOR
    gateway_invalidate_on_commit()
    route.save()
    _targets_replace(route=route, targets=targets)
    changes = _route_snapshot(route)
    changes["targets"] = _targets_snapshot(route)
    _audit("create", route.pk, route.name, changes, actor=actor, ip_address=ip_address, key=key)
    return route


@transaction.atomic
def route_update(
    *,
    route: Route,
    data: RouteFields,
    targets: Sequence[TargetSpec] | None = None,
    key: KeyPolicy | None = None,
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
    action: str = "update",
    renew_lease: bool = False,
) -> Route:
    """Change the given fields; ``targets`` (when given) replaces the route's targets as a set.

    A changed ``ttl_s`` starts a fresh lease of that length (none when cleared), and so does activating a route.
    ``renew_lease`` renews it in any case (a re-register). A key writing must name the route, before and after
    a rename, and the resulting targets must be allowlisted.
    """
    locked = Route.objects.select_for_update().get(pk=route.pk)
    if key is not None:
        _key_names(key, [locked.name, str(data.get("name", locked.name))])
        if data.get("is_active"):
            _key_reactivation(key, locked)
    before = _route_snapshot(locked)
    before_targets = _targets_snapshot(locked)
    headers_before = (locked.request_headers, locked.response_headers)
    was_active, was_reason, old_ttl = locked.is_active, locked.deactivated_reason, locked.ttl_s
    _apply(locked, data, fields=ROUTE_FIELDS)
    route_validate(route=locked, targets=targets)
    if key is not None:
        urls = [spec.url for spec in targets] if targets is not None else [t["url"] for t in before_targets]
        _key_targets(key, urls)
    now = timezone.now()
    if renew_lease or locked.ttl_s != old_ttl:
        _lease_renew(locked, now)
    _activation(
        locked,
        was_active=was_active,
        was_reason=was_reason,
        switched_off=data.get("is_active") is False,
        staff=key is None,
        now=now,
    )
    after = _route_snapshot(locked)
    changes = _diff(before, after)
    for field, old in zip(("request_headers", "response_headers"), headers_before, strict=True):
        if field not in changes and getattr(locked, field) != old:
            # Same names, other (possibly secret) values: say that they changed, never what they are.
            changes[field] = "values changed"
    if changes or renew_lease:
        locked.save()
    if targets is not None:
        _targets_replace(route=locked, targets=targets)
        after_targets = _targets_snapshot(locked)
        if after_targets != before_targets:
            changes["targets"] = [before_targets, after_targets]
    if not changes and not renew_lease:
        return locked
    gateway_invalidate_on_commit()
    _audit(action, locked.pk, locked.name, changes, actor=actor, ip_address=ip_address, key=key)
    return locked


def _register_defaults() -> dict[str, Any]:
    """What a re-register gives the fields its body leaves out: the model's defaults (``is_active`` is kept)."""
    defaults: dict[str, Any] = {}
    for name in ROUTE_FIELDS:
        field = Route._meta.get_field(name)
        if name not in {"name", "is_active"} and isinstance(field, Field):
            defaults[name] = field.get_default()
    return defaults


@transaction.atomic
def route_register(
    *,
    data: RouteFields,
    targets: Sequence[TargetSpec],
    key: KeyPolicy | None = None,
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
) -> RouteRegistered:
    """Create the route named ``data["name"]``, or update it: a service registering itself again is an update,
    never a conflict.

    The body describes the whole route: on an update, fields it leaves out take their defaults (``is_active``
    excepted, which stays as it is unless given), the targets are replaced as a set, the lease is renewed, and
    a route whose lease had expired is active again (one an operator deactivated is not).
    """
    name = str(data.get("name", ""))
    existing = Route.objects.select_for_update().filter(name=name).first()
    if existing is None:
        return RouteRegistered(
            route=route_create(data=data, targets=targets, key=key, actor=actor, ip_address=ip_address), created=True
        )
    wanted: dict[str, Any] = {**_register_defaults(), **data}
    if "is_active" not in data and not existing.is_active and existing.deactivated_reason == REASON_LEASE_EXPIRED:
        wanted["is_active"] = True
    route = route_update(
        route=existing,
        data=wanted,  # type: ignore[arg-type]  # every key is a RouteFields key
        targets=targets,
        key=key,
        actor=actor,
        ip_address=ip_address,
        action="register",
        renew_lease=True,
    )
    registered_by = key.key_id if key is not None else None
    if route.registered_by_key_id != registered_by:
        route.registered_by_key_id = registered_by
        route.save(update_fields=["registered_by_key_id"])
    return RouteRegistered(route=route, created=False)


@transaction.atomic
def route_delete(
    *, route: Route, key: KeyPolicy | None = None, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> None:
    """Delete ``route`` and its targets (``unregister``)."""
    locked = Route.objects.select_for_update().get(pk=route.pk)
    if key is not None:
        _key_names(key, [locked.name])
    pk, name = locked.pk, locked.name
    changes = _route_snapshot(locked)
    changes["targets"] = _targets_snapshot(locked)
    gateway_invalidate_on_commit()
    locked.delete()
    _audit("delete", pk, name, changes, actor=actor, ip_address=ip_address, key=key)


def _lease_extend(locked: Route) -> dict[str, Any]:
    """Renew the lease of a locked route (one deactivated because its lease ran out is active again) and save it;
    what changed. ``ValidationError`` on ``ttl_s`` for a route without a lease."""
    if locked.ttl_s is None:
        raise ValidationError(
            {"ttl_s": [f"Route “{locked.name}” has no ttl_s, so it has no lease to renew. Set ttl_s to lease it."]}
        )
    before = locked.lease_expires_at
    _lease_renew(locked, timezone.now())
    changes: dict[str, Any] = {"lease_expires_at": [before, locked.lease_expires_at]}
    if not locked.is_active and locked.deactivated_reason == REASON_LEASE_EXPIRED:
        locked.is_active = True
        locked.deactivated_reason = ""
        changes["is_active"] = [False, True]
    locked.save(update_fields=["lease_expires_at", "is_active", "deactivated_reason", "updated_at"])
    return changes


@transaction.atomic
def route_heartbeat(
    *, route: Route, key: KeyPolicy | None = None, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> Route:
    """Renew the lease (now + ``ttl_s``); a route deactivated because its lease ran out is active again.

    A route without ``ttl_s`` has no lease: ``ValidationError`` on ``ttl_s``. One an operator deactivated
    has its lease renewed but stays inactive.
    """
    locked = Route.objects.select_for_update().get(pk=route.pk)
    if key is not None:
        _key_names(key, [locked.name])
    changes = _lease_extend(locked)
    if "is_active" in changes:
        # Back in service: every worker must see it (and the audit trail say who brought it back).
        gateway_invalidate_on_commit()
        _audit("heartbeat", locked.pk, locked.name, changes, actor=actor, ip_address=ip_address, key=key)
    # A plain renewal invalidates nothing and is not audited (services beat every few seconds): a worker whose
    # loaded lease runs out reloads once and finds it renewed (``proxy.gateway_catalog.gateway_reload_lapsed``).
    return locked


@transaction.atomic
def route_leases_expire(*, now: datetime | None = None) -> list[str]:
    """Deactivate the active routes whose lease ran out (``deactivated_reason="lease_expired"``); their names.

    Idempotent, and safe to run from two beats at once: rows another run holds are skipped, and a row is
    checked again once locked (a heartbeat may have renewed it in between).
    """
    moment = now or timezone.now()
    expired = list(
        Route.objects.select_for_update(skip_locked=True)
        .filter(is_active=True, lease_expires_at__isnull=False, lease_expires_at__lt=moment)
        .order_by("pk")
    )
    if not expired:
        return []
    gateway_invalidate_on_commit()
    for route in expired:
        route.is_active = False
        route.deactivated_reason = REASON_LEASE_EXPIRED
        route.save(update_fields=["is_active", "deactivated_reason", "updated_at"])
        _audit(
            "lease_expired",
            route.pk,
            route.name,
            {"is_active": [True, False], "lease_expires_at": route.lease_expires_at},
            actor=None,
            ip_address=None,
            key=None,
        )
    return [route.name for route in expired]


def route_activate(
    *, route: Route, active: bool, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> Route:
    """Staff turn a route on or off (an activated leased route gets a fresh lease)."""
    return route_update(
        route=route,
        data={"is_active": active},
        actor=actor,
        ip_address=ip_address,
        action="activate" if active else "deactivate",
    )


@transaction.atomic
def route_targets_health_set(
    *,
    route: Route,
    health: str,
    only: str | None = None,
    actor: AbstractBaseUser | None = None,
    ip_address: str | None = None,
) -> int:
    """Set the health of ``route``'s targets (those whose health is ``only``, when given): staff drain every
    target (no new calls) or restore drained ones. Returns how many changed."""
    if health not in RouteTarget.Health.values:
        raise ValidationError({"health": [f"Must be one of {', '.join(RouteTarget.Health.values)}."]})
    locked = Route.objects.select_for_update().get(pk=route.pk)
    targets = RouteTarget.objects.filter(route=locked).exclude(health=health)
    if only is not None:
        targets = targets.filter(health=only)
    urls = sorted(targets.values_list("url", flat=True))
    if not urls:
        return 0
    gateway_invalidate_on_commit()
    changed = targets.update(health=health)
    action = "targets_drain" if health == RouteTarget.Health.DRAINED else "targets_restore"
    _audit(
        action,
        locked.pk,
        locked.name,
        {"health": health, "targets": urls},
        actor=actor,
        ip_address=ip_address,
        key=None,
    )
    return changed


@transaction.atomic
def route_lease_extend(*, route: Route, actor: AbstractBaseUser | None = None, ip_address: str | None = None) -> Route:
    """Staff renew a route's lease (now + ``ttl_s``), as a heartbeat would, always audited (``route.lease_extend``).

    A route deactivated because its lease ran out is active again; one an operator deactivated stays inactive.
    A route without ``ttl_s``: ``ValidationError`` on ``ttl_s``.
    """
    locked = Route.objects.select_for_update().get(pk=route.pk)
    changes = _lease_extend(locked)
    if "is_active" in changes:
        gateway_invalidate_on_commit()
    _audit("lease_extend", locked.pk, locked.name, changes, actor=actor, ip_address=ip_address, key=None)
    return locked


@transaction.atomic
def route_target_health_set(
    *, target: RouteTarget, health: str, actor: AbstractBaseUser | None = None, ip_address: str | None = None
) -> bool:
    """Set one target's stored health: staff drain it (no new calls) or restore it (``healthy``); audited as
    ``route_target.drain`` / ``route_target.restore`` (``route_target.health`` for ``unhealthy``). True when it
    changed (setting the health it already has writes and audits nothing)."""
    if health not in RouteTarget.Health.values:
        raise ValidationError({"health": [f"Must be one of {', '.join(RouteTarget.Health.values)}."]})
    # The route's row first, as every route write locks it (one lock order: route, then its targets).
    route = Route.objects.select_for_update().get(pk=target.route_id)
    locked = RouteTarget.objects.select_for_update().get(pk=target.pk)
    before = locked.health
    if before == health:
        return False
    gateway_invalidate_on_commit()
    locked.health = health
    locked.save(update_fields=["health"])
    actions: dict[str, str] = {RouteTarget.Health.DRAINED: "drain", RouteTarget.Health.HEALTHY: "restore"}
    action = actions.get(health, "health")
    audit_record(
        actor=actor,
        action=f"route_target.{action}",
        object_type=TARGET_AUDIT_OBJECT_TYPE,
        object_id=locked.pk,
        object_repr=f"{route.name}: {locked.url}",
        changes={"health": [before, health], "route": route.name, "route_id": route.pk, "url": locked.url},
        ip_address=ip_address,
    )
    return True
