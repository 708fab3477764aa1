"""State-machine commands as bytes for the Raft log: versioned, tagged, exact, no pickle.

Rules:
- One entry is a header `>BBB` (format VERSION, command tag, id code), the optional
  command id, then the command's fields as its layout in `LAYOUTS` lists them: every
  fixed-size field (ints, bools, channel refs) and the byte length of every variable
  field (strings, bytes, field tables, properties, delivery-tag tuples) sit in one
  struct right after the header's three bytes; the variable fields' bytes follow the id,
  in layout order. So a command encodes with one `struct.pack` and a join, and decodes
  with one `unpack_from`.
- Tags are the explicit table `TAGS`, never derived from class order or names. A tag, once
  released, keeps its meaning for ever: a new command takes a new number; a removed
  command's number is never reused. Tag 0 is a batch (`encode_batch`).
- A layout is part of the format. Changing a command's fields means a new VERSION whose
  decoder still reads the old one (the journal keeps old entries); a test holds golden
  bytes so a silent change fails, and another fails when a command field has no place in
  its layout.
- Ints are 64-bit (delivery tags unsigned, channel numbers 16-bit as on the wire); bytes
  (bodies, raw property blocks) are copied raw; strings are UTF-8 (lone surrogates
  kept). Field tables (arguments, headers) keep every value's Python type exactly: None,
  bool, int (any size), float (its 64 bits), str, bytes, bytearray, Decimal (its digits
  and exponent), datetime (its offset and microseconds), dicts, lists and tuples, nested.
- The id code is 0 for no command id, else the id's length + 1 (ids up to 254 bytes): it
  lets the log's applier drop a retried submission it already applied.
- Publish, Ack and Persist, the hot paths, have hand-written encoders and decoders; a
  test proves they write the same bytes as the layout-driven ones.
- Decoding is strict and total: anything but a well-formed entry of a known version and
  tag raises `CodecError`, and so does encoding a value the format cannot carry.
Imports only the standard library, the commands and the broker's value types: no pickle,
no json, no pysyncobj.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from types import MappingProxyType
from typing import Any

from cluster import commands as c
from node.broker.types import ChannelRef, Message, Properties, new_properties

VERSION = 1
BATCH_TAG = 0
MAX_ID_LENGTH = 254  # the id code is one byte: 0 (no id) or length + 1

# The tags. Append only: never renumber, never reuse.
TAGS: Mapping[type[c.Command], int] = MappingProxyType(
    {
        c.OpenChannel: 1,
        c.CloseChannel: 2,
        c.CloseConnection: 3,
        c.SetWritable: 4,
        c.Tick: 5,
        c.DeclareExchange: 6,
        c.DeleteExchange: 7,
        c.BindExchange: 8,
        c.UnbindExchange: 9,
        c.DeclareQueue: 10,
        c.DeleteQueue: 11,
        c.PurgeQueue: 12,
        c.BindQueue: 13,
        c.UnbindQueue: 14,
        c.Publish: 15,
        c.Qos: 16,
        c.Consume: 17,
        c.Cancel: 18,
        c.Get: 19,
        c.Ack: 20,
        c.Nack: 21,
        c.Recover: 22,
        c.AckMany: 23,
        c.SetLeader: 24,
        c.Member: 25,
        c.NodeDown: 26,
        c.NodeUp: 27,
        c.ForgetMember: 28,
        c.DropQueue: 29,
        c.Persist: 30,
        c.Settle: 31,
    }
)

# Field kinds, with the struct codes they take in a command's fixed part.
I64 = "i64"  # signed 64-bit int
U64 = "u64"  # unsigned 64-bit int (delivery tags)
BOOL = "bool"  # one byte, 0 or 1
CHANNEL = "channel"  # ChannelRef: connection id (i64), channel number (u16)
STR = "str"  # UTF-8
BYTES = "bytes"  # raw
TABLE = "table"  # a field table, every value's type kept
PROPS = "props"  # Properties
U64S = "u64s"  # a tuple of unsigned 64-bit ints (delivery tags), 8 bytes each
_FIXED = {I64: "q", U64: "Q", BOOL: "B", CHANNEL: "qH"}
_VARIABLE = (STR, BYTES, TABLE, PROPS, U64S)

Layout = tuple[tuple[str, str], ...]
_NOW: tuple[str, str] = ("now_ms", I64)

# Every command's fields in encoding order. Part of the format (see the module rules).
LAYOUTS: Mapping[type[c.Command], Layout] = MappingProxyType(
    {
        c.OpenChannel: (_NOW, ("channel", CHANNEL)),
        c.CloseChannel: (_NOW, ("channel", CHANNEL)),
        c.CloseConnection: (_NOW, ("conn", I64)),
        c.SetWritable: (_NOW, ("conn", I64), ("writable", BOOL)),
        c.Tick: (_NOW,),
        c.DeclareExchange: (
            _NOW,
            ("vhost", STR),
            ("exchange", STR),
            ("type", STR),
            ("passive", BOOL),
            ("durable", BOOL),
            ("auto_delete", BOOL),
            ("internal", BOOL),
            ("arguments", TABLE),
        ),
        c.DeleteExchange: (_NOW, ("vhost", STR), ("exchange", STR), ("if_unused", BOOL)),
        c.BindExchange: (
            _NOW,
            ("vhost", STR),
            ("destination", STR),
            ("source", STR),
            ("routing_key", STR),
            ("arguments", TABLE),
        ),
        c.UnbindExchange: (
            _NOW,
            ("vhost", STR),
            ("destination", STR),
            ("source", STR),
            ("routing_key", STR),
            ("arguments", TABLE),
        ),
        c.DeclareQueue: (
            _NOW,
            ("vhost", STR),
            ("queue", STR),
            ("owner", I64),
            ("passive", BOOL),
            ("durable", BOOL),
            ("exclusive", BOOL),
            ("auto_delete", BOOL),
            ("arguments", TABLE),
            ("server_named", BOOL),
        ),
        c.DeleteQueue: (
            _NOW,
            ("vhost", STR),
            ("queue", STR),
            ("owner", I64),
            ("if_unused", BOOL),
            ("if_empty", BOOL),
        ),
        c.PurgeQueue: (_NOW, ("vhost", STR), ("queue", STR), ("owner", I64)),
        c.BindQueue: (
            _NOW,
            ("vhost", STR),
            ("queue", STR),
            ("exchange", STR),
            ("routing_key", STR),
            ("owner", I64),
            ("arguments", TABLE),
        ),
        c.UnbindQueue: (
            _NOW,
            ("vhost", STR),
            ("queue", STR),
            ("exchange", STR),
            ("routing_key", STR),
            ("owner", I64),
            ("arguments", TABLE),
        ),
        c.Publish: (
            _NOW,
            ("channel", CHANNEL),
            ("vhost", STR),
            ("exchange", STR),
            ("routing_key", STR),
            ("mandatory", BOOL),
            ("properties", BYTES),
            ("props", PROPS),
            ("body", BYTES),
        ),
        c.Qos: (_NOW, ("channel", CHANNEL), ("prefetch_count", I64), ("global_", BOOL)),
        c.Consume: (
            _NOW,
            ("channel", CHANNEL),
            ("vhost", STR),
            ("queue", STR),
            ("consumer_tag", STR),
            ("no_ack", BOOL),
            ("exclusive", BOOL),
            ("arguments", TABLE),
            ("reply_key", STR),
        ),
        c.Cancel: (_NOW, ("channel", CHANNEL), ("consumer_tag", STR)),
        c.Get: (_NOW, ("channel", CHANNEL), ("vhost", STR), ("queue", STR), ("no_ack", BOOL)),
        c.Ack: (_NOW, ("channel", CHANNEL), ("delivery_tag", U64), ("multiple", BOOL)),
        c.Nack: (
            _NOW,
            ("channel", CHANNEL),
            ("delivery_tag", U64),
            ("multiple", BOOL),
            ("requeue", BOOL),
            ("reject", BOOL),
        ),
        c.Recover: (_NOW, ("channel", CHANNEL), ("requeue", BOOL)),
        c.AckMany: (_NOW, ("channel", CHANNEL), ("delivery_tags", U64S)),
        c.SetLeader: (
            _NOW,
            ("vhost", STR),
            ("queue", STR),
            ("leader", STR),
            ("expect", STR),
        ),
        c.Member: (
            _NOW,
            ("name", STR),
            ("raft", STR),
            ("link", STR),
            ("amqp", STR),
            ("management", STR),
        ),
        c.NodeDown: (_NOW, ("node", STR)),
        c.NodeUp: (_NOW, ("node", STR)),
        c.ForgetMember: (_NOW, ("node", STR)),
        c.DropQueue: (_NOW, ("vhost", STR), ("queue", STR), ("touched", I64)),
        c.Persist: (
            _NOW,
            ("vhost", STR),
            ("queue", STR),
            ("exchange", STR),
            ("routing_key", STR),
            ("properties", BYTES),
            ("props", PROPS),
            ("body", BYTES),
            ("redelivered", BOOL),
            ("delivery_count", I64),
        ),
        c.Settle: (_NOW, ("vhost", STR), ("queue", STR), ("gone", U64S), ("returned", U64S)),
    }
)


class CodecError(ValueError):
    """Bytes that are not an entry this version reads, or a command it cannot encode."""


_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_HEAD = struct.Struct(">BBB")
_BATCH_HEAD = struct.Struct(">BBI")


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _text(data: bytes, start: int, stop: int) -> str:
    return data[start:stop].decode("utf-8", "surrogatepass")


def _id_code(command_id: bytes | None) -> tuple[int, bytes]:
    if command_id is None:
        return 0, b""
    if len(command_id) > MAX_ID_LENGTH:
        raise CodecError(f"command id longer than {MAX_ID_LENGTH} bytes")
    return len(command_id) + 1, bytes(command_id)


# ---- field values (tables, headers) -----------------------------------------------------
# One tag byte, then: N none, T true, F false, i int64, I big int (u32 length, two's
# complement big-endian), f float64, s str, b bytes, x bytearray (u32 length + bytes),
# D Decimal, t datetime (u32 length + ASCII: str(Decimal), isoformat()), M mapping (u32
# count, then u32-length UTF-8 key and value each), L list, U tuple (u32 count + values).


def _encode_value(value: Any, out: list[bytes]) -> None:
    kind = type(value)
    if kind is str:
        raw = _utf8(value)
        out.append(b"s" + _U32.pack(len(raw)))
        out.append(raw)
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        if -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
            out.append(b"i" + _I64.pack(value))
        else:
            size = (value.bit_length() + 8) // 8  # room for the sign bit
            out.append(b"I" + _U32.pack(size))
            out.append(value.to_bytes(size, "big", signed=True))
    elif value is None:
        out.append(b"N")
    elif isinstance(value, Mapping):
        _encode_table(value, out, b"M")
    elif kind is list or kind is tuple:
        out.append((b"L" if kind is list else b"U") + _U32.pack(len(value)))
        for item in value:
            _encode_value(item, out)
    elif kind is float:
        out.append(b"f" + _F64.pack(value))
    elif kind is bytes or kind is bytearray:
        out.append((b"b" if kind is bytes else b"x") + _U32.pack(len(value)))
        out.append(bytes(value))
    elif kind is Decimal or kind is datetime.datetime:
        raw = (str(value) if kind is Decimal else value.isoformat()).encode("ascii")
        out.append((b"D" if kind is Decimal else b"t") + _U32.pack(len(raw)))
        out.append(raw)
    else:
        _encode_subclass(value, out)


def _encode_subclass(value: Any, out: list[bytes]) -> None:
    """Subclasses of the carried types (IntEnum, str enums, ...) travel as their base."""
    if isinstance(value, datetime.datetime):
        raw = value.isoformat().encode("ascii")
        out.append(b"t" + _U32.pack(len(raw)))
        out.append(raw)
        return
    bases: tuple[tuple[type, Callable[[Any], Any]], ...] = (
        (int, int.__int__),  # bool cannot be subclassed
        (str, str.__str__),
        (float, float.__float__),
        (bytes, bytes),
        (bytearray, bytearray),
        (Decimal, Decimal),
        (list, list),
        (tuple, tuple),
    )
    for kind, base in bases:
        if isinstance(value, kind):
            _encode_value(base(value), out)
            return
    raise CodecError(f"no encoding for a field value of type {type(value).__name__}")


def _encode_table(table: Mapping[str, Any], out: list[bytes], tag: bytes = b"") -> None:
    pack = _U32.pack
    append = out.append
    append(tag + pack(len(table)))
    for key, value in table.items():
        if type(key) is not str:
            if not isinstance(key, str):
                raise CodecError(f"field table key {key!r} is not a string")
            key = str.__str__(key)
        raw = key.encode("utf-8", "surrogatepass")
        append(pack(len(raw)))
        append(raw)
        if type(value) is str:  # inline (the common case)
            raw = value.encode("utf-8", "surrogatepass")
            append(b"s" + pack(len(raw)))
            append(raw)
        elif value is None:
            append(b"N")
        else:
            _encode_value(value, out)


def _table_bytes(table: Mapping[str, Any]) -> bytes:
    if not table:
        return b"\x00\x00\x00\x00"
    out: list[bytes] = []
    _encode_table(table, out)
    return b"".join(out)


def _sized(data: bytes, off: int, end: int) -> tuple[int, int]:
    """(start, stop) of the u32-length-prefixed run at `off`, checked against `end`."""
    if off + 4 > end:
        raise CodecError("truncated length")
    (length,) = _U32.unpack_from(data, off)
    start = off + 4
    stop = start + length
    if stop > end:
        raise CodecError("value overruns its container")
    return start, stop


def _decode_value(data: bytes, off: int, end: int) -> tuple[Any, int]:
    if off >= end:
        raise CodecError("missing field value")
    tag = data[off]
    off += 1
    if tag == 0x73:  # s
        start, stop = _sized(data, off, end)
        return _text(data, start, stop), stop
    if tag == 0x69:  # i
        if off + 8 > end:
            raise CodecError("truncated int")
        return _I64.unpack_from(data, off)[0], off + 8
    if tag == 0x54:  # T
        return True, off
    if tag == 0x46:  # F
        return False, off
    if tag == 0x4E:  # N
        return None, off
    if tag == 0x4D:  # M
        return _decode_table(data, off, end)
    if tag == 0x4C or tag == 0x55:  # L U
        if off + 4 > end:
            raise CodecError("truncated array")
        (count,) = _U32.unpack_from(data, off)
        off += 4
        items: list[Any] = []
        for _ in range(count):
            item, off = _decode_value(data, off, end)
            items.append(item)
        return (items if tag == 0x4C else tuple(items)), off
    if tag == 0x66:  # f
        if off + 8 > end:
            raise CodecError("truncated float")
        return _F64.unpack_from(data, off)[0], off + 8
    if tag == 0x62 or tag == 0x78:  # b x
        start, stop = _sized(data, off, end)
        return (data[start:stop] if tag == 0x62 else bytearray(data[start:stop])), stop
    if tag == 0x49:  # I
        start, stop = _sized(data, off, end)
        return int.from_bytes(data[start:stop], "big", signed=True), stop
    if tag == 0x44:  # D
        start, stop = _sized(data, off, end)
        return Decimal(data[start:stop].decode("ascii")), stop
    if tag == 0x74:  # t
        start, stop = _sized(data, off, end)
        return datetime.datetime.fromisoformat(data[start:stop].decode("ascii")), stop
    raise CodecError(f"unknown field value tag {tag:#04x}")


def _decode_table(data: bytes, off: int, end: int) -> tuple[dict[str, Any], int]:
    if off + 4 > end:
        raise CodecError("truncated table")
    unpack = _U32.unpack_from
    (count,) = unpack(data, off)
    off += 4
    table: dict[str, Any] = {}
    for _ in range(count):
        if off + 5 > end:  # a key's length and a value's tag at least
            raise CodecError("truncated table entry")
        (size,) = unpack(data, off)
        start = off + 4
        off = start + size
        if off >= end:
            raise CodecError("table entry overruns its container")
        key = data[start:off].decode("utf-8", "surrogatepass")
        if data[off] == 0x73 and off + 5 <= end:  # a string value, inline (the common case)
            (size,) = unpack(data, off + 1)
            start = off + 5
            off = start + size
            if off > end:
                raise CodecError("value overruns its container")
            table[key] = data[start:off].decode("utf-8", "surrogatepass")
        else:
            table[key], off = _decode_value(data, off, end)
    return table, off


def _table_from(data: bytes, start: int, stop: int) -> dict[str, Any]:
    table, off = _decode_table(data, start, stop)
    if off != stop:
        raise CodecError("bytes after a field table")
    return table


# ---- Properties ---------------------------------------------------------------------------
# flags (u8: 1 priority, 2 expiration, 4 headers), delivery_mode (i64), then priority
# (i64), expiration (u32 length + UTF-8) and headers (a table), each only if flagged.

_PROPS_HEAD = struct.Struct(">Bq")
# Properties are frozen: the plain ones (only a delivery mode) are shared, not rebuilt.
_PLAIN_PROPS: tuple[Properties, ...] = tuple(
    new_properties(mode, None, None, None) for mode in range(256)
)


def _props_bytes(props: Properties) -> bytes:
    priority, expiration, headers = props.priority, props.expiration, props.headers
    if priority is None and expiration is None and headers is None:
        return _PROPS_HEAD.pack(0, props.delivery_mode)
    flags = (
        (0 if priority is None else 1)
        | (0 if expiration is None else 2)
        | (0 if headers is None else 4)
    )
    out = [_PROPS_HEAD.pack(flags, props.delivery_mode)]
    if priority is not None:
        out.append(_I64.pack(priority))
    if expiration is not None:
        raw = _utf8(expiration)
        out.append(_U32.pack(len(raw)))
        out.append(raw)
    if headers is not None:
        _encode_table(headers, out)
    return b"".join(out)


def _props_from(data: bytes, start: int, stop: int) -> Properties:
    if start + 9 > stop:
        raise CodecError("truncated properties")
    flags: int
    delivery_mode: int
    flags, delivery_mode = _PROPS_HEAD.unpack_from(data, start)
    off = start + 9
    if not flags:
        if off != stop:
            raise CodecError("bytes after properties")
        if 0 <= delivery_mode <= 255:
            return _PLAIN_PROPS[delivery_mode]
        return new_properties(delivery_mode, None, None, None)
    if flags & ~7:
        raise CodecError(f"unknown properties flags {flags:#04x}")
    priority: int | None = None
    expiration: str | None = None
    headers: dict[str, Any] | None = None
    if flags & 1:
        if off + 8 > stop:
            raise CodecError("truncated priority")
        (priority,) = _I64.unpack_from(data, off)
        off += 8
    if flags & 2:
        begin, off = _sized(data, off, stop)
        expiration = _text(data, begin, off)
    if flags & 4:
        headers, off = _decode_table(data, off, stop)
    if off != stop:
        raise CodecError("bytes after properties")
    return new_properties(delivery_mode, priority, expiration, headers)


# ---- commands, driven by their layouts ---------------------------------------------------


def _u64s_bytes(values: tuple[int, ...]) -> bytes:
    if type(values) is not tuple:
        raise CodecError(f"expected a tuple of delivery tags, got {type(values).__name__}")
    try:
        return struct.pack(f">{len(values)}Q", *values)
    except struct.error as exc:
        raise CodecError(f"delivery tags out of range: {exc}") from None


def _u64s_from(data: bytes, start: int, stop: int) -> tuple[int, ...]:
    if (stop - start) % 8:
        raise CodecError("delivery tags: length not a multiple of 8")
    values: tuple[int, ...] = struct.unpack_from(f">{(stop - start) // 8}Q", data, start)
    return values


_VARIABLE_ENCODERS: Mapping[str, Callable[[Any], bytes]] = MappingProxyType(
    {STR: _utf8, BYTES: bytes, TABLE: _table_bytes, PROPS: _props_bytes, U64S: _u64s_bytes}
)
_VARIABLE_DECODERS: Mapping[str, Callable[[bytes, int, int], Any]] = MappingProxyType(
    {
        STR: _text,
        BYTES: lambda data, start, stop: data[start:stop],
        TABLE: _table_from,
        PROPS: _props_from,
        U64S: _u64s_from,
    }
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    cls: type[c.Command]
    tag: int
    fields: Layout
    head: struct.Struct  # >BBB, then each fixed field and each variable field's length


def _compile(cls: type[c.Command], layout: Layout) -> _Compiled:
    codes = "".join(_FIXED.get(kind, "I") for _, kind in layout)
    for name, kind in layout:
        if kind not in _FIXED and kind not in _VARIABLE:
            raise ValueError(f"{cls.__name__}.{name}: unknown field kind {kind!r}")
    return _Compiled(cls, TAGS[cls], layout, struct.Struct(">BBB" + codes))


def _generic_encode(compiled: _Compiled, command: c.Command, command_id: bytes | None) -> bytes:
    code, raw_id = _id_code(command_id)
    values: list[Any] = [VERSION, compiled.tag, code]
    parts = [b"", raw_id]
    for name, kind in compiled.fields:
        value = getattr(command, name)
        if kind is CHANNEL:
            values.append(value.conn)
            values.append(value.channel)
        elif kind is BOOL:
            values.append(1 if value else 0)
        elif kind is I64 or kind is U64:
            values.append(value)
        else:
            blob = _VARIABLE_ENCODERS[kind](value)
            values.append(len(blob))
            parts.append(blob)
    parts[0] = compiled.head.pack(*values)
    return b"".join(parts)


def _generic_decode(
    compiled: _Compiled, data: bytes, off: int, end: int
) -> tuple[c.Command, bytes | None, int]:
    head = compiled.head
    if off + head.size > end:
        raise CodecError(f"truncated {compiled.cls.__name__}")
    values = head.unpack_from(data, off)
    pos = off + head.size
    command_id, pos = _read_id(values[2], data, pos, end)
    fields: dict[str, Any] = {}
    index = 3
    for name, kind in compiled.fields:
        if kind is CHANNEL:
            fields[name] = ChannelRef(values[index], values[index + 1])
            index += 2
            continue
        value = values[index]
        index += 1
        if kind is BOOL:
            fields[name] = _bool(value)
        elif kind is I64 or kind is U64:
            fields[name] = value
        else:
            stop = pos + value
            if stop > end:
                raise CodecError(f"{compiled.cls.__name__}.{name} overruns the entry")
            fields[name] = _VARIABLE_DECODERS[kind](data, pos, stop)
            pos = stop
    return compiled.cls(**fields), command_id, pos


def _bool(value: int) -> bool:
    if value > 1:
        raise CodecError(f"boolean field holds {value}")
    return value == 1


def _read_id(code: int, data: bytes, pos: int, end: int) -> tuple[bytes | None, int]:
    if not code:
        return None, pos
    stop = pos + code - 1
    if stop > end:
        raise CodecError("truncated command id")
    return data[pos:stop], stop


# ---- the hot path: Publish and Ack, by hand (same bytes as the generic path) -----------

_PUBLISH = struct.Struct(">BBBqqHIIIBIII")
_PUBLISH_SIZE = _PUBLISH.size
_PUBLISH_TAG = TAGS[c.Publish]
_ACK = struct.Struct(">BBBqqHQB")
_ACK_SIZE = _ACK.size
_ACK_TAG = TAGS[c.Ack]
_new_publish = c.new_publish
_new_ack = c.new_ack


def _props_raw(props: Properties) -> bytes:
    """`_props_bytes`, with the common case (delivery mode only) packed directly."""
    if props.priority is None and props.expiration is None and props.headers is None:
        return _PROPS_HEAD.pack(0, props.delivery_mode)
    return _props_bytes(props)


def _encode_publish(command: c.Publish, command_id: bytes | None) -> bytes:
    code, raw_id = (0, b"") if command_id is None else _id_code(command_id)
    channel = command.channel
    vhost = command.vhost.encode("utf-8", "surrogatepass")
    exchange = command.exchange.encode("utf-8", "surrogatepass")
    key = command.routing_key.encode("utf-8", "surrogatepass")
    properties = command.properties
    props_raw = _props_raw(command.props)
    body = command.body
    head = _PUBLISH.pack(
        VERSION,
        _PUBLISH_TAG,
        code,
        command.now_ms,
        channel.conn,
        channel.channel,
        len(vhost),
        len(exchange),
        len(key),
        1 if command.mandatory else 0,
        len(properties),
        len(props_raw),
        len(body),
    )
    return b"".join((head, raw_id, vhost, exchange, key, properties, props_raw, body))


def _decode_publish(data: bytes, off: int, end: int) -> tuple[c.Command, bytes | None, int]:
    if off + _PUBLISH_SIZE > end:
        raise CodecError("truncated Publish")
    (_, _, code, now_ms, conn, number, n_vhost, n_exchange, n_key, mandatory, n_properties,
     n_props, n_body) = _PUBLISH.unpack_from(data, off)  # fmt: skip
    pos = off + _PUBLISH_SIZE
    command_id: bytes | None = None
    if code:
        command_id, pos = _read_id(code, data, pos, end)
    a = pos + n_vhost
    b = a + n_exchange
    k = b + n_key
    p = k + n_properties
    q = p + n_props
    stop = q + n_body
    if stop > end:
        raise CodecError("Publish overruns the entry")
    if mandatory > 1:
        raise CodecError(f"boolean field holds {mandatory}")
    props = _props_from(data, p, q)  # (shares the plain ones)
    command = _new_publish(
        now_ms,
        ChannelRef(conn, number),
        data[pos:a].decode("utf-8", "surrogatepass"),
        data[a:b].decode("utf-8", "surrogatepass"),
        data[b:k].decode("utf-8", "surrogatepass"),
        mandatory == 1,
        data[k:p],
        props,
        data[q:stop],
    )
    return command, command_id, stop


_PERSIST = struct.Struct(">BBBqIIIIIIIBq")
_PERSIST_SIZE = _PERSIST.size
_PERSIST_TAG = TAGS[c.Persist]


def _encode_persist(command: c.Persist, command_id: bytes | None) -> bytes:
    code, raw_id = (0, b"") if command_id is None else _id_code(command_id)
    vhost = command.vhost.encode("utf-8", "surrogatepass")
    queue = command.queue.encode("utf-8", "surrogatepass")
    exchange = command.exchange.encode("utf-8", "surrogatepass")
    key = command.routing_key.encode("utf-8", "surrogatepass")
    properties = command.properties
    props_raw = _props_raw(command.props)
    body = command.body
    head = _PERSIST.pack(
        VERSION, _PERSIST_TAG, code, command.now_ms,
        len(vhost), len(queue), len(exchange), len(key), len(properties), len(props_raw),
        len(body), 1 if command.redelivered else 0, command.delivery_count,
    )  # fmt: skip
    return b"".join((head, raw_id, vhost, queue, exchange, key, properties, props_raw, body))


def _decode_persist(data: bytes, off: int, end: int) -> tuple[c.Command, bytes | None, int]:
    if off + _PERSIST_SIZE > end:
        raise CodecError("truncated Persist")
    (_, _, code, now_ms, n_vhost, n_queue, n_exchange, n_key, n_properties, n_props, n_body,
     redelivered, delivery_count) = _PERSIST.unpack_from(data, off)  # fmt: skip
    pos = off + _PERSIST_SIZE
    command_id: bytes | None = None
    if code:
        command_id, pos = _read_id(code, data, pos, end)
    a = pos + n_vhost
    b = a + n_queue
    x = b + n_exchange
    k = x + n_key
    p = k + n_properties
    q = p + n_props
    stop = q + n_body
    if stop > end:
        raise CodecError("Persist overruns the entry")
    if redelivered > 1:
        raise CodecError(f"boolean field holds {redelivered}")
    props = _props_from(data, p, q)  # (shares the plain ones)
    command = c.new_persist(
        now_ms,
        data[pos:a].decode("utf-8", "surrogatepass"),
        data[a:b].decode("utf-8", "surrogatepass"),
        data[b:x].decode("utf-8", "surrogatepass"),
        data[x:k].decode("utf-8", "surrogatepass"),
        data[k:p],
        props,
        data[q:stop],
        redelivered == 1,
        delivery_count,
    )
    return command, command_id, stop


def _encode_ack(command: c.Ack, command_id: bytes | None) -> bytes:
    code, raw_id = (0, b"") if command_id is None else _id_code(command_id)
    channel = command.channel
    head = _ACK.pack(
        VERSION,
        _ACK_TAG,
        code,
        command.now_ms,
        channel.conn,
        channel.channel,
        command.delivery_tag,
        1 if command.multiple else 0,
    )
    return head + raw_id if code else head


def _decode_ack(data: bytes, off: int, end: int) -> tuple[c.Command, bytes | None, int]:
    if off + _ACK_SIZE > end:
        raise CodecError("truncated Ack")
    _, _, code, now_ms, conn, number, delivery_tag, multiple = _ACK.unpack_from(data, off)
    pos = off + _ACK_SIZE
    command_id: bytes | None = None
    if code:
        command_id, pos = _read_id(code, data, pos, end)
    if multiple > 1:
        raise CodecError(f"boolean field holds {multiple}")
    return (
        _new_ack(now_ms, ChannelRef(conn, number), delivery_tag, multiple == 1),
        command_id,
        pos,
    )


# ---- dispatch ------------------------------------------------------------------------------

_Encoder = Callable[[Any, bytes | None], bytes]
_Decoder = Callable[[bytes, int, int], tuple[c.Command, bytes | None, int]]


def _encoders() -> Mapping[type, _Encoder]:
    table: dict[type, _Encoder] = {}
    for cls, layout in LAYOUTS.items():
        compiled = _compile(cls, layout)
        table[cls] = partial(_generic_encode, compiled)
    table[c.Publish] = _encode_publish
    table[c.Ack] = _encode_ack
    table[c.Persist] = _encode_persist
    return MappingProxyType(table)


def _decoders() -> tuple[_Decoder | None, ...]:
    table: list[_Decoder | None] = [None] * 256
    for cls, layout in LAYOUTS.items():
        compiled = _compile(cls, layout)
        table[compiled.tag] = partial(_generic_decode, compiled)
    table[_PUBLISH_TAG] = _decode_publish
    table[_ACK_TAG] = _decode_ack
    table[_PERSIST_TAG] = _decode_persist
    return tuple(table)


_ENCODERS = _encoders()
_DECODERS = _decoders()
_DECODE_ERRORS = (
    struct.error,
    IndexError,
    UnicodeError,
    ValueError,
    TypeError,
    ArithmeticError,
    RecursionError,
)


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if type(data) is bytes else bytes(data)


def _decode_at(data: bytes, off: int, end: int) -> tuple[c.Command, bytes | None, int]:
    if off + 3 > end:
        raise CodecError("truncated entry header")
    version = data[off]
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version} (this one reads {VERSION})")
    tag = data[off + 1]
    decoder = _DECODERS[tag]
    if decoder is None:
        what = "a batch inside an entry" if tag == BATCH_TAG else f"unknown command tag {tag}"
        raise CodecError(what)
    return decoder(data, off, end)


# ---- the public API --------------------------------------------------------------------------


def encode(command: c.AnyCommand, *, command_id: bytes | None = None) -> bytes:
    """One command as one log entry. `command_id` (<= 254 bytes) comes back from `decode`."""
    encoder = _ENCODERS.get(type(command))
    if encoder is None:
        raise CodecError(f"no tag for command type {type(command).__name__}")
    try:
        return encoder(command, command_id)
    except CodecError:
        raise
    except (struct.error, UnicodeError, OverflowError, TypeError, ValueError) as exc:
        raise CodecError(f"cannot encode {type(command).__name__}: {exc}") from exc
    except RecursionError as exc:
        raise CodecError(f"cannot encode {type(command).__name__}: nested too deep") from exc


def decode(data: bytes | bytearray | memoryview) -> tuple[c.AnyCommand, bytes | None]:
    """The command and command id of an entry written by `encode`; CodecError otherwise."""
    raw = _as_bytes(data)
    try:
        command, command_id, off = _decode_at(raw, 0, len(raw))
    except CodecError:
        raise
    except _DECODE_ERRORS as exc:
        raise CodecError(f"malformed entry: {exc!r}") from exc
    if off != len(raw):
        raise CodecError(f"{len(raw) - off} bytes after the command")
    return command, command_id  # type: ignore[return-value]


# ---- stored messages (a durable queue's log, in Raft snapshots) -------------------------

# rid, published_ms, expires_ms (-1: none), delivery_count, redelivered, then the byte
# lengths of exchange, routing key, raw properties, Properties, body; their bytes follow.
_STORED = struct.Struct(">QqqIBHHIII")
_STORED_SIZE = _STORED.size


def encode_stored(m: Message) -> bytes:
    """One stored message of a durable queue's log (its rid and replicated fields)."""
    exchange, key, props = _utf8(m.exchange), _utf8(m.routing_key), _props_bytes(m.props)
    expires = -1 if m.expires_ms is None else m.expires_ms
    head = _STORED.pack(
        m.rid, m.published_ms, expires, m.delivery_count, m.redelivered,
        len(exchange), len(key), len(m.properties), len(props), len(m.body),
    )  # fmt: skip
    return b"".join((head, exchange, key, m.properties, props, m.body))


