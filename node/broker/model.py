"""The broker model: one object holding vhosts, exchanges, queues, bindings and channels.

Rules:
- Pure and deterministic: no I/O, no clock (`now_ms` is set by the caller from the
  commands, never decreasing), no randomness, no iteration over sets where order reaches
  the output.
- Total: a client's mistake returns an `AmqpError` (RabbitMQ's code and text) and leaves the
  state untouched; every check runs before the first mutation (the only exception: a
  lookup may first delete a queue that x-expires already condemned). After a channel error the
  channel layer closes the channel (`close_channel`), after a connection error the
  connection (`close_connection`): the model does not do it by itself.
- Deliveries and server-initiated cancels are appended to the caller's `effects` list, in
  the order they happen. Delivery happens eagerly: whenever a change could let a consumer
  take a message, the model delivers as much as prefetch and writability allow.
- Exchange types are looked up in the registry by name; the model never branches on one.
- Time-based rules (message TTL, x-expires) apply lazily whenever a queue is touched and on
  `tick`; like RabbitMQ, messages expire from the head of a queue only (of each priority,
  in a priority queue).
- Expiry never blocks: each command may expire at most EXPIRE_BUDGET messages (a
  dead-lettered one costs DEAD_LETTER_COST of it). The rest waits for the next command;
  `tick` answers `Ticked(more=True)` while expired messages remain, and a queue whose
  head is expired delivers nothing until they are gone.
- Dead-lettering (docs/dead-lettering.md): messages rejected or nacked without requeue,
  expired, dropped by drop-head, refused by reject-publish-dlx, or returned past their
  x-delivery-limit are published to the queue's x-dead-letter-exchange as new messages
  (new id, x-death headers, expiration removed, routed like a publish with no mandatory
  and no confirm). A missing exchange drops them; so does a fully automatic cycle. A work
  list, never recursion, drains dead messages that cause further deaths. Headers are
  re-encoded by the injected `HeaderRewriter`; without one (None) a dead message keeps its
  old property bytes (its consumers do not see x-death; the model still does).
  Queue deletion, purge and basic.ack never dead-letter.
- x-delivery-limit (any queue type) and quorum queues: every delivery is stamped with an
  x-delivery-count header (the times the message was returned before: 0 on the first
  delivery, as RabbitMQ 3.10's quorum queues do). The stamp is on the delivered copy only:
  the stored message, and so a dead-lettered one, never carries it. Returned more times
  than the limit, a message dies with reason delivery_limit.
- Not modelled: quorum/stream queue semantics (quorum queues behave as classic ones).
Must never import anyio, asyncio, pysyncobj, socket, or read a clock.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from node.broker import args as arguments_
from node.broker import errors
from node.broker.deadletter import (
    HeaderRewriter,
    dead_letter_target,
    death_routing_keys,
    drops_as_cycle,
    routing_key_replaced,
    x_death_headers,
)
from node.broker.entities import Binding, Channel, Connection, Consumer, Exchange, Queue, Unacked
from node.broker.errors import Method
from node.broker.exchange_type import ExchangeType
from node.broker.registry import exchange_types
from node.broker.reply_to import REPLY_PREFIX, REPLY_QUEUE, DirectReply
from node.broker.types import (
    AmqpError,
    CancelConsumer,
    ChannelRef,
    Condemned,
    ConnId,
    ConsumeOk,
    Count,
    Deliver,
    Effect,
    FieldTable,
    Forward,
    GetEmpty,
    GetOk,
    Message,
    Ok,
    Properties,
    QueueDeclared,
    RemoteSettle,
    Reply,
    Routed,
    Ticked,
)

log = logging.getLogger(__name__)

DEFAULT_VHOST = "/"
# The exchanges every vhost starts with: name -> (type, internal). All durable.
BUILTIN_EXCHANGES: Mapping[str, tuple[str, bool]] = {
    "": ("direct", False),
    "amq.direct": ("direct", False),
    "amq.fanout": ("fanout", False),
    "amq.topic": ("topic", False),
    "amq.headers": ("headers", False),
    "amq.match": ("headers", False),
    "amq.rabbitmq.trace": ("topic", True),
}
# Alternate-exchange chains longer than this are cut (a cycle of AEs must not loop).
MAX_ALTERNATE_HOPS = 16

OK = Ok()
EMPTY = GetEmpty()
FLOW_HIGH = 2000  # ready messages in a consumed queue before its publishers are slowed
FLOW_LOW = 1000  # ... and until it has drained to this
_ROUTED = tuple(Routed(n) for n in range(16))
NO_ROUTE = Routed(0, returned=True)
# Expiry work one command may do (messages); a dead-lettered message costs more (it is
# re-encoded and routed: ~35 us against ~0.5 us for a plain drop; 125 a command keep
# a Tick under ~5 ms).
EXPIRE_BUDGET = 2000
DEAD_LETTER_COST = 16
TICKED = Ticked()
TICKED_MORE = Ticked(more=True)
DELIVERY_COUNT = "x-delivery-count"


def _routed(n: int) -> Routed:
    return _ROUTED[n] if n < len(_ROUTED) else Routed(n)


class DefaultTable:
    """The default exchange's routing: every queue is bound by its own name, implicitly."""

    __slots__ = ("_queues",)

    def __init__(self, queues: Mapping[str, Queue]) -> None:
        self._queues = queues

    def add(self, binding: Any) -> None:  # pragma: no cover - binding to "" is refused
        raise RuntimeError("the default exchange takes no explicit bindings")

    def remove(self, binding: Any) -> None:  # pragma: no cover
        raise RuntimeError("the default exchange takes no explicit bindings")

    def route(self, routing_key: str, headers: FieldTable | None) -> Sequence[Any]:
        queue = self._queues.get(routing_key)
        return () if queue is None else (queue,)


class Vhost:
    __slots__ = ("bindings", "exchanges", "name", "queues")

    def __init__(self, name: str) -> None:
        self.name = name
        self.exchanges: dict[str, Exchange] = {}
        self.queues: dict[str, Queue] = {}
        self.bindings: dict[Any, Binding] = {}  # every explicit binding, creation order


def binding_key(source: str, kind: str, destination: str, key: str, args: FieldTable) -> Any:
    return (source, kind, destination, key, arguments_.freeze(args))


def _can_take(consumer: Consumer) -> bool:
    channel = consumer.channel
    if not channel.conn.writable:
        return False
    if consumer.no_ack:
        return True
    if consumer.prefetch and consumer.unacked >= consumer.prefetch:
        return False
    return not (channel.global_prefetch and channel.consumer_unacked >= channel.global_prefetch)


