"""cluster.codec: every command round-trips exactly, the tag table is complete and stable,
the hot-path encoders write the layout's bytes, bad input raises CodecError, and replicas
applying decoded commands reach the same state."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import typing
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic

from cluster import codec
from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import ChannelRef, Properties
from node.protocol.codec import encode_properties, peek_properties
from node.protocol.properties import with_headers

COMMAND_CLASSES = sorted(
    (
        value
        for value in vars(c).values()
        if isinstance(value, type) and issubclass(value, c.Command) and value is not c.Command
    ),
    key=lambda cls: cls.__name__,
)

# ---- exact comparison: types, float bits, decimal digits and exponents, utc offsets ----


def shape(value: Any) -> Any:
    """A comparable image of a value that tells apart everything `==` lets pass (1 vs
    True, list vs tuple, bytes vs bytearray, Decimal('1.0') vs Decimal('1.00'), ...)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, shape(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(shape(v) for v in value))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, Decimal):
        return ("Decimal", value.as_tuple())
    if isinstance(value, datetime.datetime):
        return ("datetime", value.isoformat(), value.utcoffset())
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return (type(value).__name__, tuple(shape(getattr(value, f.name)) for f in fields))
    return (type(value).__name__, value)


# ---- strategies ---------------------------------------------------------------------------

I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)
ZONES = (
    st.none()
    | st.just(datetime.UTC)
    | st.builds(
        lambda m: datetime.timezone(datetime.timedelta(minutes=m)), st.integers(-1439, 1439)
    )
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()  # any size: big ints too
    | st.floats(allow_nan=False)
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=3)
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.binary(max_size=10).map(bytearray)
    | st.datetimes(timezones=ZONES)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
TABLES = st.dictionaries(st.text(max_size=8), VALUES, max_size=5)
PROPERTIES = st.builds(
    Properties,
    delivery_mode=I64,
    priority=st.none() | I64,
    expiration=st.none() | st.text(max_size=8),
    headers=st.none() | TABLES,
)
BY_ANNOTATION: dict[str, st.SearchStrategy[Any]] = {
    "int": I64,
    "ConnId": I64,
    "bool": st.booleans(),
    "str": st.text(max_size=20),
    "bytes": st.binary(max_size=64),
    "FieldTable": TABLES,
    "ChannelRef": st.builds(ChannelRef, I64, st.integers(0, 65535)),
    "Properties": PROPERTIES,
}
BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "delivery_tag": U64,
    "delivery_tags": st.lists(U64, max_size=8).map(tuple),
    "gone": st.lists(U64, max_size=8).map(tuple),
    "returned": st.lists(U64, max_size=8).map(tuple),
}
IDS = st.none() | st.binary(max_size=codec.MAX_ID_LENGTH)


def command_strategy(cls: type[c.Command]) -> st.SearchStrategy[Any]:
    kwargs = {
        f.name: BY_NAME[f.name] if f.name in BY_NAME else BY_ANNOTATION[str(f.type)]
        for f in dataclasses.fields(cls)
    }
    return st.builds(cls, **kwargs)


ANY_COMMAND = st.one_of([command_strategy(cls) for cls in COMMAND_CLASSES])


# ---- the tables -------------------------------------------------------------------------


def test_every_command_class_has_a_tag_and_a_layout() -> None:
    assert set(typing.get_args(c.AnyCommand)) == set(COMMAND_CLASSES)
    assert set(codec.TAGS) == set(COMMAND_CLASSES)
    assert set(codec.LAYOUTS) == set(COMMAND_CLASSES)
    tags = list(codec.TAGS.values())
    assert len(set(tags)) == len(tags)
    assert codec.BATCH_TAG not in tags
    assert all(0 < tag < 256 for tag in tags)


@pytest.mark.parametrize("cls", COMMAND_CLASSES, ids=lambda cls: cls.__name__)
def test_layout_covers_every_field_once(cls: type[c.Command]) -> None:
    names = [name for name, _ in codec.LAYOUTS[cls]]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(cls))
    assert len(names) == len(set(names))


