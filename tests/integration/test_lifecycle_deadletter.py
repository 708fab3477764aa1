"""Issue 3, item 2: dead-lettering (`x-dead-letter-exchange`, `x-dead-letter-routing-key`) on
reject/nack without requeue, expiry and length overflow; the `x-death` and
`x-first-death-*` headers; cycles.

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- `x-death` tables are compared whole; their `time` must be a timestamp (pika decodes it
  to an aware datetime) close to now, and is then left out of the comparison.
- `count` is a signed 64-bit long on the wire (pika's `long`).
- RabbitMQ 3.10 regroups an x-death list of two tables or more in an order that reverses
  the older ones (see docs/dead-lettering.md); `test_reject_loop_*` pins that quirk.
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import pika
from pika.compat import long

DEADLINE_S = 3.0


def get_within(ch: Any, queue: str, timeout: float = DEADLINE_S) -> tuple[Any, Any, bytes]:
    """The next message of `queue` (auto-acked), polling basic.get until the deadline."""
    return take(ch, queue, timeout, auto_ack=True)


def take(
    ch: Any, queue: str, timeout: float = DEADLINE_S, *, auto_ack: bool = False
) -> tuple[Any, Any, bytes]:
    """The next message of `queue` (unacked unless auto_ack), polling until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            return method, props, body
        assert time.monotonic() < deadline, f"nothing in {queue} after {timeout}s"
        time.sleep(0.02)


def count(ch: Any, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).method.message_count)


def stays_empty(ch: Any, queue: str, for_s: float = 0.4) -> bool:
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        if count(ch, queue):
            return False
        time.sleep(0.05)
    return True


def deaths(headers: dict[str, Any]) -> list[dict[str, Any]]:
    """The x-death tables with `time` checked (a datetime within a minute) and removed;
    `count` checked to be a long."""
    now = datetime.datetime.now(datetime.UTC)
    out = []
    for table in headers["x-death"]:
        table = dict(table)
        when = table.pop("time")
        assert isinstance(when, datetime.datetime), when
        assert abs((when - now).total_seconds()) < 60, when
        assert type(table["count"]) is long, type(table["count"])
        out.append(table)
    return out


def first_death(headers: dict[str, Any]) -> tuple[Any, Any, Any]:
    return (
        headers["x-first-death-exchange"],
        headers["x-first-death-queue"],
        headers["x-first-death-reason"],
    )


def death(
    queue: str,
    reason: str,
    exchange: str,
    keys: list[str],
    n: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "count": n,
        "reason": reason,
        "queue": queue,
        "exchange": exchange,
        "routing-keys": keys,
        **extra,
    }


def dlx_pair(env: Any, **source_args: Any) -> tuple[str, str, str]:
    """(dlx, source queue dead-lettering to dlx, target queue bound to dlx with '#')."""
    dlx = env.exchange("topic", prefix="dlx")
    target = env.queue("target")
    env.channel().queue_bind(target, dlx, "#")
    source = env.queue("source", arguments={"x-dead-letter-exchange": dlx, **source_args})
    return dlx, source, target


# --- reasons -------------------------------------------------------------------------------


def test_rejected_message_is_dead_lettered_with_x_death(pika_env: Any) -> None:
    dlx, source, target = dlx_pair(pika_env)
    exchange = pika_env.exchange("direct", prefix="src")
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(source, exchange, "k1")
    props = pika.BasicProperties(
        content_type="text/plain",
        message_id="id-1",
        delivery_mode=2,
        headers={"user": "u"},
    )
    ch.basic_publish(exchange, "k1", b"body", props)
    method, _props, _body = ch.basic_get(source)
    ch.basic_reject(method.delivery_tag, requeue=False)
    method, props, body = get_within(ch, target)
    assert (method.exchange, method.routing_key, method.redelivered, body) == (
        dlx,
        "k1",
        False,
        b"body",
    )
    assert (props.content_type, props.message_id, props.delivery_mode) == (
        "text/plain",
        "id-1",
        2,
    )
    assert set(props.headers) == {
        "user",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    }
    assert props.headers["user"] == "u"
    assert deaths(props.headers) == [death(source, "rejected", exchange, ["k1"])]
    assert first_death(props.headers) == (exchange, source, "rejected")
    assert count(ch, source) == 0


def test_nack_multiple_without_requeue_dead_letters_each_in_order(pika_env: Any) -> None:
    _dlx, source, target = dlx_pair(pika_env)
    ch = pika_env.channel(confirm=True)
    for body in (b"1", b"2", b"3"):
        ch.basic_publish("", source, body)
    last = None
    for _ in range(3):
        last, _props, _body = ch.basic_get(source)
    ch.basic_nack(last.delivery_tag, multiple=True, requeue=False)
    got = [get_within(ch, target) for _ in range(3)]
    assert [body for _m, _p, body in got] == [b"1", b"2", b"3"]
    for method, props, _body in got:
        assert method.routing_key == source
        assert deaths(props.headers) == [death(source, "rejected", "", [source])]


