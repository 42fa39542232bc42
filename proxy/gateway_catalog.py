"""The gateway's route catalog: every active route and its targets, as plain values in memory.

Like the model catalog (``proxy.catalog``), it is loaded in one go (two queries) into a ``SyncedLocalCache``
and dropped on every worker within ``CACHE_SYNC_INTERVAL_S`` after any write of a route (the route services
call ``gateway_invalidate_on_commit()`` in their transactions). The hot path never queries the database per
request; a lease's end is compared per request, so a route whose lease ran out stops serving at once even
before the sweep task deactivates it. A heartbeat only renews the lease in the database (no invalidation:
services may beat every few seconds); a worker whose loaded lease ran out reloads once to see whether it was
renewed (``gateway_reload_lapsed``), so a renewed route never stops serving and an unrenewed one stops on time.

``route_match`` is the matcher stage: the longest path prefix wins, then the method, then the host; a
version comes from ``/gw/{version}{path}`` or the ``X-API-Version`` header.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from django.conf import settings

from apiforge.local_cache import SyncedSnapshot
from proxy.edge.balance import Balancer
from proxy.edge.breaker import BreakerPolicy, route_target_key

if TYPE_CHECKING:
    from proxy.models import Route

# The active routes with their targets: ``proxy.selectors.gateway_rows``, registered by ``ProxyConfig.ready()``
# (plugged in so that the hot path links no ORM model code).
GatewayRowsReader = Callable[[], "Iterable[Route]"]
_rows_readers: list[GatewayRowsReader] = []


def gateway_rows_reader_register(reader: GatewayRowsReader) -> None:
    """Make ``reader`` what ``gateway_load`` reads the database with; a later call replaces it."""
    _rows_readers[:] = [reader]


Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class HeaderTransform:
    """A route's ``request_headers`` / ``response_headers``: remove, then set (replace), then add."""

    add: tuple[Header, ...] = ()
    set: tuple[Header, ...] = ()
    remove: frozenset[bytes] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.add or self.set or self.remove)

    def apply(self, headers: list[Header]) -> list[Header]:
        """``headers`` (lower-case names) transformed."""
        if self.empty:
            return headers
        drop = self.remove | {name for name, _ in self.set}
        kept = [pair for pair in headers if pair[0] not in drop] if drop else headers
        return [*kept, *self.set, *self.add]

    @classmethod
    def from_config(cls, config: Any) -> HeaderTransform:
        if not isinstance(config, dict) or not config:
            return _NO_TRANSFORM

        def pairs(values: Any) -> tuple[Header, ...]:
            if not isinstance(values, dict):
                return ()
            return tuple((str(k).lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in values.items())

        remove = config.get("remove") or []
        return cls(
            add=pairs(config.get("add")),
            set=pairs(config.get("set")),
            remove=frozenset(str(name).lower().encode("latin-1") for name in remove if isinstance(name, str)),
        )


_NO_TRANSFORM = HeaderTransform()


@dataclass(frozen=True, slots=True)
class PathRewrite:
    """``{"template": "/api/{path}"}`` (``{path}``: the path that would be forwarded, without its leading
    slash) or ``{"regex": ..., "replacement": ...}`` (``re.sub`` once, ``\\1`` groups)."""

    template: str | None = None
    regex: re.Pattern[str] | None = None
    replacement: str = ""

    def apply(self, path: str) -> str:
        if self.template is not None:
            rewritten = self.template.replace("{path}", path.lstrip("/"))
        elif self.regex is not None:
            rewritten = self.regex.sub(self.replacement, path, count=1)
        else:
            return path
        return rewritten if rewritten.startswith("/") else "/" + rewritten

    @classmethod
    def from_config(cls, config: Any) -> PathRewrite | None:
        if not isinstance(config, dict) or not config:
            return None
        if isinstance(config.get("template"), str):
            return cls(template=config["template"])
        if isinstance(config.get("regex"), str):
            try:
                pattern = re.compile(config["regex"])
            except re.error:  # the services refuse it; a row written around them is served unrewritten
                return None
            return cls(regex=pattern, replacement=str(config.get("replacement", "")))
        return None


@dataclass(frozen=True, slots=True)
class FallbackAnswer:
    """What a route answers when no target can: a static status, body and headers."""

    status: int
    body: bytes
    headers: tuple[Header, ...]
    content_type: bytes

    @classmethod
    def from_config(cls, config: Any) -> FallbackAnswer | None:
        if not isinstance(config, dict) or not config:
            return None
        body = config.get("body", "")
        headers = config.get("headers") or {}
        pairs = tuple(
            (str(k).lower().encode("latin-1"), str(v).encode("latin-1"))
            for k, v in (headers.items() if isinstance(headers, dict) else ())
        )
        given_type = next((value for name, value in pairs if name == b"content-type"), None)
        if isinstance(body, str):
            data, content_type = body.encode(), b"text/plain; charset=utf-8"
        else:
            data, content_type = orjson.dumps(body), b"application/json"
        return cls(
            status=int(config.get("status", 200)),
            body=data,
            headers=tuple(pair for pair in pairs if pair[0] != b"content-type"),
            content_type=given_type or content_type,
        )


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A route's active health check: GET ``path`` on each target every ``interval_s``."""

    path: str
    interval_s: float = 10.0
    timeout_s: float = 2.0
    healthy: int = 2
    unhealthy: int = 3

    @classmethod
    def from_config(cls, config: Any) -> HealthCheck | None:
        if not isinstance(config, dict) or not isinstance(config.get("path"), str):
            return None
        return cls(
            path=config["path"],
            interval_s=float(config.get("interval_s", 10.0)),
            timeout_s=float(config.get("timeout_s", 2.0)),
            healthy=int(config.get("healthy", 2)),
            unhealthy=int(config.get("unhealthy", 3)),
        )


@dataclass(frozen=True, slots=True, eq=False)
class RouteTargetEntry:
    """One target as the forwarder needs it. ``key`` names its breaker and health state (``rt:<id>``)."""

    id: int
    key: str
    url: str  # the base URL, without a trailing slash
    scheme: str
    netloc: str
    base_path: str  # the URL's path, without a trailing slash ("" for none)
    weight: int
    drained: bool
    unhealthy: bool  # as stored (the health checker's last word, or an operator's)
    breaker: BreakerPolicy


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True, eq=False)
class RouteEntry:
    id: int
    name: str
    path: str  # "/orders" ("/" matches everything)
    version: str
    methods: frozenset[str]  # empty: all
    hosts: frozenset[str]  # lower-case; empty: any
    auth: str  # none | key | jwt
    strip_path: bool
    rewrite: PathRewrite | None
    timeout_s: float
    client_timeout: aiohttp.ClientTimeout  # no gap in the answer longer than timeout_s; no total limit (streams)
    retries: int
    retry_non_idempotent: bool
    max_body_bytes: int | None
    request_headers: HeaderTransform
    response_headers: HeaderTransform
    fallback: FallbackAnswer | None
    deprecation_headers: tuple[Header, ...]  # RFC 8594: Deprecation (and Sunset) when deprecated
    health_check: HealthCheck | None
    lease_expires_at: float | None  # epoch seconds; None: no lease
    rate_limit_rpm: int | None
    targets: tuple[RouteTargetEntry, ...]
    balancer: Balancer[RouteTargetEntry]

    def retryable(self, method: str) -> bool:
        return self.retries > 0 and (self.retry_non_idempotent or method in IDEMPOTENT_METHODS)


