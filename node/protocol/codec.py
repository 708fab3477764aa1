"""AMQP 0-9-1 frames: a stream decoder that owns its buffer, and frame encoders.

Rules:
- `FrameDecoder` never hands raw reads to pamqp: it slices exact frames out of its own
  buffer, checks each frame's size against `frame_max` as soon as the 7 header bytes are
  in (like RabbitMQ, before the payload arrives) and checks the 0xCE end octet.
- basic.publish and basic.ack are decoded by hand into `PublishMethod`/`AckMethod` (the
  hot path); every other method goes through `methods.decode_method` (pamqp objects).
- Content properties stay raw bytes end to end; `peek_properties` reads the four the
  broker needs and validates the rest of the block by skipping it.
- Every malformed input raises `ProtocolError` with RabbitMQ 3.10's code and text.
- Encoders return complete frames; bodies are split so that no frame exceeds frame_max.
Imports pamqp and the stdlib only. No sockets, no clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from pamqp import base, commands

from .constants import (
    AMQP_HEADER,
    AMQP_HEADER_ALT,
    DEFAULT_FRAME_MAX,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
)
from .errors import (
    BadProtocolHeader,
    PropertiesError,
    cannot_decode,
    frame_error,
    frame_too_large,
)
from .fields import (
    FieldError,
    decode_table,
    encode_table,
    encode_value,
    shortstr,
    timestamp_value,
)
from .methods import decode_method, encode_arguments

__all__ = [
    "AMQP_HEADER",
    "HEARTBEAT_FRAME",
    "AckMethod",
    "ContentBody",
    "ContentHeader",
    "DeliverWriter",
    "Frame",
    "FrameDecoder",
    "Heartbeat",
    "MethodFrame",
    "PeekedProperties",
    "ProtocolHeader",
    "PublishMethod",
    "decode_properties",
    "encode_ack",
    "encode_content",
    "encode_deliver",
    "encode_method",
    "encode_properties",
    "peek_properties",
]

HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"

_FRAME_HEAD = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_CONTENT_HEAD = struct.Struct(">HHQ")
_HEADER_FRAME_HEAD = struct.Struct(">BHIHHQ")  # frame head + class, weight, body size
_ACK_FRAME = struct.Struct(">BHIHHQBB")
_PUBLISH_ID = 0x003C0028
_ACK_ID = 0x003C0050
_END = b"\xce"


# ---- Frame events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProtocolHeader:
    """The 8-byte protocol header (RabbitMQ's alternative 0-9-1 header b"AMQP\\x01\\x01\\x00\\x09"
    is reported as 0-9-1 too, since that is what it means)."""

    channel: ClassVar[int] = 0
    major: int
    minor: int
    revision: int


@dataclass(frozen=True, slots=True)
class MethodFrame:
    channel: int
    method: base.Frame


@dataclass(frozen=True, slots=True)
class ContentHeader:
    """A content header; `properties` is the raw property block (flags + values)."""

    channel: int
    class_id: int
    body_size: int
    properties: bytes
    weight: int = 0


@dataclass(frozen=True, slots=True)
class ContentBody:
    channel: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Heartbeat:
    channel: int


@dataclass(frozen=True, slots=True)
class PublishMethod:
    """basic.publish, decoded by hand. Names that are not UTF-8 (RabbitMQ does not check
    them here) come out with U+FFFD replacement characters."""

    class_id: ClassVar[int] = 60
    method_id: ClassVar[int] = 40
    channel: int
    exchange: str
    routing_key: str
    mandatory: bool
    immediate: bool


@dataclass(frozen=True, slots=True)
class AckMethod:
    """basic.ack, decoded by hand."""

    class_id: ClassVar[int] = 60
    method_id: ClassVar[int] = 80
    channel: int
    delivery_tag: int
    multiple: bool


_set_ack_channel, _set_ack_tag, _set_ack_multiple = (
    AckMethod.__dict__[name].__set__ for name in AckMethod.__slots__
)


def ack_method(channel: int, delivery_tag: int, multiple: bool) -> AckMethod:
    """Fast `AckMethod(...)` for the hot path (a frozen dataclass's __init__ is slow)."""
    event: AckMethod = object.__new__(AckMethod)
    _set_ack_channel(event, channel)
    _set_ack_tag(event, delivery_tag)
    _set_ack_multiple(event, multiple)
    return event


Frame = (
    ProtocolHeader
    | MethodFrame
    | ContentHeader
    | ContentBody
    | Heartbeat
    | PublishMethod
    | AckMethod
)


# ---- Decoding --------------------------------------------------------------------------------


class FrameDecoder:
    """Bytes in, frames out. `feed` appends, `next_frame` returns one frame or None when
    more bytes are needed. `frame_max` may be changed at any time (after tune-ok); 0 means
    no limit.

    `next_raw` is the layer underneath: it checks size and end octet and returns where the
    payload lies in `buffer`; `frame_at` turns that into a frame object. The connection uses
    the raw layer for publishes, so that no per-frame objects are made on the hot path."""

    __slots__ = ("_expect_header", "_pos", "buffer", "frame_max")

    def __init__(
        self, frame_max: int = DEFAULT_FRAME_MAX, expect_protocol_header: bool = True
    ) -> None:
        self.frame_max = frame_max
        self._expect_header = expect_protocol_header
        # what `next_raw` offsets point into (read only; valid until the next `feed`)
        self.buffer: bytes | bytearray = b""
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded."""
        return len(self.buffer) - self._pos

    @property
    def expecting_header(self) -> bool:
        return self._expect_header

    def feed(self, data: bytes) -> None:
        if not data:
            return
        buf = self.buffer
        pos = self._pos
        if pos >= len(buf):
            # Nothing pending: parse straight from the caller's bytes, no copy.
            self.buffer = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif type(buf) is bytes:
            grown = bytearray(memoryview(buf)[pos:])
            grown += data
            self.buffer = grown
            self._pos = 0
        else:
            assert isinstance(buf, bytearray)
            if pos > 65536 or pos * 2 > len(buf):
                del buf[:pos]
                self._pos = 0
            buf += data

    def next_frame(self) -> Frame | None:
        if self._expect_header:
            return self._protocol_header()
        raw = self.next_raw()
        if raw is None:
            return None
        return self.frame_at(*raw)

    def _protocol_header(self) -> ProtocolHeader | None:
        buf = self.buffer
        pos = self._pos
        if len(buf) - pos < 8:
            return None
        header = bytes(buf[pos : pos + 8])
        if header != AMQP_HEADER and header != AMQP_HEADER_ALT:
            raise BadProtocolHeader(header)
        self._pos = pos + 8
        self._expect_header = False
        return ProtocolHeader(0, 9, 1)

    def next_raw(self) -> tuple[int, int, int, int] | None:
        """(frame type, channel, payload start, payload end) of the next whole frame in
        `buffer`, or None. Checks frame_max (as soon as the header is in) and the end octet.
        Must not be called while a protocol header is expected."""
        buf = self.buffer
        pos = self._pos
        if len(buf) - pos < 7:
            return None
        frame_type, channel, size = _FRAME_HEAD.unpack_from(buf, pos)
        frame_max = self.frame_max
        if size > frame_max and frame_max:
            raise frame_too_large(frame_type, size, frame_max)
        start = pos + 7
        end = start + size
        if end >= len(buf):
            return None
        if buf[end] != FRAME_END:
            raise frame_error(
                frame_type, bytes(buf[start:end]), f"{{invalid_frame_end_marker,{buf[end]}}}"
            )
        self._pos = end + 1
        return frame_type, channel, start, end

    def frame_at(self, frame_type: int, channel: int, start: int, end: int) -> Frame:
        """The frame object for a payload `next_raw` located."""
        buf = self.buffer
        if frame_type == FRAME_METHOD:
            if end - start < 4:
                raise frame_error(frame_type, bytes(buf[start:end]), "unknown_frame")
            (method_id,) = _U32.unpack_from(buf, start)
            if method_id == _PUBLISH_ID:
                exchange, routing_key, bits = parse_publish(buf, start + 4, end)
                return PublishMethod(channel, exchange, routing_key, bits & 1 == 1, bits & 2 == 2)
            if method_id == _ACK_ID:
                tag, multiple = parse_ack(buf, start + 4, end)
                return ack_method(channel, tag, multiple)
            args = bytes(buf[start + 4 : end])
            return MethodFrame(channel, decode_method(method_id >> 16, method_id & 0xFFFF, args))
        if frame_type == FRAME_BODY:
            return ContentBody(channel, body_at(buf, start, end))
        if frame_type == FRAME_HEADER:
            class_id, weight, body_size, properties = parse_content_header(buf, start, end)
            return ContentHeader(channel, class_id, body_size, properties, weight)
        if frame_type == FRAME_HEARTBEAT and end == start:
            return Heartbeat(channel)
        raise frame_error(frame_type, bytes(buf[start:end]), "unknown_frame")


def body_at(buf: bytes | bytearray, start: int, end: int) -> bytes:
    """A body frame's payload as bytes: one copy, whatever the buffer type."""
    if type(buf) is bytes:
        return buf[start:end]
    return bytes(memoryview(buf)[start:end])


def parse_publish(buf: bytes | bytearray, off: int, end: int) -> tuple[str, str, int]:
    """basic.publish arguments at buf[off:end] -> (exchange, routing key, flag bits).
    Names that are not UTF-8 get replacement characters (RabbitMQ does not check them)."""
    # ticket (short), exchange (shortstr), routing key (shortstr), mandatory + immediate bits
    if off + 3 <= end:
        ex_end = off + 3 + buf[off + 2]
        if ex_end < end:
            rk_end = ex_end + 1 + buf[ex_end]
            if rk_end + 1 == end:
                return (
                    buf[off + 3 : ex_end].decode("utf-8", "replace") if ex_end > off + 3 else "",
                    buf[ex_end + 1 : rk_end].decode("utf-8", "replace"),
                    buf[rk_end],
                )
    raise cannot_decode(60, 40, bytes(buf[off:end]))


def parse_ack(buf: bytes | bytearray, off: int, end: int) -> tuple[int, bool]:
    """basic.ack arguments at buf[off:end] -> (delivery tag, multiple)."""
    if end - off != 9:
        raise cannot_decode(60, 80, bytes(buf[off:end]))
    return _U64.unpack_from(buf, off)[0], buf[end - 1] & 1 == 1


def parse_content_header(
    buf: bytes | bytearray, start: int, end: int
) -> tuple[int, int, int, bytes]:
    """A content header payload -> (class id, weight, body size, raw properties)."""
    if end - start < 12:
        raise frame_error(FRAME_HEADER, bytes(buf[start:end]), "unknown_frame")
    class_id, weight, body_size = _CONTENT_HEAD.unpack_from(buf, start)
    return class_id, weight, body_size, bytes(buf[start + 12 : end])


# ---- Encoding --------------------------------------------------------------------------------


def encode_method(channel: int, method: base.Frame) -> bytes:
    """One method frame."""
    payload = encode_arguments(method)
    return _FRAME_HEAD.pack(FRAME_METHOD, channel, len(payload)) + payload + _END


def _body_frames(channel: int, body: bytes, frame_max: int, parts: list[bytes]) -> None:
    room = frame_max - FRAME_OVERHEAD if frame_max else len(body)
    size = len(body)
    if size <= room:
        if size:
            parts.append(_FRAME_HEAD.pack(FRAME_BODY, channel, size))
            parts.append(body)
            parts.append(_END)
        return
    view = memoryview(body)
    for start in range(0, size, room):
        chunk = view[start : start + room]
        parts.append(_FRAME_HEAD.pack(FRAME_BODY, channel, len(chunk)))
        parts.append(chunk)  # type: ignore[arg-type]  # joined below, never kept
        parts.append(_END)


def encode_content(
    channel: int, method: base.Frame, properties: bytes, body: bytes, frame_max: int
) -> bytes:
    """A content-bearing method, its content header and as many body frames as needed
    (none for an empty body)."""
    payload = encode_arguments(method)
    parts = [
        _FRAME_HEAD.pack(FRAME_METHOD, channel, len(payload)),
        payload,
        _END,
        _HEADER_FRAME_HEAD.pack(
            FRAME_HEADER, channel, 12 + len(properties), method.index >> 16, 0, len(body)
        ),
        properties,
        _END,
    ]
    _body_frames(channel, body, frame_max, parts)
    return b"".join(parts)


def encode_deliver(
    channel: int,
    consumer_tag: str,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    properties: bytes,
    body: bytes,
    frame_max: int,
) -> bytes:
    """basic.deliver + content header + body frames, byte for byte what pamqp would make."""
    tag = consumer_tag.encode()
    ex = exchange.encode()
    rk = routing_key.encode()
    method_size = 16 + len(tag) + len(ex) + len(rk)
    parts = [
        _FRAME_HEAD.pack(FRAME_METHOD, channel, method_size),
        b"\x00\x3c\x00\x3c",
        len(tag).to_bytes(1, "big"),
        tag,
        _U64.pack(delivery_tag),
        b"\x01" if redelivered else b"\x00",
        len(ex).to_bytes(1, "big"),
        ex,
        len(rk).to_bytes(1, "big"),
        rk,
        _END,
        _HEADER_FRAME_HEAD.pack(FRAME_HEADER, channel, 12 + len(properties), 60, 0, len(body)),
        properties,
        _END,
    ]
    size = len(body)
    if size and (size <= frame_max - FRAME_OVERHEAD or not frame_max):
        parts.append(_FRAME_HEAD.pack(FRAME_BODY, channel, size))
        parts.append(body)
        parts.append(_END)
    elif size:
        _body_frames(channel, body, frame_max, parts)
    return b"".join(parts)


_HEADER_REST = struct.Struct(">IHHQ")  # content header after type and channel: size .. body size
_DELIVER_CACHE_MAX = 1024  # distinct (channel, tag, exchange, key) kept per connection


class DeliverWriter:
    """`encode_deliver` appended straight to an output buffer, with the bytes that only
    depend on (channel, consumer tag, exchange, routing key) made once and cached (a
    bounded cache: cleared when it holds `_DELIVER_CACHE_MAX` keys). Same bytes as
    `encode_deliver`; bodies larger than one frame go through it."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str, str, str], tuple[bytes, bytes, bytes, bytes]] = {}

    def write(
        self,
        out: bytearray,
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: bytes,
        body: bytes,
        frame_max: int,
    ) -> None:
        size = len(body)
        if size > frame_max - FRAME_OVERHEAD and frame_max:
            out += encode_deliver(
                channel,
                consumer_tag,
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                properties,
                body,
                frame_max,
            )
            return
        key = (channel, consumer_tag, exchange, routing_key)
        parts = self._cache.get(key)
        if parts is None:
            parts = self._parts(channel, consumer_tag, exchange, routing_key)
        # method frame up to the consumer tag | delivery tag | redelivered .. routing key,
        # frame end, content header's type and channel | rest of the header | properties
        out += parts[0]
        out += _U64.pack(delivery_tag)
        out += parts[2] if redelivered else parts[1]
        out += _HEADER_REST.pack(12 + len(properties), 60, 0, size)
        out += properties
        if size:
            # frame end, body frame's type and channel | size | body | frame end
            out += parts[3]
            out += _U32.pack(size)
            out += body
            out += _END
        else:
            out += _END

    def _parts(
        self, channel: int, consumer_tag: str, exchange: str, routing_key: str
    ) -> tuple[bytes, bytes, bytes, bytes]:
        tag = consumer_tag.encode()
        ex = exchange.encode()
        rk = routing_key.encode()
        chan = channel.to_bytes(2, "big")
        head = (
            _FRAME_HEAD.pack(FRAME_METHOD, channel, 16 + len(tag) + len(ex) + len(rk))
            + b"\x00\x3c\x00\x3c"
            + len(tag).to_bytes(1, "big")
            + tag
        )
        rest = len(ex).to_bytes(1, "big") + ex + len(rk).to_bytes(1, "big") + rk + _END
        rest += bytes((FRAME_HEADER,)) + chan
        parts = (head, b"\x00" + rest, b"\x01" + rest, _END + bytes((FRAME_BODY,)) + chan)
        cache = self._cache
        if len(cache) >= _DELIVER_CACHE_MAX:
            cache.clear()
        cache[(channel, consumer_tag, exchange, routing_key)] = parts
        return parts


def encode_ack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """basic.ack (publisher confirms), one 21-byte frame."""
    return _ACK_FRAME.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, multiple, FRAME_END)


# ---- Content properties -------------------------------------------------------------------

# Basic.Properties in wire order: (flag bit, attribute name, kind).
_SHORTSTR, _TABLE, _OCTET, _TIMESTAMP = range(4)
_PROPERTIES: tuple[tuple[int, str, int], ...] = (
    (0x8000, "content_type", _SHORTSTR),
    (0x4000, "content_encoding", _SHORTSTR),
    (0x2000, "headers", _TABLE),
    (0x1000, "delivery_mode", _OCTET),
    (0x0800, "priority", _OCTET),
    (0x0400, "correlation_id", _SHORTSTR),
    (0x0200, "reply_to", _SHORTSTR),
    (0x0100, "expiration", _SHORTSTR),
    (0x0080, "message_id", _SHORTSTR),
    (0x0040, "timestamp", _TIMESTAMP),
    (0x0020, "message_type", _SHORTSTR),
    (0x0010, "user_id", _SHORTSTR),
    (0x0008, "app_id", _SHORTSTR),
    (0x0004, "cluster_id", _SHORTSTR),
)


def _flags(raw: bytes) -> tuple[int, int]:
    """The first flag word and the offset of the first property value. Continuation
    words (bit 0 set) are read and skipped: basic has only 14 properties."""
    if len(raw) < 2:
        raise PropertiesError("property flags are truncated")
    flags = (raw[0] << 8) | raw[1]
    off = 2
    word = flags
    while word & 1:
        if len(raw) < off + 2:
            raise PropertiesError("property flags are truncated")
        word = (raw[off] << 8) | raw[off + 1]
        off += 2
    return flags, off


# (delivery_mode (1 if absent), priority, expiration, headers)
PeekedProperties = tuple[int, int | None, str | None, dict[str, Any] | None]
_NO_PROPERTIES: PeekedProperties = (1, None, None, None)


def peek_properties(raw: bytes) -> PeekedProperties:
    """(delivery_mode (1 if absent), priority, expiration, headers) from a raw property
    block, validating the whole block. Raises `PropertiesError` when it does not decode."""
    if raw == b"\x00\x00":
        return _NO_PROPERTIES
    flags, off = _flags(raw)
    end = len(raw)
    delivery_mode = 1
    priority: int | None = None
    expiration: str | None = None
    headers: dict[str, Any] | None = None
    try:
        if flags & 0x8000:
            off += 1 + raw[off]
        if flags & 0x4000:
            off += 1 + raw[off]
        if flags & 0x2000:
            headers, off = decode_table(raw, off, end)
        if flags & 0x1000:
            delivery_mode = raw[off]
            off += 1
        if flags & 0x0800:
            priority = raw[off]
            off += 1
        if flags & 0x0400:
            off += 1 + raw[off]
        if flags & 0x0200:
            off += 1 + raw[off]
        if flags & 0x0100:
            stop = off + 1 + raw[off]
            expiration = raw[off + 1 : stop].decode("utf-8", "replace")
            off = stop
        if flags & 0x00FC:  # the rest: five shortstrs and a timestamp
            if flags & 0x0080:
                off += 1 + raw[off]
            if flags & 0x0040:
                off += 8
            if flags & 0x0020:
                off += 1 + raw[off]
            if flags & 0x0010:
                off += 1 + raw[off]
            if flags & 0x0008:
                off += 1 + raw[off]
            if flags & 0x0004:
                off += 1 + raw[off]
    except (IndexError, FieldError) as exc:
        raise PropertiesError(str(exc)) from None
    if off != end:
        raise PropertiesError("property block length does not match its flags")
    return delivery_mode, priority, expiration, headers


def decode_properties(raw: bytes) -> commands.Basic.Properties:
    """Every property, as a pamqp Basic.Properties (absent ones are None, cluster_id '').
    Shortstrs that are not UTF-8 (RabbitMQ accepts them) get replacement characters."""
    flags, off = _flags(raw)
    end = len(raw)
    props = commands.Basic.Properties.__new__(commands.Basic.Properties)
    value: Any
    try:
        for flag, name, kind in _PROPERTIES:
            if not flags & flag:
                value = "" if name == "cluster_id" else None
            elif kind == _SHORTSTR:
                stop = off + 1 + raw[off]
                if stop > end:
                    raise FieldError("shortstr overruns the property block")
                value = raw[off + 1 : stop].decode("utf-8", "replace")
                off = stop
            elif kind == _OCTET:
                value = raw[off]
                off += 1
            elif kind == _TABLE:
                value, off = decode_table(raw, off, end)
            else:
                value = timestamp_value(_U64.unpack_from(raw, off)[0])
                off += 8
            setattr(props, name, value)
    except (IndexError, FieldError, struct.error) as exc:
        raise PropertiesError(str(exc)) from None
    if off != end:
        raise PropertiesError("property block length does not match its flags")
    return props


def encode_properties(props: commands.Basic.Properties) -> bytes:
    """The raw property block for pamqp Basic.Properties (None and '' are absent, as in
    pamqp). Tables keep their key order."""
    flags = 0
    parts: list[bytes] = []
    for flag, name, kind in _PROPERTIES:
        value = getattr(props, name, None)
        if value is None or value == "":
            continue
        flags |= flag
        if kind == _SHORTSTR:
            parts.append(shortstr(value))
        elif kind == _OCTET:
            parts.append(bytes((value,)))
        elif kind == _TABLE:
            parts.append(encode_table(value))
        else:
            parts.append(_timestamp(value))
    return flags.to_bytes(2, "big") + b"".join(parts)


def _timestamp(value: Any) -> bytes:
    if isinstance(value, int):
        return _U64.pack(value)
    # a datetime (naive means UTC): same bytes as a table 'T'
    return encode_value(value)[1:]
