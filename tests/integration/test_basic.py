"""The basic class as RabbitMQ shows it to clients: qos/prefetch, consume (tags, exclusive,
no-ack, priority), cancel and cancel notifications, publish (mandatory, immediate, properties),
get, ack/nack/reject/recover, requeue order and redelivered flags, FIFO and body sizes.

Every expected reply code and text here was read from RabbitMQ 3.10. pika covers most of it;
the `raw_amqp` socket client covers what pika will not send (server-named consumer tags,
immediate=true, a reused consumer tag) or hides (frame order). Names are unique per test.
"""

from __future__ import annotations

import datetime
import decimal
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest
from pamqp import body as pamqp_body
from pamqp import commands, header

VHOST = "'/'"

Delivery = tuple[Any, Any, bytes]  # (method, properties, body) as pika hands them over


def consume(ch: Any, queue: str, **kwargs: Any) -> tuple[str, list[Delivery]]:
    """basic.consume with a callback that records deliveries; returns (tag, record)."""
    got: list[Delivery] = []
    tag = ch.basic_consume(queue, lambda _ch, m, p, b: got.append((m, p, b)), **kwargs)
    return tag, got


def pump(conn: Any, until: Callable[[], bool], timeout: float = 5.0) -> None:
    """Process pika I/O until `until()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out waiting for the broker"
        conn.process_data_events(time_limit=0.02)


def settle(conn: Any, seconds: float = 0.3) -> None:
    """Process pika I/O for a while, so that deliveries that should not come would arrive."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.02)


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [body for _m, _p, body in deliveries]


def publish_n(ch: Any, queue: str, n: int, prefix: str = "m") -> None:
    for i in range(n):
        ch.basic_publish("", queue, f"{prefix}{i}".encode())


def raw_publish(
    client: Any, channel: int, exchange: str, routing_key: str, body: bytes, **flags: bool
) -> None:
    client.send_method(
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key, **flags), channel
    )
    client.send_method(header.ContentHeader(0, len(body), commands.Basic.Properties()), channel)
    if body:
        client.send_method(pamqp_body.ContentBody(body), channel)


def raw_client(raw_amqp: Callable[..., Any]) -> Any:
    client = raw_amqp()
    _start, _tune, opened = client.handshake()
    assert isinstance(opened, commands.Connection.OpenOk), opened
    client.open_channel(1)
    return client


# --- qos ----------------------------------------------------------------------------------------


def test_prefetch_count_limits_each_consumer(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    q1, q2 = pika_env.queue(), pika_env.queue()
    publish_n(ch, q1, 5, "a")
    publish_n(ch, q2, 5, "b")
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=2)  # per consumer (global=False)
    _t1, got1 = consume(cch, q1)
    _t2, got2 = consume(cch, q2)
    pump(consumer, lambda: len(got1) >= 2 and len(got2) >= 2)
    settle(consumer)
    assert bodies(got1) == [b"a0", b"a1"]
    assert bodies(got2) == [b"b0", b"b1"]
    assert ch.queue_declare(q1, passive=True).method.message_count == 3
    # one ack frees one slot: exactly one more delivery
    cch.basic_ack(got1[0][0].delivery_tag)
    pump(consumer, lambda: len(got1) >= 3)
    settle(consumer)
    assert bodies(got1) == [b"a0", b"a1", b"a2"]
    assert bodies(got2) == [b"b0", b"b1"]
    # two acks free both slots of the second consumer (delivery tags are per channel, so a
    # multiple ack here would settle the first consumer's messages too)
    cch.basic_ack(got2[0][0].delivery_tag)
    cch.basic_ack(got2[1][0].delivery_tag)
    pump(consumer, lambda: len(got2) >= 4)
    settle(consumer)
    assert bodies(got2) == [b"b0", b"b1", b"b2", b"b3"]
    assert len(got1) == 3


