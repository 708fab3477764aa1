"""Queues as RabbitMQ shows them to a pika client: declare (passive, durable, exclusive,
auto-delete, server-named, argument equivalence), declare-ok counts, bind/unbind, purge, delete.

Every expected reply code and text here was read from RabbitMQ 3.10. Names are unique per
test (`pika_env`), so the tests can share one broker.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pytest

VHOST = "'/'"


def locked(queue: str) -> str:
    return (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost"
        f" {VHOST}. It could be originally declared on another connection or the exclusive"
        " property value does not match that of the original declaration."
    )


def not_found(queue: str) -> str:
    return f"NOT_FOUND - no queue '{queue}' in vhost {VHOST}"


def wait_until_gone(env: Any, queue: str, timeout: float = 5.0) -> None:
    """Poll with passive declares until the queue is gone (deletion may be asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            env.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            error = (exc.reply_code, exc.reply_text)
            break
        assert time.monotonic() < deadline, f"queue {queue} still exists"
        time.sleep(0.05)
    assert error == (404, not_found(queue))


# --- declare ------------------------------------------------------------------------------------


def test_passive_declare_of_missing_queue_is_404(pika_env: Any) -> None:
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, not_found(name)):
        pika_env.channel().queue_declare(name, passive=True)


def test_declare_ok_reports_name_message_count_and_consumer_count(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ok = ch.queue_declare(queue).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (queue, 0, 0)
    for i in range(3):
        ch.basic_publish("", queue, f"m{i}".encode())
    consumer_ch = pika_env.channel()
    consumer_ch.basic_qos(prefetch_count=1)
    consumer_ch.basic_consume(queue, lambda *_: None)
    other = pika_env.connect().channel()
    other.basic_qos(prefetch_count=1)
    other.basic_consume(queue, lambda *_: None)
    # two messages are out with consumers (unacked): the count is of ready messages only
    deadline = time.monotonic() + 5
    while True:
        ok = ch.queue_declare(queue, passive=True).method
        if ok.message_count == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert (ok.queue, ok.message_count, ok.consumer_count) == (queue, 1, 2)


def test_server_named_queue(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    first = ch.queue_declare("", exclusive=True).method
    second = ch.queue_declare("", exclusive=True).method
    assert first.queue.startswith("amq.gen-")
    assert second.queue.startswith("amq.gen-")
    assert first.queue != second.queue
    assert len(first.queue) > len("amq.gen-")
    assert (first.message_count, first.consumer_count) == (0, 0)
    ch.basic_publish("", first.queue, b"by name")
    assert pika_env.drain(ch, first.queue) == [b"by name"]


def test_amq_prefix_is_reserved_for_queues(pika_env: Any) -> None:
    name = pika_env.name("amq.mine")
    with pika_env.closes_channel(
        403, f"ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"
    ):
        pika_env.channel().queue_declare(name)


def test_durable_queue_redeclare_must_match(pika_env: Any) -> None:
    queue = pika_env.queue(durable=True)
    pika_env.channel().queue_declare(queue, durable=True)
    pika_env.channel().queue_declare(queue, passive=True)
    with pika_env.closes_channel(
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{queue}' in vhost {VHOST}:"
        " received 'false' but current is 'true'",
    ):
        pika_env.channel().queue_declare(queue, durable=False)


def test_auto_delete_flag_redeclare_must_match(pika_env: Any) -> None:
    queue = pika_env.queue()
    with pika_env.closes_channel(
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue '{queue}' in vhost"
        f" {VHOST}: received 'true' but current is 'false'",
    ):
        pika_env.channel().queue_declare(queue, auto_delete=True)


def test_exclusive_redeclare_of_a_shared_queue_is_405(pika_env: Any) -> None:
    queue = pika_env.queue()
    with pika_env.closes_channel(405, locked(queue)):
        pika_env.channel().queue_declare(queue, exclusive=True)


def test_argument_equivalence(pika_env: Any) -> None:
    queue = pika_env.queue(arguments={"x-message-ttl": 1000})
    prefix = f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{queue}'"
    # the same arguments, and unknown x- arguments, are fine
    pika_env.channel().queue_declare(queue, arguments={"x-message-ttl": 1000})
    pika_env.channel().queue_declare(queue, arguments={"x-message-ttl": 1000, "x-unknown": 1})
    with pika_env.closes_channel(
        406, f"{prefix} in vhost {VHOST}: received '2000' but current is '1000'"
    ):
        pika_env.channel().queue_declare(queue, arguments={"x-message-ttl": 2000})
    with pika_env.closes_channel(
        406,
        f"{prefix} in vhost {VHOST}: received none but current is the value '1000' of type"
        " 'signedint'",
    ):
        pika_env.channel().queue_declare(queue)
    with pika_env.closes_channel(
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{queue}' in vhost"
        f" {VHOST}: received the value '5' of type 'signedint' but current is none",
    ):
        pika_env.channel().queue_declare(
            queue, arguments={"x-message-ttl": 1000, "x-max-length": 5}
        )
    # passive declare compares nothing
    pika_env.channel().queue_declare(queue, passive=True, arguments={"x-message-ttl": 7})


# --- exclusive and auto-delete ------------------------------------------------------------------


def test_exclusive_queue_is_locked_to_its_connection(pika_env: Any) -> None:
    owner = pika_env.connect().channel()
    queue = pika_env.name("excl")
    owner.queue_declare(queue, exclusive=True)
    owner.queue_declare(queue, exclusive=True)  # the owner may redeclare it
    owner.queue_declare(queue, passive=True)

    attempts = {
        "declare exclusive": lambda ch: ch.queue_declare(queue, exclusive=True),
        "declare shared": lambda ch: ch.queue_declare(queue),
        "declare passive": lambda ch: ch.queue_declare(queue, passive=True),
        "consume": lambda ch: ch.basic_consume(queue, lambda *_: None),
        "get": lambda ch: ch.basic_get(queue),
        "purge": lambda ch: ch.queue_purge(queue),
        "delete": lambda ch: ch.queue_delete(queue),
        "bind": lambda ch: ch.queue_bind(queue, "amq.direct", "k"),
    }
    other = pika_env.connect()
    for label, attempt in attempts.items():
        ch = other.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            attempt(ch)
        assert (info.value.reply_code, info.value.reply_text) == (405, locked(queue)), label

    # Publishing to it from elsewhere is allowed.
    publisher = other.channel()
    publisher.confirm_delivery()
    publisher.basic_publish("", queue, b"from another connection")
    assert owner.queue_declare(queue, passive=True).method.message_count == 1
    assert pika_env.drain(owner, queue) == [b"from another connection"]


def test_exclusive_queue_goes_when_its_connection_closes(pika_env: Any) -> None:
    conn = pika_env.connect()
    queue = conn.channel().queue_declare("", exclusive=True).method.queue
    conn.channel().queue_declare(queue, passive=True)
    conn.close()
    wait_until_gone(pika_env, queue)
    # a server-generated name cannot be declared by a client, even once it is free
    with pika_env.closes_channel(
        403, f"ACCESS_REFUSED - queue name '{queue}' contains reserved prefix 'amq.*'"
    ):
        pika_env.channel().queue_declare(queue, exclusive=True)


def test_named_exclusive_queue_name_is_free_again_after_its_connection_closes(
    pika_env: Any,
) -> None:
    conn = pika_env.connect()
    queue = pika_env.name("excl")
    conn.channel().queue_declare(queue, exclusive=True)
    with pika_env.closes_channel(405, locked(queue)):
        pika_env.channel().queue_declare(queue, exclusive=True)
    conn.close()
    wait_until_gone(pika_env, queue)
    fresh = pika_env.connect().channel()
    assert fresh.queue_declare(queue, exclusive=True).method.queue == queue


def test_exclusive_queue_survives_its_channel_closing(pika_env: Any) -> None:
    conn = pika_env.connect()
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.close()
    conn.channel().queue_declare(queue, passive=True)


def test_auto_delete_queue_goes_when_its_last_consumer_cancels(pika_env: Any) -> None:
    ch = pika_env.channel()
    queue = pika_env.queue(auto_delete=True)
    # Never consumed from: it stays.
    ch.queue_declare(queue, passive=True)
    first = ch.basic_consume(queue, lambda *_: None)
    second = ch.basic_consume(queue, lambda *_: None)
    ch.basic_cancel(first)
    assert pika_env.channel().queue_declare(queue, passive=True).method.consumer_count == 1
    ch.basic_cancel(second)
    wait_until_gone(pika_env, queue)


def test_auto_delete_queue_goes_when_its_consumers_connection_closes(pika_env: Any) -> None:
    queue = pika_env.queue(auto_delete=True)
    conn = pika_env.connect()
    conn.channel().basic_consume(queue, lambda *_: None)
    conn.close()
    wait_until_gone(pika_env, queue)


# --- bind / unbind ------------------------------------------------------------------------------


def test_bind_and_unbind(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("direct")
    queue = pika_env.queue()
    ch.queue_bind(queue, x, "k1")
    ch.queue_bind(queue, x, "k1")  # the same binding twice is one binding
    ch.queue_bind(queue, x, "k2")
    ch.basic_publish(x, "k1", b"1")
    ch.basic_publish(x, "k2", b"2")
    ch.basic_publish(x, "k3", b"3")
    assert pika_env.drain(ch, queue) == [b"1", b"2"]
    ch.queue_unbind(queue, x, "k1")
    ch.basic_publish(x, "k1", b"4")
    ch.basic_publish(x, "k2", b"5")
    assert pika_env.drain(ch, queue) == [b"5"]
    ch.queue_unbind(queue, x, "never-bound")  # unbinding a missing binding is unbind-ok


def test_bind_with_missing_queue_or_exchange_is_404(pika_env: Any) -> None:
    queue = pika_env.queue()
    x = pika_env.exchange("direct")
    missing_q = pika_env.name("missing")
    missing_x = pika_env.name("missing")
    with pika_env.closes_channel(404, not_found(missing_q)):
        pika_env.channel().queue_bind(missing_q, x, "k")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{missing_x}' in vhost {VHOST}"):
        pika_env.channel().queue_bind(queue, missing_x, "k")


def test_bindings_go_with_the_queue(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("fanout")
    queue = pika_env.queue()
    ch.queue_bind(queue, x, "")
    ch.queue_delete(queue)
    ch.queue_declare(queue)  # same name, new queue: no bindings
    ch.basic_publish(x, "", b"nobody")
    assert pika_env.drain(ch, queue) == []


# --- purge / delete -----------------------------------------------------------------------------


def test_purge_returns_the_count_of_ready_messages(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    for i in range(5):
        ch.basic_publish("", queue, f"m{i}".encode())
    method, _props, body = ch.basic_get(queue)  # one unacked: not purged
    assert body == b"m0"
    assert ch.queue_purge(queue).method.message_count == 4
    assert ch.queue_purge(queue).method.message_count == 0
    ch.basic_reject(method.delivery_tag, requeue=True)
    assert pika_env.drain(ch, queue) == [b"m0"]


def test_purge_of_missing_queue_is_404(pika_env: Any) -> None:
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, not_found(name)):
        pika_env.channel().queue_purge(name)


def test_delete_returns_message_count_and_missing_queue_is_ok(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    for i in range(3):
        ch.basic_publish("", queue, f"m{i}".encode())
    assert ch.queue_delete(queue).method.message_count == 3
    assert ch.queue_delete(queue).method.message_count == 0  # missing: delete-ok, count 0
    with pika_env.closes_channel(404, not_found(queue)):
        ch.queue_declare(queue, passive=True)


def test_delete_if_empty(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"still here")
    with pika_env.closes_channel(
        406, f"PRECONDITION_FAILED - queue '{queue}' in vhost {VHOST} not empty"
    ):
        ch.queue_delete(queue, if_empty=True)
    ch = pika_env.channel()
    assert ch.queue_declare(queue, passive=True).method.message_count == 1
    assert pika_env.drain(ch, queue) == [b"still here"]
    assert ch.queue_delete(queue, if_empty=True).method.message_count == 0


def test_delete_if_unused(pika_env: Any) -> None:
    ch = pika_env.channel()
    queue = pika_env.queue()
    tag = ch.basic_consume(queue, lambda *_: None)
    with pika_env.closes_channel(
        406, f"PRECONDITION_FAILED - queue '{queue}' in vhost {VHOST} in use"
    ):
        pika_env.channel().queue_delete(queue, if_unused=True)
    ch.basic_cancel(tag)
    assert pika_env.channel().queue_delete(queue, if_unused=True).method.message_count == 0


def test_delete_cancels_consumers_and_removes_bindings(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("fanout")
    queue = pika_env.queue()
    ch.queue_bind(queue, x, "")
    cancelled: list[str] = []
    consumer_ch = pika_env.channel()
    consumer_ch.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
    tag = consumer_ch.basic_consume(queue, lambda *_: None)
    ch.queue_delete(queue)
    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        consumer_ch.connection.process_data_events(time_limit=0.05)
    assert cancelled == [tag]
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(x, "", b"unroutable now", mandatory=True)
