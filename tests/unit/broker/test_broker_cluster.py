"""The broker model on one node of a cluster: queues led elsewhere are `remote` (publishes
to them are listed in `Routed.remote`, never enqueued here), deliveries made by another
node's queue are settled there (`RemoteSettle`), moves cancel consumers and forward
messages (`CancelConsumer`, `Forward`), and deletions one node decides happen there at
once and are reported as `Condemned` effects. Driven through `StateMachine.apply` on node
"a" of a cluster {a, b} unless a test says otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import (
    AmqpError,
    CancelConsumer,
    ChannelRef,
    Condemned,
    ConsumeOk,
    Count,
    Deliver,
    Effect,
    Forward,
    GetOk,
    Message,
    Ok,
    Outcome,
    Properties,
    QueueDeclared,
    RemoteSettle,
    Routed,
)
from tests.unit.cluster.conftest import Driver

REF = ChannelRef(1, 1)


def node(name: str = "a", members: tuple[str, ...] = ("a", "b")) -> Driver:
    d = Driver(StateMachine(node_name=name))
    for m in members:
        d.ok(c.Member(name=m, raft=f"{m}:7000"))
    return d


def led(d: Driver, queue: str, leader: str, **kw: Any) -> None:
    """Declare `queue` and place it on `leader`, as the replicated log would."""
    assert isinstance(d.ok(d.declare(queue, **kw)), QueueDeclared)
    d.ok(c.SetLeader(vhost="/", queue=queue, leader=leader))
    assert d.sm.leader_of("/", queue) == leader


def move(d: Driver, queue: str, leader: str, expect: str) -> Outcome:
    return d.run(c.SetLeader(vhost="/", queue=queue, leader=leader, expect=expect))


def remote_message(leader_tag: int, body: bytes = b"r") -> Message:
    """What the origin's shell builds from a DELIVER (its id is overwritten with the
    leader's tag by `external_delivery`)."""
    return Message(0, "", "qr", b"\x00\x00", Properties(), body)


def settles(out: Outcome) -> list[RemoteSettle]:
    return [e for e in out.effects if isinstance(e, RemoteSettle)]


