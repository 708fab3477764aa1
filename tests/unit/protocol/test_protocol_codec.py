"""node.protocol.codec/methods/fields: every fast path equals pamqp, the decoder is stream-safe,
and malformed frames raise the error RabbitMQ 3.10 sends (texts checked on a real broker)."""

from __future__ import annotations

import datetime
import decimal
import struct
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import base, commands, header
from pamqp import body as pbody
from pamqp import frame as pframe

from node.protocol.codec import (
    AMQP_HEADER,
    HEARTBEAT_FRAME,
    AckMethod,
    ContentBody,
    ContentHeader,
    DeliverWriter,
    FrameDecoder,
    Heartbeat,
    MethodFrame,
    ProtocolHeader,
    PublishMethod,
    ack_method,
    decode_properties,
    encode_ack,
    encode_content,
    encode_deliver,
    encode_method,
    encode_properties,
    peek_properties,
)
from node.protocol.constants import FRAME_ERROR, NOT_IMPLEMENTED
from node.protocol.errors import (
    BadProtocolHeader,
    PropertiesError,
    ProtocolError,
    clip_reply_text,
    erl_p,
    erl_w,
)
from node.protocol.events import ChannelContent, ChannelMethod, channel_content, channel_method
from node.protocol.fields import FieldError, encode_table, table_from_bytes
from node.protocol.methods import METHODS, AccessRequest, decode_method, encode_arguments

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies ------------------------------------------------------------------------------

# Names pamqp's validators accept (the oracle must not refuse them).
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_.:@#,/+ ", max_size=60)
TEXT = st.text(max_size=60)  # any unicode: at most 240 UTF-8 bytes
TAG = st.integers(0, 2**63 - 1)


def _sorted_tables(value: Any) -> Any:
    """pamqp writes table keys sorted; we keep the caller's order. Sort for byte equality."""
    if isinstance(value, dict):
        return {k: _sorted_tables(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_sorted_tables(v) for v in value]
    return value


SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    TEXT,
    st.none(),
    st.binary(max_size=20).map(bytearray),
    st.integers(0, 0xFFFFFFFF).map(lambda s: datetime.datetime.fromtimestamp(s, tz=datetime.UTC)),
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-1000, max_value=1000),
)
KEYS = st.text(max_size=12)
TABLES = st.recursive(
    st.dictionaries(KEYS, SCALARS, max_size=4),
    lambda inner: st.dictionaries(
        KEYS, st.one_of(SCALARS, inner, st.lists(SCALARS, max_size=3)), max_size=4
    ),
    max_leaves=12,
).map(_sorted_tables)


def _value_for(kind: str) -> st.SearchStrategy[Any]:
    return {
        "bit": st.booleans(),
        "octet": st.integers(0, 255),
        "short": st.integers(0, 65535),
        "long": st.integers(0, 2**32 - 1),
        "longlong": TAG,
        "shortstr": TEXT,
        "longstr": TEXT,
        "table": TABLES,
    }[kind]


@st.composite
def any_method(draw: st.DrawFn) -> base.Frame:
    cls = draw(st.sampled_from(sorted(commands.INDEX_MAPPING.values(), key=lambda c: c.index)))
    method = cls.__new__(cls)
    for name in cls.__slots__:
        setattr(method, name, draw(_value_for(cls.amqp_type(name))))
    return method


def _pamqp_marshal(channel: int, method: base.Frame) -> bytes:
    """pamqp's encoding with its validators off (they refuse names RabbitMQ allows)."""
    method.validate = lambda: None  # type: ignore[method-assign]
    try:
        return pframe.marshal(method, channel)
    finally:
        del method.validate


def _as_dict(method: base.Frame) -> dict[str, Any]:
    return {name: getattr(method, name) for name in type(method).__slots__}


@st.composite
def basic_properties(draw: st.DrawFn) -> commands.Basic.Properties:
    maybe = lambda s: draw(st.one_of(st.none(), s))  # noqa: E731
    return commands.Basic.Properties(
        content_type=maybe(NAME),
        content_encoding=maybe(NAME),
        headers=maybe(TABLES),
        delivery_mode=maybe(st.sampled_from([1, 2])),
        priority=maybe(st.integers(0, 255)),
        correlation_id=maybe(TEXT),
        reply_to=maybe(TEXT),
        expiration=maybe(st.integers(0, 10**9).map(str)),
        message_id=maybe(TEXT),
        timestamp=maybe(
            st.integers(0, 0xFFFFFFFF).map(
                lambda s: datetime.datetime.fromtimestamp(s, tz=datetime.UTC)
            )
        ),
        message_type=maybe(TEXT),
        user_id=maybe(TEXT),
        app_id=maybe(TEXT),
    )


