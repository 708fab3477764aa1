"""cluster.wire: every node-link message round-trips exactly (unicode names, lone
surrogates, empty and large bodies), and anything malformed (empty, unknown kind,
truncated, garbage) raises `WireError`, never another exception."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic

from cluster import commands as c
from cluster import wire
from node.broker.types import (
    AmqpError,
    ChannelRef,
    ConsumeOk,
    Count,
    GetEmpty,
    GetOk,
    Message,
    Ok,
    Properties,
    QueueDeclared,
    Reply,
)
from node.protocol.codec import encode_properties, peek_properties

# ---- strategies ----------------------------------------------------------------------------

# Any code point, lone surrogates included (the link carries them with surrogatepass).
TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from("\ud800\udfff\x00é€😀"), max_size=12)
NAME = TEXT
I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)
REFS = st.builds(ChannelRef, I64, st.integers(0, 65535))
SMALL_BODIES = st.binary(max_size=64)
# Now and then one past 64 KiB (no 16-bit length may hide in the body's framing).
BODIES = SMALL_BODIES | st.integers(65_530, 70_000).map(lambda n: b"\xa5" * n)
RAW_PROPERTIES = st.one_of(
    st.just(b"\x00\x00"),
    st.builds(
        lambda mode, priority, expiration, headers, ctype: encode_properties(
            Basic.Properties(
                delivery_mode=mode,
                priority=priority,
                expiration=expiration,
                headers=headers,
                content_type=ctype,
            )
        ),
        st.sampled_from((None, 1, 2)),
        st.none() | st.integers(0, 9),
        st.none() | st.integers(0, 10**6).map(str),
        st.none() | st.dictionaries(st.text(max_size=5), st.integers(0, 100), max_size=3),
        st.none() | st.sampled_from(("text/plain", "application/json")),
    ),
)


def message_of(exchange: str, routing_key: str, raw: bytes, body: bytes) -> Message:
    return Message(17, exchange, routing_key, raw, Properties(*peek_properties(raw)), body)


def messages(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[Message]:
    return st.builds(message_of, NAME, NAME, RAW_PROPERTIES, bodies)


def publishes(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[c.Publish]:
    return st.builds(
        lambda ref, vhost, exchange, key, mandatory, raw, body, now: c.Publish(
            channel=ref,
            vhost=vhost,
            exchange=exchange,
            routing_key=key,
            mandatory=mandatory,
            properties=raw,
            props=Properties(*peek_properties(raw)),
            body=body,
            now_ms=now,
        ),
        REFS,
        NAME,
        NAME,
        NAME,
        st.booleans(),
        RAW_PROPERTIES,
        bodies,
        I64,
    )


LINK_COMMANDS = st.one_of(
    publishes(SMALL_BODIES),
    st.builds(lambda ref, tag: c.Cancel(channel=ref, consumer_tag=tag), REFS, NAME),
    st.builds(lambda ref: c.CloseChannel(channel=ref), REFS),
    st.builds(lambda conn: c.CloseConnection(conn=conn), I64),
    st.builds(
        lambda ref, t, m: c.Ack(channel=ref, delivery_tag=t, multiple=m), REFS, U64, st.booleans()
    ),
    st.builds(
        lambda ref, vh, q, tag, na, args: c.Consume(
            channel=ref, vhost=vh, queue=q, consumer_tag=tag, no_ack=na, arguments=args
        ),
        REFS,
        NAME,
        NAME,
        NAME,
        st.booleans(),
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    ),
    st.builds(
        lambda q: c.DeleteQueue(vhost="/", queue=q, owner=1, if_unused=True, if_empty=True),
        NAME,
    ),
    st.builds(
        lambda ref, n, g: c.Qos(channel=ref, prefetch_count=n, global_=g),
        REFS,
        st.integers(0, 65535),
        st.booleans(),
    ),
)
REPLIES: st.SearchStrategy[Reply] = st.one_of(
    st.just(Ok()),
    st.builds(
        AmqpError,
        st.integers(0, 65535),
        TEXT,
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.booleans(),
    ),
    st.builds(Count, U64),
    st.builds(ConsumeOk, NAME),
    st.just(GetEmpty()),
    st.builds(QueueDeclared, NAME, U64, U64),
)
IDS = st.lists(st.binary(max_size=40), max_size=6).map(tuple)


def enqueue_msg(seq: int, queues: tuple[str, ...], publish: c.Publish) -> tuple[bytes, Any]:
    # mandatory stays with the origin (it routes, so it returns); the leader gets False.
    expected = dataclasses.replace(publish, mandatory=False)
    return wire.enqueue(seq, queues, publish), wire.Enqueue(seq, queues, expected)


def confirm_msg(ref: ChannelRef, seq: int, ok: bool) -> tuple[bytes, Any]:
    return wire.confirm(ref, seq, ok), wire.Confirm(ref, seq, ok)


def delivery_msg(
    ref: ChannelRef, tag: str, dtag: int, redelivered: bool, no_ack: bool, vh: str, q: str, m: Any
) -> tuple[bytes, Any]:
    expected = wire.Delivery(
        ref, tag, dtag, redelivered, no_ack, vh, q, m.exchange, m.routing_key, m.properties, m.body
    )
    return wire.delivery(ref, tag, dtag, redelivered, no_ack, vh, q, m), expected


def command_msg(cmd: c.AnyCommand) -> tuple[bytes, Any]:
    return wire.command(cmd), wire.CommandMsg(cmd)


def request_msg(rid: int, cmd: c.AnyCommand) -> tuple[bytes, Any]:
    return wire.request(rid, cmd), wire.Request(rid, cmd)


def response_msg(rid: int, reply: Reply) -> tuple[bytes, Any]:
    return wire.response(rid, reply), wire.Response(rid, reply)


def applied_msg(ids: tuple[bytes, ...]) -> tuple[bytes, Any]:
    return wire.applied(ids), wire.Applied(ids)


def cancel_msg(ref: ChannelRef, tag: str) -> tuple[bytes, Any]:
    return wire.cancel(ref, tag), wire.CancelNotify(ref, tag)


def encoded(bodies: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, Any]]:
    """(bytes, the message they decode to) of every kind."""
    return st.one_of(
        st.builds(enqueue_msg, U64, st.lists(NAME, max_size=4).map(tuple), publishes(bodies)),
        st.builds(confirm_msg, REFS, U64, st.booleans()),
        st.builds(
            delivery_msg,
            REFS,
            NAME,
            U64,
            st.booleans(),
            st.booleans(),
            NAME,
            NAME,
            messages(bodies),
        ),
        st.builds(command_msg, LINK_COMMANDS),
        st.builds(request_msg, U64, LINK_COMMANDS),
        st.builds(response_msg, U64, REPLIES),
        st.builds(response_msg, U64, st.builds(GetOk, U64, st.booleans(), U64, messages(bodies))),
        st.builds(applied_msg, IDS),
        st.builds(cancel_msg, REFS, NAME),
        st.just((wire.reset(), wire.Reset())),
        st.just((wire.ready(), wire.Ready())),
    )


def same_message(got: Message, sent: Message) -> None:
    """What a link message keeps of a message (the id and timestamps stay behind)."""
    assert (got.exchange, got.routing_key, got.properties, got.body) == (
        sent.exchange,
        sent.routing_key,
        sent.properties,
        sent.body,
    )
    assert got.props == sent.props


def same(got: Any, expected: Any) -> None:
    if isinstance(expected, wire.Response) and isinstance(expected.reply, GetOk):
        assert isinstance(got, wire.Response)
        assert got.request_id == expected.request_id
        assert isinstance(got.reply, GetOk)
        sent = expected.reply
        assert (got.reply.delivery_tag, got.reply.redelivered, got.reply.message_count) == (
            sent.delivery_tag,
            sent.redelivered,
            sent.message_count,
        )
        same_message(got.reply.message, sent.message)
        return
    assert type(got) is type(expected)
    assert got == expected


# ---- round trips ---------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded(BODIES))
def test_every_message_round_trips(case: tuple[bytes, Any]) -> None:
    data, expected = case
    assert data[0] in range(wire.ENQUEUE, wire.READY + 1)
    same(wire.decode(data), expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        confirm_msg(ChannelRef(-1, 0), 0, False),
        confirm_msg(ChannelRef(2**63 - 1, 65535), 2**64 - 1, True),
        cancel_msg(ChannelRef(1, 2), ""),
        cancel_msg(ChannelRef(1, 2), "amq.ctag-\ud800-é"),
        applied_msg(()),
        applied_msg((b"", b"\x00", b"node\x00" + b"9" * 200)),
        command_msg(c.Recover(channel=ChannelRef(1, 1))),
        request_msg(0, c.Get(channel=ChannelRef(1, 1), vhost="/", queue="q", no_ack=True)),
        (wire.reset(), wire.Reset()),
        (wire.ready(), wire.Ready()),
    ],
)
def test_examples_round_trip(data: bytes, expected: Any) -> None:
    same(wire.decode(data), expected)


@pytest.mark.parametrize(
    "reply",
    [
        Ok(),
        AmqpError(404, "NOT_FOUND - no queue 'q' in vhost '/'", 50, 10, False),
        AmqpError(530, "NOT_ALLOWED - vhost x not found", 50, 10, True),
        AmqpError(406, ""),
        Count(0),
        Count(2**64 - 1),
        ConsumeOk("amq.ctag-1"),
        ConsumeOk(""),
        GetEmpty(),
        QueueDeclared("", 0, 0),
        QueueDeclared("q-é", 5, 1),
    ],
    ids=repr,
)
def test_every_reply_kind_round_trips(reply: Reply) -> None:
    got = wire.decode(wire.response(42, reply))
    assert got == wire.Response(42, reply)


def test_empty_and_large_bodies() -> None:
    ref = ChannelRef(7, 3)
    for body in (b"", b"\x00", bytes(range(256)) * 4096 + b"tail"):  # up to 1 MiB
        m = message_of("ex", "rk", b"\x00\x00", body)
        data, expected = delivery_msg(ref, "t", 1, False, True, "/", "q", m)
        same(wire.decode(data), expected)
        data, expected = response_msg(1, GetOk(1, True, 3, m))
        same(wire.decode(data), expected)
        publish = c.Publish(
            channel=ref,
            vhost="/",
            exchange="",
            routing_key="q",
            mandatory=False,
            properties=b"\x00\x00",
            props=Properties(),
            body=body,
        )
        data, expected = enqueue_msg(1, ("q",), publish)
        same(wire.decode(data), expected)


def test_delivered_message_rebuilds_the_message() -> None:
    raw = encode_properties(Basic.Properties(delivery_mode=2, priority=3, headers={"h": 1}))
    m = message_of("ex", "rk", raw, b"body")
    data, _ = delivery_msg(ChannelRef(1, 1), "t", 5, True, False, "/", "q", m)
    decoded = wire.decode(data)
    assert isinstance(decoded, wire.Delivery)
    rebuilt = wire.delivered_message(decoded)
    same_message(rebuilt, m)
    assert rebuilt.props == Properties(2, 3, None, {"h": 1})


def test_enqueue_keeps_the_publish_exactly() -> None:
    raw = encode_properties(Basic.Properties(expiration="500", headers={"k": "v"}))
    publish = c.Publish(
        channel=ChannelRef(3, 9),
        vhost="vh",
        exchange="amq.topic",
        routing_key="a.b",
        mandatory=True,
        properties=raw,
        props=Properties(*peek_properties(raw)),
        body=b"x",
        now_ms=123,
    )
    decoded = wire.decode(wire.enqueue(4, ("q1", "q2"), publish))
    assert decoded == wire.Enqueue(4, ("q1", "q2"), dataclasses.replace(publish, mandatory=False))
    moved = wire.decode(wire.enqueue(0, ("q1",), publish, redelivered=True))
    assert isinstance(moved, wire.Enqueue)
    assert moved.redelivered
    assert isinstance(decoded, wire.Enqueue)
    assert decoded.publish.props == publish.props


# ---- malformed input -------------------------------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(wire.WireError):
        wire.decode(b"")


@pytest.mark.parametrize("kind", [0, 11, 12, 100, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(wire.WireError, match="unknown"):
        wire.decode(bytes((kind,)) + b"\x00" * 40)


@pytest.mark.parametrize("kind", [7, 8, 100, 255])
def test_unknown_reply_kind(kind: int) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(wire.response(1, Ok())[:-1] + bytes((kind,)))


def test_response_without_a_reply() -> None:
    with pytest.raises(wire.WireError):
        wire.decode(wire.response(1, Ok())[:-1])


def test_a_command_that_does_not_decode() -> None:
    for data in (bytes((wire.COMMAND,)), bytes((wire.COMMAND, 99, 99, 0)), b"\x05" + b"\x00" * 8):
        with pytest.raises(wire.WireError):
            wire.decode(data)


def _publish() -> c.Publish:
    return c.Publish(
        channel=ChannelRef(1, 1),
        vhost="/",
        exchange="",
        routing_key="q",
        mandatory=False,
        properties=b"\x00\x00",
        props=Properties(),
        body=b"body",
    )


def _message() -> Message:
    return message_of("ex", "rk", b"\x00\x00", b"body")


ALL_LENGTHS_KNOWN = {
    # Every byte of these is accounted for by a length or a fixed size: any strict prefix
    # is detectably truncated.
    "enqueue": enqueue_msg(5, ("q1", "q2"), _publish())[0],
    "confirm": wire.confirm(ChannelRef(3, 4), 7, True),
    "command": wire.command(c.Cancel(channel=ChannelRef(3, 4), consumer_tag="t")),
    "request": wire.request(11, c.Get(channel=ChannelRef(3, 4), vhost="/", queue="q")),
    "applied": wire.applied((b"id1", b"id22")),
    "cancel": wire.cancel(ChannelRef(3, 4), "ctag"),
    "count": wire.response(3, Count(5)),
    "declared-head": wire.response(3, QueueDeclared("", 1, 2)),
}


@pytest.mark.parametrize("name", sorted(ALL_LENGTHS_KNOWN))
def test_every_truncation_is_a_wire_error(name: str) -> None:
    data = ALL_LENGTHS_KNOWN[name]
    wire.decode(data)
    for n in range(len(data)):
        with pytest.raises(wire.WireError):
            wire.decode(data[:n])


@pytest.mark.parametrize(
    "data",
    [
        wire.delivery(ChannelRef(3, 4), "ctag", 9, True, False, "/", "q", _message()),
        wire.response(3, GetOk(1, False, 0, _message())),
    ],
    ids=["delivery", "get-ok"],
)
def test_truncation_before_the_body_is_a_wire_error(data: bytes) -> None:
    """The body runs to the end (its size is the frame's), but every field before it has
    a declared length: cutting into them is a truncation."""
    body_start = len(data) - len(b"body")
    for n in range(body_start):
        with pytest.raises(wire.WireError):
            wire.decode(data[:n])


def test_trailing_bytes_are_a_wire_error() -> None:
    """Strict decoding: bytes after a message whose size its own fields fix are
    malformed, as ENQUEUE, COMMAND and REQUEST (through the codec) already say."""
    fixed_size = {
        "enqueue": enqueue_msg(5, ("q1",), _publish())[0],
        "command": wire.command(c.Tick()),
        "request": wire.request(1, c.Tick()),
        "confirm": wire.confirm(ChannelRef(3, 4), 7, True),
        "applied": wire.applied((b"id",)),
        "cancel": wire.cancel(ChannelRef(3, 4), "ctag"),
        "reset": wire.reset(),
        "ready": wire.ready(),
        "count": wire.response(3, Count(5)),
        "get-empty": wire.response(3, GetEmpty()),
        "ok": wire.response(3, Ok()),
    }
    accepted = []
    for name, data in fixed_size.items():
        try:
            wire.decode(data + b"\x00")
        except wire.WireError:
            continue
        accepted.append(name)
    assert accepted == []


def test_get_ok_with_a_malformed_property_block_is_a_wire_error() -> None:
    bad = Message(0, "ex", "rk", b"\x80\x00", Properties(), b"body")  # flags, no value
    with pytest.raises(wire.WireError):
        wire.decode(wire.response(3, GetOk(1, False, 0, bad)))


def test_invalid_utf8_names_are_a_wire_error() -> None:
    data = bytearray(wire.cancel(ChannelRef(1, 1), "ab"))
    data[-2:] = b"\xc3\x28"
    with pytest.raises(wire.WireError):
        wire.decode(bytes(data))


@settings(max_examples=200, deadline=None, report_multiple_bugs=False)
@given(st.binary(max_size=24))
def test_a_get_ok_with_any_property_block_is_decoded_or_a_wire_error(raw: bytes) -> None:
    m = Message(0, "ex", "rk", raw, Properties(), b"body")
    _never_raises_other(wire.response(3, GetOk(1, False, 0, m)))


def _never_raises_other(data: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_never_raise_anything_but_wire_error(data: bytes) -> None:
    _never_raises_other(data)


@settings(max_examples=250, deadline=None)
@given(
    st.sampled_from(range(wire.ENQUEUE, wire.READY + 1)),
    st.sampled_from(range(7)),
    st.binary(max_size=60),
)
def test_random_bodies_of_every_kind_never_raise_anything_but_wire_error(
    kind: int, reply_kind: int, rest: bytes
) -> None:
    _never_raises_other(bytes((kind,)) + rest)
    # Responses: request id, then a reply kind and its random remains.
    _never_raises_other(bytes((wire.RESPONSE,)) + rest[:8].ljust(8, b"\x00") + bytes((reply_kind,)))
    _never_raises_other(bytes((wire.RESPONSE,)) + b"\x00" * 8 + bytes((reply_kind,)) + rest)


@settings(
    max_examples=200,
    deadline=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a fuzz: no slow shrinking
    suppress_health_check=[HealthCheck.too_slow],
)
@given(encoded(SMALL_BODIES), st.data())
def test_damaged_messages_never_raise_anything_but_wire_error(
    case: tuple[bytes, Any], data: st.DataObject
) -> None:
    raw = bytearray(case[0])
    cut = data.draw(st.integers(0, len(raw)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
    for pos, value in flips:
        if raw:
            raw[pos % len(raw)] = value
    _never_raises_other(bytes(raw[:cut]))
    _never_raises_other(bytes(raw))
