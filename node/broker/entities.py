"""The broker's mutable entities: exchanges, queues, bindings, consumers, channels.

Rules: these are plain slotted records with the few operations that keep their own
invariants (a queue's byte counters, its ready order, its consumer ring). They know nothing
of commands, errors or effects; `node.broker.model.Broker` drives them. Every collection
that is ever iterated to produce output is insertion-ordered (dicts, lists, deques), never
a set, so replicas applying the same commands produce the same effects in the same order.

Queue order: every message id a queue holds is unique and ids grow with publication. A
message handed out always has a smaller id than every message still in `ready`, so
returned (requeued) messages wait in a small heap that is always served before `ready`:
together they give "back at its original position" in O(log n).

Priority queues (x-max-priority): `ready` is then a `PriorityReady`, which quacks like the
deque the model uses (append, popleft, [0], len, iteration in delivery order) and holds one
(returned heap, deque) pair per priority: higher priority first, FIFO inside a priority, a
requeued message back at its original position inside its priority. A message's priority is
its `priority` property (none: 0), capped at the queue's maximum (the property itself is
delivered as sent). Queues without x-max-priority keep the plain deque: no cost for them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from node.broker.args import delivery_limit, int_arg
from node.broker.exchange_type import BindingSpec, ExchangeType, RoutingTable
from node.broker.types import ChannelRef, ConnId, FieldTable, Message

REJECT_OVERFLOW = frozenset({"reject-publish", "reject-publish-dlx"})


def _remove_from(
    returned: list[tuple[int, Message]], fresh: deque[Message], message: Message
) -> bool:
    for i, (_, held) in enumerate(returned):
        if held is message:
            returned[i] = returned[-1]
            returned.pop()
            heapq.heapify(returned)
            return True
    for i, held in enumerate(fresh):
        if held is message:
            del fresh[i]
            return True
    return False


class PriorityReady:
    """The ready messages of a priority queue (see the module rules)."""

    __slots__ = ("_buckets", "_count", "_max")

    def __init__(self, max_priority: int) -> None:
        self._max = max_priority
        # Index = priority; each: (heap of returned (id, message), deque of fresh ones).
        self._buckets: list[tuple[list[tuple[int, Message]], deque[Message]]] = [
            ([], deque()) for _ in range(max_priority + 1)
        ]
        self._count = 0

    def _bucket(self, message: Message) -> tuple[list[tuple[int, Message]], deque[Message]]:
        priority = message.props.priority or 0
        return self._buckets[priority if priority < self._max else self._max]

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def append(self, message: Message) -> None:
        self._bucket(message)[1].append(message)
        self._count += 1

    def give_back(self, message: Message) -> None:
        heapq.heappush(self._bucket(message)[0], (message.id, message))
        self._count += 1

    def popleft(self) -> Message:
        for returned, fresh in reversed(self._buckets):
            if returned:
                self._count -= 1
                return heapq.heappop(returned)[1]
            if fresh:
                self._count -= 1
                return fresh.popleft()
        raise IndexError("pop from an empty priority queue")

    def __getitem__(self, index: int) -> Message:
        if index != 0:
            raise IndexError("only the head of a priority queue can be read")
        for returned, fresh in reversed(self._buckets):
            if returned:
                return returned[0][1]
            if fresh:
                return fresh[0]
        raise IndexError("empty priority queue")

    def __iter__(self) -> Iterator[Message]:
        for returned, fresh in reversed(self._buckets):
            yield from (m for _, m in sorted(returned, key=lambda e: e[0]))
            yield from fresh

    def clear(self) -> None:
        for returned, fresh in self._buckets:
            returned.clear()
            fresh.clear()
        self._count = 0

    def remove(self, message: Message) -> bool:
        """Take `message` out wherever it waits (linear: for rare corrections only)."""
        returned, fresh = self._bucket(message)
        if _remove_from(returned, fresh, message):
            self._count -= 1
            return True
        return False

    def any_expired(self, now_ms: int) -> bool:
        """Whether the head of some priority has expired."""
        for returned, fresh in self._buckets:
            head = returned[0][1] if returned else fresh[0] if fresh else None
            if head is not None and head.expires_ms is not None and head.expires_ms < now_ms:
                return True
        return False

    def pop_expired(self, now_ms: int, inclusive: bool, limit: int) -> list[Message]:
        """The expired messages at the head of each priority (RabbitMQ's priority queue
        expires each priority's sub-queue from its head), at most `limit` of them."""
        gone: list[Message] = []
        for returned, fresh in reversed(self._buckets):
            while len(gone) < limit:
                if returned:
                    head = returned[0][1]
                elif fresh:
                    head = fresh[0]
                else:
                    break
                expires = head.expires_ms
                if expires is None or expires > now_ms or (expires == now_ms and not inclusive):
                    break
                if returned:
                    heapq.heappop(returned)
                else:
                    fresh.popleft()
                self._count -= 1
                gone.append(head)
        return gone


class Exchange:
    __slots__ = (
        "alternate",
        "arguments",
        "auto_delete",
        "bindings_in",
        "bindings_out",
        "deleted",
        "durable",
        "e2e_count",
        "internal",
        "name",
        "table",
        "type_name",
        "xtype",
    )

    def __init__(
        self,
        name: str,
        xtype: ExchangeType,
        *,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
        table: RoutingTable | None = None,
    ) -> None:
        self.name = name
        self.xtype = xtype
        self.type_name = xtype.name
        self.durable = durable
        self.auto_delete = auto_delete
        self.internal = internal
        self.arguments = dict(arguments)
        alternate = arguments.get("alternate-exchange")
        self.alternate: str | None = alternate if isinstance(alternate, str) else None
        self.table: RoutingTable = table if table is not None else xtype.new_table()
        self.bindings_out: dict[Any, Binding] = {}  # this exchange is the source
        self.bindings_in: dict[Any, Binding] = {}  # this exchange is the destination
        self.e2e_count = 0  # bindings_out whose destination is an exchange
        self.deleted = False


class Binding:
    __slots__ = ("arguments", "destination", "key", "routing_key", "source", "spec")

    def __init__(
        self,
        key: Any,
        source: Exchange,
        destination: Queue | Exchange,
        routing_key: str,
        arguments: FieldTable,
    ) -> None:
        self.key = key
        self.source = source
        self.destination = destination
        self.routing_key = routing_key
        self.arguments = dict(arguments)
        self.spec = BindingSpec(routing_key, self.arguments, destination)


class Consumer:
    __slots__ = (
        "active",
        "channel",
        "exclusive",
        "no_ack",
        "prefetch",
        "priority",
        "queue",
        "tag",
        "unacked",
    )

    def __init__(
        self,
        tag: str,
        channel: Channel,
        queue: Queue,
        *,
        no_ack: bool,
        exclusive: bool,
        priority: int,
        prefetch: int,
    ) -> None:
        self.tag = tag
        self.channel = channel
        self.queue = queue
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.priority = priority
        self.prefetch = prefetch  # 0: unlimited
        self.unacked = 0
        self.active = True


# One unacknowledged delivery: (queue, message, consumer or None for basic.get).
Unacked = tuple["Queue", Message, Consumer | None]


class Connection:
    __slots__ = ("channels", "exclusive_queues", "id", "writable")

    def __init__(self, conn_id: ConnId) -> None:
        self.id = conn_id
        self.writable = True
        self.channels: dict[int, Channel] = {}
        self.exclusive_queues: dict[tuple[str, str], Queue] = {}


class Channel:
    __slots__ = (
        "conn",
        "consumer_unacked",
        "consumers",
        "global_prefetch",
        "next_tag",
        "prefetch",
        "ref",
        "unacked",
    )

    def __init__(self, ref: ChannelRef, conn: Connection) -> None:
        self.ref = ref
        self.conn = conn
        self.next_tag = 1
        self.unacked: OrderedDict[int, Unacked] = OrderedDict()
        self.consumers: dict[str, Consumer] = {}
        self.prefetch = 0  # basic.qos(global=False): for consumers created afterwards
        self.global_prefetch = 0  # basic.qos(global=True): shared by the channel's consumers
        # The channel-wide prefetch count (RabbitMQ's limiter volume): reset to the number
        # of unacked messages by basic.qos(global=True), +1 per delivery to an acking
        # consumer, -1 when such a delivery is settled or requeued.
        self.consumer_unacked = 0


class Queue:
    __slots__ = (
        "arguments",
        "auto_delete",
        "bindings_in",
        "condemned",
        "consumers",
        "counts_deliveries",
        "dead_letters",
        "deleted",
        "delivery_limit",
        "durable",
        "exclusive",
        "exclusive_consumer",
        "expires",
        "expiring",
        "groups",
        "had_consumers",
        "last_used_ms",
        "leader",
        "limited",
        "live",
        "log",
        "max_bytes",
        "max_length",
        "name",
        "overflow_dlx",
        "owner",
        "priorities",
        "ready",
        "ready_bytes",
        "reject_publish",
        "remote",
        "returned",
        "single_active",
        "touched",
        "ttl",
        "unacked_bytes",
        "unacked_count",
        "vhost",
    )

    def __init__(
        self,
        vhost: str,
        name: str,
        *,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        owner: ConnId | None,
        arguments: FieldTable,
    ) -> None:
        self.vhost = vhost
        self.name = name
        self.durable = durable
        self.exclusive = exclusive
        self.auto_delete = auto_delete
        self.owner = owner
        self.arguments = dict(arguments)
        max_priority = int_arg(arguments, "x-max-priority")
        self.priorities = max_priority is not None  # a priority queue: `ready` is bucketed
        self.ready: deque[Message] | PriorityReady = (
            deque() if max_priority is None else PriorityReady(max_priority)
        )
        self.returned: list[tuple[int, Message]] = []  # heap on message id
        self.ready_bytes = 0
        self.unacked_count = 0
        self.unacked_bytes = 0
        # Consumers by priority, highest first; round robin inside each ring.
        self.groups: list[tuple[int, deque[Consumer]]] = []
        self.consumers: dict[Consumer, None] = {}  # ordered set, subscription order
        self.exclusive_consumer = False
        self.had_consumers = False
        self.deleted = False
        self.bindings_in: dict[Any, Binding] = {}
        # Length limits (x-max-length, x-max-length-bytes) count ready messages only.
        self.max_length = int_arg(arguments, "x-max-length")
        self.max_bytes = int_arg(arguments, "x-max-length-bytes")
        self.limited = self.max_length is not None or self.max_bytes is not None
        self.reject_publish = arguments.get("x-overflow") in REJECT_OVERFLOW
        self.overflow_dlx = arguments.get("x-overflow") == "reject-publish-dlx"
        # x-dead-letter-exchange: dead messages go there (else they are discarded).
        self.dead_letters = isinstance(arguments.get("x-dead-letter-exchange"), str)
        # x-delivery-limit: returned messages past it die (reason delivery_limit).
        self.delivery_limit = delivery_limit(arguments)
        # Returned messages carry x-delivery-count (as RabbitMQ's quorum queues do).
        self.counts_deliveries = (
            self.delivery_limit is not None or arguments.get("x-queue-type") == "quorum"
        )
        self.single_active = arguments.get("x-single-active-consumer") is True
        self.ttl = int_arg(arguments, "x-message-ttl")  # ms, for every message
        self.expiring = self.ttl is not None  # may hold messages that expire
        self.expires = int_arg(arguments, "x-expires")  # ms unused before deletion
        self.last_used_ms = 0
        # Cluster: the node that leads the queue ("" = this node, outside a cluster) and
        # whether that is another node (then this model holds no messages or consumers of
        # it: publishes are forwarded, consumers attach at the leader).
        self.leader = ""
        self.remote = False
        # Cluster: set by every declaration of the queue (the log's order numbers them),
        # so a deletion decided for one version of it never removes a later one; and
        # whether this node decided the queue must go (its clients no longer see it).
        self.touched = 0
        self.condemned = False
        # Cluster, durable queues: the replicated log of its persistent messages, rid ->
        # the stored copy (the same on every node: changed only by replicated commands),
        # and on its leader the live copy of each stored message still held here.
        self.log: dict[int, Message] = {}
        self.live: dict[int, Message] = {}

    # ---- messages ----------------------------------------------------------------------

    @property
    def message_count(self) -> int:
        """Messages ready for delivery (RabbitMQ's message_count excludes unacked ones)."""
        return len(self.ready) + len(self.returned)

    def push(self, message: Message) -> None:
        self.ready.append(message)
        self.ready_bytes += len(message.body)

    def pop(self) -> Message | None:
        if self.returned:
            message = heapq.heappop(self.returned)[1]
        elif self.ready:
            message = self.ready.popleft()
        else:
            return None
        self.ready_bytes -= len(message.body)
        return message

    def give_back(self, message: Message) -> None:
        """An unacked message returns to its original position, marked redelivered."""
        message.redelivered = True
        self.unacked_count -= 1
        self.unacked_bytes -= len(message.body)
        self.ready_bytes += len(message.body)
        if self.priorities:
            assert isinstance(self.ready, PriorityReady)
            self.ready.give_back(message)
        else:
            heapq.heappush(self.returned, (message.id, message))

    def take(self, message: Message) -> None:
        """A popped message is now awaiting an ack."""
        self.unacked_count += 1
        self.unacked_bytes += len(message.body)

    def settle(self, message: Message) -> None:
        """An unacked message is gone for good (ack, or reject without requeue)."""
        self.unacked_count -= 1
        self.unacked_bytes -= len(message.body)

    def remove_ready(self, message: Message) -> bool:
        """Take the ready `message` out of the queue; False if it is not ready here (it is
        unacked, or gone). Linear in the queue's length: for rare corrections only (a
        replicated settle of a message this node still holds)."""
        if self.priorities:
            assert isinstance(self.ready, PriorityReady)
            found = self.ready.remove(message)
        else:
            assert isinstance(self.ready, deque)
            found = _remove_from(self.returned, self.ready, message)
        if found:
            self.ready_bytes -= len(message.body)
        return found

    def purge(self) -> int:
        count = self.message_count
        self.ready.clear()
        self.returned.clear()
        self.ready_bytes = 0
        return count

    def head(self) -> Message | None:
        if self.returned:
            return self.returned[0][1]
        return self.ready[0] if self.ready else None

    def pop_expired(
        self, now_ms: int, *, inclusive: bool = False, limit: int = 1 << 62
    ) -> list[Message]:
        """Remove the messages at the head whose TTL has run out (RabbitMQ expires from the
        head only: an expired message behind a live one waits its turn), at most `limit`.
        `inclusive` also takes those expiring right now (a TTL of 0 not delivered at once)."""
        if self.priorities:
            assert isinstance(self.ready, PriorityReady)
            gone = self.ready.pop_expired(now_ms, inclusive, limit)
            for message in gone:
                self.ready_bytes -= len(message.body)
            return gone
        gone = []
        while len(gone) < limit:
            head = self.head()
            if head is None or head.expires_ms is None:
                return gone
            if head.expires_ms > now_ms or (head.expires_ms == now_ms and not inclusive):
                return gone
            self.pop()
            gone.append(head)
        return gone

    def head_expired(self, now_ms: int) -> bool:
        """Whether the head has expired (expiry work is still due for this queue)."""
        if self.priorities:
            assert isinstance(self.ready, PriorityReady)
            return self.ready.any_expired(now_ms)
        head = self.head()
        return head is not None and head.expires_ms is not None and head.expires_ms < now_ms

    def refuses(self, size: int) -> bool:
        """x-overflow reject-publish: would one more message of `size` bytes exceed a limit?"""
        if not self.reject_publish:
            return False
        if self.max_length is not None and self.message_count >= self.max_length:
            return True
        return self.max_bytes is not None and self.ready_bytes + size > self.max_bytes

    def drop_over_limit(self) -> list[Message]:
        """x-overflow drop-head: drop the oldest ready messages until within the limits."""
        dropped: list[Message] = []
        if self.reject_publish:
            return dropped
        while self.message_count and (
            (self.max_length is not None and self.message_count > self.max_length)
            or (self.max_bytes is not None and self.ready_bytes > self.max_bytes)
        ):
            message = self.pop()
            assert message is not None
            dropped.append(message)
        return dropped

    def messages(self) -> list[Message]:
        """The ready messages in delivery order."""
        return [m for _, m in sorted(self.returned, key=lambda e: e[0])] + list(self.ready)

    # ---- consumers ---------------------------------------------------------------------

    @property
    def consumer_count(self) -> int:
        return len(self.consumers)

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers[consumer] = None
        self.had_consumers = True
        if consumer.exclusive:
            self.exclusive_consumer = True
        for i, (priority, ring) in enumerate(self.groups):
            if priority == consumer.priority:
                ring.append(consumer)
                return
            if priority < consumer.priority:
                self.groups.insert(i, (consumer.priority, deque([consumer])))
                return
        self.groups.append((consumer.priority, deque([consumer])))

    def remove_consumer(self, consumer: Consumer) -> None:
        if consumer not in self.consumers:
            return
        del self.consumers[consumer]
        if consumer.exclusive:
            self.exclusive_consumer = False
        for i, (_, ring) in enumerate(self.groups):
            if consumer in ring:
                ring.remove(consumer)
                if not ring:
                    del self.groups[i]
                return
