"""Method argument codec, driven by pamqp's spec metadata, strict the way RabbitMQ is.

Rules:
- Decoded methods are pamqp `base.Frame` objects (the rest of Warren speaks pamqp), built
  without running pamqp's validators: a name RabbitMQ accepts must not be refused here.
- Decoding is strict like RabbitMQ's generated parser: arguments that run short or leave
  trailing bytes are 501 "cannot decode"; a shortstr argument that is not UTF-8 is 501
  "Malformed UTF-8 in shortstr". (basic.publish and basic.ack are decoded by hand in
  `codec`; RabbitMQ's fast path does not check publish names for UTF-8 either.)
- Encoding produces exactly pamqp's bytes for every method pamqp would accept, but never
  validates (pamqp refuses exchange names RabbitMQ allows) and writes None as zero/empty.
- `access.request` (dropped from pamqp 4, still sent by old clients) is defined here.
Imports pamqp and the stdlib only; no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from pamqp import base, commands

from .constants import NOT_IMPLEMENTED
from .errors import ProtocolError, cannot_decode, malformed_utf8
from .fields import FieldError, decode_table, encode_table


class AccessRequest(base.Frame):
    """access.request (class 30, method 10): RabbitMQ answers it with ticket 1."""

    # wire order, not alphabetical: pamqp encodes and decodes slots in this order
    __slots__: ClassVar[list[str]] = ["realm", "exclusive", "passive", "active", "write", "read"]  # noqa: RUF023
    frame_id: ClassVar[int] = 10
    index: ClassVar[int] = 0x001E000A
    name: ClassVar[str] = "Access.Request"
    synchronous: ClassVar[bool] = True
    valid_responses: ClassVar[list[str]] = ["Access.RequestOk"]
    _realm = "shortstr"
    _exclusive = "bit"
    _passive = "bit"
    _active = "bit"
    _write = "bit"
    _read = "bit"

    def __init__(
        self,
        realm: str = "/data",
        exclusive: bool = False,
        passive: bool = True,
        active: bool = True,
        write: bool = True,
        read: bool = True,
    ) -> None:
        self.realm = realm
        self.exclusive = exclusive
        self.passive = passive
        self.active = active
        self.write = write
        self.read = read


class AccessRequestOk(base.Frame):
    """access.request-ok (class 30, method 11)."""

    __slots__: ClassVar[list[str]] = ["ticket"]
    frame_id: ClassVar[int] = 11
    index: ClassVar[int] = 0x001E000B
    name: ClassVar[str] = "Access.RequestOk"
    _ticket = "short"

    def __init__(self, ticket: int = 1) -> None:
        self.ticket = ticket


# ---- Spec tables ----------------------------------------------------------------------------

_BIT, _OCTET, _SHORT, _LONG, _LONGLONG, _SHORTSTR, _LONGSTR, _TABLE = range(8)
_CODES: Mapping[str, int] = MappingProxyType(
    {
        "bit": _BIT,
        "octet": _OCTET,
        "short": _SHORT,
        "long": _LONG,
        "longlong": _LONGLONG,
        "shortstr": _SHORTSTR,
        "longstr": _LONGSTR,
        "table": _TABLE,
    }
)

MethodClass = type[base.Frame]
_Spec = tuple[MethodClass, tuple[tuple[str, int], ...]]


def _compile(cls: MethodClass) -> _Spec:
    return cls, tuple((name, _CODES[cls.amqp_type(name)]) for name in cls.__slots__)


METHODS: Mapping[int, MethodClass] = MappingProxyType(
    {
        **commands.INDEX_MAPPING,
        AccessRequest.index: AccessRequest,
        AccessRequestOk.index: AccessRequestOk,
    }
)
_SPECS: Mapping[int, _Spec] = MappingProxyType(
    {index: _compile(cls) for index, cls in METHODS.items()}
)


def method_ids(method: base.Frame) -> tuple[int, int]:
    """(class id, method id) of a method object."""
    return method.index >> 16, method.index & 0xFFFF


def _key(class_id: int, method_id: int) -> int:
    return (class_id << 16) | method_id


# Methods that carry content (a header and body frames follow them). A client may only send
# basic.publish; RabbitMQ assembles the content of the others, then drops them.
CONTENT_METHODS: frozenset[int] = frozenset(
    {_key(60, 40), _key(60, 50), _key(60, 60), _key(60, 71)}
)
# Methods a client may send on a channel (other than channel.* which the connection handles).
CLIENT_CHANNEL_METHODS: frozenset[int] = frozenset(
    {
        _key(30, 10),  # access.request
        _key(40, 10), _key(40, 20), _key(40, 30), _key(40, 40),  # exchange.*
        _key(50, 10), _key(50, 20), _key(50, 30), _key(50, 40), _key(50, 50),  # queue.*
        _key(60, 10), _key(60, 20), _key(60, 30), _key(60, 40), _key(60, 70),  # basic.*
        _key(60, 80), _key(60, 90), _key(60, 100), _key(60, 110), _key(60, 120),
        _key(90, 10), _key(90, 20), _key(90, 30),  # tx.*
        _key(85, 10),  # confirm.select
    }
)  # fmt: skip


def unknown_method(class_id: int, method_id: int) -> ProtocolError:
    """An id pair the spec does not define. (RabbitMQ drops the socket without a word;
    we say why before closing.)"""
    return ProtocolError(
        NOT_IMPLEMENTED,
        f"NOT_IMPLEMENTED - unknown method {{{class_id},{method_id}}}",
        class_id,
        method_id,
    )


# ---- Decoding -------------------------------------------------------------------------------

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_Q = struct.Struct(">Q")


def decode_method(class_id: int, method_id: int, args: bytes) -> base.Frame:
    """Decode the argument bytes of one method (everything after the 4 id bytes)."""
    spec = _SPECS.get(_key(class_id, method_id))
    if spec is None:
        raise unknown_method(class_id, method_id)
    cls, fields = spec
    method = cls.__new__(cls)
    off = 0
    end = len(args)
    bits = 0
    bitpos = 8
    value: Any
    try:
        for name, code in fields:
            if code == _BIT:
                if bitpos == 8:
                    bits = args[off]
                    off += 1
                    bitpos = 0
                value = bool((bits >> bitpos) & 1)
                bitpos += 1
            else:
                bitpos = 8
                if code == _SHORTSTR:
                    length = args[off]
                    off += 1
                    stop = off + length
                    if stop > end:
                        raise FieldError("short string overruns the frame")
                    try:
                        value = args[off:stop].decode("utf-8")
                    except UnicodeDecodeError:
                        raise malformed_utf8() from None
                    off = stop
                elif code == _SHORT:
                    (value,) = _U16.unpack_from(args, off)
                    off += 2
                elif code == _LONGLONG:
                    (value,) = _I64.unpack_from(args, off)
                    off += 8
                elif code == _TABLE:
                    value, off = decode_table(args, off, end)
                elif code == _OCTET:
                    value = args[off]
                    off += 1
                elif code == _LONG:
                    (value,) = _U32.unpack_from(args, off)
                    off += 4
                else:  # _LONGSTR: pamqp gives str when it is UTF-8, else bytes
                    (length,) = _U32.unpack_from(args, off)
                    off += 4
                    stop = off + length
                    if stop > end:
                        raise FieldError("long string overruns the frame")
                    raw = args[off:stop]
                    try:
                        value = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        value = raw
                    off = stop
            setattr(method, name, value)
    except (struct.error, IndexError, FieldError):
        raise cannot_decode(class_id, method_id, args) from None
    if off != end:
        raise cannot_decode(class_id, method_id, args)
    return method


# ---- Encoding -------------------------------------------------------------------------------


def _shortstr(value: Any) -> bytes:
    if value is None:
        return b"\x00"
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > 255:
        raise ValueError(f"shortstr longer than 255 bytes: {raw[:40]!r}...")
    return bytes((len(raw),)) + raw


def _longstr(value: Any) -> bytes:
    if value is None:
        return b"\x00\x00\x00\x00"
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return _U32.pack(len(raw)) + raw


_ENCODERS: Mapping[int, Callable[[Any], bytes]] = MappingProxyType(
    {
        _OCTET: lambda v: bytes((v or 0,)),
        _SHORT: lambda v: _U16.pack(v or 0),
        _LONG: lambda v: _U32.pack(v or 0),
        _LONGLONG: lambda v: _Q.pack(v or 0) if (v or 0) >= 0 else _I64.pack(v),
        _SHORTSTR: _shortstr,
        _LONGSTR: _longstr,
        _TABLE: encode_table,
    }
)


def encode_arguments(method: base.Frame) -> bytes:
    """The method's id pair and arguments: the payload of its method frame."""
    spec = _SPECS.get(method.index)
    if spec is None:
        raise ValueError(f"not an AMQP 0-9-1 method: {method!r}")
    out = [_U32.pack(method.index)]
    bits = -1
    bitpos = 0
    for name, code in spec[1]:
        value = getattr(method, name, None)
        if code == _BIT:
            if bits < 0:
                bits, bitpos = 0, 0
            elif bitpos == 8:
                out.append(bytes((bits,)))
                bits, bitpos = 0, 0
            if value:
                bits |= 1 << bitpos
            bitpos += 1
            continue
        if bits >= 0:
            out.append(bytes((bits,)))
            bits = -1
        out.append(_ENCODERS[code](value))
    if bits >= 0:
        out.append(bytes((bits,)))
    return b"".join(out)
