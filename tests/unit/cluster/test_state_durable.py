"""Durable queues' replicated logs in the state machine (no Raft: tests/unit/cluster/
fake_raft): a persistent message for a durable queue is logged before it is enqueued;
every replica stores it; the leader's settles and returns reach every replica; a new
leader serves the whole log, flagged redelivered; snapshots carry the logs."""

from __future__ import annotations

from typing import Any

from cluster import commands as c
from cluster.durable import _persist
from cluster.state import StateMachine
from node.broker.types import ChannelRef, Deliver, Properties, Routed
from tests.unit.cluster.fake_raft import FakeRaft
from tests.unit.cluster.test_state_cluster import cluster, declare, member, place

PERSISTENT = Properties(delivery_mode=2)
CH = ChannelRef(1, 1)


def publish(queue: str, body: bytes, props: Properties = PERSISTENT, now_ms: int = 0) -> Any:
    return c.Publish(
        channel=CH,
        vhost="/",
        exchange="",
        routing_key=queue,
        mandatory=False,
        properties=b"\x00\x00",
        props=props,
        body=body,
        now_ms=now_ms,
    )


def replicate(raft: FakeRaft, node: str) -> None:
    """What cluster/durable.py does for `node`: its logged messages and settles, as one
    log entry (the first command carries the entry's id)."""
    to_log, settled = raft.replicas[node].take_durable()
    commands: list[c.AnyCommand] = [_persist(q.vhost, q.name, m) for q, m in to_log]
    for q, (gone, returned) in settled.items():
        commands.append(
            c.Settle(vhost=q.vhost, queue=q.name, gone=tuple(gone), returned=tuple(returned))
        )
    if commands:
        raft.submit(commands, [raft.new_id(node)] + [None] * (len(commands) - 1))


def queue_of(sm: StateMachine, name: str) -> Any:
    queue = sm._broker.find_queue("/", name)
    assert queue is not None
    return queue


def durable_cluster(name: str = "q", leader: str = "a") -> FakeRaft:
    raft = cluster()
    raft.submit([declare(name, durable=True), place(name, leader)])
    for sm in raft.replicas.values():
        sm.apply(c.OpenChannel(channel=CH))
    return raft


def test_a_persistent_message_is_logged_on_every_node_before_it_is_enqueued() -> None:
    raft = durable_cluster()
    out = raft.local("a", publish("q", b"one"))
    assert isinstance(out.reply, Routed)
    assert out.reply.durable
    assert queue_of(raft.replicas["a"], "q").message_count == 0  # not before the commit
    replicate(raft, "a")
    for name, sm in raft.replicas.items():
        queue = queue_of(sm, "q")
        assert [m.body for m in queue.log.values()] == [b"one"], name
    assert queue_of(raft.replicas["a"], "q").message_count == 1  # the leader's live copy
    assert queue_of(raft.replicas["b"], "q").message_count == 0  # followers only store


def test_transient_messages_and_non_durable_queues_are_not_logged() -> None:
    raft = durable_cluster()
    raft.submit([declare("t", durable=False), place("t", "a")])
    out = raft.local("a", publish("q", b"transient", Properties(delivery_mode=1)))
    assert isinstance(out.reply, Routed)
    assert not out.reply.durable
    out = raft.local("a", publish("t", b"persistent, non-durable queue"))
    assert isinstance(out.reply, Routed)
    assert not out.reply.durable
    assert raft.replicas["a"].take_durable() == ([], {})


def test_acks_and_requeues_reach_every_replica() -> None:
    raft = durable_cluster()
    for n in range(3):
        raft.local("a", publish("q", f"m{n}".encode()))
    replicate(raft, "a")
    a = raft.replicas["a"]
    a.apply(c.Consume(channel=CH, vhost="/", queue="q", consumer_tag="t"))
    out = a.apply(c.Ack(channel=CH, delivery_tag=1))  # m0 acked
    out = a.apply(c.Nack(channel=CH, delivery_tag=2, requeue=True))  # m1 requeued
    assert any(isinstance(e, Deliver) for e in out.effects)
    replicate(raft, "a")
    for name in ("b", "c"):
        log = queue_of(raft.replicas[name], "q").log
        assert [m.body for m in log.values()] == [b"m1", b"m2"], name
        m1 = next(iter(log.values()))
        assert (m1.delivery_count, m1.redelivered) == (1, True)