class Broker:
    """Vhosts and their topology, messages, and the connection state that consumes them."""

    def __init__(
        self,
        vhosts: Sequence[str] = (DEFAULT_VHOST,),
        types: Mapping[str, ExchangeType] | None = None,
        rewrite_headers: HeaderRewriter | None = None,
    ) -> None:
        self.types = types if types is not None else exchange_types()
        # Re-encodes a property block with new headers (dead-lettering, x-delivery-count).
        self.rewrite_headers = rewrite_headers
        # Expiry work left to the current command: the caller resets it per command
        # (`begin`); see the module rules.
        self.expire_budget = EXPIRE_BUDGET
        self._dead_work: deque[tuple[Queue, list[Message], str]] | None = None
        self._cycles_logged: dict[tuple[str, str], None] = {}
        self.vhosts: dict[str, Vhost] = {}
        self.conns: dict[ConnId, Connection] = {}
        self.channels: dict[ChannelRef, Channel] = {}
        self.next_message_id = 1
        self.total_bytes = 0  # message bodies held, ready + unacked
        self.now_ms = 0  # the latest command time seen: the model's only clock
        self.expiring: dict[Queue, None] = {}  # queues that may hold messages with a TTL
        self.expirable: dict[Queue, None] = {}  # queues with x-expires
        # Flow control: consumed queues whose ready backlog passed FLOW_HIGH on a publish.
        # Derived, never decides anything inside the model: the shell reads it to slow
        # publishers down to their consumers' pace (a slow consumer slows its publisher).
        self.backlogged: dict[Queue, None] = {}
        self.replies = DirectReply()
        # Cluster (see set_leader): this node's name, and whether queue deletions that
        # this node alone decides (auto-delete, exclusive owner gone, x-expires) are also
        # reported as `Condemned` effects, for the shell to replicate to the other nodes.
        self.node_name = ""
        self.clustered = False
        self.condemned: list[Condemned] = []  # drained into each command's effects
        # True while a command from the replicated log is applied: those see queues this
        # node condemned (every replica must decide alike); this node's own clients don't.
        self.replaying = False
        self.declarations = 0  # numbers queue declarations (Queue.touched)
        # Stands in for the queue of an unacked delivery that became void when its queue
        # changed leader: settling it relays nothing.
        self.void = Queue(
            "", "", durable=False, exclusive=False, auto_delete=False, owner=None, arguments={}
        )
        self.void.remote = True
        # Cluster, durable messages (see `_accept` and the module rules): whether
        # persistent messages for durable queues go through the replicated log, whether
        # this node holds live copies of the logs it leads yet (not while it catches up
        # with the log at start), and what it must replicate, drained by the shell after
        # every command: messages to log, and per queue the rids its leader settled
        # (gone for good) and returned (requeued: the stored delivery count goes up).
        self.durable = False
        self.active = True
        self.next_rid = 1
        self.to_log: list[tuple[Queue, Message]] = []
        self.settled: dict[Queue, tuple[list[int], list[int]]] = {}
        for name in vhosts:
            self.add_vhost(name)

    def begin(self, now_ms: int) -> None:
        """A new command at `now_ms`: move the clock (never back), renew the expiry budget."""
        if now_ms > self.now_ms:
            self.now_ms = now_ms
        self.expire_budget = EXPIRE_BUDGET

    # ---- vhosts and lookups ------------------------------------------------------------

    def add_vhost(self, name: str) -> Vhost:
        vhost = self.vhosts.get(name)
        if vhost is not None:
            return vhost
        vhost = self.vhosts[name] = Vhost(name)
        for xname, (type_name, internal) in BUILTIN_EXCHANGES.items():
            xtype = self.types[type_name]
            table = DefaultTable(vhost.queues) if xname == "" else None
            vhost.exchanges[xname] = Exchange(
                xname,
                xtype,
                durable=True,
                auto_delete=False,
                internal=internal,
                arguments={},
                table=table,
            )
        return vhost

    def connection(self, conn_id: ConnId) -> Connection:
        conn = self.conns.get(conn_id)
        if conn is None:
            conn = self.conns[conn_id] = Connection(conn_id)
        return conn

    def _channel(self, ref: ChannelRef) -> Channel:
        channel = self.channels.get(ref)
        if channel is None:
            conn = self.connection(ref.conn)
            channel = self.channels[ref] = Channel(ref, conn)
            conn.channels[ref.channel] = channel
        return channel

    # ---- connections and channels ------------------------------------------------------

    def open_channel(self, ref: ChannelRef) -> Reply:
        self._channel(ref)
        return OK

    def close_channel(self, ref: ChannelRef, effects: list[Effect]) -> Reply:
        channel = self.channels.get(ref)
        if channel is not None:
            self._close_channel(channel, effects)
        return OK

    def _close_channel(self, channel: Channel, effects: list[Effect]) -> None:
        self.replies.close_channel(channel.ref)
        del self.channels[channel.ref]
        channel.conn.channels.pop(channel.ref.channel, None)
        touched: dict[Queue, None] = {}
        emptied: list[Queue] = []
        for consumer in channel.consumers.values():
            queue = consumer.queue
            consumer.active = False
            queue.remove_consumer(consumer)
            queue.last_used_ms = self.now_ms
            if queue.auto_delete and not queue.consumers and not queue.deleted:
                emptied.append(queue)
            elif queue.single_active:
                touched[queue] = None
        channel.consumers = {}
        for queue, message, receiver in channel.unacked.values():
            if receiver is not None:
                receiver.unacked -= 1
            if queue.remote:
                continue  # the leader requeues it when the shell closes the channel there
            if not queue.deleted:
                self._give_back(queue, message, effects)
                touched[queue] = None
        channel.unacked.clear()
        channel.consumer_unacked = 0
        for queue in emptied:
            if not queue.deleted and not queue.consumers:
                self._drop_queue(queue, effects)
        for queue in touched:
            if not queue.deleted:
                self._requeued(queue, effects)

    def close_connection(self, conn_id: ConnId, effects: list[Effect]) -> Reply:
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return OK
        for channel in list(conn.channels.values()):
            self._close_channel(channel, effects)
        for queue in list(conn.exclusive_queues.values()):
            if not queue.deleted and not queue.remote:
                self._drop_queue(queue, effects)
        return OK

    def set_writable(self, conn_id: ConnId, writable: bool, effects: list[Effect]) -> Reply:
        conn = self.connection(conn_id)
        was = conn.writable
        conn.writable = writable
        if writable and not was:
            for channel in list(conn.channels.values()):
                self._dispatch_channel(channel, effects)
        return OK

    # ---- exchanges ---------------------------------------------------------------------

    def declare_exchange(
        self,
        vhost: str,
        name: str,
        type_name: str,
        *,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Reply:
        method = Method.EXCHANGE_DECLARE
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if name == "":
            return errors.default_exchange(method)
        exchange = vh.exchanges.get(name)
        if passive:
            return OK if exchange is not None else errors.no_exchange(vhost, name, method)
        xtype = self.types.get(type_name)
        if xtype is None:
            return errors.unknown_exchange_type(type_name)
        if exchange is not None:
            kind = "exchange"
            if exchange.type_name != type_name:
                return errors.inequivalent(
                    kind, vhost, name, "type", f"'{type_name}'", f"'{exchange.type_name}'", method
                )
            for field, have, want in (
                ("durable", exchange.durable, durable),
                ("auto_delete", exchange.auto_delete, auto_delete),
                ("internal", exchange.internal, internal),
            ):
                if have != want:
                    return errors.inequivalent(
                        kind, vhost, name, field, errors.flag(want), errors.flag(have), method
                    )
            diff = arguments_.inequivalent(
                exchange.arguments, arguments, arguments_.EXCHANGE_EQUIVALENT
            )
            if diff is not None:
                return errors.inequivalent(kind, vhost, name, *diff, method)
            return OK
        if name.startswith("amq."):
            return errors.reserved_name("exchange", name, method)
        problem = arguments_.invalid_exchange_args(arguments, name, vhost)
        if problem is not None:
            return errors.precondition(problem, method)
        vh.exchanges[name] = Exchange(
            name,
            xtype,
            durable=durable,
            auto_delete=auto_delete,
            internal=internal,
            arguments=arguments,
        )
        return OK

    def delete_exchange(self, vhost: str, name: str, *, if_unused: bool) -> Reply:
        method = Method.EXCHANGE_DELETE
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if name == "":
            return errors.default_exchange(method)
        if name.startswith("amq."):
            return errors.system_exchange(vhost, name)
        exchange = vh.exchanges.get(name)
        if exchange is None:
            return OK
        if if_unused and exchange.bindings_out:
            return errors.in_use("exchange", vhost, name, method)
        self._delete_exchange(vh, exchange)
        return OK

    def _delete_exchange(self, vh: Vhost, exchange: Exchange) -> None:
        exchange.deleted = True
        del vh.exchanges[exchange.name]
        for binding in list(exchange.bindings_out.values()):
            self._remove_binding(vh, binding)
        for binding in list(exchange.bindings_in.values()):
            self._remove_binding(vh, binding)

    def bind_exchange(
        self, vhost: str, destination: str, source: str, routing_key: str, arguments: FieldTable
    ) -> Reply:
        method = Method.EXCHANGE_BIND
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if destination == "" or source == "":
            return errors.default_exchange(method)
        src = vh.exchanges.get(source)
        if src is None:
            return errors.no_exchange(vhost, source, method)
        dest = vh.exchanges.get(destination)
        if dest is None:
            return errors.no_exchange(vhost, destination, method)
        problem = src.xtype.validate_binding(arguments)
        if problem is not None:
            return errors.precondition(problem, method)
        key = binding_key(source, "exchange", destination, routing_key, arguments)
        if key not in vh.bindings:
            self.add_binding(vh, Binding(key, src, dest, routing_key, arguments))
        return OK

    def unbind_exchange(
        self, vhost: str, destination: str, source: str, routing_key: str, arguments: FieldTable
    ) -> Reply:
        method = Method.EXCHANGE_UNBIND
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if destination == "" or source == "":
            return errors.default_exchange(method)
        key = binding_key(source, "exchange", destination, routing_key, arguments)
        binding = vh.bindings.get(key)
        if binding is not None:
            self._remove_binding(vh, binding)
        return OK

    def add_binding(self, vh: Vhost, binding: Binding) -> None:
        vh.bindings[binding.key] = binding
        binding.source.bindings_out[binding.key] = binding
        binding.destination.bindings_in[binding.key] = binding
        binding.source.table.add(binding.spec)
        if isinstance(binding.destination, Exchange):
            binding.source.e2e_count += 1

    def _remove_binding(self, vh: Vhost, binding: Binding) -> None:
        source = binding.source
        if vh.bindings.pop(binding.key, None) is None:
            return
        source.bindings_out.pop(binding.key, None)
        binding.destination.bindings_in.pop(binding.key, None)
        source.table.remove(binding.spec)
        if isinstance(binding.destination, Exchange):
            source.e2e_count -= 1
        if source.auto_delete and not source.bindings_out and not source.deleted:
            self._delete_exchange(vh, source)

    # ---- queues ------------------------------------------------------------------------

    def declare_queue(
        self,
        vhost: str,
        name: str,
        owner: ConnId,
        *,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
        server_named: bool = False,
        effects: list[Effect] | None = None,
    ) -> Reply:
        """`effects` receives deliveries of messages dead-lettered by lazy expiry (None:
        a throwaway list, for callers that know no queue dead-letters)."""
        method = Method.QUEUE_DECLARE
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if name == REPLY_QUEUE:
            return QueueDeclared(REPLY_QUEUE, 0, 1)  # RabbitMQ's answer; nothing is created
        queue = self._lookup(vh, name)
        if queue is not None:
            queue.last_used_ms = self.now_ms  # a declaration counts as use (x-expires)
            if queue.expiring:
                self._expire(queue, [] if effects is None else effects)
        if passive:
            if queue is None:
                return errors.no_queue(vhost, name, method)
            if queue.exclusive and queue.owner != owner:
                return errors.locked(vhost, name, method)
            return QueueDeclared(name, queue.message_count, queue.consumer_count)
        if name.startswith("amq.") and not server_named:
            return errors.reserved_name("queue", name, method)
        if queue is not None:
            if queue.exclusive != exclusive or (queue.exclusive and queue.owner != owner):
                return errors.locked(vhost, name, method)
            kind = "queue"
            # RabbitMQ does not compare `durable` for exclusive queues.
            if not queue.exclusive and queue.durable != durable:
                return errors.inequivalent(
                    kind,
                    vhost,
                    name,
                    "durable",
                    errors.flag(durable),
                    errors.flag(queue.durable),
                    method,
                )
            if queue.auto_delete != auto_delete:
                return errors.inequivalent(
                    kind,
                    vhost,
                    name,
                    "auto_delete",
                    errors.flag(auto_delete),
                    errors.flag(queue.auto_delete),
                    method,
                )
            diff = arguments_.inequivalent(
                queue.arguments,
                arguments,
                arguments_.QUEUE_EQUIVALENT,
                arguments_.QUEUE_DEFAULTS,
            )
            if diff is not None:
                return errors.inequivalent(kind, vhost, name, *diff, method)
            self.declarations += 1  # declared again: a pending DropQueue spares it
            queue.touched = self.declarations
            return QueueDeclared(name, queue.message_count, queue.consumer_count)
        problem = arguments_.invalid_queue_args(
            arguments, name, vhost
        ) or arguments_.invalid_queue_properties(
            arguments, name, vhost, durable=durable, exclusive=exclusive, auto_delete=auto_delete
        )
        if problem is not None:
            return errors.precondition(problem, method)
        queue = Queue(
            vhost,
            name,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            owner=owner if exclusive else None,
            arguments=arguments,
        )
        queue.last_used_ms = self.now_ms
        self.declarations += 1
        queue.touched = self.declarations
        self.register_queue(vh, queue)
        return QueueDeclared(name, 0, 0)

    def register_queue(self, vh: Vhost, queue: Queue) -> None:
        vh.queues[queue.name] = queue
        if queue.exclusive and queue.owner is not None:
            self.connection(queue.owner).exclusive_queues[(vh.name, queue.name)] = queue
        if queue.expiring:
            self.expiring[queue] = None
        if queue.expires is not None:
            self.expirable[queue] = None

    def find_queue(self, vhost: str, name: str) -> Queue | None:
        """The queue as the topology has it (no x-expires or condemnation check)."""
        vh = self.vhosts.get(vhost)
        return None if vh is None else vh.queues.get(name)

    def _lookup(self, vh: Vhost, name: str) -> Queue | None:
        """The queue, unless x-expires says it is gone (then it goes now; in a cluster its
        leader condemns it and it lives on until the deletion is replicated)."""
        queue = vh.queues.get(name)
        if queue is None:
            return None
        if queue.condemned and not self.replaying:
            return None
        if queue.expires is not None and not queue.remote and self._idle_expired(queue):
            self._drop_queue(queue, [])
            if not self.replaying:
                return None
        return queue

    def _drop_queue(self, queue: Queue, effects: list[Effect]) -> None:
        """A deletion this node decides alone (auto-delete, exclusive owner gone,
        x-expires). Outside a cluster it happens at once. In a cluster the queue is
        condemned: this node's clients stop seeing it, and the `Condemned` effect asks the
        shell to replicate a DropQueue, applied in log order on every node alike."""
        if not self.clustered:
            self._delete_queue(queue, effects)
            return
        if not queue.condemned:
            queue.condemned = True
            self.condemned.append(
                Condemned(queue.vhost, queue.name, queue.owner or 0, queue.touched)
            )

    def drop_queue(self, vhost: str, name: str, touched: int, effects: list[Effect]) -> Reply:
        """The replicated end of a condemned queue: deleted unless it was declared again
        since it was condemned (then it lives on, no longer condemned)."""
        queue = self.find_queue(vhost, name)
        if queue is None:
            return OK
        if queue.touched != touched:
            queue.condemned = False
            return OK
        self._delete_queue(queue, effects)
        return OK

    def _idle_expired(self, queue: Queue) -> bool:
        assert queue.expires is not None
        return not queue.consumers and self.now_ms - queue.last_used_ms >= queue.expires

    def _owned_queue(
        self, vhost: str, name: str, owner: ConnId, method: Method, effects: list[Effect]
    ) -> Queue | AmqpError:
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        queue = self._lookup(vh, name)
        if queue is None:
            return errors.no_queue(vhost, name, method)
        if queue.exclusive and queue.owner != owner:
            return errors.locked(vhost, name, method)
        if queue.expiring:
            self._expire(queue, effects)
        return queue

    def delete_queue(
        self,
        vhost: str,
        name: str,
        owner: ConnId,
        *,
        if_unused: bool,
        if_empty: bool,
        effects: list[Effect],
    ) -> Reply:
        method = Method.QUEUE_DELETE
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if self._lookup(vh, name) is None:
            return Count(0)  # RabbitMQ 3.x: deleting a missing queue succeeds
        queue = self._owned_queue(vhost, name, owner, method, effects)
        if isinstance(queue, AmqpError):
            return queue
        refused = self._delete_refused(queue, if_unused=if_unused, if_empty=if_empty)
        if refused is not None:
            return refused
        count = queue.message_count
        self._delete_queue(queue, effects)
        return Count(count)

    def _delete_refused(self, queue: Queue, *, if_unused: bool, if_empty: bool) -> AmqpError | None:
        """queue.delete's if-unused / if-empty refusal, if any."""
        if if_unused and queue.consumers:
            return errors.in_use("queue", queue.vhost, queue.name, Method.QUEUE_DELETE)
        if if_empty and queue.message_count:
            return errors.not_empty(queue.vhost, queue.name)
        return None

    def _delete_queue(self, queue: Queue, effects: list[Effect]) -> None:
        vh = self.vhosts[queue.vhost]
        queue.deleted = True
        for consumer in list(queue.consumers):
            consumer.active = False
            consumer.channel.consumers.pop(consumer.tag, None)
            effects.append(CancelConsumer(consumer.channel.ref, consumer.tag))
            queue.remove_consumer(consumer)
        self.total_bytes -= queue.ready_bytes + queue.unacked_bytes
        queue.purge()
        del vh.queues[queue.name]
        self.expiring.pop(queue, None)
        self.expirable.pop(queue, None)
        if queue.owner is not None:
            conn = self.conns.get(queue.owner)
            if conn is not None:
                conn.exclusive_queues.pop((queue.vhost, queue.name), None)
        for binding in list(queue.bindings_in.values()):
            self._remove_binding(vh, binding)

    def purge_queue(
        self, vhost: str, name: str, owner: ConnId, effects: list[Effect] | None = None
    ) -> Reply:
        queue = self._owned_queue(
            vhost, name, owner, Method.QUEUE_PURGE, [] if effects is None else effects
        )
        if isinstance(queue, AmqpError):
            return queue
        self.total_bytes -= queue.ready_bytes
        if queue.live:
            for message in queue.messages():
                self._forget(queue, message)
        return Count(queue.purge())

    def bind_queue(
        self,
        vhost: str,
        name: str,
        exchange_name: str,
        routing_key: str,
        owner: ConnId,
        arguments: FieldTable,
        effects: list[Effect] | None = None,
    ) -> Reply:
        method = Method.QUEUE_BIND
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if exchange_name == "":
            return errors.default_exchange(method)
        exchange = vh.exchanges.get(exchange_name)
        if exchange is None:
            return errors.no_exchange(vhost, exchange_name, method)
        queue = self._owned_queue(vhost, name, owner, method, [] if effects is None else effects)
        if isinstance(queue, AmqpError):
            return queue
        problem = exchange.xtype.validate_binding(arguments)
        if problem is not None:
            return errors.precondition(problem, method)
        key = binding_key(exchange_name, "queue", name, routing_key, arguments)
        if key not in vh.bindings:
            self.add_binding(vh, Binding(key, exchange, queue, routing_key, arguments))
        return OK

    def unbind_queue(
        self,
        vhost: str,
        name: str,
        exchange_name: str,
        routing_key: str,
        owner: ConnId,
        arguments: FieldTable,
    ) -> Reply:
        method = Method.QUEUE_UNBIND
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        if exchange_name == "":
            return errors.default_exchange(method)
        key = binding_key(exchange_name, "queue", name, routing_key, arguments)
        binding = vh.bindings.get(key)
        if binding is None:
            return OK  # RabbitMQ 3.x: a missing queue, exchange or binding is fine
        queue = binding.destination
        assert isinstance(queue, Queue)
        if queue.exclusive and queue.owner != owner:
            return errors.locked(vhost, name, method)
        self._remove_binding(vh, binding)
        return OK

    # ---- publish -----------------------------------------------------------------------

    def publish(
        self,
        vhost: str,
        exchange_name: str,
        routing_key: str,
        mandatory: bool,
        properties: bytes,
        props: Properties,
        body: bytes,
        now_ms: int,
        effects: list[Effect],
    ) -> Reply:
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, Method.BASIC_PUBLISH)
        if not exchange_name and routing_key.startswith(REPLY_PREFIX):
            return self._reply(routing_key, mandatory, properties, props, body, now_ms, effects)
        exchange = vh.exchanges.get(exchange_name)
        if exchange is None:
            return errors.no_exchange(vhost, exchange_name, Method.BASIC_PUBLISH)
        if exchange.internal:
            return errors.internal_exchange(vhost, exchange_name)
        message_ttl: int | None = None
        if props.expiration is not None:
            message_ttl, problem = arguments_.parse_expiration(props.expiration)
            if problem is not None:
                return errors.invalid_expiration(props.expiration, problem)
        queues = exchange.table.route(routing_key, props.headers)
        if exchange.e2e_count or len(queues) > 1:
            queues = self._route(vh, exchange, routing_key, props.headers)
        if not queues and exchange.alternate is not None:
            queues = self._route_alternate(vh, exchange, routing_key, props.headers)
        if not queues:
            return NO_ROUTE if mandatory else _ROUTED[0]
        message_id = self.next_message_id
        self.next_message_id = message_id + 1
        rejected = False
        remote: list[Queue] | None = None
        logged = len(self.to_log)
        for queue in queues:
            if queue.remote:  # led by another node: the channel forwards it there
                if remote is None:
                    remote = []
                remote.append(queue)
                continue
            # Each queue owns its copy: redelivered and delivery_count are per queue.
            message = Message(
                message_id, exchange_name, routing_key, properties, props, body, now_ms
            )
            if not self._accept(queue, message, message_ttl, effects):
                rejected = True
        durable = len(self.to_log) > logged
        if remote is not None or durable:
            return Routed(
                len(queues), rejected=rejected, remote=tuple(remote or ()), durable=durable
            )
        if rejected:
            return Routed(len(queues), rejected=True)
        return _routed(len(queues))

    def enqueue_forwarded(
        self,
        vhost: str,
        names: Sequence[str],
        exchange_name: str,
        routing_key: str,
        properties: bytes,
        props: Properties,
        body: bytes,
        now_ms: int,
        effects: list[Effect],
        redelivered: bool = False,
    ) -> bool:
        """Cluster: a message another node routed to queues led here (`redelivered`: one
        that moved here with its queue after it had been delivered). Returns False when
        it was not taken everywhere, and the publisher's confirm becomes a nack (it
        publishes again): a queue refused it (reject-publish), a queue is led by another
        node now (the sender's view is older than ours), or this node is still catching
        up with the log (its view is older than the sender's). A queue that is gone is
        skipped, as a publish racing a delete: the message is dropped and confirmed."""
        if not self.active:
            return False
        vh = self.vhosts.get(vhost)
        if vh is None:
            return True
        message_ttl: int | None = None
        if props.expiration is not None:
            message_ttl, _ = arguments_.parse_expiration(props.expiration)
        accepted = True
        message_id = self.next_message_id
        self.next_message_id = message_id + 1
        for name in names:
            if name.startswith(REPLY_PREFIX):  # a direct reply-to reply for a channel here
                self._reply(name, False, properties, props, body, now_ms, effects)
                continue
            queue = vh.queues.get(name)
            if queue is None:
                continue
            if queue.remote:
                accepted = False  # never confirm what no queue holds
                continue
            message = Message(
                message_id, exchange_name, routing_key, properties, props, body, now_ms
            )
            message.redelivered = redelivered
            if not self._accept(queue, message, message_ttl, effects):
                accepted = False
        return accepted

    def _accept(
        self, queue: Queue, message: Message, message_ttl: int | None, effects: list[Effect]
    ) -> bool:
        """`queue` (led here) takes `message`, its own copy; False when it refuses it
        (x-overflow reject-publish at its limit; reject-publish-dlx dead-letters it).
        Publishes, forwarded messages and dead-lettered ones all enter a queue here."""
        size = len(message.body)
        if queue.limited and queue.refuses(size):
            if queue.overflow_dlx and queue.dead_letters:
                self._dead_letter(queue, [message], "maxlen", effects)
            return False
        if (
            self.durable
            and not message.rid
            and queue.durable
            and message.props.delivery_mode == 2
            and not queue.exclusive
        ):
            # Cluster: logged first; `log_message` enqueues it once the entry commits.
            self.to_log.append((queue, message))
            return True
        if message.rid:
            if message.expires_ms is not None and not queue.expiring:
                queue.expiring = True
                self.expiring[queue] = None
        elif message_ttl is not None or queue.ttl is not None:
            message.expires_ms = self._expiry(queue.ttl, message_ttl)
            if not queue.expiring:
                queue.expiring = True
                self.expiring[queue] = None
        queue.ready.append(message)
        queue.ready_bytes += size
        self.total_bytes += size
        if queue.consumers:
            self._dispatch(queue, effects)
            if len(queue.ready) > FLOW_HIGH:
                self.backlogged[queue] = None
        if queue.limited:
            self._drop_over_limit(queue, effects)
        if queue.expiring:
            # A TTL of 0: gone unless a consumer took it just now.
            self._expire(queue, effects, inclusive=True)
        return True

    def _reply(
        self,
        routing_key: str,
        mandatory: bool,
        properties: bytes,
        props: Properties,
        body: bytes,
        now_ms: int,
        effects: list[Effect],
    ) -> Reply:
        """A direct reply-to reply: straight to the requesting channel's reply consumer.
        RabbitMQ 3.10 also returns a mandatory reply it delivered (kept, quirk included)."""
        target = self.replies.target(routing_key)
        channel = self.channels.get(target[0]) if target is not None else None
        if target is None or channel is None:
            return NO_ROUTE if mandatory else _ROUTED[0]
        message_id = self.next_message_id
        self.next_message_id = message_id + 1
        message = Message(message_id, "", routing_key, properties, props, body, now_ms)
        tag = channel.next_tag
        channel.next_tag = tag + 1
        effects.append(Deliver(channel.ref, target[1], tag, False, message, True))
        return NO_ROUTE if mandatory else _ROUTED[1]

    def flow_blocked(self) -> bool:
        """True while a consumed queue that publishers fill holds more than FLOW_LOW ready
        messages since it passed FLOW_HIGH (hysteresis). Queues without consumers never
        count: a backlog nobody consumes is the memory watermark's business."""
        if not self.backlogged:
            return False
        for queue in list(self.backlogged):
            if queue.deleted or not queue.consumers or len(queue.ready) <= FLOW_LOW:
                del self.backlogged[queue]
        return bool(self.backlogged)

    def _expiry(self, queue_ttl: int | None, message_ttl: int | None) -> int:
        if queue_ttl is None:
            assert message_ttl is not None
            return self.now_ms + message_ttl
        if message_ttl is None:
            return self.now_ms + queue_ttl
        return self.now_ms + min(queue_ttl, message_ttl)

    def _expire(self, queue: Queue, effects: list[Effect], *, inclusive: bool = False) -> bool:
        """Expire (and dead-letter) messages at the head of `queue` within the command's
        budget. False when the budget ran out (expired messages may remain)."""
        budget = self.expire_budget
        cost = DEAD_LETTER_COST if queue.dead_letters else 1
        if budget < cost:
            return not queue.head_expired(self.now_ms)
        limit = budget // cost
        gone = queue.pop_expired(self.now_ms, inclusive=inclusive, limit=limit)
        if not gone:
            return True
        self.expire_budget = budget - len(gone) * cost
        for message in gone:
            self.total_bytes -= len(message.body)
            if message.rid:
                self._forget(queue, message)
        if queue.dead_letters:
            self._dead_letter(queue, gone, "expired", effects)
        return len(gone) < limit

    def tick(self, effects: list[Effect]) -> Reply:
        """Expire messages at the head of every queue that may hold some, and delete the
        queues unused for longer than their x-expires.

        The contract with the shell: one tick does at most EXPIRE_BUDGET messages' worth
        of expiry (see the module rules), so it never holds the event loop for long. It
        answers `Ticked(more=True)` when expired messages are still waiting: the shell
        should then apply another Tick as soon as it has served pending I/O (at once, not
        after its usual interval), and keep doing so until `Ticked(more=False)`. Queues
        whose consumers waited on the expiry get their deliveries in the effects."""
        more = exhausted = False
        for queue in list(self.expiring):
            if queue.deleted:
                continue
            if not exhausted:
                if not self._expire(queue, effects):
                    exhausted = True
                    del self.expiring[queue]  # served last next time: others get a turn
                    self.expiring[queue] = None
                if queue.consumers and (queue.returned or queue.ready):
                    self._dispatch(queue, effects)
            if exhausted and queue.head_expired(self.now_ms):
                more = True
                break
        for queue in list(self.expirable):
            if not queue.deleted and not queue.remote and self._idle_expired(queue):
                self._drop_queue(queue, effects)
        return TICKED_MORE if more else TICKED

    def _drop_over_limit(self, queue: Queue, effects: list[Effect]) -> None:
        dropped = queue.drop_over_limit()
        if not dropped:
            return
        for message in dropped:
            self.total_bytes -= len(message.body)
            if message.rid:
                self._forget(queue, message)
        if queue.dead_letters:
            self._dead_letter(queue, dropped, "maxlen", effects)

    # ---- dead-lettering ----------------------------------------------------------------

    def _dead_letter(
        self, queue: Queue, messages: list[Message], reason: str, effects: list[Effect]
    ) -> None:
        """Publish `messages`, gone from `queue` for `reason`, to its dead-letter exchange.
        Deaths they cause in turn (a full drop-head queue, a TTL of 0) join the work list
        of the outermost call instead of recursing."""
        work = self._dead_work
        if work is not None:
            work.append((queue, messages, reason))
            return
        work = self._dead_work = deque([(queue, messages, reason)])
        try:
            while work:
                source, dead, why = work.popleft()
                for message in dead:
                    self._dead_letter_one(source, message, why, effects)
        finally:
            self._dead_work = None

    def _dead_letter_one(
        self, queue: Queue, message: Message, reason: str, effects: list[Effect]
    ) -> None:
        target = dead_letter_target(queue.arguments, message.routing_key)
        if target is None:
            return
        vh = self.vhosts.get(queue.vhost)
        dlx = None if vh is None else vh.exchanges.get(target.exchange)
        if vh is None or dlx is None:
            return  # as RabbitMQ: a dead-letter exchange that does not exist drops it
        props = message.props
        headers = x_death_headers(
            props.headers,
            queue=queue.name,
            reason=reason,
            exchange=message.exchange,
            routing_keys=death_routing_keys(message.routing_key, props.headers),
            now_ms=self.now_ms,
            original_expiration=props.expiration,
            drop_cc=routing_key_replaced(queue.arguments),
        )
        rewrite = self.rewrite_headers
        raw = (
            message.properties
            if rewrite is None
            else rewrite(message.properties, headers, without_expiration=True)
        )
        new_props = Properties(props.delivery_mode, props.priority, None, headers)
        key = target.routing_key
        targets = self._route(vh, dlx, key, headers)
        if not routing_key_replaced(queue.arguments):
            # As RabbitMQ: routed by every key the message had (its CC keys too).
            cc_keys = death_routing_keys(key, props.headers)[1:]
            if cc_keys:
                found = dict.fromkeys(targets)
                for cc in cc_keys:
                    found.update(dict.fromkeys(self._route(vh, dlx, cc, headers)))
                targets = list(found)
        if not targets and dlx.alternate is not None:
            targets = self._route_alternate(vh, dlx, key, headers)
        if not targets:
            return
        message_id = self.next_message_id
        self.next_message_id = message_id + 1
        for dest in targets:
            if drops_as_cycle(reason, dest.name, headers):
                cycle = (dest.vhost, dest.name)
                if cycle not in self._cycles_logged:
                    self._cycles_logged[cycle] = None
                    log.warning(
                        "dead-letter cycle: message dropped on its way back to queue %r "
                        "in vhost %r (reason %s)",
                        dest.name,
                        dest.vhost,
                        reason,
                    )
                continue
            copy = Message(
                message_id, target.exchange, key, raw, new_props, message.body, self.now_ms
            )
            self._enqueue(dest, copy, effects)

    def _enqueue(self, queue: Queue, message: Message, effects: list[Effect]) -> None:
        """A dead-lettered message (no expiration property) for `queue`: taken as a
        publish is (`_accept`), or forwarded to the queue's leader in a cluster."""
        if queue.remote:
            effects.append(Forward(queue.leader, queue.vhost, queue.name, message))
            return
        self._accept(queue, message, None, effects)

    def _route(
        self, vh: Vhost, exchange: Exchange, routing_key: str, headers: FieldTable | None
    ) -> Any:
        found = exchange.table.route(routing_key, headers)
        if not exchange.e2e_count:
            if len(found) <= 1:
                return found
            return list(dict.fromkeys(found))
        # Exchange-to-exchange: walk every exchange reached, each queue once. As RabbitMQ,
        # an exchange reached on the way that routes nowhere hands over to its alternate.
        queues: dict[Queue, None] = {}
        seen: dict[Exchange, None] = {exchange: None}
        pending = deque([found])
        while pending:
            for dest in pending.popleft():
                if isinstance(dest, Queue):
                    queues[dest] = None
                elif dest not in seen:
                    seen[dest] = None
                    routed = dest.table.route(routing_key, headers)
                    if not routed and dest.alternate is not None:
                        alternate = vh.exchanges.get(dest.alternate)
                        routed = () if alternate is None else (alternate,)
                    pending.append(routed)
        return list(queues)

    def _route_alternate(
        self, vh: Vhost, exchange: Exchange, routing_key: str, headers: FieldTable | None
    ) -> Any:
        seen = {exchange.name}
        current = exchange
        for _ in range(MAX_ALTERNATE_HOPS):
            name = current.alternate
            if name is None or name in seen:
                return ()
            seen.add(name)
            alternate = vh.exchanges.get(name)
            if alternate is None:
                return ()
            queues = self._route(vh, alternate, routing_key, headers)
            if queues:
                return queues
            current = alternate
        return ()

    # ---- consumers ---------------------------------------------------------------------

    def qos(
        self, ref: ChannelRef, prefetch_count: int, global_: bool, effects: list[Effect]
    ) -> Reply:
        """RabbitMQ 3.x, quirks included (checked against 3.10):
        - global=False sets the prefetch of consumers created afterwards AND lifts the
          channel-wide limit (a later global=True sets it again);
        - global=True limits the channel's consumer deliveries as a whole; its count starts
          at every unacked message of the channel, basic.get ones included, and acks of
          basic.get messages never lower it.
        Either way, consumers that may now take more get them at once."""
        channel = self._channel(ref)
        if global_:
            channel.global_prefetch = prefetch_count
            channel.consumer_unacked = len(channel.unacked)
        else:
            channel.prefetch = prefetch_count
            channel.global_prefetch = 0
        self._dispatch_channel(channel, effects)
        return OK

    def consume(
        self,
        ref: ChannelRef,
        vhost: str,
        name: str,
        tag: str,
        *,
        no_ack: bool,
        exclusive: bool,
        arguments: FieldTable,
        effects: list[Effect],
        reply_key: str = "",
    ) -> Reply:
        method = Method.BASIC_CONSUME
        existing = self.channels.get(ref)
        if existing is not None and tag in existing.consumers:
            return errors.reused_tag(tag)
        if name == REPLY_QUEUE:
            self._channel(ref)
            refused = self.replies.consume(ref, tag, reply_key, no_ack=no_ack)
            return refused if refused is not None else ConsumeOk(tag)
        queue = self._owned_queue(vhost, name, ref.conn, method, effects)
        if isinstance(queue, AmqpError):
            return queue
        priority, problem = arguments_.consumer_priority(arguments)
        if problem is not None:
            return errors.invalid_consumer_arg(vhost, name, "x-priority", problem)
        if queue.exclusive_consumer or (exclusive and queue.consumers):
            return errors.exclusive_use(vhost, name)
        channel = self._channel(ref)
        consumer = Consumer(
            tag,
            channel,
            queue,
            no_ack=no_ack,
            exclusive=exclusive,
            priority=priority,
            prefetch=channel.prefetch,
        )
        channel.consumers[tag] = consumer
        queue.add_consumer(consumer)
        queue.last_used_ms = self.now_ms
        self._dispatch(queue, effects)
        return ConsumeOk(tag)

    def cancel(self, ref: ChannelRef, tag: str, effects: list[Effect]) -> Reply:
        if self.replies.cancel(ref, tag):
            return OK
        channel = self.channels.get(ref)
        consumer = channel.consumers.pop(tag, None) if channel is not None else None
        if consumer is None:
            return OK
        consumer.active = False
        queue = consumer.queue
        queue.remove_consumer(consumer)
        queue.last_used_ms = self.now_ms
        if queue.auto_delete and not queue.consumers and not queue.deleted:
            self._drop_queue(queue, effects)
        # Single active consumer: like RabbitMQ 3.10, the next subscriber takes over at the
        # queue's next event (a publish, a return, a channel closing), not at the cancel
        # itself, so a closing channel's unacked messages reach it first, in order.
        return OK

    def get(
        self,
        ref: ChannelRef,
        vhost: str,
        name: str,
        no_ack: bool,
        effects: list[Effect] | None = None,
    ) -> Reply:
        if effects is None:
            effects = []
        queue = self._owned_queue(vhost, name, ref.conn, Method.BASIC_GET, effects)
        if isinstance(queue, AmqpError):
            return queue
        queue.last_used_ms = self.now_ms
        if queue.expiring and queue.head_expired(self.now_ms):
            return EMPTY  # expiry work still due (out of budget): nothing live to hand out
        message = queue.pop()
        if message is None:
            return EMPTY
        if queue.expiring:
            self._expire(queue, effects)  # the new head is looked at too, as RabbitMQ does
        channel = self._channel(ref)
        tag = channel.next_tag
        channel.next_tag = tag + 1
        message.delivery_count += 1
        if no_ack:
            self.total_bytes -= len(message.body)
            if message.rid:
                self._forget(queue, message)
        else:
            queue.take(message)
            channel.unacked[tag] = (queue, message, None)
        delivered = self._stamped(message) if queue.counts_deliveries else message
        return GetOk(tag, message.redelivered, queue.message_count, delivered)

    # ---- acknowledgements --------------------------------------------------------------

    def _collect(self, channel: Channel, tag: int, multiple: bool) -> list[Unacked] | None:
        unacked = channel.unacked
        if not multiple:
            entry = unacked.pop(tag, None)
            return None if entry is None else [entry]
        if tag == 0:
            taken = list(unacked.values())
            unacked.clear()
            return taken
        if tag not in unacked:
            return None
        taken = []
        while unacked:
            first = next(iter(unacked))
            if first > tag:
                break
            taken.append(unacked.popitem(last=False)[1])
        return taken

    def ack(self, ref: ChannelRef, tag: int, multiple: bool, effects: list[Effect]) -> Reply:
        channel = self.channels.get(ref) or self._channel(ref)
        if not multiple:
            return self._ack_one(channel, tag, effects)
        entries = self._collect(channel, tag, multiple)
        if entries is None:
            return errors.unknown_tag(tag, Method.BASIC_ACK)
        self._finish(channel, entries, False, effects, dead_letter=False, op="ack")
        return OK

    def ack_many(self, ref: ChannelRef, tags: Sequence[int], effects: list[Effect]) -> Reply:
        """`ack(ref, tag, False, effects)` for each tag in order, stopping at the first
        unknown tag: its error is the reply, the tags after it are not applied."""
        channel = self.channels.get(ref) or self._channel(ref)
        for tag in tags:
            reply = self._ack_one(channel, tag, effects)
            if reply is not OK:
                return reply
        return OK

    def _ack_one(self, channel: Channel, tag: int, effects: list[Effect]) -> Reply:
        """The hot path: one tag, one message settled, then whatever it frees delivered."""
        entry = channel.unacked.pop(tag, None)
        if entry is None:
            return errors.unknown_tag(tag, Method.BASIC_ACK)
        queue, message, consumer = entry
        if queue.remote:  # delivered by another node's queue: settled there
            effects.append(RemoteSettle(queue.leader, channel.ref, message.id, "ack"))
            return OK
        if not queue.deleted:
            size = len(message.body)
            queue.unacked_count -= 1
            queue.unacked_bytes -= size
            self.total_bytes -= size
            if message.rid:
                self._forget(queue, message)
        if consumer is not None:
            consumer.unacked -= 1
            channel.consumer_unacked -= 1
            if channel.global_prefetch and (len(channel.consumers) > 1 or not consumer.active):
                self._dispatch_channel(channel, effects)
            elif consumer.active and (queue.returned or queue.ready):
                self._dispatch(queue, effects)
        return OK

    def nack(
        self,
        ref: ChannelRef,
        tag: int,
        multiple: bool,
        requeue: bool,
        reject: bool,
        effects: list[Effect],
    ) -> Reply:
        method = Method.BASIC_REJECT if reject else Method.BASIC_NACK
        channel = self.channels.get(ref) or self._channel(ref)
        entries = self._collect(channel, tag, multiple)
        if entries is None:
            return errors.unknown_tag(tag, method)
        op = "reject" if reject else "nack"
        self._finish(channel, entries, requeue, effects, dead_letter=True, op=op)
        return OK

    def recover(self, ref: ChannelRef, requeue: bool, effects: list[Effect]) -> Reply:
        if not requeue:
            return errors.not_implemented("requeue=false", Method.BASIC_RECOVER)
        channel = self.channels.get(ref)
        if channel is not None:
            entries = list(channel.unacked.values())
            channel.unacked.clear()
            self._finish(channel, entries, True, effects, dead_letter=False)
        return OK

    def _finish(
        self,
        channel: Channel,
        entries: list[Unacked],
        requeue: bool,
        effects: list[Effect],
        *,
        dead_letter: bool,
        op: str = "nack",
    ) -> None:
        """Settle (requeue=False; dead-lettered when `dead_letter`, i.e. from a reject or
        nack) or give back (requeue=True) unacked entries, then deliver. Entries another
        node delivered are relayed to it as `op` (ack, nack or reject)."""
        touched: dict[Queue, None] = {}
        credit = False
        for queue, message, consumer in entries:
            if queue.remote:
                effects.append(
                    RemoteSettle(queue.leader, channel.ref, message.id, op, requeue=requeue)
                )
                continue
            if consumer is not None:
                consumer.unacked -= 1
                channel.consumer_unacked -= 1
                credit = True
            if queue.deleted:
                continue
            if requeue:
                self._give_back(queue, message, effects)
                touched[queue] = None
            else:
                queue.settle(message)
                self.total_bytes -= len(message.body)
                if message.rid:
                    self._forget(queue, message)
                if dead_letter and queue.dead_letters:
                    self._dead_letter(queue, [message], "rejected", effects)
        if credit:
            for consumer in channel.consumers.values():
                touched[consumer.queue] = None
        for queue in touched:
            if not queue.deleted:
                self._requeued(queue, effects)

    def _give_back(self, queue: Queue, message: Message, effects: list[Effect]) -> None:
        """An unacked message returns to `queue`, unless it has now been returned more
        times (= delivered, each delivery ending in a return) than x-delivery-limit: then
        it dies (delivery_limit)."""
        limit = queue.delivery_limit
        if limit is not None and message.delivery_count > limit:
            queue.settle(message)
            self.total_bytes -= len(message.body)
            if message.rid:
                self._forget(queue, message)
            if queue.dead_letters:
                self._dead_letter(queue, [message], "delivery_limit", effects)
            return
        queue.give_back(message)
        if message.rid and message.rid in queue.live:
            self.settled.setdefault(queue, ([], []))[1].append(message.rid)

    def _stamped(self, message: Message) -> Message:
        """The copy of `message` to deliver from a queue that counts deliveries: its
        headers gain x-delivery-count, the times it was returned before this delivery."""
        headers = dict(message.props.headers or {})
        headers[DELIVERY_COUNT] = message.delivery_count - 1
        props = dataclasses.replace(message.props, headers=headers)
        rewrite = self.rewrite_headers
        raw = message.properties if rewrite is None else rewrite(message.properties, headers)
        return dataclasses.replace(message, properties=raw, props=props)

    def _requeued(self, queue: Queue, effects: list[Effect]) -> None:
        """After messages went back: enforce drop-head limits (RabbitMQ drops before it
        delivers again), then deliver."""
        if queue.expiring:
            self._expire(queue, effects)
        if queue.limited:
            self._drop_over_limit(queue, effects)
        self._dispatch(queue, effects)

    # ---- delivery ----------------------------------------------------------------------

    def _dispatch_channel(self, channel: Channel, effects: list[Effect]) -> None:
        queues = dict.fromkeys(c.queue for c in channel.consumers.values())
        for queue in queues:
            self._dispatch(queue, effects)

    def _dispatch(self, queue: Queue, effects: list[Effect]) -> None:
        """Deliver ready messages while some consumer of `queue` can take one."""
        consumers = queue.consumers
        while queue.returned or queue.ready:
            if queue.expiring:
                if not self._expire(queue, effects) and queue.head_expired(self.now_ms):
                    return  # out of expiry budget: the next tick goes on
                if not (queue.returned or queue.ready):
                    return
            chosen: Consumer | None = None
            if queue.single_active or len(consumers) == 1:
                # x-single-active-consumer (the earliest subscriber gets everything), or
                # simply one consumer: no ring to turn.
                first = next(iter(consumers), None)
                if first is None or not _can_take(first):
                    return
                chosen = first
            else:
                for _, ring in queue.groups:
                    for _ in range(len(ring)):
                        candidate = ring[0]
                        ring.rotate(-1)
                        if _can_take(candidate):
                            chosen = candidate
                            break
                    if chosen is not None:
                        break
                if chosen is None:
                    return
            message = queue.pop()
            assert message is not None
            channel = chosen.channel
            tag = channel.next_tag
            channel.next_tag = tag + 1
            message.delivery_count += 1
            if chosen.no_ack:
                self.total_bytes -= len(message.body)
                if message.rid:
                    self._forget(queue, message)
            else:
                queue.unacked_count += 1
                queue.unacked_bytes += len(message.body)
                channel.unacked[tag] = (queue, message, chosen)
                chosen.unacked += 1
                channel.consumer_unacked += 1
            if queue.counts_deliveries and message.delivery_count > 1:
                # Returned before: stamped (the unacked entry keeps the stored copy). A
                # first delivery to a consumer goes unstamped, as RabbitMQ 3.10's quorum
                # queues do (basic.get stamps 0 there; see `get`).
                message = self._stamped(message)
            effects.append(
                Deliver(channel.ref, chosen.tag, tag, message.redelivered, message, chosen.no_ack)
            )

    # ---- cluster -----------------------------------------------------------------------

    def external_delivery(
        self,
        ref: ChannelRef,
        vhost: str,
        name: str,
        leader_tag: int,
        message: Message,
        no_ack: bool,
    ) -> int:
        """A delivery (or get-ok) that `name`'s leader, another node, made to this node's
        channel `ref`: the channel's own delivery tag for it. Unless `no_ack`, it waits
        in the channel's unacked map like a local one; settling it relays the leader's
        tag (`message.id` holds it) to the leader as a `RemoteSettle`."""
        channel = self._channel(ref)
        tag = channel.next_tag
        channel.next_tag = tag + 1
        if not no_ack:
            queue = self.find_queue(vhost, name)
            if queue is None or not queue.remote:
                queue = self.void
            message.id = leader_tag
            channel.unacked[tag] = (queue, message, None)
        return tag

    def set_leader(self, vhost: str, name: str, leader: str, effects: list[Effect]) -> bool:
        """The queue is led by `leader` from now on (placement, failover, rebalance).
        Deliveries of it still unacked on this node's channels become void (their acks
        relay nothing). A queue that stops being led here cancels its consumers (with
        basic.cancel, so clients re-subscribe) and hands its ready messages to the new
        leader as `Forward` effects; one that starts being led here starts empty."""
        queue = self.find_queue(vhost, name)
        if queue is None or queue.leader == leader:
            return False
        was_local = not queue.remote and queue.leader != ""
        unacked = self._void_unacked(queue)
        queue.leader = leader
        queue.remote = leader != self.node_name
        if not queue.remote:
            queue.last_used_ms = self.now_ms  # x-expires counts from its arrival here
            if not was_local and queue.log and self.active:
                self.activate(queue, effects)
        if queue.remote and was_local:
            for consumer in list(queue.consumers):
                consumer.active = False
                consumer.channel.consumers.pop(consumer.tag, None)
                effects.append(CancelConsumer(consumer.channel.ref, consumer.tag))
                queue.remove_consumer(consumer)
            # Delivered-but-unacked messages go first (they are the oldest), marked
            # redelivered, then the ready ones in order.
            # Logged messages are not forwarded: the new leader has them in its log.
            for message in unacked:
                if message.rid:
                    continue
                message.redelivered = True
                message.expires_ms = None  # the new leader's TTL counts afresh
                effects.append(Forward(leader, vhost, name, message))
            for message in queue.messages():
                if message.rid:
                    continue
                message.expires_ms = None
                effects.append(Forward(leader, vhost, name, message))
            queue.live.clear()
            self.total_bytes -= queue.ready_bytes
            queue.purge()
            queue.unacked_count = queue.unacked_bytes = 0
            self.backlogged.pop(queue, None)
        return True

    def _void_unacked(self, queue: Queue) -> list[Message]:
        """Unacked deliveries of `queue` on this node's channels become void; returns
        those this node held itself (a local queue's), in delivery order."""
        void = self.void
        held_here: list[Message] = []
        for channel in self.channels.values():
            if not channel.unacked:
                continue
            for tag, (held, message, consumer) in list(channel.unacked.items()):
                if held is not queue:
                    continue
                if consumer is not None:
                    consumer.unacked -= 1
                    channel.consumer_unacked -= 1
                if not queue.remote:
                    self.total_bytes -= len(message.body)
                    held_here.append(message)
                channel.unacked[tag] = (void, message, None)
        held_here.sort(key=lambda m: m.id)
        return held_here

    # ---- cluster: durable messages (the replicated log of each durable queue) ----------

    def _forget(self, queue: Queue, message: Message) -> None:
        """A logged message left the queue for good here (ack, reject, expiry, drop,
        purge, no-ack delivery): its log entry goes once that is replicated."""
        if queue.live.pop(message.rid, None) is not None:
            self.settled.setdefault(queue, ([], []))[0].append(message.rid)

    def log_message(self, vhost: str, name: str, stored: Message, effects: list[Effect]) -> bool:
        """A persistent message committed to `name`'s log (`stored.rid` numbers it). Every
        node keeps the stored copy; the queue's leader, once active, also enqueues a live
        copy. False when the queue refused it (reject-publish at its limit: the stored copy
        goes again, through the leader's settle)."""
        queue = self.find_queue(vhost, name)
        if queue is None or not queue.durable:
            return True  # deleted meanwhile: dropped, as a publish racing a delete
        ttl: int | None = None
        if stored.props.expiration is not None:
            ttl, _ = arguments_.parse_expiration(stored.props.expiration)
        if queue.ttl is not None:
            ttl = queue.ttl if ttl is None else min(ttl, queue.ttl)
        if ttl is not None:
            stored.expires_ms = stored.published_ms + ttl
        queue.log[stored.rid] = stored
        if queue.remote or not self.active:
            return True
        live = self._live_copy(queue, stored)
        if self._accept(queue, live, None, effects):
            return True
        self._forget(queue, live)
        return False

    def _live_copy(self, queue: Queue, stored: Message) -> Message:
        s = stored
        live = Message(
            self.next_message_id, s.exchange, s.routing_key, s.properties, s.props, s.body,
            s.published_ms, s.redelivered, s.delivery_count, s.expires_ms, s.rid,
        )  # fmt: skip
        self.next_message_id += 1
        queue.live[stored.rid] = live
        return live

    def settle_log(
        self,
        vhost: str,
        name: str,
        gone: Sequence[int],
        returned: Sequence[int],
        effects: list[Effect],
    ) -> None:
        """The leader's settles of logged messages, replicated: returned ones count a
        delivery (x-delivery-count survives a failover), gone ones leave the log. A gone
        one this node still holds live (settled by the queue's previous leader after the
        queue moved here) leaves the ready messages too."""
        queue = self.find_queue(vhost, name)
        if queue is None:
            return
        log = queue.log
        for rid in returned:
            stored = log.get(rid)
            if stored is not None:  # replaced, never changed: snapshots hold stored copies
                log[rid] = dataclasses.replace(
                    stored, delivery_count=stored.delivery_count + 1, redelivered=True
                )
        for rid in gone:
            if log.pop(rid, None) is None:
                continue
            live = queue.live.pop(rid, None) if queue.live else None
            if live is not None and queue.remove_ready(live):
                self.total_bytes -= len(live.body)

    def activate(self, queue: Queue, effects: list[Effect]) -> None:
        """This node leads `queue` now (failover, a move, a restart): live copies of its
        logged messages join its ready ones, in log order, marked redelivered (the old
        leader may have delivered any of them: the new one cannot know which)."""
        for rid, stored in queue.log.items():
            if rid in queue.live:
                continue
            live = self._live_copy(queue, stored)
            live.redelivered = True
            queue.push(live)
            self.total_bytes += len(live.body)
            if live.expires_ms is not None and not queue.expiring:
                queue.expiring = True
                self.expiring[queue] = None
        if queue.consumers:
            self._dispatch(queue, effects)

    def activate_all(self, effects: list[Effect]) -> None:
        """The node has caught up with the log: it holds live copies of what it leads."""
        self.active = True
        for vh in self.vhosts.values():
            for queue in vh.queues.values():
                if not queue.remote and queue.log:
                    self.activate(queue, effects)

    def check_delete(
        self, vhost: str, name: str, owner: ConnId, *, if_unused: bool, if_empty: bool
    ) -> Reply:
        """queue.delete's checks at the queue's leader, before its deletion is
        replicated: the message count it will answer, or the error."""
        method = Method.QUEUE_DELETE
        vh = self.vhosts.get(vhost)
        if vh is None:
            return errors.no_vhost(vhost, method)
        queue = vh.queues.get(name)
        if queue is None:
            return Count(0)
        if queue.exclusive and queue.owner != owner:
            return errors.locked(vhost, name, method)
        refused = self._delete_refused(queue, if_unused=if_unused, if_empty=if_empty)
        return refused if refused is not None else Count(queue.message_count)

    def queue_counts(self, vhost: str, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None when there is no such queue."""
        queue = self.find_queue(vhost, name)
        return None if queue is None else (queue.message_count, queue.consumer_count)

    # ---- read-only helpers -------------------------------------------------------------

    def iter_queues(self, vhost: str) -> Iterator[Queue]:
        vh = self.vhosts.get(vhost)
        return iter(()) if vh is None else iter(list(vh.queues.values()))

    def iter_exchanges(self, vhost: str) -> Iterator[Exchange]:
        vh = self.vhosts.get(vhost)
        return iter(()) if vh is None else iter(list(vh.exchanges.values()))

    def iter_bindings(self, vhost: str) -> Iterator[Binding]:
        vh = self.vhosts.get(vhost)
        return iter(()) if vh is None else iter(list(vh.bindings.values()))