def test_consumer_reject_dead_letters_and_requeue_does_not(pika_env: Any) -> None:
    _dlx, source, target = dlx_pair(pika_env)
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", source, b"requeued")
    ch.basic_publish("", source, b"rejected")
    method, _p, _b = ch.basic_get(source)
    ch.basic_reject(method.delivery_tag, requeue=True)
    method, _p, body = ch.basic_get(source)
    assert (body, method.redelivered) == (b"requeued", True)
    ch.basic_ack(method.delivery_tag)
    method, _p, body = ch.basic_get(source)
    assert body == b"rejected"
    ch.basic_reject(method.delivery_tag, requeue=False)
    _m, _p, body = get_within(ch, target)
    assert body == b"rejected"
    assert count(ch, target) == 0


def test_dead_letter_routing_key_replaces_the_key(pika_env: Any) -> None:
    dlx = pika_env.exchange("direct", prefix="dlx")
    target = pika_env.queue("target")
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(target, dlx, "retry")
    source = pika_env.queue(
        "source",
        arguments={"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "retry"},
    )
    ch.basic_publish("", source, b"m")
    method, _p, _b = ch.basic_get(source)
    ch.basic_nack(method.delivery_tag, requeue=False)
    method, props, body = get_within(ch, target)
    assert (method.exchange, method.routing_key, body) == (dlx, "retry", b"m")
    # x-death records the keys the message had, not the replacement
    assert deaths(props.headers) == [death(source, "rejected", "", [source])]


def test_default_exchange_as_dlx(pika_env: Any) -> None:
    target = pika_env.queue("target")
    source = pika_env.queue(
        "source",
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target},
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", source, b"m")
    method, _p, _b = ch.basic_get(source)
    ch.basic_reject(method.delivery_tag, requeue=False)
    method, props, body = get_within(ch, target)
    assert (method.exchange, method.routing_key, body) == ("", target, b"m")
    assert first_death(props.headers) == ("", source, "rejected")


def test_cc_keys_are_recorded_and_routed_by_the_dlx(pika_env: Any) -> None:
    dlx = pika_env.exchange("direct", prefix="dlx")
    by_cc = pika_env.queue("by-cc")
    ch = pika_env.channel(confirm=True)
    ch.queue_bind(by_cc, dlx, "kcc")
    source = pika_env.queue("source", arguments={"x-dead-letter-exchange": dlx})
    exchange = pika_env.exchange("direct", prefix="src")
    ch.queue_bind(source, exchange, "k1")
    ch.basic_publish(exchange, "k1", b"m", pika.BasicProperties(headers={"CC": ["kcc"]}))
    method, _p, _b = ch.basic_get(source)
    ch.basic_reject(method.delivery_tag, requeue=False)
    method, props, body = get_within(ch, by_cc)
    assert (method.routing_key, body) == ("k1", b"m")
    assert props.headers["CC"] == ["kcc"]
    assert deaths(props.headers) == [death(source, "rejected", exchange, ["k1", "kcc"])]


def test_message_expiration_dead_letters_with_original_expiration(pika_env: Any) -> None:
    _dlx, source, target = dlx_pair(pika_env)
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", source, b"m", pika.BasicProperties(expiration="50", headers={"h": 1}))
    method, props, body = get_within(ch, target)
    assert (method.routing_key, body, props.expiration) == (source, b"m", None)
    assert props.headers["h"] == 1
    assert deaths(props.headers) == [
        death(source, "expired", "", [source], **{"original-expiration": "50"})
    ]
    assert first_death(props.headers) == ("", source, "expired")


def test_queue_ttl_dead_letters_without_original_expiration(pika_env: Any) -> None:
    _dlx, source, target = dlx_pair(pika_env, **{"x-message-ttl": 50})
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", source, b"m")
    _method, props, body = get_within(ch, target)
    assert body == b"m"
    assert deaths(props.headers) == [death(source, "expired", "", [source])]


def test_drop_head_overflow_dead_letters_as_maxlen(pika_env: Any) -> None:
    _dlx, source, target = dlx_pair(pika_env, **{"x-max-length": 1})
    ch = pika_env.channel(confirm=True)
    for body in (b"1", b"2", b"3"):
        ch.basic_publish("", source, body)
    got = [get_within(ch, target) for _ in range(2)]
    assert [body for _m, _p, body in got] == [b"1", b"2"]
    for _m, props, _b in got:
        assert deaths(props.headers) == [death(source, "maxlen", "", [source])]
        assert first_death(props.headers) == ("", source, "maxlen")
    assert ch.basic_get(source, auto_ack=True)[2] == b"3"


def test_missing_dlx_drops_the_message(pika_env: Any) -> None:
    source = pika_env.queue(
        "source", arguments={"x-dead-letter-exchange": pika_env.name("no-such-dlx")}
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", source, b"m")
    method, _p, _b = ch.basic_get(source)
    ch.basic_reject(method.delivery_tag, requeue=False)
    assert count(ch, source) == 0
    assert ch.is_open


def test_purge_and_ack_do_not_dead_letter(pika_env: Any) -> None:
    _dlx, source, target = dlx_pair(pika_env)
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", source, b"acked")
    ch.basic_publish("", source, b"purged")
    method, _p, _b = ch.basic_get(source)
    ch.basic_ack(method.delivery_tag)
    assert ch.queue_purge(source).method.message_count == 1
    assert stays_empty(ch, target, 0.2)


# --- merging, first-death and cycles -------------------------------------------------------


def test_repeated_deaths_in_one_queue_merge_into_one_counted_table(pika_env: Any) -> None:
    name = pika_env.name("self")
    ch = pika_env.channel(confirm=True)
    ch.queue_declare(
        name, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": name}
    )
    pika_env.queues.append(name)
    ch.basic_publish("", name, b"m")
    for n in (1, 2, 3):
        method, props, _b = take(ch, name)
        if n > 1:
            # a rejection cycle is not cut: the message comes back each time
            assert deaths(props.headers) == [death(name, "rejected", "", [name], n - 1)]
        ch.basic_reject(method.delivery_tag, requeue=False)
    _m, props, _b = get_within(ch, name)
    assert deaths(props.headers) == [death(name, "rejected", "", [name], 3)]
    assert first_death(props.headers) == ("", name, "rejected")


def test_second_death_elsewhere_prepends_a_table_and_keeps_first_death(pika_env: Any) -> None:
    final = pika_env.queue("final")
    second = pika_env.queue(
        "second",
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": final},
    )
    first = pika_env.queue(
        "first",
        arguments={
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": second,
            "x-message-ttl": 50,
        },
    )
    ch = pika_env.channel(confirm=True)
    ch.basic_publish("", first, b"m")
    method, _props, _body = take(ch, second)
    ch.basic_reject(method.delivery_tag, requeue=False)
    method, props, body = get_within(ch, final)
    assert (method.routing_key, body) == (final, b"m")
    assert deaths(props.headers) == [
        death(second, "rejected", "", [second]),
        death(first, "expired", "", [first]),
    ]
    assert first_death(props.headers) == ("", first, "expired")


def test_expiry_cycle_back_to_the_same_queue_is_dropped(pika_env: Any) -> None:
    name = pika_env.name("loop")
    ch = pika_env.channel(confirm=True)
    ch.queue_declare(
        name,
        arguments={
            "x-message-ttl": 50,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": name,
        },
    )
    pika_env.queues.append(name)
    ch.basic_publish("", name, b"m")
    time.sleep(0.2)
    assert stays_empty(ch, name, 0.3)


def test_expiry_cycle_between_two_queues_is_cut_where_it_would_re_enter(
    pika_env: Any,
) -> None:
    # X (ttl) -> Y (ttl) -> fanout F -> {X, W}: the copy for X closes a cycle, W's does not
    fan = pika_env.exchange("fanout", prefix="f")
    x = pika_env.name("x")
    y = pika_env.queue("y", arguments={"x-message-ttl": 50, "x-dead-letter-exchange": fan})
    ch = pika_env.channel(confirm=True)
    ch.queue_declare(
        x,
        arguments={
            "x-message-ttl": 50,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": y,
        },
    )
    pika_env.queues.append(x)
    witness = pika_env.queue("w")
    ch.queue_bind(x, fan)
    ch.queue_bind(witness, fan)
    ch.basic_publish("", x, b"m")
    method, props, body = get_within(ch, witness)
    assert (method.exchange, method.routing_key, body) == (fan, y, b"m")
    assert deaths(props.headers) == [
        death(y, "expired", "", [y]),
        death(x, "expired", "", [x]),
    ]
    assert first_death(props.headers) == ("", x, "expired")
    assert stays_empty(ch, x, 0.3)


def test_reject_loop_reorders_x_death_like_rabbitmq_3_10(pika_env: Any) -> None:
    """A -> B -> C -> A by rejection. 3.10 regroups the list with a fold that reverses the
    older tables once there are two or more (a quirk; 3.13 changed x-death ordering)."""
    a, b, c = (pika_env.name(p) for p in ("a", "b", "c"))
    ch = pika_env.channel(confirm=True)
    for name, nxt in ((a, b), (b, c), (c, a)):
        ch.queue_declare(
            name,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": nxt},
        )
        pika_env.queues.append(name)
    ch.basic_publish("", a, b"m")
    expected = [
        (b, [(a, 1)]),
        (c, [(b, 1), (a, 1)]),
        (a, [(c, 1), (a, 1), (b, 1)]),
        (b, [(a, 2), (b, 1), (c, 1)]),
        (c, [(b, 2), (c, 1), (a, 2)]),
    ]
    at = a
    for nxt, order in expected:
        method, _props, _body = take(ch, at)
        ch.basic_reject(method.delivery_tag, requeue=False)
        method, props, _body = take(ch, nxt)
        assert [(t["queue"], t["count"]) for t in deaths(props.headers)] == order
        assert first_death(props.headers) == ("", a, "rejected")
        ch.basic_nack(method.delivery_tag, requeue=True)
        at = nxt