def test_global_prefetch_is_shared_by_the_channels_consumers(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    q1, q2 = pika_env.queue(), pika_env.queue()
    publish_n(ch, q1, 5, "a")
    publish_n(ch, q2, 5, "b")
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=3, global_qos=True)
    _t1, got1 = consume(cch, q1)
    _t2, got2 = consume(cch, q2)
    pump(consumer, lambda: len(got1) + len(got2) >= 3)
    settle(consumer)
    assert len(got1) + len(got2) == 3
    assert bodies(got1) == [f"a{i}".encode() for i in range(len(got1))]
    assert bodies(got2) == [f"b{i}".encode() for i in range(len(got2))]
    ready = (
        ch.queue_declare(q1, passive=True).method.message_count
        + ch.queue_declare(q2, passive=True).method.message_count
    )
    assert ready == 7


def test_prefetch_zero_means_unlimited(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 20)
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=0)
    _tag, got = consume(cch, queue)
    pump(consumer, lambda: len(got) >= 20)
    assert bodies(got) == [f"m{i}".encode() for i in range(20)]


def test_prefetch_size_is_not_implemented(pika_env: Any) -> None:
    conn = pika_env.connect()
    with pika_env.closes_connection(540, "NOT_IMPLEMENTED - prefetch_size!=0 (1)"):
        conn.channel().basic_qos(prefetch_size=1, prefetch_count=10)
    assert conn.is_closed


# --- consume ------------------------------------------------------------------------------------


def test_server_generates_consumer_tags(pika_env: Any, raw_amqp: Callable[..., Any]) -> None:
    queue = pika_env.queue()
    ch = pika_env.channel(confirm=True)
    client = raw_client(raw_amqp)
    client.send_method(commands.Basic.Consume(queue=queue, consumer_tag=""), 1)
    first = client.recv()
    client.send_method(commands.Basic.Consume(queue=queue, consumer_tag=""), 1)
    second = client.recv()
    assert isinstance(first, commands.Basic.ConsumeOk)
    assert isinstance(second, commands.Basic.ConsumeOk)
    assert first.consumer_tag.startswith("amq.ctag-")
    assert second.consumer_tag.startswith("amq.ctag-")
    assert first.consumer_tag != second.consumer_tag
    ch.basic_publish("", queue, b"tagged")
    deliver = client.recv()
    assert isinstance(deliver, commands.Basic.Deliver)
    assert deliver.consumer_tag == first.consumer_tag
    assert (deliver.delivery_tag, deliver.redelivered) == (1, False)
    assert (deliver.exchange, deliver.routing_key) == ("", queue)


def test_reusing_a_consumer_tag_on_a_channel_closes_the_connection(
    pika_env: Any, raw_amqp: Callable[..., Any]
) -> None:
    queue = pika_env.queue()
    client = raw_client(raw_amqp)
    client.send_method(commands.Basic.Consume(queue=queue, consumer_tag="mine"), 1)
    assert client.recv().consumer_tag == "mine"
    client.send_method(commands.Basic.Consume(queue=queue, consumer_tag="mine"), 1)
    close = client.expect_connection_close()
    assert (close.reply_code, close.reply_text) == (
        530,
        "NOT_ALLOWED - attempt to reuse consumer tag 'mine'",
    )
    assert (close.class_id, close.method_id) == (60, 20)


def test_consume_from_missing_queue_is_404(pika_env: Any) -> None:
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, f"NOT_FOUND - no queue '{name}' in vhost {VHOST}"):
        pika_env.channel().basic_consume(name, lambda *_: None)


def test_exclusive_consumer(pika_env: Any) -> None:
    queue = pika_env.queue()
    in_use = f"ACCESS_REFUSED - queue '{queue}' in vhost {VHOST} in exclusive use"
    ch = pika_env.channel()
    tag = ch.basic_consume(queue, lambda *_: None, exclusive=True)
    with pika_env.closes_channel(403, in_use):
        pika_env.channel().basic_consume(queue, lambda *_: None)
    with pika_env.closes_channel(403, in_use):
        pika_env.connect().channel().basic_consume(queue, lambda *_: None, exclusive=True)
    ch.basic_cancel(tag)
    # once cancelled, others may consume; an exclusive consumer needs the queue to itself
    shared = pika_env.channel()
    shared.basic_consume(queue, lambda *_: None)
    with pika_env.closes_channel(403, in_use):
        pika_env.channel().basic_consume(queue, lambda *_: None, exclusive=True)


