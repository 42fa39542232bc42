"""Key verification: refusal reasons, IP allowlists, rotation grace, caching layers and cross-process invalidation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import connection, connections
from django.utils import timezone

import keys.verification
from keys.exceptions import KeyRefused
from keys.hashing import key_secret_generate
from keys.services import key_disable, key_rotate, key_update
from keys.verification import KeyPolicy, KeyVerifier, key_cache_invalidate, key_verify, key_verify_async
from tests.factories import ApiKeyFactory

pytestmark = pytest.mark.django_db

REPO_ROOT = Path(__file__).resolve().parents[2]


def _reason(verify, secret: str, ip: str | None = None) -> str:
    with pytest.raises(KeyRefused) as refused:
        verify(secret, ip)
    message = str(refused.value)  # what the proxy shows the client: never the secret
    assert message
    assert len(secret) < 8 or secret[4:] not in message
    return refused.value.reason


# --- the policy ------------------------------------------------------------------------------------
def test_an_active_key_yields_its_policy(public_models):
    key = ApiKeyFactory(allowed_models=["gpt-4o"], rpm_limit=60, tpm_limit=1000, budget_cost="2.5", budget_period="day")

    policy = key_verify(key.secret, "203.0.113.9")

    assert isinstance(policy, KeyPolicy)
    assert (policy.key_id, policy.owner_id, policy.prefix, policy.name) == (key.pk, key.owner_id, key.prefix, key.name)
    assert (policy.rpm_limit, policy.tpm_limit, policy.budget_period) == (60, 1000, "day")
    assert str(policy.budget_cost) == "2.500000"
    assert policy.allows_model("gpt-4o")
    assert not policy.allows_model("gpt-4o-mini")
    assert policy.allows_route("anything")  # empty = all


def test_a_policy_loaded_from_the_shared_cache_equals_the_one_from_the_database():
    key = ApiKeyFactory(allowed_models=["a", "b"], allowed_routes=["r"], budget_cost="1.25", ip_allowlist=["::/0"])
    from_db = KeyVerifier().verify(key.secret, "2001:db8::1")

    from_shared = KeyVerifier().verify(key.secret, "2001:db8::1")  # fresh memory, same shared cache

    assert from_shared == from_db


# --- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("secret", ["", "afk-", "Bearer afk-x", "sk-" + "a" * 40, "afk-" + "a" * 200])
def test_malformed_secrets_are_unknown_without_touching_the_database(secret, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert _reason(key_verify, secret) == "unknown"


def test_an_unknown_secret_is_refused_and_cached_negatively(django_assert_num_queries):
    secret = key_secret_generate()
    assert _reason(key_verify, secret) == "unknown"

    with django_assert_num_queries(0):
        for _ in range(50):
            assert _reason(key_verify, secret) == "unknown"


def test_a_disabled_key_is_refused_as_inactive():
    key = ApiKeyFactory(is_active=False)
    assert _reason(key_verify, key.secret) == "inactive"


def test_a_key_of_a_deactivated_user_is_refused_as_inactive(run_on_commit):
    key = ApiKeyFactory()
    key_verify(key.secret, None)

    with run_on_commit():
        key.owner.is_active = False
        key.owner.save()

    assert _reason(key_verify, key.secret) == "inactive"


def test_a_revoked_key_is_refused_as_revoked():
    key = ApiKeyFactory(is_active=False, revoked_at=timezone.now())
    assert _reason(key_verify, key.secret) == "revoked"


def test_an_expired_key_is_refused_as_expired():
    key = ApiKeyFactory(expires_at=timezone.now() - timedelta(seconds=1))
    assert _reason(key_verify, key.secret) == "expired"


def test_a_cached_key_expires_on_time_without_a_database_query(django_assert_num_queries):
    key = ApiKeyFactory(expires_at=timezone.now() + timedelta(seconds=1))
    key_verify(key.secret, None)

    time.sleep(max(0.0, key.expires_at.timestamp() - time.time()) + 0.05)

    with django_assert_num_queries(0):
        assert _reason(key_verify, key.secret) == "expired"


def test_refusals_come_from_the_cache_too(django_assert_num_queries):
    revoked = ApiKeyFactory(is_active=False, revoked_at=timezone.now())
    disabled = ApiKeyFactory(is_active=False)
    _reason(key_verify, revoked.secret)
    _reason(key_verify, disabled.secret)

    with django_assert_num_queries(0):
        assert _reason(key_verify, revoked.secret) == "revoked"
        assert _reason(key_verify, disabled.secret) == "inactive"


# --- IP allowlist -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("allowlist", "ip", "allowed"),
    [
        (["192.0.2.0/24"], "192.0.2.77", True),
        (["192.0.2.0/24"], "192.0.3.1", False),
        (["192.0.2.10"], "192.0.2.10", True),
        (["192.0.2.10"], "192.0.2.11", False),
        (["2001:db8::/32"], "2001:db8:1::5", True),
        (["2001:db8::/32"], "2001:db9::5", False),
        (["2001:db8::/32", "10.0.0.0/8"], "10.20.30.40", True),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),  # IPv4 client seen through a dual-stack socket
        (["::ffff:10.0.0.0/104"], "::ffff:10.1.2.3", True),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["0.0.0.0/0"], "203.0.113.5", True),
        (["::/0"], "203.0.113.5", False),
        (["10.0.0.0/8"], "2001:db8::1", False),
        (["2001:db8::/32"], "10.1.2.3", False),
        (["10.0.0.0/8"], None, False),
        (["10.0.0.0/8"], "not-an-ip", False),
        ([], None, True),
    ],
)
def test_the_ip_allowlist_allows_and_refuses_ipv4_and_ipv6(allowlist, ip, allowed):
    key = ApiKeyFactory(ip_allowlist=allowlist)

    if allowed:
        assert key_verify(key.secret, ip).key_id == key.pk
    else:
        assert _reason(key_verify, key.secret, ip) == "ip_not_allowed"


def test_ip_refusals_are_decided_per_request_from_one_cached_entry(django_assert_num_queries):
    key = ApiKeyFactory(ip_allowlist=["198.51.100.0/24"])
    key_verify(key.secret, "198.51.100.1")

    with django_assert_num_queries(0):
        assert _reason(key_verify, key.secret, "203.0.113.1") == "ip_not_allowed"
        assert key_verify(key.secret, "198.51.100.200").key_id == key.pk


# --- rotation ----------------------------------------------------------------------------------------
def test_rotation_without_grace_stops_the_old_secret_at_once(run_on_commit):
    key = ApiKeyFactory()
    key_verify(key.secret, None)

    with run_on_commit():
        issued = key_rotate(key=key, grace_seconds=0)

    assert _reason(key_verify, key.secret) == "unknown"
    assert key_verify(issued.secret, None).key_id == key.pk


def test_rotation_with_grace_keeps_the_old_secret_until_the_deadline(run_on_commit, django_assert_num_queries):
    key = ApiKeyFactory(rpm_limit=7)
    key_verify(key.secret, None)

    with run_on_commit():
        issued = key_rotate(key=key, grace_seconds=1)

    assert key_verify(key.secret, None).rpm_limit == 7
    assert key_verify(issued.secret, None).key_id == key.pk
    time.sleep(1.05)
    with django_assert_num_queries(0):  # the deadline is in the cached entry
        assert _reason(key_verify, key.secret) == "unknown"
    assert _reason(KeyVerifier().verify, key.secret) == "unknown"  # and for a process that never saw it
    assert key_verify(issued.secret, None).key_id == key.pk


def test_a_second_rotation_ends_the_first_grace_period(run_on_commit):
    key = ApiKeyFactory()
    with run_on_commit():
        second = key_rotate(key=key, grace_seconds=3600)
        third = key_rotate(key=key, grace_seconds=3600)

    assert _reason(key_verify, key.secret) == "unknown"
    assert key_verify(second.secret, None).key_id == key.pk
    assert key_verify(third.secret, None).key_id == key.pk


def test_disabling_a_key_also_stops_its_old_secret_in_grace(run_on_commit):
    key = ApiKeyFactory()
    with run_on_commit():
        key_rotate(key=key, grace_seconds=3600)
        key_disable(key=key)

    assert _reason(key_verify, key.secret) == "inactive"


# --- caching -------------------------------------------------------------------------------------------
def test_a_hundred_verifications_of_one_key_query_the_database_once(django_assert_num_queries):
    key = ApiKeyFactory()

    with django_assert_num_queries(1):
        key_verify(key.secret, None)
    with django_assert_num_queries(0):
        for _ in range(99):
            assert key_verify(key.secret, None).key_id == key.pk


def test_another_process_finds_the_entry_in_the_shared_cache(django_assert_num_queries):
    key = ApiKeyFactory()
    KeyVerifier().verify(key.secret, None)

    with django_assert_num_queries(0):
        assert KeyVerifier().verify(key.secret, None).key_id == key.pk


def test_an_edit_is_seen_at_once_by_the_writing_process(run_on_commit):
    key = ApiKeyFactory(rpm_limit=1)
    assert key_verify(key.secret, None).rpm_limit == 1

    with run_on_commit():
        key_update(key=key, changes={"rpm_limit": 2})

    assert key_verify(key.secret, None).rpm_limit == 2


def test_a_write_publishes_its_invalidation_before_and_after_it_commits(django_capture_on_commit_callbacks):
    """Before: so an unreachable cache fails the write instead of losing it. After: so a worker that re-read the
    old row in between drops it again."""
    key = ApiKeyFactory()
    key_verify(key.secret, None)
    generation_key = "gen:keys"
    before = cache.get(generation_key)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        key_disable(key=key)

    assert cache.get(generation_key) == before + 1
    # The other callback publishes the write's audit event on the event bus.
    (publish,) = [callback for callback in callbacks if "invalidate_on_commit" in callback.__qualname__]
    publish()
    assert cache.get(generation_key) == before + 2
    assert _reason(key_verify, key.secret) == "inactive"


def test_a_load_racing_an_invalidation_is_not_kept(monkeypatch):
    """A reader that read the database just before a write committed must not park its stale answer."""
    key = ApiKeyFactory()
    verifier = KeyVerifier()
    reads = []
    real_read = keys.verification.key_record_by_digest

    def read_then_a_write_commits(*, digest: str):
        record = real_read(digest=digest)
        reads.append(digest)
        if len(reads) == 1:
            key_cache_invalidate([])  # a write commits elsewhere while we read...
            verifier._known.sync(force=True)  # ...and another request on this process has noticed it
        return record

    monkeypatch.setattr(keys.verification, "key_record_by_digest", read_then_a_write_commits)
    verifier.verify(key.secret, None)
    assert len(reads) == 1
    verifier.verify(key.secret, None)
    assert len(reads) == 2  # neither memory nor the shared cache kept the racing read
    verifier.verify(key.secret, None)
    KeyVerifier().verify(key.secret, None)
    assert len(reads) == 2  # the next read was kept in both


def test_many_distinct_bad_keys_do_not_push_good_keys_out_of_memory(django_assert_num_queries):
    key = ApiKeyFactory()
    verifier = KeyVerifier()
    verifier._unknown.max_entries = 10
    verifier.verify(key.secret, None)
    for _ in range(25):
        _reason(verifier.verify, key_secret_generate())

    with django_assert_num_queries(0):
        assert verifier.verify(key.secret, None).key_id == key.pk


# --- async ----------------------------------------------------------------------------------------------
def test_an_async_cache_hit_completes_without_suspending():
    """No await on I/O and no thread hop: the coroutine finishes on its first step."""
    key = ApiKeyFactory()
    expected = key_verify(key.secret, "192.0.2.1")

    coroutine = key_verify_async(key.secret, "192.0.2.1")
    with pytest.raises(StopIteration) as finished:
        coroutine.send(None)

    assert finished.value.value == expected


def test_an_async_cached_refusal_completes_without_suspending():
    key = ApiKeyFactory(is_active=False)
    _reason(key_verify, key.secret)

    coroutine = key_verify_async(key.secret, None)
    with pytest.raises(KeyRefused) as refused:
        coroutine.send(None)

    assert refused.value.reason == "inactive"


@pytest.mark.django_db(transaction=True)
async def test_an_async_miss_loads_from_the_database_once_for_concurrent_requests(monkeypatch):
    key = await sync_to_async(ApiKeyFactory)()
    verifier = KeyVerifier()
    reads = []
    real_read = keys.verification.key_record_by_digest

    def counting_read(*, digest: str):
        reads.append(digest)
        return real_read(digest=digest)

    monkeypatch.setattr(keys.verification, "key_record_by_digest", counting_read)

    policies = await asyncio.gather(*(verifier.verify_async(key.secret, None) for _ in range(20)))

    assert {policy.key_id for policy in policies} == {key.pk}
    assert len(reads) == 1
    with pytest.raises(KeyRefused) as refused:
        await verifier.verify_async(key_secret_generate(), None)
    assert refused.value.reason == "unknown"
    await sync_to_async(connections.close_all)()  # the loads' worker thread holds its own connection


# --- every process within 2 seconds -----------------------------------------------------------------------
def _refused_within(verifier: KeyVerifier, secret: str, seconds: float) -> tuple[str | None, float]:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            verifier.verify(secret, None)
        except KeyRefused as refused:
            return refused.reason, time.monotonic() - start
        time.sleep(0.01)
    return None, time.monotonic() - start


def test_a_disabled_key_is_refused_by_another_cache_instance_within_two_seconds(run_on_commit):
    """Two verifiers with their own memory share only the Django cache (Redis when REDIS_URL is set)."""
    key = ApiKeyFactory()
    worker_a, worker_b = KeyVerifier(), KeyVerifier()
    worker_a.verify(key.secret, None)
    worker_b.verify(key.secret, None)

    with run_on_commit():
        key_disable(key=key)  # invalidates through the module's default verifier: a third "process"

    reason_a, _ = _refused_within(worker_a, key.secret, 2.0)
    reason_b, elapsed = _refused_within(worker_b, key.secret, 2.0)
    assert (reason_a, reason_b) == ("inactive", "inactive")
    assert elapsed < 2.0


_CHILD = """
import sys, time
import django
django.setup()
from keys.verification import KeyRefused, KeyVerifier

secret = sys.stdin.readline().strip()
verifier = KeyVerifier()
verifier.verify(secret, None)
print("ready", flush=True)
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    try:
        verifier.verify(secret, None)
    except KeyRefused as refused:
        print("refused", refused.reason, time.time(), flush=True)
        break
    time.sleep(0.005)
else:
    print("still accepted", flush=True)
"""


def _database_url() -> str:
    db = connection.settings_dict
    credentials = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL: the processes share the cache through Redis")
def test_a_disabled_key_is_refused_by_another_process_within_two_seconds():
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: the child process must reach the test database (SQLite's is in memory)")
    key = ApiKeyFactory()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "apiforge.settings",
        "APP_ENV": "test",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CACHE_KEY_PREFIX": settings.CACHE_KEY_PREFIX,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        child.stdin.write(key.secret + "\n")
        child.stdin.flush()
        ready = child.stdout.readline().strip()
        assert ready == "ready", child.stderr.read()
        time.sleep(0.3)  # the child is answering from its memory now

        key_disable(key=key)
        committed_at = time.time()

        out, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    word, reason, seen_at = out.split()
    assert (word, reason) == ("refused", "inactive"), err
    assert float(seen_at) - committed_at < 2.0
