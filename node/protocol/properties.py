"""Rewriting a raw basic property block: replace its headers table, drop its expiration.

Rules:
- The input is a property block exactly as `node.protocol.codec` handles them (flag words,
  then the property list; no class/weight/body-size prefix). It is validated first with
  `codec.peek_properties` and raises `PropertiesError` when it does not decode.
- Every property other than headers (and expiration, when asked to drop it) keeps its
  bytes: the block is spliced, not decoded and re-encoded, so shortstrs that are not
  UTF-8 and present-but-empty properties survive (decode_properties/encode_properties
  would lose both). Continuation flag words are kept as they are.
- In the new headers table, a value equal to the old table's value under the same key
  (same Python types all the way down) keeps its old bytes, so a client's 'I' stays an
  'I'; inside a changed array, an item equal to one of the old array's items keeps that
  item's bytes. Other new values are encoded like `fields.encode_value` does, except
  integers, which are written as signed 64-bit 'l' (what RabbitMQ writes for the integers
  it adds, such as x-death `count`).
Imports the stdlib and this package only. No I/O, no clock.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .codec import peek_properties
from .fields import decode_value, encode_value, shortstr

__all__ = ["reply_to_of", "with_headers", "with_reply_to"]

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_HEADERS = 0x2000
_REPLY_TO = 0x0200
_EXPIRATION = 0x0100
_TAG_TABLE = ord("F")
_TAG_ARRAY = ord("A")

# The basic class's properties in wire order: flag bit and how their value is laid out.
_SHORTSTR, _OCTET, _TABLE, _TIMESTAMP = range(4)
_LAYOUT: tuple[tuple[int, int], ...] = (
    (0x8000, _SHORTSTR),  # content-type
    (0x4000, _SHORTSTR),  # content-encoding
    (0x2000, _TABLE),  # headers
    (0x1000, _OCTET),  # delivery-mode
    (0x0800, _OCTET),  # priority
    (0x0400, _SHORTSTR),  # correlation-id
    (0x0200, _SHORTSTR),  # reply-to
    (0x0100, _SHORTSTR),  # expiration
    (0x0080, _SHORTSTR),  # message-id
    (0x0040, _TIMESTAMP),  # timestamp
    (0x0020, _SHORTSTR),  # type
    (0x0010, _SHORTSTR),  # user-id
    (0x0008, _SHORTSTR),  # app-id
    (0x0004, _SHORTSTR),  # cluster-id
)


def with_headers(
    raw: bytes, headers: Mapping[str, Any] | None, *, without_expiration: bool = False
) -> bytes:
    """`raw` with its headers table replaced by `headers` (None: no headers property) and,
    when `without_expiration`, its expiration property removed."""
    peek_properties(raw)  # validates the whole block; raises PropertiesError
    flags = (raw[0] << 8) | raw[1]
    start = 2
    while raw[start - 1] & 1:  # a continuation flag word follows
        start += 2
    drop = _EXPIRATION if without_expiration else 0
    new_flags = flags & ~(_HEADERS | drop) & 0xFFFF
    if headers is not None:
        new_flags |= _HEADERS
    parts = [new_flags.to_bytes(2, "big"), raw[2:start]]
    off = start
    for flag, kind in _LAYOUT:
        if flags & flag:
            end = _value_end(raw, off, kind)
            value = raw[off:end]
            off = end
        else:
            value = None
        if flag == _HEADERS:
            if headers is not None:
                old = _old_table(value, 0) if value is not None else None
                parts.append(_table(headers, old))
        elif value is not None and not flag & drop:
            parts.append(value)
    return b"".join(parts)


def _spans(raw: bytes) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(flags, where the property list starts, {flag: (start, end)}) of a valid block."""
    flags = (raw[0] << 8) | raw[1]
    start = 2
    while raw[start - 1] & 1:
        start += 2
    spans: dict[int, tuple[int, int]] = {}
    off = start
    for flag, kind in _LAYOUT:
        if flags & flag:
            end = _value_end(raw, off, kind)
            spans[flag] = (off, end)
            off = end
    return flags, start, spans