def test_no_ack_consumer_messages_are_settled_on_delivery(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 3)
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=1)  # prefetch does not limit no-ack consumers
    _tag, got = consume(cch, queue, auto_ack=True)
    pump(consumer, lambda: len(got) >= 3)
    assert bodies(got) == [b"m0", b"m1", b"m2"]
    assert [m.delivery_tag for m, _p, _b in got] == [1, 2, 3]
    consumer.close()  # nothing to requeue
    assert ch.queue_declare(queue, passive=True).method.message_count == 0


def test_higher_priority_consumer_gets_messages_while_it_has_credit(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    conn = pika_env.connect()
    low_ch = conn.channel()
    _low_tag, low = consume(low_ch, queue)  # priority 0 (default), no prefetch limit
    high_ch = conn.channel()
    high_ch.basic_qos(prefetch_count=2)
    _high_tag, high = consume(high_ch, queue, arguments={"x-priority": 10})
    publish_n(ch, queue, 6)
    pump(conn, lambda: len(low) + len(high) >= 6)
    settle(conn)
    assert bodies(high) == [b"m0", b"m1"]
    assert bodies(low) == [b"m2", b"m3", b"m4", b"m5"]
    # when the high-priority consumer has credit again, it is preferred again
    high_ch.basic_ack(high[1][0].delivery_tag, multiple=True)
    settle(conn, 0.1)
    publish_n(ch, queue, 3, "n")
    pump(conn, lambda: len(low) + len(high) >= 9)
    settle(conn)
    assert bodies(high) == [b"m0", b"m1", b"n0", b"n1"]
    assert bodies(low) == [b"m2", b"m3", b"m4", b"m5", b"n2"]


def test_same_priority_consumers_share_round_robin(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    conn = pika_env.connect()
    _t1, first = consume(conn.channel(), queue)
    _t2, second = consume(conn.channel(), queue)
    publish_n(ch, queue, 6)
    pump(conn, lambda: len(first) + len(second) >= 6)
    assert bodies(first) == [b"m0", b"m2", b"m4"]
    assert bodies(second) == [b"m1", b"m3", b"m5"]


def test_cancel_stops_deliveries_and_unacked_messages_can_still_be_acked(
    pika_env: Any,
) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 4)
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=2)
    tag, got = consume(cch, queue)
    pump(consumer, lambda: len(got) >= 2)
    assert cch.basic_cancel(tag) == []  # pika: nothing pending for an ack-mode consumer
    ch.basic_publish("", queue, b"after cancel")
    settle(consumer)
    assert bodies(got) == [b"m0", b"m1"]
    cch.basic_ack(got[0][0].delivery_tag)
    assert ch.queue_declare(queue, passive=True).method.consumer_count == 0
    cch.basic_cancel("no-such-consumer")  # unknown tag: cancel-ok
    cch.close()  # m1 is requeued, m0 was acked
    assert pika_env.drain(ch, queue) == [b"m1", b"m2", b"m3", b"after cancel"]


def test_deleting_the_queue_notifies_its_consumers(pika_env: Any) -> None:
    queue = pika_env.queue()
    consumer = pika_env.connect()
    cch = consumer.channel()
    cancelled: list[Any] = []
    cch.add_on_cancel_callback(cancelled.append)
    tag = cch.basic_consume(queue, lambda *_: None)
    pika_env.channel().queue_delete(queue)
    pump(consumer, lambda: bool(cancelled))
    (frame,) = cancelled
    assert isinstance(frame.method, pika.spec.Basic.Cancel)
    assert frame.method.consumer_tag == tag
    assert cch.is_open  # the channel stays open
    assert cch.consumer_tags == []


