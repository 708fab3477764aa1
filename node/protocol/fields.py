"""AMQP field tables and arrays: strict decoding, order-preserving encoding.

Rules:
- Decoding reads from a buffer by offset (no slicing of the remainder) and never reads past
  the `end` it is given; any short, overlong or unknown-typed value raises `FieldError`.
- Decoded values are what pamqp gives for the same bytes (so pamqp is the test oracle),
  with two deliberate differences: table keys that are not UTF-8 are decoded with
  replacement characters instead of failing (RabbitMQ accepts them), and a timestamp that
  does not fit a datetime stays an int instead of raising.
- Encoding is pamqp's, except that key order is kept (RabbitMQ keeps it), floats are
  written as doubles ('d', lossless), and `bytes` values are written as longstr 'S' (that
  is how a non-UTF-8 longstr decodes, so such tables round-trip).
Imports only the standard library; no I/O.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from collections.abc import Mapping, Sequence
from typing import Any

_U8 = struct.Struct(">B")
_I8 = struct.Struct(">b")
_U16 = struct.Struct(">H")
_I16 = struct.Struct(">h")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
_DEC = struct.Struct(">Bi")

Buffer = bytes | bytearray | memoryview


class FieldError(ValueError):
    """Bytes that do not decode as the field type they claim to be."""


def timestamp_value(raw: int) -> datetime.datetime | int:
    """pamqp's reading of a timestamp (values past 2106 are taken as milliseconds)."""
    seconds: float = raw / 1000.0 if raw > 0xFFFFFFFF else raw
    try:
        return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return raw


def _longstr(data: Buffer, off: int, end: int) -> tuple[str | bytes, int]:
    (length,) = _U32.unpack_from(data, off)
    off += 4
    stop = off + length
    if stop > end:
        raise FieldError("longstr overruns its container")
    raw = bytes(data[off:stop])
    try:
        return raw.decode("utf-8"), stop
    except UnicodeDecodeError:
        return raw, stop


def decode_value(data: Buffer, off: int, end: int) -> tuple[Any, int]:
    """Decode one tagged field value at `off`; return it and the offset after it."""
    if off >= end:
        raise FieldError("missing field value")
    tag = data[off]
    off += 1
    value: Any
    if tag == 0x53:  # 'S'
        return _longstr(data, off, end)
    if tag == 0x49:  # 'I'
        (value,) = _I32.unpack_from(data, off)
        off += 4
    elif tag == 0x74:  # 't'
        value = _U8.unpack_from(data, off)[0] != 0
        off += 1
    elif tag == 0x46:  # 'F'
        return decode_table(data, off, end)
    elif tag == 0x6C or tag == 0x4C:  # 'l', 'L' (pamqp reads both as signed)
        (value,) = _I64.unpack_from(data, off)
        off += 8
    elif tag == 0x62:  # 'b'
        (value,) = _I8.unpack_from(data, off)
        off += 1
    elif tag == 0x42:  # 'B'
        (value,) = _U8.unpack_from(data, off)
        off += 1
    elif tag == 0x73:  # 's'
        (value,) = _I16.unpack_from(data, off)
        off += 2
    elif tag == 0x75:  # 'u'
        (value,) = _U16.unpack_from(data, off)
        off += 2
    elif tag == 0x69:  # 'i'
        (value,) = _U32.unpack_from(data, off)
        off += 4
    elif tag == 0x66:  # 'f'
        (value,) = _F32.unpack_from(data, off)
        off += 4
    elif tag == 0x64:  # 'd'
        (value,) = _F64.unpack_from(data, off)
        off += 8
    elif tag == 0x44:  # 'D'
        scale, raw = _DEC.unpack_from(data, off)
        value = decimal.Decimal(raw) * (decimal.Decimal(10) ** -scale)
        off += 5
    elif tag == 0x41:  # 'A'
        return decode_array(data, off, end)
    elif tag == 0x54:  # 'T'
        (raw_ts,) = _U64.unpack_from(data, off)
        value = timestamp_value(raw_ts)
        off += 8
    elif tag == 0x56:  # 'V'
        value = None
    elif tag == 0x78:  # 'x'
        (length,) = _U32.unpack_from(data, off)
        off += 4
        if off + length > end:
            raise FieldError("byte array overruns its container")
        value = bytearray(data[off : off + length])
        off += length
    else:
        raise FieldError(f"unknown field type {tag!r}")
    if off > end:
        raise FieldError("field value overruns its container")
    return value, off


