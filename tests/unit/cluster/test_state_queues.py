"""Queues through StateMachine.apply: declare, exclusivity, auto-delete, bind, purge, delete.

Every expected text was checked against RabbitMQ 3.10.
"""

# ruff: noqa: E501  (tables of RabbitMQ reply texts read best one per line)
from __future__ import annotations

import pytest

from cluster import commands as c
from node.broker.types import AmqpError, Count, Ok, QueueDeclared, Routed

LOCKED = (
    "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'q' in vhost '/'. It "
    "could be originally declared on another connection or the exclusive property value does "
    "not match that of the original declaration."
)


def test_declare_reports_ready_and_consumer_counts(d) -> None:
    assert d.ok(d.declare("q")) == QueueDeclared("q", 0, 0)
    for _ in range(3):
        d.ok(d.publish("", "q"))
    d.ok(d.get("q"))  # one unacked: not counted
    d.ok(d.qos(1, channel=d.ch(1, 2)))
    d.ok(d.consume("q", "t", channel=d.ch(1, 2)))
    assert d.ok(d.declare("q")) == QueueDeclared("q", 1, 1)
    assert d.ok(d.declare("q", passive=True)) == QueueDeclared("q", 1, 1)


def test_passive_missing(d) -> None:
    assert d.err(d.declare("x", passive=True)) == AmqpError(
        404, "NOT_FOUND - no queue 'x' in vhost '/'", 50, 10
    )


@pytest.mark.parametrize(
    ("first", "second", "text"),
    [
        ({}, {"durable": True}, "'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'"),
        ({"durable": True}, {}, "'durable' for queue 'q' in vhost '/': received 'false' but current is 'true'"),
        ({}, {"auto_delete": True}, "'auto_delete' for queue 'q' in vhost '/': received 'true' but current is 'false'"),
        ({}, {"arguments": {"x-max-length": 10}}, "'x-max-length' for queue 'q' in vhost '/': received the value '10' of type 'signedint' but current is none"),
        ({"arguments": {"x-max-length": 10}}, {}, "'x-max-length' for queue 'q' in vhost '/': received none but current is the value '10' of type 'signedint'"),
        ({"arguments": {"x-message-ttl": 10}}, {"arguments": {"x-message-ttl": 20}}, "'x-message-ttl' for queue 'q' in vhost '/': received '20' but current is '10'"),
        ({"arguments": {"x-message-ttl": 10}}, {"arguments": {"x-message-ttl": "abc"}}, "'x-message-ttl' for queue 'q' in vhost '/': received 'abc' but current is '10'"),
        ({"arguments": {"x-dead-letter-exchange": "dlx"}}, {"arguments": {"x-dead-letter-exchange": "other"}}, "'x-dead-letter-exchange' for queue 'q' in vhost '/': received 'other' but current is 'dlx'"),
        ({"arguments": {"x-single-active-consumer": True}}, {"arguments": {"x-single-active-consumer": False}}, "'x-single-active-consumer' for queue 'q' in vhost '/': received 'false' but current is 'true'"),
        ({"arguments": {"x-queue-type": "classic"}}, {"arguments": {"x-queue-type": "quorum"}}, "'x-queue-type' for queue 'q' in vhost '/': received 'quorum' but current is 'classic'"),
        ({}, {"arguments": {"x-max-length": 3_000_000_000}}, "'x-max-length' for queue 'q' in vhost '/': received the value '3000000000' of type 'long' but current is none"),
    ],
)  # fmt: skip
def test_inequivalent_redeclare(d, first, second, text) -> None:
    d.ok(d.declare("q", **first))
    assert d.err(d.declare("q", **second)) == AmqpError(
        406, "PRECONDITION_FAILED - inequivalent arg " + text, 50, 10
    )


def test_equivalence_ignores_other_arguments_and_defaults_queue_type(d) -> None:
    d.ok(d.declare("q", arguments={"x-foo": 1}))
    d.ok(d.declare("q", arguments={"x-foo": 2, "x-queue-type": "classic"}))
    d.ok(d.declare("q"))
    # Equal values of different integer widths are equivalent; 1 and True are not.
    d.ok(d.declare("n", arguments={"x-max-length": 1}))
    d.ok(d.declare("n", arguments={"x-max-length": 1}))
    assert d.err(d.declare("n", arguments={"x-max-length": True})).reply_code == 406


