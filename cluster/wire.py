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
- READY (any → all): the sender serves (it has caught up with the Raft log and is
  active); sent on each new connection and on a RESET by a node that serves, and by a
  restarted node once it does. The Raft leader judges a member by it (see
  `cluster.node.judge_members`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

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
from node.protocol.errors import PropertiesError

ENQUEUE: Final = 1
CONFIRM: Final = 2
DELIVER: Final = 3
COMMAND: Final = 4
REQUEST: Final = 5
RESPONSE: Final = 6
APPLIED: Final = 7
CANCEL: Final = 8
RESET: Final = 9
READY: Final = 10

# kind, seq, channel (conn, number), now_ms, queue count, vhost/exchange/key/props/body
# lengths, redelivered
_ENQUEUE = struct.Struct(">BQqHqHBBBIIB")
_CONFIRM = struct.Struct(">BqHQB")
_DELIVER = struct.Struct(">BqHQBBHHHHHI")
_REQ = struct.Struct(">BQ")
_CANCEL = struct.Struct(">BqHH")
_B = struct.Struct(">B")
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
    redelivered: bool = False  # a message that moved with its queue after a delivery


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
    # The message as `decode` built it (validating the property block): kept, so the
    # receiver does not decode the properties a second time.
    message: Message | None = field(default=None, compare=False, repr=False)


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


@dataclass(frozen=True, slots=True)
class Ready:
    pass


LinkMessage = (
    Enqueue
    | Confirm
    | Delivery
    | CommandMsg
    | Request
    | Response
    | Applied
    | CancelNotify
    | Reset
    | Ready
)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


# ---- encoding ------------------------------------------------------------------------


def enqueue(
    seq: int, queues: tuple[str, ...], publish: c.Publish, redelivered: bool = False
) -> bytes:
    """The hot path of forwarding: fixed fields in one struct, then the queue names, the
    vhost, exchange and routing key, the raw property block and the body. The decoded
    `Properties` do not travel: the leader reads them from the raw block again."""
    vhost, exchange, key = _utf8(publish.vhost), _utf8(publish.exchange), _utf8(publish.routing_key)
    channel = publish.channel
    properties = publish.properties
    head = _ENQUEUE.pack(
        ENQUEUE,
        seq,
        channel.conn,
        channel.channel,
        publish.now_ms,
        len(queues),
        len(vhost),
        len(exchange),
        len(key),
        len(properties),
        len(publish.body),
        redelivered,
    )
    if len(queues) == 1:
        name = _utf8(queues[0])
        return b"".join(
            (head, _H.pack(len(name)), name, vhost, exchange, key, properties, publish.body)
        )
    parts = [head]
    for queue in queues:
        raw = _utf8(queue)
        parts.append(_H.pack(len(raw)))
        parts.append(raw)
    parts += (vhost, exchange, key, properties, publish.body)
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


def ready() -> bytes:
    return bytes((READY,))


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


class _Reader:
    """Strict reads from one message: running short or leaving bytes over is a WireError."""

    __slots__ = ("data", "off")

    def __init__(self, data: bytes, off: int = 0) -> None:
        self.data = data
        self.off = off

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        if self.off + fmt.size > len(self.data):
            raise WireError("truncated link message")
        values = fmt.unpack_from(self.data, self.off)
        self.off += fmt.size
        return values

    def take(self, size: int) -> bytes:
        if self.off + size > len(self.data):
            raise WireError("truncated link message")
        chunk = self.data[self.off : self.off + size]
        self.off += size
        return chunk

    def text(self, size: int) -> str:
        return _text(self.take(size))

    def short_text(self) -> str:
        (size,) = self.unpack(_H)
        return self.text(size)

    def rest(self) -> bytes:
        chunk = self.data[self.off :]
        self.off = len(self.data)
        return chunk

    def end(self) -> None:
        if self.off != len(self.data):
            raise WireError(f"{len(self.data) - self.off} bytes after a link message")


def decode(data: bytes) -> LinkMessage:
    try:
        return _decode(bytes(data))
    except WireError:
        raise
    except (struct.error, IndexError, UnicodeDecodeError, codec.CodecError) as exc:
        raise WireError(f"malformed link message: {exc!r}") from exc


def _message(exchange: str, routing_key: str, properties: bytes, body: bytes) -> Message:
    try:
        mode, priority, expiration, headers = peek_properties(properties)
    except PropertiesError as exc:
        raise WireError(f"malformed property block: {exc}") from exc
    props = new_properties(mode, priority, expiration, headers)
    return Message(0, exchange, routing_key, properties, props, body)


def _decode(data: bytes) -> LinkMessage:
    if not data:
        raise WireError("empty link message")
    kind = data[0]
    r = _Reader(data)
    if kind == ENQUEUE:
        _, seq, conn, ch, now_ms, count, lv, le, lk, lp, lb, redelivered = r.unpack(_ENQUEUE)
        names = tuple(r.short_text() for _ in range(count))
        vhost, exchange, key = r.text(lv), r.text(le), r.text(lk)
        properties = r.take(lp)
        body = r.take(lb)
        r.end()
        try:
            mode, priority, expiration, headers = peek_properties(properties)
        except PropertiesError as exc:
            raise WireError(f"malformed property block: {exc}") from exc
        publish = c.new_publish(
            now_ms,
            ChannelRef(conn, ch),
            vhost,
            exchange,
            key,
            False,
            properties,
            new_properties(mode, priority, expiration, headers),
            body,
        )
        return Enqueue(seq, names, publish, bool(redelivered))
    if kind == CONFIRM:
        _, conn, ch, seq, ok = r.unpack(_CONFIRM)
        r.end()
        return Confirm(ChannelRef(conn, ch), seq, bool(ok))
    if kind == DELIVER:
        _, conn, ch, tag, redelivered, no_ack, lt, lv, lq, le, lr, lp = r.unpack(_DELIVER)
        consumer_tag, vhost, queue, exchange, routing_key = (
            r.text(size) for size in (lt, lv, lq, le, lr)
        )
        properties = r.take(lp)
        body = r.rest()
        return Delivery(
            ChannelRef(conn, ch),
            consumer_tag,
            tag,
            bool(redelivered),
            bool(no_ack),
            vhost,
            queue,
            exchange,
            routing_key,
            properties,
            body,
            _message(exchange, routing_key, properties, body),  # the block must decode
        )
    if kind == COMMAND:
        cmd, _id = codec.decode(data[1:])
        return CommandMsg(cmd)
    if kind == REQUEST:
        _, rid = r.unpack(_REQ)
        cmd, _id = codec.decode(r.rest())
        return Request(rid, cmd)
    if kind == RESPONSE:
        _, rid = r.unpack(_REQ)
        return Response(rid, _decode_reply(_Reader(data, r.off)))
    if kind == APPLIED:
        r.take(1)
        (count,) = r.unpack(_H)
        ids = []
        for _ in range(count):
            (size,) = r.unpack(_H)
            ids.append(r.take(size))
        r.end()
        return Applied(tuple(ids))
    if kind == CANCEL:
        _, conn, ch, size = r.unpack(_CANCEL)
        tag = r.text(size)
        r.end()
        return CancelNotify(ChannelRef(conn, ch), tag)
    if kind == RESET:
        r.take(1)
        r.end()
        return Reset()
    if kind == READY:
        r.take(1)
        r.end()
        return Ready()
    raise WireError(f"unknown link message kind {kind}")


def _decode_reply(r: _Reader) -> Reply:
    (kind,) = r.unpack(_B)
    reply: Reply
    if kind == _R_OK:
        reply = Ok()
    elif kind == _R_ERROR:
        r.off -= 1
        _, code, class_id, method_id, conn = r.unpack(_ERROR)
        return AmqpError(code, r.text(len(r.data) - r.off), class_id, method_id, bool(conn))
    elif kind == _R_COUNT:
        reply = Count(r.unpack(_Q)[0])
    elif kind == _R_CONSUME_OK:
        return ConsumeOk(r.text(len(r.data) - r.off))
    elif kind == _R_GET_EMPTY:
        reply = GetEmpty()
    elif kind == _R_GET_OK:
        r.off -= 1
        _, tag, redelivered, count, le, lr, lp = r.unpack(_GET_OK)
        exchange = r.text(le)
        routing_key = r.text(lr)
        properties = r.take(lp)
        message = _message(exchange, routing_key, properties, r.rest())
        return GetOk(tag, bool(redelivered), count, message)
    elif kind == _R_DECLARED:
        r.off -= 1
        _, mc, cc = r.unpack(_DECLARED)
        return QueueDeclared(r.text(len(r.data) - r.off), mc, cc)
    else:
        raise WireError(f"unknown reply kind {kind}")
    r.end()
    return reply


def delivered_message(d: Delivery) -> Message:
    """The message of a DELIVER, as the origin's model records it."""
    if d.message is not None:
        return d.message
    return _message(d.exchange, d.routing_key, d.properties, d.body)
