"""The management API's JSON objects, in RabbitMQ's shapes (field names, types, nesting).

Rules: pure functions from read-only values (views of the broker model, a connection's
attributes, counters) to plain JSON values; no I/O, no clock (times are passed in), no
awaits. Field names are RabbitMQ's; where Warren has no such notion, the field carries
RabbitMQ's value for "none" (null, [], 0) rather than being invented. This module changes
nothing it is given.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from node.broker.views import BindingView, ConsumerView, ExchangeView, QueueView

if TYPE_CHECKING:
    from node.channel import Channel
    from node.server import ClientConnection

JsonObject = dict[str, Any]

# A queue's memory estimate: a fixed cost plus a per-message overhead on top of the bodies
# (measured order of magnitude of a queued Message's Python objects).
QUEUE_BASE_BYTES = 1024
MESSAGE_OVERHEAD_BYTES = 300
# message_stats: RabbitMQ's name -> the node counters (node/stats.py) summed into it.
MESSAGE_STATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("publish", ("received",)),
    ("confirm", ("confirmed",)),
    ("return_unroutable", ("unroutable_returned",)),
    ("drop_unroutable", ("unroutable_dropped",)),
    ("deliver", ("delivered_consume_manual_ack",)),
    ("deliver_no_ack", ("delivered_consume_auto_ack",)),
    ("get", ("delivered_get_manual_ack",)),
    ("get_no_ack", ("delivered_get_auto_ack",)),
    (
        "deliver_get",
        (
            "delivered_consume_manual_ack",
            "delivered_consume_auto_ack",
            "delivered_get_manual_ack",
            "delivered_get_auto_ack",
        ),
    ),
    ("get_empty", ("get_empty",)),
    ("redeliver", ("redelivered",)),
    ("ack", ("acknowledged",)),
)
CHURN_RATES: tuple[tuple[str, str], ...] = (
    ("channel_closed", "channels_closed"),
    ("channel_created", "channels_opened"),
    ("connection_closed", "connections_closed"),
    ("connection_created", "connections_opened"),
    ("queue_created", "queues_created"),
    ("queue_declared", "queues_declared"),
    ("queue_deleted", "queues_deleted"),
)
# Basic properties: pamqp attribute -> RabbitMQ's JSON name, in RabbitMQ's order.
PROPERTY_NAMES: tuple[tuple[str, str], ...] = (
    ("content_type", "content_type"),
    ("content_encoding", "content_encoding"),
    ("headers", "headers"),
    ("delivery_mode", "delivery_mode"),
    ("priority", "priority"),
    ("correlation_id", "correlation_id"),
    ("reply_to", "reply_to"),
    ("expiration", "expiration"),
    ("message_id", "message_id"),
    ("timestamp", "timestamp"),
    ("message_type", "type"),
    ("user_id", "user_id"),
    ("app_id", "app_id"),
    ("cluster_id", "cluster_id"),
)
_OCTET_PROPERTIES = frozenset({"delivery_mode", "priority"})


class BadRequest(Exception):
    """The client's JSON is not what the endpoint takes: 400 with this reason."""


def plain(value: Any) -> Any:
    """Field-table values as JSON can carry them (bytes as text, dates as seconds)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime.datetime):
        return int(value.replace(tzinfo=value.tzinfo or datetime.UTC).timestamp())
    return str(value)


def iso_time(ms: int) -> str:
    """RabbitMQ's idle_since: "2024-05-01T10:20:30.123+00:00"."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+00:00"


# ---- counters -----------------------------------------------------------------------------


