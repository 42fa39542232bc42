"""``GET /metrics``: the Prometheus text exposition, and who may read it.

One process (``make run``): prometheus_client's default registry. Several worker processes (``make serve``, the
image): ``PROMETHEUS_MULTIPROC_DIR`` names a directory where each process keeps its values in memory-mapped
files (prometheus_client's multiprocess mode, chosen when the variable is set at startup), and every scrape adds
them all up with a ``MultiProcessCollector``, so whichever worker answers, the numbers are the platform's. The
directory must be emptied before the server starts (``make serve`` does). Values read at scrape time rather
than counted in a process come from ``gateway_stats.metrics.ScrapeCollector``.

Protection (README "Metrics"): ``METRICS_ALLOWED_IPS`` (addresses or CIDR networks, matched against the client
address of ``apiforge.client_ip``) and ``METRICS_TOKEN`` (``Authorization: Bearer <token>``); with both set, a
scrape must pass both. With neither set, ``/metrics`` is open in development and test, and refused in
production. Refusals are the project's JSON errors: 401 for a missing or wrong token, 403 for an address not
allowed (or production without protection configured).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
from collections.abc import Iterable

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, Metric

from apiforge.client_ip import client_ip
from apiforge.errors import json_error
from gateway_stats.metrics import ScrapeCollector, usage_gauges_update

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.cache
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    # Validated when the settings load (apiforge/settings.py): every entry is an address or a network.
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def _address_allowed(request: HttpRequest, entries: tuple[str, ...]) -> bool:
    address = client_ip(request)
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(entries))


def _bearer_token(request: HttpRequest) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def metrics_refusal(request: HttpRequest) -> HttpResponse | None:
    """The error answer for a scrape that may not read the metrics, or ``None`` when it may."""
    allowed_ips = tuple(settings.METRICS_ALLOWED_IPS)
    token = settings.METRICS_TOKEN
    if not allowed_ips and not token:
        if settings.IS_PRODUCTION:
            return json_error(
                403, "Metrics are disabled: set METRICS_TOKEN or METRICS_ALLOWED_IPS.", "metrics_not_configured"
            )
        return None
    if allowed_ips and not _address_allowed(request, allowed_ips):
        return json_error(403, "Your address may not read the metrics.", "permission_denied")
    if token and not secrets.compare_digest(_bearer_token(request).encode(), token.encode()):
        refusal = json_error(401, "A valid metrics token is required (Authorization: Bearer).", "not_authenticated")
        refusal["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return refusal
    return None


class _Exposition(Collector):
    """The process's (or all processes') metrics followed by the scrape-time ones."""

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def metrics_exposition() -> bytes:
    """The Prometheus text of this platform's metrics (all worker processes in multiprocess mode)."""
    usage_gauges_update()  # this process's gauges are fresh; the other workers' are from their last batch
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return generate_latest(_Exposition(registry, ScrapeCollector()))
    return generate_latest(_Exposition(REGISTRY, ScrapeCollector()))


@csrf_exempt  # read-only; a POST gets the JSON 405
def metrics(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``."""
    if request.method not in {"GET", "HEAD"}:
        response = json_error(405, f'Method "{request.method}" not allowed.', "method_not_allowed")
        response["Allow"] = "GET, HEAD"
        return response
    refusal = metrics_refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(metrics_exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
