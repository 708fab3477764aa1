"""Issue 3, item 3: length limits (`x-max-length`, `x-max-length-bytes`) and `x-overflow`
(drop-head, reject-publish, reject-publish-dlx).

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- Limits count ready messages only (unacked ones are out of the queue) and bytes of bodies.
- A message refused by reject-publish(-dlx) is nacked to a confirming publisher (pika raises
  NackError) and silently dropped for the others; queues it also reached keep it.
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import pika
import pytest

DEADLINE_S = 3.0


def count(ch: Any, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).method.message_count)


def bodies(ch: Any, queue: str) -> list[bytes]:
    out: list[bytes] = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append(body)


def get_within(ch: Any, queue: str, timeout: float = DEADLINE_S) -> tuple[Any, Any, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            return method, props, body
        assert time.monotonic() < deadline, f"nothing in {queue} after {timeout}s"
        time.sleep(0.02)


def without_time(headers: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for table in headers["x-death"]:
        table = dict(table)
        assert isinstance(table.pop("time"), datetime.datetime)
        out.append(table)
    return out


# --- drop-head (the default) ---------------------------------------------------------------


def test_max_length_drops_from_the_head(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 2})
    for i in range(1, 6):
        ch.basic_publish("", queue, f"m{i}".encode())  # every publish is acked
    assert count(ch, queue) == 2
    assert bodies(ch, queue) == [b"m4", b"m5"]


def test_explicit_drop_head_is_the_same(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 1, "x-overflow": "drop-head"})
    for body in (b"a", b"b", b"c"):
        ch.basic_publish("", queue, body)
    assert bodies(ch, queue) == [b"c"]


def test_max_length_zero_keeps_nothing(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 0})
    ch.basic_publish("", queue, b"a")
    assert count(ch, queue) == 0


def test_max_length_bytes_counts_body_bytes(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length-bytes": 10})
    for body in (b"aaaa", b"bbbb", b"cccc"):
        ch.basic_publish("", queue, body, pika.BasicProperties(headers={"pad": "x" * 50}))
    assert bodies(ch, queue) == [b"bbbb", b"cccc"]


def test_message_larger_than_max_length_bytes_empties_the_queue(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length-bytes": 10})
    ch.basic_publish("", queue, b"aaaa")
    ch.basic_publish("", queue, b"x" * 12)
    assert count(ch, queue) == 0


def test_both_limits_apply(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 3, "x-max-length-bytes": 5})
    for body in (b"1", b"2", b"3", b"4"):
        ch.basic_publish("", queue, body)
    assert bodies(ch, queue) == [b"2", b"3", b"4"]
    for body in (b"aa", b"bb", b"cc"):
        ch.basic_publish("", queue, body)
    assert bodies(ch, queue) == [b"bb", b"cc"]


def test_unacked_messages_do_not_count_but_a_requeue_can_overflow(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 1})
    ch.basic_publish("", queue, b"a")
    out, _props, _body = ch.basic_get(queue)
    ch.basic_publish("", queue, b"b")
    ch.basic_publish("", queue, b"c")
    assert count(ch, queue) == 1  # b dropped for c; a is out, not counted
    ch.basic_nack(out.delivery_tag, requeue=True)
    # a comes back to the head, the queue is over its limit, the head (a) goes
    time.sleep(0.1)
    assert bodies(ch, queue) == [b"c"]


# --- reject-publish ------------------------------------------------------------------------


def test_reject_publish_nacks_the_confirming_publisher(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.basic_publish("", queue, b"1")
    ch.basic_publish("", queue, b"2")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", queue, b"3")
    assert ch.is_open
    assert bodies(ch, queue) == [b"1", b"2"]
    ch.basic_publish("", queue, b"4")  # room again
    assert bodies(ch, queue) == [b"4"]


def test_reject_publish_with_max_length_zero_refuses_everything(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", queue, b"z")
    assert count(ch, queue) == 0


def test_reject_publish_by_bytes(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length-bytes": 6, "x-overflow": "reject-publish"})
    ch.basic_publish("", queue, b"abc")
    ch.basic_publish("", queue, b"def")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", queue, b"g")
    assert bodies(ch, queue) == [b"abc", b"def"]


def test_reject_publish_drops_silently_without_confirms(pika_env: Any) -> None:
    ch = pika_env.channel()
    queue = pika_env.queue(arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.basic_publish("", queue, b"1")
    ch.basic_publish("", queue, b"2")
    assert count(ch, queue) == 1
    assert ch.is_open
    assert bodies(ch, queue) == [b"1"]


def test_one_full_queue_nacks_a_publish_the_others_still_take(pika_env: Any) -> None:
    fan = pika_env.exchange("fanout")
    full = pika_env.queue("full", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    free = pika_env.queue("free")
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(full, fan)
    ch.queue_bind(free, fan)
    ch.basic_publish(fan, "", b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish(fan, "", b"2")
    assert (count(ch, full), count(ch, free)) == (1, 2)
    assert bodies(ch, free) == [b"1", b"2"]


def test_reject_publish_does_not_dead_letter(pika_env: Any) -> None:
    target = pika_env.queue("target")
    queue = pika_env.queue(
        arguments={
            "x-max-length": 1,
            "x-overflow": "reject-publish",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        }
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", queue, b"2")
    time.sleep(0.1)
    assert count(ch, target) == 0


def test_reject_publish_dlx_nacks_and_dead_letters(pika_env: Any) -> None:
    target = pika_env.queue("target")
    queue = pika_env.queue(
        arguments={
            "x-max-length": 1,
            "x-overflow": "reject-publish-dlx",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        }
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"1")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", queue, b"2")
    method, props, body = get_within(ch, target)
    assert (method.exchange, method.routing_key, body) == ("", target, b"2")
    assert without_time(props.headers) == [
        {
            "count": 1,
            "reason": "maxlen",
            "queue": queue,
            "exchange": "",
            "routing-keys": [queue],
        }
    ]
    assert props.headers["x-first-death-reason"] == "maxlen"
    assert bodies(ch, queue) == [b"1"]


def test_drop_head_dead_letters_the_dropped_head(pika_env: Any) -> None:
    target = pika_env.queue("target")
    queue = pika_env.queue(
        arguments={
            "x-max-length-bytes": 4,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        }
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", queue, b"old!")
    ch.basic_publish("", queue, b"new!")
    _method, props, body = get_within(ch, target)
    assert body == b"old!"
    assert [(t["reason"], t["queue"]) for t in without_time(props.headers)] == [("maxlen", queue)]
    assert bodies(ch, queue) == [b"new!"]