def sum_counters(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def message_stats(counts: Mapping[str, float], rates: Mapping[str, float]) -> JsonObject:
    """RabbitMQ's message_stats object from node counters (summed over nodes)."""
    out: JsonObject = {}
    for name, sources in MESSAGE_STATS:
        out[name] = int(sum(counts.get(s, 0) for s in sources))
        out[f"{name}_details"] = {"rate": round(sum(rates.get(s, 0.0) for s in sources), 1)}
    return out


def churn_rates(counts: Mapping[str, float], rates: Mapping[str, float]) -> JsonObject:
    out: JsonObject = {}
    for name, source in CHURN_RATES:
        out[name] = int(counts.get(source, 0))
        out[f"{name}_details"] = {"rate": round(rates.get(source, 0.0), 1)}
    return out


# ---- queues, exchanges, bindings ----------------------------------------------------------


def queue_type(arguments: Mapping[str, Any]) -> str:
    kind = arguments.get("x-queue-type", "classic")
    return kind if isinstance(kind, str) else "classic"


def queue_counts(view: QueueView) -> JsonObject:
    """What a queue's leader knows of it: counts, bytes, consumers (no metadata)."""
    ready, unacked = view.messages, view.unacked
    counts: JsonObject = {
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "message_bytes": view.ready_bytes + view.unacked_bytes,
        "message_bytes_ready": view.ready_bytes,
        "message_bytes_unacknowledged": view.unacked_bytes,
        "consumers": view.consumers,
        "consumer_utilisation": None,
        "exclusive_consumer_tag": view.exclusive_consumer_tag,
        "memory": QUEUE_BASE_BYTES
        + (ready + unacked) * MESSAGE_OVERHEAD_BYTES
        + view.ready_bytes
        + view.unacked_bytes,
        "state": "running",
    }
    if not view.consumers and view.last_used_ms:
        counts["idle_since"] = iso_time(view.last_used_ms)
    return counts


def queue_row(view: QueueView, node: str, counts: Mapping[str, Any] | None) -> JsonObject:
    """A queue as /api/queues lists it: this node's copy of its definition, and the
    counts its leader `node` reported (None: the leader did not answer: state "down",
    no counts, as RabbitMQ shows a queue whose node is down)."""
    row: JsonObject = {
        "name": view.name,
        "vhost": view.vhost,
        "durable": view.durable,
        "auto_delete": view.auto_delete,
        "exclusive": view.exclusive,
        "arguments": plain(view.arguments),
        "node": node,
        "type": queue_type(view.arguments),
        "policy": None,
        "operator_policy": None,
        "effective_policy_definition": {},
    }
    if counts is None:
        row["state"] = "down"
    else:
        row.update(counts)
    return row


def exchange_row(view: ExchangeView) -> JsonObject:
    return {
        "name": view.name,
        "vhost": view.vhost,
        "type": view.type,
        "durable": view.durable,
        "auto_delete": view.auto_delete,
        "internal": view.internal,
        "arguments": plain(view.arguments),
        "user_who_performed_action": "rmq-internal" if is_builtin(view.name) else "",
    }


def is_builtin(exchange: str) -> bool:
    """The default exchange and the amq.* ones (never exported, never deleted by import)."""
    return exchange == "" or exchange.startswith("amq.")


def properties_key(routing_key: str, arguments: Mapping[str, Any]) -> str:
    """RabbitMQ's binding "properties key": the routing key alone without arguments ("~"
    for an empty one), else the key, "~" and a digest of the arguments."""
    if not arguments:
        return routing_key or "~"
    digest = hashlib.sha1(json.dumps(plain(arguments), sort_keys=True).encode()).digest()
    return f"{routing_key}~{base64.urlsafe_b64encode(digest[:9]).decode()}"


def binding_row(view: BindingView) -> JsonObject:
    return {
        "source": view.source,
        "vhost": view.vhost,
        "destination": view.destination,
        "destination_type": view.destination_type,
        "routing_key": view.routing_key,
        "arguments": plain(view.arguments),
        "properties_key": properties_key(view.routing_key, view.arguments),
    }


# ---- connections, channels, consumers -----------------------------------------------------


def _split_address(address: object) -> tuple[str, int]:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return str(address), 0


def connection_name(peer: tuple[str, int], local: tuple[str, int]) -> str:
    """RabbitMQ's connection name: "127.0.0.1:50000 -> 127.0.0.1:5672"."""
    return f"{peer[0]}:{peer[1]} -> {local[0]}:{local[1]}"


def connection_row(conn: ClientConnection, node: str, peer: object, local: object) -> JsonObject:
    peer_host, peer_port = _split_address(peer)
    host, port = _split_address(local)
    proto = conn.proto
    return {
        "name": connection_name((peer_host, peer_port), (host, port)),
        "node": node,
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "host": host,
        "port": port,
        "peer_host": peer_host,
        "peer_port": peer_port,
        "ssl": False,
        "ssl_protocol": None,
        "ssl_key_exchange": None,
        "ssl_cipher": None,
        "ssl_hash": None,
        "peer_cert_subject": None,
        "peer_cert_issuer": None,
        "peer_cert_validity": None,
        "user": conn.user,
        "user_who_performed_action": conn.user,
        "vhost": conn.vhost,
        "auth_mechanism": proto.mechanism,
        "client_properties": plain(proto.client_properties),
        "connected_at": conn.connected_at,
        "timeout": proto.heartbeat,
        "frame_max": proto.frame_max,
        "channel_max": proto.channel_max,
        "channels": len(conn.channels),
        "state": "blocked" if conn.blocked else "running",
    }


def channel_row(
    connection: Mapping[str, Any],
    channel: Channel,
    *,
    prefetch: int,
    global_prefetch: int,
    unacked: int,
    consumers: int,
) -> JsonObject:
    """A channel of `connection` (its /api/connections row)."""
    return {
        "name": f"{connection['name']} ({channel.number})",
        "number": channel.number,
        "node": connection["node"],
        "user": connection["user"],
        "user_who_performed_action": connection["user"],
        "vhost": connection["vhost"],
        "connection_details": {
            "name": connection["name"],
            "peer_host": connection["peer_host"],
            "peer_port": connection["peer_port"],
        },
        "consumer_count": consumers,
        "prefetch_count": prefetch,
        "global_prefetch_count": global_prefetch,
        "messages_unacknowledged": unacked,
        "messages_unconfirmed": channel.unconfirmed,
        "messages_uncommitted": 0,
        "acks_uncommitted": 0,
        "confirm": channel.confirm,
        "transactional": channel.tx,
        "state": "running",
    }


def channel_details(connection: Mapping[str, Any], number: int) -> JsonObject:
    return {
        "name": f"{connection['name']} ({number})",
        "number": number,
        "node": connection["node"],
        "connection_name": connection["name"],
        "peer_host": connection["peer_host"],
        "peer_port": connection["peer_port"],
        "user": connection["user"],
    }


def consumer_row(view: ConsumerView, details: Mapping[str, Any] | None) -> JsonObject:
    """`details`: the channel's channel_details (None: its connection is not known)."""
    return {
        "consumer_tag": view.tag,
        "channel_details": dict(details) if details is not None else {},
        "queue": {"name": view.queue, "vhost": view.vhost},
        "ack_required": not view.no_ack,
        "prefetch_count": view.prefetch,
        "exclusive": view.exclusive,
        "active": view.active,
        "activity_status": "up" if view.active else "waiting",
        "arguments": {"x-priority": view.priority} if view.priority else {},
    }


# ---- messages -----------------------------------------------------------------------------


def basic_properties(props: Any) -> JsonObject | list[Any]:
    """A pamqp Basic.Properties as RabbitMQ's management API shows it: the present ones
    only, and an empty list (RabbitMQ's empty proplist) when there are none."""
    out: JsonObject = {}
    for attribute, name in PROPERTY_NAMES:
        value = getattr(props, attribute, None)
        if value is None or (name == "cluster_id" and value == ""):
            continue
        out[name] = plain(value)
    return out or []


def encode_payload(body: bytes, encoding: str, truncate: int | None) -> tuple[str, str]:
    """(payload, payload_encoding): "auto" gives UTF-8 text when the body is text, base64
    otherwise; "base64" always base64. `truncate` cuts the body first."""
    if truncate is not None:
        body = body[:truncate]
    if encoding == "auto":
        try:
            return body.decode("utf-8"), "string"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode(), "base64"


def message_row(
    *,
    body: bytes,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    message_count: int,
    properties: Any,
    encoding: str,
    truncate: int | None,
) -> JsonObject:
    payload, payload_encoding = encode_payload(body, encoding, truncate)
    return {
        "payload_bytes": len(body),
        "redelivered": redelivered,
        "exchange": exchange,
        "routing_key": routing_key,
        "message_count": message_count,
        "properties": basic_properties(properties),
        "payload": payload,
        "payload_encoding": payload_encoding,
    }


def properties_arguments(value: Any) -> dict[str, Any]:
    """Keyword arguments for pamqp Basic.Properties from a publish request's "properties"
    (RabbitMQ's names; "type" is the message type). BadRequest for a wrong value."""
    if value is None or value == []:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("properties must be an object")
    names = {name: attribute for attribute, name in PROPERTY_NAMES}
    out: dict[str, Any] = {}
    for key, item in value.items():
        attribute = names.get(key)
        if attribute is None:
            raise BadRequest(f"unknown property {key!r}")
        if attribute == "headers":
            if not isinstance(item, dict):
                raise BadRequest("headers must be an object")
        elif attribute in _OCTET_PROPERTIES or attribute == "timestamp":
            if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                raise BadRequest(f"{key} must be a non-negative integer")
            if attribute in _OCTET_PROPERTIES and item > 255:
                raise BadRequest(f"{key} must be at most 255")
            if attribute == "timestamp":
                item = datetime.datetime.fromtimestamp(item, datetime.UTC)
        elif not isinstance(item, str):
            raise BadRequest(f"{key} must be a string")
        out[attribute] = item
    return out


def decode_payload(payload: Any, encoding: Any) -> bytes:
    if not isinstance(payload, str):
        raise BadRequest("payload must be a string")
    if encoding == "string":
        return payload.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise BadRequest("payload is not base64") from None
    raise BadRequest('payload_encoding must be "string" or "base64"')


# ---- users, definitions -------------------------------------------------------------------


def password_hash(password: str, salt: bytes) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))
    with a 4-byte salt (so exported definitions import into RabbitMQ)."""
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def user_row(name: str, password: str, salt: bytes) -> JsonObject:
    return {
        "name": name,
        "password_hash": password_hash(password, salt),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": ["administrator"],
        "limits": {},
    }


def definitions(
    *,
    version: str,
    users: Sequence[JsonObject],
    vhosts: Sequence[str],
    queues: Iterable[QueueView],
    exchanges: Iterable[ExchangeView],
    bindings: Iterable[BindingView],
) -> JsonObject:
    """RabbitMQ's definitions export: exclusive queues, built-in exchanges and the default
    exchange's implicit bindings left out, as RabbitMQ leaves them out."""
    return {
        "rabbit_version": version,
        "rabbitmq_version": version,
        "product_name": "Warren",
        "product_version": version,
        "users": list(users),
        "vhosts": [{"name": v} for v in vhosts],
        "permissions": [
            {"user": u["name"], "vhost": v, "configure": ".*", "write": ".*", "read": ".*"}
            for u in users
            for v in vhosts
        ],
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": [
            {
                "name": q.name,
                "vhost": q.vhost,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": plain(q.arguments),
            }
            for q in queues
            if not q.exclusive
        ],
        "exchanges": [
            {
                "name": x.name,
                "vhost": x.vhost,
                "type": x.type,
                "durable": x.durable,
                "auto_delete": x.auto_delete,
                "internal": x.internal,
                "arguments": plain(x.arguments),
            }
            for x in exchanges
            if not is_builtin(x.name)
        ],
        "bindings": [
            {
                "source": b.source,
                "vhost": b.vhost,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": plain(b.arguments),
            }
            for b in bindings
            if b.source
        ],
    }


