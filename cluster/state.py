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

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from cluster import commands as c
from node.broker import snapshot as snapshots
from node.broker import views
from node.broker.deadletter import HeaderRewriter
from node.broker.errors import NOT_IMPLEMENTED
from node.broker.exchange_type import ExchangeType
from node.broker.model import DEFAULT_VHOST, EXPIRE_BUDGET, Broker
from node.broker.types import AmqpError, ChannelRef, Effect, Outcome

SNAPSHOT_FORMAT = "warren-state"

_Handler = Callable[[Any], Outcome]


class StateMachine:
    """One broker's state. Drive it only through `apply`; read it through the helpers."""

    __slots__ = ("_broker", "_handlers")

    def __init__(
        self,
        vhosts: Sequence[str] = (DEFAULT_VHOST,),
        exchange_types: Mapping[str, ExchangeType] | None = None,
        rewrite_headers: HeaderRewriter | None = None,
    ) -> None:
        self._attach(Broker(vhosts, exchange_types, rewrite_headers))

    def _attach(self, broker: Broker) -> None:
        self._broker = b = broker
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
        return handler(cmd)

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
        vh = self._broker.vhosts.get(vhost)
        return vh is not None and name in vh.queues

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

    # ---- snapshots ---------------------------------------------------------------------

    def snapshot(self) -> bytes:
        document = {"format": SNAPSHOT_FORMAT, **snapshots.dump(self._broker)}
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")

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
        broker = snapshots.load(document, exchange_types)
        broker.rewrite_headers = rewrite_headers
        machine._attach(broker)
        return machine
