"""The routing catalog: public models, their deployments and upstreams, as plain values in memory.

The proxy never queries the database per request: the whole catalog (it is
small: models x deployments) is loaded in one go into a ``SyncedLocalCache``
and rebuilt after any change to an Upstream, Model or Deployment, on every
worker within the cache sync interval. The writers (``proxy.services``, which the
API, the admin and the commands all go through) call ``catalog_invalidate_on_commit()``
inside their transactions; it only touches the cache, never business state.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Set
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from django.conf import settings
from multidict import CIMultiDict
from yarl import URL

from apiforge.local_cache import SyncedSnapshot
from proxy.edge.balance import Balancer
from proxy.edge.breaker import BreakerPolicy, deployment_key

if TYPE_CHECKING:
    from proxy.models import Deployment, Model, Upstream

# The active deployments (their upstreams joined) and the active models: ``proxy.selectors.catalog_rows``,
# registered by ``ProxyConfig.ready()``. Plugged in rather than imported so that this module, which the
# hot path imports, links no ORM model code (the hot-path import contract).
CatalogRowsReader = Callable[[], "tuple[Iterable[Deployment], Iterable[Model]]"]
_rows_readers: list[CatalogRowsReader] = []


def catalog_rows_reader_register(reader: CatalogRowsReader) -> None:
    """Make ``reader`` what ``catalog_load`` reads the database with; a later call replaces it."""
    _rows_readers[:] = [reader]


ENDPOINTS = ("chat/completions", "completions", "embeddings", "models")


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """What the hot path needs of an upstream: precomputed URLs and headers."""

    id: int
    name: str
    kind: str
    timeout_s: float
    max_retries: int
    headers: CIMultiDict[str]
    urls: dict[str, URL]
    timeout: aiohttp.ClientTimeout
    stream_timeout: aiohttp.ClientTimeout


@dataclass(frozen=True, slots=True, eq=False)
class DeploymentTarget:
    """One deployment as the balancer sees it: ``key`` (``dep:<id>``) names its breaker; ``breaker`` is its
    upstream's breaker settings."""

    id: int
    key: str
    upstream: UpstreamTarget
    upstream_model: str
    weight: int
    breaker: BreakerPolicy


@dataclass(frozen=True, slots=True, eq=False)
class ModelTarget:
    name: str
    deployments: tuple[DeploymentTarget, ...]
    fallbacks: tuple[str, ...]
    input_price_per_1k: Decimal
    output_price_per_1k: Decimal
    created: int
    balancer: Balancer[DeploymentTarget]
    # Caps that protect the upstream account's own quota, across every key (None: none).
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    # The completion tokens a call is assumed to use when it names no max_tokens (what TPM and budgets reserve
    # before the call; the real figure replaces it after).
    output_tokens_estimate: int = 256

    def pick(self, exclude: Set[str] = frozenset()) -> DeploymentTarget | None:
        """The next deployment (``Model.balancer``'s way), skipping the ``exclude``d keys and the deployments
        whose breaker is open; None when none may be called. Counted in flight until ``balancer.finished``."""
        return self.balancer.pick(exclude)


@dataclass(frozen=True, slots=True)
class Catalog:
    models: dict[str, ModelTarget] = field(default_factory=dict)


def _endpoint_urls(base_url: str) -> dict[str, URL]:
    """Endpoint URLs under ``base_url``, keeping a query string (e.g. Azure's ``api-version``)."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/")
    return {
        endpoint: URL(urlunsplit((parts.scheme, parts.netloc, f"{path}/{endpoint}", parts.query, "")))
        for endpoint in ENDPOINTS
    }


def _upstream_target(upstream: Upstream) -> UpstreamTarget:
    headers = {"content-type": "application/json", "accept-encoding": "gzip, deflate"}
    headers.update({str(k): str(v) for k, v in (upstream.extra_headers or {}).items()})
    api_key = upstream.api_key
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return UpstreamTarget(
        id=upstream.pk,
        name=upstream.name,
        kind=upstream.kind,
        timeout_s=upstream.timeout_s,
        max_retries=upstream.max_retries,
        headers=CIMultiDict(headers),
        urls=_endpoint_urls(upstream.base_url) if upstream.base_url else {},
        # Non-streamed calls must finish within timeout_s; a stream may last longer but no gap may exceed it.
        timeout=aiohttp.ClientTimeout(total=upstream.timeout_s, sock_connect=settings.PROXY_CONNECT_TIMEOUT_S),
        stream_timeout=aiohttp.ClientTimeout(
            total=None, sock_read=upstream.timeout_s, sock_connect=settings.PROXY_CONNECT_TIMEOUT_S
        ),
    )


def catalog_load() -> Catalog:
    """Build the catalog from the database (two queries)."""
    deployments: dict[int, list[DeploymentTarget]] = {}
    targets: dict[int, UpstreamTarget] = {}
    if not _rows_readers:
        raise RuntimeError("No catalog reader registered: is the proxy app installed?")
    rows, model_rows = _rows_readers[0]()
    for deployment in rows:
        upstream = deployment.upstream
        target = targets.get(upstream.pk) or targets.setdefault(upstream.pk, _upstream_target(upstream))
        deployments.setdefault(deployment.model_id, []).append(
            DeploymentTarget(
                id=deployment.pk,
                key=deployment_key(deployment.pk),
                upstream=target,
                upstream_model=deployment.upstream_model,
                weight=deployment.weight,
                breaker=BreakerPolicy(
                    failure_threshold=upstream.breaker_failure_threshold,
                    cooldown_s=upstream.breaker_cooldown_s,
                    half_open_requests=upstream.breaker_half_open_requests,
                ),
            )
        )
    models: dict[str, ModelTarget] = {}
    for model in model_rows:
        routes = tuple(deployments.get(model.pk, ()))
        models[model.name] = ModelTarget(
            name=model.name,
            deployments=routes,
            fallbacks=tuple(str(name) for name in (model.fallbacks or []) if name != model.name),
            input_price_per_1k=model.input_price_per_1k,
            output_price_per_1k=model.output_price_per_1k,
            created=int(model.created_at.timestamp()),
            balancer=Balancer(routes, model.balancer),
            rpm_limit=model.rpm_limit,
            tpm_limit=model.tpm_limit,
            output_tokens_estimate=model.output_tokens_estimate,
        )
    return Catalog(models=models)


_snapshot: SyncedSnapshot[Catalog] = SyncedSnapshot("proxy-catalog", lambda: catalog_load(), ttl=300.0)


def catalog_get() -> Catalog:
    """The current catalog (memory; database only after an invalidation or TTL)."""
    return _snapshot.get()


def catalog_get_async() -> Coroutine[Any, Any, Catalog]:
    """Like ``catalog_get`` without blocking the event loop on a miss."""
    return _snapshot.get_async()


def catalog_invalidate() -> None:
    """Drop the catalog here and, within the sync interval, on every worker."""
    _snapshot.invalidate()


def catalog_invalidate_on_commit() -> None:
    """For every write of an upstream, model or deployment, inside its transaction (the services call it).

    Bumps the catalog's generation at once, so an unreachable shared cache fails the write
    (``CacheUnavailable``, 503) instead of leaving other workers on the old catalog, and again once
    committed. Explicit rather than a ``post_save`` signal: a ``QuerySet.update()`` fires none.
    """
    _snapshot.invalidate_on_commit()
