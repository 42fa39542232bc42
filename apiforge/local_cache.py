"""In-process caches kept coherent across worker processes through a generation counter.

The proxy's hot path reads keys and models from process memory: a dict lookup,
no network. Each ``SyncedLocalCache`` has a namespace whose *generation* lives in
the shared Django cache (Redis when ``REDIS_URL`` is set, local memory in the
embedded default). A write anywhere calls ``invalidate()``, which bumps the
generation; every process compares its generation with the shared one once per
``CACHE_SYNC_INTERVAL_S`` (default 0.5 s) and drops its entries when it
changed. So a change is seen everywhere within that interval, and the steady
state costs one small Redis GET per namespace per interval per process, not per
request. For reads on an event loop (the proxy) the comparing is done by a
poller thread, so a slow or hung Redis never stalls the loop; other readers
compare when they read.

A write must never be acknowledged while its invalidation is lost (a key revoked
through an instance that cannot reach Redis would keep working elsewhere until
the shared entries expire). Writers therefore call ``invalidate_on_commit()``
inside their transaction: it bumps the generation at once, so a shared cache that
cannot be reached fails the write (``CacheUnavailable``, answered 503) before
anything is committed, and bumps it again after the commit, so an entry another
process re-read in between is dropped too. Should the second bump fail (the cache
died within the transaction), the error still reaches the caller, who is told the
change was saved but not yet published.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

logger = logging.getLogger(__name__)

V = TypeVar("V")


class CacheUnavailable(Exception):
    """The shared cache could not be told about a write; ``committed`` says whether the write was saved."""

    def __init__(self, namespace: str, *, committed: bool) -> None:
        self.namespace = namespace
        self.committed = committed
        if committed:
            message = (
                "The change was saved, but other workers could not be told about it because the shared cache "
                "is unreachable; they may use the previous state until their cached copies expire. Retry the "
                "request once the cache is back."
            )
        else:
            message = "The change was not saved: the shared cache that tells other workers about it is unreachable."
        super().__init__(message)


_instances: weakref.WeakSet[SyncedLocalCache[object]] = weakref.WeakSet()

# The poller: one daemon thread per process that checks every namespace's generation each
# ``CACHE_SYNC_INTERVAL_S`` for the caches read on event loops, started by the first such read (after a fork too).
_poller_lock = threading.Lock()
_poller_pid = 0
_failures_logged: dict[str, float] = {}
_FAILURE_LOG_INTERVAL_S = 10.0


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _failure_log(namespace: str, exc: Exception) -> None:
    # Once per namespace per interval: a cache that stays down must not write a traceback twice a second.
    now = time.monotonic()
    if now - _failures_logged.get(namespace, -math.inf) >= _FAILURE_LOG_INTERVAL_S:
        _failures_logged[namespace] = now
        logger.warning("cache generation check failed for %s: %s: %s", namespace, type(exc).__name__, exc)


def _poll_forever() -> None:
    while True:
        interval = settings.CACHE_SYNC_INTERVAL_S
        started = time.monotonic()
        for instance in list(_instances):
            if instance._generation is not None and started - instance._checked_at >= interval:
                instance._checked_at = started
                instance._check()
        time.sleep(max(0.01, interval - (time.monotonic() - started)))


def _poller_ensure() -> None:
    global _poller_pid
    if _poller_pid == os.getpid():
        return
    with _poller_lock:
        if _poller_pid != os.getpid():
            threading.Thread(target=_poll_forever, name="cache-generation-poller", daemon=True).start()
            _poller_pid = os.getpid()


def local_caches_clear() -> None:
    """Forget every local cache's entries in this process (used between tests)."""
    for instance in list(_instances):
        instance.clear_local()


