"""Bounded expiry (Tick's `more` contract), priority queues, x-delivery-limit with
x-delivery-count, queue types and argument texts. Time injected; RabbitMQ 3.10's answers."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp.commands import Basic

from cluster import commands as c
from cluster.state import StateMachine
from node.broker.model import DEAD_LETTER_COST, EXPIRE_BUDGET
from node.broker.types import GetEmpty, Properties, Ticked
from node.protocol import codec
from node.protocol.properties import with_headers
from tests.unit.cluster.conftest import Driver


@pytest.fixture
def d() -> Driver:
    return Driver(StateMachine(rewrite_headers=with_headers))


def publish(
    d: Driver, queue: str, body: bytes = b"m", *, now: int = 0, priority: int | None = None
) -> Any:
    raw = codec.encode_properties(Basic.Properties(priority=priority, headers={"h": 1}))
    props = Properties(1, priority, None, {"h": 1})
    return d.run(c.new_publish(now, d.ch(), "/", "", queue, False, raw, props, body)).reply


# ---- expiry never blocks -------------------------------------------------------------


def test_a_tick_expires_at_most_the_budget_and_says_more(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 10}))
    total = EXPIRE_BUDGET * 2 + 5
    for _ in range(total):
        publish(d, "q", now=0)
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=True)
    assert d.queue("q").messages == total - EXPIRE_BUDGET
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=True)
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=False)
    assert d.queue("q").messages == 0
    assert d.sm.total_message_bytes == 0


def test_other_commands_expire_within_their_budget_too(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 10}))
    for _ in range(EXPIRE_BUDGET * 2 + 1):
        publish(d, "q", now=0)  # expire at 10
    publish(d, "q", b"live", now=5)  # expires at 15
    passive = c.DeclareQueue(vhost="/", queue="q", owner=1, passive=True, now_ms=12)
    assert d.ok(passive).message_count == EXPIRE_BUDGET + 2
    # basic.get never hands out an expired message: empty while expiry work is due.
    get = c.Get(channel=d.ch(), vhost="/", queue="q", no_ack=True, now_ms=12)
    assert d.ok(get) == GetEmpty()
    assert d.ok(c.Tick(now_ms=12)) == Ticked(more=False)
    assert d.ok(get).message.body == b"live"


def test_a_waiting_consumer_gets_nothing_expired_and_is_served_by_the_tick(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 10}))
    for _ in range(EXPIRE_BUDGET * 2 + 10):
        publish(d, "q", b"old", now=0)
    publish(d, "q", b"live", now=5)
    out = d.run(d.consume("q", "t", no_ack=True, now_ms=12))
    assert d.bodies(out) == []
    out = d.run(c.Tick(now_ms=12))
    assert (out.reply, d.bodies(out)) == (Ticked(more=True), [])
    out = d.run(c.Tick(now_ms=12))
    assert (out.reply, d.bodies(out)) == (Ticked(more=False), [b"live"])


def test_dead_lettering_expiry_costs_more_budget(d) -> None:
    d.ok(d.declare("dead"))
    args = {"x-message-ttl": 10, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}
    d.ok(d.declare("q", arguments=args))
    per_tick = EXPIRE_BUDGET // DEAD_LETTER_COST
    for _ in range(per_tick + 1):
        publish(d, "q", now=0)
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=True)
    assert d.queue("dead").messages == per_tick
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=False)
    assert d.queue("dead").messages == per_tick + 1


def test_queues_take_turns_when_the_budget_runs_out(d) -> None:
    for name in ("a", "b"):
        d.ok(d.declare(name, arguments={"x-message-ttl": 10}))
    for _ in range(EXPIRE_BUDGET * 2):
        publish(d, "a", now=0)
    publish(d, "b", now=0)
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=True)
    assert d.ok(c.Tick(now_ms=100)) == Ticked(more=True)  # a (ran out last time) goes last
    assert d.queue("b").messages == 0


# ---- priority queues -----------------------------------------------------------------


def test_higher_priority_first_fifo_within_and_capped_at_the_max(d) -> None:
    d.ok(d.declare("p", arguments={"x-max-priority": 5}))
    for body, priority in (
        (b"n1", None),
        (b"p1", 1),
        (b"p9", 9),
        (b"p5", 5),
        (b"n2", 0),
        (b"p1b", 1),
    ):
        publish(d, "p", body, priority=priority)
    got = []
    while True:
        reply = d.ok(d.get("p", no_ack=True))
        if isinstance(reply, GetEmpty):
            break
        got.append((reply.message.body, codec.decode_properties(reply.message.properties).priority))
    # 9 counts as 5 (the max) and, published first, precedes p5; delivered as sent.
    assert got == [(b"p9", 9), (b"p5", 5), (b"p1", 1), (b"p1b", 1), (b"n1", None), (b"n2", 0)]


def test_requeue_keeps_original_position_within_its_priority(d) -> None:
    d.ok(d.declare("p", arguments={"x-max-priority": 3}))
    for body, priority in ((b"a", 2), (b"b", 2), (b"c", 2), (b"low", 0)):
        publish(d, "p", body, priority=priority)
    tags = [d.ok(d.get("p")).delivery_tag for _ in range(2)]  # a, b out
    publish(d, "p", b"d", priority=2)
    d.ok(d.nack(tags[1], requeue=True))
    d.ok(d.nack(tags[0], requeue=True))
    assert d.drain("p") == [
        (b"a", True),
        (b"b", True),
        (b"c", False),
        (b"d", False),
        (b"low", False),
    ]


def test_priority_queue_with_consumer_and_limits(d) -> None:
    d.ok(d.declare("p", arguments={"x-max-priority": 2, "x-max-length": 2}))
    publish(d, "p", b"hi", priority=2)
    publish(d, "p", b"lo", priority=0)
    publish(d, "p", b"mid", priority=1)  # drop-head drops the head: the highest priority
    assert d.queue("p").messages == 2
    out = d.run(d.consume("p", "t", no_ack=True))
    assert d.bodies(out) == [b"mid", b"lo"]


def test_priority_queue_expires_the_head_of_each_priority(d) -> None:
    d.ok(d.declare("p", arguments={"x-max-priority": 2, "x-message-ttl": 10}))
    publish(d, "p", b"lo", priority=0, now=0)
    publish(d, "p", b"hi", priority=2, now=50)
    d.ok(c.Tick(now_ms=20))
    assert d.drain("p") == [(b"hi", False)]


def test_priority_queue_survives_a_snapshot(d) -> None:
    d.ok(d.declare("p", arguments={"x-max-priority": 2}))
    for body, priority in ((b"a", 0), (b"b", 2), (b"c", 1)):
        publish(d, "p", body, priority=priority)
    restored = Driver(StateMachine.restore(d.sm.snapshot(), rewrite_headers=with_headers))
    assert [b for b, _ in restored.drain("p")] == [b"b", b"c", b"a"]


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (256, "{max_value_exceeded,256}"),
        (-1, "{value_negative,-1}"),
        ("5", '"expected integer, got longstr"'),
    ],
)
def test_invalid_max_priority(d, value: Any, detail: str) -> None:
    error = d.err(d.declare("p", arguments={"x-max-priority": value}))
    assert (error.reply_code, error.reply_text) == (
        406,
        f"PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'p' in vhost '/': {detail}",
    )


# ---- x-delivery-limit ------------------------------------------------------------------


def headers_of(message: Any) -> Any:
    return codec.decode_properties(message.properties).headers


def test_delivery_count_header_on_redelivery_and_limit_dead_letters(d) -> None:
    d.ok(d.declare("dead"))
    args = {
        "x-delivery-limit": 1,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "dead",
    }
    d.ok(d.declare("q", arguments=args))
    publish(d, "q", b"x")
    first = d.ok(d.get("q"))
    assert headers_of(first.message) == {"h": 1, "x-delivery-count": 0}
    d.ok(d.nack(first.delivery_tag, requeue=True))
    second = d.ok(d.get("q"))
    assert headers_of(second.message) == {"h": 1, "x-delivery-count": 1}
    d.ok(d.nack(second.delivery_tag, requeue=True))  # returned twice: past the limit
    assert d.queue("q").messages == 0
    dead = d.ok(d.get("dead", no_ack=True)).message
    death = headers_of(dead)["x-death"][0]
    assert (death["reason"], death["queue"]) == ("delivery_limit", "q")
    assert "x-delivery-count" not in headers_of(dead)  # a stamp on deliveries only


def test_channel_close_counts_and_limit_zero_allows_one_delivery(d) -> None:
    d.ok(d.declare("q", arguments={"x-delivery-limit": 0}))
    publish(d, "q")
    d.ok(d.get("q"))
    d.ok(c.CloseChannel(channel=d.ch()))
    assert d.queue("q").messages == 0  # no DLX: dropped
    assert d.sm.total_message_bytes == 0


def test_quorum_queue_counts_returns_without_a_limit(d) -> None:
    d.ok(d.declare("qq", durable=True, arguments={"x-queue-type": "quorum"}))
    publish(d, "qq")
    d.ok(d.qos(1))
    out = d.run(d.consume("qq", "t"))
    # RabbitMQ 3.10: a consumer's first delivery carries no x-delivery-count; each one
    # after a return does (basic.get stamps 0 on the first, see the test above).
    assert headers_of(d.delivers(out)[0].message) == {"h": 1}
    out = d.run(d.nack(1, requeue=True))
    for count in (2, 3):
        assert headers_of(d.delivers(out)[0].message)["x-delivery-count"] == count - 1
        out = d.run(d.nack(count, requeue=True))
    assert headers_of(d.delivers(out)[0].message)["x-delivery-count"] == 3
    ((_, stored, _),) = d.sm._broker.channels[d.ch()].unacked.values()
    assert headers_of(stored) == {"h": 1}  # the stored message is not stamped


def test_reject_without_requeue_is_not_a_delivery_limit_death(d) -> None:
    d.ok(d.declare("dead"))
    args = {
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "dead",
    }
    d.ok(d.declare("q", arguments=args))
    publish(d, "q")
    d.ok(d.nack(d.ok(d.get("q")).delivery_tag, requeue=False))
    assert headers_of(d.ok(d.get("dead")).message)["x-death"][0]["reason"] == "rejected"


# ---- queue types and argument texts -------------------------------------------------------


def prop_text(what: str, queue: str = "q") -> str:
    return f"PRECONDITION_FAILED - invalid property '{what}' for queue '{queue}' in vhost '/'"


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({}, prop_text("non-durable")),
        ({"durable": True, "exclusive": True}, prop_text("exclusive-owner")),
        ({"exclusive": True}, prop_text("exclusive-owner")),
        ({"durable": True, "auto_delete": True, "exclusive": True}, prop_text("auto-delete")),
        (
            {"arguments": {"x-max-priority": 5}},
            "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'q' in vhost '/' of "
            "queue type rabbit_quorum_queue",
        ),
        (
            {"durable": True, "arguments": {"x-queue-mode": "lazy"}},
            "PRECONDITION_FAILED - invalid arg 'x-queue-mode' for queue 'q' in vhost '/' of "
            "queue type rabbit_quorum_queue",
        ),
    ],
)
def test_quorum_declare_refusals(d, kw: dict[str, Any], text: str) -> None:
    arguments = {"x-queue-type": "quorum", **kw.pop("arguments", {})}
    error = d.err(d.declare("q", arguments=arguments, **kw))
    assert (error.reply_code, error.reply_text) == (406, text)


def test_quorum_accepts_its_arguments_and_classic_takes_a_delivery_limit(d) -> None:
    args = {"x-queue-type": "quorum", "x-delivery-limit": 3, "x-max-in-memory-length": 4}
    d.ok(d.declare("qq", durable=True, arguments=args))
    d.ok(d.declare("cq", arguments={"x-delivery-limit": 3}))


def test_stream_is_refused_clearly(d) -> None:
    error = d.err(d.declare("s", durable=True, arguments={"x-queue-type": "stream"}))
    assert (error.reply_code, error.reply_text) == (
        406,
        "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue 's' in vhost '/': "
        "\"queue type 'stream' is not supported by Warren\"",
    )


QUORUM = "the value 'quorum' of type 'longstr'"


def inequivalent(key: str, received: str, current: str, queue: str = "q") -> str:
    return (
        f"PRECONDITION_FAILED - inequivalent arg '{key}' for queue '{queue}' in vhost '/': "
        f"received {received} but current is {current}"
    )


@pytest.mark.parametrize(
    ("first", "second", "text"),
    [
        ({"x-queue-type": "quorum"}, {}, inequivalent("x-queue-type", "none", QUORUM)),
        ({}, {"x-queue-type": "quorum"}, inequivalent("x-queue-type", QUORUM, "none")),
        ({"x-queue-type": "quorum"}, {"x-queue-type": "classic"},
         inequivalent("x-queue-type", "'classic'", "'quorum'")),
        ({"x-queue-type": "classic"}, {}, None),
        ({}, {"x-queue-type": "classic"}, None),
        ({"x-foo": 1}, {"x-foo": 2}, None),  # unknown arguments are stored, never compared
        ({"x-foo": 1}, {}, None),
        ({"x-delivery-limit": 1}, {"x-delivery-limit": 2},
         inequivalent("x-delivery-limit", "'2'", "'1'")),
        ({"x-max-priority": 5}, {"x-max-priority": 6},
         inequivalent("x-max-priority", "'6'", "'5'")),
    ],
)  # fmt: skip
def test_redeclare_equivalence(d, first: Any, second: Any, text: str | None) -> None:
    d.ok(d.declare("q", durable=True, arguments=first))
    if text is None:
        d.ok(d.declare("q", durable=True, arguments=second))
    else:
        error = d.err(d.declare("q", durable=True, arguments=second))
        assert (error.reply_code, error.reply_text) == (406, text)
    assert d.sm._broker.vhosts["/"].queues["q"].arguments == first


def test_alternate_exchange_of_the_wrong_type_is_refused(d) -> None:
    error = d.err(d.xdeclare("x", arguments={"alternate-exchange": 1}))
    assert error.reply_text == (
        "PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange' in "
        "exchange 'x' in vhost '/'"
    )