def test_equivalence_order_durable_then_auto_delete_then_arguments(d) -> None:
    d.ok(d.declare("q", auto_delete=True))
    assert "'durable'" in d.err(d.declare("q", durable=True, auto_delete=False)).reply_text
    assert "'auto_delete'" in d.err(d.declare("q", arguments={"x-max-length": 5})).reply_text


def test_passive_ignores_flags_and_arguments(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 10}))
    reply = d.ok(d.declare("q", passive=True, durable=True, arguments={"x-message-ttl": 5}))
    assert reply == QueueDeclared("q", 0, 0)


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        ({"x-max-length": "abc"}, "'x-max-length' for queue 'q' in vhost '/': \"expected integer, got longstr\""),
        ({"x-max-length": -1}, "'x-max-length' for queue 'q' in vhost '/': {value_negative,-1}"),
        ({"x-max-length": True}, "'x-max-length' for queue 'q' in vhost '/': \"expected integer, got bool\""),
        ({"x-message-ttl": -1}, "'x-message-ttl' for queue 'q' in vhost '/': {value_negative,-1}"),
        ({"x-message-ttl": 1.5}, "'x-message-ttl' for queue 'q' in vhost '/': \"expected integer, got float\""),
        ({"x-expires": 0}, "'x-expires' for queue 'q' in vhost '/': {value_zero,0}"),
        ({"x-overflow": "foo"}, "'x-overflow' for queue 'q' in vhost '/': invalid_overflow"),
        ({"x-max-priority": 300}, "'x-max-priority' for queue 'q' in vhost '/': {max_value_exceeded,300}"),
        ({"x-queue-mode": "foo"}, "'x-queue-mode' for queue 'q' in vhost '/': \"unsupported queue mode 'foo'\""),
        ({"x-queue-type": "foo"}, "'x-queue-type' for queue 'q' in vhost '/': \"unsupported queue type 'foo'\""),
        ({"x-single-active-consumer": "yes"}, "'x-single-active-consumer' for queue 'q' in vhost '/': {unacceptable_type,longstr}"),
        ({"x-dead-letter-routing-key": "k"}, "'x-dead-letter-routing-key' for queue 'q' in vhost '/': routing_key_but_no_dlx_defined"),
        ({"x-max-in-memory-length": 5}, "'x-max-in-memory-length' for queue 'q' in vhost '/' of queue type rabbit_classic_queue"),
    ],
)  # fmt: skip
def test_invalid_arguments_of_a_new_queue(d, arguments, detail) -> None:
    assert d.err(d.declare("q", arguments=arguments)) == AmqpError(
        406, "PRECONDITION_FAILED - invalid arg " + detail, 50, 10
    )
    assert not d.sm.queue_exists("/", "q")


def test_invalid_dead_letter_exchange_type(d) -> None:
    error = d.err(d.declare("q", arguments={"x-dead-letter-exchange": 5}))
    assert error.reply_text == (
        "PRECONDITION_FAILED - invalid type 'signedint' for arg 'x-dead-letter-exchange' in "
        "queue 'q' in vhost '/'"
    )


def test_classic_only_arguments_are_not_checked_on_redeclare(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.declare("q", arguments={"x-max-in-memory-length": 5}))


def test_reserved_prefix(d) -> None:
    assert d.err(d.declare("amq.x")) == AmqpError(
        403, "ACCESS_REFUSED - queue name 'amq.x' contains reserved prefix 'amq.*'", 50, 10
    )
    assert d.err(d.declare("amq.x", passive=True)).reply_code == 404
    name = "amq.gen-abcdefghijklmnopqrstuv"
    assert d.ok(d.declare(name, server_named=True)) == QueueDeclared(name, 0, 0)
    # Redeclaring a server-named queue by its name is refused, as in RabbitMQ.
    assert d.err(d.declare(name)).reply_code == 403
    assert d.ok(d.declare(name, passive=True)) == QueueDeclared(name, 0, 0)


