"""Issue 3, item 7: direct reply-to (`amq.rabbitmq.reply-to`).

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- The requester consumes the pseudo-queue with no-ack (406 otherwise), then publishes with
  reply_to `amq.rabbitmq.reply-to`; the responder sees `amq.rabbitmq.reply-to.<token>`
  and publishes its reply to the default exchange with that key; the reply is delivered
  to the requesting channel (exchange '', routing key the full name, the consume's tag).
- No queue is ever declared: basic.get on the name is 404; a declare of the bare name
  answers declare-ok with consumer_count 1 even without a consumer (a 3.10 quirk).
- A reply to a channel that no longer listens, or to a made-up token, is unroutable; a
  mandatory reply that IS delivered is also returned with 312 NO_ROUTE (a 3.10 quirk).
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pytest

REPLY_TO = "amq.rabbitmq.reply-to"
DEADLINE_S = 3.0


def wait_for(conn: Any, until: Any, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        conn.process_data_events(0.02)


def listen(ch: Any, got: list[tuple[Any, Any, bytes]]) -> str:
    return str(
        ch.basic_consume(
            REPLY_TO,
            lambda _c, method, props, body: got.append((method, props, body)),
            auto_ack=True,
        )
    )


def request(env: Any, requester: Any, body: bytes = b"req") -> tuple[str, Any]:
    """Publish a request from `requester` to a fresh queue; (server queue, request props)
    as the responder gets them."""
    server_queue = env.queue("rpc")
    requester.basic_publish(
        "", server_queue, body, pika.BasicProperties(reply_to=REPLY_TO, correlation_id="c1")
    )
    responder = env.connect().channel()
    deadline = time.monotonic() + DEADLINE_S
    while (got := responder.basic_get(server_queue, auto_ack=True))[0] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert got[2] == body
    return server_queue, got[1]


def test_request_reply_round_trip(pika_env: Any) -> None:
    conn = pika_env.connect()
    ch = conn.channel()
    got: list[tuple[Any, Any, bytes]] = []
    tag = listen(ch, got)
    _queue, props = request(pika_env, ch)
    assert props.reply_to.startswith(REPLY_TO + ".")
    assert len(props.reply_to) > len(REPLY_TO) + 1
    assert props.correlation_id == "c1"
    responder = pika_env.connect().channel()
    responder.confirm_delivery()
    responder.basic_publish("", props.reply_to, b"resp", pika.BasicProperties(correlation_id="c1"))
    wait_for(conn, lambda: got)
    [(method, rprops, body)] = got
    assert (method.exchange, method.routing_key, method.consumer_tag, method.redelivered) == (
        "",
        props.reply_to,
        tag,
        False,
    )
    assert (body, rprops.correlation_id, rprops.reply_to) == (b"resp", "c1", None)


def test_mandatory_reply_is_delivered_and_also_returned(pika_env: Any) -> None:
    """A 3.10 quirk: the reply bypasses queue routing, so mandatory finds no queue and
    basic.return (312 NO_ROUTE) is sent although the reply was delivered."""
    conn = pika_env.connect()
    ch = conn.channel()
    got: list[tuple[Any, Any, bytes]] = []
    listen(ch, got)
    _queue, props = request(pika_env, ch)
    responder = pika_env.connect().channel()
    responder.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        responder.basic_publish("", props.reply_to, b"resp", mandatory=True)
    [returned] = info.value.messages
    assert (returned.method.reply_code, returned.method.reply_text) == (312, "NO_ROUTE")
    assert (returned.method.exchange, returned.method.routing_key) == ("", props.reply_to)
    wait_for(conn, lambda: got)
    assert [b for _m, _p, b in got] == [b"resp"]


def test_replies_reach_only_the_requesting_channel(pika_env: Any) -> None:
    conn = pika_env.connect()
    one, two = conn.channel(), conn.channel()
    got_one: list[tuple[Any, Any, bytes]] = []
    got_two: list[tuple[Any, Any, bytes]] = []
    listen(one, got_one)
    listen(two, got_two)
    _q1, p1 = request(pika_env, one, b"r1")
    _q2, p2 = request(pika_env, two, b"r2")
    assert p1.reply_to != p2.reply_to
    responder = pika_env.connect().channel()
    responder.basic_publish("", p2.reply_to, b"for-two")
    responder.basic_publish("", p1.reply_to, b"for-one")
    wait_for(conn, lambda: got_one and got_two)
    conn.process_data_events(0.05)
    assert [b for _m, _p, b in got_one] == [b"for-one"]
    assert [b for _m, _p, b in got_two] == [b"for-two"]


def test_requesting_channel_may_reply_to_itself(pika_env: Any) -> None:
    conn = pika_env.connect()
    ch = conn.channel()
    got: list[tuple[Any, Any, bytes]] = []
    listen(ch, got)
    _queue, props = request(pika_env, ch)
    ch.basic_publish("", props.reply_to, b"self")
    wait_for(conn, lambda: got)
    assert [b for _m, _p, b in got] == [b"self"]


def test_consuming_with_acks_is_refused(pika_env: Any) -> None:
    ch = pika_env.channel()
    with pika_env.closes_channel(406, "PRECONDITION_FAILED - reply consumer cannot acknowledge"):
        ch.basic_consume(REPLY_TO, lambda *_: None, auto_ack=False)


def test_second_reply_consumer_on_a_channel_is_refused(pika_env: Any) -> None:
    ch = pika_env.channel()
    listen(ch, [])
    with pika_env.closes_channel(406, "PRECONDITION_FAILED - reply consumer already set"):
        listen(ch, [])


def test_publishing_with_reply_to_without_consuming_is_refused(pika_env: Any) -> None:
    queue = pika_env.queue()
    ch = pika_env.channel()
    with pika_env.closes_channel(406, "PRECONDITION_FAILED - fast reply consumer does not exist"):
        ch.basic_publish("", queue, b"m", pika.BasicProperties(reply_to=REPLY_TO))
        ch.queue_declare(queue, passive=True)
    check = pika_env.channel()
    assert check.queue_declare(queue, passive=True).method.message_count == 0


def test_no_queue_is_declared(pika_env: Any) -> None:
    ch = pika_env.channel()
    ok = ch.queue_declare(REPLY_TO, passive=True).method
    # 3.10 answers consumer_count 1 whether or not anyone listens
    assert (ok.queue, ok.message_count, ok.consumer_count) == (REPLY_TO, 0, 1)
    ok = ch.queue_declare(REPLY_TO).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (REPLY_TO, 0, 1)
    with pika_env.closes_channel(404, f"NOT_FOUND - no queue '{REPLY_TO}' in vhost '/'"):
        ch.basic_get(REPLY_TO)


def test_reply_after_cancel_is_unroutable(pika_env: Any) -> None:
    conn = pika_env.connect()
    ch = conn.channel()
    tag = listen(ch, [])
    _queue, props = request(pika_env, ch)
    ch.basic_cancel(tag)
    responder = pika_env.connect().channel()
    responder.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        responder.basic_publish("", props.reply_to, b"late", mandatory=True)
    [returned] = info.value.messages
    assert (returned.method.reply_code, returned.method.reply_text) == (312, "NO_ROUTE")
    with pika_env.closes_channel(404, f"NOT_FOUND - no queue '{props.reply_to}' in vhost '/'"):
        responder.queue_declare(props.reply_to, passive=True)


@pytest.mark.parametrize("key", [REPLY_TO, REPLY_TO + ".made-up-token"])
def test_reply_to_a_made_up_name_is_unroutable(pika_env: Any, key: str) -> None:
    ch = pika_env.channel(confirm=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish("", key, b"m", mandatory=True)
    ch.basic_publish("", key, b"m")  # without mandatory: dropped, channel fine
    assert ch.is_open
