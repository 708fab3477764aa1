"""Issue 3, item 5: priority queues (`x-max-priority`) and consumer priorities (`x-priority`).

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- Higher message priority first, FIFO within a priority; no priority counts as 0; a
  priority above the queue's maximum counts as the maximum but is delivered as sent.
- A queue without x-max-priority ignores message priorities (plain FIFO).
- Consumers of higher x-priority get messages while they have prefetch room; lower ones
  only when every higher one is full.
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import time
from typing import Any

import pika

DEADLINE_S = 3.0


def prio(p: int | None) -> pika.BasicProperties:
    return pika.BasicProperties(priority=p)


def drain(ch: Any, queue: str) -> list[tuple[bytes, int | None]]:
    out: list[tuple[bytes, int | None]] = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((body, props.priority))


def publish_all(ch: Any, queue: str, items: list[tuple[bytes, int | None]]) -> None:
    for body, p in items:
        ch.basic_publish("", queue, body, prio(p))


def test_higher_priority_first_fifo_within_a_priority(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-priority": 10})
    publish_all(
        ch,
        queue,
        [(b"p1", 1), (b"p5a", 5), (b"none", None), (b"p3", 3), (b"p10", 10), (b"p5b", 5)],
    )
    assert ch.queue_declare(queue, passive=True).method.message_count == 6
    assert drain(ch, queue) == [
        (b"p10", 10),
        (b"p5a", 5),
        (b"p5b", 5),
        (b"p3", 3),
        (b"p1", 1),
        (b"none", None),
    ]


def test_priority_zero_and_none_are_equal(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-priority": 3})
    publish_all(ch, queue, [(b"a", None), (b"b", 0), (b"c", None), (b"d", 1)])
    assert [b for b, _ in drain(ch, queue)] == [b"d", b"a", b"b", b"c"]


def test_priority_above_the_maximum_counts_as_the_maximum(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-priority": 5})
    publish_all(ch, queue, [(b"p4", 4), (b"p9", 9), (b"p5", 5), (b"p200", 200), (b"p7", 7)])
    assert drain(ch, queue) == [
        (b"p9", 9),
        (b"p5", 5),
        (b"p200", 200),
        (b"p7", 7),
        (b"p4", 4),
    ]


def test_max_priority_255(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-priority": 255})
    publish_all(ch, queue, [(b"a", 254), (b"b", 255), (b"c", 0)])
    assert [b for b, _ in drain(ch, queue)] == [b"b", b"a", b"c"]


def test_queue_without_max_priority_is_fifo(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    publish_all(ch, queue, [(b"a", 1), (b"b", 9), (b"c", 5)])
    assert drain(ch, queue) == [(b"a", 1), (b"b", 9), (b"c", 5)]


def test_consumer_receives_backlog_in_priority_order(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-priority": 9})
    publish_all(ch, queue, [(b"low", 1), (b"high", 9), (b"mid", 4)])
    consumer = pika_env.connect()
    got: list[bytes] = []
    consumer.channel().basic_consume(
        queue, lambda _c, _m, _p, body: got.append(body), auto_ack=True
    )
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < 3 and time.monotonic() < deadline:
        consumer.process_data_events(0.05)
    assert got == [b"high", b"mid", b"low"]


def test_requeued_message_returns_to_its_priority(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-priority": 5})
    publish_all(ch, queue, [(b"low", 1), (b"high", 5), (b"high2", 5)])
    method, _props, body = ch.basic_get(queue)
    assert body == b"high"
    ch.basic_publish("", queue, b"mid", prio(3))
    ch.basic_nack(method.delivery_tag, requeue=True)
    time.sleep(0.05)
    assert [b for b, _ in drain(ch, queue)] == [b"high", b"high2", b"mid", b"low"]


# --- consumer priorities -------------------------------------------------------------------


def test_higher_priority_consumer_gets_messages_until_its_prefetch_is_full(
    pika_env: Any,
) -> None:
    queue = pika_env.queue()
    got: dict[str, list[bytes]] = {"high": [], "low": []}
    conns = []
    for name, priority, prefetch in (("low", 1, 10), ("high", 10, 2)):
        conn = pika_env.connect()
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        ch.basic_consume(
            queue,
            lambda _c, _m, _p, body, name=name: got[name].append(body),
            arguments={"x-priority": priority},
        )
        conns.append(conn)
    pub = pika_env.channel(confirm=True)
    for i in range(5):
        pub.basic_publish("", queue, f"m{i}".encode())
    deadline = time.monotonic() + DEADLINE_S
    while len(got["high"]) + len(got["low"]) < 5 and time.monotonic() < deadline:
        for conn in conns:
            conn.process_data_events(0.02)
    assert got == {"high": [b"m0", b"m1"], "low": [b"m2", b"m3", b"m4"]}


def test_negative_consumer_priority_is_below_the_default(pika_env: Any) -> None:
    queue = pika_env.queue()
    got: dict[str, list[bytes]] = {"default": [], "negative": []}
    conns = []
    for name, args in (("negative", {"x-priority": -5}), ("default", {})):
        conn = pika_env.connect()
        ch = conn.channel()
        ch.basic_qos(prefetch_count=100)
        ch.basic_consume(
            queue,
            lambda _c, _m, _p, body, name=name: got[name].append(body),
            arguments=args,
        )
        conns.append(conn)
    pub = pika_env.channel(confirm=True)
    for i in range(3):
        pub.basic_publish("", queue, f"m{i}".encode())
    deadline = time.monotonic() + DEADLINE_S
    while len(got["default"]) + len(got["negative"]) < 3 and time.monotonic() < deadline:
        for conn in conns:
            conn.process_data_events(0.02)
    assert got == {"default": [b"m0", b"m1", b"m2"], "negative": []}


def test_invalid_consumer_priority_closes_the_channel(pika_env: Any) -> None:
    queue = pika_env.queue()
    ch = pika_env.channel()
    text = (
        f"PRECONDITION_FAILED - invalid arg 'x-priority' for queue '{queue}' in vhost '/':"
        ' "expected integer, got longstr"'
    )
    with pika_env.closes_channel(406, text):
        ch.basic_consume(queue, lambda *_: None, arguments={"x-priority": "high"})