def test_exclusive_queue_is_locked_to_its_connection(d) -> None:
    d.ok(d.declare("q", conn=1, exclusive=True))
    d.ok(d.bind("q", "amq.direct", "k", conn=1))
    other = d.ch(2, 1)
    for cmd, ids in [
        (d.declare("q", conn=2, passive=True), (50, 10)),
        (d.declare("q", conn=2, exclusive=True), (50, 10)),
        (d.declare("q", conn=2), (50, 10)),
        (c.PurgeQueue(vhost="/", queue="q", owner=2), (50, 30)),
        (c.DeleteQueue(vhost="/", queue="q", owner=2), (50, 40)),
        (c.DeleteQueue(vhost="/", queue="q", owner=2, if_unused=True), (50, 40)),
        (d.bind("q", "amq.direct", "k2", conn=2), (50, 20)),
        (d.unbind("q", "amq.direct", "k", conn=2), (50, 50)),
        (d.get("q", channel=other), (60, 70)),
        (d.consume("q", "t", channel=other), (60, 20)),
    ]:
        assert d.err(cmd) == AmqpError(405, LOCKED, *ids)
    # Unbinding a binding that does not exist is fine even for a stranger.
    assert d.ok(d.unbind("q", "amq.direct", "nothing", conn=2)) == Ok()
    # A missing exchange is reported before the lock.
    assert d.err(d.bind("q", "nope", "k", conn=2)).reply_code == 404
    # The owner may do all of it.
    assert d.ok(d.declare("q", conn=1, exclusive=True)) == QueueDeclared("q", 0, 0)
    assert d.ok(d.declare("q", conn=1, passive=True)) == QueueDeclared("q", 0, 0)


def test_exclusive_flag_must_match(d) -> None:
    d.ok(d.declare("q", conn=1, exclusive=True))
    assert d.err(d.declare("q", conn=1, exclusive=False)) == AmqpError(405, LOCKED, 50, 10)
    d.ok(d.declare("p", conn=1))
    error = d.err(d.declare("p", conn=1, exclusive=True))
    assert error.reply_code == 405
    assert "'p'" in error.reply_text


def test_exclusive_queue_durable_is_not_compared_but_auto_delete_is(d) -> None:
    d.ok(d.declare("q", exclusive=True, durable=True))
    d.ok(d.declare("q", exclusive=True, durable=False))
    assert "'auto_delete'" in d.err(d.declare("q", exclusive=True, auto_delete=True)).reply_text


def test_exclusive_queue_dies_with_its_connection(d) -> None:
    d.ok(d.declare("q", conn=1, exclusive=True))
    d.ok(d.bind("q", "amq.fanout", conn=1))
    d.ok(d.publish("", "q"))
    d.ok(c.CloseConnection(conn=2))
    assert d.sm.queue_exists("/", "q")
    d.ok(c.CloseConnection(conn=1))
    assert not d.sm.queue_exists("/", "q")
    assert [b for b in d.sm.bindings("/") if b.destination == "q"] == []
    assert d.sm.total_message_bytes == 0


def test_exclusive_queue_can_be_deleted_by_owner_then_redeclared_by_another(d) -> None:
    d.ok(d.declare("q", conn=1, exclusive=True))
    d.ok(c.DeleteQueue(vhost="/", queue="q", owner=1))
    d.ok(d.declare("q", conn=2, exclusive=True))
    d.ok(c.CloseConnection(conn=1))
    assert d.sm.queue_exists("/", "q")


def test_auto_delete_queue_goes_with_its_last_consumer(d) -> None:
    d.ok(d.declare("q", auto_delete=True))
    d.ok(d.bind("q", "amq.direct", "k"))
    d.ok(d.consume("q", "a"))
    d.ok(d.consume("q", "b"))
    d.ok(c.Cancel(channel=d.ch(), consumer_tag="a"))
    assert d.sm.queue_exists("/", "q")
    d.ok(c.Cancel(channel=d.ch(), consumer_tag="b"))
    assert not d.sm.queue_exists("/", "q")
    assert [b for b in d.sm.bindings("/") if b.destination == "q"] == []


def test_auto_delete_queue_without_consumers_ever_stays(d) -> None:
    d.ok(d.declare("q", auto_delete=True))
    d.ok(d.publish("", "q"))
    d.ok(c.CloseChannel(channel=d.ch()))
    assert d.sm.queue_exists("/", "q")