def test_every_annotation_has_a_strategy() -> None:
    # A command field of a new type must get a strategy (and a codec kind) before merging.
    for cls in COMMAND_CLASSES:
        for f in dataclasses.fields(cls):
            assert f.name in BY_NAME or str(f.type) in BY_ANNOTATION, (cls, f.name, f.type)


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", COMMAND_CLASSES, ids=lambda cls: cls.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_command_round_trips_exactly(cls: type[c.Command], data: st.DataObject) -> None:
    command = data.draw(command_strategy(cls))
    command_id = data.draw(IDS)
    entry = codec.encode(command, command_id=command_id)
    decoded, decoded_id = codec.decode(entry)
    assert decoded == command
    assert shape(decoded) == shape(command)
    assert decoded_id == command_id
    assert codec.decode_entry(entry) == [(decoded, command_id)]


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_field_values_round_trip_exactly(value: Any) -> None:
    command = c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={"v": value})
    decoded, _ = codec.decode(codec.encode(command))
    assert isinstance(decoded, c.DeclareQueue)
    assert shape(decoded.arguments) == shape({"v": value})


def test_values_that_equal_each_other_keep_their_types() -> None:
    headers = {
        "one": 1,
        "true": True,
        "float": 1.0,
        "dec": Decimal("1.00"),
        "exp": Decimal("1E+2"),
        "negzero": -0.0,
        "str": "ab",
        "bytes": b"ab",
        "bytearray": bytearray(b"ab"),
        "list": [1, 2],
        "tuple": (1, 2),
        "big": 2**100,
        "neg": -(2**70),
        "naive": datetime.datetime(2024, 1, 2, 3, 4, 5, 6),
        "aware": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "offset": datetime.datetime(
            2024, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))
        ),
        "nested": {"a": [{"b": (None, b"\xff")}], "": {}},
        "surrogate": "\ud800",
    }
    props = Properties(2, 0, "", headers)
    command = c.Publish(
        channel=ChannelRef(1, 1),
        vhost="/",
        exchange="",
        routing_key="q",
        mandatory=False,
        properties=b"\x00\x00",
        props=props,
        body=b"",
    )
    decoded, _ = codec.decode(codec.encode(command))
    assert shape(decoded) == shape(command)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ANY_COMMAND, IDS), max_size=8))
def test_batches_round_trip(items: list[tuple[Any, bytes | None]]) -> None:
    commands = [command for command, _ in items]
    ids = [command_id for _, command_id in items]
    entry = codec.encode_batch(commands, command_ids=ids)
    assert entry == codec.join_batch(codec.encode(x, command_id=i) for x, i in items)
    assert codec.decode_batch(entry) == items
    assert codec.decode_entry(entry) == items
    assert codec.decode_batch(codec.encode_batch(commands)) == [(x, None) for x in commands]


# ---- the hot path writes exactly what the layout says ------------------------------------


def generic(command: c.Command, command_id: bytes | None) -> bytes:
    compiled = codec._compile(type(command), codec.LAYOUTS[type(command)])
    return codec._generic_encode(compiled, command, command_id)


def generic_decode(entry: bytes) -> tuple[c.Command, bytes | None]:
    cls = next(k for k, tag in codec.TAGS.items() if tag == entry[1])
    command, command_id, end = codec._generic_decode(
        codec._compile(cls, codec.LAYOUTS[cls]), entry, 0, len(entry)
    )
    assert end == len(entry)
    return command, command_id


@settings(max_examples=200, deadline=None)
@given(
    command=command_strategy(c.Publish) | command_strategy(c.Ack) | command_strategy(c.Persist),
    command_id=IDS,
)
def test_fast_paths_equal_the_layout_driven_codec(command: Any, command_id: bytes | None) -> None:
    entry = codec.encode(command, command_id=command_id)
    assert entry == generic(command, command_id)
    assert generic_decode(entry) == codec.decode(entry) == (command, command_id)


# ---- golden bytes: a format change must be deliberate ------------------------------------