def _pamqp_decode_properties(raw: bytes) -> commands.Basic.Properties:
    content = header.ContentHeader()
    content.unmarshal(struct.pack(">HHQ", 60, 0, 0) + raw)
    return content.properties


def _decode_all(data: bytes, frame_max: int = 131072, chunks: list[int] | None = None) -> list[Any]:
    """Every frame in `data`, fed whole or in the given chunk sizes; methods normalised."""
    decoder = FrameDecoder(frame_max=frame_max, expect_protocol_header=data.startswith(b"AMQP"))
    out: list[Any] = []
    pieces = [data]
    if chunks is not None:
        pieces, rest = [], data
        for size in chunks:
            pieces.append(rest[:size])
            rest = rest[size:]
        pieces.append(rest)
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            if isinstance(frame, MethodFrame):
                out.append((frame.channel, frame.method.name, _as_dict(frame.method)))
            else:
                out.append(frame)
    assert decoder.buffered == 0
    return out


def _raw(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + end


# ---- fast paths equal pamqp ----------------------------------------------------------------


@SETTINGS
@given(
    channel=st.integers(0, 65535),
    exchange=TEXT,
    routing_key=TEXT,
    mandatory=st.booleans(),
    immediate=st.booleans(),
)
def test_publish_decode_equals_pamqp(
    channel: int, exchange: str, routing_key: str, mandatory: bool, immediate: bool
) -> None:
    method = commands.Basic.Publish(0, "", routing_key, mandatory, immediate)
    method.exchange = exchange
    data = _pamqp_marshal(channel, method)
    _, _, oracle = pframe.unmarshal(data)
    assert _decode_all(data) == [
        PublishMethod(
            channel, oracle.exchange, oracle.routing_key, oracle.mandatory, oracle.immediate
        )
    ]


def test_publish_names_that_are_not_utf8_are_replaced() -> None:
    # RabbitMQ does not check publish names for UTF-8 (it answers 404 for such an exchange).
    data = _raw(1, 1, b"\x00\x3c\x00\x28\x00\x00\x01\xff\x02a\xfe\x03")
    assert _decode_all(data) == [PublishMethod(1, "\ufffd", "a\ufffd", True, True)]


def test_publish_reserved_bits_and_ticket_are_ignored() -> None:
    data = _raw(1, 1, b"\x00\x3c\x00\x28\x00\x07\x00\x01q\xfc")
    assert _decode_all(data) == [PublishMethod(1, "", "q", False, False)]


@SETTINGS
@given(channel=st.integers(0, 65535), tag=TAG, multiple=st.booleans())
def test_ack_decode_and_encode_equal_pamqp(channel: int, tag: int, multiple: bool) -> None:
    data = pframe.marshal(commands.Basic.Ack(tag, multiple), channel)
    assert encode_ack(channel, tag, multiple) == data
    assert _decode_all(data) == [AckMethod(channel, tag, multiple)]
    assert ack_method(channel, tag, multiple) == AckMethod(channel, tag, multiple)


@SETTINGS
@given(
    channel=st.integers(1, 65535),
    consumer_tag=TEXT,
    tag=TAG,
    redelivered=st.booleans(),
    exchange=TEXT,
    routing_key=TEXT,
    props=basic_properties(),
    body=st.binary(max_size=3000),
    frame_max=st.sampled_from([0, 4096, 4097, 131072]),
)
def test_deliver_encode_equals_pamqp(
    channel: int,
    consumer_tag: str,
    tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    props: commands.Basic.Properties,
    body: bytes,
    frame_max: int,
) -> None:
    body = body * 3  # long enough to need several frames at 4096
    raw_props = props.marshal()
    method = commands.Basic.Deliver(consumer_tag, tag, redelivered, "", routing_key)
    method.exchange = exchange
    expected = _pamqp_marshal(channel, method)
    expected += pframe.marshal(header.ContentHeader(0, len(body), props), channel)
    room = frame_max - 8 if frame_max else max(len(body), 1)
    for start in range(0, len(body), room):
        expected += pframe.marshal(pbody.ContentBody(body[start : start + room]), channel)
    got = encode_deliver(
        channel, consumer_tag, tag, redelivered, exchange, routing_key, raw_props, body, frame_max
    )
    assert got == expected
    # DeliverWriter appends the same bytes, first call and cached call alike
    writer = DeliverWriter()
    out = bytearray(b"prefix")
    for _ in range(2):
        writer.write(
            out,
            channel,
            consumer_tag,
            tag,
            redelivered,
            exchange,
            routing_key,
            raw_props,
            body,
            frame_max,
        )
    assert out == b"prefix" + expected + expected
    # and encode_content (the generic path) makes the same bytes
    assert encode_content(channel, method, raw_props, body, frame_max) == expected


def test_deliver_writer_cache_is_bounded_and_keyed_by_every_name() -> None:
    writer = DeliverWriter()
    for i in range(3000):
        out = bytearray()
        writer.write(out, 1 + i % 3, f"c{i % 7}", i, i % 2 == 1, "x", f"k{i}", b"\x00\x00", b"b", 0)
        assert out == encode_deliver(
            1 + i % 3, f"c{i % 7}", i, i % 2 == 1, "x", f"k{i}", b"\x00\x00", b"b", 0
        )
        assert len(writer._cache) <= 1024


def test_empty_body_has_no_body_frame() -> None:
    data = encode_deliver(1, "c", 1, False, "", "q", b"\x00\x00", b"", 131072)
    frames = _decode_all(data)
    assert len(frames) == 2
    assert frames[0][:2] == (1, "Basic.Deliver")
    assert frames[1] == ContentHeader(1, 60, 0, b"\x00\x00")


@SETTINGS
@given(props=basic_properties())
def test_peek_properties_equals_pamqp(props: commands.Basic.Properties) -> None:
    raw = props.marshal()
    oracle = _pamqp_decode_properties(raw)
    delivery_mode = 1 if oracle.delivery_mode is None else oracle.delivery_mode
    assert peek_properties(raw) == (
        delivery_mode,
        oracle.priority,
        oracle.expiration,
        oracle.headers,
    )


@SETTINGS
@given(props=basic_properties())
def test_decode_properties_equals_pamqp_and_round_trips(props: commands.Basic.Properties) -> None:
    raw = props.marshal()
    decoded = decode_properties(raw)
    assert decoded == _pamqp_decode_properties(raw)
    assert encode_properties(decoded) == raw  # tables were generated key-sorted, no floats


def test_empty_properties() -> None:
    assert peek_properties(b"\x00\x00") == (1, None, None, None)
    assert decode_properties(b"\x00\x00") == commands.Basic.Properties()
    assert encode_properties(commands.Basic.Properties()) == b"\x00\x00"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x20\x00\x00\x00\x00\x10",  # headers table longer than the block
        b"\x10\x00",  # delivery mode flagged, missing
        b"\x10\x00\x02zz",  # trailing bytes
        b"\x80\x00\x05ab",  # shortstr overruns
        b"\x00\x40\x00\x00\x00\x01",  # timestamp cut short
        b"\x20\x00\x00\x00\x00\x03\x01kZ",  # unknown field type in headers
    ],
)
def test_malformed_properties_raise_internal_error(raw: bytes) -> None:
    # RabbitMQ's channel crashes on these: the client sees connection.close 541 INTERNAL_ERROR
    with pytest.raises(PropertiesError) as info:
        peek_properties(raw)
    assert (info.value.reply_code, info.value.reply_text) == (541, "INTERNAL_ERROR")
    with pytest.raises(PropertiesError):
        decode_properties(raw)