def of_type(effects: list[Effect], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def routed(d: Driver, cmd: c.Publish) -> Routed:
    reply = d.ok(cmd)
    assert isinstance(reply, Routed)
    return reply


@pytest.fixture
def a() -> Driver:
    return node()


# ---- publish --------------------------------------------------------------------------


def test_publish_to_a_queue_led_elsewhere_is_listed_not_enqueued(a: Driver) -> None:
    led(a, "qr", "b")
    out = a.run(a.publish("", "qr", mandatory=True))
    reply = out.reply
    assert isinstance(reply, Routed)
    assert reply.queues == 1
    assert not reply.returned  # it was routed: no basic.return
    assert not reply.rejected
    assert [(q.name, q.leader) for q in reply.remote] == [("qr", "b")]
    assert out.effects == []
    assert a.sm.queue_counts("/", "qr") == (0, 0)
    assert a.sm.total_message_bytes == 0


def test_publish_to_local_and_remote_queues(a: Driver) -> None:
    a.ok(a.xdeclare("fan", "fanout"))
    led(a, "ql", "a")
    led(a, "qr", "b")
    led(a, "qr2", "b")
    for q in ("ql", "qr", "qr2"):
        a.ok(a.bind(q, "fan"))
    reply = routed(a, a.publish("fan", "", b"hello", mandatory=True))
    assert reply.queues == 3
    assert not reply.returned
    assert sorted(q.name for q in reply.remote) == ["qr", "qr2"]
    assert a.sm.queue_counts("/", "ql") == (1, 0)
    assert a.sm.queue_counts("/", "qr") == (0, 0)
    assert a.sm.total_message_bytes == 5
    got = a.ok(a.get("ql", no_ack=True))
    assert isinstance(got, GetOk)
    assert got.message.body == b"hello"


def test_publish_to_local_queues_only_lists_no_remote(a: Driver) -> None:
    led(a, "ql", "a")
    reply = routed(a, a.publish("", "ql"))
    assert reply == Routed(1)
    assert reply.remote == ()


def test_unrouted_mandatory_publish_is_still_returned(a: Driver) -> None:
    reply = routed(a, a.publish("", "nowhere", mandatory=True))
    assert reply.returned
    assert reply.remote == ()


def test_rejected_and_remote_together(a: Driver) -> None:
    a.ok(a.xdeclare("fan", "fanout"))
    led(a, "full", "a", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    led(a, "qr", "b")
    a.ok(a.bind("full", "fan"))
    a.ok(a.bind("qr", "fan"))
    reply = routed(a, a.publish("fan", ""))
    assert (reply.queues, reply.rejected, reply.returned) == (2, True, False)
    assert [q.name for q in reply.remote] == ["qr"]


def test_a_remote_queue_refuses_nothing_here(a: Driver) -> None:
    # Its length limit is enforced at its leader, which holds its messages.
    led(a, "qr", "b", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    reply = routed(a, a.publish("", "qr"))
    assert not reply.rejected
    assert [q.name for q in reply.remote] == ["qr"]


# ---- deliveries made by another node's queue --------------------------------------------


def setup_mixed(a: Driver) -> None:
    """Local queue ql with two messages delivered to consumer "lc" (tags 1, 2)."""
    led(a, "ql", "a")
    led(a, "qr", "b")
    a.ok(c.OpenChannel(channel=REF))
    a.ok(a.publish("", "ql", b"l1"))
    a.ok(a.publish("", "ql", b"l2"))
    out = a.run(a.consume("ql", "lc"))
    assert [e.delivery_tag for e in a.delivers(out)] == [1, 2]


def test_external_delivery_tags_follow_local_ones(a: Driver) -> None:
    setup_mixed(a)
    tag = a.sm.external_delivery(REF, "/", "qr", 77, remote_message(77), no_ack=False)
    assert tag == 3
    assert a.sm.channel_unacked(REF) == 3
    out = a.run(a.publish("", "ql", b"l3"))
    assert [e.delivery_tag for e in a.delivers(out)] == [4]
    assert a.sm.external_delivery(REF, "/", "qr", 78, remote_message(78), no_ack=True) == 5
    assert a.sm.channel_unacked(REF) == 4  # no_ack: nothing to settle


def test_ack_of_an_external_delivery_is_relayed(a: Driver) -> None:
    setup_mixed(a)
    tag = a.sm.external_delivery(REF, "/", "qr", 77, remote_message(77), no_ack=False)
    out = a.run(a.ack(tag))
    assert out.reply == Ok()
    assert settles(out) == [RemoteSettle("b", REF, 77, "ack", False)]
    assert not a.delivers(out)
    assert a.sm.channel_unacked(REF) == 2
    # Settled once: a second ack is an unknown tag.
    assert a.err(a.ack(tag)).reply_code == 406


def test_nack_requeue_of_an_external_delivery_is_relayed(a: Driver) -> None:
    setup_mixed(a)
    tag = a.sm.external_delivery(REF, "/", "qr", 9, remote_message(9), no_ack=False)
    out = a.run(a.nack(tag, requeue=True))
    assert settles(out) == [RemoteSettle("b", REF, 9, "nack", True)]
    assert a.sm.queue_counts("/", "qr") == (0, 0)


def test_nack_without_requeue_of_an_external_delivery_is_relayed(a: Driver) -> None:
    setup_mixed(a)
    tag = a.sm.external_delivery(REF, "/", "qr", 9, remote_message(9), no_ack=False)
    out = a.run(a.nack(tag, requeue=False))
    assert settles(out) == [RemoteSettle("b", REF, 9, "nack", False)]


def test_reject_of_an_external_delivery_is_relayed(a: Driver) -> None:
    setup_mixed(a)
    tag = a.sm.external_delivery(REF, "/", "qr", 5, remote_message(5), no_ack=False)
    out = a.run(a.nack(tag, requeue=False, reject=True))
    assert settles(out) == [RemoteSettle("b", REF, 5, "reject", False)]
    tag = a.sm.external_delivery(REF, "/", "qr", 6, remote_message(6), no_ack=False)
    out = a.run(a.nack(tag, requeue=True, reject=True))
    assert settles(out) == [RemoteSettle("b", REF, 6, "reject", True)]


def test_recover_requeues_local_and_relays_remote(a: Driver) -> None:
    setup_mixed(a)
    t3 = a.sm.external_delivery(REF, "/", "qr", 30, remote_message(30), no_ack=False)
    t4 = a.sm.external_delivery(REF, "/", "qr", 31, remote_message(31), no_ack=False)
    assert (t3, t4) == (3, 4)
    out = a.run(c.Recover(channel=REF))
    assert out.reply == Ok()
    assert settles(out) == [
        RemoteSettle("b", REF, 30, "nack", True),
        RemoteSettle("b", REF, 31, "nack", True),
    ]
    # The local ones come back redelivered to the local consumer, with new tags.
    again = a.delivers(out)
    assert [(e.message.body, e.redelivered, e.delivery_tag) for e in again] == [
        (b"l1", True, 5),
        (b"l2", True, 6),
    ]


def test_ack_multiple_settles_local_and_relays_remote_in_order(a: Driver) -> None:
    setup_mixed(a)
    a.sm.external_delivery(REF, "/", "qr", 100, remote_message(100), no_ack=False)  # 3
    a.ok(a.publish("", "ql", b"l3"))  # 4, local
    a.sm.external_delivery(REF, "/", "qr", 101, remote_message(101), no_ack=False)  # 5
    a.sm.external_delivery(REF, "/", "qr", 102, remote_message(102), no_ack=False)  # 6
    out = a.run(a.ack(5, multiple=True))
    assert out.reply == Ok()
    assert settles(out) == [
        RemoteSettle("b", REF, 100, "ack", False),
        RemoteSettle("b", REF, 101, "ack", False),
    ]
    assert a.sm.channel_unacked(REF) == 1  # the remote tag 6
    assert a.sm.queue_counts("/", "ql") == (0, 1)
    assert a.sm.total_message_bytes == 0  # l1..l3 acked; remote bodies were never counted
    out = a.run(a.ack(0, multiple=True))
    assert settles(out) == [RemoteSettle("b", REF, 102, "ack", False)]


def test_ack_many_relays_remote_tags(a: Driver) -> None:
    setup_mixed(a)
    t = a.sm.external_delivery(REF, "/", "qr", 55, remote_message(55), no_ack=False)
    out = a.run(c.AckMany(channel=REF, delivery_tags=(1, t, 2)))
    assert out.reply == Ok()
    assert settles(out) == [RemoteSettle("b", REF, 55, "ack", False)]
    assert a.sm.channel_unacked(REF) == 0


def test_nack_multiple_relays_only_the_remote_entries(a: Driver) -> None:
    setup_mixed(a)
    a.sm.external_delivery(REF, "/", "qr", 7, remote_message(7), no_ack=False)
    out = a.run(a.nack(0, multiple=True, requeue=True))
    assert settles(out) == [RemoteSettle("b", REF, 7, "nack", True)]
    # The local two went back and came straight back to the local consumer.
    assert [e.message.body for e in a.delivers(out)] == [b"l1", b"l2"]


def test_closing_the_channel_drops_remote_entries_silently(a: Driver) -> None:
    setup_mixed(a)
    a.sm.external_delivery(REF, "/", "qr", 7, remote_message(7), no_ack=False)
    out = a.run(c.CloseChannel(channel=REF))
    assert out.reply == Ok()
    assert out.effects == []  # no RemoteSettle: the leader requeues on its own
    assert a.sm.queue_counts("/", "ql") == (2, 0)  # local ones requeued
    assert a.sm.queue_counts("/", "qr") == (0, 0)
    assert a.sm.total_message_bytes == 4


def test_external_delivery_of_an_unknown_queue_is_void(a: Driver) -> None:
    a.ok(c.OpenChannel(channel=REF))
    tag = a.sm.external_delivery(REF, "/", "gone", 3, remote_message(3), no_ack=False)
    out = a.run(a.ack(tag))
    assert settles(out) == [RemoteSettle("", REF, 3, "ack", False)]


# ---- moves ----------------------------------------------------------------------------


def test_moving_a_local_queue_away_cancels_consumers_and_forwards_ready_in_order(
    a: Driver,
) -> None:
    led(a, "q", "a")
    other = ChannelRef(2, 1)
    a.ok(a.qos(1))
    a.ok(a.qos(1, channel=other))
    for body in (b"m1", b"m2", b"m3", b"m4"):
        a.ok(a.publish("", "q", body))
    assert a.bodies(a.run(a.consume("q", "c1"))) == [b"m1"]
    assert a.bodies(a.run(a.consume("q", "c2", channel=other))) == [b"m2"]
    out = move(a, "q", "b", expect="a")
    assert out.reply == Ok()
    assert of_type(out.effects, CancelConsumer) == [
        CancelConsumer(REF, "c1"),
        CancelConsumer(other, "c2"),
    ]
    forwards = of_type(out.effects, Forward)
    # The delivered-but-unacked ones move too, first and marked redelivered: nothing a
    # rebalance moves is lost (their acks here are void now).
    assert [(f.leader, f.queue, f.message.body, f.message.redelivered) for f in forwards] == [
        ("b", "q", b"m1", True),
        ("b", "q", b"m2", True),
        ("b", "q", b"m3", False),
        ("b", "q", b"m4", False),
    ]
    assert not a.sm.has_consumer(REF, "c1")
    assert not a.sm.has_consumer(other, "c2")
    assert a.sm.queue_counts("/", "q") == (0, 0)
    assert a.sm.leader_of("/", "q") == "b"
    assert a.sm.total_message_bytes == 0  # m1 and m2 are void, the rest forwarded
    # The unacked m1 and m2 became void.
    assert settles(a.run(a.ack(1))) == [RemoteSettle("", REF, 1, "ack", False)]
    assert settles(a.run(a.nack(1, channel=other, requeue=True))) == [
        RemoteSettle("", other, 2, "nack", True)
    ]


def test_forwarded_messages_keep_queue_order() -> None:
    a = node()
    led(a, "q", "a", arguments={"x-message-ttl": 60_000})
    for body in (b"1", b"2", b"3", b"4"):
        a.ok(a.publish("", "q", body))
    a.ok(a.get("q"))  # tag 1: "1"
    a.ok(a.get("q"))  # tag 2: "2"
    a.ok(a.nack(2, requeue=True))  # "2" returns to its place, before "3"
    out = move(a, "q", "b", expect="a")
    forwards = of_type(out.effects, Forward)
    # "1", unacked here, moves first (redelivered), then the ready ones in queue order.
    assert [f.message.body for f in forwards] == [b"1", b"2", b"3", b"4"]
    assert [f.message.redelivered for f in forwards] == [True, True, False, False]
    assert all(f.message.expires_ms is None for f in forwards)
    assert of_type(out.effects, CancelConsumer) == []
    # "1" is void here now: its ack relays nothing.
    ack = a.run(a.ack(1))
    assert ack.reply == Ok()
    assert settles(ack) == [RemoteSettle("", REF, 1, "ack", False)]
    assert a.sm.total_message_bytes == 0
    assert a.sm.queue_counts("/", "q") == (0, 0)


def test_void_deliveries_of_a_moved_queue_relay_nothing_on_any_settle() -> None:
    a = node()
    led(a, "q", "a")
    for body in (b"1", b"2", b"3"):
        a.ok(a.publish("", "q", body))
    a.ok(a.consume("q", "c"))
    move(a, "q", "b", expect="a")
    assert settles(a.run(a.nack(1, requeue=True))) == [RemoteSettle("", REF, 1, "nack", True)]
    assert settles(a.run(a.nack(2, reject=True, requeue=False))) == [
        RemoteSettle("", REF, 2, "reject", False)
    ]
    assert a.sm.queue_counts("/", "q") == (0, 0)  # nothing came back here
    out = a.run(c.CloseChannel(channel=REF))
    assert out.effects == []
    assert a.sm.total_message_bytes == 0


def test_after_moving_away_publishes_are_remote(a: Driver) -> None:
    led(a, "q", "a")
    move(a, "q", "b", expect="a")
    reply = routed(a, a.publish("", "q"))
    assert [q.name for q in reply.remote] == ["q"]
    assert a.sm.queue_counts("/", "q") == (0, 0)


def test_moving_a_remote_queue_here_starts_it_empty(a: Driver) -> None:
    led(a, "q", "b")
    a.ok(c.OpenChannel(channel=REF))
    tag = a.sm.external_delivery(REF, "/", "q", 12, remote_message(12), no_ack=False)
    out = move(a, "q", "a", expect="b")
    assert out.reply == Ok()
    assert out.effects == []
    assert a.sm.queue_counts("/", "q") == (0, 0)
    # Its old leader's delivery is void now.
    assert settles(a.run(a.ack(tag))) == [RemoteSettle("", REF, 12, "ack", False)]
    reply = routed(a, a.publish("", "q", b"here"))
    assert reply.remote == ()
    assert a.sm.queue_counts("/", "q") == (1, 0)
    out = a.run(a.consume("q", "c"))
    assert a.bodies(out) == [b"here"]


def test_moving_between_two_other_nodes_changes_only_the_leader() -> None:
    b_and_c = node(members=("a", "b", "c"))
    led(b_and_c, "q", "b")
    out = move(b_and_c, "q", "c", expect="b")
    assert out.effects == []
    reply = routed(b_and_c, b_and_c.publish("", "q"))
    assert [(q.name, q.leader) for q in reply.remote] == [("q", "c")]


def test_dead_lettering_to_a_remote_queue_forwards(a: Driver) -> None:
    led(a, "dlq", "b")
    led(
        a,
        "src",
        "a",
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dlq"},
    )
    a.ok(a.publish("", "src", b"dead"))
    a.ok(a.get("src"))
    out = a.run(a.nack(1, requeue=False))
    forwards = of_type(out.effects, Forward)
    assert [(f.leader, f.vhost, f.queue, f.message.body) for f in forwards] == [
        ("b", "/", "dlq", b"dead")
    ]
    assert a.sm.queue_counts("/", "dlq") == (0, 0)
    assert a.sm.total_message_bytes == 0


# ---- deletions one node decides ---------------------------------------------------------
# In a cluster the leader deletes the queue at once (its client sees 404 right after, as
# with RabbitMQ) and reports it as `Condemned`; its shell replicates a DeleteQueue, and
# the other nodes drop their copy when that commits.


def condemned(out: Outcome) -> list[tuple[str, str, int]]:
    return [(e.vhost, e.queue, e.owner) for e in of_type(out.effects, Condemned)]


def test_clustered_auto_delete_on_last_cancel_is_condemned_then_dropped() -> None:
    a, b = node("a"), node("b")
    for d in (a, b):
        led(d, "auto", "a", auto_delete=True)
    a.ok(a.consume("auto", "c1"))
    a.ok(a.consume("auto", "c2"))
    assert a.run(c.Cancel(channel=REF, consumer_tag="c1")).effects == []
    out = a.run(c.Cancel(channel=REF, consumer_tag="c2"))
    assert condemned(out) == [("/", "auto", 0)]
    # Gone for this node's clients at once; still in the topology every replica shares
    # until the replicated DropQueue commits.
    assert a.err(a.consume("auto", "c3")).reply_code == 404
    assert a.sm.queue_exists("/", "auto")
    assert b.sm.queue_exists("/", "auto")
    (effect,) = of_type(out.effects, Condemned)
    for d in (a, b):
        d.ok(c.DropQueue(vhost="/", queue="auto", touched=effect.touched))
        assert not d.sm.queue_exists("/", "auto")


def test_clustered_auto_delete_on_channel_close_is_condemned(a: Driver) -> None:
    led(a, "auto", "a", auto_delete=True)
    a.ok(a.consume("auto", "c1"))
    out = a.run(c.CloseChannel(channel=REF))
    assert condemned(out) == [("/", "auto", 0)]
    assert a.err(a.declare("auto", passive=True)).reply_code == 404


def test_clustered_exclusive_owner_gone_is_condemned(a: Driver) -> None:
    assert isinstance(a.ok(a.declare("mine", exclusive=True)), QueueDeclared)
    a.ok(c.SetLeader(vhost="/", queue="mine", leader="a"))
    out = a.run(c.CloseConnection(conn=REF.conn))
    assert condemned(out) == [("/", "mine", REF.conn)]
    assert a.err(a.declare("mine", passive=True)).reply_code == 404


def test_condemned_once_per_deletion(a: Driver) -> None:
    led(a, "auto", "a", auto_delete=True)
    a.ok(a.consume("auto", "c1"))
    assert condemned(a.run(c.Cancel(channel=REF, consumer_tag="c1"))) == [("/", "auto", 0)]
    assert a.run(c.Cancel(channel=REF, consumer_tag="c1")).effects == []
    assert a.run(c.CloseChannel(channel=REF)).effects == []
    assert a.run(c.Tick(now_ms=10)).effects == []


def test_a_drop_spares_a_queue_declared_again_since() -> None:
    a = node("a")
    led(a, "auto", "a", auto_delete=True)
    a.ok(a.consume("auto", "c1"))
    (effect,) = of_type(a.run(c.Cancel(channel=REF, consumer_tag="c1")).effects, Condemned)
    a.ok(a.declare("auto", auto_delete=True))  # from the log, before the drop commits
    a.ok(c.DropQueue(vhost="/", queue="auto", touched=effect.touched))
    assert a.sm.queue_exists("/", "auto")
    a.ok(a.consume("auto", "c2"))  # not condemned any more


def test_x_expires_in_a_cluster_condemns_only_on_the_leader() -> None:
    leader, follower = node("a"), node("b")
    for d in (leader, follower):
        led(d, "exp", "a", arguments={"x-expires": 100})
    for d in (leader, follower):
        assert d.run(c.Tick(now_ms=50)).effects == []
    out = leader.run(c.Tick(now_ms=200))
    assert condemned(out) == [("/", "exp", 0)]
    assert leader.err(leader.declare("exp", passive=True)).reply_code == 404
    assert follower.run(c.Tick(now_ms=200)).effects == []
    assert follower.sm.queue_exists("/", "exp")
    assert leader.run(c.Tick(now_ms=400)).effects == []  # reported once
    (effect,) = of_type(out.effects, Condemned)
    for d in (leader, follower):
        d.ok(c.DropQueue(vhost="/", queue="exp", touched=effect.touched))
        assert not d.sm.queue_exists("/", "exp")


def test_x_expires_noticed_by_a_lookup_is_condemned_too() -> None:
    leader = node("a")
    led(leader, "exp", "a", arguments={"x-expires": 100})
    # Idle past x-expires, and the first to notice is a lookup (a basic.get), not a tick.
    out = leader.run(c.Get(channel=REF, vhost="/", queue="exp", now_ms=500))
    assert isinstance(out.reply, AmqpError)
    assert out.reply.reply_code == 404
    assert condemned(out) == [("/", "exp", 0)]


def test_x_expires_restarts_when_a_queue_fails_over_here() -> None:
    """Uses of a queue at its leader (consumers, gets) are not replicated, so a replica's
    idea of when it was last used is as old as its declaration. When the queue fails over
    to that replica, its new leader must not delete it at once for idleness it never
    saw: the consumers cancelled by the move have had no chance to come back."""
    b = node("b")
    led(b, "exp", "a", arguments={"x-expires": 1_000})
    # An hour later a (which served the queue's consumers all along) goes down.
    b.ok(c.NodeDown(node="a", now_ms=3_600_000))
    assert b.sm.leader_of("/", "exp") == "b"
    out = b.run(c.Tick(now_ms=3_600_010))
    assert of_type(out.effects, Condemned) == []
    assert b.sm.queue_exists("/", "exp")
    # Unused for x-expires after the move, it goes.
    out = b.run(c.Tick(now_ms=3_601_500))
    assert condemned(out) == [("/", "exp", 0)]


def test_unclustered_auto_delete_deletes_at_once_without_condemning() -> None:
    d = Driver()
    d.ok(d.declare("auto", auto_delete=True))
    d.ok(d.consume("auto", "c1"))
    out = d.run(c.Cancel(channel=REF, consumer_tag="c1"))
    assert out.effects == []
    assert not d.sm.queue_exists("/", "auto")


def test_exclusive_queue_led_elsewhere_is_not_condemned_here(a: Driver) -> None:
    led(a, "theirs", "b", exclusive=True)
    out = a.run(c.CloseConnection(conn=1))
    assert out.effects == []
    assert a.sm.queue_exists("/", "theirs")


def test_auto_delete_queue_led_elsewhere_is_not_condemned_here(a: Driver) -> None:
    led(a, "theirs", "b", auto_delete=True)
    out = a.run(c.CloseConnection(conn=1))
    assert out.effects == []
    assert a.sm.queue_exists("/", "theirs")


def test_x_expires_unclustered_deletes_at_once() -> None:
    d = Driver()
    d.ok(d.declare("exp", arguments={"x-expires": 100}))
    assert d.run(c.Tick(now_ms=200)).effects == []
    assert not d.sm.queue_exists("/", "exp")


# ---- forwarded messages at the leader -----------------------------------------------------


def forwarded(a: Driver, body: bytes = b"f", expiration: str | None = None) -> c.Publish:
    cmd = a.publish("", "ignored", body)
    return c.Publish(
        channel=ChannelRef(99, 1),
        vhost="/",
        exchange="x",
        routing_key="rk",
        mandatory=False,
        properties=cmd.properties,
        props=Properties(expiration=expiration),
        body=body,
        now_ms=0,
    )


def test_enqueue_forwarded_enqueues_and_delivers(a: Driver) -> None:
    led(a, "q", "a")
    a.ok(a.consume("q", "c"))
    accepted, effects = a.sm.enqueue_forwarded(forwarded(a, b"hi"), ["q"])
    assert accepted
    delivered = of_type(effects, Deliver)
    assert [(e.message.body, e.message.exchange, e.message.routing_key) for e in delivered] == [
        (b"hi", "x", "rk")
    ]


def test_enqueue_forwarded_honours_reject_publish(a: Driver) -> None:
    led(a, "q", "a", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    led(a, "roomy", "a")
    assert a.sm.enqueue_forwarded(forwarded(a, b"1"), ["q"]) == (True, [])
    accepted, _ = a.sm.enqueue_forwarded(forwarded(a, b"2"), ["q", "roomy"])
    assert accepted is False
    assert a.sm.queue_counts("/", "q") == (1, 0)
    assert a.sm.queue_counts("/", "roomy") == (1, 0)  # the other queue still took it


def test_enqueue_forwarded_to_a_queue_led_elsewhere_is_not_confirmed(a: Driver) -> None:
    # The sender routed by an older view (the queue moved since): confirming would lose
    # the message, so the publisher gets a nack and publishes again.
    led(a, "elsewhere", "b")
    led(a, "here", "a")
    accepted, effects = a.sm.enqueue_forwarded(forwarded(a), ["elsewhere", "here"])
    assert accepted is False
    assert effects == []
    assert a.sm.queue_counts("/", "elsewhere") == (0, 0)
    assert a.sm.queue_counts("/", "here") == (1, 0)  # the queue led here still took it
    assert a.sm.total_message_bytes == 1


def test_enqueue_forwarded_to_a_deleted_queue_is_dropped_and_confirmed(a: Driver) -> None:
    led(a, "here", "a")
    accepted, _ = a.sm.enqueue_forwarded(forwarded(a), ["missing", "here"])
    assert accepted
    assert a.sm.queue_counts("/", "here") == (1, 0)


def test_enqueue_forwarded_while_catching_up_is_not_confirmed(a: Driver) -> None:
    # A restarting node's view is older than the sender's until it has caught up.
    led(a, "q", "a")
    a.sm.begin_catch_up()
    assert a.sm.enqueue_forwarded(forwarded(a), ["q"]) == (False, [])
    assert a.sm.queue_counts("/", "q") == (0, 0)


def test_enqueue_forwarded_to_a_missing_vhost_is_dropped(a: Driver) -> None:
    cmd = forwarded(a)
    other = c.Publish(
        channel=cmd.channel,
        vhost="nope",
        exchange=cmd.exchange,
        routing_key=cmd.routing_key,
        mandatory=False,
        properties=cmd.properties,
        props=cmd.props,
        body=cmd.body,
    )
    assert a.sm.enqueue_forwarded(other, ["q"]) == (True, [])


def test_enqueue_forwarded_keeps_message_order_and_expiration(a: Driver) -> None:
    led(a, "q", "a")
    for body in (b"1", b"2", b"3"):
        a.sm.enqueue_forwarded(forwarded(a, body, expiration="1000"), ["q"])
    assert [body for body, _ in a.drain("q")] == [b"1", b"2", b"3"]
    a.sm.enqueue_forwarded(forwarded(a, b"old", expiration="10"), ["q"])
    a.run(c.Tick(now_ms=100))
    assert a.sm.queue_counts("/", "q") == (0, 0)


# ---- check_delete -------------------------------------------------------------------------


def check(a: Driver, queue: str, owner: int = 1, **kw: Any) -> Any:
    return a.sm.check_delete(c.DeleteQueue(vhost="/", queue=queue, owner=owner, **kw))


def test_check_delete_reports_in_use_not_empty_and_count(a: Driver) -> None:
    led(a, "q", "a")
    a.ok(a.publish("", "q", b"1"))
    a.ok(a.publish("", "q", b"2"))
    assert check(a, "q") == Count(2)
    assert check(a, "q", if_empty=False, if_unused=True) == Count(2)
    err = check(a, "q", if_empty=True)
    assert isinstance(err, AmqpError)
    assert (err.reply_code, err.class_id, err.method_id) == (406, 50, 40)
    assert "not empty" in err.reply_text
    a.ok(a.qos(1))
    a.ok(a.consume("q", "c"))  # one of the two is now unacked
    assert check(a, "q") == Count(1)
    err = check(a, "q", if_unused=True)
    assert isinstance(err, AmqpError)
    assert err.reply_code == 406
    assert "in use" in err.reply_text
    # Only checks: nothing changed.
    assert a.sm.queue_exists("/", "q")
    assert a.sm.queue_counts("/", "q") == (1, 1)


def test_check_delete_of_missing_queue_locked_queue_and_missing_vhost(a: Driver) -> None:
    assert check(a, "missing") == Count(0)
    led(a, "mine", "a", exclusive=True)
    err = check(a, "mine", owner=2)
    assert isinstance(err, AmqpError)
    assert err.reply_code == 405
    assert check(a, "mine", owner=1) == Count(0)
    err = a.sm.check_delete(c.DeleteQueue(vhost="nope", queue="q", owner=1))
    assert isinstance(err, AmqpError)
    assert (err.reply_code, err.connection) == (530, True)


def test_queue_counts(a: Driver) -> None:
    assert a.sm.queue_counts("/", "missing") is None
    assert a.sm.queue_counts("nope", "q") is None
    led(a, "q", "a")
    a.ok(a.publish("", "q"))
    assert a.sm.queue_counts("/", "q") == (1, 0)
    assert isinstance(a.ok(a.consume("q", "c")), ConsumeOk)
    assert a.sm.queue_counts("/", "q") == (0, 1)
