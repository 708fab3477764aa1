"""node.protocol.properties.with_headers: pamqp reads back the new headers and every other
property unchanged; unchanged values keep their bytes; new integers are 'l' as RabbitMQ
writes x-death counts (wire layout checked on RabbitMQ 3.10, see docs/dead-lettering.md)."""

from __future__ import annotations

import datetime
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands, header

from node.broker.deadletter import death_routing_keys, x_death_headers
from node.protocol.codec import decode_properties, encode_properties, peek_properties
from node.protocol.errors import PropertiesError
from node.protocol.properties import with_headers

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_.:@#,/+ ", max_size=40)
TEXT = st.text(max_size=40)
STAMP = st.integers(0, 0xFFFFFFFF).map(
    lambda s: datetime.datetime.fromtimestamp(s, tz=datetime.UTC)
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    TEXT,
    st.none(),
    STAMP,
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-1000, max_value=1000),
)
KEYS = st.text(max_size=12)
TABLES = st.recursive(
    st.dictionaries(KEYS, SCALARS, max_size=4),
    lambda inner: st.dictionaries(
        KEYS, st.one_of(SCALARS, inner, st.lists(st.one_of(SCALARS, inner), max_size=3)), max_size=4
    ),
    max_leaves=12,
)
NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
    "cluster_id",
)


@st.composite
def basic_properties(draw: st.DrawFn) -> commands.Basic.Properties:
    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.none(), strategy))

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
        timestamp=maybe(STAMP),
        message_type=maybe(TEXT),
        user_id=maybe(TEXT),
        app_id=maybe(TEXT),
    )


def _pamqp(raw: bytes) -> commands.Basic.Properties:
    content = header.ContentHeader()
    content.unmarshal(struct.pack(">HHQ", 60, 0, 0) + raw)
    return content.properties


@SETTINGS
@given(
    props=basic_properties(),
    headers=st.one_of(st.none(), TABLES),
    without_expiration=st.booleans(),
)
def test_pamqp_reads_the_new_headers_and_the_same_other_properties(
    props: commands.Basic.Properties, headers: dict[str, Any] | None, without_expiration: bool
) -> None:
    raw = props.marshal()
    before = _pamqp(raw)
    after = _pamqp(with_headers(raw, headers, without_expiration=without_expiration))
    for name in NAMES:
        if name == "headers":
            assert after.headers == headers
        elif name == "expiration" and without_expiration:
            assert after.expiration is None
        else:
            assert getattr(after, name) == getattr(before, name), name


@SETTINGS
@given(props=basic_properties())
def test_the_same_headers_give_the_same_bytes(props: commands.Basic.Properties) -> None:
    raw = props.marshal()
    assert with_headers(raw, peek_properties(raw)[3]) == raw


def test_without_expiration_removes_only_the_expiration() -> None:
    raw = encode_properties(
        commands.Basic.Properties(
            content_type="text/plain", delivery_mode=2, expiration="600000", message_id="mid"
        )
    )
    new = with_headers(raw, None, without_expiration=True)
    assert new == encode_properties(
        commands.Basic.Properties(content_type="text/plain", delivery_mode=2, message_id="mid")
    )
    # Without the flag the expiration stays; with no expiration there is nothing to drop.
    assert with_headers(raw, None) == raw
    assert with_headers(b"\x00\x00", None, without_expiration=True) == b"\x00\x00"


def test_headers_are_added_and_removed() -> None:
    raw = encode_properties(commands.Basic.Properties(content_type="a", delivery_mode=2))
    added = with_headers(raw, {"k": "v"})
    assert decode_properties(added).headers == {"k": "v"}
    assert decode_properties(added).content_type == "a"
    assert with_headers(added, None) == raw
    assert decode_properties(with_headers(raw, {})).headers == {}


def test_other_properties_keep_their_bytes_even_when_not_utf8_or_empty() -> None:
    # content-type b"\xff\xfe" (not UTF-8), reply-to present but empty, expiration "5".
    raw = b"\x83\x00" + b"\x02\xff\xfe" + b"\x00" + b"\x015"
    new = with_headers(raw, {"a": 1})
    table = b"\x00\x00\x00\x0b" + b"\x01a" + b"l" + struct.pack(">q", 1)
    assert new == b"\xa3\x00" + b"\x02\xff\xfe" + table + b"\x00" + b"\x015"
    assert with_headers(raw, None, without_expiration=True) == b"\x82\x00\x02\xff\xfe\x00"


