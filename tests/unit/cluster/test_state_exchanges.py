"""Exchanges through StateMachine.apply: declare, delete, bind, e2e routing, auto-delete.

Every expected text was checked against RabbitMQ 3.10.
"""

# ruff: noqa: E501  (tables of RabbitMQ reply texts read best one per line)
from __future__ import annotations

import pytest

from cluster import commands as c
from node.broker.types import AmqpError, Ok, Routed

DEFAULT_403 = "ACCESS_REFUSED - operation not permitted on the default exchange"


def names(d) -> list[str]:
    return [x.name for x in d.sm.exchanges("/")]


def test_builtin_exchanges(d) -> None:
    views = {x.name: x for x in d.sm.exchanges("/")}
    assert {"", "amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"} <= set(views)
    assert views["amq.match"].type == "headers"
    assert views["amq.topic"].type == "topic"
    assert all(v.durable for v in views.values())


def test_declare_and_redeclare(d) -> None:
    assert d.ok(d.xdeclare("x", "fanout", durable=True)) == Ok()
    assert d.ok(d.xdeclare("x", "fanout", durable=True)) == Ok()
    assert "x" in names(d)


@pytest.mark.parametrize(
    ("kw", "text"),
    [
        ({"type": "fanout"}, "'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'direct'"),
        ({"durable": True}, "'durable' for exchange 'x' in vhost '/': received 'true' but current is 'false'"),
        ({"auto_delete": True}, "'auto_delete' for exchange 'x' in vhost '/': received 'true' but current is 'false'"),
        ({"internal": True}, "'internal' for exchange 'x' in vhost '/': received 'true' but current is 'false'"),
        ({"arguments": {"alternate-exchange": "foo"}}, "'alternate-exchange' for exchange 'x' in vhost '/': received the value 'foo' of type 'longstr' but current is none"),
    ],
)  # fmt: skip
def test_inequivalent_redeclare(d, kw, text) -> None:
    d.ok(d.xdeclare("x"))
    kw = {"type": "direct", **kw}
    error = d.err(d.xdeclare("x", **kw))
    assert error == AmqpError(406, "PRECONDITION_FAILED - inequivalent arg " + text, 40, 10)


def test_type_is_checked_before_durable(d) -> None:
    d.ok(d.xdeclare("x"))
    error = d.err(d.xdeclare("x", "fanout", durable=True))
    assert "'type'" in error.reply_text


def test_unknown_argument_is_ignored_alternate_exchange_compared(d) -> None:
    d.ok(d.xdeclare("x", arguments={"alternate-exchange": "ae1"}))
    d.ok(d.xdeclare("x", arguments={"alternate-exchange": "ae1", "foo": 1}))
    assert d.err(d.xdeclare("x", arguments={"alternate-exchange": "ae2"})).reply_text == (
        "PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange 'x' in vhost"
        " '/': received 'ae2' but current is 'ae1'"
    )
    assert d.err(d.xdeclare("x")).reply_text.endswith(
        "received none but current is the value 'ae1' of type 'longstr'"
    )


def test_passive(d) -> None:
    assert d.err(d.xdeclare("nope", passive=True)) == AmqpError(
        404, "NOT_FOUND - no exchange 'nope' in vhost '/'", 40, 10
    )
    d.ok(d.xdeclare("x"))
    # Passive ignores type and flags, even an unknown type.
    assert d.ok(d.xdeclare("x", "bogus", passive=True, durable=True)) == Ok()


def test_unknown_type_is_a_channel_error(d) -> None:
    error = d.err(d.xdeclare("x", "bogus"))
    assert error == AmqpError(406, "PRECONDITION_FAILED - unknown exchange type 'bogus'", 40, 10)
    d.ok(d.xdeclare("y"))
    assert d.err(d.xdeclare("y", "bogus")).reply_code == 406  # even when it exists


