"""Issue 3, item 9: `x-queue-type` — classic and quorum accepted, quorum's property rules,
unknown types refused; streams.

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL), except the stream
test: RabbitMQ 3.10 has streams, Warren refuses them with a 406 until it does (a deliberate
difference, so that test runs against Warren only). Rules:
- quorum needs durable=true and refuses exclusive and auto-delete, each with its own text.
- `classic` given explicitly is equivalent to no x-queue-type, both ways; quorum is not.
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import os
from typing import Any

import pika
import pytest


def prop_refused(queue: str, prop: str) -> str:
    return f"PRECONDITION_FAILED - invalid property '{prop}' for queue '{queue}' in vhost '/'"


def test_quorum_queue_declares_and_round_trips(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    name = pika_env.name("qq")
    ok = ch.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"}).method
    pika_env.queues.append(name)
    assert (ok.queue, ok.message_count, ok.consumer_count) == (name, 0, 0)
    ch.basic_publish("", name, b"1", pika.BasicProperties(delivery_mode=2))
    ch.basic_publish("", name, b"2")
    ok = ch.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"}).method
    assert ok.message_count == 2
    assert ch.queue_declare(name, passive=True).method.message_count == 2
    method, _props, body = ch.basic_get(name)
    assert body == b"1"
    ch.basic_ack(method.delivery_tag)
    method, _props, body = ch.basic_get(name, auto_ack=True)
    assert body == b"2"
    assert ch.basic_get(name)[0] is None


@pytest.mark.parametrize(
    ("kwargs", "prop"),
    [
        ({}, "non-durable"),
        ({"durable": True, "exclusive": True}, "exclusive-owner"),
        ({"durable": True, "auto_delete": True}, "auto-delete"),
    ],
)
def test_quorum_property_rules(pika_env: Any, kwargs: dict[str, Any], prop: str) -> None:
    name = pika_env.name("qq")
    with pika_env.closes_channel(406, prop_refused(name, prop)):
        pika_env.channel().queue_declare(name, arguments={"x-queue-type": "quorum"}, **kwargs)


def test_quorum_redeclared_without_type_is_inequivalent(pika_env: Any) -> None:
    name = pika_env.queue("qq", durable=True, arguments={"x-queue-type": "quorum"})
    text = (
        f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{name}' in vhost"
        " '/': received none but current is the value 'quorum' of type 'longstr'"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(name, durable=True)
    assert pika_env.channel().queue_declare(name, passive=True).method.queue == name


def test_classic_queue_redeclared_as_quorum_is_inequivalent(pika_env: Any) -> None:
    name = pika_env.queue("cq", durable=True)
    text = (
        f"PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{name}' in vhost"
        " '/': received the value 'quorum' of type 'longstr' but current is none"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})


def test_explicit_classic_is_equivalent_to_none_both_ways(pika_env: Any) -> None:
    plain = pika_env.queue("plain")
    explicit = pika_env.queue("explicit", arguments={"x-queue-type": "classic"})
    ch = pika_env.channel()
    assert ch.queue_declare(plain, arguments={"x-queue-type": "classic"}).method.queue == plain
    assert ch.queue_declare(explicit).method.queue == explicit


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("foo", "\"unsupported queue type 'foo'\""),
        (1, "{unacceptable_type,signedint}"),
    ],
)
def test_unknown_queue_type_is_refused(pika_env: Any, value: Any, reason: str) -> None:
    name = pika_env.name("q")
    text = (
        f"PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{name}' in vhost '/':"
        f" {reason}"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(name, durable=True, arguments={"x-queue-type": value})


def test_quorum_refuses_classic_only_arguments(pika_env: Any) -> None:
    name = pika_env.name("qq")
    text = (
        f"PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{name}' in vhost '/'"
        " of queue type rabbit_quorum_queue"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(
            name, durable=True, arguments={"x-queue-type": "quorum", "x-max-priority": 5}
        )


@pytest.mark.parametrize("overflow", ["drop-head", "reject-publish", "reject-publish-dlx"])
def test_quorum_accepts_overflow_modes(pika_env: Any, overflow: str) -> None:
    name = pika_env.queue(
        "qq",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": overflow},
    )
    assert pika_env.channel().queue_declare(name, passive=True).method.queue == name


def test_stream_is_refused_until_warren_has_streams(pika_env: Any) -> None:
    if os.environ.get("WARREN_TEST_BROKER_URL"):
        pytest.skip("RabbitMQ 3.10 has streams; Warren refuses them on purpose")
    name = pika_env.name("stream")
    ch = pika_env.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        ch.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
    assert info.value.reply_code == 406
    assert info.value.reply_text.startswith("PRECONDITION_FAILED - ")
    assert "stream" in info.value.reply_text