def decode_stored(data: bytes, off: int) -> tuple[Message, int]:
    """The stored message `encode_stored` wrote at `off`, and the offset after it."""
    try:
        rid, published, expires, count, redelivered, le, lk, lp, lq, lb = _STORED.unpack_from(
            data, off
        )
        p = off + _STORED_SIZE
        end = p + le + lk + lp + lq + lb
        if end > len(data):
            raise CodecError("truncated stored message")
        exchange = _text(data, p, p + le)
        p += le
        key = _text(data, p, p + lk)
        p += lk
        properties = data[p : p + lp]
        p += lp
        props = _props_from(data, p, p + lq)
        p += lq
        body = data[p:end]
    except CodecError:
        raise
    except _DECODE_ERRORS as exc:
        raise CodecError(f"malformed stored message: {exc!r}") from exc
    message = Message(
        0, exchange, key, properties, props, body, published, bool(redelivered), count,
        None if expires < 0 else expires, rid,
    )  # fmt: skip
    return message, end


def join_batch(entries: Iterable[bytes]) -> bytes:
    """One log entry carrying many entries that `encode` already wrote, in order."""
    parts = [b""]
    count = 0
    pack = _U32.pack
    for entry in entries:
        parts.append(pack(len(entry)))
        parts.append(entry)
        count += 1
    parts[0] = _BATCH_HEAD.pack(VERSION, BATCH_TAG, count)
    return b"".join(parts)


