"""basic.* through StateMachine.apply: publish, consume, prefetch, priorities, get, acks,
requeue order, recover, channel and connection close, flow control."""

from __future__ import annotations

from cluster import commands as c
from node.broker.types import AmqpError, ConsumeOk, Deliver, GetEmpty, GetOk, Ok, Routed


def test_publish_to_missing_exchange(d) -> None:
    assert d.err(d.publish("nope", "k")) == AmqpError(
        404, "NOT_FOUND - no exchange 'nope' in vhost '/'", 60, 40
    )


def test_publish_routing_results(d) -> None:
    d.ok(d.declare("q"))
    assert d.ok(d.publish("", "q")) == Routed(1)
    assert d.ok(d.publish("", "nobody")) == Routed(0)
    assert d.ok(d.publish("", "nobody", mandatory=True)) == Routed(0, returned=True)
    d.ok(d.declare("q2"))
    d.ok(d.bind("q", "amq.fanout"))
    d.ok(d.bind("q2", "amq.fanout"))
    assert d.ok(d.publish("amq.fanout", "", mandatory=True)) == Routed(2)


def test_message_ids_increase_and_each_queue_owns_its_copy(d) -> None:
    d.ok(d.declare("a"))
    d.ok(d.declare("b"))
    d.ok(d.bind("a", "amq.fanout"))
    d.ok(d.bind("b", "amq.fanout"))
    d.ok(d.publish("amq.fanout", "", b"1"))
    d.ok(d.publish("amq.fanout", "", b"2"))
    got_a = [d.ok(d.get("a")) for _ in range(2)]
    got_b = [d.ok(d.get("b")) for _ in range(2)]
    assert [g.message.id for g in got_a] == [g.message.id for g in got_b]
    assert got_a[0].message.id < got_a[1].message.id
    # Requeueing in one queue does not mark the other queue's copy redelivered.
    d.ok(d.nack(got_a[0].delivery_tag))
    assert got_b[0].message.redelivered is False


def test_consume_errors(d) -> None:
    assert d.err(d.consume("nope", "t")) == AmqpError(
        404, "NOT_FOUND - no queue 'nope' in vhost '/'", 60, 20
    )
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "t"))
    reuse = AmqpError(530, "NOT_ALLOWED - attempt to reuse consumer tag 't'", 60, 20, True)
    assert d.err(d.consume("q", "t")) == reuse
    assert d.err(d.consume("nope", "t")) == reuse  # the tag is checked first
    assert d.ok(d.consume("q", "t", channel=d.ch(1, 2))) == ConsumeOk("t")  # other channel
    assert d.err(d.consume("q", "p", arguments={"x-priority": "high"})) == AmqpError(
        406,
        "PRECONDITION_FAILED - invalid arg 'x-priority' for queue 'q' in vhost '/': "
        '"expected integer, got longstr"',
        60,
        20,
    )


def test_exclusive_consumers(d) -> None:
    in_use = AmqpError(403, "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use", 60, 20)
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "a"))
    assert d.err(d.consume("q", "b", exclusive=True)) == in_use
    d.ok(c.Cancel(channel=d.ch(), consumer_tag="a"))
    d.ok(d.consume("q", "x", exclusive=True))
    assert d.err(d.consume("q", "c")) == in_use
    assert d.err(d.consume("q", "c", channel=d.ch(2, 1))) == in_use
    d.ok(c.Cancel(channel=d.ch(), consumer_tag="x"))
    d.ok(d.consume("q", "c"))


def test_consume_delivers_backlog_then_new_messages(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.publish("", "q", b"1"))
    d.ok(d.publish("", "q", b"2"))
    out = d.run(d.consume("q", "t"))
    assert out.reply == ConsumeOk("t")
    assert out.effects == [
        Deliver(d.ch(), "t", 1, False, out.effects[0].message),
        Deliver(d.ch(), "t", 2, False, out.effects[1].message),
    ]
    assert d.bodies(out) == [b"1", b"2"]
    out = d.run(d.publish("", "q", b"3"))
    assert [(e.consumer_tag, e.delivery_tag, e.message.body) for e in d.delivers(out)] == [
        ("t", 3, b"3")
    ]
    assert d.queue("q").messages == 0
    assert d.queue("q").unacked == 3