def test_reserved_names(d) -> None:
    assert d.err(d.xdeclare("amq.x")) == AmqpError(
        403, "ACCESS_REFUSED - exchange name 'amq.x' contains reserved prefix 'amq.*'", 40, 10
    )
    assert d.err(d.xdeclare("amq.x", passive=True)).reply_code == 404
    # An existing amq.* exchange may be redeclared equivalently, not differently.
    assert d.ok(d.xdeclare("amq.direct", durable=True)) == Ok()
    assert d.err(d.xdeclare("amq.direct", "fanout", durable=True)).reply_text.endswith(
        "received 'fanout' but current is 'direct'"
    )


def test_default_exchange_is_untouchable(d) -> None:
    d.ok(d.declare("q"))
    for cmd, ids in [
        (d.xdeclare("", durable=True), (40, 10)),
        (d.xdeclare("", passive=True), (40, 10)),
        (c.DeleteExchange(vhost="/", exchange=""), (40, 20)),
        (d.bind("q", ""), (50, 20)),
        (d.bind("missing", ""), (50, 20)),
        (d.unbind("q", "", "q"), (50, 50)),
        (c.BindExchange(vhost="/", destination="", source="amq.direct", routing_key=""), (40, 30)),
        (c.BindExchange(vhost="/", destination="amq.direct", source="", routing_key=""), (40, 30)),
        (
            c.UnbindExchange(vhost="/", destination="amq.direct", source="", routing_key=""),
            (40, 40),
        ),
    ]:
        assert d.err(cmd) == AmqpError(403, DEFAULT_403, *ids)


def test_delete(d) -> None:
    assert d.ok(c.DeleteExchange(vhost="/", exchange="missing")) == Ok()
    assert d.err(c.DeleteExchange(vhost="/", exchange="amq.direct")) == AmqpError(
        403, "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
        40, 20,
    )  # fmt: skip
    assert d.err(c.DeleteExchange(vhost="/", exchange="amq.missing")).reply_code == 403
    d.ok(d.xdeclare("x"))
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "x", "k"))
    assert d.err(c.DeleteExchange(vhost="/", exchange="x", if_unused=True)) == AmqpError(
        406, "PRECONDITION_FAILED - exchange 'x' in vhost '/' in use", 40, 20
    )
    d.ok(c.DeleteExchange(vhost="/", exchange="x"))
    assert "x" not in names(d)
    assert [b for b in d.sm.bindings("/") if b.source == "x"] == []
    assert d.err(d.publish("x", "k")).reply_text == "NOT_FOUND - no exchange 'x' in vhost '/'"


def test_if_unused_counts_only_source_bindings(d) -> None:
    d.ok(d.xdeclare("src", "fanout"))
    d.ok(d.xdeclare("dst", "fanout"))
    d.ok(c.BindExchange(vhost="/", destination="dst", source="src", routing_key=""))
    d.ok(c.DeleteExchange(vhost="/", exchange="dst", if_unused=True))
    assert "dst" not in names(d)
    assert [b.source for b in d.sm.bindings("/") if b.source == "src"] == []


def test_bind_errors(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.xdeclare("x"))
    assert d.err(d.bind("q", "nope")) == AmqpError(
        404, "NOT_FOUND - no exchange 'nope' in vhost '/'", 50, 20
    )
    assert d.err(d.bind("nope", "x")) == AmqpError(
        404, "NOT_FOUND - no queue 'nope' in vhost '/'", 50, 20
    )
    # Both missing: the exchange is reported.
    assert "exchange 'nope2'" in d.err(d.bind("nope", "nope2")).reply_text
    for dest, src, missing in [("nope", "x", "nope"), ("x", "nope", "nope")]:
        cmd = c.BindExchange(vhost="/", destination=dest, source=src, routing_key="")
        assert d.err(cmd) == AmqpError(
            404, f"NOT_FOUND - no exchange '{missing}' in vhost '/'", 40, 30
        )


def test_unbind_of_missing_things_is_ok(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.xdeclare("x"))
    assert d.ok(d.unbind("nope", "x")) == Ok()
    assert d.ok(d.unbind("q", "nope")) == Ok()
    assert d.ok(d.unbind("q", "x", "never-bound")) == Ok()
    cmd = c.UnbindExchange(vhost="/", destination="nope", source="x", routing_key="")
    assert d.ok(cmd) == Ok()