def test_properties_keep_odd_values_rabbitmq_accepts() -> None:
    assert peek_properties(b"\x10\x00\x07") == (7, None, None, None)  # the channel says 406
    assert decode_properties(b"\x80\x00\x02\xff\xfe").content_type == "\ufffd\ufffd"
    assert peek_properties(b"\x00\x01\x00\x00") == (1, None, None, None)  # continuation word


# ---- every other method: generic codec equals pamqp ------------------------------------------


@SETTINGS
@given(method=any_method(), channel=st.integers(0, 65535))
def test_method_codec_equals_pamqp(method: base.Frame, channel: int) -> None:
    expected = _pamqp_marshal(channel, method)
    assert encode_method(channel, method) == expected
    with warnings.catch_warnings():  # pamqp warns when it builds basic.recover-async
        warnings.simplefilter("ignore", DeprecationWarning)
        _, _, oracle = pframe.unmarshal(expected)
    frames = _decode_all(expected)
    if isinstance(method, commands.Basic.Publish):
        assert frames == [
            PublishMethod(
                channel, oracle.exchange, oracle.routing_key, oracle.mandatory, oracle.immediate
            )
        ]
    elif isinstance(method, commands.Basic.Ack):
        assert frames == [AckMethod(channel, oracle.delivery_tag, oracle.multiple)]
    else:
        assert frames == [(channel, method.name, _as_dict(oracle))]