def test_delivery_tags_are_per_channel_and_shared_with_get(d) -> None:
    d.ok(d.declare("q"))
    for body in (b"1", b"2", b"3"):
        d.ok(d.publish("", "q", body))
    assert d.ok(d.get("q")).delivery_tag == 1
    assert d.ok(d.get("q", channel=d.ch(1, 2))).delivery_tag == 1
    out = d.run(d.consume("q", "t"))
    assert [e.delivery_tag for e in d.delivers(out)] == [2]


def test_get(d) -> None:
    d.ok(d.declare("q"))
    assert d.ok(d.get("q")) == GetEmpty()
    d.ok(d.publish("", "q", b"a"))
    d.ok(d.publish("", "q", b"b"))
    reply = d.ok(d.get("q"))
    assert isinstance(reply, GetOk)
    assert (reply.delivery_tag, reply.redelivered, reply.message_count) == (1, False, 1)
    assert reply.message.body == b"a"
    reply = d.ok(d.get("q", no_ack=True))
    assert (reply.delivery_tag, reply.message_count, reply.message.body) == (2, 0, b"b")
    assert d.sm.channel_unacked(d.ch()) == 1  # the no_ack one is not tracked
    assert d.err(d.ack(2)).reply_text == "PRECONDITION_FAILED - unknown delivery tag 2"
    assert d.err(d.get("nope")) == AmqpError(
        404, "NOT_FOUND - no queue 'nope' in vhost '/'", 60, 70
    )


def test_round_robin_between_consumers(d) -> None:
    d.ok(d.declare("q"))
    for tag, ch in (("a", d.ch(1, 1)), ("b", d.ch(2, 1)), ("c", d.ch(3, 1))):
        d.ok(d.consume("q", tag, channel=ch, no_ack=True))
    tags = []
    for i in range(7):
        tags += [e.consumer_tag for e in d.delivers(d.run(d.publish("", "q", b"%d" % i)))]
    assert tags == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_skips_consumers_without_credit(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(1, channel=d.ch(1, 1)))
    d.ok(d.consume("q", "a", channel=d.ch(1, 1)))
    d.ok(d.consume("q", "b", channel=d.ch(2, 1), no_ack=True))
    tags = []
    for i in range(4):
        tags += [e.consumer_tag for e in d.delivers(d.run(d.publish("", "q", b"%d" % i)))]
    assert tags == ["a", "b", "b", "b"]


def test_consumer_priority(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(2, channel=d.ch(1, 1)))
    d.ok(d.consume("q", "low", channel=d.ch(2, 1), no_ack=True))
    d.ok(d.consume("q", "high", channel=d.ch(1, 1), arguments={"x-priority": 10}))
    d.ok(d.consume("q", "neg", channel=d.ch(3, 1), no_ack=True, arguments={"x-priority": -1}))
    tags = []
    for i in range(5):
        tags += [e.consumer_tag for e in d.delivers(d.run(d.publish("", "q", b"%d" % i)))]
    # high takes messages while it has credit; then the next priority level.
    assert tags == ["high", "high", "low", "low", "low"]
    out = d.run(d.ack(1, channel=d.ch(1, 1)))
    assert d.delivers(out) == []  # nothing ready
    assert [e.consumer_tag for e in d.delivers(d.run(d.publish("", "q")))] == ["high"]


def test_equal_priorities_share_round_robin(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "a", no_ack=True, arguments={"x-priority": 5}))
    d.ok(d.consume("q", "b", no_ack=True))
    d.ok(d.consume("q", "c", no_ack=True, arguments={"x-priority": 5}))
    tags = []
    for _ in range(4):
        tags += [e.consumer_tag for e in d.delivers(d.run(d.publish("", "q")))]
    assert tags == ["a", "c", "a", "c"]


def test_per_consumer_prefetch_applies_to_later_consumers(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "unlimited"))
    d.ok(d.qos(1))  # does not change the existing consumer
    for _ in range(3):
        d.ok(d.publish("", "q"))
    assert d.sm.channel_unacked(d.ch()) == 3
    d.ok(d.declare("p"))
    d.ok(d.consume("p", "limited"))
    for _ in range(3):
        d.ok(d.publish("", "p"))
    assert d.queue("p").unacked == 1
    assert d.queue("p").messages == 2
    out = d.run(d.ack(4))
    assert [(e.consumer_tag, e.delivery_tag) for e in d.delivers(out)] == [("limited", 5)]


