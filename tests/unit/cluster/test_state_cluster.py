"""cluster.state in a cluster: replicas applying one Raft log (tests/unit/cluster/fake_raft)
agree on topology, queue leaders and members; retried commands apply once; NodeDown,
NodeUp, ForgetMember and SetLeader move queues as the placement rules say; and
`restore_topology(topology_snapshot())` is the identity."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import codec
from cluster import commands as c
from cluster.state import DEDUP_WINDOW, MemberInfo, StateMachine, topology_document
from node.broker.snapshot import SnapshotError
from node.broker.types import (
    AmqpError,
    CancelConsumer,
    ChannelRef,
    Count,
    Forward,
    Ok,
    Properties,
    QueueDeclared,
    Routed,
)
from tests.unit.cluster.fake_raft import FakeRaft

NODES = ("a", "b", "c")


def member(name: str) -> c.Member:
    return c.Member(name=name, raft=f"{name}:7000", link=f"{name}:7001", amqp=f"{name}:5672")


def declare(name: str, owner: int = 1, **kw: Any) -> c.DeclareQueue:
    return c.DeclareQueue(vhost=kw.pop("vhost", "/"), queue=name, owner=owner, **kw)


def place(name: str, leader: str, expect: str = "", vhost: str = "/") -> c.SetLeader:
    return c.SetLeader(vhost=vhost, queue=name, leader=leader, expect=expect)


def delete(name: str, owner: int = 1) -> c.DeleteQueue:
    return c.DeleteQueue(vhost="/", queue=name, owner=owner)


def publish(queue: str, body: bytes = b"m", now_ms: int = 0) -> c.Publish:
    return c.Publish(
        channel=ChannelRef(1, 1),
        vhost="/",
        exchange="",
        routing_key=queue,
        mandatory=False,
        properties=b"\x00\x00",
        props=Properties(),
        body=body,
        now_ms=now_ms,
    )


def cluster(names: tuple[str, ...] = NODES) -> FakeRaft:
    raft = FakeRaft(names)
    raft.submit([member(n) for n in names])
    return raft


def remote_flags(sm: StateMachine) -> dict[str, bool]:
    return {q.name: q.remote for vh in sm._broker.vhosts.values() for q in vh.queues.values()}


def assert_converged(raft: FakeRaft) -> bytes:
    """Every replica holds the same replicated state, and each marks exactly the queues
    led by another node as remote. Returns the common snapshot."""
    snapshots = raft.snapshots()
    first = next(iter(snapshots.values()))
    for name, data in snapshots.items():
        assert data == first, name
    leaders = {n: sm.queue_leaders() for n, sm in raft.replicas.items()}
    assert len({repr(v) for v in leaders.values()}) == 1
    for name, sm in raft.replicas.items():
        expected = {q: bool(leader) and leader != name for _, q, leader, _ in sm.queue_leaders()}
        assert remote_flags(sm) == expected, name
    return first


# ---- the same log, the same state -------------------------------------------------------


def test_replicas_applying_the_same_log_agree() -> None:
    raft = cluster()
    raft.submit([c.DeclareExchange(vhost="/", exchange="x", type="topic", durable=True)])
    raft.submit([declare("q1", durable=True), place("q1", "a")])
    raft.submit([declare("q2"), place("q2", "b")])
    raft.submit([declare("q3", arguments={"x-max-length": 3}), place("q3", "c")])
    raft.submit([declare("excl", owner=7, exclusive=True), place("excl", "b")])
    raft.submit([c.BindQueue(vhost="/", queue="q1", exchange="x", routing_key="a.#", owner=1)])
    raft.submit([c.BindQueue(vhost="/", queue="q2", exchange="x", routing_key="*.b", owner=1)])
    raft.submit([c.BindExchange(vhost="/", destination="x", source="amq.fanout", routing_key="")])
    assert_converged(raft)
    assert raft["a"].leader_of("/", "q2") == "b"
    assert raft["a"].leader_counts() == {"a": 1, "b": 2, "c": 1}
    raft.submit([c.NodeDown(node="b")])
    data = assert_converged(raft)
    # excl went with b; q2 went to the least loaded live node (a and c tie: a).
    assert [(q, leader) for _, q, leader, _ in raft["c"].queue_leaders()] == [
        ("q1", "a"),
        ("q2", "a"),
        ("q3", "c"),
    ]
    raft.submit([c.NodeUp(node="b")])
    raft.submit([place("q2", "b", expect="a"), delete("q3")])
    raft.submit([c.UnbindQueue(vhost="/", queue="q1", exchange="x", routing_key="a.#", owner=1)])
    after = assert_converged(raft)
    assert after != data
    assert [(q, leader) for _, q, leader, _ in raft["a"].queue_leaders()] == [
        ("q1", "a"),
        ("q2", "b"),
    ]
    assert raft["b"].alive() == ["a", "b", "c"]
    # Routing, on every replica, reaches the same queues: local copies where they lead.
    routed: dict[str, Routed] = {}
    for name, sm in raft.replicas.items():
        reply = sm.apply(publish("q2")).reply
        assert isinstance(reply, Routed)
        routed[name] = reply
    assert routed["b"].remote == ()
    assert [q.name for q in routed["a"].remote] == ["q2"]
    assert [q.name for q in routed["c"].remote] == ["q2"]


def test_snapshot_does_not_depend_on_the_node_name() -> None:
    raft = cluster()
    raft.submit([declare("q"), place("q", "b")])
    snapshots = raft.snapshots()
    assert snapshots["a"] == snapshots["b"] == snapshots["c"]
    document = topology_document(snapshots["a"])
    assert document["broker"]["vhosts"][0]["leaders"] == {"q": "b"}
    # A machine outside the cluster's names, or outside any cluster, writes it alike.
    for name in ("someone-else", ""):
        other = StateMachine(node_name=name)
        for entry in raft.log:
            other.apply_logged(codec.decode_entry(entry))
        assert other.topology_snapshot() == snapshots["a"]


def test_local_traffic_does_not_reach_the_replicated_snapshot() -> None:
    """A Raft snapshot must be a function of the log: what a node's own clients do to the
    queues it leads (publish, consume, ack, get) is not replicated, so it must not change
    `topology_snapshot` (a follower restoring the leader's snapshot would otherwise take
    on the leader's clock, message counter and queue-use times)."""
    raft = cluster(("a", "b"))
    raft.submit([declare("q"), place("q", "a")])
    a = raft["a"]
    ref = ChannelRef(1, 1)
    a.apply(c.OpenChannel(channel=ref, now_ms=1_000))
    a.apply(publish("q", now_ms=2_000))
    a.apply(c.Consume(channel=ref, vhost="/", queue="q", consumer_tag="t", now_ms=3_000))
    a.apply(c.Ack(channel=ref, delivery_tag=1, now_ms=4_000))
    snapshots = raft.snapshots()
    assert snapshots["a"] == snapshots["b"]


def test_a_lagging_replica_catches_up_to_the_same_state() -> None:
    raft = cluster()
    raft.disconnect("c")
    raft.submit([declare("q1"), place("q1", "a")])
    raft.submit([c.NodeDown(node="a")])
    raft.submit([declare("q2"), place("q2", "a")])  # a is down: placed elsewhere
    assert raft["c"].queue_leaders() == []
    raft.reconnect("c")
    assert_converged(raft)
    assert raft["c"].leader_of("/", "q1") == "b"
    assert raft["c"].leader_of("/", "q2") == "c"


# ---- deletions a leader decides alone --------------------------------------------------


def test_a_queue_its_leader_deletes_goes_everywhere_once_the_deletion_commits() -> None:
    raft = cluster()
    raft.submit([declare("auto", auto_delete=True), place("auto", "a")])
    ref = ChannelRef(1, 1)
    raft.local("a", c.Consume(channel=ref, vhost="/", queue="auto", consumer_tag="t"))
    raft.local("a", c.Cancel(channel=ref, consumer_tag="t"))
    # Condemned on its leader: gone for a's clients, still in every replica's topology
    # (replicated commands must find the same queues everywhere) until the drop commits.
    gone = raft.local("a", declare("auto", passive=True)).reply
    assert isinstance(gone, AmqpError)
    assert gone.reply_code == 404
    assert raft["a"].queue_exists("/", "auto")
    assert raft["b"].queue_exists("/", "auto")
    assert raft.replicate_condemned() == 1
    assert_converged(raft)
    assert not any(sm.queue_exists("/", "auto") for sm in raft.replicas.values())


def test_an_expired_queue_declared_again_survives_its_old_deletion() -> None:
    """A client declares an x-expires queue again after it expired (clients commonly
    declare before each use). The declaration reaches the leader through the log, finds
    the old queue expired, and the leader replaces it by a fresh one; the fresh queue,
    just declared (a declaration counts as use), must survive the replicated deletion of
    the old one."""
    raft = cluster()
    args = {"x-expires": 100}
    raft.submit([declare("exp", arguments=args), place("exp", "a")])
    out = raft.submit([declare("exp", arguments=args, now_ms=500), place("exp", "a")])
    for outs in out.values():  # every node answered declare-ok
        assert outs[0] is not None
        assert isinstance(outs[0].reply, QueueDeclared)
    raft.replicate_condemned()
    assert_converged(raft)
    assert raft["b"].leader_of("/", "exp") == "a"
    assert raft["a"].queue_exists("/", "exp")


# ---- random logs ------------------------------------------------------------------------

QUEUES = ("q0", "q1", "q2", "q3")
NAMES = (*NODES, "x")  # "x" is never a member


def _queue_commands() -> st.SearchStrategy[c.AnyCommand]:
    queue = st.sampled_from(QUEUES)
    owner = st.sampled_from((1, 2))
    declares = st.builds(
        lambda q, o, ex, ad, expires: declare(
            q, owner=o, exclusive=ex, auto_delete=ad, arguments=expires
        ),
        queue,
        owner,
        st.booleans(),
        st.booleans(),
        st.sampled_from(({}, {"x-expires": 50})),
    )
    return st.one_of(
        declares,
        st.builds(lambda q, o: delete(q, o), queue, owner),
        st.builds(
            lambda q, n, e: place(q, n, expect=e),
            queue,
            st.sampled_from(NAMES),
            st.sampled_from(("", *NAMES)),
        ),
        st.builds(
            lambda q, x, k, o: c.BindQueue(vhost="/", queue=q, exchange=x, routing_key=k, owner=o),
            queue,
            st.sampled_from(("e0", "e1", "amq.direct")),
            st.sampled_from(("k", "")),
            owner,
        ),
        st.builds(
            lambda q, x, k: c.UnbindQueue(vhost="/", queue=q, exchange=x, routing_key=k, owner=1),
            queue,
            st.sampled_from(("e0", "e1", "amq.direct")),
            st.sampled_from(("k", "")),
        ),
    )


_node = st.sampled_from(NAMES)
COMMANDS = st.one_of(
    _queue_commands(),
    st.builds(member, st.sampled_from(NODES)),
    st.builds(lambda n: c.NodeDown(node=n), _node),
    st.builds(lambda n: c.NodeUp(node=n), _node),
    st.builds(lambda n: c.ForgetMember(node=n), _node),
    st.builds(
        lambda x, t, ad: c.DeclareExchange(vhost="/", exchange=x, type=t, auto_delete=ad),
        st.sampled_from(("e0", "e1")),
        st.sampled_from(("direct", "fanout")),
        st.booleans(),
    ),
    st.builds(lambda x: c.DeleteExchange(vhost="/", exchange=x), st.sampled_from(("e0", "e1"))),
    st.builds(lambda ms: c.Tick(now_ms=ms), st.integers(0, 200)),
)
ENTRIES = st.lists(st.lists(COMMANDS, min_size=1, max_size=4), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=ENTRIES, retry=st.lists(st.integers(0, 11), max_size=3))
def test_random_logs_converge(entries: list[list[c.AnyCommand]], retry: list[int]) -> None:
    raft = FakeRaft(NODES)
    submitted: list[bytes] = []
    for batch in entries:
        ids = [raft.new_id() for _ in batch]
        out = raft.submit(batch, ids)
        submitted.append(raft.log[-1])
        if not raft.condemned:
            # Nothing deleted by a leader on its own: every replica answered alike.
            replies = {
                n: [o.reply if o is not None else None for o in outs] for n, outs in out.items()
            }
            assert len({repr(r) for r in replies.values()}) == 1, replies
        # An x-expires queue past its time goes at its leader at once; the others follow
        # when the leader's shell has replicated the deletion.
        raft.replicate_condemned()
        assert_converged(raft)
    before = raft.snapshots()
    for i in retry:  # a retried submission: every command of it is skipped
        if i < len(submitted):
            out = raft.submit_raw(submitted[i])
            assert all(o is None for outs in out.values() for o in outs)
    assert raft.snapshots() == before
    for name, sm in raft.replicas.items():
        counts = sm.leader_counts()
        placed = [leader for _, _, leader, _ in sm.queue_leaders() if leader]
        assert sum(counts.values()) == len(placed)
        assert set(counts) >= set(sm.members)
        data = sm.topology_snapshot()
        restored = StateMachine.restore_topology(data, name)
        assert restored.topology_snapshot() == data
        assert remote_flags(restored) == remote_flags(sm)


# ---- restore_topology -------------------------------------------------------------------


def test_restore_topology_is_the_identity_and_sets_remote_per_node() -> None:
    raft = cluster()
    raft.submit([c.DeclareExchange(vhost="/", exchange="x", type="direct")])
    raft.submit([declare("qa", durable=True, arguments={"x-message-ttl": 5}), place("qa", "a")])
    raft.submit([declare("qb"), place("qb", "b")])
    raft.submit([declare("unplaced")])
    raft.submit([c.BindQueue(vhost="/", queue="qb", exchange="x", routing_key="k", owner=1)])
    raft.submit([c.NodeDown(node="c")])
    data = raft["a"].topology_snapshot()
    for name in (*NODES, "elsewhere"):
        restored = StateMachine.restore_topology(data, name)
        assert restored.topology_snapshot() == data
        assert restored.node_name == name
        assert restored.members == raft["a"].members
        assert restored.queue_leaders() == raft["a"].queue_leaders()
        assert remote_flags(restored) == {
            "qa": name != "a",
            "qb": name != "b",
            "unplaced": False,
        }
        assert list(restored.bindings("/")) == list(raft["a"].bindings("/"))
    assert raft["a"].members["c"] == MemberInfo("c", "c:7000", "c:7001", "c:5672", "", False)


def test_restored_replica_keeps_applying_the_log_and_its_dedup_window() -> None:
    raft = cluster()
    command_id = raft.new_id()
    raft.submit([declare("q"), place("q", "a")], [command_id, raft.new_id()])
    retried = codec.encode_batch([delete("q")], command_ids=[command_id])
    raft.restart("b")
    assert remote_flags(raft["b"]) == {"q": True}
    # The retried id is in the restored window: skipped on every replica alike.
    out = raft.submit_raw(retried)
    assert out["b"] == out["a"] == [None]
    raft.submit([declare("q2"), place("q2", "b")])
    assert_converged(raft)
    assert remote_flags(raft["b"]) == {"q": True, "q2": False}


def test_restore_topology_holds_no_messages() -> None:
    raft = cluster(("a",))
    raft.submit([declare("q"), place("q", "a")])
    raft["a"].apply(publish("q", b"lost"))
    assert raft["a"].queue_counts("/", "q") == (1, 0)
    restored = StateMachine.restore_topology(raft["a"].topology_snapshot(), "a")
    assert restored.queue_counts("/", "q") == (0, 0)
    assert restored.total_message_bytes == 0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"[]",
        b'{"format":"warren-state"}',
        b'{"format":"warren-topology","version":99}',
    ],
)
def test_restore_topology_refuses_what_it_cannot_read(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        StateMachine.restore_topology(data, "a")


def test_restore_topology_refuses_a_full_snapshot() -> None:
    with pytest.raises(SnapshotError):
        StateMachine.restore_topology(StateMachine().snapshot(), "a")


# ---- retried commands -------------------------------------------------------------------


def test_a_retried_command_applies_once() -> None:
    raft = cluster()
    command_id = raft.new_id()
    first = raft.submit([declare("q"), place("q", "b")], [command_id, raft.new_id()])
    assert isinstance(first["a"][0], type(first["b"][0]))
    # The same submission again (the client's node retried after a lost answer).
    again = raft.submit([declare("q")], [command_id])
    assert again == {n: [None] for n in NODES}
    # A retried delete does not delete the queue declared after it.
    delete_id = raft.new_id()
    raft.submit([delete("q")], [delete_id])
    raft.submit([declare("q"), place("q", "c")])
    raft.submit([delete("q")], [delete_id])
    assert raft["a"].leader_of("/", "q") == "c"
    assert_converged(raft)


def test_the_same_id_twice_in_one_entry_applies_once() -> None:
    raft = cluster(("a",))
    command_id = raft.new_id()
    out = raft.submit([declare("q"), delete("q")], [command_id, command_id])
    assert out["a"][1] is None
    assert raft["a"].queue_exists("/", "q")


def test_commands_without_an_id_always_apply() -> None:
    raft = cluster(("a",))
    out = raft.submit([declare("q"), delete("q"), declare("q")], [None, None, None])
    assert [type(o.reply) for o in out["a"] if o is not None] == [
        QueueDeclared,
        Count,
        QueueDeclared,
    ]
    # Only the Member announcement of `cluster()` had an id.
    assert topology_document(raft["a"].topology_snapshot())["applied_ids"] == [b"t\x001".hex()]


def test_the_dedup_window_forgets_the_oldest_ids() -> None:
    sm = StateMachine(node_name="a")
    tick = c.Tick()
    assert sm.apply_logged([(tick, b"first")]) != [None]
    sm.apply_logged([(tick, b"%d" % i) for i in range(DEDUP_WINDOW - 1)])
    assert sm.apply_logged([(tick, b"first")]) == [None]  # still remembered
    sm.apply_logged([(tick, b"one more")])  # pushes the oldest id out
    assert sm.apply_logged([(tick, b"0")]) == [None]
    assert sm.apply_logged([(tick, b"first")]) != [None]  # forgotten: applies again
    ids = topology_document(sm.topology_snapshot())["applied_ids"]
    assert len(ids) == DEDUP_WINDOW


# ---- NodeDown, NodeUp, ForgetMember -----------------------------------------------------


def test_node_down_moves_its_queues_to_the_least_loaded_live_nodes() -> None:
    raft = cluster(("a", "b", "c", "d"))
    raft.submit([declare("b1"), place("b1", "b")])
    raft.submit([declare("c1"), place("c1", "c")])
    for name in ("a1", "a2", "a3", "a4"):
        raft.submit([declare(name), place(name, "a")])
    raft.submit([declare("d1"), place("d1", "d")])
    raft.submit([declare("ax", owner=5, exclusive=True), place("ax", "a")])
    out = raft.submit([c.NodeDown(node="a")])
    assert all(o is not None and o.reply == Ok() for outs in out.values() for o in outs)
    # Loads before: b=1, c=1, d=1; a's queues go in declaration order to the least
    # loaded (ties by name): a1->b, a2->c, a3->d, a4->b. The exclusive one is gone.
    leaders = [(q, leader) for _, q, leader, _ in raft["d"].queue_leaders()]
    assert leaders == [
        ("b1", "b"),
        ("c1", "c"),
        ("a1", "b"),
        ("a2", "c"),
        ("a3", "d"),
        ("a4", "b"),
        ("d1", "d"),
    ]
    assert not raft["b"].queue_exists("/", "ax")
    assert raft["b"].alive() == ["b", "c", "d"]
    assert raft["b"].leader_counts() == {"a": 0, "b": 3, "c": 2, "d": 2}
    assert_converged(raft)
    # The moved queues start empty at their new leaders and take publishes there.
    routed = raft["b"].apply(publish("a1")).reply
    assert isinstance(routed, Routed)
    assert routed.remote == ()
    assert raft["b"].queue_counts("/", "a1") == (1, 0)


def test_a_node_applying_its_own_node_down_hands_its_queues_over() -> None:
    """A node cut off for a while catches up with the log and finds itself declared
    down: its consumers are cancelled and its ready messages go to the new leaders."""
    raft = cluster(("a", "b"))
    raft.submit([declare("q"), place("q", "a")])
    ref = ChannelRef(1, 1)
    for body in (b"1", b"2", b"3"):
        raft.local("a", publish("q", body))
    raft.local("a", c.Qos(channel=ref, prefetch_count=1))
    raft.local("a", c.Consume(channel=ref, vhost="/", queue="q", consumer_tag="t"))
    out = raft.submit([c.NodeDown(node="a")])
    effects = out["a"][0].effects if out["a"][0] is not None else []
    assert [e for e in effects if isinstance(e, CancelConsumer)] == [CancelConsumer(ref, "t")]
    forwards = [e for e in effects if isinstance(e, Forward)]
    # The unacked "1" goes too, first and redelivered (at least once).
    assert [(f.leader, f.queue, f.message.body, f.message.redelivered) for f in forwards] == [
        ("b", "q", b"1", True),
        ("b", "q", b"2", False),
        ("b", "q", b"3", False),
    ]
    assert out["b"][0] is not None
    assert out["b"][0].effects == []
    assert raft["a"].queue_counts("/", "q") == (0, 0)
    assert raft["a"].queue_leaders() == raft["b"].queue_leaders() == [("/", "q", "b", False)]
    assert remote_flags(raft["a"]) == {"q": True}
    assert remote_flags(raft["b"]) == {"q": False}


def test_node_down_of_a_dead_or_unknown_node_changes_nothing() -> None:
    raft = cluster()
    raft.submit([declare("q"), place("q", "a")])
    raft.submit([c.NodeDown(node="a")])
    before = raft.snapshots()["b"]
    leaders = raft["b"].queue_leaders()
    raft.submit([c.NodeDown(node="a")], [None])
    raft.submit([c.NodeDown(node="nobody")], [None])
    raft.submit([c.NodeUp(node="nobody")], [None])
    raft.submit([c.ForgetMember(node="nobody")], [None])
    assert raft["b"].queue_leaders() == leaders
    assert raft.snapshots()["b"] == before
    assert "nobody" not in raft["b"].members


def test_node_down_with_nobody_left_keeps_the_queues_where_they_are() -> None:
    raft = cluster(("a", "b"))
    raft.submit([declare("qa"), place("qa", "a")])
    raft.submit([declare("qb"), place("qb", "b")])
    raft.submit([c.NodeDown(node="a")])
    raft.submit([c.NodeDown(node="b")])
    assert raft["a"].alive() == []
    assert [leader for _, _, leader, _ in raft["a"].queue_leaders()] == ["b", "b"]
    raft.submit([c.NodeUp(node="b")])
    assert [leader for _, _, leader, _ in raft["a"].queue_leaders()] == ["b", "b"]
    assert remote_flags(raft["b"]) == {"qa": False, "qb": False}
    assert_converged(raft)


def test_node_up_makes_a_node_eligible_again() -> None:
    raft = cluster()
    raft.submit([declare("q1"), place("q1", "b")])
    raft.submit([c.NodeDown(node="b")])
    assert raft["a"].members["b"].alive is False
    assert raft["a"].leader_of("/", "q1") == "a"
    # While b is down a placement on it falls back to the least loaded live node.
    raft.submit([declare("q2"), place("q2", "b")])
    assert raft["a"].leader_of("/", "q2") == "c"
    raft.submit([c.NodeUp(node="b")])
    assert raft["a"].alive() == ["a", "b", "c"]
    assert raft["a"].members["b"].alive is True
    raft.submit([declare("q3"), place("q3", "b")])
    assert raft["a"].leader_of("/", "q3") == "b"
    # Its old queues did not come back by themselves.
    assert raft["a"].leader_of("/", "q1") == "a"
    assert_converged(raft)


def test_member_announcement_revives_and_updates_a_member() -> None:
    raft = cluster()
    raft.submit([c.NodeDown(node="c")])
    raft.submit([c.Member(name="c", raft="c2:7000", link="c2:7001", management="c2:15672")])
    info = raft["a"].members["c"]
    assert info == MemberInfo("c", "c2:7000", "c2:7001", "", "c2:15672", True)
    assert raft["b"].alive() == ["a", "b", "c"]


def test_forget_member_evacuates_and_forgets() -> None:
    raft = cluster()
    raft.submit([declare("q1"), place("q1", "c")])
    raft.submit([declare("q2"), place("q2", "a")])
    raft.submit([declare("cx", owner=3, exclusive=True), place("cx", "c")])
    raft.submit([c.ForgetMember(node="c")])
    assert "c" not in raft["a"].members
    assert raft["a"].alive() == ["a", "b"]
    assert raft["a"].leader_of("/", "q1") == "b"
    assert not raft["a"].queue_exists("/", "cx")
    assert raft["a"].leader_counts() == {"a": 1, "b": 1}
    assert_converged(raft)


def test_forget_member_of_a_dead_node_evacuates_what_it_still_leads() -> None:
    raft = cluster(("a", "b"))
    raft.submit([declare("q"), place("q", "b")])
    raft.submit([c.NodeDown(node="a")])
    raft.submit([c.NodeDown(node="b")])  # nobody left: q stays on b
    raft.submit([c.NodeUp(node="a")])
    raft.submit([c.ForgetMember(node="b")])
    assert raft["a"].leader_of("/", "q") == "a"
    assert remote_flags(raft["a"]) == {"q": False}
    assert_converged(raft)


# ---- SetLeader --------------------------------------------------------------------------


def test_set_leader_with_a_stale_expect_is_a_no_op() -> None:
    raft = cluster()
    raft.submit([declare("q"), place("q", "a")])
    raft.submit([place("q", "b", expect="a")])
    before = raft["c"].queue_leaders()
    # A second rebalance computed before the first move: it expects a, q is on b now.
    out = raft.submit([place("q", "c", expect="a")])
    assert all(o is not None and o.reply == Ok() and o.effects == [] for o in out["a"])
    assert raft["c"].queue_leaders() == before
    # A placement ("" expected) of a queue that already has a leader is stale too.
    raft.submit([place("q", "c")])
    assert raft["a"].leader_of("/", "q") == "b"
    assert_converged(raft)


def test_set_leader_of_a_missing_queue_is_a_no_op() -> None:
    raft = cluster()
    out = raft.submit([place("nothing", "a")])
    assert out["a"][0] is not None
    assert out["a"][0].reply == Ok()
    assert raft["a"].queue_leaders() == []


def test_placement_on_a_dead_or_unknown_member_falls_back_to_the_least_loaded() -> None:
    raft = cluster()
    raft.submit([declare("q0"), place("q0", "a")])
    raft.submit([declare("q1"), place("q1", "b")])
    raft.submit([c.NodeDown(node="c")])
    # a and b lead one each: the tie goes to a.
    raft.submit([declare("q2"), place("q2", "c")])
    assert raft["a"].leader_of("/", "q2") == "a"
    raft.submit([declare("q3"), place("q3", "ghost")])
    assert raft["a"].leader_of("/", "q3") == "b"
    # A move to a dead node falls back too: a and b lead two each, a wins the tie.
    raft.submit([place("q3", "c", expect="b")])
    assert raft["b"].leader_of("/", "q3") == "a"
    assert_converged(raft)


def test_leader_of_and_queue_leaders() -> None:
    raft = cluster(("a",))
    raft.submit([declare("q"), declare("x", owner=4, exclusive=True)])
    assert raft["a"].leader_of("/", "q") == ""
    assert raft["a"].leader_of("/", "missing") is None
    assert raft["a"].leader_of("nope", "q") is None
    raft.submit([place("q", "a"), place("x", "a")])
    assert raft["a"].queue_leaders() == [("/", "q", "a", False), ("/", "x", "a", True)]


def test_deleting_a_queue_releases_its_leader_slot() -> None:
    raft = cluster(("a", "b"))
    raft.submit([declare("q"), place("q", "a")])
    raft.submit([delete("q")])
    assert raft["b"].leader_counts() == {"a": 0, "b": 0}
    raft.submit([declare("q"), place("q", "b")])
    assert raft["a"].leader_of("/", "q") == "b"
    assert_converged(raft)


def test_errors_are_the_same_on_every_replica() -> None:
    raft = cluster()
    raft.submit([declare("q", owner=1, exclusive=True), place("q", "a")])
    out = raft.submit([declare("q", owner=2, exclusive=True)])
    errors = {n: outs[0].reply for n, outs in out.items() if outs[0] is not None}
    assert len(set(errors.values())) == 1
    assert isinstance(errors["a"], AmqpError)
    assert errors["a"].reply_code == 405