def test_every_spec_method_is_known() -> None:
    assert set(commands.INDEX_MAPPING) <= set(METHODS)
    assert METHODS[0x001E000A] is AccessRequest


def test_access_request_decodes() -> None:
    data = _raw(1, 1, b"\x00\x1e\x00\x0a\x05/data\x1d")
    [(channel, name, args)] = _decode_all(data)
    assert (channel, name) == (1, "Access.Request")
    assert args == {
        "realm": "/data",
        "exclusive": True,
        "passive": False,
        "active": True,
        "write": True,
        "read": True,
    }
    assert encode_arguments(AccessRequest("/data", True, False, True, True, True)) == data[7:-1]


def test_encode_never_validates_names() -> None:
    # pamqp refuses exchange names outside [a-zA-Z0-9-_.:@#,/+ ]; RabbitMQ allows any UTF-8
    method = commands.Basic.Deliver.__new__(commands.Basic.Deliver)
    for name, value in [
        ("consumer_tag", "c"),
        ("delivery_tag", 1),
        ("redelivered", False),
        ("exchange", "é x"),
        ("routing_key", "k"),
    ]:
        setattr(method, name, value)
    assert (
        encode_method(1, method)[7:-1]
        == b"\x00\x3c\x00\x3c\x01c" + struct.pack(">Q", 1) + b"\x00\x04\xc3\xa9 x\x01k"
    )


# ---- field tables ------------------------------------------------------------------------------


@SETTINGS
@given(table=TABLES)
def test_table_codec_equals_pamqp(table: dict[str, Any]) -> None:
    from pamqp import decode, encode

    data = encode.field_table(table)
    assert encode_table(table) == data
    assert table_from_bytes(data) == decode.field_table(data)[1]


@SETTINGS
@given(
    table=st.dictionaries(
        KEYS,
        st.one_of(st.floats(allow_nan=False), st.binary(max_size=8), SCALARS),
        max_size=6,
    )
)
def test_table_round_trip_keeps_order_floats_and_bytes(table: dict[str, Any]) -> None:
    decoded = table_from_bytes(encode_table(table))
    assert list(decoded) == list(table)
    for key, value in table.items():
        if isinstance(value, bytes):  # a non-UTF-8 longstr decodes as bytes, UTF-8 as str
            got = decoded[key]
            assert (got.encode() if isinstance(got, str) else got) == value
        else:
            assert decoded[key] == value


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x05\x01a",  # table longer than its bytes
        b"\x00\x00\x00\x03\x01kZ",  # unknown type
        b"\x00\x00\x00\x03\x01k\x00",  # pamqp reads '\x00' as void; RabbitMQ does not know it
        b"\x00\x00\x00\x07\x01kS\x00\x00\x00\x09",  # longstr overruns the table
        b"\x00\x00\x00\x04\x01kI\x00",  # int cut short
        b"\x00\x00\x00\x02\x05k",  # key overruns
    ],
)
def test_malformed_tables_raise(data: bytes) -> None:
    with pytest.raises(FieldError):
        table_from_bytes(data)


def test_table_keys_that_are_not_utf8_are_replaced() -> None:
    assert table_from_bytes(b"\x00\x00\x00\x04\x01\xffb\x05") == {"\ufffd": 5}


def test_decimal_and_timestamp_values() -> None:
    table = {"d": decimal.Decimal("1.25"), "t": datetime.datetime(2020, 1, 2, tzinfo=datetime.UTC)}
    assert table_from_bytes(encode_table(table)) == table


# ---- the stream ----------------------------------------------------------------------------


