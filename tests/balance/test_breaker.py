"""The breaker's state machine in one process: closed -> open -> half-open -> closed or open again.

Cooldowns are small (a fraction of a second) and every wait for one is a bounded poll.
"""

from __future__ import annotations

import time

import pytest

from proxy.edge.breaker import (
    BreakerPolicy,
    breaker_allow,
    breaker_failure,
    breaker_release,
    breaker_reset,
    breaker_retry_after_s,
    breaker_success,
    breaker_view,
    breakers_not_closed,
)

KEY = "dep:test"
COOLDOWN_S = 0.2
WAIT_S = 5.0


def _policy(threshold: int = 3, cooldown_s: float = COOLDOWN_S, probes: int = 1) -> BreakerPolicy:
    return BreakerPolicy(failure_threshold=threshold, cooldown_s=cooldown_s, half_open_requests=probes)


def _wait_for_state(key: str, state: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while breaker_view(key).state != state:
        assert time.monotonic() < deadline, f"{key} never became {state}: {breaker_view(key)}"
        time.sleep(0.01)


def _fail(policy: BreakerPolicy, times: int, key: str = KEY) -> None:
    for _ in range(times):
        assert breaker_allow(key, policy)
        breaker_failure(key, policy)


def test_a_member_that_never_failed_is_closed_and_allowed():
    view = breaker_view(KEY)
    assert (view.state, view.failures, view.open_until, view.trips) == ("closed", 0, 0.0, 0)
    assert breaker_allow(KEY, _policy())
    assert breakers_not_closed() == []


def test_the_breaker_opens_after_the_threshold_of_consecutive_failures():
    policy = _policy(threshold=3, cooldown_s=30)
    _fail(policy, 2)
    assert breaker_view(KEY).state == "closed"
    assert breaker_view(KEY).failures == 2

    before = time.time()
    _fail(policy, 1)

    view = breaker_view(KEY)
    assert view.state == "open"
    assert view.trips == 1
    assert before + 30 <= view.open_until <= time.time() + 30
    assert not breaker_allow(KEY, policy)
    assert [v.key for v in breakers_not_closed()] == [KEY]
    assert breaker_retry_after_s([KEY, "dep:other"]) in range(29, 31)


def test_a_success_resets_the_consecutive_count():
    policy = _policy(threshold=3)
    _fail(policy, 2)
    breaker_success(KEY, policy)
    _fail(policy, 2)

    assert breaker_view(KEY).state == "closed"
    assert breaker_view(KEY).failures == 2


def test_half_open_after_the_cooldown_and_a_successful_probe_closes_it():
    policy = _policy(threshold=2)
    _fail(policy, 2)
    assert breaker_view(KEY).state == "open"

    _wait_for_state(KEY, "half_open")
    assert breaker_allow(KEY, policy)  # the probe
    assert not breaker_allow(KEY, policy)  # one probe at a time (half_open_requests=1)
    breaker_success(KEY, policy)

    view = breaker_view(KEY)
    assert (view.state, view.failures, view.trips) == ("closed", 0, 0)
    assert breaker_allow(KEY, policy)


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_cap(settings):
    settings.BREAKER_COOLDOWN_MAX_S = 4 * COOLDOWN_S
    policy = _policy(threshold=1)
    _fail(policy, 1)
    expected = [2 * COOLDOWN_S, 4 * COOLDOWN_S, 4 * COOLDOWN_S]  # trips 2, 3 and 4 (capped)
    for trips, cooldown in enumerate(expected, start=2):
        view = breaker_view(KEY)
        assert view.state == "open"
        _wait_for_state(KEY, "half_open")
        assert breaker_allow(KEY, policy)
        before = time.time()
        breaker_failure(KEY, policy)
        after = time.time()

        view = breaker_view(KEY)
        assert view.state == "open"
        assert view.trips == trips
        assert before + cooldown <= view.open_until <= after + cooldown

    _wait_for_state(KEY, "half_open")
    assert breaker_allow(KEY, policy)
    breaker_success(KEY, policy)
    assert breaker_view(KEY).trips == 0  # closed: the next trip starts from the base cooldown again
    before = time.time()
    breaker_failure(KEY, policy)
    assert breaker_view(KEY).open_until <= time.time() + COOLDOWN_S
    assert breaker_view(KEY).open_until >= before + COOLDOWN_S


def test_half_open_admits_its_number_of_probes():
    policy = _policy(threshold=1, probes=2)
    _fail(policy, 1)
    _wait_for_state(KEY, "half_open")

    assert breaker_allow(KEY, policy)
    assert breaker_allow(KEY, policy)
    assert not breaker_allow(KEY, policy)
    breaker_release(KEY)  # one probe ended without a verdict (the client left): its slot is free again
    assert breaker_allow(KEY, policy)


def test_an_error_rate_over_the_window_opens_the_breaker_without_consecutive_failures(settings):
    settings.BREAKER_ERROR_RATE = 0.5
    settings.BREAKER_MIN_REQUESTS = 10
    settings.BREAKER_WINDOW_S = 60.0
    policy = _policy(threshold=5, cooldown_s=30)
    # Failure, success, failure, failure, success, ...: never 5 in a row, but 6 of 10 failed.
    for outcome in (False, True, False, False, True, False, True, False, True):
        breaker_allow(KEY, policy)
        (breaker_success if outcome else breaker_failure)(KEY, policy)
    assert breaker_view(KEY).state == "closed"  # 5 of 9: not enough calls yet

    breaker_failure(KEY, policy)

    assert breaker_view(KEY).state == "open"


def test_a_late_result_from_before_the_trip_changes_nothing():
    policy = _policy(threshold=1, cooldown_s=30)
    breaker_failure(KEY, policy)
    until = breaker_view(KEY).open_until

    breaker_success(KEY, policy)  # a call picked before the trip finished well
    breaker_failure(KEY, policy)  # and another one badly

    view = breaker_view(KEY)
    assert (view.state, view.open_until, view.trips) == ("open", until, 1)


def test_threshold_zero_turns_the_breaker_off():
    policy = _policy(threshold=0)
    for _ in range(20):
        breaker_failure(KEY, policy)
    assert breaker_view(KEY).state == "closed"
    assert breaker_allow(KEY, policy)


def test_an_operator_reset_closes_an_open_breaker():
    policy = _policy(threshold=1, cooldown_s=30)
    breaker_failure(KEY, policy)
    assert not breaker_allow(KEY, policy)

    breaker_reset(KEY)

    assert breaker_view(KEY).state == "closed"
    assert breaker_allow(KEY, policy)


@pytest.mark.parametrize("keys", [[], ["dep:none"]])
def test_retry_after_is_none_without_an_open_breaker(keys):
    assert breaker_retry_after_s(keys) is None
