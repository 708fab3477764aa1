"""cluster/leadership.py: when Raft leadership follows the durable load, and when not."""

from __future__ import annotations

from cluster import leadership as lf
from cluster.leadership import LeadershipFollowsLoad, choose

NODES = ("a", "b", "c")


def test_the_busiest_writer_is_chosen_when_it_clearly_dominates() -> None:
    assert choose({"b": 5000.0, "a": 100.0}, "a", NODES) == "b"
    assert choose({"b": 5000.0, "c": 6000.0}, "a", NODES) == "c"


def test_the_leader_stays_below_the_floor_or_without_a_clear_margin() -> None:
    assert choose({}, "a", NODES) is None
    assert choose({"b": lf.MIN_RATE - 1}, "a", NODES) is None
    assert choose({"b": 3000.0, "a": 2000.0}, "a", NODES) is None  # not FACTOR times more
    assert choose({"a": 9000.0, "b": 100.0}, "a", NODES) is None  # the leader writes most


def test_only_candidates_are_chosen() -> None:
    assert choose({"b": 5000.0}, "a", ("a", "c")) is None  # b is down or unreachable
    assert choose({"b": 5000.0, "c": 900.0}, "a", ("a", "c")) == "c"


def feed(policy: LeadershipFollowsLoad, t: float, rates: dict[str, float]) -> str | None:
    """One window of `rates` ending at `t` (a window is CHECK_S long)."""
    for node, rate in rates.items():
        policy.count(node, int(rate * lf.CHECK_S))
    return policy.check(t, True, NODES)


def test_a_transfer_needs_a_streak_of_windows_and_then_waits_a_cooldown() -> None:
    p = LeadershipFollowsLoad("a")
    p._window_start = 0.0
    t = lf.CHECK_S
    assert feed(p, t, {"b": 1000.0}) is None  # one window is a burst
    t += lf.CHECK_S
    assert feed(p, t, {"b": 1000.0}) == "b"
    p._quiet_until = t + lf.COOLDOWN_S  # as `transfer` sets it, whatever the outcome
    for _ in range(int(lf.COOLDOWN_S / lf.CHECK_S) - 1):
        t += lf.CHECK_S
        assert feed(p, t, {"b": 1000.0}) is None
    t += 2 * lf.CHECK_S
    assert feed(p, t, {"b": 1000.0}) is None  # the streak starts again after the cooldown
    t += lf.CHECK_S
    assert feed(p, t, {"b": 1000.0}) == "b"


def test_a_streak_is_broken_by_a_quiet_window_or_another_target() -> None:
    p = LeadershipFollowsLoad("a")
    p._window_start = 0.0
    assert feed(p, 1.0, {"b": 1000.0}) is None
    assert feed(p, 2.0, {}) is None
    assert feed(p, 3.0, {"b": 1000.0}) is None
    assert feed(p, 4.0, {"c": 1000.0}) is None
    assert feed(p, 5.0, {"c": 1000.0}) == "c"


def test_windows_close_only_every_check_period_and_counts_start_afresh() -> None:
    p = LeadershipFollowsLoad("a")
    p._window_start = 0.0
    p.count("b", 10_000)
    assert p.check(lf.CHECK_S / 2, True, NODES) is None  # the window is still open
    assert p.check(lf.CHECK_S, True, NODES) is None  # closed: 1 of STREAK
    assert p.check(2 * lf.CHECK_S, True, NODES) is None  # nothing counted in this one


def test_followers_and_a_disabled_policy_never_transfer() -> None:
    for policy, leading in ((LeadershipFollowsLoad("a"), False),
                            (LeadershipFollowsLoad("a", enabled=False), True)):  # fmt: skip
        policy._window_start = 0.0
        for i in range(1, 6):
            policy.count("b", 100_000)
            assert policy.check(float(i), leading, NODES) is None
