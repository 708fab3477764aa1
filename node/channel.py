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
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from pamqp import commands as spec

from cluster import commands as cmd
from cluster import placement, wire
from cluster.state import StateMachine
from node.broker import errors
from node.broker.reply_to import NO_CONSUMER, REPLY_PREFIX, REPLY_QUEUE, node_suffix, reply_node
from node.broker.types import (
    AmqpError,
    ChannelRef,
    ConsumeOk,
    Count,
    GetEmpty,
    GetOk,
    Ok,
    Outcome,
    QueueDeclared,
    Reply,
    Routed,
    new_properties,
)
from node.protocol.codec import AckMethod, decode_properties, peek_properties
from node.protocol.connection import ChannelContent, ServerConnection
from node.protocol.properties import reply_to_of, with_reply_to

if TYPE_CHECKING:
    from cluster.node import ClusterNode
    from node.stats import NodeStats

OK_REPLY = Ok()
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
    cluster: ClusterNode | None
    stats: NodeStats

    execute: Callable[[cmd.AnyCommand], Reply]
    reply_address: Callable[[ChannelRef], str | None]

    @property
    def state(self) -> StateMachine: ...

    def now_ms(self) -> int: ...

    def note_publish(self) -> None: ...

    def confirms_due(self, channel: Channel) -> None: ...

    def run_async(
        self, channel: Channel, op: Callable[[], Awaitable[Any]], done: Callable[[Any], None]
    ) -> None: ...


class RemoteConsumer:
    """A consumer of this channel attached at the queue's leader, another node."""

    __slots__ = ("early", "no_ack", "node", "pending", "queue", "vhost")

    def __init__(self, node: str, vhost: str, queue: str, no_ack: bool) -> None:
        self.node = node
        self.vhost = vhost
        self.queue = queue
        self.no_ack = no_ack
        self.pending = True  # until consume-ok went to the client
        self.early: list[wire.Delivery] = []  # deliveries that beat the consume-ok


