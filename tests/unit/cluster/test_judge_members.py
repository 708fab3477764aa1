"""cluster.node.judge_members: the Raft leader's NodeDown / NodeUp verdicts, without Raft
or sockets. The case that lost messages in a chaos run: a node restarted, was elected
within its first seconds, and saw the old leader's link drop; it judged nobody during its
start-up grace, so the dead leader's queues stayed on it. And a member back on the link
after a restart but still catching up (it has not said READY): it must not be judged up,
nor keep its queues."""

from __future__ import annotations

from cluster.node import DOWN_AFTER_S, READY_WAIT_S, REVIVED_GRACE_S, judge_members
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
    serving: set[str] | None = None,
    up_since: dict[str, float] | None = None,
) -> list[tuple[bool, str]]:
    """Every member whose link is up serves, unless `serving` says which do."""
    serves = (up if serving is None else serving).__contains__
    return judge_members(
        "a", members, up.__contains__, serves, down_since, up_since or {}, revived_at or {},
        now, settled,
    )  # fmt: skip


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


def test_a_dead_member_back_on_the_link_is_judged_up_only_once_it_serves() -> None:
    members = [member("a"), member("b", alive=False), member("c")]
    catching_up = {"c"}  # b's link is up, b has not said READY
    assert (
        judge({"b", "c"}, {"b": 1.0}, 9.0, settled=True, members=members, serving=catching_up) == []
    )
    assert judge(
        {"b", "c"}, {"b": 1.0}, 9.0, settled=True, members=members, serving={"b", "c"}
    ) == [(False, "b")]


def test_a_live_member_back_on_the_link_but_not_serving_is_judged_down() -> None:
    # b's link dropped at 10.0 (killed) and came back at 10.8 (restarted): b is catching
    # up, nobody declared it down meanwhile (a Raft election, say). It leads queues that
    # refuse everything until it serves: down, once it has had READY_WAIT_S to say READY.
    down_since, up_since = {"b": 10.0}, {"b": 10.8}
    just_up = 10.8 + READY_WAIT_S / 2
    later = 10.8 + READY_WAIT_S
    kw = {"settled": True, "serving": {"c"}, "up_since": up_since}
    assert judge({"b", "c"}, down_since, just_up, **kw) == []  # type: ignore[arg-type]
    assert judge({"b", "c"}, down_since, later, **kw) == [(True, "b")]  # type: ignore[arg-type]
    # Saying READY in time (it only lost its link, it serves) keeps it up.
    assert judge({"b", "c"}, down_since, later, settled=True, up_since=up_since) == []


def test_a_live_member_never_seen_going_down_is_not_judged_for_not_serving() -> None:
    # At a fresh start (no link drop seen) or after it announced itself (the drop is
    # forgotten): a member that has not said READY yet is left alone.
    assert judge({"b", "c"}, {}, 99.0, settled=True, serving={"c"}, up_since={"b": 1.0}) == []