def encode_batch(
    commands: Iterable[c.AnyCommand], *, command_ids: Iterable[bytes | None] | None = None
) -> bytes:
    """Many commands as one log entry (applied in order). `command_ids`, if given, pairs
    one id (or None) with each command."""
    if command_ids is None:
        return join_batch([encode(command) for command in commands])
    commands = list(commands)
    ids = list(command_ids)
    if len(ids) != len(commands):
        raise CodecError(f"{len(commands)} commands but {len(ids)} command ids")
    return join_batch([encode(cmd, command_id=cid) for cmd, cid in zip(commands, ids, strict=True)])


def decode_batch(
    data: bytes | bytearray | memoryview,
) -> list[tuple[c.AnyCommand, bytes | None]]:
    """The (command, command id) pairs of an entry written by `encode_batch`/`join_batch`."""
    raw = _as_bytes(data)
    end = len(raw)
    try:
        if end < 6:
            raise CodecError("truncated batch header")
        version, tag, count = _BATCH_HEAD.unpack_from(raw, 0)
        if version != VERSION:
            raise CodecError(f"unsupported codec version {version} (this one reads {VERSION})")
        if tag != BATCH_TAG:
            raise CodecError(f"not a batch: command tag {tag}")
        off = 6
        out: list[tuple[c.AnyCommand, bytes | None]] = []
        append = out.append
        unpack = _U32.unpack_from
        for _ in range(count):
            if off + 4 > end:
                raise CodecError("truncated batch")
            (size,) = unpack(raw, off)
            off += 4
            stop = off + size
            if stop > end:
                raise CodecError("batch item overruns the batch")
            command, command_id, after = _decode_at(raw, off, stop)
            if after != stop:
                raise CodecError("bytes after a batch item's command")
            append((command, command_id))  # type: ignore[arg-type]
            off = stop
    except CodecError:
        raise
    except _DECODE_ERRORS as exc:
        raise CodecError(f"malformed batch: {exc!r}") from exc
    if off != end:
        raise CodecError(f"{end - off} bytes after the batch")
    return out


def decode_entry(
    data: bytes | bytearray | memoryview,
) -> list[tuple[c.AnyCommand, bytes | None]]:
    """Whatever one log entry holds, single command or batch, as (command, id) pairs."""
    raw = _as_bytes(data)
    if len(raw) >= 2 and raw[1] == BATCH_TAG:
        return decode_batch(raw)
    return [decode(raw)]
