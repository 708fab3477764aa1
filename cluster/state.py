"""The replicated state machine: commands in, replies and effects out.

Rules:
- `apply` is deterministic and total: the same commands in the same order give the same
  state, replies and effects on every replica; a client's mistake comes back as an
  `AmqpError` reply (RabbitMQ's code and text), never as an exception. Time comes only from
  the commands' `now_ms` (the model keeps the largest seen, so its clock never goes back);
  `Tick` commands let time pass when nothing else happens (TTL, x-expires). Every command
  renews the model's expiry budget: no command does more than a bounded amount of expiry
  work, and a Tick answers `Ticked(more=True)` when expired messages are still waiting
  (apply another Tick at once).
- Dead-lettering and x-delivery-count re-encode property blocks through the injected
  `HeaderRewriter` (`node.protocol.properties.with_headers` in the node; this module must
  not import the protocol package).
  No I/O, no clock, no randomness.
- One handler per command type, looked up in a table keyed by the command's class.
- After an `AmqpError` reply the state is unchanged. The channel layer then applies
  `CloseChannel` (channel error) or `CloseConnection` (`AmqpError.connection`), as the
  protocol closes them; the model never closes anything on its own.
- `snapshot()` is versioned JSON (never pickle) of topology and messages; connection state
  (channels, consumers, prefetch, delivery tags) is not in it: it dies with connections.
  `StateMachine.restore(snapshot())` gives the same topology and messages, unacked messages
  back in their queues as redelivered (as if every channel had closed).
This module imports only the broker model and the commands: no anyio, no pysyncobj.
"""

from __future__ import annotations

import io
import json
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from cluster import codec, placement
from cluster import commands as c
from node.broker import snapshot as snapshots
from node.broker import views
from node.broker.deadletter import HeaderRewriter
from node.broker.errors import NOT_IMPLEMENTED
from node.broker.exchange_type import ExchangeType
from node.broker.model import DEFAULT_VHOST, EXPIRE_BUDGET, Broker
from node.broker.types import AmqpError, ChannelRef, Effect, Message, Ok, Outcome, Reply, Routed

OK = Ok()
LOGGED = Routed(1)  # a Persist's outcome: enqueued (or stored)
REFUSED = Routed(1, rejected=True)  # ... refused by its queue (reject-publish)

SNAPSHOT_FORMAT = "warren-state"
TOPOLOGY_FORMAT = "warren-topology"
TOPOLOGY_VERSION = 2
# A topology snapshot: magic, u32 length, the JSON document, then the durable queues'
# logs as binary records (cluster.codec.encode_stored), queue by queue.
_TOPOLOGY_MAGIC = b"WTOPO\x02"
_U32 = struct.Struct(">I")
_WRITE_CHUNK = 4096  # records per write
# Command ids remembered for de-duplication (a retried Raft submission applies once):
# more than can be in flight, and part of the replicated state.
DEDUP_WINDOW = 50_000

