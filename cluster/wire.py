"""Messages between nodes on the node link: what they mean and their bytes.

Rules:
- Plain values in, bytes out and back; no I/O, no pickle. The link (cluster/link.py)
  carries each message as one opaque frame, in order per pair of nodes.
- The first byte is the kind. Commands travel in the Raft log's own codec
  (cluster/codec.py), so a forwarded command decodes exactly as a replicated one.
- Decoding is strict: a malformed message raises `WireError` (the receiver logs and drops
  it; one bad message never takes the link down).

Kinds (origin = the node a client is connected to, leader = the node leading a queue):
- ENQUEUE (origin → leader): a publish the origin routed to queues the leader leads;
  `seq` > 0 asks for a CONFIRM (the publisher is in confirm mode).
- CONFIRM (leader → origin): the leader took (or refused) the message `seq`.
- DELIVER (leader → origin): basic.deliver of a remote consumer, with the leader's tag.
- COMMAND (origin → leader): a command for the origin's channel at the leader (qos,
  cancel, settle, channel or connection closed), applied there, no answer.
- REQUEST / RESPONSE: a command that needs the leader's answer (consume, get, purge,
  delete checks, queue counts), matched by request id.
- APPLIED (any → origin): the sender has applied the origin's Raft commands with these
  ids (read-your-writes: the origin answers its client once every live node has).
- CANCEL (leader → origin): server-initiated basic.cancel of a remote consumer.
- RESET (any → all): the sender lost every proxy channel it held for others (restart).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from cluster import codec
from cluster import commands as c
from node.broker.types import (
    AmqpError,
    ChannelRef,
    ConsumeOk,
    Count,
    GetEmpty,
    GetOk,
    Message,
    Ok,
    QueueDeclared,
    Reply,
    new_properties,
)
from node.protocol.codec import peek_properties

ENQUEUE: Final = 1
CONFIRM: Final = 2
DELIVER: Final = 3
COMMAND: Final = 4
REQUEST: Final = 5
RESPONSE: Final = 6
APPLIED: Final = 7
CANCEL: Final = 8
RESET: Final = 9

_ENQUEUE = struct.Struct(">BQH")
_CONFIRM = struct.Struct(">BqHQB")
_DELIVER = struct.Struct(">BqHQBBHHHHHI")
_REQ = struct.Struct(">BQ")
_CANCEL = struct.Struct(">BqHH")
_H = struct.Struct(">H")
_Q = struct.Struct(">Q")
_ERROR = struct.Struct(">BHHHB")
_GET_OK = struct.Struct(">BQBQHHI")
_DECLARED = struct.Struct(">BQQ")

# Reply kinds inside a RESPONSE.
_R_OK, _R_ERROR, _R_COUNT, _R_CONSUME_OK, _R_GET_EMPTY, _R_GET_OK, _R_DECLARED = range(7)


class WireError(ValueError):
    """Bytes that are not a well-formed link message."""


@dataclass(frozen=True, slots=True)
class Enqueue:
    seq: int
    queues: tuple[str, ...]
    publish: c.Publish


@dataclass(frozen=True, slots=True)
class Confirm:
    channel: ChannelRef
    seq: int
    ok: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    channel: ChannelRef
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    no_ack: bool
    vhost: str
    queue: str
    exchange: str
    routing_key: str
    properties: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class CommandMsg:
    command: c.AnyCommand


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    command: c.AnyCommand


@dataclass(frozen=True, slots=True)
class Response:
    request_id: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class Applied:
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class CancelNotify:
    channel: ChannelRef
    consumer_tag: str


@dataclass(frozen=True, slots=True)
class Reset:
    pass


LinkMessage = (
    Enqueue | Confirm | Delivery | CommandMsg | Request | Response | Applied | CancelNotify | Reset
)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


# ---- encoding ------------------------------------------------------------------------


def enqueue(seq: int, queues: tuple[str, ...], publish: c.Publish) -> bytes:
    parts = [_ENQUEUE.pack(ENQUEUE, seq, len(queues))]
    for name in queues:
        raw = _utf8(name)
        parts.append(_H.pack(len(raw)))
        parts.append(raw)
    parts.append(codec.encode(publish))
    return b"".join(parts)


def confirm(channel: ChannelRef, seq: int, ok: bool) -> bytes:
    return _CONFIRM.pack(CONFIRM, channel.conn, channel.channel, seq, ok)


def delivery(
    channel: ChannelRef,
    consumer_tag: str,
    delivery_tag: int,
    redelivered: bool,
    no_ack: bool,
    vhost: str,
    queue: str,
    message: Message,
) -> bytes:
    tag, vh, qn = _utf8(consumer_tag), _utf8(vhost), _utf8(queue)
    ex, rk = _utf8(message.exchange), _utf8(message.routing_key)
    head = _DELIVER.pack(
        DELIVER,
        channel.conn,
        channel.channel,
        delivery_tag,
        redelivered,
        no_ack,
        len(tag),
        len(vh),
        len(qn),
        len(ex),
        len(rk),
        len(message.properties),
    )
    return b"".join((head, tag, vh, qn, ex, rk, message.properties, message.body))


def command(cmd: c.AnyCommand) -> bytes:
    return bytes((COMMAND,)) + codec.encode(cmd)


def request(request_id: int, cmd: c.AnyCommand) -> bytes:
    return _REQ.pack(REQUEST, request_id) + codec.encode(cmd)


def response(request_id: int, reply: Reply) -> bytes:
    return _REQ.pack(RESPONSE, request_id) + _reply_bytes(reply)


def applied(ids: tuple[bytes, ...]) -> bytes:
    parts = [bytes((APPLIED,)), _H.pack(len(ids))]
    for i in ids:
        parts.append(_H.pack(len(i)))
        parts.append(i)
    return b"".join(parts)


def cancel(channel: ChannelRef, consumer_tag: str) -> bytes:
    tag = _utf8(consumer_tag)
    return _CANCEL.pack(CANCEL, channel.conn, channel.channel, len(tag)) + tag


def reset() -> bytes:
    return bytes((RESET,))


def _reply_bytes(reply: Reply) -> bytes:
    if isinstance(reply, AmqpError):
        head = _ERROR.pack(
            _R_ERROR, reply.reply_code, reply.class_id, reply.method_id, reply.connection
        )
        return head + _utf8(reply.reply_text)
    if isinstance(reply, Count):
        return bytes((_R_COUNT,)) + _Q.pack(reply.message_count)
    if isinstance(reply, ConsumeOk):
        return bytes((_R_CONSUME_OK,)) + _utf8(reply.consumer_tag)
    if isinstance(reply, GetEmpty):
        return bytes((_R_GET_EMPTY,))
    if isinstance(reply, GetOk):
        m = reply.message
        ex, rk = _utf8(m.exchange), _utf8(m.routing_key)
        head = _GET_OK.pack(
            _R_GET_OK,
            reply.delivery_tag,
            reply.redelivered,
            reply.message_count,
            len(ex),
            len(rk),
            len(m.properties),
        )
        return b"".join((head, ex, rk, m.properties, m.body))
    if isinstance(reply, QueueDeclared):
        return _DECLARED.pack(_R_DECLARED, reply.message_count, reply.consumer_count) + _utf8(
            reply.queue
        )
    return bytes((_R_OK,))


# ---- decoding ------------------------------------------------------------------------


def decode(data: bytes) -> LinkMessage:
    try:
        return _decode(data)
    except WireError:
        raise
    except (struct.error, IndexError, UnicodeDecodeError, codec.CodecError) as exc:
        raise WireError(f"malformed link message: {exc!r}") from exc


def _message(exchange: str, routing_key: str, properties: bytes, body: bytes) -> Message:
    mode, priority, expiration, headers = peek_properties(properties)
    props = new_properties(mode, priority, expiration, headers)
    return Message(0, exchange, routing_key, properties, props, body)


def _decode(data: bytes) -> LinkMessage:
    if not data:
        raise WireError("empty link message")
    kind = data[0]
    if kind == ENQUEUE:
        _, seq, count = _ENQUEUE.unpack_from(data, 0)
        off = _ENQUEUE.size
        names = []
        for _ in range(count):
            (size,) = _H.unpack_from(data, off)
            off += 2
            names.append(_text(data[off : off + size]))
            off += size
        publish, _id = codec.decode(data[off:])
        if not isinstance(publish, c.Publish):
            raise WireError("ENQUEUE without a Publish")
        return Enqueue(seq, tuple(names), publish)
    if kind == CONFIRM:
        _, conn, ch, seq, ok = _CONFIRM.unpack_from(data, 0)
        return Confirm(ChannelRef(conn, ch), seq, bool(ok))
    if kind == DELIVER:
        _, conn, ch, tag, redelivered, no_ack, lt, lv, lq, le, lr, lp = _DELIVER.unpack_from(
            data, 0
        )
        off = _DELIVER.size
        fields = []
        for size in (lt, lv, lq, le, lr):
            fields.append(_text(data[off : off + size]))
            off += size
        properties = data[off : off + lp]
        body = data[off + lp :]
        return Delivery(
            ChannelRef(conn, ch),
            fields[0],
            tag,
            bool(redelivered),
            bool(no_ack),
            fields[1],
            fields[2],
            fields[3],
            fields[4],
            properties,
            body,
        )
    if kind == COMMAND:
        cmd, _id = codec.decode(data[1:])
        return CommandMsg(cmd)
    if kind == REQUEST:
        _, rid = _REQ.unpack_from(data, 0)
        cmd, _id = codec.decode(data[_REQ.size :])
        return Request(rid, cmd)
    if kind == RESPONSE:
        _, rid = _REQ.unpack_from(data, 0)
        return Response(rid, _decode_reply(data[_REQ.size :]))
    if kind == APPLIED:
        (count,) = _H.unpack_from(data, 1)
        off = 3
        ids = []
        for _ in range(count):
            (size,) = _H.unpack_from(data, off)
            off += 2
            ids.append(bytes(data[off : off + size]))
            off += size
        return Applied(tuple(ids))
    if kind == CANCEL:
        _, conn, ch, size = _CANCEL.unpack_from(data, 0)
        off = _CANCEL.size
        return CancelNotify(ChannelRef(conn, ch), _text(data[off : off + size]))
    if kind == RESET:
        return Reset()
    raise WireError(f"unknown link message kind {kind}")


def _decode_reply(data: bytes) -> Reply:
    kind = data[0]
    if kind == _R_OK:
        return Ok()
    if kind == _R_ERROR:
        _, code, class_id, method_id, conn = _ERROR.unpack_from(data, 0)
        text = _text(data[_ERROR.size :])
        return AmqpError(code, text, class_id, method_id, bool(conn))
    if kind == _R_COUNT:
        return Count(_Q.unpack_from(data, 1)[0])
    if kind == _R_CONSUME_OK:
        return ConsumeOk(_text(data[1:]))
    if kind == _R_GET_EMPTY:
        return GetEmpty()
    if kind == _R_GET_OK:
        _, tag, redelivered, count, le, lr, lp = _GET_OK.unpack_from(data, 0)
        off = _GET_OK.size
        exchange = _text(data[off : off + le])
        off += le
        routing_key = _text(data[off : off + lr])
        off += lr
        properties = data[off : off + lp]
        body = data[off + lp :]
        return GetOk(
            tag, bool(redelivered), count, _message(exchange, routing_key, properties, body)
        )
    if kind == _R_DECLARED:
        _, mc, cc = _DECLARED.unpack_from(data, 0)
        return QueueDeclared(_text(data[_DECLARED.size :]), mc, cc)
    raise WireError(f"unknown reply kind {kind}")


def delivered_message(d: Delivery) -> Message:
    """The message of a DELIVER, as the origin's model records it."""
    return _message(d.exchange, d.routing_key, d.properties, d.body)