def _bool(item: Mapping[str, Any], key: str, default: bool) -> bool:
    value = item.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def _table(item: Mapping[str, Any], key: str = "arguments") -> dict[str, Any]:
    value = item.get(key) or {}
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object")
    return value


def _name(item: Mapping[str, Any], key: str, *, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise BadRequest(f"{key} must be a non-empty string" if not empty else f"no {key}")
    return value


def queue_settings(body: Any) -> tuple[bool, bool, dict[str, Any]]:
    """(durable, auto_delete, arguments) of a queue PUT body (RabbitMQ's defaults:
    durable, not auto-delete)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("not_json")
    return _bool(body, "durable", True), _bool(body, "auto_delete", False), _table(body)


def exchange_settings(body: Any) -> tuple[str, bool, bool, bool, dict[str, Any]]:
    """(type, durable, auto_delete, internal, arguments) of an exchange PUT body."""
    if not isinstance(body, dict):
        raise BadRequest("not_json")
    kind = body.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadRequest("[{key_missing,type}]")
    return (
        kind,
        _bool(body, "durable", True),
        _bool(body, "auto_delete", False),
        _bool(body, "internal", False),
        _table(body),
    )


def parse_definitions(body: Any) -> tuple[list[JsonObject], list[JsonObject], list[JsonObject]]:
    """The (exchanges, queues, bindings) of a definitions import, each checked and with
    its defaults filled in; BadRequest names the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("failed_to_parse_json")
    parts: list[list[JsonObject]] = []
    for section in ("exchanges", "queues", "bindings"):
        items = body.get(section) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BadRequest(f"{section} must be a list of objects")
        parts.append(items)
    exchanges = [
        {
            "vhost": _name(x, "vhost"),
            "name": _name(x, "name"),
            "type": _name(x, "type"),
            "durable": _bool(x, "durable", True),
            "auto_delete": _bool(x, "auto_delete", False),
            "internal": _bool(x, "internal", False),
            "arguments": _table(x),
        }
        for x in parts[0]
    ]
    queues = [
        {
            "vhost": _name(q, "vhost"),
            "name": _name(q, "name"),
            "durable": _bool(q, "durable", True),
            "auto_delete": _bool(q, "auto_delete", False),
            "arguments": _table(q),
        }
        for q in parts[1]
    ]
    bindings = []
    for b in parts[2]:
        kind = b.get("destination_type", "queue")
        if kind not in ("queue", "exchange"):
            raise BadRequest('destination_type must be "queue" or "exchange"')
        routing_key = b.get("routing_key", "")
        if not isinstance(routing_key, str):
            raise BadRequest("routing_key must be a string")
        bindings.append(
            {
                "vhost": _name(b, "vhost"),
                "source": _name(b, "source"),
                "destination": _name(b, "destination"),
                "destination_type": kind,
                "routing_key": routing_key,
                "arguments": _table(b),
            }
        )
    return exchanges, queues, bindings


# ---- listing options ----------------------------------------------------------------------

_SORT_KEY = re.compile(r"[A-Za-z0-9_.]+")


def select(rows: list[JsonObject], query: Mapping[str, str]) -> list[JsonObject]:
    """RabbitMQ's listing query options: sort=<field>[.<sub>], sort_reverse=true, and
    columns=a,b.c (only those fields, nested ones as nested objects)."""
    sort = query.get("sort")
    if sort and _SORT_KEY.fullmatch(sort):

        def key(row: JsonObject) -> tuple[int, str]:
            value: Any = row
            for part in sort.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, bool | int | float):
                return (0, f"{float(value):030.6f}")
            return (1, "" if value is None else str(value))

        rows = sorted(rows, key=key, reverse=query.get("sort_reverse") == "true")
    columns = query.get("columns")
    if columns:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        rows = [_columns(row, wanted) for row in rows]
    return rows


def _columns(row: JsonObject, wanted: Sequence[str]) -> JsonObject:
    out: JsonObject = {}
    for column in wanted:
        head, _, rest = column.partition(".")
        if head not in row:
            continue
        if rest and isinstance(row[head], dict):
            inner = _columns(row[head], [rest])
            if inner:
                out.setdefault(head, {}).update(inner)
        else:
            out[head] = row[head]
    return out
