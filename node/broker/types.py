"""Value types shared by the broker model, the state machine and the channel layer.

Rules: plain data only. This module imports nothing from anyio, pysyncobj or sockets, and
nothing from the rest of Warren. Everything here is deterministic and cheap to copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# A connection is named by a node-local integer id; a channel by (connection id, channel id).
ConnId = int


@dataclass(frozen=True, slots=True)
class ChannelRef:
    conn: ConnId
    channel: int


# Field tables as pamqp decodes them: str keys, values of the AMQP field types.
FieldTable = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Properties:
    """The few basic properties the broker itself reads. The raw encoded properties
    travel beside them untouched and are what a consumer receives."""

    delivery_mode: int = 1
    priority: int | None = None
    expiration: str | None = None
    headers: FieldTable | None = None


@dataclass(slots=True)
class Message:
    """One published message. `properties` is the encoded property block exactly as the
    publisher sent it (flags + property list, no class/weight/body-size prefix)."""

    id: int  # broker-wide, monotonically increasing: queue order and requeue position
    exchange: str
    routing_key: str
    properties: bytes
    props: Properties
    body: bytes
    published_ms: int = 0
    redelivered: bool = False
    delivery_count: int = 0
    # When it expires in its queue (x-message-ttl / the expiration property), or None.
    expires_ms: int | None = None
    # Cluster: its id in its queue's replicated log (a persistent message in a durable
    # queue, numbered in log order, the same on every node); 0 = not replicated.
    rid: int = 0

    @property
    def size(self) -> int:
        return len(self.body)

    @property
    def persistent(self) -> bool:
        return self.props.delivery_mode == 2


@dataclass(frozen=True, slots=True)
class AmqpError:
    """A client's mistake, as data. `connection` errors close the connection, the others
    close only the channel. class_id/method_id name the offending method (0 if none)."""

    reply_code: int
    reply_text: str
    class_id: int = 0
    method_id: int = 0
    connection: bool = False


# ---- Effects: what applying a command asks the I/O shell to do -----------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """basic.deliver to a consumer on `channel`."""

    channel: ChannelRef
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    message: Message
    no_ack: bool = False  # the consumer acks nothing (counted apart in node stats)


@dataclass(frozen=True, slots=True)
class CancelConsumer:
    """Server-initiated basic.cancel (consumer_cancel_notify): the queue went away."""

    channel: ChannelRef
    consumer_tag: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Cluster: a message for a queue led by another node (dead-lettered, requeued by a
    move, or enqueued by the model itself): the shell sends it to `leader` over the link."""

    leader: str
    vhost: str
    queue: str
    message: Message


@dataclass(frozen=True, slots=True)
class RemoteSettle:
    """Cluster: the client settled a delivery that a remote queue leader made; the shell
    relays it there. `op` is "ack", "nack" or "reject"; `tag` is the leader's own tag. A
    `leader` of "" means the delivery is void (its queue moved): nothing to relay."""

    leader: str
    channel: ChannelRef
    tag: int
    op: str
    requeue: bool = False


@dataclass(frozen=True, slots=True)
class Condemned:
    """Cluster: a queue led here must go (auto-delete, exclusive owner gone, x-expires).
    This node's clients no longer see it; the shell replicates its deletion (DropQueue),
    which removes it everywhere unless it was declared again meanwhile."""

    vhost: str
    queue: str
    owner: ConnId
    touched: int = 0  # the queue's `touched` when it was condemned


Effect = Deliver | CancelConsumer | Forward | RemoteSettle | Condemned


# ---- Replies: what a command answers to the channel that sent it ----------------------


@dataclass(frozen=True, slots=True)
class Ok:
    """A plain success (exchange.declare-ok, bind-ok, basic.ack accepted, ...)."""


@dataclass(frozen=True, slots=True)
class QueueDeclared:
    queue: str
    message_count: int
    consumer_count: int


@dataclass(frozen=True, slots=True)
class Count:
    """queue.purge-ok / queue.delete-ok message count."""

    message_count: int


@dataclass(frozen=True, slots=True)
class Routed:
    """Result of a publish. `returned` is set when mandatory and no queue took it: the
    channel sends basic.return(312, NO_ROUTE) before any confirm. `rejected` is set when a
    queue it was routed to refused it (x-overflow reject-publish at its length limit): the
    publisher's confirm for it must be a basic.nack (no basic.return: it was routed).
    `queues` counts the queues it was routed to, refusing ones included, remote ones too."""

    queues: int
    returned: bool = False
    rejected: bool = False
    # Cluster: the target queues led by other nodes (not enqueued here; the channel
    # forwards the message to their leaders and confirms once they have taken it).
    remote: tuple[Any, ...] = ()
    # Cluster: a local target queue keeps it in its replicated log: it is enqueued once
    # the log entry is committed, and the confirm waits for that.
    durable: bool = False


@dataclass(frozen=True, slots=True)
class ConsumeOk:
    consumer_tag: str


@dataclass(frozen=True, slots=True)
class GetOk:
    delivery_tag: int
    redelivered: bool
    message_count: int  # messages left ready in the queue after this one
    message: Message


@dataclass(frozen=True, slots=True)
class GetEmpty:
    pass


@dataclass(frozen=True, slots=True)
class Ticked:
    """The reply to a Tick. `more`: expired messages are still waiting (the tick used up
    its expiry budget); the shell should apply another Tick right after serving pending
    I/O instead of waiting for its usual interval."""

    more: bool = False


Reply = Ok | QueueDeclared | Count | Routed | ConsumeOk | GetOk | GetEmpty | Ticked | AmqpError


@dataclass(slots=True)
class Outcome:
    reply: Reply
    effects: list[Effect] = field(default_factory=list)


_PROPERTY_SETTERS = tuple(
    Properties.__dict__[name].__set__
    for name in ("delivery_mode", "priority", "expiration", "headers")
)


def new_properties(
    delivery_mode: int, priority: int | None, expiration: str | None, headers: FieldTable | None
) -> Properties:
    """`Properties(...)` for the publish hot path (a frozen dataclass's __init__ is slow)."""
    props: Properties = object.__new__(Properties)
    set_mode, set_priority, set_expiration, set_headers = _PROPERTY_SETTERS
    set_mode(props, delivery_mode)
    set_priority(props, priority)
    set_expiration(props, expiration)
    set_headers(props, headers)
    return props
