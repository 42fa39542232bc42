"""The balancer's choices: smooth weighted round-robin, least in flight, EWMA, and what it skips."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from proxy.catalog import catalog_get
from proxy.edge.balance import Balancer
from proxy.edge.breaker import BreakerPolicy, breaker_failure, breaker_view, health_note
from proxy.models import Deployment, Model
from tests.proxy.helpers import upstream_make


@dataclass(frozen=True, slots=True, eq=False)
class Target:
    """A member as a route target looks to the balancer."""

    key: str
    weight: int = 1
    breaker: BreakerPolicy = BreakerPolicy(failure_threshold=1, cooldown_s=60.0)
    drained: bool = False
    unhealthy: bool = False


def _members(*weights: int) -> list[Target]:
    return [Target(key=f"rt:{name}", weight=weight) for name, weight in zip("abcdefgh", weights, strict=False)]


def _picks(balancer: Balancer[Target], n: int, finish: bool = True) -> list[str]:
    picked = []
    for _ in range(n):
        member = balancer.pick()
        assert member is not None
        picked.append(member.key.removeprefix("rt:"))
        if finish:
            balancer.finished(member, ok=True, elapsed_s=0.01)
    return picked


def test_smooth_round_robin_spreads_1000_picks_within_2_percent_of_the_weights():
    weights = (5, 3, 2)
    balancer = Balancer(_members(*weights))

    counts = Counter(_picks(balancer, 1000))

    total = sum(weights)
    for name, weight in zip("abc", weights, strict=False):
        assert abs(counts[name] / 1000 - weight / total) <= 0.02, counts


def test_smooth_round_robin_interleaves_like_nginx():
    balancer = Balancer(_members(5, 1, 1))

    # nginx's documented sequence for weights 5, 1, 1: never five a's in a row.
    assert _picks(balancer, 14) == list("aabacaa" * 2)


def test_round_robin_of_equal_weights_takes_turns():
    assert _picks(Balancer(_members(1, 1, 1)), 6) == list("abcabc")


def test_model_deployments_are_balanced_by_weight_through_the_catalog(db):
    upstream = upstream_make(kind="mock")
    model = Model.objects.create(name="weighted")
    for name, weight in (("heavy", 5), ("light-1", 1), ("light-2", 1)):
        Deployment.objects.create(model=model, upstream=upstream, upstream_model=name, weight=weight)
    target = catalog_get().models["weighted"]

    picked = []
    for _ in range(7):
        deployment = target.pick()
        assert deployment is not None
        assert deployment.key == f"dep:{deployment.id}"
        picked.append(deployment.upstream_model)
        target.balancer.finished(deployment, ok=True, elapsed_s=0.01)

    assert picked == ["heavy", "heavy", "light-1", "heavy", "light-2", "heavy", "heavy"]
    assert target.balancer.mode == "round_robin"


def test_least_in_flight_prefers_the_idle_member():
    a, b, c = _members(1, 1, 1)
    balancer = Balancer([a, b, c], "least_in_flight")
    assert balancer.pick() is a  # all idle: round-robin decides
    assert balancer.pick() is b
    busy_c = balancer.pick()
    assert busy_c is c
    balancer.finished(b, ok=True, elapsed_s=0.01)  # b is idle again; a and c still have a call each

    assert balancer.pick() is b
    assert balancer.pick() in (a, c)  # everyone has one call now: any
    assert balancer.in_flight(b) == 1


def test_least_in_flight_sends_every_call_to_the_idle_member_while_the_others_stay_busy():
    a, b = _members(1, 1)
    balancer = Balancer([a, b], "least_in_flight")
    assert balancer.pick() is a  # a stays busy (a long call)

    for _ in range(5):
        member = balancer.pick()
        assert member is b
        balancer.finished(member, ok=True, elapsed_s=0.01)


def test_ewma_prefers_the_faster_member():
    fast, slow = _members(1, 1)
    balancer = Balancer([fast, slow], "ewma")
    # Members never called go first: one call each, one slow and one fast.
    first, second = balancer.pick(), balancer.pick()
    assert {first, second} == {fast, slow}
    balancer.finished(fast, ok=True, elapsed_s=0.010)
    balancer.finished(slow, ok=True, elapsed_s=0.400)

    picked = _picks(balancer, 10, finish=False)
    # fast: 10 ms x (in flight + 1) stays below 400 ms until 40 calls are in flight on it.
    assert picked == ["a"] * 10


def test_ewma_weighs_latency_by_the_calls_in_flight():
    fast, slow = _members(1, 1)
    balancer = Balancer([fast, slow], "ewma")
    balancer.pick(), balancer.pick()
    balancer.finished(fast, ok=True, elapsed_s=0.1)
    balancer.finished(slow, ok=True, elapsed_s=0.25)

    # fast: 0.1 x 1, then 0.1 x 2 (both below 0.25); 0.1 x 3 > 0.25 x 1: slow; then 0.3 < 0.25 x 2: fast.
    assert _picks(balancer, 4, finish=False) == ["a", "a", "b", "a"]


def test_a_failed_call_makes_a_member_look_slow_to_ewma():
    a, b = (Target(key=k, breaker=BreakerPolicy(failure_threshold=100)) for k in ("rt:a", "rt:b"))
    balancer = Balancer([a, b], "ewma")
    balancer.pick(), balancer.pick()
    balancer.finished(a, ok=False, elapsed_s=0.001)  # refused at once: fast, but not good
    balancer.finished(b, ok=True, elapsed_s=0.2)

    assert balancer.pick() is b


def test_weight_zero_drained_and_excluded_members_are_skipped():
    members = [
        Target(key="rt:zero", weight=0),
        Target(key="rt:drained", drained=True),
        Target(key="rt:tried"),
        Target(key="rt:ok"),
    ]
    balancer = Balancer(members)

    assert {balancer.pick(exclude={"rt:tried"}).key for _ in range(5)} == {"rt:ok"}  # type: ignore[union-attr]
    assert balancer.pick(exclude={"rt:tried", "rt:ok"}) is None


def test_unhealthy_members_are_skipped_unless_all_are_then_tried_anyway():
    stored_unhealthy = Target(key="rt:stored", unhealthy=True)
    checked = Target(key="rt:checked")
    healthy = Target(key="rt:healthy")
    health_note("rt:checked", False)  # the active checks' verdict
    balancer = Balancer([stored_unhealthy, checked, healthy])

    assert {balancer.pick().key for _ in range(6)} == {"rt:healthy"}  # type: ignore[union-attr]
    # Only unhealthy ones left: panic, they are tried (in turn).
    assert {balancer.pick(exclude={"rt:healthy"}).key for _ in range(4)} == {"rt:stored", "rt:checked"}  # type: ignore[union-attr]


def test_the_checks_verdict_overrides_the_stored_health():
    recovered = Target(key="rt:recovered", unhealthy=True)
    other = Target(key="rt:other")
    health_note("rt:recovered", True)
    balancer = Balancer([recovered, other])

    assert {balancer.pick().key for _ in range(4)} == {"rt:recovered", "rt:other"}  # type: ignore[union-attr]


def test_an_open_breaker_is_never_tried_not_even_in_panic():
    broken = Target(key="rt:broken", unhealthy=True)
    sick = Target(key="rt:sick", unhealthy=True)
    balancer = Balancer([broken, sick])
    breaker_failure("rt:broken", broken.breaker)  # threshold 1: open
    assert breaker_view("rt:broken").state == "open"

    assert {balancer.pick().key for _ in range(4)} == {"rt:sick"}  # type: ignore[union-attr]
    breaker_failure("rt:sick", sick.breaker)
    assert balancer.pick() is None


def test_a_pick_is_in_flight_until_finished_and_finish_reports_to_the_breaker():
    (member,) = _members(1)
    balancer = Balancer([member])
    picked = balancer.pick()
    assert picked is member
    assert balancer.in_flight(member) == 1

    balancer.finished(member, ok=False, elapsed_s=0.01)

    assert balancer.in_flight(member) == 0
    assert breaker_view(member.key).state == "open"  # threshold 1
    assert balancer.pick() is None


@pytest.mark.parametrize("mode", ["round_robin", "least_in_flight", "ewma", "unknown-mode"])
def test_every_mode_picks_only_among_available_members(mode):
    members = _members(2, 1)
    balancer = Balancer(members, mode)
    breaker_failure("rt:a", members[0].breaker)

    assert {balancer.pick().key for _ in range(3)} == {"rt:b"}  # type: ignore[union-attr]
    assert balancer.mode in {"round_robin", "least_in_flight", "ewma"}


def test_an_empty_balancer_picks_nothing():
    assert Balancer([]).pick() is None