def test_continuation_flag_words_are_kept() -> None:
    raw = b"\x80\x01\x00\x00" + b"\x01t"  # content-type "t", then an empty continuation word
    assert with_headers(raw, {}) == b"\xa0\x01\x00\x00" + b"\x01t" + b"\x00\x00\x00\x00"


def test_unchanged_values_keep_their_type_and_new_integers_are_long() -> None:
    # A client's 'I' 1 and 's' 7 inside an array stay as they were; the new 2 is an 'l'.
    h, a = b"\x01hI\x00\x00\x00\x01", b"\x01aA\x00\x00\x00\x03s\x00\x07"
    raw = b"\x20\x00" + struct.pack(">I", len(h + a)) + h + a
    assert peek_properties(raw)[3] == {"h": 1, "a": [7]}
    new = with_headers(raw, {"h": 1, "a": [7, 2]})
    a2 = b"\x01aA\x00\x00\x00\x0cs\x00\x07l" + struct.pack(">q", 2)
    assert new == b"\x20\x00" + struct.pack(">I", len(h + a2)) + h + a2
    # Same value, other type: re-encoded (True is not 1).
    assert with_headers(raw, {"h": True, "a": [7]})[6:10] == b"\x01ht\x01"


def test_broken_blocks_raise_properties_error() -> None:
    with pytest.raises(PropertiesError):
        with_headers(b"\x80\x00\x05ab", {})
    with pytest.raises(PropertiesError):
        with_headers(b"\x00", {})


def _typed(data: bytes, off: int) -> tuple[Any, int]:
    """(tag, value) pairs as on the wire, to compare with what RabbitMQ 3.10 sent."""
    tag = chr(data[off])
    off += 1
    if tag == "S":
        (n,) = struct.unpack_from(">I", data, off)
        return ("S", data[off + 4 : off + 4 + n].decode()), off + 4 + n
    if tag in "lT":
        return (tag, struct.unpack_from(">q", data, off)[0]), off + 8
    if tag in "FA":
        (n,) = struct.unpack_from(">I", data, off)
        off += 4
        stop = off + n
        items: list[Any] = []
        while off < stop:
            if tag == "F":
                key = data[off + 1 : off + 1 + data[off]].decode()
                off += 1 + data[off]
                value, off = _typed(data, off)
                items.append((key, value))
            else:
                value, off = _typed(data, off)
                items.append(value)
        return (tag, items), off
    raise AssertionError(tag)


def test_first_death_has_rabbitmq_wire_layout() -> None:
    # What RabbitMQ 3.10 sent for a message published to "src" with key "k1", CC ["kcc"],
    # expiration "600000" and a user header, rejected from queue "A" (docs/dead-lettering.md).
    props = commands.Basic.Properties(
        content_type="text/plain",
        headers={"user": "u", "CC": ["kcc"]},
        expiration="600000",
        message_id="mid",
    )
    raw = encode_properties(props)
    headers = x_death_headers(
        props.headers,
        queue="A",
        reason="rejected",
        exchange="src",
        routing_keys=death_routing_keys("k1", props.headers),
        now_ms=1_795_515_803_500,
        original_expiration="600000",
    )
    new = with_headers(raw, headers, without_expiration=True)
    assert new[:2] == b"\xa0\x80"  # content-type, headers, message-id
    table, _ = _typed(b"F" + new[2 + 1 + len("text/plain") :], 0)  # the table has no tag
    assert table == (
        "F",
        [
            ("CC", ("A", [("S", "kcc")])),
            ("user", ("S", "u")),
            (
                "x-death",
                (
                    "A",
                    [
                        (
                            "F",
                            [
                                ("count", ("l", 1)),
                                ("reason", ("S", "rejected")),
                                ("queue", ("S", "A")),
                                ("time", ("T", 1_795_515_803)),
                                ("exchange", ("S", "src")),
                                ("routing-keys", ("A", [("S", "k1"), ("S", "kcc")])),
                                ("original-expiration", ("S", "600000")),
                            ],
                        )
                    ],
                ),
            ),
            ("x-first-death-exchange", ("S", "src")),
            ("x-first-death-queue", ("S", "A")),
            ("x-first-death-reason", ("S", "rejected")),
        ],
    )
    decoded = decode_properties(new)
    assert (decoded.content_type, decoded.message_id, decoded.expiration) == (
        "text/plain",
        "mid",
        None,
    )