FRAMES = st.one_of(
    any_method().flatmap(lambda m: st.integers(0, 3).map(lambda ch: _pamqp_marshal(ch, m))),
    st.tuples(st.integers(0, 3), basic_properties(), st.integers(0, 10**6)).map(
        lambda t: pframe.marshal(header.ContentHeader(0, t[2], t[1]), t[0])
    ),
    st.tuples(st.integers(0, 3), st.binary(max_size=300)).map(lambda t: _raw(3, t[0], t[1])),
    st.just(HEARTBEAT_FRAME),
)


@SETTINGS
@given(frames=st.lists(FRAMES, max_size=12), data=st.data())
def test_chunked_input_equals_whole_input(frames: list[bytes], data: st.DataObject) -> None:
    stream = AMQP_HEADER + b"".join(frames)
    chunks = data.draw(st.lists(st.integers(0, 64), max_size=len(stream)))
    whole = _decode_all(stream)
    assert len(whole) == len(frames) + 1
    assert _decode_all(stream, chunks=chunks) == whole
    assert _decode_all(stream, chunks=[1] * len(stream)) == whole


def test_frame_kinds() -> None:
    stream = (
        AMQP_HEADER
        + HEARTBEAT_FRAME
        + _raw(2, 5, struct.pack(">HHQ", 60, 0, 3) + b"\x00\x00")
        + _raw(3, 5, b"abc")
    )
    assert _decode_all(stream) == [
        ProtocolHeader(0, 9, 1),
        Heartbeat(0),
        ContentHeader(5, 60, 3, b"\x00\x00"),
        ContentBody(5, b"abc"),
    ]


def test_rabbitmq_alternative_header_is_0_9_1() -> None:
    assert _decode_all(b"AMQP\x01\x01\x00\x09") == [ProtocolHeader(0, 9, 1)]


@pytest.mark.parametrize(
    "data",
    [
        b"AMQP\x00\x00\x09\x02",
        b"AMQP\x01\x01\x09\x01",
        b"GET / HTTP/1.1\r\n",
        b"AMQP\x00\x00\x08\x00",
    ],
)
def test_bad_protocol_header(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(BadProtocolHeader):
        decoder.next_frame()


def test_partial_header_waits() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"AMQ")
    assert decoder.next_frame() is None


def _error(data: bytes, frame_max: int = 131072) -> ProtocolError:
    decoder = FrameDecoder(frame_max=frame_max, expect_protocol_header=False)
    decoder.feed(data)
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    return info.value


def _triple(exc: ProtocolError) -> tuple[int, str, int, int]:
    return exc.reply_code, exc.reply_text, exc.class_id, exc.method_id


def test_frame_too_large_is_raised_before_the_payload_arrives() -> None:
    # RabbitMQ admits payloads up to frame_max, and reports frame_max - 8 as the limit
    exc = _error(struct.pack(">BHI", 3, 1, 8193), frame_max=8192)
    assert _triple(exc) == (
        501,
        "FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,8193,8184}",
        0,
        0,
    )
    assert _decode_all(_raw(3, 1, b"x" * 8192), frame_max=8192) == [ContentBody(1, b"x" * 8192)]