@dataclass(frozen=True, slots=True)
class Gateway:
    """Every active route, in matching order: longest path first, versioned and host-bound ones before others."""

    routes: tuple[RouteEntry, ...] = ()


def _target_entry(target: Any, route: Any) -> RouteTargetEntry:
    parts = urlsplit(target.url)
    return RouteTargetEntry(
        id=target.pk,
        key=route_target_key(target.pk),
        url=target.url.rstrip("/"),
        scheme=parts.scheme,
        netloc=parts.netloc,
        base_path=parts.path.rstrip("/"),
        weight=target.weight,
        drained=target.health == "drained",
        unhealthy=target.health == "unhealthy",
        breaker=BreakerPolicy(
            failure_threshold=route.breaker_failure_threshold,
            cooldown_s=route.breaker_cooldown_s,
            half_open_requests=route.breaker_half_open_requests,
        ),
    )


def _deprecation_headers(route: Any) -> tuple[Header, ...]:
    if not route.deprecated:
        return ()
    headers: list[Header] = [(b"deprecation", b"true")]
    if route.sunset_at is not None:
        headers.append((b"sunset", format_datetime(route.sunset_at, usegmt=True).encode()))
    return tuple(headers)


def _route_entry(route: Any) -> RouteEntry:
    targets = tuple(_target_entry(target, route) for target in route.targets.all())
    return RouteEntry(
        id=route.pk,
        name=route.name,
        path=route.path.rstrip("/") or "/",
        version=route.version,
        methods=frozenset(str(m).upper() for m in route.methods or ()),
        hosts=frozenset(str(h).lower() for h in route.hosts or ()),
        auth=route.auth,
        strip_path=route.strip_path,
        rewrite=PathRewrite.from_config(route.path_rewrite),
        timeout_s=route.timeout_s,
        client_timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=settings.PROXY_CONNECT_TIMEOUT_S, sock_read=route.timeout_s
        ),
        retries=route.retries,
        retry_non_idempotent=route.retry_non_idempotent,
        max_body_bytes=route.max_body_bytes,
        request_headers=HeaderTransform.from_config(route.request_headers),
        response_headers=HeaderTransform.from_config(route.response_headers),
        fallback=FallbackAnswer.from_config(route.fallback),
        deprecation_headers=_deprecation_headers(route),
        health_check=HealthCheck.from_config(route.health_check),
        lease_expires_at=None if route.lease_expires_at is None else route.lease_expires_at.timestamp(),
        rate_limit_rpm=route.rate_limit_rpm,
        targets=targets,
        balancer=Balancer(targets, route.balancer),
    )


