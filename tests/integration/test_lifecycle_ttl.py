"""Issue 3, item 1: message TTL (`x-message-ttl`, `expiration`) and idle queue expiry
(`x-expires`), as a pika client sees them.

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- TTLs are short (50-300 ms); the tests poll with deadlines instead of sleeping long.
- A classic queue only expires the message at its head: an expired message behind a live
  one is still counted by declare-ok until it reaches the head (RabbitMQ 3.10 does this).
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pytest

DEADLINE_S = 3.0


def count(ch: Any, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).method.message_count)


def wait_count(ch: Any, queue: str, expected: int, timeout: float = DEADLINE_S) -> None:
    """Poll declare-ok until the queue holds `expected` ready messages."""
    deadline = time.monotonic() + timeout
    while (actual := count(ch, queue)) != expected:
        assert time.monotonic() < deadline, f"{queue} holds {actual}, expected {expected}"
        time.sleep(0.02)


def drain(ch: Any, queue: str) -> list[tuple[bytes, Any]]:
    """(body, properties) of every message basic.get returns until get-empty."""
    out: list[tuple[bytes, Any]] = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((body, props))


def exp(ms: str) -> pika.BasicProperties:
    return pika.BasicProperties(expiration=ms)


def not_found(queue: str) -> str:
    return f"NOT_FOUND - no queue '{queue}' in vhost '/'"


def exists(env: Any, queue: str) -> bool:
    """A passive declare on a fresh channel (it also counts as use of the queue)."""
    try:
        env.channel().queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        error = (exc.reply_code, exc.reply_text)
    else:
        return True
    assert error == (404, not_found(queue))
    return False


# --- x-message-ttl and expiration ----------------------------------------------------------


def test_queue_ttl_expires_every_ready_message(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 100})
    for body in (b"a", b"b", b"c"):
        ch.basic_publish("", queue, body)
    wait_count(ch, queue, 0)
    assert drain(ch, queue) == []


def test_queue_ttl_leaves_messages_younger_than_it(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 60_000})
    ch.basic_publish("", queue, b"young")
    assert [body for body, _ in drain(ch, queue)] == [b"young"]


def test_per_message_expiration_expires_only_that_message(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"short", exp("50"))
    ch.basic_publish("", queue, b"keep")
    wait_count(ch, queue, 1)
    [(body, props)] = drain(ch, queue)
    assert (body, props.expiration) == (b"keep", None)


def test_expiration_property_is_delivered_as_sent(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 30_000})
    ch.basic_publish("", queue, b"m", exp("60000"))
    [(body, props)] = drain(ch, queue)
    # the queue's shorter TTL applies, but the property is delivered untouched
    assert (body, props.expiration) == (b"m", "60000")


def test_message_expiration_shorter_than_queue_ttl_wins(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 60_000})
    ch.basic_publish("", queue, b"short", exp("50"))
    ch.basic_publish("", queue, b"long")
    wait_count(ch, queue, 1)
    assert [body for body, _ in drain(ch, queue)] == [b"long"]


def test_queue_ttl_shorter_than_message_expiration_wins(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 50})
    ch.basic_publish("", queue, b"m", exp("60000"))
    wait_count(ch, queue, 0)
    assert drain(ch, queue) == []


def test_expired_message_behind_the_head_is_dropped_when_it_reaches_the_head(
    pika_env: Any,
) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"a")
    ch.basic_publish("", queue, b"b", exp("50"))
    ch.basic_publish("", queue, b"c")
    time.sleep(0.2)
    # b has expired, but sits behind a: a classic queue still counts it
    assert count(ch, queue) == 3
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    # taking a uncovers b, which is dropped at once: get-ok already counts it out
    assert (body, method.message_count) == (b"a", 1)
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert (body, method.message_count) == (b"c", 0)
    assert drain(ch, queue) == []


def test_consumer_never_receives_an_expired_message_behind_the_head(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"a")
    ch.basic_publish("", queue, b"b", exp("50"))
    ch.basic_publish("", queue, b"c")
    time.sleep(0.2)
    got: list[bytes] = []
    consumer = pika_env.connect()
    consumer.channel().basic_consume(
        queue, lambda _c, _m, _p, body: got.append(body), auto_ack=True
    )
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < 2 and time.monotonic() < deadline:
        consumer.process_data_events(0.05)
    consumer.process_data_events(0.1)
    assert got == [b"a", b"c"]


def test_expiration_zero_is_dropped_without_a_consumer(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"now-or-never", exp("0"))
    ch.basic_publish("", queue, b"kept")
    wait_count(ch, queue, 1)
    assert [body for body, _ in drain(ch, queue)] == [b"kept"]


def test_expiration_zero_reaches_a_waiting_consumer(pika_env: Any) -> None:
    queue = pika_env.queue()
    consumer = pika_env.connect()
    got: list[tuple[bytes, str | None]] = []
    consumer.channel().basic_consume(
        queue, lambda _c, _m, props, body: got.append((body, props.expiration)), auto_ack=True
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"now-or-never", exp("0"))
    deadline = time.monotonic() + DEADLINE_S
    while not got and time.monotonic() < deadline:
        consumer.process_data_events(0.05)
    assert got == [(b"now-or-never", "0")]


def test_queue_ttl_zero_reaches_a_waiting_consumer_and_is_dropped_otherwise(
    pika_env: Any,
) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 0})
    ch.basic_publish("", queue, b"dropped")
    assert count(ch, queue) == 0
    consumer = pika_env.connect()
    got: list[bytes] = []
    consumer.channel().basic_consume(
        queue, lambda _c, _m, _p, body: got.append(body), auto_ack=True
    )
    ch.basic_publish("", queue, b"delivered")
    deadline = time.monotonic() + DEADLINE_S
    while not got and time.monotonic() < deadline:
        consumer.process_data_events(0.05)
    assert got == [b"delivered"]


def test_requeued_message_keeps_its_original_expiry(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"m", exp("150"))
    method, _props, body = ch.basic_get(queue, auto_ack=False)
    assert body == b"m"
    time.sleep(0.3)  # past its TTL while unacked: not expired while out
    ch.basic_nack(method.delivery_tag, requeue=True)
    wait_count(ch, queue, 0)
    assert drain(ch, queue) == []


def test_unacked_message_is_not_expired_while_out(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-message-ttl": 100})
    ch.basic_publish("", queue, b"m")
    method, _props, _body = ch.basic_get(queue, auto_ack=False)
    time.sleep(0.25)
    ch.basic_ack(method.delivery_tag)  # acking an expired-while-out message is fine
    ch.basic_publish("", queue, b"n")
    assert [body for body, _ in drain(ch, queue)] == [b"n"]


@pytest.mark.parametrize(
    ("expiration", "text"),
    [
        ("abc", "PRECONDITION_FAILED - invalid expiration 'abc': no_integer"),
        ("", "PRECONDITION_FAILED - invalid expiration '': no_integer"),
        (" 100", "PRECONDITION_FAILED - invalid expiration ' 100': no_integer"),
        ("-1", "PRECONDITION_FAILED - invalid expiration '-1': {value_negative,-1}"),
        ("1.5", "PRECONDITION_FAILED - invalid expiration '1.5': {leftover_string,\".5\"}"),
        ("100 ", "PRECONDITION_FAILED - invalid expiration '100 ': {leftover_string,\" \"}"),
    ],
)
def test_invalid_expiration_closes_the_channel(pika_env: Any, expiration: str, text: str) -> None:
    queue = pika_env.queue()
    ch = pika_env.channel()
    with pika_env.closes_channel(406, text):
        ch.basic_publish("", queue, b"m", exp(expiration))
        ch.queue_declare(queue, passive=True)  # a round trip to see the close
    assert count(pika_env.channel(), queue) == 0


# --- x-expires -----------------------------------------------------------------------------


def test_unused_queue_is_deleted_after_x_expires(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-expires": 200})
    ch.basic_publish("", queue, b"messages do not keep it alive")
    time.sleep(0.5)
    assert not exists(pika_env, queue)


def test_passive_declares_keep_a_queue_alive(pika_env: Any) -> None:
    queue = pika_env.queue(arguments={"x-expires": 300})
    ch = pika_env.channel()
    for _ in range(8):  # 0.8 s of use, well past the 300 ms expiry
        time.sleep(0.1)
        ch.queue_declare(queue, passive=True)
    time.sleep(0.6)
    assert not exists(pika_env, queue)


def test_basic_get_keeps_a_queue_alive(pika_env: Any) -> None:
    queue = pika_env.queue(arguments={"x-expires": 300})
    ch = pika_env.channel()
    for _ in range(8):
        time.sleep(0.1)
        assert ch.basic_get(queue)[0] is None
    time.sleep(0.6)
    assert not exists(pika_env, queue)


def test_a_consumer_keeps_a_queue_alive_until_it_is_cancelled(pika_env: Any) -> None:
    queue = pika_env.queue(arguments={"x-expires": 200})
    ch = pika_env.channel()
    tag = ch.basic_consume(queue, lambda *_: None)
    time.sleep(0.6)
    ch.basic_cancel(tag)
    assert exists(pika_env, queue)  # also restarts the idle clock
    time.sleep(0.5)
    assert not exists(pika_env, queue)


def test_expired_queue_is_gone_from_bindings_too(pika_env: Any) -> None:
    exchange = pika_env.exchange("direct")
    queue = pika_env.queue(arguments={"x-expires": 100})
    ch = pika_env.channel()
    ch.queue_bind(queue, exchange, "k")
    time.sleep(0.4)
    assert not exists(pika_env, queue)
    # recreated under the same name, it has no binding left
    pika_env.channel().queue_declare(queue)
    pub = pika_env.channel(confirm=True)
    pub.basic_publish(exchange, "k", b"m")
    assert count(pub, queue) == 0
