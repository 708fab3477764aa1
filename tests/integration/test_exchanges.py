"""Exchanges as RabbitMQ shows them to a pika client: the predeclared set, the four types'
routing (topic and headers edge cases included), declare flags and their equivalence checks,
delete, and exchange-to-exchange bindings.

Every expected reply code and text here was read from RabbitMQ 3.10; the routing tables are
what RabbitMQ routed for the same bindings and keys. Names are unique per test (`pika_env`),
so the tests can share one broker.
"""

from __future__ import annotations

from typing import Any

import pika
import pytest

VHOST = "'/'"


def bind_queues(env: Any, ch: Any, exchange: str, bindings: dict[str, Any]) -> dict[str, str]:
    """One fresh exclusive queue per binding label; returns label -> queue name."""
    queues: dict[str, str] = {}
    for label, binding in bindings.items():
        queue = env.queue(exclusive=True)
        if isinstance(binding, dict):
            ch.queue_bind(queue, exchange, "ignored", arguments=binding)
        else:
            ch.queue_bind(queue, exchange, binding)
        queues[label] = queue
    return queues


# --- the predeclared exchanges ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("amq.direct", "direct"),
        ("amq.fanout", "fanout"),
        ("amq.topic", "topic"),
        ("amq.headers", "headers"),
        ("amq.match", "headers"),
    ],
)
def test_predeclared_exchange_exists_durable_with_its_type(
    pika_env: Any, name: str, kind: str
) -> None:
    ch = pika_env.channel()
    ch.exchange_declare(name, passive=True)
    # A non-passive redeclare with the same type and durable=True is accepted ...
    ch.exchange_declare(name, kind, durable=True)
    # ... while the wrong durability is an inequivalent arg.
    with pika_env.closes_channel(
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{name}' in vhost {VHOST}:"
        " received 'false' but current is 'true'",
    ):
        ch.exchange_declare(name, kind, durable=False)


def test_predeclared_exchange_cannot_be_deleted(pika_env: Any) -> None:
    with pika_env.closes_channel(
        403,
        f"ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost {VHOST} not allowed",
    ):
        pika_env.channel().exchange_delete("amq.direct")


def test_default_exchange_routes_by_queue_name_and_refuses_declare_delete_bind(
    pika_env: Any,
) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    ch.basic_publish("", queue, b"to the default exchange")
    assert pika_env.drain(ch, queue) == [b"to the default exchange"]

    refused = "ACCESS_REFUSED - operation not permitted on the default exchange"
    with pika_env.closes_channel(403, refused):
        pika_env.channel().exchange_declare("", passive=True)
    with pika_env.closes_channel(403, refused):
        pika_env.channel().exchange_declare("", "direct")
    with pika_env.closes_channel(403, refused):
        pika_env.channel().exchange_delete("")
    with pika_env.closes_channel(403, refused):
        pika_env.channel().queue_bind(queue, "", "some-key")


def test_amq_prefix_is_reserved(pika_env: Any) -> None:
    name = pika_env.name("amq.warren")
    with pika_env.closes_channel(
        403, f"ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'"
    ):
        pika_env.channel().exchange_declare(name, "direct")
    # Passive declare of a missing amq.* name is a plain 404, not 403.
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{name}' in vhost {VHOST}"):
        pika_env.channel().exchange_declare(name, passive=True)


def test_unknown_exchange_type_closes_the_channel(pika_env: Any) -> None:
    # Current RabbitMQ (not 3.10, which closed the connection with 503): 406 on the channel.
    conn = pika_env.connect()
    with pika_env.closes_channel(406, "PRECONDITION_FAILED - unknown exchange type 'no-such-type'"):
        conn.channel().exchange_declare(pika_env.name("x"), "no-such-type")
    assert conn.is_open


# --- routing per type ---------------------------------------------------------------------------


