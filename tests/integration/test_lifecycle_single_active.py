"""Issue 3, item 6: single active consumer (`x-single-active-consumer`).

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- The first registered consumer gets every message; the others wait (declare-ok still
  counts every consumer).
- When the active consumer goes, the next one in registration order becomes active.
  Its unacked messages follow (in order, redelivered=true) when its channel or connection
  closes; after a mere basic.cancel they stay unacked on the old channel, as in AMQP.
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import time
from typing import Any

DEADLINE_S = 3.0

Got = list[tuple[bytes, bool]]


def consumer(env: Any, queue: str, got: Got, *, prefetch: int = 0) -> tuple[Any, Any, str]:
    """(connection, channel, tag) of a manual-ack consumer on its own connection."""
    conn = env.connect()
    ch = conn.channel()
    if prefetch:
        ch.basic_qos(prefetch_count=prefetch)
    tag = ch.basic_consume(
        queue, lambda _c, method, _p, body: got.append((body, method.redelivered))
    )
    return conn, ch, tag


def pump(conns: list[Any], until: Any, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for conn in conns:
            if conn.is_open:
                conn.process_data_events(0.02)
    for conn in conns:  # a little longer, to see anything unexpected arrive
        if conn.is_open:
            conn.process_data_events(0.05)


def sac_queue(env: Any, **args: Any) -> str:
    return str(env.queue("sac", arguments={"x-single-active-consumer": True, **args}))


def test_only_the_first_consumer_receives(pika_env: Any) -> None:
    queue = sac_queue(pika_env)
    first: Got = []
    second: Got = []
    c1, _ch1, _t1 = consumer(pika_env, queue, first)
    c2, _ch2, _t2 = consumer(pika_env, queue, second)
    pub = pika_env.channel(confirm=True)
    ok = pub.queue_declare(queue, passive=True).method
    assert (ok.message_count, ok.consumer_count) == (0, 2)
    for i in range(4):
        pub.basic_publish("", queue, f"m{i}".encode())
    pump([c1, c2], lambda: len(first) == 4)
    assert first == [(b"m0", False), (b"m1", False), (b"m2", False), (b"m3", False)]
    assert second == []


def test_cancel_activates_the_next_consumer_and_close_hands_over_unacked(
    pika_env: Any,
) -> None:
    queue = sac_queue(pika_env)
    first: Got = []
    second: Got = []
    c1, ch1, tag1 = consumer(pika_env, queue, first)
    c2, _ch2, _t2 = consumer(pika_env, queue, second)
    pub = pika_env.channel(confirm=True)
    for i in range(3):
        pub.basic_publish("", queue, f"m{i}".encode())
    pump([c1, c2], lambda: len(first) == 3)
    ch1.basic_cancel(tag1)
    # a cancelled consumer's unacked messages stay with its channel (AMQP): the next
    # consumer is active for new messages only
    pub.basic_publish("", queue, b"m3")
    pump([c1, c2], lambda: len(second) == 1)
    assert second == [(b"m3", False)]
    ch1.close()  # now they are requeued, and go to the active consumer
    pump([c1, c2], lambda: len(second) == 4)
    assert second == [(b"m3", False), (b"m0", True), (b"m1", True), (b"m2", True)]
    assert len(first) == 3


def test_acked_messages_are_not_handed_over(pika_env: Any) -> None:
    queue = sac_queue(pika_env)
    first: Got = []
    second: Got = []
    conn = pika_env.connect()
    ch1 = conn.channel()
    tags: list[int] = []

    def on_message(_c: Any, method: Any, _p: Any, body: bytes) -> None:
        first.append((body, method.redelivered))
        tags.append(method.delivery_tag)

    ch1.basic_consume(queue, on_message)
    c2, _ch2, _t2 = consumer(pika_env, queue, second)
    pub = pika_env.channel(confirm=True)
    for i in range(3):
        pub.basic_publish("", queue, f"m{i}".encode())
    pump([conn, c2], lambda: len(first) == 3)
    ch1.basic_ack(tags[0])
    ch1.close()
    pump([conn, c2], lambda: len(second) == 2)
    assert second == [(b"m1", True), (b"m2", True)]


def test_connection_loss_activates_the_next_consumer_in_registration_order(
    pika_env: Any,
) -> None:
    queue = sac_queue(pika_env)
    first: Got = []
    second: Got = []
    third: Got = []
    c1, _ch1, _t1 = consumer(pika_env, queue, first, prefetch=1)
    c2, _ch2, _t2 = consumer(pika_env, queue, second)
    c3, _ch3, _t3 = consumer(pika_env, queue, third)
    pub = pika_env.channel(confirm=True)
    for i in range(3):
        pub.basic_publish("", queue, f"m{i}".encode())
    pump([c1, c2, c3], lambda: len(first) == 1)
    assert first == [(b"m0", False)]  # prefetch 1: the others wait in the queue
    assert pub.queue_declare(queue, passive=True).method.message_count == 2
    c1.close()
    pump([c2, c3], lambda: len(second) == 3)
    assert second == [(b"m0", True), (b"m1", False), (b"m2", False)]
    assert third == []
    assert pub.queue_declare(queue, passive=True).method.consumer_count == 2


def test_basic_get_still_works_on_a_single_active_consumer_queue(pika_env: Any) -> None:
    queue = sac_queue(pika_env)
    pub = pika_env.channel(confirm=True)
    pub.basic_publish("", queue, b"m")
    method, _props, body = pub.basic_get(queue, auto_ack=True)
    assert (body, method.message_count) == (b"m", 0)


def test_single_active_consumer_false_is_an_ordinary_queue(pika_env: Any) -> None:
    queue = pika_env.queue(arguments={"x-single-active-consumer": False})
    first: Got = []
    second: Got = []
    c1, _ch1, _t1 = consumer(pika_env, queue, first)
    c2, _ch2, _t2 = consumer(pika_env, queue, second)
    pub = pika_env.channel(confirm=True)
    for i in range(4):
        pub.basic_publish("", queue, f"m{i}".encode())
    pump([c1, c2], lambda: len(first) + len(second) == 4)
    assert (len(first), len(second)) == (2, 2)
