"""cluster.node.judge_members: the Raft leader's NodeDown / NodeUp verdicts, without Raft
or sockets. The case that lost messages in a chaos run: a node restarted, was elected
within its first seconds, and saw the old leader's link drop; it judged nobody during its
start-up grace, so the dead leader's queues stayed on it."""

from __future__ import annotations

from cluster.node import DOWN_AFTER_S, REVIVED_GRACE_S, judge_members
from cluster.state import MemberInfo


def member(name: str, alive: bool = True) -> MemberInfo:
    return MemberInfo(name, f"{name}:1", f"{name}:2", f"{name}:3", f"{name}:4", alive=alive)


MEMBERS = [member("a"), member("b"), member("c")]


def judge(
    up: set[str],
    down_since: dict[str, float],
    now: float,
    *,
    settled: bool,
    members: list[MemberInfo] = MEMBERS,
    revived_at: dict[str, float] | None = None,
) -> list[tuple[bool, str]]:
    return judge_members("a", members, up.__contains__, down_since, revived_at or {}, now, settled)


def test_a_member_seen_going_down_is_judged_before_the_grace_ends() -> None:
    # Not settled (just started, or just elected), but this node saw b's link drop.
    down_since = {"b": 100.0}
    assert judge({"c"}, down_since, 100.0 + DOWN_AFTER_S / 2, settled=False) == []
    assert judge({"c"}, down_since, 100.0 + DOWN_AFTER_S + 0.001, settled=False) == [(True, "b")]


def test_a_member_never_reached_waits_until_settled() -> None:
    down_since: dict[str, float] = {}
    assert judge({"c"}, down_since, 50.0, settled=False) == []
    assert down_since == {}  # nothing counts yet
    assert judge({"c"}, down_since, 51.0, settled=True) == []  # the count starts now
    assert down_since == {"b": 51.0}
    assert judge({"c"}, down_since, 51.0 + DOWN_AFTER_S + 0.001, settled=True) == [(True, "b")]


def test_a_member_just_back_gets_time_for_the_link_to_redial_it() -> None:
    revived = {"b": 10.0}
    down_since = {"b": 1.0}  # (dropped when it was noted revived; stale here on purpose)
    just_back = 10.0 + REVIVED_GRACE_S / 2
    assert judge({"c"}, down_since, just_back, settled=True, revived_at=revived) == []
    after = 10.0 + REVIVED_GRACE_S
    assert judge({"c"}, down_since, after, settled=True, revived_at=revived) == [(True, "b")]


def test_a_dead_member_whose_link_is_up_is_judged_up_once_settled() -> None:
    members = [member("a"), member("b", alive=False), member("c")]
    assert judge({"b", "c"}, {}, 5.0, settled=False, members=members) == []
    assert judge({"b", "c"}, {}, 5.0, settled=True, members=members) == [(False, "b")]


def test_members_that_are_up_or_already_down_get_no_verdict() -> None:
    members = [member("a"), member("b", alive=False), member("c")]
    assert judge({"c"}, {"b": 0.0}, 99.0, settled=True, members=members) == []
    assert judge({"b", "c"}, {}, 99.0, settled=True) == []  # everyone up, everyone alive