def test_global_prefetch_is_shared_by_the_channel(d) -> None:
    d.ok(d.declare("q1"))
    d.ok(d.declare("q2"))
    d.ok(d.qos(3, global_=True))
    d.ok(d.consume("q1", "a"))
    d.ok(d.consume("q2", "b"))
    for _ in range(3):
        d.ok(d.publish("", "q1"))
        d.ok(d.publish("", "q2"))
    assert d.sm.channel_unacked(d.ch()) == 3
    assert (d.queue("q1").unacked, d.queue("q2").unacked) == (2, 1)
    # One ack frees one slot, whichever queue can use it.
    out = d.run(d.ack(1))
    assert len(d.delivers(out)) == 1
    # Raising the global limit delivers at once.
    out = d.run(d.qos(10, global_=True))
    assert len(d.delivers(out)) == 2
    assert d.queue("q1").messages + d.queue("q2").messages == 0


def test_per_consumer_then_global_prefetch_both_apply(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(2))
    d.ok(d.qos(5, global_=True))
    for tag in "abc":
        d.ok(d.consume("q", tag))
    for _ in range(10):
        d.ok(d.publish("", "q"))
    consumers = [e.consumer_tag for out in d.log for e in d.delivers(out)]
    assert consumers == ["a", "b", "c", "a", "b"]
    assert d.queue("q").messages == 5


def test_per_consumer_qos_lifts_the_global_limit(d) -> None:
    # RabbitMQ 3.10: basic.qos(global=false) after basic.qos(global=true) unlimits the channel.
    d.ok(d.declare("q"))
    d.ok(d.qos(3, global_=True))
    d.ok(d.consume("q", "early"))
    d.ok(d.qos(2))
    d.ok(d.consume("q", "late"))
    for _ in range(10):
        d.ok(d.publish("", "q"))
    consumers = [e.consumer_tag for out in d.log for e in d.delivers(out)]
    assert consumers == ["early", "late", "early", "late"] + ["early"] * 6


def test_global_prefetch_counts_unacked_gets_at_qos_time(d) -> None:
    # RabbitMQ 3.10: the channel limit starts from every unacked message, and acking a
    # basic.get message never frees a slot.
    d.ok(d.declare("q"))
    for _ in range(10):
        d.ok(d.publish("", "q"))
    d.ok(d.get("q"))
    d.ok(d.get("q"))
    d.ok(d.qos(3, global_=True))
    out = d.run(d.consume("q", "t"))
    assert [e.delivery_tag for e in d.delivers(out)] == [3]
    assert d.delivers(d.run(d.ack(1))) == []
    assert d.delivers(d.run(d.ack(2))) == []
    assert [e.delivery_tag for e in d.delivers(d.run(d.ack(3)))] == [4]


def test_get_does_not_count_against_global_prefetch(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(1, global_=True))
    for _ in range(3):
        d.ok(d.publish("", "q"))
    d.ok(d.get("q"))
    out = d.run(d.consume("q", "t"))
    assert len(d.delivers(out)) == 1


def test_no_ack_consumers_ignore_prefetch(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(1, global_=True))
    d.ok(d.qos(1))
    d.ok(d.consume("q", "t", no_ack=True))
    for _ in range(5):
        d.ok(d.publish("", "q"))
    assert len([e for out in d.log for e in d.delivers(out)]) == 5
    assert d.sm.channel_unacked(d.ch()) == 0
    assert d.sm.total_message_bytes == 0


def test_ack_single_multiple_and_zero(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "t"))
    for i in range(6):
        d.ok(d.publish("", "q", b"%d" % i))
    assert d.ok(d.ack(2)) == Ok()
    assert d.ok(d.ack(4, multiple=True)) == Ok()  # 1, 3, 4
    assert d.sm.channel_unacked(d.ch()) == 2
    assert d.err(d.ack(4, multiple=True)) == AmqpError(
        406, "PRECONDITION_FAILED - unknown delivery tag 4", 60, 80
    )
    assert d.err(d.ack(9, multiple=True)).reply_text.endswith("tag 9")
    assert d.sm.channel_unacked(d.ch()) == 2  # a failed ack changed nothing
    assert d.err(d.ack(0)).reply_text == "PRECONDITION_FAILED - unknown delivery tag 0"
    assert d.ok(d.ack(0, multiple=True)) == Ok()
    assert d.sm.channel_unacked(d.ch()) == 0
    assert d.ok(d.ack(0, multiple=True)) == Ok()  # nothing left: still fine
    assert d.err(d.ack(1)).reply_text == "PRECONDITION_FAILED - unknown delivery tag 1"
    assert d.sm.total_message_bytes == 0


