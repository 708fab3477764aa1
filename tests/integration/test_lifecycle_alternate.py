"""Issue 3, item 4: alternate exchanges (`alternate-exchange`) and exchange-to-exchange
routing, with a queue reached by several paths receiving the message once.

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- An exchange whose own bindings match nothing hands the message to its alternate exchange;
  the delivery still names the exchange the client published to, and its routing key.
- A message routed through an AE is routed: no basic.return even with mandatory.
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pytest


def bodies(ch: Any, queue: str) -> list[bytes]:
    out: list[bytes] = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append(body)


def test_unroutable_message_goes_to_the_alternate_exchange(pika_env: Any) -> None:
    ae = pika_env.exchange("fanout", prefix="ae")
    caught = pika_env.queue("caught")
    main = pika_env.exchange("direct", arguments={"alternate-exchange": ae})
    bound = pika_env.queue("bound")
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(caught, ae)
    ch.queue_bind(bound, main, "known")
    ch.basic_publish(main, "unknown", b"u", mandatory=True)  # not returned
    ch.basic_publish(main, "known", b"k", mandatory=True)
    method, _props, body = ch.basic_get(caught, auto_ack=True)
    assert (method.exchange, method.routing_key, body) == (main, "unknown", b"u")
    assert bodies(ch, caught) == []
    assert bodies(ch, bound) == [b"k"]


def test_missing_alternate_exchange_leaves_the_message_unroutable(pika_env: Any) -> None:
    main = pika_env.exchange(
        "direct", arguments={"alternate-exchange": pika_env.name("no-such-ae")}
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish(main, "k", b"dropped")  # acked, dropped
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        ch.basic_publish(main, "k", b"returned", mandatory=True)
    [returned] = info.value.messages
    assert (returned.method.reply_code, returned.method.reply_text) == (312, "NO_ROUTE")
    assert (returned.method.exchange, returned.body) == (main, b"returned")


def test_alternate_exchange_with_no_match_either_returns_mandatory(pika_env: Any) -> None:
    ae = pika_env.exchange("direct", prefix="ae")
    main = pika_env.exchange("direct", arguments={"alternate-exchange": ae})
    ch = pika_env.channel(confirm=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(main, "k", b"m", mandatory=True)


def test_alternate_exchanges_chain(pika_env: Any) -> None:
    last = pika_env.exchange("fanout", prefix="ae2")
    middle = pika_env.exchange("direct", prefix="ae1", arguments={"alternate-exchange": last})
    main = pika_env.exchange("topic", arguments={"alternate-exchange": middle})
    queue = pika_env.queue()
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(queue, last)
    ch.basic_publish(main, "a.b", b"m", mandatory=True)
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key, body) == (main, "a.b", b"m")


def test_alternate_exchange_loop_terminates(pika_env: Any) -> None:
    one = pika_env.name("ae-loop1")
    two = pika_env.name("ae-loop2")
    ch = pika_env.channel(confirm=True)
    ch.exchange_declare(one, "direct", arguments={"alternate-exchange": two})
    pika_env.exchanges.append(one)
    ch.exchange_declare(two, "direct", arguments={"alternate-exchange": one})
    pika_env.exchanges.append(two)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(one, "k", b"m", mandatory=True)
    queue = pika_env.queue()
    ch.queue_bind(queue, one, "k")
    ch.basic_publish(two, "k", b"via-loop", mandatory=True)
    assert bodies(ch, queue) == [b"via-loop"]


def test_alternate_exchange_of_a_destination_exchange_is_used(pika_env: Any) -> None:
    ae = pika_env.exchange("fanout", prefix="ae")
    dest = pika_env.exchange("direct", prefix="dst", arguments={"alternate-exchange": ae})
    source = pika_env.exchange("direct", prefix="src")
    queue = pika_env.queue()
    ch = pika_env.channel(confirm=True)
    ch.exchange_bind(dest, source, "k")
    ch.queue_bind(queue, ae)
    ch.basic_publish(source, "k", b"m", mandatory=True)
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key, body) == (source, "k", b"m")


# --- exchange-to-exchange ------------------------------------------------------------------


def test_exchange_to_exchange_binding_routes_and_unbind_stops_it(pika_env: Any) -> None:
    source = pika_env.exchange("topic", prefix="src")
    dest = pika_env.exchange("fanout", prefix="dst")
    queue = pika_env.queue()
    ch = pika_env.channel(confirm=True)
    ch.exchange_bind(dest, source, "orders.*")
    ch.queue_bind(queue, dest)
    ch.basic_publish(source, "orders.new", b"1")
    ch.basic_publish(source, "users.new", b"2")
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key, body) == (source, "orders.new", b"1")
    assert bodies(ch, queue) == []
    ch.exchange_unbind(dest, source, "orders.*")
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(source, "orders.new", b"3", mandatory=True)
    assert bodies(ch, queue) == []


def test_queue_reached_by_two_paths_gets_one_copy(pika_env: Any) -> None:
    source = pika_env.exchange("topic", prefix="src")
    dest = pika_env.exchange("direct", prefix="dst")
    queue = pika_env.queue()
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(queue, source, "a.*")
    ch.queue_bind(queue, source, "*.b")
    ch.exchange_bind(dest, source, "a.b")
    ch.queue_bind(queue, dest, "a.b")
    ch.basic_publish(source, "a.b", b"once")
    time.sleep(0.05)
    assert bodies(ch, queue) == [b"once"]


def test_exchange_binding_cycle_delivers_once(pika_env: Any) -> None:
    one = pika_env.exchange("fanout", prefix="c1")
    two = pika_env.exchange("fanout", prefix="c2")
    queue = pika_env.queue()
    ch = pika_env.channel(confirm=True)
    ch.exchange_bind(two, one)
    ch.exchange_bind(one, two)
    ch.queue_bind(queue, two)
    ch.basic_publish(one, "", b"m")
    time.sleep(0.05)
    assert bodies(ch, queue) == [b"m"]


def test_deleting_the_destination_removes_the_exchange_binding(pika_env: Any) -> None:
    source = pika_env.exchange("fanout", prefix="src")
    dest = pika_env.name("dst")
    ch = pika_env.channel(confirm=True)
    ch.exchange_declare(dest, "fanout")
    queue = pika_env.queue()
    ch.exchange_bind(dest, source)
    ch.queue_bind(queue, dest)
    ch.exchange_delete(dest)
    ch.exchange_declare(dest, "fanout")
    pika_env.exchanges.append(dest)
    ch.queue_bind(queue, dest)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(source, "", b"m", mandatory=True)
