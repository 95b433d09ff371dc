"""Strategy, intensity and backoff: property tests with a fake clock and seeded crashes."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.supervision import BackoffSpec, RestartType, Strategy
from supervisors.strategy import (
    Backoff,
    GiveUp,
    Intensity,
    Leave,
    Restart,
    RestartPolicy,
    affected,
    restart_wanted,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


strategies = st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"])
restart_types = st.sampled_from(["permanent", "transient", "temporary"])
backoffs = st.builds(
    BackoffSpec,
    min_s=st.floats(0.0, 5.0), max_s=st.floats(5.0, 60.0), jitter=st.floats(0.0, 1.0),
    reset_after_s=st.floats(0.5, 100.0),
)
# A crash schedule: (seconds since the previous crash, which child, abnormal exit?)
schedules = st.lists(st.tuples(st.floats(0.0, 20.0), st.integers(0, 9), st.booleans()),
                     max_size=60)


@given(max_restarts=st.integers(0, 8), within_s=st.floats(0.5, 60.0),
       gaps=st.lists(st.floats(0.0, 30.0), max_size=80))
def test_intensity_allows_exactly_max_restarts_in_any_window(
        max_restarts: int, within_s: float, gaps: list[float]) -> None:
    intensity = Intensity(max_restarts, within_s)
    now, accepted = 0.0, []
    for gap in gaps:
        now += gap
        in_window = [t for t in accepted if t > now - within_s]
        allowed = intensity.allow(now)
        # Reference model: allowed iff fewer than max_restarts restarts in (now - within, now].
        assert allowed == (len(in_window) < max_restarts)
        if not allowed:
            return  # the supervisor gives up here
        accepted.append(now)
    for t in accepted:  # never more than max_restarts in any window ending at a restart
        assert sum(1 for u in accepted if t - within_s < u <= t) <= max_restarts


@given(spec=backoffs, seed=st.integers(0, 2**32), failures=st.integers(1, 200))
def test_backoff_is_bounded_and_starts_at_zero(spec: BackoffSpec, seed: int,
                                               failures: int) -> None:
    delay = Backoff(spec, random.Random(seed)).delay(failures)
    assert 0.0 <= delay <= spec.max_s
    if failures == 1:
        assert delay == 0.0  # a single crash is restarted at once


@given(min_s=st.floats(0.01, 5.0), max_s=st.floats(5.0, 60.0))
def test_backoff_without_jitter_doubles_up_to_the_cap(min_s: float, max_s: float) -> None:
    b = Backoff(BackoffSpec(min_s=min_s, max_s=max_s, jitter=0.0), random.Random(0))
    delays = [b.delay(n) for n in range(1, 40)]
    assert delays[1] == pytest.approx(min(min_s, max_s))
    assert all(a <= b for a, b in itertools.pairwise(delays))  # never shrinks
    assert delays[-1] == max_s


def test_affected_children_by_strategy() -> None:
    order = ["a", "b", "c", "d"]
    assert affected("one_for_one", order, "b") == ["b"]
    assert affected("one_for_all", order, "b") == order
    assert affected("rest_for_one", order, "b") == ["b", "c", "d"]
    assert affected("rest_for_one", order, "d") == ["d"]


@pytest.mark.parametrize(("restart", "abnormal", "wanted"), [
    ("permanent", False, True), ("permanent", True, True),
    ("transient", False, False), ("transient", True, True),
    ("temporary", False, False), ("temporary", True, False),
])
def test_restart_types(restart: RestartType, abnormal: bool, wanted: bool) -> None:
    assert restart_wanted(restart, abnormal) is wanted


@settings(max_examples=300)
@given(strategy=strategies, types=st.lists(restart_types, min_size=1, max_size=6),
       max_restarts=st.integers(0, 6), within_s=st.floats(1.0, 60.0), spec=backoffs,
       seed=st.integers(0, 2**32), schedule=schedules)
def test_random_crash_schedules_follow_otp_rules(
        strategy: Strategy, types: list[RestartType], max_restarts: int, within_s: float,
        spec: BackoffSpec, seed: int, schedule: list[tuple[float, int, bool]]) -> None:
    clock = FakeClock()
    children = [(f"c{i}", t) for i, t in enumerate(types)]
    policy = RestartPolicy(strategy, max_restarts, within_s, spec, children, clock=clock,
                           rng=random.Random(seed))
    kind = dict(children)
    order = [c for c, _ in children]  # the reference model of the child list
    for c in order:
        policy.started(c)
    restarts: list[float] = []
    consecutive = dict.fromkeys(order, 0)
    last_start = dict.fromkeys(order, clock.now)
    for gap, pick, abnormal in schedule:
        if not order:
            break
        clock.now += gap
        failed = order[pick % len(order)]
        if clock.now - last_start[failed] >= spec.reset_after_s:
            consecutive[failed] = 0
        before = list(order)
        decision = policy.on_exit(failed, abnormal=abnormal)
        if not restart_wanted(kind[failed], abnormal):
            assert decision == Leave(failed, kind[failed] == "temporary")
            if kind[failed] == "temporary":
                order.remove(failed)
            assert policy.order == order
            continue
        recent = [t for t in restarts if t > clock.now - within_s]
        if len(recent) >= max_restarts:
            assert isinstance(decision, GiveUp) and decision.failed == failed
            return
        assert isinstance(decision, Restart)
        restarts.append(clock.now)
        consecutive[failed] += 1
        touched = affected(strategy, before, failed)
        # Siblings are stopped in reverse start order; the failed child is already down.
        assert decision.stop == tuple(reversed([c for c in touched if c != failed]))
        # Restarted in start order; temporaries never come back.
        expected = tuple(c for c in touched if c == failed or kind[c] != "temporary")
        assert decision.start == expected
        assert all(kind[c] != "temporary" or c == failed for c in decision.start)
        order = [c for c in before if c not in touched or c in expected]
        assert policy.order == order
        assert decision.restarts == len(recent) + 1 <= max(max_restarts, 1)
        assert 0.0 <= decision.delay_s <= spec.max_s
        if consecutive[failed] == 1:
            assert decision.delay_s == 0.0
        for c in decision.start:
            policy.started(c)
            last_start[c] = clock.now


def test_crash_loop_gives_up_after_max_restarts_and_backs_off() -> None:
    clock = FakeClock()
    spec = BackoffSpec(min_s=1.0, max_s=4.0, jitter=0.0, reset_after_s=30.0)
    policy = RestartPolicy("one_for_one", 3, 60.0, spec, [("w", "permanent")], clock=clock,
                           rng=random.Random(7))
    policy.started("w")
    delays = []
    for _ in range(3):
        clock.now += 0.2
        d = policy.on_exit("w", abnormal=True)
        assert isinstance(d, Restart)
        delays.append(d.delay_s)
        clock.now += d.delay_s
        policy.started("w")
    assert delays == [0.0, 1.0, 2.0]
    clock.now += 0.2
    assert policy.on_exit("w", abnormal=True) == GiveUp("w", 4, 60.0)


def test_a_quiet_period_resets_the_backoff_but_not_the_intensity_window() -> None:
    clock = FakeClock()
    spec = BackoffSpec(min_s=1.0, max_s=4.0, jitter=0.0, reset_after_s=5.0)
    policy = RestartPolicy("one_for_one", 10, 60.0, spec, [("w", "permanent")], clock=clock,
                           rng=random.Random(7))
    policy.started("w")
    first = policy.on_exit("w", abnormal=True)
    policy.started("w")
    clock.now += 0.1
    second = policy.on_exit("w", abnormal=True)
    policy.started("w")
    clock.now += 6.0  # ran fine for longer than reset_after_s
    third = policy.on_exit("w", abnormal=True)
    assert [d.delay_s for d in (first, second, third)] == [0.0, 1.0, 0.0]  # type: ignore[union-attr]
    assert third.restarts == 3  # type: ignore[union-attr]