_Handler = Callable[[Any], Outcome]


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A cluster member as the replicated state knows it; addresses are "host:port"."""

    name: str
    raft: str
    link: str = ""
    amqp: str = ""
    management: str = ""
    alive: bool = True


def topology_document(data: bytes) -> dict[str, Any]:
    """The JSON part of a topology snapshot (everything but the logs' records)."""
    return _topology_document(data)[0]


def _topology_document(data: bytes) -> tuple[dict[str, Any], int]:
    magic = len(_TOPOLOGY_MAGIC)
    if data[:magic] != _TOPOLOGY_MAGIC or len(data) < magic + 4:
        raise snapshots.SnapshotError("not a warren topology snapshot (version 2)")
    (size,) = _U32.unpack_from(data, magic)
    start = magic + 4
    try:
        document = json.loads(data[start : start + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise snapshots.SnapshotError(f"not a topology snapshot: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != TOPOLOGY_FORMAT:
        raise snapshots.SnapshotError("not a warren topology snapshot")
    if document.get("version") != TOPOLOGY_VERSION:
        raise snapshots.SnapshotError(f"unknown topology version {document.get('version')}")
    return document, start + size


class StateMachine:
    """One broker's state. Drive it only through `apply`; read it through the helpers.

    In a cluster (`node_name` set) every node holds one: topology commands and the
    cluster commands (SetLeader, Member, NodeDown, NodeUp, ForgetMember) come from the
    Raft log in the same order on every node (`apply_logged`), and each node's machine
    also takes the commands of the connections it serves, for the queues it leads."""

    __slots__ = ("_applied_ids", "_broker", "_handlers", "members", "node_name")

    def __init__(
        self,
        vhosts: Sequence[str] = (DEFAULT_VHOST,),
        exchange_types: Mapping[str, ExchangeType] | None = None,
        rewrite_headers: HeaderRewriter | None = None,
        node_name: str = "",
    ) -> None:
        self.node_name = node_name
        self.members: dict[str, MemberInfo] = {}
        self._applied_ids: OrderedDict[bytes, None] = OrderedDict()
        self._attach(Broker(vhosts, exchange_types, rewrite_headers))

    def _attach(self, broker: Broker) -> None:
        self._broker = b = broker
        b.node_name = self.node_name
        b.clustered = bool(self.node_name)
        b.durable = b.clustered
        self._handlers: dict[type, _Handler] = {
            c.OpenChannel: lambda cmd: Outcome(b.open_channel(cmd.channel)),
            c.CloseChannel: self._close_channel,
            c.CloseConnection: self._close_connection,
            c.SetWritable: self._set_writable,
            c.Tick: self._tick,
            c.DeclareExchange: self._declare_exchange,
            c.DeleteExchange: lambda cmd: Outcome(
                b.delete_exchange(cmd.vhost, cmd.exchange, if_unused=cmd.if_unused)
            ),
            c.BindExchange: lambda cmd: Outcome(
                b.bind_exchange(
                    cmd.vhost, cmd.destination, cmd.source, cmd.routing_key, cmd.arguments
                )
            ),
            c.UnbindExchange: lambda cmd: Outcome(
                b.unbind_exchange(
                    cmd.vhost, cmd.destination, cmd.source, cmd.routing_key, cmd.arguments
                )
            ),
            c.DeclareQueue: self._declare_queue,
            c.DeleteQueue: self._delete_queue,
            c.PurgeQueue: self._purge_queue,
            c.BindQueue: self._bind_queue,
            c.UnbindQueue: lambda cmd: Outcome(
                b.unbind_queue(
                    cmd.vhost, cmd.queue, cmd.exchange, cmd.routing_key, cmd.owner, cmd.arguments
                )
            ),
            c.Publish: self._publish,
            c.Qos: self._qos,
            c.Consume: self._consume,
            c.Cancel: self._cancel,
            c.Get: self._get,
            c.Ack: self._ack,
            c.AckMany: self._ack_many,
            c.Nack: self._nack,
            c.Recover: self._recover,
            c.SetLeader: self._set_leader,
            c.Member: self._member,
            c.NodeDown: self._node_down,
            c.NodeUp: self._node_up,
            c.ForgetMember: self._forget_member,
            c.DropQueue: self._drop_queue,
            c.Persist: self._persist,
            c.Settle: self._settle,
        }

    # ---- the one entry point -----------------------------------------------------------

    def apply(self, cmd: c.AnyCommand) -> Outcome:
        handler = self._handlers.get(type(cmd))
        if handler is None:
            name = type(cmd).__name__
            error = AmqpError(NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - {name}", connection=True)
            return Outcome(error)
        broker = self._broker
        if cmd.now_ms > broker.now_ms:
            broker.now_ms = cmd.now_ms  # the model's clock never goes back
        broker.expire_budget = EXPIRE_BUDGET  # (Broker.begin, inlined: the hot path)
        outcome = handler(cmd)
        if broker.condemned:  # cluster: deletions this node decided, to replicate
            outcome.effects.extend(broker.condemned)
            broker.condemned.clear()
        return outcome

    def apply_logged(
        self, entries: Sequence[tuple[c.AnyCommand, bytes | None]]
    ) -> list[Outcome | None]:
        """One Raft log entry's commands, in order; None for a command whose id was
        applied before (a retried submission)."""
        seen = self._applied_ids
        outcomes: list[Outcome | None] = []
        broker = self._broker
        broker.replaying = True
        skipping = False  # a command without an id shares the fate of the one before it
        try:
            for command, command_id in entries:
                if command_id is not None:
                    skipping = command_id in seen
                    if not skipping:
                        seen[command_id] = None
                        if len(seen) > DEDUP_WINDOW:
                            seen.popitem(last=False)
                if skipping:
                    outcomes.append(None)
                    continue
                outcomes.append(self.apply(command))
        finally:
            broker.replaying = False
        return outcomes

    # ---- cluster -----------------------------------------------------------------------

    def _set_leader(self, cmd: c.SetLeader) -> Outcome:
        queue = self._broker.find_queue(cmd.vhost, cmd.queue)
        effects: list[Effect] = []
        if queue is not None and queue.leader == cmd.expect:
            leader = cmd.leader
            member = self.members.get(leader)
            if member is None or not member.alive:
                # Placed on a node that died meanwhile: the least loaded live one instead.
                leader = placement.least_loaded(self.alive(), self.leader_counts()) or leader
            self._broker.set_leader(cmd.vhost, cmd.queue, leader, effects)
        return Outcome(OK, effects)

    def _persist(self, cmd: c.Persist) -> Outcome:
        broker = self._broker
        rid = broker.next_rid
        broker.next_rid = rid + 1
        stored = Message(
            0,
            cmd.exchange,
            cmd.routing_key,
            cmd.properties,
            cmd.props,
            cmd.body,
            cmd.now_ms,
            cmd.redelivered,
            cmd.delivery_count,
            None,
            rid,
        )
        effects: list[Effect] = []
        taken = broker.log_message(cmd.vhost, cmd.queue, stored, effects)
        return Outcome(LOGGED if taken else REFUSED, effects)

    def _settle(self, cmd: c.Settle) -> Outcome:
        effects: list[Effect] = []
        self._broker.settle_log(cmd.vhost, cmd.queue, cmd.gone, cmd.returned, effects)
        return Outcome(OK, effects)

    def begin_catch_up(self) -> None:
        """The node starts: until `activate`, it only stores what the log holds."""
        self._broker.active = False

    def activate(self, now_ms: int) -> list[Effect]:
        """Caught up: the queues this node leads get live copies of their logs."""
        broker = self._broker
        broker.begin(now_ms)
        effects: list[Effect] = []
        broker.activate_all(effects)
        return effects

    def take_durable(
        self,
    ) -> tuple[list[tuple[Any, Message]], dict[Any, tuple[list[int], list[int]]]]:
        """What this node must replicate since the last call: messages to log, and the
        rids its queues settled and returned (see Broker.to_log and Broker.settled)."""
        broker = self._broker
        to_log, settled = broker.to_log, broker.settled
        if to_log:
            broker.to_log = []
        if settled:
            broker.settled = {}
        return to_log, settled

    def held_messages(self) -> int:
        """Messages this node holds: ready, unacked, and its copies of durable logs."""
        return sum(
            q.message_count + q.unacked_count + len(q.log)
            for vh in self._broker.vhosts.values()
            for q in vh.queues.values()
        )

    def logged_messages(self) -> int:
        """Messages in this node's copies of the durable queues' logs."""
        return sum(len(q.log) for vh in self._broker.vhosts.values() for q in vh.queues.values())

    def durable_pending(self) -> bool:
        broker = self._broker
        return bool(broker.to_log or broker.settled)

    def _drop_queue(self, cmd: c.DropQueue) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.drop_queue(cmd.vhost, cmd.queue, cmd.touched, effects), effects)

    def touch_queues(self, now_ms: int) -> None:
        """x-expires counts from now for every queue (after a restart or a resync: the
        log's old declaration times are not uses)."""
        broker = self._broker
        broker.begin(now_ms)
        for vh in broker.vhosts.values():
            for queue in vh.queues.values():
                queue.last_used_ms = now_ms

    def _member(self, cmd: c.Member) -> Outcome:
        self.members[cmd.name] = MemberInfo(
            cmd.name, cmd.raft, cmd.link, cmd.amqp, cmd.management, alive=True
        )
        return Outcome(OK)

    def _node_up(self, cmd: c.NodeUp) -> Outcome:
        member = self.members.get(cmd.node)
        if member is not None and not member.alive:
            self.members[cmd.node] = replace(member, alive=True)
        return Outcome(OK)

    def _node_down(self, cmd: c.NodeDown) -> Outcome:
        member = self.members.get(cmd.node)
        effects: list[Effect] = []
        if member is not None and member.alive:
            self.members[cmd.node] = replace(member, alive=False)
            self._evacuate(cmd.node, effects)
        return Outcome(OK, effects)

    def _forget_member(self, cmd: c.ForgetMember) -> Outcome:
        effects: list[Effect] = []
        if self.members.pop(cmd.node, None) is not None:
            self._evacuate(cmd.node, effects)
        return Outcome(OK, effects)

    def _evacuate(self, node: str, effects: list[Effect]) -> None:
        """Every queue `node` led: exclusive ones go with it, the others move to the least
        loaded live node (in declaration order, so every replica moves the same way)."""
        broker = self._broker
        load = self.leader_counts()
        alive = self.alive()
        for vh in list(broker.vhosts.values()):
            for queue in list(vh.queues.values()):
                if queue.leader != node:
                    continue
                if queue.exclusive:
                    broker.delete_queue(
                        vh.name,
                        queue.name,
                        queue.owner or 0,
                        if_unused=False,
                        if_empty=False,
                        effects=effects,
                    )
                    continue
                target = placement.least_loaded(alive, load)
                if target is None:
                    continue  # nobody left: it waits for a node to come back
                load[target] = load.get(target, 0) + 1
                broker.set_leader(vh.name, queue.name, target, effects)

    def alive(self) -> list[str]:
        """Live members, by name."""
        return sorted(name for name, m in self.members.items() if m.alive)

    def leader_counts(self) -> dict[str, int]:
        """Queues led per member (members leading none included)."""
        counts = dict.fromkeys(self.members, 0)
        for vh in self._broker.vhosts.values():
            for queue in vh.queues.values():
                if queue.leader:
                    counts[queue.leader] = counts.get(queue.leader, 0) + 1
        return counts

    def leader_of(self, vhost: str, name: str) -> str | None:
        """The node leading a queue ("" outside a cluster), None when there is none."""
        queue = self._broker.find_queue(vhost, name)
        return None if queue is None else queue.leader

    def queue_leaders(self) -> list[tuple[str, str, str, bool]]:
        """(vhost, queue, leader, exclusive) of every queue, in declaration order."""
        return [
            (vh.name, q.name, q.leader, q.exclusive)
            for vh in self._broker.vhosts.values()
            for q in vh.queues.values()
        ]

    # ---- cluster: the node's own side (not replicated) -----------------------------------

    def enqueue_forwarded(
        self, publish: c.Publish, queues: Sequence[str], redelivered: bool = False
    ) -> tuple[bool, list[Effect]]:
        """A message another node routed to `queues` led here: (accepted, effects)."""
        broker = self._broker
        broker.begin(publish.now_ms)
        effects: list[Effect] = []
        accepted = broker.enqueue_forwarded(
            publish.vhost,
            queues,
            publish.exchange,
            publish.routing_key,
            publish.properties,
            publish.props,
            publish.body,
            publish.now_ms,
            effects,
            redelivered,
        )
        return accepted, effects

    def external_delivery(
        self, ref: ChannelRef, vhost: str, queue: str, leader_tag: int, message: Any, no_ack: bool
    ) -> int:
        """This channel's delivery tag for a delivery another node's queue made to it."""
        return self._broker.external_delivery(ref, vhost, queue, leader_tag, message, no_ack)

    def check_delete(self, cmd: c.DeleteQueue) -> Reply:
        return self._broker.check_delete(
            cmd.vhost, cmd.queue, cmd.owner, if_unused=cmd.if_unused, if_empty=cmd.if_empty
        )

    def queue_counts(self, vhost: str, name: str) -> tuple[int, int] | None:
        return self._broker.queue_counts(vhost, name)

    def has_consumer(self, ref: ChannelRef, tag: str) -> bool:
        channel = self._broker.channels.get(ref)
        return channel is not None and tag in channel.consumers

    def channel_prefetch(self, ref: ChannelRef) -> tuple[int, int]:
        """(per-consumer prefetch for new consumers, channel-wide prefetch)."""
        channel = self._broker.channels.get(ref)
        return (0, 0) if channel is None else (channel.prefetch, channel.global_prefetch)

    # ---- handlers that produce effects -------------------------------------------------

    def _close_channel(self, cmd: c.CloseChannel) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.close_channel(cmd.channel, effects), effects)

    def _close_connection(self, cmd: c.CloseConnection) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.close_connection(cmd.conn, effects), effects)

    def _set_writable(self, cmd: c.SetWritable) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.set_writable(cmd.conn, cmd.writable, effects), effects)

    def _purge_queue(self, cmd: c.PurgeQueue) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.purge_queue(cmd.vhost, cmd.queue, cmd.owner, effects), effects)

    def _bind_queue(self, cmd: c.BindQueue) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.bind_queue(
            cmd.vhost, cmd.queue, cmd.exchange, cmd.routing_key, cmd.owner, cmd.arguments, effects
        )
        return Outcome(reply, effects)

    def _get(self, cmd: c.Get) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.get(cmd.channel, cmd.vhost, cmd.queue, cmd.no_ack, effects)
        return Outcome(reply, effects)

    def _tick(self, cmd: c.Tick) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.tick(effects), effects)

    def _declare_exchange(self, cmd: c.DeclareExchange) -> Outcome:
        reply = self._broker.declare_exchange(
            cmd.vhost,
            cmd.exchange,
            cmd.type,
            passive=cmd.passive,
            durable=cmd.durable,
            auto_delete=cmd.auto_delete,
            internal=cmd.internal,
            arguments=cmd.arguments,
        )
        return Outcome(reply)

    def _declare_queue(self, cmd: c.DeclareQueue) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.declare_queue(
            cmd.vhost,
            cmd.queue,
            cmd.owner,
            passive=cmd.passive,
            durable=cmd.durable,
            exclusive=cmd.exclusive,
            auto_delete=cmd.auto_delete,
            arguments=cmd.arguments,
            server_named=cmd.server_named,
            effects=effects,
        )
        return Outcome(reply, effects)

    def _delete_queue(self, cmd: c.DeleteQueue) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.delete_queue(
            cmd.vhost,
            cmd.queue,
            cmd.owner,
            if_unused=cmd.if_unused,
            if_empty=cmd.if_empty,
            effects=effects,
        )
        return Outcome(reply, effects)

    def _publish(self, cmd: c.Publish) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.publish(
            cmd.vhost,
            cmd.exchange,
            cmd.routing_key,
            cmd.mandatory,
            cmd.properties,
            cmd.props,
            cmd.body,
            cmd.now_ms,
            effects,
        )
        return Outcome(reply, effects)

    def _qos(self, cmd: c.Qos) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.qos(cmd.channel, cmd.prefetch_count, cmd.global_, effects)
        return Outcome(reply, effects)

    def _consume(self, cmd: c.Consume) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.consume(
            cmd.channel,
            cmd.vhost,
            cmd.queue,
            cmd.consumer_tag,
            no_ack=cmd.no_ack,
            exclusive=cmd.exclusive,
            arguments=cmd.arguments,
            effects=effects,
            reply_key=cmd.reply_key,
        )
        return Outcome(reply, effects)

    def _cancel(self, cmd: c.Cancel) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.cancel(cmd.channel, cmd.consumer_tag, effects), effects)

    def _ack(self, cmd: c.Ack) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.ack(cmd.channel, cmd.delivery_tag, cmd.multiple, effects)
        return Outcome(reply, effects)

    def _ack_many(self, cmd: c.AckMany) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.ack_many(cmd.channel, cmd.delivery_tags, effects)
        return Outcome(reply, effects)

    def _nack(self, cmd: c.Nack) -> Outcome:
        effects: list[Effect] = []
        reply = self._broker.nack(
            cmd.channel, cmd.delivery_tag, cmd.multiple, cmd.requeue, cmd.reject, effects
        )
        return Outcome(reply, effects)

    def _recover(self, cmd: c.Recover) -> Outcome:
        effects: list[Effect] = []
        return Outcome(self._broker.recover(cmd.channel, cmd.requeue, effects), effects)

    # ---- read-only helpers -------------------------------------------------------------

    def vhost_exists(self, vhost: str) -> bool:
        return vhost in self._broker.vhosts

    def queue_exists(self, vhost: str, name: str) -> bool:
        return self._broker.find_queue(vhost, name) is not None

    def queues(self, vhost: str) -> Iterator[views.QueueView]:
        return views.queues(self._broker, vhost)

    def exchanges(self, vhost: str) -> Iterator[views.ExchangeView]:
        return views.exchanges(self._broker, vhost)

    def bindings(self, vhost: str) -> Iterator[views.BindingView]:
        return views.bindings(self._broker, vhost)

    def flow_blocked(self) -> bool:
        """Publishers should pause: a consumed queue has a large ready backlog."""
        return self._broker.flow_blocked()

    def reply_address(self, ref: ChannelRef) -> str | None:
        """Direct reply-to: the address replies to this channel's reply consumer use."""
        return self._broker.replies.address(ref)

    @property
    def total_message_bytes(self) -> int:
        """Bytes of message bodies held, ready and unacked (for the memory watermark)."""
        return self._broker.total_bytes

    def channel_unacked(self, ref: ChannelRef) -> int:
        channel = self._broker.channels.get(ref)
        return 0 if channel is None else len(channel.unacked)

    # ---- read-only views for the management API ----------------------------------------

    def consumers(self) -> Iterator[views.ConsumerView]:
        """Every consumer this machine holds (of the queues this node leads)."""
        return views.consumers(self._broker)

    def channel_counts(self, ref: ChannelRef) -> views.ChannelCounts | None:
        return views.channel_counts(self._broker, ref)

    # ---- snapshots ---------------------------------------------------------------------

    def snapshot(self) -> bytes:
        document = {"format": SNAPSHOT_FORMAT, **snapshots.dump(self._broker)}
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def topology_snapshot(self) -> bytes:
        """The replicated part of the state, for Raft snapshots: topology, queue leaders,
        members, the de-duplication window and the durable queues' logs; no live
        messages, no connection state. The same on every replica of the same log."""
        out = io.BytesIO()
        self.snapshot_writer()(out)
        return out.getvalue()

    def snapshot_writer(self) -> Callable[[BinaryIO], None]:
        """`topology_snapshot` in two steps: capture now (fast: the topology as JSON, and
        the list of each log's stored messages, which replicated commands replace but
        never change), then the returned function writes it, possibly on another thread
        while this machine goes on (a million logged messages take seconds to encode)."""
        logs = [
            (vh.name, q.name, list(q.log.values()))
            for vh in self._broker.vhosts.values()
            for q in vh.queues.values()
            if q.log
        ]
        document = {
            "format": TOPOLOGY_FORMAT,
            "version": TOPOLOGY_VERSION,
            "broker": snapshots.dump(self._broker, messages=False),
            "members": [
                [m.name, m.raft, m.link, m.amqp, m.management, m.alive]
                for m in self.members.values()
            ],
            "applied_ids": [i.hex() for i in self._applied_ids],
            "logs": [[vhost, name, len(messages)] for vhost, name, messages in logs],
        }
        head = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")

        def write(out: BinaryIO) -> None:
            out.write(_TOPOLOGY_MAGIC + _U32.pack(len(head)) + head)
            encode = codec.encode_stored
            for _, _, messages in logs:
                for start in range(0, len(messages), _WRITE_CHUNK):
                    chunk = messages[start : start + _WRITE_CHUNK]
                    out.write(b"".join([encode(m) for m in chunk]))

        return write

    @classmethod
    def restore_topology(
        cls,
        data: bytes,
        node_name: str,
        exchange_types: Mapping[str, ExchangeType] | None = None,
        rewrite_headers: HeaderRewriter | None = None,
    ) -> StateMachine:
        """A new machine for `node_name` holding what `topology_snapshot` wrote: the
        logs of durable queues, no live messages, queues led by whom the snapshot says."""
        document, off = _topology_document(data)
        machine = cls.__new__(cls)
        machine.node_name = node_name
        machine.members = {
            m[0]: MemberInfo(m[0], m[1], m[2], m[3], m[4], bool(m[5])) for m in document["members"]
        }
        machine._applied_ids = OrderedDict(
            (bytes.fromhex(i), None) for i in document["applied_ids"]
        )
        broker = snapshots.load(document["broker"], exchange_types)
        broker.rewrite_headers = rewrite_headers
        try:
            for vhost, name, count in document.get("logs", []):
                queue = broker.find_queue(vhost, name)
                if queue is None:
                    raise snapshots.SnapshotError(f"a log for unknown queue {name!r}")
                log = queue.log
                for _ in range(count):
                    stored, off = codec.decode_stored(data, off)
                    log[stored.rid] = stored
        except codec.CodecError as exc:
            raise snapshots.SnapshotError(f"bad log record: {exc}") from exc
        if off != len(data):
            raise snapshots.SnapshotError(f"{len(data) - off} bytes after the logs")
        for vh in broker.vhosts.values():
            for queue in vh.queues.values():
                queue.remote = bool(queue.leader) and queue.leader != node_name
        machine._attach(broker)
        return machine

    @classmethod
    def restore(
        cls,
        data: bytes,
        exchange_types: Mapping[str, ExchangeType] | None = None,
        rewrite_headers: HeaderRewriter | None = None,
    ) -> StateMachine:
        """A new machine holding exactly what `data` holds; raises SnapshotError if `data`
        is not a snapshot this version reads."""
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise snapshots.SnapshotError(f"not a snapshot: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != SNAPSHOT_FORMAT:
            raise snapshots.SnapshotError("not a warren state snapshot")
        machine = cls.__new__(cls)
        machine.node_name = ""
        machine.members = {}
        machine._applied_ids = OrderedDict()
        broker = snapshots.load(document, exchange_types)
        broker.rewrite_headers = rewrite_headers
        machine._attach(broker)
        return machine