def test_binding_is_idempotent_and_keyed_by_arguments(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "amq.direct", "k"))
    d.ok(d.bind("q", "amq.direct", "k"))
    d.ok(d.bind("q", "amq.direct", "k", arguments={"a": 1}))
    explicit = [b for b in d.sm.bindings("/") if b.source == "amq.direct"]
    assert [(b.routing_key, b.arguments) for b in explicit] == [("k", {}), ("k", {"a": 1})]
    # Two bindings, one queue: the message arrives once.
    assert d.ok(d.publish("amq.direct", "k")) == Routed(1)
    assert d.queue("q").messages == 1
    d.ok(d.unbind("q", "amq.direct", "k"))
    assert d.ok(d.publish("amq.direct", "k")) == Routed(1)
    d.ok(d.unbind("q", "amq.direct", "k", arguments={"a": 1}))
    assert d.ok(d.publish("amq.direct", "k")) == Routed(0)


def test_bindings_view_lists_default_bindings_first(d) -> None:
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "amq.topic", "a.*"))
    rows = [
        (b.source, b.destination, b.destination_type, b.routing_key) for b in d.sm.bindings("/")
    ]
    assert rows == [("", "q", "queue", "q"), ("amq.topic", "q", "queue", "a.*")]


def test_auto_delete_exchange_goes_with_its_last_source_binding(d) -> None:
    d.ok(d.xdeclare("ad", auto_delete=True))
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "ad", "a"))
    d.ok(d.bind("q", "ad", "b"))
    d.ok(d.unbind("q", "ad", "a"))
    assert "ad" in names(d)
    d.ok(d.unbind("q", "ad", "b"))
    assert "ad" not in names(d)


def test_auto_delete_exchange_never_bound_stays(d) -> None:
    d.ok(d.xdeclare("ad", auto_delete=True))
    assert "ad" in names(d)


def test_auto_delete_exchange_goes_when_its_queue_goes(d) -> None:
    d.ok(d.xdeclare("ad", "fanout", auto_delete=True))
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "ad"))
    d.ok(c.DeleteQueue(vhost="/", queue="q", owner=1))
    assert "ad" not in names(d)


def test_auto_delete_exchange_as_destination_only_stays(d) -> None:
    d.ok(d.xdeclare("ad", "fanout", auto_delete=True))
    d.ok(d.xdeclare("src", "fanout"))
    d.ok(c.BindExchange(vhost="/", destination="ad", source="src", routing_key=""))
    d.ok(c.UnbindExchange(vhost="/", destination="ad", source="src", routing_key=""))
    assert "ad" in names(d)


def test_auto_delete_cascades_through_exchanges(d) -> None:
    d.ok(d.xdeclare("top", "fanout", auto_delete=True))
    d.ok(d.xdeclare("mid", "fanout", auto_delete=True))
    d.ok(d.declare("q"))
    d.ok(c.BindExchange(vhost="/", destination="mid", source="top", routing_key=""))
    d.ok(d.bind("q", "mid"))
    d.ok(c.DeleteQueue(vhost="/", queue="q", owner=1))
    # mid lost its last binding, then top lost its binding to mid.
    assert "mid" not in names(d)
    assert "top" not in names(d)


def test_exchange_to_exchange_routing_delivers_once(d) -> None:
    d.ok(d.xdeclare("x1", "fanout"))
    d.ok(d.xdeclare("x2", "fanout"))
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "x1"))
    d.ok(d.bind("q", "x2"))
    d.ok(c.BindExchange(vhost="/", destination="x2", source="x1", routing_key=""))
    d.ok(c.BindExchange(vhost="/", destination="x1", source="x2", routing_key=""))  # a cycle
    assert d.ok(d.publish("x1", "k", mandatory=True)) == Routed(1)
    assert d.queue("q").messages == 1


