"""Message TTL (x-message-ttl, the expiration property) and queue expiry (x-expires), with
time injected through the commands' now_ms. Rules checked against RabbitMQ 3.10."""

from __future__ import annotations

import pytest

from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import AmqpError, ChannelRef, GetEmpty, Properties, Routed


def publish(d, queue: str, body: bytes, now: int, expiration: str | None = None) -> object:
    cmd = d.publish("", queue, body, now_ms=now)
    if expiration is not None:
        cmd = c.Publish(
            channel=cmd.channel,
            vhost="/",
            exchange="",
            routing_key=queue,
            mandatory=False,
            properties=b"",
            props=Properties(expiration=expiration),
            body=body,
            now_ms=now,
        )
    return d.run(cmd).reply


def count(d, queue: str, now: int) -> int:
    return d.ok(
        c.DeclareQueue(vhost="/", queue=queue, owner=1, passive=True, now_ms=now)
    ).message_count


def test_queue_ttl_expires_at_the_head(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 1000}))
    publish(d, "q", b"a", now=0)
    publish(d, "q", b"b", now=500)
    d.ok(c.Tick(now_ms=999))
    assert d.queue("q").messages == 2
    d.ok(c.Tick(now_ms=1001))
    assert d.queue("q").messages == 1
    assert d.sm.total_message_bytes == 1
    assert count(d, "q", now=1501) == 0


def test_expiry_is_lazy_without_ticks(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 10}))
    publish(d, "q", b"a", now=0)
    assert count(d, "q", now=5) == 1
    assert count(d, "q", now=11) == 0  # any command touching the queue expires its head


def test_message_expiration_and_the_smaller_ttl_wins(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 1000}))
    publish(d, "q", b"short", now=0, expiration="100")
    publish(d, "q", b"long", now=0, expiration="5000")
    d.ok(c.Tick(now_ms=101))
    assert d.queue("q").messages == 1
    d.ok(c.Tick(now_ms=1001))
    assert d.queue("q").messages == 0


def test_expired_message_behind_a_live_head_waits(d) -> None:
    d.ok(d.declare("q"))
    publish(d, "q", b"head", now=0)
    publish(d, "q", b"short", now=0, expiration="200")
    d.ok(c.Tick(now_ms=400))
    assert d.queue("q").messages == 2  # as RabbitMQ: only the head is looked at
    reply = d.ok(c.Get(channel=d.ch(), vhost="/", queue="q", no_ack=True, now_ms=401))
    assert reply.message.body == b"head"
    assert reply.message_count == 0  # the expired one reached the head and went
    assert d.ok(c.Get(channel=d.ch(), vhost="/", queue="q", now_ms=402)) == GetEmpty()


def test_zero_ttl_is_delivered_to_a_waiting_consumer_or_dropped(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 0}))
    assert publish(d, "q", b"gone", now=5) == Routed(1)
    assert d.queue("q").messages == 0
    d.ok(d.consume("q", "t"))
    out = d.run(d.publish("", "q", b"kept", now_ms=6))
    assert d.bodies(out) == [b"kept"]


def test_requeued_message_keeps_its_expiry(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 300}))
    publish(d, "q", b"a", now=0)
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="q", now_ms=50)).delivery_tag
    d.ok(c.Nack(channel=d.ch(), delivery_tag=tag, now_ms=500))
    assert d.queue("q").messages == 0
    assert d.sm.total_message_bytes == 0


def test_consumers_never_get_expired_messages(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 100}))
    d.ok(d.qos(1))
    d.ok(d.consume("q", "t"))
    publish(d, "q", b"1", now=0)
    publish(d, "q", b"2", now=0)
    publish(d, "q", b"3", now=90)
    out = d.run(c.Ack(channel=d.ch(), delivery_tag=1, now_ms=150))
    assert d.bodies(out) == [b"3"]


