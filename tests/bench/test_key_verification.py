"""Key verification on a cache hit: the cost every proxied request pays (an HMAC and dict lookups, no I/O)."""

from __future__ import annotations

import pytest

from keys.verification import KeyRefused, key_verify, key_verify_async
from tests.bench.conftest import run_without_suspending
from tests.factories import ApiKeyFactory

pytestmark = [pytest.mark.bench, pytest.mark.django_db]


@pytest.fixture
def warm_key():
    """An active key whose entry is already in this process's memory (the steady state)."""
    key = ApiKeyFactory()
    key_verify(key.secret, "127.0.0.1")
    return key


def test_key_verify_hit_answers_from_memory(benchmark, warm_key, django_assert_num_queries):
    with django_assert_num_queries(0):
        policy = benchmark(key_verify, warm_key.secret, "127.0.0.1")
    assert policy.key_id == warm_key.pk


def test_key_verify_async_hit_completes_without_suspending(benchmark, warm_key, django_assert_num_queries):
    def verify_once():
        return run_without_suspending(key_verify_async(warm_key.secret, "127.0.0.1"))

    with django_assert_num_queries(0):
        policy = benchmark(verify_once)
    assert policy.owner_id == warm_key.owner_id


def test_key_verify_hit_with_an_ip_allowlist(benchmark, django_assert_num_queries):
    key = ApiKeyFactory(ip_allowlist=["10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32", "127.0.0.0/8"])
    key_verify(key.secret, "127.0.0.1")
    with django_assert_num_queries(0):
        policy = benchmark(key_verify, key.secret, "127.0.0.1")
    assert policy.key_id == key.pk


def test_unknown_key_is_refused_from_memory_after_the_first_miss(benchmark, django_assert_num_queries):
    secret = "afk-" + "x" * 43
    with pytest.raises(KeyRefused):
        key_verify(secret, "127.0.0.1")

    def refuse():
        try:
            key_verify(secret, "127.0.0.1")
        except KeyRefused as refused:
            return refused.reason
        raise AssertionError("an unknown key was accepted")

    with django_assert_num_queries(0):
        assert benchmark(refuse) == "unknown"