def test_direct_routes_on_exact_key_to_every_matching_queue_in_order(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("direct", auto_delete=True)
    queues = bind_queues(pika_env, ch, x, {"a1": "a", "a2": "a", "b": "b", "empty": ""})
    for key, body in [
        ("a", b"1"),
        ("b", b"2"),
        ("", b"3"),
        ("A", b"4"),
        ("a", b"5"),
        ("a.b", b"6"),
    ]:
        ch.basic_publish(x, key, body)
    got = {label: pika_env.drain(ch, q) for label, q in queues.items()}
    assert got == {"a1": [b"1", b"5"], "a2": [b"1", b"5"], "b": [b"2"], "empty": [b"3"]}


def test_fanout_ignores_the_routing_key(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("fanout", auto_delete=True)
    queues = bind_queues(pika_env, ch, x, {"k": "k", "other": "other", "none": ""})
    for key, body in [("k", b"1"), ("zzz", b"2"), ("", b"3")]:
        ch.basic_publish(x, key, body)
    got = {label: pika_env.drain(ch, q) for label, q in queues.items()}
    assert got == {label: [b"1", b"2", b"3"] for label in queues}


TOPIC_KEYS = ["", "a", "b", "a.b", "b.a", "a..b", "a.b.b", "a.x.b", "a.x.y.b"]
TOPIC_KEYS += [".", "a.", ".a", "..", "a.a", "ab"]

# binding key -> routing keys (from TOPIC_KEYS) that RabbitMQ delivers through it.
TOPIC_MATCHES: dict[str, list[str]] = {
    "#": TOPIC_KEYS,  # everything, the empty key included
    "#.#": TOPIC_KEYS,
    "*": ["a", "b", "ab"],  # exactly one word; the empty key has no words
    "": [""],
    "a": ["a"],
    "a.#": ["a", "a.b", "a..b", "a.b.b", "a.x.b", "a.x.y.b", "a.", "a.a"],  # '#' = zero words too
    "#.a": ["a", "b.a", ".a", "a.a"],
    "a.*": ["a.b", "a.", "a.a"],  # an empty word is a word
    "*.a": ["b.a", ".a", "a.a"],
    "*.*": ["a.b", "b.a", ".", "a.", ".a", "a.a"],
    "a.*.b": ["a..b", "a.b.b", "a.x.b"],
    "a.#.b": ["a.b", "a..b", "a.b.b", "a.x.b", "a.x.y.b"],
    "a..b": ["a..b"],
    "*.#": [k for k in TOPIC_KEYS if k != ""],  # at least one word
    "#.*": [k for k in TOPIC_KEYS if k != ""],
    "a.*.#": ["a.b", "a..b", "a.b.b", "a.x.b", "a.x.y.b", "a.", "a.a"],
    "a.b.#.#": ["a.b", "a.b.b"],
}


def test_topic_matching_edge_cases(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("topic", auto_delete=True)
    queues = bind_queues(pika_env, ch, x, {pattern: pattern for pattern in TOPIC_MATCHES})
    for key in TOPIC_KEYS:
        ch.basic_publish(x, key, key.encode())
    got = {pattern: [b.decode() for b in pika_env.drain(ch, q)] for pattern, q in queues.items()}
    assert got == TOPIC_MATCHES


def test_topic_queue_bound_by_several_patterns_gets_one_copy(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("topic", auto_delete=True)
    queue = pika_env.queue(exclusive=True)
    for pattern in ["#", "a.*", "a.b", "*.b"]:
        ch.queue_bind(queue, x, pattern)
    ch.basic_publish(x, "a.b", b"once")
    assert pika_env.drain(ch, queue) == [b"once"]


HEADER_BINDINGS: dict[str, dict[str, Any]] = {
    "all_ab": {"x-match": "all", "a": 1, "b": "2"},
    "any_ab": {"x-match": "any", "a": 1, "b": "2"},
    "default_is_all": {"a": 1},
    "all_nothing": {"x-match": "all"},  # all of nothing: matches every message
    "any_nothing": {"x-match": "any"},  # any of nothing: matches no message
    "all_ignores_x_keys": {"x-match": "all", "a": 1, "x-foo": "bar"},
    "any_only_x_keys": {"x-match": "any", "x-foo": "bar"},  # x- keys never match
    "no_args": {},
}

HEADER_MESSAGES: dict[str, dict[str, Any] | None] = {
    "a1b2": {"a": 1, "b": "2"},
    "a1": {"a": 1},
    "b2": {"b": "2"},
    "a1b3": {"a": 1, "b": "3"},
    "a_as_string": {"a": "1"},  # a different type is a different value
    "no_headers": None,
    "empty_headers": {},
    "a1_xfoo": {"a": 1, "x-foo": "bar"},
    "xfoo": {"x-foo": "bar"},
    "a1b2c3": {"a": 1, "b": "2", "c": 3},
}

HEADER_MATCHES: dict[str, list[str]] = {
    "all_ab": ["a1b2", "a1b2c3"],
    "any_ab": ["a1b2", "a1", "b2", "a1b3", "a1_xfoo", "a1b2c3"],
    "default_is_all": ["a1b2", "a1", "a1b3", "a1_xfoo", "a1b2c3"],
    "all_nothing": list(HEADER_MESSAGES),
    "any_nothing": [],
    "all_ignores_x_keys": ["a1b2", "a1", "a1b3", "a1_xfoo", "a1b2c3"],
    "any_only_x_keys": [],
    "no_args": list(HEADER_MESSAGES),
}


def test_headers_x_match_all_and_any(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("headers", auto_delete=True)
    queues = bind_queues(pika_env, ch, x, HEADER_BINDINGS)
    for label, headers in HEADER_MESSAGES.items():
        props = pika.BasicProperties(headers=headers)
        ch.basic_publish(x, "routing-key-is-ignored", label.encode(), props)
    got = {label: [b.decode() for b in pika_env.drain(ch, q)] for label, q in queues.items()}
    assert got == HEADER_MATCHES


@pytest.mark.parametrize("exchange", ["amq.match", "amq.headers"])
def test_predeclared_headers_exchanges_route_on_headers(pika_env: Any, exchange: str) -> None:
    # The binding matches on a header value unique to this test, since other tests may
    # publish to the shared predeclared exchanges at the same time.
    ch = pika_env.channel(confirm=True)
    token = pika_env.name("token")
    queues = bind_queues(
        pika_env,
        ch,
        exchange,
        {
            "all": {"x-match": "all", "token": token, "kind": "a"},
            "any": {"x-match": "any", "token": token, "other-token": token},
        },
    )
    sent = {"both": {"token": token, "kind": "a"}, "token": {"token": token}, "other": {}}
    for label, headers in sent.items():
        ch.basic_publish(exchange, "", label.encode(), pika.BasicProperties(headers=headers))
    got = {label: [b.decode() for b in pika_env.drain(ch, q)] for label, q in queues.items()}
    assert got == {"all": ["both"], "any": ["both", "token"]}


# --- declare ------------------------------------------------------------------------------------


def test_passive_declare_of_missing_exchange_is_404(pika_env: Any) -> None:
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{name}' in vhost {VHOST}"):
        pika_env.channel().exchange_declare(name, passive=True)


def test_declare_is_idempotent_and_passive_ignores_flags(pika_env: Any) -> None:
    ch = pika_env.channel()
    x = pika_env.exchange("topic", durable=True)
    ch.exchange_declare(x, "topic", durable=True)
    ch.exchange_declare(x, passive=True)
    # passive declare checks existence only: other type and flags are not compared
    ch.exchange_declare(x, "fanout", passive=True, durable=False, auto_delete=True)
    # an unknown x- argument is not compared either
    ch.exchange_declare(x, "topic", durable=True, arguments={"x-whatever": 1})


@pytest.mark.parametrize(
    ("flags", "arg", "received", "current"),
    [
        ({"exchange_type": "fanout"}, "type", "fanout", "direct"),
        ({"exchange_type": "direct", "durable": True}, "durable", "true", "false"),
        ({"exchange_type": "direct", "auto_delete": True}, "auto_delete", "true", "false"),
        ({"exchange_type": "direct", "internal": True}, "internal", "true", "false"),
    ],
)
def test_redeclare_with_other_type_or_flags_is_406(
    pika_env: Any, flags: dict[str, Any], arg: str, received: str, current: str
) -> None:
    x = pika_env.exchange("direct")
    ch = pika_env.channel()
    with pika_env.closes_channel(
        406,
        f"PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{x}' in vhost {VHOST}:"
        f" received '{received}' but current is '{current}'",
    ):
        ch.exchange_declare(x, **flags)
    # the exchange is unchanged
    pika_env.channel().exchange_declare(x, "direct")


def test_redeclare_with_other_alternate_exchange_is_406(pika_env: Any) -> None:
    plain = pika_env.exchange("direct")
    with_ae = pika_env.exchange("direct", arguments={"alternate-exchange": "ae-one"})
    prefix = "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange"
    with pika_env.closes_channel(
        406,
        f"{prefix} '{plain}' in vhost {VHOST}: received the value 'ae-one' of type 'longstr'"
        " but current is none",
    ):
        pika_env.channel().exchange_declare(
            plain, "direct", arguments={"alternate-exchange": "ae-one"}
        )
    with pika_env.closes_channel(
        406,
        f"{prefix} '{with_ae}' in vhost {VHOST}: received none"
        " but current is the value 'ae-one' of type 'longstr'",
    ):
        pika_env.channel().exchange_declare(with_ae, "direct")
    with pika_env.closes_channel(
        406, f"{prefix} '{with_ae}' in vhost {VHOST}: received 'ae-two' but current is 'ae-one'"
    ):
        pika_env.channel().exchange_declare(
            with_ae, "direct", arguments={"alternate-exchange": "ae-two"}
        )


def test_alternate_exchange_receives_unroutable_messages(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    ae = pika_env.exchange("fanout")
    x = pika_env.exchange("direct", arguments={"alternate-exchange": ae})
    routed = pika_env.queue(exclusive=True)
    unrouted = pika_env.queue(exclusive=True)
    ch.queue_bind(routed, x, "known")
    ch.queue_bind(unrouted, ae, "")
    ch.basic_publish(x, "known", b"routed")
    # mandatory is satisfied by the alternate exchange: no basic.return
    ch.basic_publish(x, "unknown", b"via-ae", mandatory=True)
    assert pika_env.drain(ch, routed) == [b"routed"]
    method, _props, body = ch.basic_get(unrouted, auto_ack=True)
    assert body == b"via-ae"
    assert (method.exchange, method.routing_key) == (x, "unknown")


def test_durable_exchange_declares_and_passive_finds_it(pika_env: Any) -> None:
    x = pika_env.exchange("fanout", durable=True)
    pika_env.channel().exchange_declare(x, passive=True)
    pika_env.channel().exchange_declare(x, "fanout", durable=True)


def test_auto_delete_exchange_goes_when_its_last_binding_goes(pika_env: Any) -> None:
    ch = pika_env.channel()
    x = pika_env.exchange("direct", auto_delete=True)
    # Never bound: it stays.
    ch.exchange_declare(x, passive=True)
    q1 = pika_env.queue(exclusive=True)
    q2 = pika_env.queue(exclusive=True)
    ch.queue_bind(q1, x, "k1")
    ch.queue_bind(q2, x, "k2")
    ch.queue_unbind(q1, x, "k1")
    ch.exchange_declare(x, passive=True)  # one binding left
    ch.queue_unbind(q2, x, "k2")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{x}' in vhost {VHOST}"):
        ch.exchange_declare(x, passive=True)


def test_auto_delete_exchange_goes_when_its_last_bound_queue_is_deleted(pika_env: Any) -> None:
    ch = pika_env.channel()
    x = pika_env.exchange("fanout", auto_delete=True)
    queue = pika_env.queue()
    ch.queue_bind(queue, x, "")
    ch.queue_delete(queue)
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{x}' in vhost {VHOST}"):
        ch.exchange_declare(x, passive=True)


def test_auto_delete_source_goes_when_its_exchange_binding_goes(pika_env: Any) -> None:
    ch = pika_env.channel()
    source = pika_env.exchange("fanout", auto_delete=True)
    destination = pika_env.exchange("fanout")
    ch.exchange_bind(destination, source, "")
    ch.exchange_unbind(destination, source, "")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{source}' in vhost {VHOST}"):
        ch.exchange_declare(source, passive=True)


def test_publish_to_internal_exchange_is_403_but_it_routes_from_another_exchange(
    pika_env: Any,
) -> None:
    ch = pika_env.channel(confirm=True)
    internal = pika_env.exchange("fanout", internal=True)
    front = pika_env.exchange("direct")
    queue = pika_env.queue(exclusive=True)
    ch.queue_bind(queue, internal, "")
    ch.exchange_bind(internal, front, "k")
    ch.basic_publish(front, "k", b"through the front door")
    assert pika_env.drain(ch, queue) == [b"through the front door"]
    with pika_env.closes_channel(
        403, f"ACCESS_REFUSED - cannot publish to internal exchange '{internal}' in vhost {VHOST}"
    ):
        ch.basic_publish(internal, "", b"refused")


def test_publish_to_missing_exchange_is_404(pika_env: Any) -> None:
    ch = pika_env.channel()
    name = pika_env.name("missing")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{name}' in vhost {VHOST}"):
        ch.basic_publish(name, "k", b"lost")
        ch.queue_declare("", exclusive=True)  # a round trip to receive the asynchronous close


# --- delete -------------------------------------------------------------------------------------


def test_delete_if_unused(pika_env: Any) -> None:
    ch = pika_env.channel()
    x = pika_env.exchange("direct")
    queue = pika_env.queue(exclusive=True)
    ch.queue_bind(queue, x, "k")
    with pika_env.closes_channel(
        406, f"PRECONDITION_FAILED - exchange '{x}' in vhost {VHOST} in use"
    ):
        ch.exchange_delete(x, if_unused=True)
    ch = pika_env.channel()
    ch.exchange_declare(x, passive=True)  # still there
    ch.queue_unbind(queue, x, "k")
    ch.exchange_delete(x, if_unused=True)
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{x}' in vhost {VHOST}"):
        ch.exchange_declare(x, passive=True)


def test_delete_if_unused_counts_exchange_bindings_where_it_is_the_source(pika_env: Any) -> None:
    ch = pika_env.channel()
    source = pika_env.exchange("fanout")
    destination = pika_env.exchange("fanout")
    ch.exchange_bind(destination, source, "")
    with pika_env.closes_channel(
        406, f"PRECONDITION_FAILED - exchange '{source}' in vhost {VHOST} in use"
    ):
        ch.exchange_delete(source, if_unused=True)
    # being the destination of a binding does not make an exchange "used"
    pika_env.channel().exchange_delete(destination, if_unused=True)


def test_delete_removes_bindings_and_missing_exchange_is_ok(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x = pika_env.exchange("direct")
    queue = pika_env.queue(exclusive=True)
    ch.queue_bind(queue, x, "k")
    ch.exchange_delete(x)
    ch.exchange_delete(x)  # a second time: delete-ok, not 404
    ch.exchange_declare(x, "direct")  # a new exchange of the same name has no bindings
    ch.basic_publish(x, "k", b"nobody bound")
    assert pika_env.drain(ch, queue) == []


# --- exchange-to-exchange bindings --------------------------------------------------------------


def test_exchange_bind_routes_through_and_unbind_stops_it(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    source = pika_env.exchange("topic")
    destination = pika_env.exchange("direct")
    queue = pika_env.queue(exclusive=True)
    ch.queue_bind(queue, destination, "a.b")
    ch.exchange_bind(destination, source, "a.*")
    ch.basic_publish(source, "a.b", b"1")  # a.* matches, then direct on "a.b" matches
    ch.basic_publish(source, "a.c", b"2")  # a.* matches, direct on "a.c" does not
    ch.basic_publish(source, "b.b", b"3")  # a.* does not match
    assert pika_env.drain(ch, queue) == [b"1"]
    ch.exchange_unbind(destination, source, "a.*")
    ch.basic_publish(source, "a.b", b"4")
    assert pika_env.drain(ch, queue) == []


def test_queue_reached_by_several_paths_gets_one_copy(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x1 = pika_env.exchange("fanout")
    x2 = pika_env.exchange("fanout")
    x3 = pika_env.exchange("fanout")
    queue = pika_env.queue(exclusive=True)
    ch.queue_bind(queue, x1, "")
    ch.queue_bind(queue, x2, "")
    ch.queue_bind(queue, x3, "")
    ch.exchange_bind(x2, x1, "")
    ch.exchange_bind(x3, x2, "")
    ch.basic_publish(x1, "", b"one copy")
    assert pika_env.drain(ch, queue) == [b"one copy"]


def test_exchange_binding_cycle_terminates_and_delivers_once(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    x1 = pika_env.exchange("fanout")
    x2 = pika_env.exchange("fanout")
    queue = pika_env.queue(exclusive=True)
    ch.exchange_bind(x2, x1, "")
    ch.exchange_bind(x1, x2, "")
    ch.queue_bind(queue, x2, "")
    ch.basic_publish(x1, "", b"cycle")
    assert pika_env.drain(ch, queue) == [b"cycle"]


def test_exchange_bind_to_missing_exchange_is_404(pika_env: Any) -> None:
    x = pika_env.exchange("fanout")
    missing = pika_env.name("missing")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{missing}' in vhost {VHOST}"):
        pika_env.channel().exchange_bind(x, missing, "")
    with pika_env.closes_channel(404, f"NOT_FOUND - no exchange '{missing}' in vhost {VHOST}"):
        pika_env.channel().exchange_bind(missing, x, "")