# --- publish ------------------------------------------------------------------------------------


def test_mandatory_unroutable_is_returned_312_no_route(pika_env: Any) -> None:
    conn = pika_env.connect()
    ch = conn.channel()
    returned: list[tuple[Any, Any, bytes]] = []
    ch.add_on_return_callback(lambda _ch, m, p, b: returned.append((m, p, b)))
    x = pika_env.exchange("direct")
    props = pika.BasicProperties(content_type="text/plain", headers={"h": 1}, message_id="id-1")
    ch.basic_publish(x, "nowhere", b"come back", props, mandatory=True)
    ch.basic_publish(x, "nowhere", b"dropped silently", mandatory=False)
    pump(conn, lambda: bool(returned))
    settle(conn, 0.2)
    ((method, got_props, body),) = returned
    assert (method.reply_code, method.reply_text) == (312, "NO_ROUTE")
    assert (method.exchange, method.routing_key) == (x, "nowhere")
    assert body == b"come back"
    assert (got_props.content_type, got_props.headers, got_props.message_id) == (
        "text/plain",
        {"h": 1},
        "id-1",
    )


def test_mandatory_return_comes_before_the_confirm(
    pika_env: Any, raw_amqp: Callable[..., Any]
) -> None:
    x = pika_env.exchange("direct")
    queue = pika_env.queue()
    pika_env.channel().queue_bind(queue, x, "routed")
    client = raw_client(raw_amqp)
    client.send_method(commands.Confirm.Select(), 1)
    assert isinstance(client.recv(), commands.Confirm.SelectOk)
    raw_publish(client, 1, x, "routed", b"one", mandatory=True)
    raw_publish(client, 1, x, "nowhere", b"two", mandatory=True)
    raw_publish(client, 1, x, "nowhere", b"three", mandatory=False)
    # Read until all three are confirmed. Confirms may come out of order (RabbitMQ acks an
    # unroutable message at once, a routed one when its queue has it) and may be folded
    # (multiple=True): each ack is expanded into the tags it confirms.
    events: list[tuple[Any, ...]] = []
    unconfirmed = {1, 2, 3}
    while unconfirmed:
        frame = client.recv()
        if isinstance(frame, commands.Basic.Ack):
            tags = {frame.delivery_tag}
            if frame.multiple:
                tags = {t for t in unconfirmed if t <= frame.delivery_tag}
            assert tags, f"ack {frame.delivery_tag} confirms nothing new"
            assert tags <= unconfirmed, f"tags {tags - unconfirmed} confirmed twice"
            unconfirmed -= tags
            events.extend(("ack", tag) for tag in sorted(tags))
        elif isinstance(frame, commands.Basic.Return):
            events.append(("return", frame.reply_code, frame.reply_text, frame.routing_key))
        elif isinstance(frame, header.ContentHeader):
            events.append(("header", frame.body_size))
        elif isinstance(frame, pamqp_body.ContentBody):
            events.append(("body", frame.value))
        else:
            events.append(("unexpected", type(frame).__name__))
    returned = [
        ("return", 312, "NO_ROUTE", "nowhere"),
        ("header", 3),
        ("body", b"two"),
    ]
    start = events.index(returned[0])
    assert events[start : start + 3] == returned
    assert start < events.index(("ack", 2)), events  # the return precedes its confirm
    assert sorted(e for e in events if e[0] == "ack") == [("ack", 1), ("ack", 2), ("ack", 3)]
    assert len(events) == 6, events  # nothing else: one return, three confirms


