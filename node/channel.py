"""One AMQP channel: turns client methods into state-machine commands and replies.

Rules: one handler per method class, looked up in a table (no if/elif chains on method
names). Handlers never touch sockets: they call `Host.execute(command)` and queue replies
on the sans-I/O connection. A client's mistake is raised as `ChannelError(AmqpError)` and
the connection shell closes the channel or the connection with RabbitMQ's reply code.
This module never awaits.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any, Protocol

from pamqp import commands as spec

from cluster import commands as cmd
from node.broker.reply_to import NO_CONSUMER, REPLY_QUEUE
from node.broker.types import (
    AmqpError,
    ChannelRef,
    ConsumeOk,
    Count,
    GetEmpty,
    GetOk,
    QueueDeclared,
    Reply,
    Routed,
    new_properties,
)
from node.protocol.codec import AckMethod, decode_properties, peek_properties
from node.protocol.connection import ChannelContent, ServerConnection
from node.protocol.properties import reply_to_of, with_reply_to

NOT_IMPLEMENTED = 540
PRECONDITION_FAILED = 406
NOT_FOUND = 404
NO_ROUTE = 312
USER_ID_FLAG = 0x10  # bit 4 of the property flags' low byte: user-id present
REPLY_TO_FLAG = 0x02  # bit 9 of the flags (in their high byte): reply-to present
# Templates that only name a method (class and method ids) for errors on the hot path:
# built once, never sent, never changed.
_PUBLISH = spec.Basic.Publish()
_ACK = spec.Basic.Ack()


class ChannelError(Exception):
    def __init__(self, error: AmqpError) -> None:
        super().__init__(error.reply_text)
        self.error = error


class Host(Protocol):
    """What a channel needs from its connection and node."""

    conn_id: int
    vhost: str
    user: str
    proto: ServerConnection

    execute: Callable[[cmd.AnyCommand], Reply]
    reply_address: Callable[[ChannelRef], str | None]

    def now_ms(self) -> int: ...

    def note_publish(self) -> None: ...


def _ids(method: Any) -> tuple[int, int]:
    index = int(method.index)
    return index >> 16, index & 0xFFFF


def error_for(method: Any, code: int, text: str) -> ChannelError:
    class_id, method_id = _ids(method)
    return ChannelError(AmqpError(code, text, class_id, method_id))


def generate_name(prefix: str) -> str:
    """RabbitMQ-style server-generated names: prefix + 22 url-safe base64 characters."""
    return prefix + base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


class Channel:
    __slots__ = (
        "_confirm_count",
        "_confirm_sent",
        "_handlers",
        "_last_queue",
        "_nacked",
        "_tx_buffer",
        "confirm",
        "host",
        "number",
        "ref",
        "tx",
    )

    def __init__(self, host: Host, number: int) -> None:
        self.host = host
        self.number = number
        self.ref = ChannelRef(host.conn_id, number)
        self.confirm = False
        self.tx = False
        self._confirm_count = 0  # publishes seen since confirm.select
        self._confirm_sent = 0  # highest sequence number acked to the publisher
        self._nacked: set[int] = set()  # sequence numbers to nack at the next flush
        self._tx_buffer: list[cmd.Publish | cmd.Ack | cmd.Nack] = []
        self._last_queue = ""
        self._handlers: dict[type, Callable[[Any], None]] = {
            spec.Exchange.Declare: self._exchange_declare,
            spec.Exchange.Delete: self._exchange_delete,
            spec.Exchange.Bind: self._exchange_bind,
            spec.Exchange.Unbind: self._exchange_unbind,
            spec.Queue.Declare: self._queue_declare,
            spec.Queue.Bind: self._queue_bind,
            spec.Queue.Unbind: self._queue_unbind,
            spec.Queue.Purge: self._queue_purge,
            spec.Queue.Delete: self._queue_delete,
            spec.Basic.Qos: self._basic_qos,
            spec.Basic.Consume: self._basic_consume,
            spec.Basic.Cancel: self._basic_cancel,
            spec.Basic.Get: self._basic_get,
            spec.Basic.Ack: self._basic_ack,
            AckMethod: self._basic_ack,
            spec.Basic.Nack: self._basic_nack,
            spec.Basic.Reject: self._basic_reject,
            spec.Basic.Recover: self._basic_recover,
            spec.Basic.RecoverAsync: self._basic_recover_async,
            spec.Confirm.Select: self._confirm_select,
            spec.Tx.Select: self._tx_select,
            spec.Tx.Commit: self._tx_commit,
            spec.Tx.Rollback: self._tx_rollback,
        }

    # ---- entry points ------------------------------------------------------------------

    def handle_method(self, method: Any) -> None:
        handler = self._handlers.get(type(method))
        if handler is None:
            raise error_for(
                method, NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - method {method.name} not supported"
            )
        handler(method)

    def handle_publish(self, content: ChannelContent) -> None:
        if content.immediate:
            raise ChannelError(
                AmqpError(NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true", 60, 40)
            )
        peeked = content.peeked or peek_properties(content.properties)
        delivery_mode, priority, expiration, headers = peeked
        properties = content.properties
        if len(properties) >= 2:
            if properties[1] & USER_ID_FLAG:
                self._check_user_id(properties)
            if properties[0] & REPLY_TO_FLAG and reply_to_of(properties) == REPLY_QUEUE:
                properties = self._direct_reply_to(properties)
        command = cmd.new_publish(
            self.host.now_ms(),
            self.ref,
            self.host.vhost,
            content.exchange,
            content.routing_key,
            content.mandatory,
            properties,
            new_properties(delivery_mode, priority, expiration, headers),
            content.body,
        )
        self.host.note_publish()
        if self.tx:
            self._tx_buffer.append(command)
            return
        self._publish(command)

    def _direct_reply_to(self, properties: bytes) -> bytes:
        """A request with reply-to amq.rabbitmq.reply-to: point it at this channel's reply
        consumer (406 when the channel has none), as RabbitMQ rewrites it."""
        address = self.host.reply_address(self.ref)
        if address is None:
            raise ChannelError(NO_CONSUMER)
        return with_reply_to(properties, address)

    def _check_user_id(self, properties: bytes) -> None:
        """RabbitMQ's validated user-id: the property must name the authenticated user."""
        user_id = decode_properties(properties).user_id
        if user_id is not None and user_id != self.host.user:
            raise ChannelError(
                AmqpError(
                    PRECONDITION_FAILED,
                    f"PRECONDITION_FAILED - user_id property set to '{user_id}' but "
                    f"authenticated user was '{self.host.user}'",
                    60,
                    40,
                )
            )

    def flush_confirms(self) -> None:
        """Send basic.ack for every confirmed publish: one multiple=true ack when several
        contiguous sequence numbers are due, as RabbitMQ does."""
        due = self._confirm_count - self._confirm_sent
        if due <= 0:
            return
        proto = self.host.proto
        if not self._nacked:
            proto.send_ack(self.number, self._confirm_count, due > 1)
        else:
            # Rare: some publishes were refused. Confirm one by one, in order.
            for seq in range(self._confirm_sent + 1, self._confirm_count + 1):
                if seq in self._nacked:
                    proto.send_method(self.number, spec.Basic.Nack(seq, False, False))
                else:
                    proto.send_ack(self.number, seq, False)
            self._nacked.clear()
        self._confirm_sent = self._confirm_count

    # ---- helpers -----------------------------------------------------------------------

    def _run(self, command: cmd.AnyCommand, method: Any) -> Reply:
        return self._checked(self.host.execute(command), method)

    def _checked(self, reply: Reply, method: Any) -> Reply:
        """`reply`, unless it is an error: then `ChannelError` naming `method`'s ids."""
        if isinstance(reply, AmqpError):
            if reply.class_id == 0 and method is not None:
                class_id, method_id = _ids(method)
                reply = AmqpError(
                    reply.reply_code, reply.reply_text, class_id, method_id, reply.connection
                )
            raise ChannelError(reply)
        return reply

    def _send(self, method: Any) -> None:
        self.host.proto.send_method(self.number, method)

    def _queue_name(self, name: str, method: Any) -> str:
        """An empty queue name means the channel's last declared queue (AMQP 0-9-1)."""
        if name:
            return name
        if not self._last_queue:
            raise error_for(method, NOT_FOUND, "NOT_FOUND - no previously declared queue")
        return self._last_queue

    def _publish(self, command: cmd.Publish) -> None:
        reply = self.host.execute(command)
        if type(reply) is not Routed:
            reply = self._checked(reply, _PUBLISH)
        if isinstance(reply, Routed) and reply.returned:
            self.host.proto.send_content(
                self.number,
                spec.Basic.Return(NO_ROUTE, "NO_ROUTE", command.exchange, command.routing_key),
                command.properties,
                command.body,
            )
        if self.confirm:
            self._confirm_count += 1
            if isinstance(reply, Routed) and reply.rejected:
                self._nacked.add(self._confirm_count)

    # ---- exchange ----------------------------------------------------------------------

    def _exchange_declare(self, m: spec.Exchange.Declare) -> None:
        self._run(
            cmd.DeclareExchange(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                exchange=m.exchange,
                type=m.exchange_type,
                passive=m.passive,
                durable=m.durable,
                auto_delete=m.auto_delete,
                internal=m.internal,
                arguments=m.arguments or {},
            ),
            m,
        )
        if not m.nowait:
            self._send(spec.Exchange.DeclareOk())

    def _exchange_delete(self, m: spec.Exchange.Delete) -> None:
        self._run(
            cmd.DeleteExchange(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                exchange=m.exchange,
                if_unused=m.if_unused,
            ),
            m,
        )
        if not m.nowait:
            self._send(spec.Exchange.DeleteOk())

    def _exchange_bind(self, m: spec.Exchange.Bind) -> None:
        self._exchange_binding(m, cmd.BindExchange, spec.Exchange.BindOk())

    def _exchange_unbind(self, m: spec.Exchange.Unbind) -> None:
        self._exchange_binding(m, cmd.UnbindExchange, spec.Exchange.UnbindOk())

    def _exchange_binding(
        self,
        m: spec.Exchange.Bind | spec.Exchange.Unbind,
        command: type[cmd.BindExchange | cmd.UnbindExchange],
        ok: Any,
    ) -> None:
        self._run(
            command(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                destination=m.destination,
                source=m.source,
                routing_key=m.routing_key,
                arguments=m.arguments or {},
            ),
            m,
        )
        if not m.nowait:
            self._send(ok)

    # ---- queue -------------------------------------------------------------------------

    def _queue_declare(self, m: spec.Queue.Declare) -> None:
        name = m.queue
        if not name:
            name = self._queue_name("", m) if m.passive else generate_name("amq.gen-")
        reply = self._run(
            cmd.DeclareQueue(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                queue=name,
                owner=self.host.conn_id,
                passive=m.passive,
                durable=m.durable,
                exclusive=m.exclusive,
                auto_delete=m.auto_delete,
                arguments=m.arguments or {},
                server_named=not m.queue and not m.passive,
            ),
            m,
        )
        assert isinstance(reply, QueueDeclared)
        self._last_queue = reply.queue
        if not m.nowait:
            self._send(spec.Queue.DeclareOk(reply.queue, reply.message_count, reply.consumer_count))

    def _queue_bind(self, m: spec.Queue.Bind) -> None:
        # Empty queue and key: both mean the channel's last declared queue.
        key = m.routing_key or ("" if m.queue else self._last_queue)
        self._queue_binding(m, cmd.BindQueue, key)
        if not m.nowait:
            self._send(spec.Queue.BindOk())

    def _queue_unbind(self, m: spec.Queue.Unbind) -> None:
        self._queue_binding(m, cmd.UnbindQueue, m.routing_key or "")
        self._send(spec.Queue.UnbindOk())  # queue.unbind has no nowait

    def _queue_binding(
        self,
        m: spec.Queue.Bind | spec.Queue.Unbind,
        command: type[cmd.BindQueue | cmd.UnbindQueue],
        routing_key: str,
    ) -> None:
        self._run(
            command(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                queue=self._queue_name(m.queue, m),
                exchange=m.exchange,
                routing_key=routing_key,
                owner=self.host.conn_id,
                arguments=m.arguments or {},
            ),
            m,
        )

    def _queue_purge(self, m: spec.Queue.Purge) -> None:
        reply = self._run(
            cmd.PurgeQueue(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                queue=self._queue_name(m.queue, m),
                owner=self.host.conn_id,
            ),
            m,
        )
        assert isinstance(reply, Count)
        if not m.nowait:
            self._send(spec.Queue.PurgeOk(reply.message_count))

    def _queue_delete(self, m: spec.Queue.Delete) -> None:
        reply = self._run(
            cmd.DeleteQueue(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                queue=self._queue_name(m.queue, m),
                owner=self.host.conn_id,
                if_unused=m.if_unused,
                if_empty=m.if_empty,
            ),
            m,
        )
        assert isinstance(reply, Count)
        if not m.nowait:
            self._send(spec.Queue.DeleteOk(reply.message_count))

    # ---- basic -------------------------------------------------------------------------

    def _basic_qos(self, m: spec.Basic.Qos) -> None:
        if m.prefetch_size != 0:
            raise error_for(
                m, NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - prefetch_size!=0 ({m.prefetch_size})"
            )
        self._run(
            cmd.Qos(
                now_ms=self.host.now_ms(),
                channel=self.ref,
                prefetch_count=m.prefetch_count,
                global_=m.global_,
            ),
            m,
        )
        self._send(spec.Basic.QosOk())

    def _basic_consume(self, m: spec.Basic.Consume) -> None:
        tag = m.consumer_tag or generate_name("amq.ctag-")
        queue = self._queue_name(m.queue, m)
        # The command's deliveries are dispatched after this handler returns, so consume-ok
        # reaches the client before the first basic.deliver.
        reply = self._run(
            cmd.Consume(
                now_ms=self.host.now_ms(),
                channel=self.ref,
                vhost=self.host.vhost,
                queue=queue,
                consumer_tag=tag,
                no_ack=m.no_ack,
                exclusive=m.exclusive,
                arguments=m.arguments or {},
                reply_key=generate_name("") if queue == REPLY_QUEUE else "",
            ),
            m,
        )
        assert isinstance(reply, ConsumeOk)
        if not m.nowait:
            self._send(spec.Basic.ConsumeOk(tag))

    def _basic_cancel(self, m: spec.Basic.Cancel) -> None:
        self._run(
            cmd.Cancel(
                now_ms=self.host.now_ms(), channel=self.ref, consumer_tag=m.consumer_tag or ""
            ),
            m,
        )
        if not m.nowait:
            self._send(spec.Basic.CancelOk(m.consumer_tag))

    def _basic_get(self, m: spec.Basic.Get) -> None:
        reply = self._run(
            cmd.Get(
                now_ms=self.host.now_ms(),
                channel=self.ref,
                vhost=self.host.vhost,
                queue=self._queue_name(m.queue, m),
                no_ack=m.no_ack,
            ),
            m,
        )
        if isinstance(reply, GetOk):
            msg = reply.message
            self.host.proto.send_content(
                self.number,
                spec.Basic.GetOk(
                    reply.delivery_tag,
                    reply.redelivered,
                    msg.exchange,
                    msg.routing_key,
                    reply.message_count,
                ),
                msg.properties,
                msg.body,
            )
        else:
            assert isinstance(reply, GetEmpty)
            self._send(spec.Basic.GetEmpty())

    def _settle(self, command: cmd.Ack | cmd.Nack, method: Any) -> None:
        if self.tx:
            self._tx_buffer.append(command)
            return
        self._run(command, method)

    def _basic_ack(self, m: spec.Basic.Ack | AckMethod) -> None:
        self.ack(m.delivery_tag, m.multiple)

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        """basic.ack (the hot path: the shell calls it straight for `AckMethod` events)."""
        command = cmd.new_ack(self.host.now_ms(), self.ref, delivery_tag, multiple)
        if self.tx:
            self._tx_buffer.append(command)
            return
        reply = self.host.execute(command)
        if isinstance(reply, AmqpError):
            self._checked(reply, _ACK)

    def ack_many(self, delivery_tags: tuple[int, ...]) -> None:
        """Consecutive single-tag basic.acks, as `ack(tag, False)` for each in order: one
        command outside a transaction; the first unknown tag raises its ChannelError."""
        if self.tx:
            for tag in delivery_tags:
                self.ack(tag, False)
            return
        command = cmd.AckMany(
            now_ms=self.host.now_ms(), channel=self.ref, delivery_tags=delivery_tags
        )
        reply = self.host.execute(command)
        if isinstance(reply, AmqpError):
            self._checked(reply, _ACK)

    def _basic_nack(self, m: spec.Basic.Nack) -> None:
        self._settle(
            cmd.Nack(
                now_ms=self.host.now_ms(),
                channel=self.ref,
                delivery_tag=m.delivery_tag,
                multiple=m.multiple,
                requeue=m.requeue,
            ),
            m,
        )

    def _basic_reject(self, m: spec.Basic.Reject) -> None:
        self._settle(
            cmd.Nack(
                now_ms=self.host.now_ms(),
                channel=self.ref,
                delivery_tag=m.delivery_tag or 0,
                multiple=False,
                requeue=m.requeue,
                reject=True,
            ),
            m,
        )

    def _basic_recover(self, m: spec.Basic.Recover) -> None:
        if not m.requeue:
            raise error_for(m, NOT_IMPLEMENTED, "NOT_IMPLEMENTED - requeue=false")
        self._run(cmd.Recover(now_ms=self.host.now_ms(), channel=self.ref, requeue=True), m)
        self._send(spec.Basic.RecoverOk())

    def _basic_recover_async(self, m: spec.Basic.RecoverAsync) -> None:
        if not m.requeue:
            raise error_for(m, NOT_IMPLEMENTED, "NOT_IMPLEMENTED - requeue=false")
        self._run(cmd.Recover(now_ms=self.host.now_ms(), channel=self.ref, requeue=True), m)

    # ---- confirm and tx ----------------------------------------------------------------

    def _confirm_select(self, m: spec.Confirm.Select) -> None:
        if self.tx:
            raise error_for(
                m,
                PRECONDITION_FAILED,
                "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
            )
        self.confirm = True
        if not m.nowait:
            self._send(spec.Confirm.SelectOk())

    def _tx_select(self, m: spec.Tx.Select) -> None:
        if self.confirm:
            raise error_for(
                m,
                PRECONDITION_FAILED,
                "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
            )
        self.tx = True
        self._send(spec.Tx.SelectOk())

    def _tx_commit(self, m: spec.Tx.Commit) -> None:
        if not self.tx:
            raise error_for(
                m, PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not transactional"
            )
        pending, self._tx_buffer = self._tx_buffer, []
        for command in pending:
            if isinstance(command, cmd.Publish):
                self._publish(command)
            else:
                self._run(command, m)
        self._send(spec.Tx.CommitOk())

    def _tx_rollback(self, m: spec.Tx.Rollback) -> None:
        if not self.tx:
            raise error_for(
                m, PRECONDITION_FAILED, "PRECONDITION_FAILED - channel is not transactional"
            )
        self._tx_buffer.clear()
        self._send(spec.Tx.RollbackOk())