def test_bad_frame_end() -> None:
    exc = _error(_raw(1, 1, b"\x00\x14\x00\x28", end=b"\xcd"))
    assert _triple(exc) == (
        501,
        "FRAME_ERROR - type 1, all octets = <<0,20,0,40>>: {invalid_frame_end_marker,205}",
        0,
        0,
    )
    exc = _error(_raw(1, 1, b"hello world, this is text", end=b"\x00"))
    assert exc.reply_text == (
        'FRAME_ERROR - type 1, first 16 octets = <<"hello world, thi">>: '
        "{invalid_frame_end_marker,0}"
    )


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (_raw(9, 1, b"abc"), 'FRAME_ERROR - type 9, all octets = <<"abc">>: unknown_frame'),
        (_raw(8, 0, b"abc"), 'FRAME_ERROR - type 8, all octets = <<"abc">>: unknown_frame'),
        (_raw(1, 1, b"\x00\x32"), "FRAME_ERROR - type 1, all octets = <<0,50>>: unknown_frame"),
        (
            _raw(2, 1, b"\x00\x3c\x00"),
            "FRAME_ERROR - type 2, all octets = <<0,60,0>>: unknown_frame",
        ),
    ],
)
def test_unknown_frames(data: bytes, text: str) -> None:
    assert _triple(_error(data)) == (FRAME_ERROR, text, 0, 0)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b"\x00\x32\x00\x0a\x00\x00\x05ab",
            (501, "FRAME_ERROR - cannot decode <<0,0,5,97,98>>", 50, 10),
        ),
        (
            b"\x00\x32\x00\x0a\x00\x00\x02ab\x02\x00\x00\x00\x00junk",
            (501, "FRAME_ERROR - cannot decode <<0,0,2,97,98,2,0,0,0,0,106,117,110,107>>", 50, 10),
        ),
        (
            b"\x00\x3c\x00\x50" + bytes(8),
            (501, "FRAME_ERROR - cannot decode <<0,0,0,0,0,0,0,0>>", 60, 80),
        ),
        (
            b"\x00\x3c\x00\x50" + bytes(9) + b"z",
            (501, "FRAME_ERROR - cannot decode <<0,0,0,0,0,0,0,0,0,122>>", 60, 80),
        ),
        (
            b"\x00\x3c\x00\x28\x00\x00\x00\x01q",
            (501, "FRAME_ERROR - cannot decode <<0,0,0,1,113>>", 60, 40),
        ),
        (
            b"\x00\x32\x00\x0a\x00\x00\x02\xff\xfe\x00\x00\x00\x00\x00",
            (501, "FRAME_ERROR - Malformed UTF-8 in shortstr", 0, 0),
        ),
        (
            b"\x00\x32\x00\x0a\x00\x00\x01q\x00\x00\x00\x00\x03\x01kZ",
            (501, "FRAME_ERROR - cannot decode <<0,0,1,113,0,0,0,0,3,1,107,90>>", 50, 10),
        ),
        (b"\x00\x3c\x00\x63", (540, "NOT_IMPLEMENTED - unknown method {60,99}", 60, 99)),
        (b"\x00\x63\x00\x0a", (540, "NOT_IMPLEMENTED - unknown method {99,10}", 99, 10)),
    ],
)
def test_undecodable_methods(payload: bytes, expected: tuple[int, str, int, int]) -> None:
    assert _triple(_error(_raw(1, 1, payload))) == expected


def test_unknown_method_code() -> None:
    assert _error(_raw(1, 1, b"\x00\x00\x00\x00")).reply_code == NOT_IMPLEMENTED


def test_method_decode_accepts_rabbitmq_leniencies() -> None:
    # invalid UTF-8 in table keys and longstr values is accepted (RabbitMQ does not check)
    args = b"\x00\x00\x01q\x00" + struct.pack(">I", 10) + b"\x02\xff\xfeS\x00\x00\x00\x02\xff\xfe"
    method = decode_method(50, 10, args)
    assert method.arguments == {"\ufffd\ufffd": b"\xff\xfe"}


# ---- error text helpers ------------------------------------------------------------------


def test_erlang_binary_formatting() -> None:
    assert erl_p(b"") == "<<>>"
    assert erl_p(b"abc") == '<<"abc">>'
    assert erl_p(b'hi\n"there\\') == '<<"hi\\n\\"there\\\\">>'
    assert erl_p(b"\x00\x01") == "<<0,1>>"
    assert erl_p(b"\xe9t\xe9") == "<<233,116,233>>"  # Erlang prints Latin-1 raw; we keep UTF-8
    assert erl_w(b"ab") == "<<97,98>>"


def test_reply_texts_are_clipped_like_rabbitmq() -> None:
    long = "FRAME_ERROR - cannot decode " + erl_w(bytes(200))
    clipped = clip_reply_text(long)
    assert len(clipped.encode()) == 255
    assert clipped.endswith("...")
    assert clipped[:252] == long[:252]
    assert clip_reply_text("short") == "short"
    assert len(clip_reply_text("é" * 200).encode()) <= 255


def test_fast_event_constructors_equal_dataclass_init() -> None:
    assert channel_content(1, "e", "k", True, False, b"p", b"b") == ChannelContent(
        1, "e", "k", True, False, b"p", b"b"
    )
    ack = AckMethod(3, 4, True)
    assert channel_method(3, ack) == ChannelMethod(3, ack)
    with pytest.raises(AttributeError):
        channel_content(1, "e", "k", True, False, b"p", b"b").body = b"x"  # type: ignore[misc]