def test_pika_confirm_channel_raises_unroutable_for_a_returned_message(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("fanout")
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        ch.basic_publish(x, "", b"no queue bound", mandatory=True)
    (returned,) = info.value.messages
    assert (returned.method.reply_code, returned.method.reply_text) == (312, "NO_ROUTE")
    assert returned.body == b"no queue bound"
    assert ch.is_open


def test_immediate_is_not_implemented(pika_env: Any, raw_amqp: Callable[..., Any]) -> None:
    queue = pika_env.queue()
    client = raw_client(raw_amqp)
    raw_publish(client, 1, "", queue, b"now or never", immediate=True)
    close = client.expect_connection_close()
    assert (close.reply_code, close.reply_text) == (540, "NOT_IMPLEMENTED - immediate=true")
    assert (close.class_id, close.method_id) == (60, 40)
    assert pika_env.channel().queue_declare(queue, passive=True).method.message_count == 0


def test_publish_to_missing_exchange_closes_the_channel_only(pika_env: Any) -> None:
    conn = pika_env.connect()
    ch = conn.channel()
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{name}' in vhost {VHOST}"):
        ch.basic_publish(name, "k", b"lost")
        ch.queue_declare("", exclusive=True)  # a round trip to receive the close
    assert conn.is_open
    conn.channel().queue_declare("", exclusive=True)


def test_deliver_fields_and_properties_are_preserved_exactly(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("topic")
    queue = pika_env.queue()
    ch.queue_bind(queue, x, "order.*")
    props = pika.BasicProperties(
        content_type="application/json",
        content_encoding="gzip",
        headers={
            "str": "text",
            "int": 42,
            "negative": -7,
            "big": 2**40,
            "bool": True,
            "decimal": decimal.Decimal("1.25"),
            "datetime": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
            "list": [1, "two", False],
            "nested": {"a": {"b": "c"}},
            "bytes": b"\x00\xff",
        },
        delivery_mode=2,
        priority=7,
        correlation_id="corr-1",
        reply_to="amq.rabbitmq.reply-to-not-really",
        expiration="60000",
        message_id="msg-1",
        timestamp=1_700_000_000,
        type="order.created",
        user_id="guest",  # must equal the authenticated user
        app_id="warren-tests",
    )
    ch.basic_publish(x, "order.created", b'{"id": 1}', props)
    consumer = pika_env.connect()
    _tag, got = consume(consumer.channel(), queue)
    pump(consumer, lambda: bool(got))
    ((method, got_props, body),) = got
    assert body == b'{"id": 1}'
    assert (method.exchange, method.routing_key, method.redelivered) == (
        x,
        "order.created",
        False,
    )
    assert method.delivery_tag == 1
    for name in [
        "content_type",
        "content_encoding",
        "headers",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    ]:
        assert getattr(got_props, name) == getattr(props, name), name
    assert got_props.cluster_id is None


def test_no_properties_stay_no_properties(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"bare")
    _method, props, body = ch.basic_get(queue, auto_ack=True)
    assert body == b"bare"
    assert props.headers is None
    assert props.delivery_mode is None
    assert props.content_type is None
    assert props.timestamp is None


def test_user_id_must_match_the_authenticated_user(pika_env: Any) -> None:
    ch = pika_env.channel()
    queue = pika_env.queue()
    with pika_env.closes_channel(
        406,
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user"
        " was 'guest'",
    ):
        ch.basic_publish("", queue, b"spoofed", pika.BasicProperties(user_id="mallory"))
        ch.queue_declare(queue, passive=True)


# --- get ----------------------------------------------------------------------------------------


def test_get_reports_remaining_count_and_get_empty(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    assert ch.basic_get(queue) == (None, None, None)
    publish_n(ch, queue, 3)
    seen = []
    for _ in range(3):
        method, _props, body = ch.basic_get(queue)
        seen.append((body, method.message_count, method.delivery_tag, method.redelivered))
        assert (method.exchange, method.routing_key) == ("", queue)
    assert seen == [(b"m0", 2, 1, False), (b"m1", 1, 2, False), (b"m2", 0, 3, False)]
    assert ch.basic_get(queue) == (None, None, None)


def test_get_from_missing_queue_is_404(pika_env: Any) -> None:
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, f"NOT_FOUND - no queue '{name}' in vhost {VHOST}"):
        pika_env.channel().basic_get(name)


# --- ack / nack / reject / recover --------------------------------------------------------------


def get_all(ch: Any, queue: str, n: int) -> list[Any]:
    methods = []
    for _ in range(n):
        method, _props, _body = ch.basic_get(queue)
        assert method is not None
        methods.append(method)
    return methods


def drain_with_flags(ch: Any, queue: str) -> list[tuple[bytes, bool]]:
    out = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((body, method.redelivered))


def test_ack_multiple_settles_up_to_the_tag(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 5)
    conn = pika_env.connect()
    cch = conn.channel()
    methods = get_all(cch, queue, 5)
    assert [m.delivery_tag for m in methods] == [1, 2, 3, 4, 5]
    cch.basic_ack(3, multiple=True)
    cch.close()  # 4 and 5 go back, redelivered
    assert drain_with_flags(ch, queue) == [(b"m3", True), (b"m4", True)]


def test_ack_zero_multiple_settles_everything_outstanding(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 3)
    cch = pika_env.connect().channel()
    get_all(cch, queue, 3)
    cch.basic_ack(0, multiple=True)
    cch.basic_recover(requeue=True)
    assert cch.basic_get(queue) == (None, None, None)


def test_reject_requeue_returns_to_the_original_position(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 5)
    cch = pika_env.connect().channel()
    methods = get_all(cch, queue, 3)  # m0 m1 m2 out, m3 m4 ready
    cch.basic_reject(methods[0].delivery_tag, requeue=True)
    cch.basic_reject(methods[2].delivery_tag, requeue=True)
    assert drain_with_flags(ch, queue) == [
        (b"m0", True),
        (b"m2", True),
        (b"m3", False),
        (b"m4", False),
    ]


def test_nack_multiple_requeue_restores_order_with_redelivered(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 5)
    cch = pika_env.connect().channel()
    get_all(cch, queue, 4)
    cch.basic_nack(3, multiple=True, requeue=True)  # m0 m1 m2 back; m3 still out
    method, _props, body = cch.basic_get(queue)
    assert (body, method.redelivered, method.message_count) == (b"m0", True, 3)
    assert method.delivery_tag == 5  # tags keep counting up on the channel
    assert drain_with_flags(ch, queue) == [(b"m1", True), (b"m2", True), (b"m4", False)]


def test_reject_and_nack_without_requeue_drop_the_message(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 4)
    cch = pika_env.connect().channel()
    methods = get_all(cch, queue, 4)
    cch.basic_reject(methods[0].delivery_tag, requeue=False)
    cch.basic_nack(methods[2].delivery_tag, multiple=True, requeue=False)
    cch.basic_recover(requeue=True)
    assert drain_with_flags(cch, queue) == [(b"m3", True)]


@pytest.mark.parametrize(
    ("settle_call", "tag"),
    [
        (lambda ch: ch.basic_ack(99), 99),
        (lambda ch: ch.basic_ack(0), 0),
        (lambda ch: ch.basic_nack(7, multiple=True), 7),
        (lambda ch: ch.basic_reject(5), 5),
    ],
)
def test_unknown_delivery_tag_is_406(
    pika_env: Any, settle_call: Callable[[Any], None], tag: int
) -> None:
    ch = pika_env.channel()
    with pika_env.closes_channel(406, f"PRECONDITION_FAILED - unknown delivery tag {tag}"):
        settle_call(ch)
        ch.queue_declare("", exclusive=True)  # a round trip to receive the close


def test_double_ack_is_406(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 1)
    method, _props, _body = ch.basic_get(queue)
    ch.basic_ack(method.delivery_tag)
    with pika_env.closes_channel(
        406, f"PRECONDITION_FAILED - unknown delivery tag {method.delivery_tag}"
    ):
        ch.basic_ack(method.delivery_tag)
        ch.queue_declare(queue, passive=True)


def test_delivery_tags_are_per_channel(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 2)
    conn = pika_env.connect()
    a, b = conn.channel(), conn.channel()
    assert a.basic_get(queue)[0].delivery_tag == 1
    assert b.basic_get(queue)[0].delivery_tag == 1
    with pika_env.closes_channel(406, "PRECONDITION_FAILED - unknown delivery tag 2"):
        a.basic_ack(2)
        a.queue_declare(queue, passive=True)
    b.basic_ack(1)


def test_recover_requeue_redelivers_unacked_messages(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 3)
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=3)
    _tag, got = consume(cch, queue)
    pump(consumer, lambda: len(got) >= 3)
    cch.basic_ack(got[1][0].delivery_tag)  # m1 settled; m0 and m2 are not
    cch.basic_recover(requeue=True)
    pump(consumer, lambda: len(got) >= 5)
    settle(consumer)
    again = [(body, m.redelivered, m.delivery_tag) for m, _p, body in got[3:]]
    assert again == [(b"m0", True, 4), (b"m2", True, 5)]


def test_recover_without_requeue_is_not_implemented(pika_env: Any) -> None:
    conn = pika_env.connect()
    with pika_env.closes_connection(540, "NOT_IMPLEMENTED - requeue=false"):
        conn.channel().basic_recover(requeue=False)


@pytest.mark.parametrize("closing", ["channel", "connection"])
def test_closing_requeues_unacked_for_the_next_consumer(pika_env: Any, closing: str) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_n(ch, queue, 5)
    first = pika_env.connect()
    fch = first.channel()
    fch.basic_qos(prefetch_count=3)
    _tag, got = consume(fch, queue)
    pump(first, lambda: len(got) >= 3)
    fch.basic_ack(got[1][0].delivery_tag)  # m1 is done, which lets m3 through
    pump(first, lambda: len(got) >= 4)
    settle(first)
    assert bodies(got) == [b"m0", b"m1", b"m2", b"m3"]  # m0, m2, m3 unacked; m4 ready
    if closing == "channel":
        fch.close()
    else:
        first.close()
    second = pika_env.connect()
    _tag2, got2 = consume(second.channel(), queue)
    pump(second, lambda: len(got2) >= 4)
    settle(second)
    assert [(b, m.redelivered) for m, _p, b in got2] == [
        (b"m0", True),
        (b"m2", True),
        (b"m3", True),
        (b"m4", False),
    ]


# --- order and size -----------------------------------------------------------------------------


def test_fifo_for_a_thousand_messages(pika_env: Any) -> None:
    queue = pika_env.queue()
    publisher = pika_env.connect().channel()
    for i in range(1000):
        publisher.basic_publish("", queue, str(i).encode())
    consumer = pika_env.connect()
    cch = consumer.channel()
    cch.basic_qos(prefetch_count=100)
    got: list[bytes] = []

    def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
        got.append(body)
        ch.basic_ack(method.delivery_tag)

    cch.basic_consume(queue, on_message)
    pump(consumer, lambda: len(got) >= 1000, timeout=30)
    assert got == [str(i).encode() for i in range(1000)]


@pytest.mark.parametrize(
    "size",
    [0, 1, 131_072 - 8 - 1, 131_072 - 8, 131_072 - 8 + 1, 1024 * 1024],
    ids=["empty", "one-byte", "frame-minus-1", "one-frame", "frame-plus-1", "1MB"],
)
def test_body_sizes_round_trip(pika_env: Any, size: int) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    body = bytes(i % 251 for i in range(size))
    ch.basic_publish("", queue, body, pika.BasicProperties(message_id=str(size)))
    _method, props, got = ch.basic_get(queue, auto_ack=True)
    assert len(got) == size
    assert got == body
    assert props.message_id == str(size)
    consumer = pika_env.connect()
    ch.basic_publish("", queue, body)
    _tag, deliveries = consume(consumer.channel(), queue, auto_ack=True)
    pump(consumer, lambda: bool(deliveries))
    assert deliveries[0][2] == body