GOLDEN: list[tuple[Any, bytes | None, str]] = [
    (c.Tick(now_ms=5), None, "0105000000000000000005"),
    (
        c.Ack(channel=ChannelRef(7, 2), delivery_tag=3, multiple=True, now_ms=1),
        b"id",
        "0114030000000000000001000000000000000700020000000000000003016964",
    ),
    (
        c.Publish(
            channel=ChannelRef(1, 1),
            vhost="/",
            exchange="x",
            routing_key="k",
            mandatory=True,
            properties=b"\x10\x00\x02",
            props=Properties(delivery_mode=2),
            body=b"hi",
            now_ms=9,
        ),
        None,
        "010f00"
        "0000000000000009"
        "0000000000000001"
        "0001"
        "00000001"
        "00000001"
        "00000001"
        "01"
        "00000003"
        "00000009"
        "00000002"
        "2f"
        "78"
        "6b"
        "100002"
        "00"
        "0000000000000002"
        "6869",
    ),
    (
        c.DeclareQueue(
            vhost="/",
            queue="q",
            owner=4,
            durable=True,
            arguments={"x-max-length": 10, "x-dead-letter-exchange": "dlx"},
        ),
        None,
        "010a00"
        "0000000000000000"
        "00000001"
        "00000001"
        "0000000000000004"
        "00"
        "01"
        "00"
        "00"
        "0000003f"
        "00"
        "2f"
        "71"
        "00000002"
        "0000000c"
        "782d6d61782d6c656e677468"
        "69"
        "000000000000000a"
        "00000016"
        "782d646561642d6c65747465722d65786368616e6765"
        "73"
        "00000003"
        "646c78",
    ),
]


@pytest.mark.parametrize(("command", "command_id", "hex_bytes"), GOLDEN)
def test_golden_bytes(command: Any, command_id: bytes | None, hex_bytes: str) -> None:
    assert codec.encode(command, command_id=command_id).hex() == hex_bytes
    assert codec.decode(bytes.fromhex(hex_bytes)) == (command, command_id)


def test_golden_batch() -> None:
    tick = c.Tick(now_ms=5)
    assert codec.encode_batch([tick, tick]).hex() == (
        "010000000002" + ("0000000b" + "0105000000000000000005") * 2
    )


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_version_and_tag_are_refused() -> None:
    entry = codec.encode(c.Tick(now_ms=1))
    with pytest.raises(codec.CodecError, match="version 2"):
        codec.decode(b"\x02" + entry[1:])
    with pytest.raises(codec.CodecError, match="unknown command tag 200"):
        codec.decode(entry[:1] + b"\xc8" + entry[2:])
    with pytest.raises(codec.CodecError, match="batch"):
        codec.decode(codec.encode_batch([c.Tick()]))
    with pytest.raises(codec.CodecError, match="not a batch"):
        codec.decode_batch(entry)
    with pytest.raises(codec.CodecError, match="version 9"):
        codec.decode_batch(b"\x09" + codec.encode_batch([])[1:])
    with pytest.raises(codec.CodecError, match="batch inside"):
        codec.decode_batch(codec.join_batch([codec.encode_batch([c.Tick()])]))
    with pytest.raises(codec.CodecError, match="bytes after"):
        codec.decode(entry + b"\x00")


def test_unencodable_commands_are_refused() -> None:
    class Unknown(c.Command):
        pass

    ch = ChannelRef(1, 1)
    bad: list[Any] = [
        Unknown(),
        c.Ack(channel=ch, delivery_tag=-1),
        c.Ack(channel=ch, delivery_tag=2**64),
        c.Ack(channel=ChannelRef(1, 65536), delivery_tag=1),
        c.Tick(now_ms=2**63),
        c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={"x": object()}),
        c.DeclareQueue(vhost="/", queue="q", owner=1, arguments={1: 2}),  # type: ignore[dict-item]
        c.Qos(channel=ch, prefetch_count="5"),  # type: ignore[arg-type]
    ]
    for command in bad:
        with pytest.raises(codec.CodecError):
            codec.encode(command)
    with pytest.raises(codec.CodecError, match="254"):
        codec.encode(c.Tick(), command_id=b"x" * 255)
    with pytest.raises(codec.CodecError, match="ids"):
        codec.encode_batch([c.Tick()], command_ids=[])


@settings(max_examples=150, deadline=None)
@given(command=ANY_COMMAND, command_id=IDS, data=st.data())
def test_damaged_entries_raise_codec_error_only(
    command: Any, command_id: bytes | None, data: st.DataObject
) -> None:
    entry = codec.encode(command, command_id=command_id)
    cut = data.draw(st.integers(0, len(entry) - 1))
    with pytest.raises(codec.CodecError):
        codec.decode(entry[:cut])
    with pytest.raises(codec.CodecError):
        codec.decode_batch(codec.join_batch([entry])[: 6 + 4 + cut])
    at = data.draw(st.integers(0, len(entry) - 1))
    flipped = bytearray(entry)
    flipped[at] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(codec.CodecError):
        codec.decode(flipped)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_garbage_raises_codec_error_only(data: bytes) -> None:
    for decode in (codec.decode, codec.decode_batch, codec.decode_entry):
        with contextlib.suppress(codec.CodecError):
            decode(b"\x01" + data)


