"""Key verification, the one entry point the proxy calls: a presented secret and client IP -> ``KeyPolicy``.

Lookup order: the process's memory (``SyncedLocalCache``), then the shared cache
(Redis when configured), then the database. A hit in memory costs an HMAC, two
dict lookups and a few comparisons: no I/O, no thread hop, so ``key_verify_async``
answers it without suspending. Everything a refusal needs (revoked, disabled,
expiry, IP networks, the end of a rotation grace period) is in the cached entry,
so refusals come from memory too; expiry is compared per request, so a key never
outlives its ``expires_at`` because of caching.

Coherence: every write to a key calls ``key_cache_invalidate_on_commit`` in its
transaction: the write fails (503) when the shared cache cannot be told, and after
the commit the shared entries are deleted and the namespace generation bumped, so every process
drops its memory within ``CACHE_SYNC_INTERVAL_S``. Shared entries are stored under
the generation the reader saw before it read the database, so a reader racing a
write can never park a stale entry where later readers would find it.

Unknown digests are remembered for a few seconds (in memory and in the shared
cache) so a flood of one bad key does not reach the database; they live in their
own cache so a flood of many bad keys cannot push good keys out.

A key can also be looked up by its id (``key_verify_by_id_async``), for credentials bound to a key rather than
carrying its secret (the admin Playground's tokens, ``keys.playground``): the same caches, under ``id:<key id>``
next to the digests, the same coherence (the generation bump drops them too) and the same refusals.

``key_usage_touch`` only notes "used now" in memory; ``keys.services.key_usage_flush``
writes ``last_used_at`` off the request path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from functools import partial
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache import cache

from apiforge.local_cache import SyncedLocalCache
from keys.exceptions import KeyRefused, RefusalReason
from keys.hashing import key_digest, key_secret_plausible
from keys.policy import KeyPolicy, KeyRecord, KeyStateRefusal

__all__ = [
    "KeyPolicy",
    "KeyRefused",
    "KeyVerifier",
    "RefusalReason",
    "key_cache_invalidate",
    "key_cache_invalidate_on_commit",
    "key_usage_drain",
    "key_usage_touch",
    "key_verify",
    "key_verify_async",
    "key_verify_by_id_async",
]

logger = logging.getLogger(__name__)

# Reads the verification record for a digest from the database (``keys.selectors.key_record_by_digest``,
# registered by ``KeysConfig.ready()``). Plugged in rather than imported so that this module, which the
# proxy's hot path imports, links no ORM model, selector or DRF code, as the hot-path contract requires.
KeyRecordReader = Callable[[str], "KeyRecord | None"]
_record_readers: list[KeyRecordReader] = []


def key_record_reader_register(reader: KeyRecordReader) -> None:
    """Make ``reader`` (digest -> record or None) what a cache miss reads; a later call replaces it."""
    _record_readers[:] = [reader]


def key_record_by_digest(*, digest: str) -> KeyRecord | None:
    """The record for ``digest`` from the database, through the registered reader."""
    if not _record_readers:
        raise RuntimeError("No key record reader registered: is the keys app installed?")
    return _record_readers[0](digest)


# The same for a key id (``keys.selectors.key_record_by_id``), for ``key_verify_by_id_async``.
KeyRecordByIdReader = Callable[[int], "KeyRecord | None"]
_record_by_id_readers: list[KeyRecordByIdReader] = []


def key_record_by_id_reader_register(reader: KeyRecordByIdReader) -> None:
    """Make ``reader`` (key id -> record or None) what a cache miss by key id reads; a later call replaces it."""
    _record_by_id_readers[:] = [reader]


def key_record_by_id(*, key_id: int) -> KeyRecord | None:
    """The record of the key ``key_id`` from the database, through the registered reader."""
    if not _record_by_id_readers:
        raise RuntimeError("No key record reader registered: is the keys app installed?")
    return _record_by_id_readers[0](key_id)


# Cache entries looked up by key id are named ``id:<key id>``; a digest is hex, so the two never meet.
_BY_ID = "id:"


# An allowlisted network as (IP version, network address, netmask) integers; a client address as (version, int).
_Network = tuple[int, int, int]
_Address = tuple[int, int]

# Wire format of a shared-cache entry: a flat tuple of primitives (``_UNKNOWN_WIRE`` for "no such
# key"). The version is part of the cache key, so a deploy that changes the tuple starts afresh.
_WIRE_VERSION = "v2"
_UNKNOWN_WIRE = 0


class _Entry:
    """What memory holds per digest: the record, with networks parsed once. ``policy`` None = unknown."""

    __slots__ = ("expires_at", "networks", "policy", "refusal", "valid_until")

    def __init__(
        self,
        policy: KeyPolicy | None,
        refusal: KeyStateRefusal = "",
        expires_at: float | None = None,
        valid_until: float | None = None,
        networks: tuple[_Network, ...] = (),
    ) -> None:
        self.policy = policy
        self.refusal = refusal
        self.expires_at = expires_at
        self.valid_until = valid_until
        self.networks = networks


_UNKNOWN = _Entry(None)


def _entry_from_record(record: KeyRecord | None) -> _Entry:
    if record is None:
        return _UNKNOWN
    return _Entry(
        record.policy,
        record.refusal,
        record.expires_at,
        record.valid_until,
        tuple(_network(cidr) for cidr in record.ip_allowlist),
    )


def _wire_from_record(record: KeyRecord | None) -> tuple[Any, ...] | int:
    if record is None:
        return _UNKNOWN_WIRE
    p = record.policy
    return (
        p.key_id,
        p.owner_id,
        p.prefix,
        p.name,
        tuple(sorted(p.allowed_models)),
        tuple(sorted(p.allowed_routes)),
        p.rpm_limit,
        p.tpm_limit,
        p.max_concurrency,
        p.budget_tokens,
        None if p.budget_cost is None else str(p.budget_cost),
        p.budget_period,
        p.user_rpm_limit,
        None if p.user_budget_cost is None else str(p.user_budget_cost),
        p.user_budget_period,
        record.refusal,
        record.expires_at,
        record.valid_until,
        record.ip_allowlist,
    )


def _record_from_wire(wire: tuple[Any, ...] | int) -> KeyRecord | None:
    if not isinstance(wire, tuple):
        return None
    (key_id, owner_id, prefix, name, models, routes, rpm, tpm, concurrency, tokens, cost, period) = wire[:12]
    user_rpm, user_cost, user_period, refusal, expires_at, valid_until, ip_allowlist = wire[12:]
    policy = KeyPolicy(
        key_id=key_id,
        owner_id=owner_id,
        prefix=prefix,
        name=name,
        allowed_models=frozenset(models),
        allowed_routes=frozenset(routes),
        rpm_limit=rpm,
        tpm_limit=tpm,
        max_concurrency=concurrency,
        budget_tokens=tokens,
        budget_cost=None if cost is None else Decimal(cost),
        budget_period=period,
        user_rpm_limit=user_rpm,
        user_budget_cost=None if user_cost is None else Decimal(user_cost),
        user_budget_period=user_period,
    )
    return KeyRecord(
        policy=policy, refusal=refusal, expires_at=expires_at, valid_until=valid_until, ip_allowlist=ip_allowlist
    )


def _network(cidr: str) -> _Network:
    network = ipaddress.ip_network(cidr, strict=False)
    return network.version, int(network.network_address), int(network.netmask)


def _client_address(client_ip: str) -> tuple[_Address, ...]:
    """The client's address as (version, integer) pairs: an IPv4 client seen as ::ffff:a.b.c.d gives both forms.

    ``inet_pton`` rather than ``ipaddress.ip_address``: several times faster, and this runs per request.
    """
    try:
        if ":" in client_ip:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, client_ip.split("%", 1)[0]), "big")
            if value >> 32 == 0xFFFF:  # IPv4-mapped, as a dual-stack socket reports IPv4 clients
                return (4, value & 0xFFFFFFFF), (6, value)
            return ((6, value),)
        return ((4, int.from_bytes(socket.inet_pton(socket.AF_INET, client_ip), "big")),)
    except (OSError, ValueError):
        return ()


def _ip_allowed(networks: tuple[_Network, ...], client_ip: str | None) -> bool:
    if not client_ip:
        return False
    for version, value in _client_address(client_ip):
        for net_version, net_address, net_mask in networks:
            if version == net_version and value & net_mask == net_address:
                return True
    return False


class _EntryCache(SyncedLocalCache[_Entry]):
    @property
    def generation(self) -> int | None:
        """The shared generation this process last saw (None before the first look)."""
        return self._generation


class KeyVerifier:
    """Verifies secrets against memory, then the shared cache, then the database.

    The module keeps one default instance behind ``key_verify``/``key_verify_async``;
    more instances (same namespace) behave like further worker processes, which is
    how the tests show that an invalidation reaches every process.
    """

    def __init__(
        self,
        *,
        namespace: str = "keys",
        local_ttl: float = 60.0,
        shared_ttl: float = 300.0,
        unknown_ttl: float = 5.0,
    ) -> None:
        self.namespace = namespace
        self.shared_ttl = shared_ttl
        self.unknown_ttl = unknown_ttl
        self._known = _EntryCache(namespace, ttl=local_ttl)
        # Unknown digests live apart, so many distinct bad keys cannot evict the good ones. They need no
        # invalidation: a write never gives an existing digest to a key (new secrets are fresh).
        self._unknown: SyncedLocalCache[_Entry] = SyncedLocalCache(f"{namespace}:unknown", ttl=unknown_ttl)
        self._inflight: dict[str, asyncio.Future[_Entry]] = {}
        self._load_in_thread = sync_to_async(self._load)

    # --- verification -----------------------------------------------------------------------
    def verify(self, secret: str, client_ip: str | None) -> KeyPolicy:
        """The policy of the key ``secret`` belongs to, or ``KeyRefused`` (sync callers)."""
        if not key_secret_plausible(secret):
            raise KeyRefused("unknown")
        digest = key_digest(secret)
        entry = self._known.get(digest) or self._unknown.get(digest) or self._load(digest)
        return self._check(entry, client_ip)

    async def verify_async(self, secret: str, client_ip: str | None) -> KeyPolicy:
        """As ``verify``; a hit in memory completes without suspending, a miss loads in a worker thread."""
        if not key_secret_plausible(secret):
            raise KeyRefused("unknown")
        digest = key_digest(secret)
        entry = self._known.get(digest) or self._unknown.get(digest)
        if entry is None:
            entry = await self._load_async(digest)
        return self._check(entry, client_ip)

    async def verify_by_id_async(self, key_id: int, client_ip: str | None) -> KeyPolicy:
        """The policy of the key ``key_id``, or ``KeyRefused``, with every check ``verify_async`` makes
        (revoked, disabled, expired, IP allowlist). For credentials already bound to a key (playground
        tokens), never for a presented secret."""
        name = f"{_BY_ID}{key_id}"
        entry = self._known.get(name) or self._unknown.get(name)
        if entry is None:
            entry = await self._load_async(name)
        return self._check(entry, client_ip)

    @staticmethod
    def _check(entry: _Entry, client_ip: str | None) -> KeyPolicy:
        policy = entry.policy
        if policy is None:
            raise KeyRefused("unknown")
        now = time.time()
        if entry.valid_until is not None and now >= entry.valid_until:
            raise KeyRefused("unknown")  # an old secret after its rotation grace period
        if entry.refusal:
            raise KeyRefused(entry.refusal, policy)
        if entry.expires_at is not None and now >= entry.expires_at:
            raise KeyRefused("expired", policy)
        if entry.networks and not _ip_allowed(entry.networks, client_ip):
            raise KeyRefused("ip_not_allowed", policy)
        return policy

    # --- loading -------------------------------------------------------------------------------
    def _shared_key(self, digest: str, generation: int | None) -> str:
        return f"{self.namespace}:{_WIRE_VERSION}:{generation}:{digest}"

    def _load(self, digest: str) -> _Entry:
        """Shared cache, else database; remembers the answer at the generation seen before reading.

        ``digest`` may also be ``id:<key id>`` (``verify_by_id_async``): then the database is read by key id.
        """
        generation = self._known.generation
        shared_key = self._shared_key(digest, generation)
        wire: tuple[Any, ...] | int | None
        try:
            wire = cache.get(shared_key)
        except Exception:
            logger.warning("shared key cache unavailable; reading the database", exc_info=True)
            wire = None
        if wire is None:
            if digest.startswith(_BY_ID):
                record = key_record_by_id(key_id=int(digest.removeprefix(_BY_ID)))
            else:
                record = key_record_by_digest(digest=digest)
            entry = _entry_from_record(record)
            try:
                cache.set(
                    shared_key,
                    _wire_from_record(record),
                    timeout=self.unknown_ttl if record is None else self.shared_ttl,
                )
            except Exception:
                logger.warning("shared key cache unavailable; entry not shared", exc_info=True)
        else:
            entry = _entry_from_record(_record_from_wire(wire))
        if entry.policy is None:
            self._unknown.set(digest, entry)
        elif self._known.generation == generation:
            # Otherwise an invalidation arrived while we read: the entry may be stale, so only use it once.
            self._known.set(digest, entry)
        return entry

    async def _load_async(self, digest: str) -> _Entry:
        """One load per digest at a time: concurrent misses for the same key wait for the same thread call."""
        loop = asyncio.get_running_loop()
        future = self._inflight.get(digest)
        if future is None or future.get_loop() is not loop:
            future = loop.create_task(self._load_in_thread(digest))
            self._inflight[digest] = future
            future.add_done_callback(partial(self._inflight_done, digest))
        return await asyncio.shield(future)

    def _inflight_done(self, digest: str, future: asyncio.Future[_Entry]) -> None:
        if self._inflight.get(digest) is future:
            del self._inflight[digest]
        if not future.cancelled():
            future.exception()  # retrieved here, so an error seen by no waiter is not reported as lost

    # --- invalidation ----------------------------------------------------------------------------
    def invalidate(self, digests: Iterable[str], *, strict: bool = False) -> None:
        """Forget these digests in the shared cache and everything in every process's memory.

        With ``strict``, an unreachable shared cache raises ``CacheUnavailable`` (see ``invalidate_on_commit``).
        """
        generation = self._known.generation
        shared_keys = [self._shared_key(digest, generation) for digest in digests if digest]
        if shared_keys:
            try:
                cache.delete_many(shared_keys)
            except Exception:
                logger.warning("shared key cache unavailable; entries left to the generation bump", exc_info=True)
        self._known.invalidate(strict=strict)

    def invalidate_on_commit(self, digests: Iterable[str | None]) -> None:
        """For key writes, inside their transaction: fail the write now if the invalidation cannot be
        published (``CacheUnavailable``), and publish it again once the write is committed."""
        kept = tuple(digest for digest in digests if digest)
        self._known.invalidate_on_commit(partial(self.invalidate, kept, strict=True))


_default = KeyVerifier()

# The proxy's entry points are the default instance's bound methods: no extra call layer on the hot path.
key_verify = _default.verify
key_verify_async = _default.verify_async
key_verify_by_id_async = _default.verify_by_id_async
key_cache_invalidate = _default.invalidate
key_cache_invalidate_on_commit = _default.invalidate_on_commit


# --- last_used_at, off the request path ------------------------------------------------------------
_usage_lock = threading.Lock()
_usage_pending: dict[int, float] = {}


def key_usage_touch(key_id: int) -> None:
    """Note that ``key_id`` was used now (memory only; ``key_usage_flush`` writes it to the database)."""
    now = time.time()
    with _usage_lock:
        _usage_pending[key_id] = now


def key_usage_drain() -> dict[int, float]:
    """Take the noted uses (key id -> epoch seconds of the latest use) and start a fresh record."""
    global _usage_pending
    with _usage_lock:
        pending, _usage_pending = _usage_pending, {}
    return pending


def key_usage_restore(pending: dict[int, float]) -> None:
    """Put back uses a flush could not write, keeping any newer use noted since."""
    with _usage_lock:
        for key_id, used_at in pending.items():
            if _usage_pending.get(key_id, 0.0) < used_at:
                _usage_pending[key_id] = used_at