# The pseudo-node a confirm waits at while its message is logged (never a node's name).
LOG = "\x00log"


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
        "_pending",
        "_pending_at",
        "_timed_at",
        "_timed_seq",
        "_tx_buffer",
        "backlog",
        "busy",
        "closed",
        "confirm",
        "host",
        "number",
        "proxies",
        "ref",
        "remote_consumers",
        "stats",
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
        self.stats = host.stats
        # The one publish whose confirm is being timed (NodeStats.confirm_latency): its
        # sequence number (0: none) and when it came.
        self._timed_seq = 0
        self._timed_at = 0.0
        self._last_queue = ""
        # Cluster: a method waiting for a round trip makes the channel busy; the methods
        # after it wait in `backlog` (AMQP answers a channel's methods in order).
        self.busy = False
        self.closed = False
        self.backlog: deque[Any] = deque()
        self.proxies: set[str] = set()  # nodes holding a proxy of this channel
        self.remote_consumers: dict[str, RemoteConsumer] = {}
        # Confirms waiting for queue leaders: sequence number -> leaders still to answer.
        self._pending: dict[int, int] = {}
        self._pending_at: dict[str, set[int]] = {}
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
        stats = self.stats
        stats.received += 1
        if self.confirm:
            stats.received_confirm += 1
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
        upto = self._confirm_count
        if self._pending:  # queue leaders still to answer: confirm up to the first
            # (sequence numbers enter in increasing order, so the first key is the least)
            upto = next(iter(self._pending)) - 1
        due = upto - self._confirm_sent
        if due <= 0:
            return
        proto = self.host.proto
        stats = self.stats
        if not self._nacked:
            proto.send_ack(self.number, upto, due > 1)
            stats.confirmed += due
        else:
            # Rare: some publishes were refused. Confirm one by one, in order.
            for seq in range(self._confirm_sent + 1, upto + 1):
                if seq in self._nacked:
                    self._nacked.discard(seq)
                    proto.send_method(self.number, spec.Basic.Nack(seq, False, False))
                    stats.nacked += 1
                else:
                    proto.send_ack(self.number, seq, False)
                    stats.confirmed += 1
        self._confirm_sent = upto
        if self._timed_seq and upto >= self._timed_seq:
            stats.confirm_latency.observe(perf_counter() - self._timed_at)
            self._timed_seq = 0

    @property
    def unconfirmed(self) -> int:
        """Publishes not confirmed yet (the management API's messages_unconfirmed)."""
        return self._confirm_count - self._confirm_sent

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
        if (
            self.host.cluster is not None
            and not command.exchange
            and command.routing_key.startswith(REPLY_PREFIX)
        ):
            node = reply_node(command.routing_key)
            if node is not None and node != self.host.cluster.name:
                self._forward_reply(command, node)
                return
        reply = self.host.execute(command)
        if type(reply) is not Routed:
            reply = self._checked(reply, _PUBLISH)
        stats = self.stats
        if isinstance(reply, Routed):
            if reply.returned:
                stats.unroutable_returned += 1
                self.host.proto.send_content(
                    self.number,
                    spec.Basic.Return(NO_ROUTE, "NO_ROUTE", command.exchange, command.routing_key),
                    command.properties,
                    command.body,
                )
            elif reply.queues:
                stats.routed += 1
            else:
                stats.unroutable_dropped += 1
        else:
            stats.routed += 1  # (a direct reply-to reply: delivered to its channel)
        seq = 0
        if self.confirm:
            self._confirm_count = seq = self._confirm_count + 1
            if isinstance(reply, Routed) and reply.rejected:
                self._nacked.add(seq)
            if not self._timed_seq:
                self._timed_seq = seq
                self._timed_at = perf_counter()
        if isinstance(reply, Routed):
            if reply.durable and seq:
                self._await_log(seq)
            if reply.remote:
                self._forward(command, reply.remote, seq)

    # ---- cluster: forwarding and remote consumers --------------------------------------

    def _forward_reply(self, command: cmd.Publish, node: str) -> None:
        """A direct reply-to reply for a channel on another node: straight there (as
        RabbitMQ, a reply is never returned as unroutable: mandatory is not honoured)."""
        cluster = self.host.cluster
        assert cluster is not None
        seq = 0
        if self.confirm:
            self._confirm_count = seq = self._confirm_count + 1
        self.stats.routed += 1
        if cluster.forward(node, (command.routing_key,), command, 0):
            return
        if seq:
            self._nacked.add(seq)

    def _forward(self, command: cmd.Publish, queues: tuple[Any, ...], seq: int) -> None:
        """Hand the message to the leaders of its target queues led elsewhere, once per
        leader; with confirms, the publisher's ack waits for every leader's answer."""
        cluster = self.host.cluster
        assert cluster is not None
        by_leader: dict[str, list[str]]
        if len(queues) == 1:  # the common case
            by_leader = {queues[0].leader: [queues[0].name]}
        else:
            by_leader = {}
            for queue in queues:
                by_leader.setdefault(queue.leader, []).append(queue.name)
        for leader, names in by_leader.items():
            if not cluster.forward(leader, tuple(names), command, seq):
                if seq:
                    self._nacked.add(seq)  # its leader is unreachable: not taken
                continue
            if seq:
                self._pending[seq] = self._pending.get(seq, 0) + 1
                self._pending_at.setdefault(leader, set()).add(seq)

    def _await_log(self, seq: int) -> None:
        """The publish went into durable queues' logs here: its confirm waits for the
        entry's commit (cluster/durable.py)."""
        cluster = self.host.cluster
        assert cluster is not None
        ref = self.ref
        shell = cluster.shell

        def logged(ok: bool) -> None:
            shell.remote_confirm(LOG, ref, seq, ok)  # (this channel, if still open)

        if cluster.durable.ticket(self.host.state, logged):
            self._pending[seq] = self._pending.get(seq, 0) + 1
            self._pending_at.setdefault(LOG, set()).add(seq)

    def remote_confirmed(self, node: str, seq: int, ok: bool) -> None:
        waiting = self._pending_at.get(node)
        if waiting is None or seq not in waiting:
            return
        waiting.discard(seq)
        self._settle_pending(seq, ok)
        # Sent when the connection flushes: the confirms of one Raft entry (or one link
        # read) go out as one multiple=true basic.ack, not one per publish.
        self.host.confirms_due(self)

    def _settle_pending(self, seq: int, ok: bool) -> None:
        if not ok:
            self._nacked.add(seq)
        left = self._pending.get(seq, 0) - 1
        if left > 0:
            self._pending[seq] = left
        else:
            self._pending.pop(seq, None)

    def remote_delivery(self, d: wire.Delivery) -> bool:
        """A delivery of a remote consumer of this channel; False if it has none by that
        tag (cancelled meanwhile: the leader takes the message back)."""
        rc = self.remote_consumers.get(d.consumer_tag)
        if rc is None:
            return False
        if rc.pending:
            rc.early.append(d)
            return True
        self._deliver_remote(rc, d)
        return True

    def _deliver_remote(self, rc: RemoteConsumer, d: wire.Delivery) -> None:
        tag = self.host.state.external_delivery(
            self.ref, rc.vhost, rc.queue, d.delivery_tag, wire.delivered_message(d), rc.no_ack
        )
        self.stats.deliver(rc.no_ack, d.redelivered)
        self.host.proto.send_deliver(
            self.number,
            d.consumer_tag,
            tag,
            d.redelivered,
            d.exchange,
            d.routing_key,
            d.properties,
            d.body,
        )

    def drop_remote_consumer(self, tag: str, *, notify: bool) -> bool:
        """Forget a remote consumer; `notify` sends the client basic.cancel (RabbitMQ's
        consumer_cancel_notify: clients re-subscribe on it)."""
        if self.remote_consumers.pop(tag, None) is None:
            return False
        if notify and not self.closed:
            self._send(spec.Basic.Cancel(tag, True))
        return True

    def peer_lost(self, node: str) -> bool:
        """`node` is unreachable: cancel the consumers attached there, nack the confirms
        it still owed. True when something was sent to the client."""
        touched = False
        for tag, rc in list(self.remote_consumers.items()):
            if rc.node == node:
                touched = self.drop_remote_consumer(tag, notify=True) or touched
        for seq in self._pending_at.pop(node, set()):
            self._settle_pending(seq, False)
            touched = True
        self.proxies.discard(node)
        if touched and self.confirm:
            self.flush_confirms()
        return touched

    def check_remote_consumers(self) -> bool:
        """After queues moved: cancel remote consumers whose queue is led elsewhere now."""
        state = self.host.state
        touched = False
        for tag, rc in list(self.remote_consumers.items()):
            if state.leader_of(rc.vhost, rc.queue) != rc.node:
                touched = self.drop_remote_consumer(tag, notify=True) or touched
        return touched

    def _check_here(self, queue: str, method: Any) -> None:
        """Before asking a remote leader: the queue's existence and exclusive ownership,
        against this node's copy of the topology (a passive declare)."""
        self._run(
            cmd.DeclareQueue(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                queue=queue,
                owner=self.host.conn_id,
                passive=True,
            ),
            method,
        )

    def _remote_leader(self, queue: str) -> str | None:
        """The queue's leader when it is another node (None: local, or no cluster)."""
        cluster = self.host.cluster
        if cluster is None:
            return None
        leader = self.host.state.leader_of(self.host.vhost, queue)
        return leader if leader and leader != cluster.name else None

    def _round_trip(
        self, method: Any, op: Callable[[], Awaitable[Any]], done: Callable[[Any], None]
    ) -> None:
        """Run `op` (it needs the cluster) and answer with `done(result)`; failures close
        the channel with the error they carry."""

        def finish(result: Any) -> None:
            from cluster.node import ClusterUnavailable

            if isinstance(result, ClusterUnavailable):
                result = result.error
            elif isinstance(result, BaseException):
                text = f"INTERNAL_ERROR - cluster request failed: {type(result).__name__}"
                if isinstance(result, ConnectionError | TimeoutError):
                    text = "NOT_FOUND - the queue's leader node is down or inaccessible"
                    result = AmqpError(NOT_FOUND, text)
                else:
                    result = AmqpError(541, text, connection=True)
            if isinstance(result, Outcome):
                result = result.reply
            done(self._checked(result, method))

        self.host.run_async(self, op, finish)

    def _change(self, command: cmd.AnyCommand, method: Any, ok: Callable[[Reply], None]) -> None:
        """A topology change: applied here, or replicated through the cluster (then `ok`
        runs once every reachable node has applied it)."""
        cluster = self.host.cluster
        if cluster is None:
            ok(self._run(command, method))
            return

        async def op() -> Reply:
            outcome = (await cluster.replicate([command]))[0]
            return OK_REPLY if outcome is None else outcome.reply

        self._round_trip(method, op, ok)

    # ---- exchange ----------------------------------------------------------------------

    def _exchange_declare(self, m: spec.Exchange.Declare) -> None:
        command = cmd.DeclareExchange(
            now_ms=self.host.now_ms(),
            vhost=self.host.vhost,
            exchange=m.exchange,
            type=m.exchange_type,
            passive=m.passive,
            durable=m.durable,
            auto_delete=m.auto_delete,
            internal=m.internal,
            arguments=m.arguments or {},
        )

        def ok(_: Reply) -> None:
            if not m.nowait:
                self._send(spec.Exchange.DeclareOk())

        if m.passive:  # a read: this node's copy of the topology answers
            ok(self._run(command, m))
        else:
            self._change(command, m, ok)

    def _exchange_delete(self, m: spec.Exchange.Delete) -> None:
        command = cmd.DeleteExchange(
            now_ms=self.host.now_ms(),
            vhost=self.host.vhost,
            exchange=m.exchange,
            if_unused=m.if_unused,
        )

        def ok(_: Reply) -> None:
            if not m.nowait:
                self._send(spec.Exchange.DeleteOk())

        self._change(command, m, ok)

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
        def done(_: Reply) -> None:
            if not m.nowait:
                self._send(ok)

        self._change(
            command(
                now_ms=self.host.now_ms(),
                vhost=self.host.vhost,
                destination=m.destination,
                source=m.source,
                routing_key=m.routing_key,
                arguments=m.arguments or {},
            ),
            m,
            done,
        )

    # ---- queue -------------------------------------------------------------------------

    def _queue_declare(self, m: spec.Queue.Declare) -> None:
        name = m.queue
        if not name:
            name = self._queue_name("", m) if m.passive else generate_name("amq.gen-")
        command = cmd.DeclareQueue(
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
        )

        existed = m.passive or self.host.state.queue_exists(self.host.vhost, name)

        def ok(reply: Reply) -> None:
            assert isinstance(reply, QueueDeclared)
            self._last_queue = reply.queue
            self.stats.queues_declared += 1
            if not existed:
                self.stats.queues_created += 1
            if not m.nowait:
                self._send(
                    spec.Queue.DeclareOk(reply.queue, reply.message_count, reply.consumer_count)
                )

        cluster = self.host.cluster
        if cluster is None or name == REPLY_QUEUE:
            ok(self._run(command, m))
            return
        if m.passive:
            reply = self._run(command, m)  # existence and ownership: this node's copy
            remote = self._remote_leader(name)
            if remote is None:
                ok(reply)
                return

            async def counts() -> Reply:
                assert remote is not None
                return await self._leader_counts(remote, command, reply)

            self._round_trip(m, counts, ok)
            return
        arguments = m.arguments or {}
        locator, problem = placement.queue_locator(arguments, cluster.config.queue_leader_locator)
        if problem is not None:
            raise error_for(
                m,
                PRECONDITION_FAILED,
                f"PRECONDITION_FAILED - {problem} for queue '{name}' in vhost '{self.host.vhost}'",
            )
        state = self.host.state
        leader = (
            cluster.name
            if m.exclusive
            else placement.choose(locator, cluster.name, state.alive(), state.leader_counts())
        )
        place = cmd.SetLeader(
            now_ms=command.now_ms, vhost=self.host.vhost, queue=name, leader=leader
        )

        async def declare() -> Reply:
            outcome = (await cluster.replicate([command, place]))[0]
            reply = OK_REPLY if outcome is None else outcome.reply
            now = self.host.state.leader_of(self.host.vhost, name)
            if isinstance(reply, QueueDeclared) and now and now != cluster.name:
                return await self._leader_counts(now, command, reply)
            return reply

        self._round_trip(m, declare, ok)

    async def _leader_counts(self, leader: str, command: cmd.DeclareQueue, reply: Reply) -> Reply:
        """queue.declare-ok's counts come from the queue's leader (it holds the queue)."""
        cluster = self.host.cluster
        assert cluster is not None
        assert isinstance(reply, QueueDeclared)
        try:
            counted = await cluster.call(leader, command)
        except (ConnectionError, TimeoutError):
            return reply
        return counted if isinstance(counted, QueueDeclared) else reply

    def _queue_bind(self, m: spec.Queue.Bind) -> None:
        # Empty queue and key: both mean the channel's last declared queue.
        key = m.routing_key or ("" if m.queue else self._last_queue)

        def ok(_: Reply) -> None:
            if not m.nowait:
                self._send(spec.Queue.BindOk())

        self._queue_binding(m, cmd.BindQueue, key, ok)

    def _queue_unbind(self, m: spec.Queue.Unbind) -> None:
        def ok(_: Reply) -> None:
            self._send(spec.Queue.UnbindOk())  # queue.unbind has no nowait

        self._queue_binding(m, cmd.UnbindQueue, m.routing_key or "", ok)

    def _queue_binding(
        self,
        m: spec.Queue.Bind | spec.Queue.Unbind,
        command: type[cmd.BindQueue | cmd.UnbindQueue],
        routing_key: str,
        ok: Callable[[Reply], None],
    ) -> None:
        self._change(
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
            ok,
        )

    def _queue_purge(self, m: spec.Queue.Purge) -> None:
        command = cmd.PurgeQueue(
            now_ms=self.host.now_ms(),
            vhost=self.host.vhost,
            queue=self._queue_name(m.queue, m),
            owner=self.host.conn_id,
        )

        def ok(reply: Reply) -> None:
            assert isinstance(reply, Count)
            if not m.nowait:
                self._send(spec.Queue.PurgeOk(reply.message_count))

        leader = self._remote_leader(command.queue)
        if leader is None:
            ok(self._run(command, m))
            return
        self._run(command, m)  # existence and ownership checks here first
        cluster = self.host.cluster
        assert cluster is not None

        async def purge() -> Reply:
            return await cluster.call(leader, command)

        self._round_trip(m, purge, ok)

    def _queue_delete(self, m: spec.Queue.Delete) -> None:
        command = cmd.DeleteQueue(
            now_ms=self.host.now_ms(),
            vhost=self.host.vhost,
            queue=self._queue_name(m.queue, m),
            owner=self.host.conn_id,
            if_unused=m.if_unused,
            if_empty=m.if_empty,
        )

        def ok(reply: Reply) -> None:
            assert isinstance(reply, Count)
            self.stats.queues_deleted += 1
            if not m.nowait:
                self._send(spec.Queue.DeleteOk(reply.message_count))

        cluster = self.host.cluster
        if cluster is None:
            ok(self._run(command, m))
            return
        state = self.host.state

        async def delete() -> Reply:
            # if-unused / if-empty are the leader's to judge (it holds consumers and
            # messages); the deletion itself is replicated unconditionally.
            leader = state.leader_of(command.vhost, command.queue)
            if leader is None:
                return Count(0)
            if leader and leader != cluster.name:
                checked = await cluster.call(leader, command)
            else:
                checked = state.check_delete(command)
            if isinstance(checked, AmqpError):
                return checked
            unconditional = cmd.DeleteQueue(
                now_ms=command.now_ms,
                vhost=command.vhost,
                queue=command.queue,
                owner=command.owner,
            )
            outcome = (await cluster.replicate([unconditional]))[0]
            if outcome is not None and isinstance(outcome.reply, AmqpError):
                return outcome.reply
            return checked

        self._round_trip(m, delete, ok)

    # ---- basic -------------------------------------------------------------------------

    def _basic_qos(self, m: spec.Basic.Qos) -> None:
        if m.prefetch_size != 0:
            raise error_for(
                m, NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - prefetch_size!=0 ({m.prefetch_size})"
            )
        command = cmd.Qos(
            now_ms=self.host.now_ms(),
            channel=self.ref,
            prefetch_count=m.prefetch_count,
            global_=m.global_,
        )
        self._run(command, m)
        cluster = self.host.cluster
        if cluster is not None:
            for node in self.proxies:  # the leaders' proxies of this channel follow it
                cluster.send_command(node, command)
        self._send(spec.Basic.QosOk())

    def _basic_consume(self, m: spec.Basic.Consume) -> None:
        tag = m.consumer_tag or generate_name("amq.ctag-")
        queue = self._queue_name(m.queue, m)
        command = cmd.Consume(
            now_ms=self.host.now_ms(),
            channel=self.ref,
            vhost=self.host.vhost,
            queue=queue,
            consumer_tag=tag,
            no_ack=m.no_ack,
            exclusive=m.exclusive,
            arguments=m.arguments or {},
            reply_key=self._reply_key() if queue == REPLY_QUEUE else "",
        )
        leader = None if queue == REPLY_QUEUE else self._remote_leader(queue)
        if leader is not None:
            self._remote_consume(leader, command, m)
            return
        if tag in self.remote_consumers:
            raise ChannelError(errors.reused_tag(tag))
        # The command's deliveries are dispatched after this handler returns, so consume-ok
        # reaches the client before the first basic.deliver.
        reply = self._run(command, m)
        assert isinstance(reply, ConsumeOk)
        if not m.nowait:
            self._send(spec.Basic.ConsumeOk(tag))

    def _reply_key(self) -> str:
        cluster = self.host.cluster
        return generate_name("") + (node_suffix(cluster.name) if cluster is not None else "")

    def _remote_consume(self, leader: str, command: cmd.Consume, m: spec.Basic.Consume) -> None:
        """A consumer of a queue another node leads: attached there on a proxy of this
        channel (with this channel's prefetch), its deliveries relayed back here."""
        cluster = self.host.cluster
        assert cluster is not None
        tag = command.consumer_tag
        if tag in self.remote_consumers or self.host.state.has_consumer(self.ref, tag):
            raise ChannelError(errors.reused_tag(tag))
        self._check_here(command.queue, m)
        rc = self.remote_consumers[tag] = RemoteConsumer(
            leader, command.vhost, command.queue, command.no_ack
        )
        self.proxies.add(leader)
        prefetch, global_prefetch = self.host.state.channel_prefetch(self.ref)
        now = command.now_ms
        cluster.send_command(
            leader, cmd.Qos(now_ms=now, channel=self.ref, prefetch_count=prefetch, global_=False)
        )
        if global_prefetch:
            cluster.send_command(
                leader,
                cmd.Qos(now_ms=now, channel=self.ref, prefetch_count=global_prefetch, global_=True),
            )

        async def consume() -> Reply:
            return await cluster.call(leader, command)

        def ok(reply: Reply) -> None:
            assert isinstance(reply, ConsumeOk)
            if not m.nowait:
                self._send(spec.Basic.ConsumeOk(tag))
            rc.pending = False
            early, rc.early = rc.early, []
            for delivery in early:
                self._deliver_remote(rc, delivery)

        def done(result: Any) -> None:
            try:
                ok(result)
            finally:
                if rc.pending:  # refused or failed: no consumer after all
                    self.remote_consumers.pop(tag, None)

        self._round_trip(m, consume, done)

    def _basic_cancel(self, m: spec.Basic.Cancel) -> None:
        rc = self.remote_consumers.pop(m.consumer_tag or "", None)
        if rc is not None:
            cluster = self.host.cluster
            assert cluster is not None
            cluster.send_command(
                rc.node,
                cmd.Cancel(
                    now_ms=self.host.now_ms(), channel=self.ref, consumer_tag=m.consumer_tag or ""
                ),
            )
            if not m.nowait:
                self._send(spec.Basic.CancelOk(m.consumer_tag))
            return
        self._run(
            cmd.Cancel(
                now_ms=self.host.now_ms(), channel=self.ref, consumer_tag=m.consumer_tag or ""
            ),
            m,
        )
        if not m.nowait:
            self._send(spec.Basic.CancelOk(m.consumer_tag))

    def _basic_get(self, m: spec.Basic.Get) -> None:
        command = cmd.Get(
            now_ms=self.host.now_ms(),
            channel=self.ref,
            vhost=self.host.vhost,
            queue=self._queue_name(m.queue, m),
            no_ack=m.no_ack,
        )
        leader = self._remote_leader(command.queue)
        if leader is None:
            self._got(self._run(command, m), m)
            return
        cluster = self.host.cluster
        assert cluster is not None
        self._check_here(command.queue, m)
        self.proxies.add(leader)

        async def get() -> Reply:
            return await cluster.call(leader, command)

        def got(reply: Reply) -> None:
            if isinstance(reply, GetOk):
                tag = self.host.state.external_delivery(
                    self.ref,
                    command.vhost,
                    command.queue,
                    reply.delivery_tag,
                    reply.message,
                    command.no_ack,
                )
                reply = GetOk(tag, reply.redelivered, reply.message_count, reply.message)
            self._got(reply, m)

        self._round_trip(m, get, got)

    def _got(self, reply: Reply, m: spec.Basic.Get) -> None:
        if isinstance(reply, GetOk):
            self.stats.get(m.no_ack, reply.redelivered)
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
            self.stats.get_empty += 1
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
        if multiple:
            state = self.host.state
            before = state.channel_unacked(self.ref)
            reply = self.host.execute(command)
            self.stats.acknowledged += before - state.channel_unacked(self.ref)
        else:
            reply = self.host.execute(command)
        if isinstance(reply, AmqpError):
            self._checked(reply, _ACK)
        elif not multiple:
            self.stats.acknowledged += 1

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
        self.stats.acknowledged += len(delivery_tags)

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