def test_a_new_leader_serves_the_whole_log_flagged_redelivered() -> None:
    raft = durable_cluster()
    for n in range(4):
        raft.local("a", publish("q", f"m{n}".encode()))
    replicate(raft, "a")
    a = raft.replicas["a"]
    a.apply(c.Consume(channel=CH, vhost="/", queue="q", consumer_tag="t"))
    a.apply(c.Ack(channel=CH, delivery_tag=1))
    replicate(raft, "a")  # m0's ack is replicated; m1-m3 are delivered, unacked
    raft.submit([c.NodeDown(node="a")])  # a dies: the queue moves
    leader = raft.replicas["b"].leader_of("/", "q")
    assert leader in ("b", "c")
    new = raft.replicas[leader]
    new.apply(c.OpenChannel(channel=ChannelRef(9, 1)))
    got = []
    for _ in range(4):
        out = new.apply(c.Get(channel=ChannelRef(9, 1), vhost="/", queue="q", no_ack=True))
        if getattr(out.reply, "message", None) is None:
            break
        got.append((out.reply.message.body, out.reply.redelivered))  # type: ignore[union-attr]
    assert got == [(b"m1", True), (b"m2", True), (b"m3", True)]


def test_an_ack_replicated_after_the_queue_moved_removes_the_new_leaders_copy() -> None:
    raft = durable_cluster()
    raft.local("a", publish("q", b"m0"))
    replicate(raft, "a")
    a = raft.replicas["a"]
    a.apply(c.Consume(channel=CH, vhost="/", queue="q", consumer_tag="t"))
    a.apply(c.Ack(channel=CH, delivery_tag=1))  # settle not replicated yet
    raft.submit([place("q", "b", expect="a")])  # the queue moves to b first
    assert queue_of(raft.replicas["b"], "q").message_count == 1
    replicate(raft, "a")  # then a's late settle
    assert queue_of(raft.replicas["b"], "q").message_count == 0
    assert not queue_of(raft.replicas["b"], "q").log


def test_a_retried_entry_logs_its_messages_once() -> None:
    raft = durable_cluster()
    raft.local("a", publish("q", b"once"))
    to_log, _ = raft.replicas["a"].take_durable()
    commands = [_persist("/", "q", m) for _, m in to_log]
    entry_id = raft.new_id("a")
    raft.submit(commands, [entry_id])
    raft.submit(commands, [entry_id])  # the same entry again (a retried submission)
    assert [m.body for m in queue_of(raft.replicas["c"], "q").log.values()] == [b"once"]


def test_topology_snapshots_carry_the_logs_and_agree_across_replicas() -> None:
    raft = durable_cluster()
    for n in range(3):
        raft.local("a", publish("q", f"m{n}".encode()))
    replicate(raft, "a")
    a = raft.replicas["a"]
    a.apply(c.Consume(channel=CH, vhost="/", queue="q", consumer_tag="t"))  # delivered here
    snapshots = {n: sm.topology_snapshot() for n, sm in raft.replicas.items()}
    assert len(set(snapshots.values())) == 1  # live deliveries do not change the log
    restored = StateMachine.restore_topology(snapshots["a"], "b")
    assert [m.body for m in queue_of(restored, "q").log.values()] == [b"m0", b"m1", b"m2"]
    assert restored._broker.next_rid == raft.replicas["a"]._broker.next_rid
    assert restored.topology_snapshot() == snapshots["a"]


def test_a_node_that_catches_up_holds_live_copies_only_once_active() -> None:
    raft = FakeRaft(("a", "b", "c"))
    raft.replicas["a"].begin_catch_up()
    raft.submit([member(n) for n in ("a", "b", "c")])
    raft.submit([declare("q", durable=True), place("q", "a")])
    raft.replicas["b"].apply(c.OpenChannel(channel=CH))
    raft.submit([_persist("/", "q", _message(b"x"))])
    a = raft.replicas["a"]
    assert queue_of(a, "q").message_count == 0
    assert len(queue_of(a, "q").log) == 1
    a.activate(0)
    assert queue_of(a, "q").message_count == 1


def _message(body: bytes) -> Any:
    from node.broker.types import Message

    return Message(0, "", "q", b"\x00\x00", PERSISTENT, body)