def test_auto_delete_queue_goes_when_consumer_channel_closes(d) -> None:
    d.ok(d.declare("q", auto_delete=True))
    d.ok(d.consume("q", "a", channel=d.ch(1, 2)))
    d.ok(d.publish("", "q"))
    d.ok(c.CloseChannel(channel=d.ch(1, 2)))
    assert not d.sm.queue_exists("/", "q")
    assert d.sm.total_message_bytes == 0


def test_purge_removes_ready_only(d) -> None:
    d.ok(d.declare("q"))
    for body in (b"a", b"b", b"c"):
        d.ok(d.publish("", "q", body))
    d.ok(d.get("q"))
    assert d.ok(c.PurgeQueue(vhost="/", queue="q", owner=1)) == Count(2)
    assert d.queue("q").messages == 0
    assert d.queue("q").unacked == 1
    assert d.sm.total_message_bytes == 1
    d.ok(d.nack(1))  # requeue the unacked one
    assert d.drain("q") == [(b"a", True)]
    assert d.err(c.PurgeQueue(vhost="/", queue="nope", owner=1)) == AmqpError(
        404, "NOT_FOUND - no queue 'nope' in vhost '/'", 50, 30
    )


def test_delete_missing_queue_is_ok(d) -> None:
    assert d.ok(c.DeleteQueue(vhost="/", queue="nope", owner=1)) == Count(0)


def test_delete_if_unused_and_if_empty(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "t"))
    d.ok(d.qos(1))
    d.ok(c.CloseChannel(channel=d.ch()))
    d.ok(d.consume("q", "t", channel=d.ch(1, 2)))
    d.ok(d.publish("", "q"))
    d.ok(d.publish("", "q"))
    in_use = AmqpError(406, "PRECONDITION_FAILED - queue 'q' in vhost '/' in use", 50, 40)
    cmd = c.DeleteQueue(vhost="/", queue="q", owner=1, if_unused=True, if_empty=True)
    assert d.err(cmd) == in_use
    d.ok(c.CloseChannel(channel=d.ch(1, 2)))
    not_empty = AmqpError(406, "PRECONDITION_FAILED - queue 'q' in vhost '/' not empty", 50, 40)
    assert d.err(c.DeleteQueue(vhost="/", queue="q", owner=1, if_empty=True)) == not_empty
    assert d.ok(c.DeleteQueue(vhost="/", queue="q", owner=1, if_unused=True)) == Count(2)


def test_delete_if_empty_ignores_unacked(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.publish("", "q"))
    d.ok(d.get("q"))
    assert d.ok(c.DeleteQueue(vhost="/", queue="q", owner=1, if_empty=True)) == Count(0)


def test_delete_cancels_consumers_and_drops_unacked(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.consume("q", "a", channel=d.ch(1, 1)))
    d.ok(d.consume("q", "b", channel=d.ch(2, 1)))
    d.ok(d.publish("", "q", b"x"))
    d.ok(d.publish("", "q", b"y"))
    d.ok(d.publish("", "q", b"z"))
    assert d.sm.channel_unacked(d.ch(1, 1)) == 2  # x and z, round robin
    out = d.run(c.DeleteQueue(vhost="/", queue="q", owner=1))
    assert out.reply == Count(0)
    assert [(e.channel, e.consumer_tag) for e in d.cancels(out)] == [
        (d.ch(1, 1), "a"),
        (d.ch(2, 1), "b"),
    ]
    assert d.sm.total_message_bytes == 0
    # Acking a delivery of the deleted queue is still fine; the tag stays known.
    assert d.ok(d.ack(1, channel=d.ch(1, 1))) == Ok()
    assert d.sm.channel_unacked(d.ch(1, 1)) == 1
    assert d.ok(d.nack(2, channel=d.ch(1, 1))) == Ok()  # requeue into nothing: dropped
    assert d.sm.channel_unacked(d.ch(1, 1)) == 0
    assert d.sm.total_message_bytes == 0
    # The consumer tag may be reused on that channel.
    d.ok(d.declare("q2"))
    d.ok(d.consume("q2", "a", channel=d.ch(1, 1)))