# ---- replicas: the same log, decoded, gives the same state --------------------------------


A = ChannelRef(1, 1)


def publish(
    exchange: str,
    key: str,
    body: bytes,
    *,
    channel: ChannelRef = A,
    now_ms: int = 0,
    mandatory: bool = False,
    **properties: Any,
) -> c.Publish:
    raw = encode_properties(Basic.Properties(**properties))
    return c.Publish(
        channel=channel,
        vhost="/",
        exchange=exchange,
        routing_key=key,
        mandatory=mandatory,
        properties=raw,
        props=Properties(*peek_properties(raw)),
        body=body,
        now_ms=now_ms,
    )


def work_queue_with_dead_letters() -> Iterator[Any]:
    ch = ChannelRef(1, 1)
    yield c.OpenChannel(channel=ch, now_ms=1000)
    yield c.DeclareExchange(vhost="/", exchange="dlx", type="fanout", durable=True)
    yield c.DeclareQueue(vhost="/", queue="dead", owner=1, durable=True)
    yield c.BindQueue(vhost="/", queue="dead", exchange="dlx", routing_key="", owner=1)
    yield c.DeclareQueue(
        vhost="/",
        queue="work",
        owner=1,
        durable=True,
        arguments={"x-dead-letter-exchange": "dlx", "x-message-ttl": 5000, "x-max-length": 50},
    )
    yield c.Qos(channel=ch, prefetch_count=3)
    yield c.Consume(channel=ch, vhost="/", queue="work", consumer_tag="ctag-1")
    for i in range(8):
        yield publish(
            "",
            "work",
            b"job-%d" % i,
            now_ms=1000 + i,
            delivery_mode=2,
            priority=i % 3,
            headers={"attempt": i, "trace": {"id": b"\x00\x01", "at": Decimal("1.25")}},
        )
    yield c.Ack(channel=ch, delivery_tag=1, now_ms=1100)
    yield c.Ack(channel=ch, delivery_tag=3, multiple=True, now_ms=1101)
    yield c.Nack(channel=ch, delivery_tag=4, requeue=False, now_ms=1102)  # dead-lettered
    yield c.Nack(channel=ch, delivery_tag=5, requeue=True, reject=True, now_ms=1103)
    yield c.Tick(now_ms=3000)
    yield publish("", "work", b"short", now_ms=3001, expiration="100")
    yield c.Tick(now_ms=9000)  # TTL: ready messages dead-lettered
    yield c.Get(channel=ch, vhost="/", queue="dead", no_ack=False, now_ms=9001)
    yield c.CloseChannel(channel=ch, now_ms=9002)


def routing_and_topology() -> Iterator[Any]:
    a, b = ChannelRef(1, 1), ChannelRef(2, 7)
    yield c.OpenChannel(channel=a)
    yield c.OpenChannel(channel=b)
    yield c.DeclareExchange(vhost="/", exchange="events", type="topic")
    yield c.DeclareExchange(vhost="/", exchange="match", type="headers", auto_delete=True)
    yield c.DeclareExchange(
        vhost="/", exchange="alt", type="fanout", arguments={"note": [1, True, 2.5]}
    )
    yield c.DeclareQueue(vhost="/", queue="all", owner=1)
    yield c.DeclareQueue(vhost="/", queue="eu", owner=1, arguments={"x-max-priority": 5})
    yield c.DeclareQueue(vhost="/", queue="typed", owner=2)
    yield c.BindQueue(vhost="/", queue="all", exchange="events", routing_key="#", owner=1)
    yield c.BindQueue(vhost="/", queue="eu", exchange="events", routing_key="eu.*", owner=1)
    yield c.BindExchange(vhost="/", destination="match", source="events", routing_key="eu.#")
    yield c.BindQueue(
        vhost="/",
        queue="typed",
        exchange="match",
        routing_key="",
        owner=2,
        arguments={"x-match": "all", "n": 3, "flag": True, "when": datetime.datetime(2024, 1, 1)},
    )
    for i, key in enumerate(["eu.de", "us.ny", "eu.fr", "eu.de.berlin"]):
        yield publish(
            "events",
            key,
            key.encode() * 3,
            channel=a,
            mandatory=True,
            headers={"n": 3, "flag": bool(i % 2), "when": datetime.datetime(2024, 1, 1)},
        )
    yield publish("missing", "x", b"lost", channel=a)  # a 404: an error reply, same state
    yield c.Consume(channel=b, vhost="/", queue="eu", consumer_tag="b1", no_ack=True)
    yield c.UnbindExchange(vhost="/", destination="match", source="events", routing_key="eu.#")
    yield c.UnbindQueue(vhost="/", queue="all", exchange="events", routing_key="#", owner=1)
    yield publish("events", "eu.it", b"after unbind", channel=a)
    yield c.PurgeQueue(vhost="/", queue="all", owner=1)
    yield c.Cancel(channel=b, consumer_tag="b1")
    yield c.DeleteExchange(vhost="/", exchange="alt", if_unused=True)
    yield c.DeleteQueue(vhost="/", queue="eu", owner=1, if_empty=True)