def reply_to_of(raw: bytes) -> str | None:
    """The reply-to property of a valid block, or None (bytes that are not UTF-8 are
    replaced, as everywhere a name is shown)."""
    if len(raw) < 2 or not raw[0] & (_REPLY_TO >> 8):
        return None
    _flags, _start, spans = _spans(raw)
    begin, end = spans[_REPLY_TO]
    return raw[begin + 1 : end].decode("utf-8", "replace")


def with_reply_to(raw: bytes, reply_to: str) -> bytes:
    """`raw` with its reply-to property set to `reply_to` (direct reply-to rewrites it);
    every other property keeps its bytes."""
    peek_properties(raw)
    flags, start, spans = _spans(raw)
    new = shortstr(reply_to)
    if _REPLY_TO in spans:
        begin, end = spans[_REPLY_TO]
        return raw[:begin] + new + raw[end:]
    # Insert it where it belongs in wire order: after every present property before it.
    before = [end for flag, (_, end) in spans.items() if flag > _REPLY_TO]
    at = max(before, default=start)
    new_flags = (flags | _REPLY_TO).to_bytes(2, "big")
    return new_flags + raw[2:at] + new + raw[at:]


def _value_end(raw: bytes, off: int, kind: int) -> int:
    if kind == _SHORTSTR:
        return off + 1 + raw[off]
    if kind == _OCTET:
        return off + 1
    if kind == _TIMESTAMP:
        return off + 8
    (length,) = _U32.unpack_from(raw, off)
    return off + 4 + int(length)


# ---- the old table, with each value's bytes -------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Old:
    """One value of the old headers: its decoded form, its bytes (type tag included) and,
    for a table or an array, the same for what it holds."""

    value: Any
    raw: bytes
    fields: Mapping[str, _Old] | None = None
    items: tuple[_Old, ...] | None = None


def _old_table(data: bytes, off: int) -> dict[str, _Old]:
    """The table at `off` (length prefix first), already validated."""
    stop = off + 4 + _U32.unpack_from(data, off)[0]
    off += 4
    table: dict[str, _Old] = {}
    while off < stop:
        klen = data[off]
        key = data[off + 1 : off + 1 + klen].decode("utf-8", "replace")
        table[key], off = _old_value(data, off + 1 + klen, stop)
    return table


def _old_value(data: bytes, off: int, end: int) -> tuple[_Old, int]:
    value, stop = decode_value(data, off, end)
    raw = data[off:stop]
    if data[off] == _TAG_TABLE:
        return _Old(value, raw, fields=_old_table(data, off + 1)), stop
    if data[off] == _TAG_ARRAY:
        items: list[_Old] = []
        pos = off + 5
        while pos < stop:
            item, pos = _old_value(data, pos, stop)
            items.append(item)
        return _Old(value, raw, items=tuple(items)), stop
    return _Old(value, raw), stop


# ---- encoding the new table ------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 and True, or 1 and 1.0, differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _table(table: Mapping[str, Any], old: Mapping[str, _Old] | None) -> bytes:
    parts: list[bytes] = []
    for key, value in table.items():
        parts.append(shortstr(key))
        parts.append(_value(value, old.get(key) if old is not None else None))
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def _array(items: Sequence[Any], old: tuple[_Old, ...] | None) -> bytes:
    parts: list[bytes] = []
    for item in items:
        same = None
        if old is not None:
            same = next((o for o in old if _same(item, o.value)), None)
        parts.append(same.raw if same is not None else _value(item, None))
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def _value(value: Any, old: _Old | None) -> bytes:
    if old is not None and _same(value, old.value):
        return old.raw
    if isinstance(value, Mapping):
        return b"F" + _table(value, old.fields if old is not None else None)
    if isinstance(value, list | tuple):
        return b"A" + _array(value, old.items if old is not None else None)
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return b"l" + _I64.pack(value)
    return encode_value(value)