@pytest.mark.parametrize(
    ("expiration", "detail"),
    [
        ("", "no_integer"),  # present but empty: RabbitMQ 3.10 closes the channel
        ("abc", "no_integer"),
        (" 5", "no_integer"),
        ("-1", "{value_negative,-1}"),
        ("1.5", '{leftover_string,".5"}'),
        ("12abc", '{leftover_string,"abc"}'),
        ("315360000001", "{value_too_large,315360000001}"),
    ],
)
def test_invalid_expiration_is_refused(d, expiration: str, detail: str) -> None:
    d.ok(d.declare("q"))
    error = publish(d, "q", b"x", now=0, expiration=expiration)
    assert error == AmqpError(
        406, f"PRECONDITION_FAILED - invalid expiration '{expiration}': {detail}", 60, 40
    )
    assert d.queue("q").messages == 0


@pytest.mark.parametrize("expiration", ["0", "+5", "-0", "315360000000"])
def test_valid_expirations(d, expiration: str) -> None:
    d.ok(d.declare("q"))
    assert publish(d, "q", b"x", now=0, expiration=expiration) == Routed(1)


def test_queue_expires_when_unused(d) -> None:
    d.ok(c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={"x-expires": 300}, now_ms=0))
    publish(d, "q", b"x", now=100)  # publishing is not use
    count(d, "q", now=150)  # a (passive) declaration is
    d.ok(c.Tick(now_ms=449))
    assert d.sm.queue_exists("/", "q")
    d.ok(c.Tick(now_ms=450))
    assert not d.sm.queue_exists("/", "q")
    assert d.sm.total_message_bytes == 0


def test_queue_with_consumers_does_not_expire(d) -> None:
    d.ok(c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={"x-expires": 100}, now_ms=0))
    d.ok(c.Consume(channel=d.ch(), vhost="/", queue="q", consumer_tag="t", now_ms=50))
    d.ok(c.Tick(now_ms=1000))
    assert d.sm.queue_exists("/", "q")
    d.ok(c.Cancel(channel=d.ch(), consumer_tag="t", now_ms=2000))
    d.ok(c.Tick(now_ms=2099))
    assert d.sm.queue_exists("/", "q")
    d.ok(c.Tick(now_ms=2100))
    assert not d.sm.queue_exists("/", "q")


def test_expired_queue_is_gone_even_before_a_tick(d) -> None:
    d.ok(c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={"x-expires": 100}, now_ms=0))
    error = d.err(c.DeclareQueue(vhost="/", queue="q", owner=1, passive=True, now_ms=100))
    assert error.reply_text == "NOT_FOUND - no queue 'q' in vhost '/'"


def test_clock_never_goes_back(d) -> None:
    d.ok(d.declare("q", arguments={"x-message-ttl": 100}))
    publish(d, "q", b"a", now=1000)
    d.ok(c.Tick(now_ms=1200))
    publish(d, "q", b"b", now=50)  # an older timestamp: expiry counts from 1200
    d.ok(c.Tick(now_ms=1250))
    assert d.queue("q").messages == 1
    d.ok(c.Tick(now_ms=1301))
    assert d.queue("q").messages == 0


def test_snapshot_keeps_expiry_times() -> None:
    sm = StateMachine()
    sm.apply(c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={"x-expires": 1000}))
    sm.apply(
        c.Publish(
            channel=ChannelRef(1, 1),
            vhost="/",
            exchange="",
            routing_key="q",
            mandatory=False,
            properties=b"",
            props=Properties(expiration="100"),
            body=b"x",
            now_ms=10,
        )
    )
    restored = StateMachine.restore(sm.snapshot())
    restored.apply(c.Tick(now_ms=109))
    assert next(iter(restored.queues("/"))).messages == 1
    restored.apply(c.Tick(now_ms=111))
    assert next(iter(restored.queues("/"))).messages == 0
    restored.apply(c.Tick(now_ms=1000))
    assert not restored.queue_exists("/", "q")
