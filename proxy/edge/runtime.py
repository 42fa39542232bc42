"""The proxy's background machinery, started and stopped by the ASGI lifespan (``ProxyConfig.ready``).

Start: the breaker and health state sync (``breaker``) and the active health checker (``health``).
Stop: those, then the pooled upstream client.
"""

from __future__ import annotations

from proxy.upstream_client import upstream_session_close


async def proxy_start() -> None:
    """Start the breaker/health sync and the health checker (filled in by the breaker issue's work)."""


async def proxy_stop() -> None:
    """Stop the background tasks, then close the upstream pool."""
    await upstream_session_close()