def decode_table(data: Buffer, off: int, end: int) -> tuple[dict[str, Any], int]:
    """Decode a length-prefixed field table at `off`; return it and the offset after it."""
    try:
        (length,) = _U32.unpack_from(data, off)
    except struct.error as exc:
        raise FieldError("truncated table length") from exc
    off += 4
    stop = off + length
    if stop > end:
        raise FieldError("table overruns its container")
    table: dict[str, Any] = {}
    try:
        while off < stop:
            klen = data[off]
            off += 1
            kend = off + klen
            if kend > stop:
                raise FieldError("table key overruns the table")
            key = bytes(data[off:kend]).decode("utf-8", "replace")
            table[key], off = decode_value(data, kend, stop)
    except (struct.error, IndexError) as exc:
        raise FieldError("truncated table") from exc
    return table, stop


def decode_array(data: Buffer, off: int, end: int) -> tuple[list[Any], int]:
    """Decode a length-prefixed field array at `off`."""
    try:
        (length,) = _U32.unpack_from(data, off)
    except struct.error as exc:
        raise FieldError("truncated array length") from exc
    off += 4
    stop = off + length
    if stop > end:
        raise FieldError("array overruns its container")
    items: list[Any] = []
    try:
        while off < stop:
            value, off = decode_value(data, off, stop)
            items.append(value)
    except (struct.error, IndexError) as exc:
        raise FieldError("truncated array") from exc
    return items, stop


def table_from_bytes(data: bytes) -> dict[str, Any]:
    """Decode a table whose bytes are exactly `data` (length prefix included)."""
    table, off = decode_table(data, 0, len(data))
    if off != len(data):
        raise FieldError("bytes after the table")
    return table


# ---- Encoding ------------------------------------------------------------------------------


def shortstr(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"shortstr longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def longstr(value: str | bytes | bytearray) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return _U32.pack(len(raw)) + raw


def _int_value(value: int) -> bytes:
    if -128 <= value <= 127:
        return b"b" + _I8.pack(value)
    if -32768 <= value <= 32767:
        return b"s" + _I16.pack(value)
    if 0 <= value <= 65535:
        return b"u" + _U16.pack(value)
    if -2147483648 <= value <= 2147483647:
        return b"I" + _I32.pack(value)
    if 0 <= value <= 4294967295:
        return b"i" + _U32.pack(value)
    if -9223372036854775808 <= value <= 9223372036854775807:
        return b"l" + _I64.pack(value)
    raise ValueError(f"integer out of the 64-bit range: {value}")


def _decimal_value(value: decimal.Decimal) -> bytes:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise ValueError(f"cannot encode {value} as a decimal")
    if exponent > 0:
        scale, mantissa = 0, int(value)
    else:
        scale, mantissa = -exponent, int(value.scaleb(-exponent))
    if not 0 <= scale <= 255 or not -2147483648 <= mantissa <= 2147483647:
        raise ValueError(f"decimal out of range: {value}")
    return b"D" + _DEC.pack(scale, mantissa)


def encode_value(value: Any) -> bytes:
    """One tagged field value, choosing the tag from the Python type."""
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        return _int_value(value)
    if isinstance(value, str | bytes):
        return b"S" + longstr(value)
    if isinstance(value, float):
        return b"d" + _F64.pack(value)
    if isinstance(value, decimal.Decimal):
        return _decimal_value(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            value = value.replace(tzinfo=datetime.UTC)
        return b"T" + _U64.pack(int(value.timestamp()))
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    if isinstance(value, bytearray):
        return b"x" + _U32.pack(len(value)) + bytes(value)
    if isinstance(value, Sequence):
        return b"A" + encode_array(value)
    if value is None:
        return b"V"
    raise ValueError(f"no AMQP field type for {type(value).__name__}")


def encode_table(table: Mapping[str, Any] | None) -> bytes:
    """A field table with its 4-byte length prefix (an empty or None table is 4 zeros)."""
    if not table:
        return b"\x00\x00\x00\x00"
    parts = []
    for key, value in table.items():
        parts.append(shortstr(key))
        parts.append(encode_value(value))
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def encode_array(items: Sequence[Any]) -> bytes:
    body = b"".join(encode_value(item) for item in items)
    return _U32.pack(len(body)) + body