def test_unknown_tag_method_ids(d) -> None:
    assert d.err(d.nack(5)) == AmqpError(
        406, "PRECONDITION_FAILED - unknown delivery tag 5", 60, 120
    )
    assert d.err(d.nack(5, reject=True)) == AmqpError(
        406, "PRECONDITION_FAILED - unknown delivery tag 5", 60, 90
    )
    assert d.err(d.ack(5)) == AmqpError(406, "PRECONDITION_FAILED - unknown delivery tag 5", 60, 80)


def test_requeue_returns_to_original_position(d) -> None:
    d.ok(d.declare("q"))
    for body in (b"1", b"2", b"3", b"4"):
        d.ok(d.publish("", "q", body))
    tags = [d.ok(d.get("q")).delivery_tag for _ in range(3)]  # 1, 2, 3 unacked
    d.ok(d.nack(tags[2]))
    d.ok(d.nack(tags[0]))
    d.ok(d.publish("", "q", b"5"))
    assert d.drain("q") == [(b"1", True), (b"3", True), (b"4", False), (b"5", False)]
    d.ok(d.nack(tags[1], requeue=False))  # dropped
    assert d.drain("q") == []
    assert d.sm.total_message_bytes == 0


def test_nack_multiple_requeues_in_order_and_redelivers(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(3))
    out = d.run(d.consume("q", "t"))
    for body in (b"a", b"b", b"c", b"d"):
        d.ok(d.publish("", "q", body))
    out = d.run(d.nack(2, multiple=True))
    # a and b go back; a is redelivered first, then b (d still waits for credit).
    assert [(e.message.body, e.redelivered, e.delivery_tag) for e in d.delivers(out)] == [
        (b"a", True, 4),
        (b"b", True, 5),
    ]


def test_reject_requeue_false_drops(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.publish("", "q"))
    tag = d.ok(d.get("q")).delivery_tag
    assert d.ok(d.nack(tag, reject=True, requeue=False)) == Ok()
    assert d.queue("q").messages == 0
    assert d.sm.total_message_bytes == 0


def test_recover_requeues_everything_of_the_channel(d) -> None:
    d.ok(d.declare("q"))
    for body in (b"a", b"b"):
        d.ok(d.publish("", "q", body))
    d.ok(d.get("q"))
    d.ok(d.get("q"))
    d.ok(d.get("q", channel=d.ch(1, 2)))  # empty
    assert d.ok(c.Recover(channel=d.ch())) == Ok()
    assert d.drain("q") == [(b"a", True), (b"b", True)]
    error = d.err(c.Recover(channel=d.ch(), requeue=False))
    assert error == AmqpError(540, "NOT_IMPLEMENTED - requeue=false", 60, 110, True)


def test_recover_redelivers_to_consumers(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "t"))
    d.ok(d.publish("", "q", b"a"))
    out = d.run(c.Recover(channel=d.ch()))
    assert [(e.delivery_tag, e.redelivered) for e in d.delivers(out)] == [(2, True)]


def test_cancel(d) -> None:
    d.ok(d.declare("q"))
    assert d.ok(c.Cancel(channel=d.ch(), consumer_tag="unknown")) == Ok()
    d.ok(d.consume("q", "t"))
    d.ok(d.publish("", "q", b"a"))
    assert d.ok(c.Cancel(channel=d.ch(), consumer_tag="t")) == Ok()
    assert d.queue("q").consumers == 0
    assert d.delivers(d.run(d.publish("", "q", b"b"))) == []
    # The cancelled consumer's delivery is still unacked and can be acked.
    assert d.ok(d.ack(1)) == Ok()
    assert d.queue("q").messages == 1


def test_close_channel_requeues_and_redispatches_to_others(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(1, channel=d.ch(1, 1)))
    d.ok(d.consume("q", "a", channel=d.ch(1, 1)))
    d.ok(d.publish("", "q", b"x"))
    d.ok(d.publish("", "q", b"y"))
    d.ok(d.qos(1, channel=d.ch(2, 1)))
    out = d.run(d.consume("q", "b", channel=d.ch(2, 1)))
    assert d.bodies(out) == [b"y"]
    d.ok(d.ack(1, channel=d.ch(2, 1)))
    out = d.run(c.CloseChannel(channel=d.ch(1, 1)))
    assert [(e.channel, e.message.body, e.redelivered) for e in d.delivers(out)] == [
        (d.ch(2, 1), b"x", True)
    ]
    assert d.sm.channel_unacked(d.ch(1, 1)) == 0
    assert d.queue("q").consumers == 1