def connections_come_and_go() -> Iterator[Any]:
    a, b = ChannelRef(5, 1), ChannelRef(6, 1)
    yield c.OpenChannel(channel=a)
    yield c.OpenChannel(channel=b)
    yield c.DeclareQueue(vhost="/", queue="amq.gen-abc", owner=5, exclusive=True, server_named=True)
    yield c.DeclareQueue(vhost="/", queue="shared", owner=6, auto_delete=True)
    yield c.DeclareQueue(vhost="/", queue="kept", owner=6, durable=True)
    yield c.Consume(channel=a, vhost="/", queue="amq.gen-abc", consumer_tag="x")
    yield c.Consume(channel=b, vhost="/", queue="shared", consumer_tag="y", exclusive=True)
    yield c.SetWritable(conn=6, writable=False)
    for i in range(4):
        yield publish("", "shared", b"s%d" % i, channel=a)
        yield publish("", "amq.gen-abc", b"e%d" % i, channel=b)
        yield publish("", "kept", b"k%d" % i, channel=b, delivery_mode=2)
    yield c.SetWritable(conn=6, writable=True)
    yield c.Recover(channel=a, requeue=True)
    yield c.DeclareQueue(vhost="/", queue="amq.gen-abc", owner=6, passive=True)  # 405
    yield c.CloseChannel(channel=b)
    yield c.CloseConnection(conn=5)
    yield c.OpenChannel(channel=ChannelRef(7, 1))
    yield c.Get(channel=ChannelRef(7, 1), vhost="/", queue="shared", no_ack=True)


SCENARIOS = [work_queue_with_dead_letters, routing_and_topology, connections_come_and_go]


def machine() -> StateMachine:
    return StateMachine(rewrite_headers=with_headers)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_replicas_applying_decoded_commands_agree(scenario: Any) -> None:
    commands = list(scenario())
    entries = [codec.encode(x, command_id=i.to_bytes(8, "big")) for i, x in enumerate(commands)]
    direct, single, batched = machine(), machine(), machine()
    expected = [direct.apply(x) for x in commands]
    from_single = [single.apply(codec.decode(entry)[0]) for entry in entries]
    from_batches = []
    for start in range(0, len(entries), 5):
        for command, _ in codec.decode_batch(codec.join_batch(entries[start : start + 5])):
            from_batches.append(batched.apply(command))
    assert from_single == expected
    assert from_batches == expected
    snapshot = direct.snapshot()
    assert single.snapshot() == snapshot
    assert batched.snapshot() == snapshot
    assert len(snapshot) > 300  # the scenario left topology and messages behind


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ANY_COMMAND, max_size=12))
def test_replicas_agree_on_random_logs(commands: list[Any]) -> None:
    # Random commands mostly fail; the replies (errors included) and state must still agree.
    direct, replica = machine(), machine()
    expected = [direct.apply(x) for x in commands]
    decoded = [x for x, _ in codec.decode_batch(codec.encode_batch(commands))]
    assert [replica.apply(x) for x in decoded] == expected
    assert replica.snapshot() == direct.snapshot()
