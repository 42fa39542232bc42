"""The proxy's background machinery, started and stopped by the ASGI lifespan (``ProxyConfig.ready``).

Start: the breaker/health state sync (``shared_state``: Redis write-through and subscription, or a local tick
without Redis), the breaker gauge (``proxy.metrics``) and the active health checker (``health``, when
``HEALTH_CHECKS``). Stop: the checker, then the sync (this process's breaker state is forgotten with it),
then the pooled upstream client.
"""

from __future__ import annotations

from proxy.edge.breaker import breakers_forget
from proxy.edge.health import health_checker_start, health_checker_stop
from proxy.edge.shared_state import shared_start, shared_stop
from proxy.metrics import breaker_metrics_register
from proxy.upstream_client import upstream_session_close


async def proxy_start() -> None:
    """Start the breaker/health sync and the health checker."""
    breaker_metrics_register()
    await shared_start()
    await health_checker_start()


async def proxy_stop() -> None:
    """Stop the background tasks, then close the upstream pool."""
    try:
        await health_checker_stop()
        await shared_stop()
        breakers_forget()
    finally:
        await upstream_session_close()
