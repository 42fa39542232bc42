"""Active health checks of route targets: one asyncio task per worker process, started by the lifespan.

Every route with a ``health_check`` (``HealthCheck``: path, interval, timeout, thresholds) has each of its
targets (drained ones excepted) probed with ``GET {target.url}{path}`` every ``interval_s``: a 2xx or 3xx
within ``timeout_s`` is a success, anything else (another status, a refused connection, a timeout) a failure.
``unhealthy`` failures in a row mark the target unhealthy, ``healthy`` successes in a row bring it back (a
target never checked is "unknown" and goes by its stored health). The balancer skips unhealthy targets
unless all are (``proxy.edge.balance``); the breakers are the passive checks.

With Redis, the workers share the work and the verdicts: before each probe a worker takes the target's lock
for the interval (``SET NX PX``), so one worker probes each target per interval across all workers and
machines; the result is counted in the target's shared record and a change of verdict is published to every
worker (``proxy.edge.shared_state``). Without Redis the one process probes and counts alone. Verdicts are
runtime state only: nothing is written to the database.

The route list comes from the gateway catalog (``gateway_get_async``), re-read every ``ROUTES_REFRESH_S``.
A dead target is the checks' business, not an error: verdict changes are logged at WARNING, nothing at ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp
from django.conf import settings

from proxy.edge import breaker
from proxy.edge.shared_state import shared_sync
from proxy.gateway_catalog import HealthCheck, gateway_get_async

logger = logging.getLogger(__name__)

# How often the checker re-reads which targets to probe (route changes reach it within this).
ROUTES_REFRESH_S = 5.0
# Probes in flight at once, per worker.
MAX_CONCURRENT_PROBES = 32


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    key: str
    url: str
    check: HealthCheck


@dataclass(slots=True)
class _Counts:
    """Consecutive results of one target (the process's own, without Redis)."""

    successes: int = 0
    failures: int = 0


class HealthChecker:
    """The per-process checker (``health_checker_start`` / ``health_checker_stop``)."""

    def __init__(self) -> None:
        self.targets: list[ProbeTarget] = []
        self.due: dict[str, float] = {}
        self.counts: dict[str, _Counts] = {}
        self.probing: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task[None] | None = None
        self.limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self.refresh_failed = False

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="health-checker")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def refresh(self) -> None:
        try:
            gateway = await gateway_get_async()
        except Exception as exc:  # the database is down: keep probing the targets known so far
            if not self.refresh_failed:
                logger.warning("health checks: could not read the routes (%s: %s)", type(exc).__name__, exc)
            self.refresh_failed = True
            return
        self.refresh_failed = False
        targets = [
            ProbeTarget(key=target.key, url=target.url, check=route.health_check)
            for route in gateway.routes
            if route.health_check is not None
            for target in route.targets
            if not target.drained
        ]
        keys = {target.key for target in targets}
        for key in set(self.due) - keys:
            self.due.pop(key, None)
            self.counts.pop(key, None)
        self.targets = targets
        # A target no longer checked (its route's check removed, drained, deleted) keeps no verdict.
        stale = sorted(key for key in breaker.health_keys() - keys if key.startswith(breaker.ROUTE_TARGET_KEY_PREFIX))
        for key in stale:
            breaker.health_note(key, None)
        sync = shared_sync()
        if stale and sync is not None:
            try:
                await sync.health_forget(stale)
            except Exception:  # noqa: S110 - Redis unreachable: the next refresh tries again (the sync logs it)
                pass

    async def run(self) -> None:
        next_refresh = 0.0
        while True:
            now = time.monotonic()
            if now >= next_refresh:
                await self.refresh()
                next_refresh = time.monotonic() + ROUTES_REFRESH_S
                now = time.monotonic()
            wake_at = next_refresh
            for target in self.targets:
                due = self.due.get(target.key, 0.0)
                if due <= now and target.key not in self.probing:
                    self.due[target.key] = due = now + max(target.check.interval_s, 0.05)
                    self.probing.add(target.key)
                    task = asyncio.create_task(self.probe(target))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                wake_at = min(wake_at, due)
            await asyncio.sleep(max(wake_at - time.monotonic(), 0.01))

    async def probe(self, target: ProbeTarget) -> None:
        try:
            async with self.limit:
                sync = shared_sync()
                check = target.check
                try:
                    if sync is not None and not await sync.health_claim(target.key, check.interval_s * 0.9):
                        return  # another worker probes it this interval
                except Exception:
                    sync = None  # Redis unreachable: probe and count here (the sync logs the outage)
                ok = await self.call(target)
                if sync is not None:
                    try:
                        verdict = await sync.health_report(target.key, ok, check.healthy, check.unhealthy)
                    except Exception:  # noqa: S110 - counted locally below; the sync logs the outage
                        pass
                    else:
                        if verdict is not None:
                            health_changed(target.key, *verdict)
                        return
                self.count(target, ok)
        finally:
            self.probing.discard(target.key)

    async def call(self, target: ProbeTarget) -> bool:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONCURRENT_PROBES, force_close=True),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
            )
        timeout = aiohttp.ClientTimeout(total=target.check.timeout_s, sock_connect=target.check.timeout_s)
        try:
            async with self.session.get(
                target.url + target.check.path,
                timeout=timeout,
                allow_redirects=False,
                headers={"user-agent": "apiforge-health-check"},
            ) as response:
                await response.read()
                return 200 <= response.status < 400
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return False

    def count(self, target: ProbeTarget, ok: bool) -> None:
        counts = self.counts.setdefault(target.key, _Counts())
        current = breaker.health_view(target.key)
        if ok:
            counts.successes += 1
            counts.failures = 0
            healthy = current == breaker.UNKNOWN or counts.successes >= max(target.check.healthy, 1)
            if healthy and current != breaker.HEALTHY:
                health_changed(target.key, True, before=_verdict(current))
        else:
            counts.failures += 1
            counts.successes = 0
            if current != breaker.UNHEALTHY and counts.failures >= max(target.check.unhealthy, 1):
                health_changed(target.key, False, before=_verdict(current))


def health_changed(key: str, healthy: bool, version: int = 0, before: bool | None = None) -> None:
    """Note a verdict reached by a probe of this process (``before``: the verdict it replaces); a target going
    down, or coming back, is logged once, by the prober that saw it."""
    breaker.health_note(key, healthy, version)
    if healthy != before and (not healthy or before is False):
        logger.warning("health check: target %s is now %s", key, "healthy" if healthy else "unhealthy")


def _verdict(view: str) -> bool | None:
    return None if view == breaker.UNKNOWN else view == breaker.HEALTHY


_checker: list[HealthChecker] = []


async def health_checker_start() -> None:
    """Start the checker in this process when ``HEALTH_CHECKS`` is on (the lifespan; once per process). A checker
    left behind by a server whose loop has closed without its shutdown (a forced exit) is replaced."""
    if not settings.HEALTH_CHECKS:
        return
    if _checker and not (_checker[0].task is not None and _checker[0].task.get_loop().is_closed()):
        return
    _checker.clear()
    checker = HealthChecker()
    _checker.append(checker)
    checker.start()


async def health_checker_stop() -> None:
    """Stop the checker and its probes (the lifespan), if it runs on this event loop."""
    if not _checker:
        return
    checker = _checker[0]
    if checker.task is not None and checker.task.get_loop() is not asyncio.get_running_loop():
        return
    _checker.clear()
    await checker.stop()
