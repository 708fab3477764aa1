"""Snapshots of the broker model as plain JSON-able documents, and back.

Rules:
- Covers topology (vhosts, exchanges, queues, bindings) and messages; not connections,
  channels or consumers, which die with their connections. An unacked message is saved as
  its channel's basic.recover would leave it: ready, redelivered, at its original position,
  then the queue's head expiry and drop-head length limit applied as after any requeue.
  So restoring gives the state the broker would have once every channel recovered and
  every consumer went (and exactly the saved state when no message was unacked).
- No pickle: every field value (AMQP field tables can hold bytes, decimals, timestamps,
  nested tables) is written as JSON with explicit type tags, so a document round-trips
  exactly and can be read by any later version that knows VERSION.
- The document is deterministic: the same state gives the same document.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from node.broker.entities import Binding, Exchange, Queue
from node.broker.exchange_type import ExchangeType
from node.broker.model import BUILTIN_EXCHANGES, Broker, binding_key
from node.broker.types import Message, Properties

VERSION = 1


class SnapshotError(ValueError):
    """The document is not a snapshot this version can read."""


# ---- field values ----------------------------------------------------------------------


def encode_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"$f": value.hex()}
    if isinstance(value, Decimal):
        return {"$d": str(value)}
    if isinstance(value, bytes | bytearray):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime.datetime):
        return {"$t": value.isoformat()}
    if isinstance(value, Mapping):
        return {"$m": {str(k): encode_value(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    raise TypeError(f"cannot snapshot a field value of type {type(value).__name__}")


def decode_value(data: Any) -> Any:
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "$f" in data:
        return float.fromhex(data["$f"])
    if "$d" in data:
        return Decimal(data["$d"])
    if "$b" in data:
        return base64.b64decode(data["$b"])
    if "$t" in data:
        return datetime.datetime.fromisoformat(data["$t"])
    if "$m" in data:
        return {k: decode_value(v) for k, v in data["$m"].items()}
    raise SnapshotError(f"unknown field value tag in {sorted(data)}")


def encode_table(table: Mapping[str, Any] | None) -> Any:
    return None if table is None else {k: encode_value(v) for k, v in table.items()}


def decode_table(data: Any) -> dict[str, Any] | None:
    return None if data is None else {k: decode_value(v) for k, v in data.items()}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_message(m: Message, redelivered: bool) -> list[Any]:
    p = m.props
    props = [p.delivery_mode, p.priority, p.expiration, encode_table(p.headers)]
    return [
        m.id,
        m.exchange,
        m.routing_key,
        _b64(m.properties),
        props,
        _b64(m.body),
        m.published_ms,
        redelivered,
        m.delivery_count,
        m.expires_ms,
    ]


def decode_message(data: list[Any]) -> Message:
    mid, exchange, key, properties, props, body, published, redelivered, count, expires = data
    delivery_mode, priority, expiration, headers = props
    return Message(
        mid,
        exchange,
        key,
        base64.b64decode(properties),
        Properties(delivery_mode, priority, expiration, decode_table(headers)),
        base64.b64decode(body),
        published,
        redelivered,
        count,
        expires,
    )


# ---- the broker ------------------------------------------------------------------------


def _queue_messages(broker: Broker, queue: Queue, unacked: list[Message]) -> list[Any]:
    held: list[tuple[int, Message, bool]] = [(m.id, m, m.redelivered) for m in queue.messages()]
    if unacked:
        held.extend((m.id, m, True) for m in unacked)
        held.sort(key=lambda e: e[0])
        _as_after_requeue(broker.now_ms, queue, held)
    return [encode_message(m, redelivered) for _, m, redelivered in held]


def _as_after_requeue(now_ms: int, queue: Queue, held: list[tuple[int, Message, bool]]) -> None:
    """What Broker does after a requeue: drop expired messages at the head, then drop from
    the head while over a drop-head length limit."""
    start = 0
    while start < len(held):
        expires = held[start][1].expires_ms
        if expires is None or expires >= now_ms:
            break
        start += 1
    if queue.limited and not queue.reject_publish:
        size = sum(len(m.body) for _, m, _ in held[start:])
        while start < len(held) and (
            (queue.max_length is not None and len(held) - start > queue.max_length)
            or (queue.max_bytes is not None and size > queue.max_bytes)
        ):
            size -= len(held[start][1].body)
            start += 1
    del held[:start]


def dump(broker: Broker, *, messages: bool = True) -> dict[str, Any]:
    """The document. `messages=False` gives a cluster's replicated topology, the same on
    every replica that applied the same log: no messages (they live on queue leaders), and
    none of the node-local clock, message ids or queue-use times."""
    unacked: dict[Queue, list[Message]] = {}
    for channel in broker.channels.values():
        for queue, message, _ in channel.unacked.values():
            if not queue.deleted and not queue.remote:
                unacked.setdefault(queue, []).append(message)
    vhosts = []
    for vh in broker.vhosts.values():
        exchanges = [
            [x.name, x.type_name, x.durable, x.auto_delete, x.internal, encode_table(x.arguments)]
            for x in vh.exchanges.values()
            if x.name not in BUILTIN_EXCHANGES
        ]
        queues = [
            [
                q.name,
                q.durable,
                q.exclusive,
                q.auto_delete,
                q.owner,
                encode_table(q.arguments),
                q.had_consumers if messages else False,
                q.last_used_ms if messages else 0,
                _queue_messages(broker, q, unacked.get(q, [])) if messages else [],
            ]
            for q in vh.queues.values()
        ]
        leaders = {q.name: q.leader for q in vh.queues.values() if q.leader}
        touched = {q.name: q.touched for q in vh.queues.values() if q.touched}
        bindings = [
            [
                b.source.name,
                "exchange" if isinstance(b.destination, Exchange) else "queue",
                b.destination.name,
                b.routing_key,
                encode_table(b.arguments),
            ]
            for b in vh.bindings.values()
        ]
        vdoc: dict[str, Any] = {"name": vh.name, "exchanges": exchanges, "queues": queues,
                                "bindings": bindings}  # fmt: skip
        if leaders:
            vdoc["leaders"] = leaders  # cluster only: which node leads each queue
        if touched:
            vdoc["touched"] = touched
        vhosts.append(vdoc)
    document: dict[str, Any] = {
        "version": VERSION,
        "next_message_id": broker.next_message_id if messages else 1,
        "now_ms": broker.now_ms if messages else 0,
        "vhosts": vhosts,
    }
    if not messages and broker.next_rid > 1:
        document["next_rid"] = broker.next_rid
    if broker.declarations:
        document["declarations"] = broker.declarations
    return document


def load(document: Mapping[str, Any], types: Mapping[str, ExchangeType] | None = None) -> Broker:
    if not isinstance(document, Mapping) or document.get("version") != VERSION:
        raise SnapshotError(f"unsupported snapshot version {document.get('version')!r}")
    broker = Broker(vhosts=(), types=types)
    broker.next_message_id = int(document["next_message_id"])
    broker.now_ms = int(document["now_ms"])
    broker.declarations = int(document.get("declarations", 0))
    broker.next_rid = int(document.get("next_rid", 1))
    for vdoc in document["vhosts"]:
        vh = broker.add_vhost(vdoc["name"])
        for name, type_name, durable, auto_delete, internal, arguments in vdoc["exchanges"]:
            xtype = broker.types.get(type_name)
            if xtype is None:
                raise SnapshotError(f"exchange {name!r} has unknown type {type_name!r}")
            vh.exchanges[name] = Exchange(
                name,
                xtype,
                durable=durable,
                auto_delete=auto_delete,
                internal=internal,
                arguments=decode_table(arguments) or {},
            )
        for entry in vdoc["queues"]:
            name, durable, exclusive, auto_delete, owner, arguments, had, used, messages = entry
            queue = Queue(
                vh.name,
                name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                owner=owner,
                arguments=decode_table(arguments) or {},
            )
            queue.had_consumers = had
            queue.last_used_ms = used
            queue.leader = str(vdoc.get("leaders", {}).get(name, ""))
            queue.touched = int(vdoc.get("touched", {}).get(name, 0))
            for data in messages:
                message = decode_message(data)
                queue.push(message)
                broker.total_bytes += len(message.body)
                if message.expires_ms is not None:
                    queue.expiring = True
            broker.register_queue(vh, queue)
        for source, kind, destination, routing_key, arguments in vdoc["bindings"]:
            args = decode_table(arguments) or {}
            src = vh.exchanges[source]
            dest: Queue | Exchange = (
                vh.exchanges[destination] if kind == "exchange" else vh.queues[destination]
            )
            key = binding_key(source, kind, destination, routing_key, args)
            broker.add_binding(vh, Binding(key, src, dest, routing_key, args))
    return broker