def test_close_channel_forgets_qos_and_tags(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.qos(1))
    d.ok(c.CloseChannel(channel=d.ch()))
    d.ok(c.OpenChannel(channel=d.ch()))
    d.ok(d.consume("q", "t"))
    for _ in range(3):
        d.ok(d.publish("", "q"))
    assert d.sm.channel_unacked(d.ch()) == 3
    assert [e.delivery_tag for out in d.log for e in d.delivers(out)] == [1, 2, 3]


def test_close_connection_closes_all_its_channels(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "a", channel=d.ch(1, 1)))
    d.ok(d.consume("q", "b", channel=d.ch(1, 2)))
    d.ok(d.publish("", "q", b"x"))
    d.ok(d.publish("", "q", b"y"))
    d.ok(c.CloseConnection(conn=1))
    assert d.queue("q").consumers == 0
    assert d.drain("q", channel=d.ch(2, 1)) == [(b"x", True), (b"y", True)]


def test_unwritable_connection_gets_nothing_until_writable(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "slow", channel=d.ch(1, 1), no_ack=True))
    d.ok(c.SetWritable(conn=1, writable=False))
    assert d.delivers(d.run(d.publish("", "q", b"1"))) == []
    d.ok(d.consume("q", "fast", channel=d.ch(2, 1), no_ack=True))  # takes the backlog
    assert d.delivers(d.run(d.publish("", "q", b"2")))[0].consumer_tag == "fast"
    d.ok(c.Cancel(channel=d.ch(2, 1), consumer_tag="fast"))
    d.ok(d.publish("", "q", b"3"))
    d.ok(d.publish("", "q", b"4"))
    out = d.run(c.SetWritable(conn=1, writable=True))
    assert [(e.consumer_tag, e.message.body) for e in d.delivers(out)] == [
        ("slow", b"3"),
        ("slow", b"4"),
    ]
    assert d.delivers(d.run(c.SetWritable(conn=1, writable=True))) == []


def test_unknown_command_is_a_connection_error(d) -> None:
    out = d.sm.apply(object())  # type: ignore[arg-type]
    assert isinstance(out.reply, AmqpError)
    assert out.reply.reply_code == 540
    assert out.reply.connection


# ---- x-single-active-consumer (RabbitMQ 3.10 classic queues: no priorities among them) -----

SAC = {"x-single-active-consumer": True}


def test_single_active_consumer_gets_everything(d) -> None:
    d.ok(d.declare("q", arguments=SAC))
    d.ok(d.qos(1))
    d.ok(d.consume("q", "a"))
    d.ok(d.consume("q", "b", channel=d.ch(2, 1), no_ack=True))
    d.ok(d.consume("q", "hi", channel=d.ch(2, 1), no_ack=True, arguments={"x-priority": 5}))
    tags = [e.consumer_tag for _ in range(3) for e in d.delivers(d.run(d.publish("", "q")))]
    assert tags == ["a"]  # a is at its prefetch limit; the others only stand by
    assert d.ok(d.declare("q", passive=True)).consumer_count == 3


def test_single_active_consumer_hands_over_in_subscription_order(d) -> None:
    d.ok(d.declare("q", arguments=SAC))
    d.ok(d.consume("q", "a", no_ack=True))
    d.ok(d.consume("q", "b", channel=d.ch(2, 1), no_ack=True))
    d.ok(d.consume("q", "c", channel=d.ch(3, 1), no_ack=True, arguments={"x-priority": 9}))
    d.ok(c.SetWritable(conn=1, writable=False))
    d.ok(d.publish("", "q", b"backlog"))
    # As RabbitMQ 3.10: the next subscriber takes over at the queue's next event, not at
    # the cancel itself; then it gets the backlog first.
    assert d.delivers(d.run(c.Cancel(channel=d.ch(), consumer_tag="a"))) == []
    out = d.run(d.publish("", "q", b"next"))
    assert [(e.consumer_tag, e.message.body) for e in d.delivers(out)] == [
        ("b", b"backlog"),
        ("b", b"next"),
    ]
    d.ok(c.CloseChannel(channel=d.ch(2, 1)))
    assert d.delivers(d.run(d.publish("", "q")))[0].consumer_tag == "c"
