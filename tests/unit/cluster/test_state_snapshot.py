"""snapshot() / restore(): versioned JSON, exact field values, same observable state."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import commands as c
from cluster.state import StateMachine
from node.broker import args
from node.broker.snapshot import SnapshotError, decode_value, encode_value
from node.broker.types import ChannelRef, GetOk, Properties, QueueDeclared, Routed


def test_empty_round_trip() -> None:
    sm = StateMachine()
    data = sm.snapshot()
    assert json.loads(data)["version"] == 1
    again = StateMachine.restore(data)
    assert again.snapshot() == data
    assert [x.name for x in again.exchanges("/")] == [x.name for x in sm.exchanges("/")]


def test_topology_messages_and_ids_survive(d) -> None:
    d.ok(d.xdeclare("t", "topic", durable=True, arguments={"alternate-exchange": "ae"}))
    d.ok(d.xdeclare("ae", "fanout", auto_delete=True, internal=True))
    d.ok(d.declare("q", durable=True, arguments={"x-max-length": 9, "x-foo": [1, "a"]}))
    d.ok(d.declare("lost"))
    d.ok(d.bind("q", "t", "a.#"))
    d.ok(d.bind("lost", "ae"))
    d.ok(c.BindExchange(vhost="/", destination="ae", source="amq.direct", routing_key="k"))
    d.ok(d.publish("t", "a.b", b"one", headers={"h": Decimal("1.5"), "b": b"\x00\xff"}))
    d.ok(d.publish("t", "zzz", b"two"))
    restored = StateMachine.restore(d.sm.snapshot())
    assert list(restored.exchanges("/")) == list(d.sm.exchanges("/"))
    assert list(restored.bindings("/")) == list(d.sm.bindings("/"))
    assert list(restored.queues("/")) == list(d.sm.queues("/"))
    assert restored.total_message_bytes == d.sm.total_message_bytes == 6
    got = restored.apply(d.get("q")).reply
    assert isinstance(got, GetOk)
    assert got.message.props.headers == {"h": Decimal("1.5"), "b": b"\x00\xff"}
    assert (got.message.exchange, got.message.routing_key, got.message.body) == ("t", "a.b", b"one")
    # Routing works in the restored machine, and message ids keep increasing.
    assert restored.apply(d.publish("amq.direct", "k")).reply == Routed(1)
    d.ok(d.publish("amq.direct", "k"))
    ids = [restored.apply(d.get("lost", no_ack=True)).reply.message.id for _ in range(2)]
    assert ids[0] < ids[1]
    assert ids == [d.ok(d.get("lost", no_ack=True)).message.id for _ in range(2)]


def test_unacked_messages_come_back_ready_and_redelivered(d) -> None:
    d.ok(d.declare("q"))
    for body in (b"a", b"b", b"c"):
        d.ok(d.publish("", "q", body))
    d.ok(d.consume("q", "t"))
    d.ok(d.ack(2))
    restored = type(d)(StateMachine.restore(d.sm.snapshot()))
    assert restored.drain("q") == [(b"a", True), (b"c", True)]
    assert restored.sm.channel_unacked(d.ch()) == 0
    assert restored.queue("q").consumers == 0


def test_exclusive_ownership_survives(d) -> None:
    d.ok(d.declare("q", conn=7, exclusive=True))
    restored = StateMachine.restore(d.sm.snapshot())
    out = restored.apply(d.declare("q", conn=8, passive=True))
    assert out.reply.reply_code == 405  # type: ignore[union-attr]
    restored.apply(c.CloseConnection(conn=7))
    assert not restored.queue_exists("/", "q")


def test_restore_refuses_garbage() -> None:
    for data in (
        b"",
        b"[]",
        b'{"format": "other"}',
        b"\xff",
        b'{"format":"warren-state","version":99}',
    ):
        with pytest.raises(SnapshotError):
            StateMachine.restore(data)


field_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.datetimes(min_value=datetime.datetime(1970, 1, 2)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(field_values)
def test_field_values_round_trip_exactly(value: Any) -> None:
    encoded = json.loads(json.dumps(encode_value(value)))
    assert args.freeze(decode_value(encoded)) == args.freeze(value)


def test_properties_bytes_preserved() -> None:
    sm = StateMachine()
    sm.apply(c.DeclareQueue(vhost="/", queue="q", owner=1))
    raw = bytes(range(256))
    sm.apply(
        c.Publish(
            channel=ChannelRef(1, 1),
            vhost="/",
            exchange="",
            routing_key="q",
            mandatory=False,
            properties=raw,
            props=Properties(delivery_mode=2, priority=3, expiration="60000"),
            body=b"",
            now_ms=123,
        )
    )
    restored = StateMachine.restore(sm.snapshot())
    got = restored.apply(c.Get(channel=ChannelRef(1, 1), vhost="/", queue="q")).reply
    assert isinstance(got, GetOk)
    assert got.message.properties == raw
    assert got.message.props == Properties(delivery_mode=2, priority=3, expiration="60000")
    assert got.message.published_ms == 123
    assert restored.apply(c.DeclareQueue(vhost="/", queue="q", owner=1)).reply == QueueDeclared(
        "q", 0, 0
    )
