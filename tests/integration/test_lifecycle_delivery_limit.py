"""Issue 3, item 8: poison messages — `x-delivery-limit` and the `x-delivery-count` header.

RabbitMQ 3.10 applies x-delivery-limit to quorum queues only (a classic queue refuses the
argument), so these tests declare durable quorum queues. Every expectation was read from
RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- A quorum queue stamps `x-delivery-count` (a long) on every basic.get, 0 on the first
  (3.10 does this even without a limit); each return (nack/reject with requeue, channel
  close) adds one. A consumer's first delivery is not stamped (3.10's quirk), its
  deliveries after a return are.
- With limit N, the message is delivered N+1 times; the return after that drops it, or
  dead-letters it with reason `delivery_limit` (the dead copy has no x-delivery-count).
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import pika
from pika.compat import long

DEADLINE_S = 3.0


def quorum(env: Any, **args: Any) -> str:
    return str(env.queue("qq", durable=True, arguments={"x-queue-type": "quorum", **args}))


def take(ch: Any, queue: str, timeout: float = DEADLINE_S) -> tuple[Any, Any, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue)
        if method is not None:
            return method, props, body
        assert time.monotonic() < deadline, f"nothing in {queue} after {timeout}s"
        time.sleep(0.02)


def stays_empty(ch: Any, queue: str, for_s: float = 0.3) -> bool:
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        if ch.basic_get(queue)[0] is not None:
            return False
        time.sleep(0.05)
    return True


def delivery_count(props: Any) -> int:
    value = props.headers["x-delivery-count"]
    assert type(value) is long, type(value)
    return int(value)


def test_delivery_count_header_counts_returns_and_limit_drops(pika_env: Any) -> None:
    queue = quorum(pika_env, **{"x-delivery-limit": 2})
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"poison", pika.BasicProperties(headers={"h": "v"}))
    seen = []
    for _ in range(3):
        method, props, body = take(ch, queue)
        seen.append((body, method.redelivered, delivery_count(props), props.headers["h"]))
        ch.basic_nack(method.delivery_tag, requeue=True)
    assert seen == [
        (b"poison", False, 0, "v"),
        (b"poison", True, 1, "v"),
        (b"poison", True, 2, "v"),
    ]
    assert stays_empty(ch, queue)


def test_delivery_limit_dead_letters_with_reason_delivery_limit(pika_env: Any) -> None:
    target = pika_env.queue("target")
    queue = quorum(
        pika_env,
        **{
            "x-delivery-limit": 1,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        },
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"poison", pika.BasicProperties(headers={"h": "v"}))
    for _ in range(2):
        method, _props, _body = take(ch, queue)
        ch.basic_reject(method.delivery_tag, requeue=True)
    method, props, body = take(ch, target)
    assert (method.exchange, method.routing_key, body) == ("", target, b"poison")
    headers = dict(props.headers)
    [table] = headers.pop("x-death")
    when = table.pop("time")
    assert isinstance(when, datetime.datetime)
    assert table == {
        "count": 1,
        "reason": "delivery_limit",
        "queue": queue,
        "exchange": "",
        "routing-keys": [queue],
    }
    assert headers == {
        "h": "v",
        "x-first-death-exchange": "",
        "x-first-death-queue": queue,
        "x-first-death-reason": "delivery_limit",
    }
    assert stays_empty(ch, queue)


def test_channel_close_counts_as_a_delivery(pika_env: Any) -> None:
    queue = quorum(pika_env, **{"x-delivery-limit": 1})
    pika_env.channel(confirm=True).basic_publish("", queue, b"m")
    counts = []
    for _ in range(2):
        ch = pika_env.channel()
        method, props, _body = take(ch, queue)
        counts.append((method.redelivered, delivery_count(props)))
        ch.close()
    assert counts == [(False, 0), (True, 1)]
    assert stays_empty(pika_env.channel(), queue)


def test_delivery_limit_zero_allows_one_delivery(pika_env: Any) -> None:
    queue = quorum(pika_env, **{"x-delivery-limit": 0})
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"once")
    method, props, body = take(ch, queue)
    assert (body, delivery_count(props)) == (b"once", 0)
    ch.basic_reject(method.delivery_tag, requeue=True)
    assert stays_empty(ch, queue)


def test_without_a_limit_quorum_redelivers_forever_and_counts(pika_env: Any) -> None:
    queue = quorum(pika_env)
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"m")
    counts = []
    for _ in range(4):
        method, props, _body = take(ch, queue)
        counts.append(delivery_count(props))
        ch.basic_nack(method.delivery_tag, requeue=True)
    assert counts == [0, 1, 2, 3]


def test_consume_stamps_only_deliveries_after_a_return(pika_env: Any) -> None:
    queue = quorum(pika_env)
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"m", pika.BasicProperties(headers={"h": "v"}))
    seen = []
    for method, props, body in ch.consume(queue, inactivity_timeout=DEADLINE_S):
        assert method is not None, f"no delivery from {queue} in {DEADLINE_S}s"
        count = props.headers.get("x-delivery-count")
        seen.append((body, method.redelivered, None if count is None else int(count)))
        if len(seen) == 3:
            ch.basic_ack(method.delivery_tag)
            break
        ch.basic_nack(method.delivery_tag, requeue=True)
    ch.cancel()
    assert seen == [(b"m", False, None), (b"m", True, 1), (b"m", True, 2)]
    assert type(props.headers["x-delivery-count"]) is long
    assert props.headers["h"] == "v"


def test_reject_without_requeue_is_not_a_delivery_limit_death(pika_env: Any) -> None:
    target = pika_env.queue("target")
    queue = quorum(
        pika_env,
        **{
            "x-delivery-limit": 5,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        },
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"m")
    method, _props, _body = take(ch, queue)
    ch.basic_reject(method.delivery_tag, requeue=False)
    _method, props, _body = take(ch, target)
    assert props.headers["x-first-death-reason"] == "rejected"


def test_delivery_limit_on_a_classic_queue(pika_env: Any) -> None:
    """RabbitMQ 3.10 takes x-delivery-limit on quorum queues only (406 on a classic one);
    Warren keeps poison-message protection on every durable queue type (issue 3, item 8),
    a superset: code written for RabbitMQ never sends it to a classic queue."""
    name = pika_env.name("classic")
    if os.environ.get("WARREN_TEST_BROKER_URL"):
        text = (
            f"PRECONDITION_FAILED - invalid arg 'x-delivery-limit' for queue '{name}' in vhost"
            " '/' of queue type rabbit_classic_queue"
        )
        with pika_env.closes_channel(406, text):
            pika_env.channel().queue_declare(name, arguments={"x-delivery-limit": 2})
        return
    ch = pika_env.channel()
    ch.queue_declare(name, arguments={"x-delivery-limit": 0})
    ch.basic_publish("", name, b"poison")
    method, _props, body = ch.basic_get(name)
    assert body == b"poison"
    ch.basic_nack(method.delivery_tag, requeue=True)  # past the limit: dropped (no DLX)
    deadline = time.monotonic() + 2
    while ch.queue_declare(name, passive=True).method.message_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ch.queue_declare(name, passive=True).method.message_count == 0
