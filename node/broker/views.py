"""Read-only views of the broker's state for the shell, the management API and tests.

Rules: frozen value types built on demand; holding one never keeps the model alive or lets
anyone mutate it. Arguments are copied into plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from node.broker.entities import Exchange, Queue
from node.broker.model import Broker
from node.broker.types import ChannelRef, ConnId, FieldTable


@dataclass(frozen=True, slots=True)
class QueueView:
    vhost: str
    name: str
    durable: bool
    exclusive: bool
    auto_delete: bool
    owner: ConnId | None  # the declaring connection of an exclusive queue
    arguments: FieldTable
    messages: int  # ready
    unacked: int
    consumers: int
    message_bytes: int  # bodies, ready + unacked
    ready_bytes: int = 0
    unacked_bytes: int = 0
    leader: str = ""  # the node leading the queue ("" outside a cluster)
    exclusive_consumer_tag: str | None = None
    last_used_ms: int = 0  # the model's time of the latest use (x-expires' clock)


@dataclass(frozen=True, slots=True)
class ExchangeView:
    vhost: str
    name: str
    type: str
    durable: bool
    auto_delete: bool
    internal: bool
    arguments: FieldTable


@dataclass(frozen=True, slots=True)
class BindingView:
    vhost: str
    source: str
    destination: str
    destination_type: str  # "queue" or "exchange"
    routing_key: str
    arguments: FieldTable


def queue_view(queue: Queue) -> QueueView:
    return QueueView(
        queue.vhost,
        queue.name,
        queue.durable,
        queue.exclusive,
        queue.auto_delete,
        queue.owner,
        dict(queue.arguments),
        queue.message_count,
        queue.unacked_count,
        queue.consumer_count,
        queue.ready_bytes + queue.unacked_bytes,
        queue.ready_bytes,
        queue.unacked_bytes,
        queue.leader,
        next((c.tag for c in queue.consumers if c.exclusive), None),
        queue.last_used_ms,
    )


def queues(broker: Broker, vhost: str) -> Iterator[QueueView]:
    for queue in broker.iter_queues(vhost):
        yield queue_view(queue)


def exchanges(broker: Broker, vhost: str) -> Iterator[ExchangeView]:
    for x in broker.iter_exchanges(vhost):
        yield ExchangeView(
            vhost, x.name, x.type_name, x.durable, x.auto_delete, x.internal, dict(x.arguments)
        )


def bindings(broker: Broker, vhost: str) -> Iterator[BindingView]:
    """The default exchange's implicit bindings first (as rabbitmqctl lists them), then
    every explicit binding in creation order."""
    for queue in broker.iter_queues(vhost):
        yield BindingView(vhost, "", queue.name, "queue", queue.name, {})
    for b in broker.iter_bindings(vhost):
        kind = "exchange" if isinstance(b.destination, Exchange) else "queue"
        yield BindingView(
            vhost, b.source.name, b.destination.name, kind, b.routing_key, dict(b.arguments)
        )


@dataclass(frozen=True, slots=True)
class ConsumerView:
    """A consumer held by this model (a proxy channel's too: `channel` is then another
    node's connection's channel)."""

    vhost: str
    queue: str
    tag: str
    channel: ChannelRef
    no_ack: bool
    exclusive: bool
    priority: int
    prefetch: int
    active: bool


@dataclass(frozen=True, slots=True)
class ChannelCounts:
    """What the model knows of one channel: its qos and its deliveries."""

    prefetch: int  # basic.qos(global=False)
    global_prefetch: int
    unacked: int
    consumers: int


def consumers(broker: Broker) -> Iterator[ConsumerView]:
    """Every consumer, channel by channel (in channel-open order), then subscription order."""
    for channel in list(broker.channels.values()):
        for c in list(channel.consumers.values()):
            q = c.queue
            yield ConsumerView(
                q.vhost,
                q.name,
                c.tag,
                channel.ref,
                c.no_ack,
                c.exclusive,
                c.priority,
                c.prefetch,
                c.active,
            )


def channel_counts(broker: Broker, ref: ChannelRef) -> ChannelCounts | None:
    channel = broker.channels.get(ref)
    if channel is None:
        return None
    return ChannelCounts(
        channel.prefetch, channel.global_prefetch, len(channel.unacked), len(channel.consumers)
    )