def test_exchange_to_exchange_uses_each_exchange_type(d) -> None:
    d.ok(d.xdeclare("t", "topic"))
    d.ok(d.xdeclare("h", "headers"))
    d.ok(d.declare("q1"))
    d.ok(d.declare("q2"))
    d.ok(c.BindExchange(vhost="/", destination="h", source="t", routing_key="a.#"))
    d.ok(d.bind("q1", "h", arguments={"k": "v"}))
    d.ok(d.bind("q2", "t", "#.z"))
    assert d.ok(d.publish("t", "a.z", headers={"k": "v"})) == Routed(2)
    assert d.ok(d.publish("t", "a.b", headers={"k": "w"})) == Routed(0)
    assert d.ok(d.publish("t", "b.z", headers={"k": "v"})) == Routed(1)
    assert (d.queue("q1").messages, d.queue("q2").messages) == (1, 2)


def test_unbind_exchange_stops_routing(d) -> None:
    d.ok(d.xdeclare("x1", "fanout"))
    d.ok(d.xdeclare("x2", "fanout"))
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "x2"))
    d.ok(c.BindExchange(vhost="/", destination="x2", source="x1", routing_key=""))
    assert d.ok(d.publish("x1", "")) == Routed(1)
    d.ok(c.UnbindExchange(vhost="/", destination="x2", source="x1", routing_key=""))
    assert d.ok(d.publish("x1", "")) == Routed(0)


def test_internal_exchange_refuses_publish_but_routes_from_a_binding(d) -> None:
    d.ok(d.xdeclare("i", "fanout", internal=True))
    d.ok(d.declare("q"))
    d.ok(d.bind("q", "i"))
    assert d.err(d.publish("i", "k")) == AmqpError(
        403, "ACCESS_REFUSED - cannot publish to internal exchange 'i' in vhost '/'", 60, 40
    )
    d.ok(c.BindExchange(vhost="/", destination="i", source="amq.fanout", routing_key=""))
    assert d.ok(d.publish("amq.fanout", "")) == Routed(1)


def test_alternate_exchange_takes_unroutable_messages(d) -> None:
    d.ok(d.xdeclare("ae", "fanout"))
    d.ok(d.xdeclare("x", arguments={"alternate-exchange": "ae"}))
    d.ok(d.declare("q"))
    d.ok(d.declare("lost"))
    d.ok(d.bind("q", "x", "k"))
    d.ok(d.bind("lost", "ae"))
    assert d.ok(d.publish("x", "k", mandatory=True)) == Routed(1)
    assert d.ok(d.publish("x", "other", mandatory=True)) == Routed(1)
    assert (d.queue("q").messages, d.queue("lost").messages) == (1, 1)
    # A missing alternate exchange: unroutable as usual.
    d.ok(d.xdeclare("y", arguments={"alternate-exchange": "missing"}))
    assert d.ok(d.publish("y", "k", mandatory=True)) == Routed(0, returned=True)


def test_alternate_exchange_cycle_terminates(d) -> None:
    d.ok(d.xdeclare("a", arguments={"alternate-exchange": "b"}))
    d.ok(d.xdeclare("b", arguments={"alternate-exchange": "a"}))
    assert d.ok(d.publish("a", "k", mandatory=True)) == Routed(0, returned=True)


def test_headers_binding_validation(d) -> None:
    d.ok(d.declare("q"))
    assert d.err(d.bind("q", "amq.headers", arguments={"x-match": "foo"})) == AmqpError(
        406,
        'PRECONDITION_FAILED - Invalid x-match field value <<"foo">>; expected all, any, '
        "all-with-x, or any-with-x",
        50,
        20,
    )
    assert d.err(d.bind("q", "amq.headers", arguments={"x-match": 5})).reply_text == (
        "PRECONDITION_FAILED - Invalid x-match field type signedint (value 5); expected longstr"
    )
    d.ok(d.bind("q", "amq.headers", arguments={"x-match": "any-with-x"}))


def test_unknown_vhost_is_refused(d) -> None:
    error = d.err(d.xdeclare("x", vhost="other"))
    assert error.reply_code == 530
    assert error.connection
    assert not d.sm.vhost_exists("other")
    assert d.sm.vhost_exists("/")