def gateway_load() -> Gateway:
    """Build the route catalog from the database (two queries)."""
    if not _rows_readers:
        raise RuntimeError("No gateway route reader registered: is the proxy app installed?")
    entries = [_route_entry(route) for route in _rows_readers[0]()]
    entries.sort(key=lambda r: (-len(r.path), not r.version, not r.hosts, r.name))
    return Gateway(routes=tuple(entries))


_snapshot: SyncedSnapshot[Gateway] = SyncedSnapshot("proxy-gateway", lambda: gateway_load(), ttl=300.0)


def gateway_get() -> Gateway:
    """The current route catalog (memory; database only after an invalidation or TTL)."""
    return _snapshot.get()


def gateway_get_async() -> Coroutine[Any, Any, Gateway]:
    """Like ``gateway_get`` without blocking the event loop on a miss."""
    return _snapshot.get_async()


_reloaded_at = 0.0
# A worker reloads the catalog for a lapsed lease at most this often (heartbeats do not invalidate the catalog).
LAPSED_RELOAD_INTERVAL_S = 1.0


async def gateway_reload_lapsed() -> Gateway | None:
    """The catalog reloaded from the database in this worker only, when a lease it holds ran out: a heartbeat
    renews a lease without invalidating every worker's catalog, so each worker looks again once, when the lease
    it knows of ends. None when it looked less than ``LAPSED_RELOAD_INTERVAL_S`` ago."""
    global _reloaded_at
    now = time.monotonic()
    if now - _reloaded_at < LAPSED_RELOAD_INTERVAL_S:
        return None
    _reloaded_at = now
    return await _snapshot.reload_async()


def gateway_invalidate() -> None:
    """Drop the route catalog here and, within the sync interval, on every worker."""
    _snapshot.invalidate()


def gateway_invalidate_on_commit() -> None:
    """For every write of a route or its targets, inside its transaction (the route services call it);
    see ``SyncedLocalCache.invalidate_on_commit``."""
    _snapshot.invalidate_on_commit()


# --- Matching -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteEntry
    rest: str  # the request path after the version and the route's prefix ("" or "/...")


def _prefix_rest(path: str, prefix: str) -> str | None:
    """What follows ``prefix`` in ``path`` when ``path`` is under it (a whole segment), else None."""
    if prefix == "/":
        return path
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :]
    if rest and rest[0] != "/":
        return None
    return rest


class _LeaseLapsed:
    """``route_match``'s answer when only a route whose lease (as this worker knows it) ran out matched."""


LEASE_LAPSED = _LeaseLapsed()


def route_match(
    gateway: Gateway, path: str, method: str, host: str | None, version_header: str | None, now: float
) -> RouteMatch | tuple[str, ...] | _LeaseLapsed | None:
    """The route serving ``path`` (the part after ``/gw``), or the allowed methods (a 405), or None (a 404);
    ``LEASE_LAPSED`` when a route matched but its lease, as loaded, ran out (a 404, unless a heartbeat renewed
    it since: ``gateway_reload_lapsed`` reloads to find out).

    A route with a version matches ``/{version}{path}``, or ``{path}`` with ``X-API-Version: {version}``;
    one without a version matches ``{path}`` whatever the header says. Longest prefix first; among routes
    with that prefix, those allowing the method, then those bound to the request's host, win.
    """
    host_name = (host or "").lower()
    if ":" in host_name and not host_name.endswith("]"):
        host_name = host_name.rsplit(":", 1)[0]
    best_length = -1
    allowed: set[str] = set()
    lapsed = False
    for route in gateway.routes:
        if len(route.path) < best_length:
            break  # routes are sorted by prefix length: nothing shorter can beat what matched
        if route.hosts and host_name not in route.hosts:
            continue
        rest: str | None
        if route.version:
            marker = "/" + route.version
            if version_header == route.version:
                rest = _prefix_rest(path, route.path)
            elif path.startswith(marker) and (len(path) == len(marker) or path[len(marker)] == "/"):
                rest = _prefix_rest(path[len(marker) :] or "/", route.path)
            else:
                rest = None
        else:
            rest = _prefix_rest(path, route.path)
        if rest is None:
            continue
        if route.lease_expires_at is not None and route.lease_expires_at < now:
            lapsed = True
            continue
        if route.methods and method not in route.methods:
            best_length = len(route.path)
            allowed |= route.methods
            continue
        return RouteMatch(route, rest)
    if allowed:
        return tuple(sorted(allowed))
    return LEASE_LAPSED if lapsed else None