class SyncedLocalCache(Generic[V]):
    """A TTL dict whose entries vanish on every process when ``invalidate()`` is called anywhere."""

    def __init__(self, namespace: str, *, ttl: float, max_entries: int = 100_000) -> None:
        self.namespace = namespace
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, V]] = {}
        self._generation: int | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        _instances.add(self)  # type: ignore[arg-type]

    @property
    def generation_key(self) -> str:
        return f"gen:{self.namespace}"

    def _shared_generation(self) -> int:
        value = cache.get(self.generation_key)
        if value is None:
            # First use of the namespace: start it, without racing another process's bump.
            cache.add(self.generation_key, 1, timeout=None)
            value = cache.get(self.generation_key, 1)
        return int(value)

    def sync(self, *, force: bool = False) -> None:
        """Drop local entries if another process invalidated the namespace since the last look.

        Once the namespace's generation is known, on a thread running an event loop (the proxy's hot path) the
        look is the poller thread's (``_poller_ensure``): the loop never waits for the shared cache, even a hung
        one. Elsewhere, and for the first look, it is made here, at most once per ``CACHE_SYNC_INTERVAL_S``.
        """
        if not force and self._generation is not None and _on_event_loop():
            _poller_ensure()
            return  # the first look (no generation yet) is made here: shared entries are keyed by it
        now = time.monotonic()
        if not force and now - self._checked_at < settings.CACHE_SYNC_INTERVAL_S:
            return
        self._checked_at = now
        self._check()

    def _check(self) -> None:
        try:
            generation = self._shared_generation()
        except Exception as exc:
            # The shared cache is down: keep serving from memory; entries still expire by TTL.
            _failure_log(self.namespace, exc)
            return
        if generation != self._generation:
            with self._lock:
                self._entries.clear()
                self._generation = generation

    def get(self, key: str, default: V | None = None) -> V | None:
        """The cached value, or ``default`` when absent or expired."""
        self.sync()
        entry = self._entries.get(key)
        if entry is None:
            return default
        expires, value = entry
        if expires < time.monotonic():
            self._entries.pop(key, None)
            return default
        return value

    def set(self, key: str, value: V, *, ttl: float | None = None) -> None:
        if len(self._entries) >= self.max_entries:
            with self._lock:
                self._entries.clear()
        self._entries[key] = (time.monotonic() + (self.ttl if ttl is None else ttl), value)

    def _bump(self) -> int:
        try:
            return int(cache.incr(self.generation_key))
        except ValueError:
            cache.add(self.generation_key, 1, timeout=None)
            return int(cache.incr(self.generation_key))

    def invalidate(self, *, strict: bool = False) -> None:
        """Drop every entry here now, and on every other process within the sync interval.

        With ``strict``, a shared cache that cannot be reached raises ``CacheUnavailable`` (after the local
        entries are dropped) instead of being logged and ignored.
        """
        failure: Exception | None = None
        try:
            generation: int | None = self._bump()
        except Exception as exc:
            if not strict:
                logger.warning("cache generation bump failed for %s", self.namespace, exc_info=True)
            generation, failure = None, exc
        with self._lock:
            self._entries.clear()
            self._generation = generation
            self._checked_at = time.monotonic()
        if strict and failure is not None:
            raise CacheUnavailable(self.namespace, committed=False) from failure

    def invalidate_on_commit(self, after_commit: Callable[[], None] | None = None) -> None:
        """For writers inside a transaction: publish now (or fail the write), and again once committed.

        ``after_commit`` replaces the plain post-commit bump (e.g. to also delete shared entries); it must end
        with ``invalidate(strict=True)``.
        """
        self.invalidate(strict=True)

        def publish() -> None:
            try:
                (after_commit or partial(self.invalidate, strict=True))()
            except CacheUnavailable as exc:
                logger.warning("invalidation of %s after commit failed: cache unreachable", self.namespace)
                raise CacheUnavailable(self.namespace, committed=True) from exc

        transaction.on_commit(publish)

    def clear_local(self) -> None:
        """Forget everything in this process only (tests, shutdown)."""
        with self._lock:
            self._entries.clear()
            self._generation = None
            self._checked_at = 0.0


class SyncedSnapshot(Generic[V]):
    """One value loaded whole by ``load`` (a routing catalog), kept in a ``SyncedLocalCache`` of its own: read
    from memory, loaded again after an invalidation anywhere or the TTL (``get_async`` off the event loop)."""

    _KEY = "snapshot"

    def __init__(self, namespace: str, load: Callable[[], V], *, ttl: float) -> None:
        self.cache: SyncedLocalCache[V] = SyncedLocalCache(namespace, ttl=ttl)
        self.load = load

    def get(self) -> V:
        value = self.cache.get(self._KEY)
        if value is None:
            value = self.load()
            self.cache.set(self._KEY, value)
        return value

    async def get_async(self) -> V:
        value = self.cache.get(self._KEY)
        if value is None:
            value = await self.reload_async()
        return value

    async def reload_async(self) -> V:
        """Load it now in this process only (no invalidation elsewhere)."""
        from asgiref.sync import sync_to_async

        value = await sync_to_async(self.load)()
        self.cache.set(self._KEY, value)
        return value

    def invalidate(self) -> None:
        self.cache.invalidate()

    def invalidate_on_commit(self) -> None:
        self.cache.invalidate_on_commit()