def test_queues_view(d) -> None:
    d.ok(d.declare("q", durable=True, arguments={"x-max-length": 5}))
    d.ok(d.publish("", "q", b"abc"))
    d.ok(d.publish("", "q", b"de"))
    d.ok(d.get("q"))
    view = d.queue("q")
    assert (view.durable, view.exclusive, view.auto_delete) == (True, False, False)
    assert view.arguments == {"x-max-length": 5}
    assert (view.messages, view.unacked, view.consumers, view.message_bytes) == (1, 1, 0, 5)
    assert d.sm.total_message_bytes == 5


# ---- length limits (x-max-length, x-max-length-bytes, x-overflow) -------------------------
# Expected results observed on RabbitMQ 3.10.

REJECT = {"x-overflow": "reject-publish"}


def test_reject_publish_by_count(d) -> None:
    d.ok(d.declare("q", arguments={"x-max-length": 1, **REJECT}))
    assert d.ok(d.publish("", "q", b"m0")) == Routed(1)
    assert d.ok(d.publish("", "q", b"m1")) == Routed(1, rejected=True)
    assert d.ok(d.publish("", "q", b"m2", mandatory=True)) == Routed(1, rejected=True)
    assert d.drain("q") == [(b"m0", False)]


def test_reject_publish_by_bytes(d) -> None:
    d.ok(d.declare("q", arguments={"x-max-length-bytes": 10, **REJECT}))
    results = [d.ok(d.publish("", "q", b"x" * n)).rejected for n in (6, 6, 1, 11)]
    assert results == [False, True, False, True]
    assert [len(body) for body, _ in d.drain("q")] == [6, 1]


def test_reject_publish_only_refuses_the_full_queue(d) -> None:
    d.ok(d.declare("full", arguments={"x-max-length": 0, **REJECT}))
    d.ok(d.declare("open"))
    d.ok(d.bind("full", "amq.fanout"))
    d.ok(d.bind("open", "amq.fanout"))
    assert d.ok(d.publish("amq.fanout", "")) == Routed(2, rejected=True)
    assert (d.queue("full").messages, d.queue("open").messages) == (0, 1)


def test_drop_head_by_bytes_drops_until_within_limit(d) -> None:
    d.ok(d.declare("q", arguments={"x-max-length-bytes": 10}))
    for n in (6, 4, 1):
        d.ok(d.publish("", "q", b"x" * n))
    assert [len(b) for b, _ in d.drain("q")] == [4, 1]
    for n in (6, 4, 1, 11):
        assert d.ok(d.publish("", "q", b"x" * n)) == Routed(1)
    assert d.drain("q") == []
    assert d.sm.total_message_bytes == 0


def test_drop_head_counts_ready_only_and_applies_to_requeues(d) -> None:
    d.ok(d.declare("q", arguments={"x-max-length": 2}))
    d.ok(d.publish("", "q", b"a"))
    d.ok(d.publish("", "q", b"b"))
    tag = d.ok(d.get("q")).delivery_tag  # a is unacked: not counted
    d.ok(d.publish("", "q", b"c"))
    d.ok(d.publish("", "q", b"d"))  # b dropped
    assert d.queue("q").messages == 2
    d.ok(d.nack(tag))  # a comes back at the head and is dropped at once
    assert d.drain("q") == [(b"c", False), (b"d", False)]
    assert d.sm.total_message_bytes == 0


def test_zero_length_queue_still_feeds_a_waiting_consumer(d) -> None:
    d.ok(d.declare("q", arguments={"x-max-length": 0}))
    d.ok(d.consume("q", "t", no_ack=True))
    assert d.bodies(d.run(d.publish("", "q", b"z"))) == [b"z"]
    d.ok(d.declare("r", arguments={"x-max-length": 0, **REJECT}))
    d.ok(d.consume("r", "u", no_ack=True))
    out = d.run(d.publish("", "r", b"z"))
    assert out.reply == Routed(1, rejected=True)
    assert out.effects == []


def test_classic_queue_takes_a_leader_locator(d) -> None:
    """RabbitMQ 3.10 refused x-queue-leader-locator on classic queues; current RabbitMQ
    and Warren's cluster take it (it picks the queue's leader node)."""
    reply = d.ok(d.declare("q", arguments={"x-queue-leader-locator": "balanced"}))
    assert isinstance(reply, QueueDeclared)
