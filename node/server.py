"""The I/O shell: sockets, tasks and timers around the sans-I/O protocol and the model.

Rules: one task group per client connection (reader, writer, ticker); one writer task per
socket; a connection's failure never reaches the listener. Everything that changes broker
state goes through `BrokerNode.execute(command)`; effects (deliveries to other
connections) are dispatched after the method that caused them has queued its reply.
Memory is bounded: a connection whose socket backs up stops receiving deliveries
(SetWritable), and publishers are blocked (connection.blocked, socket not read) while the
bytes of queued messages exceed the memory high watermark.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import platform
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from pamqp import commands as spec

from cluster import commands as cmd
from cluster import wire
from cluster.state import StateMachine
from node import __version__
from node.broker.types import (
    AmqpError,
    CancelConsumer,
    ChannelRef,
    Deliver,
    Effect,
    Reply,
    Ticked,
)
from node.channel import Channel, ChannelError

if TYPE_CHECKING:
    from cluster.node import ClusterConfig, ClusterNode
from node.config import NodeConfig, default_watermark
from node.direct_io import DirectReader, DirectWriter
from node.logs import EventLogger
from node.protocol.codec import HEARTBEAT_FRAME, AckMethod
from node.protocol.connection import (
    ChannelClosed,
    ChannelContent,
    ChannelMethod,
    ChannelOpened,
    ConnectionClosed,
    ConnectionLost,
    LoginRequested,
    SecretUpdated,
    ServerConnection,
    VhostRequested,
)
from node.protocol.connection import (
    ChannelError as ProtocolChannelError,
)
from node.protocol.properties import with_headers
from node.stats import NodeStats

# One reader turn handles at most this many bytes (about 100 small publishes), then lets
# the other connections run: a publisher's big socket buffer must not starve consumers.
READ_SIZE = 16 * 1024
FLOW_WAIT_S = 0.05  # longest pause of a publisher per turn while consumers catch up
FLOW_POLL_S = 0.001
TICK_INTERVAL_S = 0.25  # how late an expired message or idle queue may be removed
# Python's full (generation 2) collection scans every live object: 530 ms with 2,000,000
# messages held (measured), and the middle generation can hold 400,000 survivors. While a
# backlog builds, every GC_FREEZE_STEP more messages held moves what is alive into the
# permanent generation (gc.freeze, 1-2 ms), which collections skip: messages are acyclic
# and freed by reference counting all the same. The cost: a garbage cycle old enough to
# sit in an older generation at that moment is never collected.
GC_GUARD_S = 1.0
GC_FREEZE_STEP = 50_000
# Outgoing bytes queued for one socket: above HIGH the model stops delivering to the
# connection's consumers, below LOW it resumes (RabbitMQ's credit flow, in bytes).
OUT_HIGH = 4 * 1024 * 1024
OUT_LOW = 1 * 1024 * 1024
SHUTDOWN_GRACE_S = 3.0
# Reply codes that the AMQP 0-9-1 spec makes connection errors ("hard errors").
HARD_ERRORS = frozenset({320, 402, 501, 502, 503, 504, 505, 506, 530, 540, 541})
SHUTDOWN_TEXT = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"

CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "consumer_priorities": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "direct_reply_to": True,
}


def server_properties(config: NodeConfig) -> dict[str, Any]:
    return {
        "product": "Warren",
        "version": __version__,
        "platform": f"Python {platform.python_version()}",
        "copyright": "Warren contributors",
        "information": "Licensed under the Apache License 2.0",
        "cluster_name": config.cluster_name,
        "capabilities": dict(CAPABILITIES),
    }


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


RESYNC_TEXT = (
    "CONNECTION_FORCED - broker forced connection closure with reason "
    "'node resynchronised with the cluster'"
)


class BrokerNode:
    """One node's broker: the state machine, the live connections, the memory alarm, and
    in a cluster its `ClusterNode` (Raft, the node link, forwarding to queue leaders)."""

    def __init__(
        self, config: NodeConfig, log: EventLogger, cluster: ClusterConfig | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.state = StateMachine(
            rewrite_headers=with_headers, node_name=cluster.name if cluster else ""
        )
        self.connections: dict[int, ClientConnection] = {}
        self.stats = NodeStats()
        self.watermark = config.memory_high_watermark_bytes or default_watermark()
        self.alarm = False
        self.alarm_cleared = anyio.Event()
        self.connections_changed = anyio.Event()
        # Connection ids name channels across the cluster (proxy channels at queue
        # leaders): a random per-process prefix keeps them unique between nodes.
        self._next_conn = (int.from_bytes(os.urandom(4), "big") >> 2) << 32 | 1 if cluster else 1
        self.cluster: ClusterNode | None = None
        if cluster is not None:
            from cluster.node import ClusterNode

            self.cluster = ClusterNode(cluster, self, log)
        self._effects: list[Effect] = []
        self._dirty: set[ClientConnection] = set()
        self._dispatching = False
        self.properties = server_properties(config)

    # ---- commands and effects ----------------------------------------------------------

    def execute(self, command: cmd.AnyCommand) -> Reply:
        outcome = self.state.apply(command)
        if outcome.effects:
            self._effects.extend(outcome.effects)
        return outcome.reply

    def publishers_wait(self) -> bool:
        """Credit flow: a queue this node feeds has a backlog its consumers have not caught
        up with, or (cluster) a peer reads forwarded messages slower than they come."""
        if self.state.flow_blocked():
            return True
        return self.cluster is not None and self.cluster.link_backlogged()

    def absorb(self, effects: list[Effect]) -> None:
        """Effects of a command applied elsewhere (the Raft log, the node link)."""
        self._effects.extend(effects)

    def mark_dirty(self, conn: ClientConnection) -> None:
        self._dirty.add(conn)

    def dispatch(self) -> None:
        """Deliver pending effects to their connections, then flush every touched socket."""
        if self._dispatching:
            return
        self._dispatching = True
        cluster = self.cluster
        try:
            if cluster is not None:
                cluster.durable.collect(self.state)  # settles and logged messages to batch
            while self._effects or self._dirty:
                effects, self._effects = self._effects, []
                others: list[Effect] = []
                for effect in effects:
                    kind = type(effect)
                    if kind is Deliver or kind is CancelConsumer:
                        conn = self.connections.get(effect.channel.conn)  # type: ignore[union-attr]
                        if conn is not None:
                            conn.apply_effect(effect)
                        elif cluster is not None:
                            cluster.remote_effect(effect)  # type: ignore[arg-type]
                    else:
                        others.append(effect)
                if others and cluster is not None:
                    cluster.cluster_effects(others)
                dirty, self._dirty = self._dirty, set()
                for conn in dirty:
                    conn.flush_out()
            self._check_memory()
        finally:
            self._dispatching = False

    def _check_memory(self) -> None:
        used = self.state.total_message_bytes
        if not self.alarm and used > self.watermark:
            self.alarm = True
            self.alarm_cleared = anyio.Event()
            self.log.warning("memory.alarm.set", used_bytes=used, watermark_bytes=self.watermark)
        elif self.alarm and used <= self.watermark:
            self.alarm = False
            self.alarm_cleared.set()
            self.log.info("memory.alarm.cleared", used_bytes=used, watermark_bytes=self.watermark)

    # ---- connections -------------------------------------------------------------------

    def new_conn_id(self) -> int:
        """A connection id no other connection of this node (or of the cluster) has."""
        conn_id = self._next_conn
        self._next_conn += 1
        return conn_id

    async def handle_client(self, stream: SocketStream) -> None:
        conn_id = self.new_conn_id()
        address = stream.extra(SocketAttribute.remote_address, None)
        if isinstance(address, tuple):
            host, peer = str(address[0]), f"{address[0]}:{address[1]}"
        else:
            host, peer = "", str(address)
        conn = ClientConnection(self, stream, conn_id, host, peer)
        self.connections[conn_id] = conn
        try:
            await conn.run()
        except Exception:
            # Our bug, not the client's: log it on one line, drop this connection only.
            self.log.exception("connection.crashed", conn=conn_id, peer=peer)
        finally:
            self.connections.pop(conn_id, None)
            self.connections_changed.set()
            conn.release()
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    # ---- the cluster's calls back into this node (cluster.node.Shell) -------------------

    def _channel_of(self, ref: ChannelRef) -> tuple[ClientConnection, Channel] | None:
        conn = self.connections.get(ref.conn)
        channel = conn.channels.get(ref.channel) if conn is not None else None
        if conn is None or channel is None or conn.closed:
            return None
        return conn, channel

    def deliver_remote(self, delivery: wire.Delivery) -> bool:
        """A remote consumer's delivery from its queue's leader; False when nobody here
        takes it any more (the leader should requeue it)."""
        found = self._channel_of(delivery.channel)
        if found is None:
            return False
        conn, channel = found
        taken = channel.remote_delivery(delivery)
        if taken:
            self.mark_dirty(conn)  # flushed at the end of the link's read (dispatch)
        return taken

    def remote_confirm(self, peer: str, ref: ChannelRef, seq: int, ok: bool) -> None:
        found = self._channel_of(ref)
        if found is not None:
            conn, channel = found
            channel.remote_confirmed(peer, seq, ok)
            self.mark_dirty(conn)

    def remote_cancel(self, ref: ChannelRef, tag: str) -> None:
        found = self._channel_of(ref)
        if found is not None:
            conn, channel = found
            if channel.drop_remote_consumer(tag, notify=True):
                self.mark_dirty(conn)

    def peer_lost(self, node: str) -> None:
        """`node` is unreachable: remote consumers there are cancelled (clients
        re-subscribe on basic.cancel), confirms pending there are nacked."""
        for conn in list(self.connections.values()):
            touched = False
            for channel in list(conn.channels.values()):
                touched = channel.peer_lost(node) or touched
            if touched:
                self.mark_dirty(conn)

    def queue_moved(self) -> None:
        """Queues changed leader: remote consumers of a queue whose leader is no longer
        the node they are attached at are cancelled (with basic.cancel)."""
        for conn in list(self.connections.values()):
            touched = False
            for channel in list(conn.channels.values()):
                touched = channel.check_remote_consumers() or touched
            if touched:
                self.mark_dirty(conn)

    def replace_state(self, state: StateMachine) -> None:
        """The Raft snapshot replaced the replicated state: local clients start over."""
        self.state = state
        for conn in list(self.connections.values()):
            conn.force_close(320, RESYNC_TEXT)
            conn.process_events()
            conn.reply_address = state.reply_address

    async def run_clock(self) -> None:
        """Let time pass in the model (message TTL, x-expires) when nothing else happens."""
        delay = TICK_INTERVAL_S
        while True:
            await anyio.sleep(delay)
            reply = self.execute(cmd.Tick(now_ms=int(time.time() * 1000)))
            self.dispatch()
            self.stats.rates()  # (the rate window moves on even when nobody reads it)
            # A tick does bounded work; when more expired messages wait, tick again as soon
            # as pending I/O has been served, so expiry never holds the loop for long.
            delay = 0 if isinstance(reply, Ticked) and reply.more else TICK_INTERVAL_S

    async def run_gc_guard(self) -> None:
        """Keep full collections short while many messages are held (see GC_FREEZE_STEP)."""
        frozen_at = 0
        while True:
            await anyio.sleep(GC_GUARD_S)
            held = self.state.held_messages()
            if held < frozen_at:
                frozen_at = held  # drained: the next growth counts from here
            elif held - frozen_at >= GC_FREEZE_STEP:
                started = time.monotonic()
                gc.collect(0)  # (not 1: the middle generation holds up to 400,000 objects)
                gc.freeze()  # (gc.get_freeze_count() would walk every frozen object)
                frozen_at = held
                self.log.info(
                    "gc.freeze",
                    messages_held=held,
                    took_ms=round((time.monotonic() - started) * 1000, 1),
                )

    async def shutdown(self) -> None:
        self.log.info("node.stopping", connections=len(self.connections))
        for conn in list(self.connections.values()):
            conn.force_close(320, SHUTDOWN_TEXT)
            conn.process_events()
        self.dispatch()
        with anyio.move_on_after(SHUTDOWN_GRACE_S):
            while self.connections:
                self.connections_changed = anyio.Event()
                await self.connections_changed.wait()


class ClientConnection:
    """One client socket: feeds the sans-I/O connection, runs its channels, writes back."""

    def __init__(
        self, node: BrokerNode, stream: SocketStream, conn_id: int, host: str, peer: str
    ) -> None:
        self.node = node
        self.stream = stream
        self.conn_id = conn_id
        self.host = host
        self.peer = peer
        self.vhost = "/"
        self.user = ""
        self.connected_at = int(time.time() * 1000)  # (the management API's connected_at)
        self.log = node.log.bind(conn=conn_id)
        cfg = node.config
        self.proto = ServerConnection(
            server_properties=node.properties,
            channel_max=cfg.channel_max,
            frame_max=cfg.frame_max,
            heartbeat=cfg.heartbeat,
            now=time.monotonic(),
        )
        self.channels: dict[int, Channel] = {}
        self._confirms_due: dict[Channel, None] = {}
        # Host protocol: channels run commands straight on the node (one call layer less).
        self.execute: Callable[[cmd.AnyCommand], Reply] = node.execute
        self.reply_address: Callable[[ChannelRef], str | None] = node.state.reply_address
        self.cluster: ClusterNode | None = node.cluster
        self.stats = node.stats
        self._tg: TaskGroup | None = None
        self._now_ms = int(time.time() * 1000)
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._out_ready = anyio.Event()
        # Output goes straight to the socket while nothing is queued (node/direct_io.py);
        # `_sending` is True while the writer task is inside `stream.send`.
        self._direct = DirectWriter(stream)
        self._sending = False
        # Input straight from the transport (node/direct_io.py): _on_data, paused by it
        # for backpressure, resumed by the _reader task.
        self._input = DirectReader(stream, self._on_data, READ_SIZE)
        self._drained = anyio.Event()
        self.writable = True
        self.publisher = False
        self.blocked = False
        self.opened = False
        self.closed = False
        self._reader_scope = anyio.CancelScope()
        self._linger = 0.0
        self._confirming: set[Channel] = set()
        self._released = False
        self._handlers: dict[type, Callable[[Any], None]] = {
            LoginRequested: self._on_login,
            VhostRequested: self._on_vhost,
            ChannelOpened: self._on_channel_opened,
            ChannelMethod: self._on_channel_method,
            ChannelContent: self._on_channel_content,
            ChannelClosed: self._on_channel_closed,
            ConnectionClosed: self._on_connection_closed,
            ConnectionLost: self._on_connection_lost,
            ChannelError: self._on_channel_error,
            SecretUpdated: self._on_secret_updated,
        }

    # ---- Host protocol for channels ----------------------------------------------------

    def now_ms(self) -> int:
        """The wall clock as of this batch of input (read once per `process_events`)."""
        return self._now_ms

    def note_publish(self) -> None:
        self.publisher = True

    @property
    def state(self) -> StateMachine:
        return self.node.state

    def run_async(
        self,
        channel: Channel,
        op: Callable[[], Awaitable[Any]],
        done: Callable[[Any], None],
    ) -> None:
        """Run `op` (a cluster round trip) for `channel`; the channel takes no further
        method until `done(result)` ran (AMQP orders a channel's methods). `done` gets
        the result, or the exception `op` raised; it may raise ChannelError."""
        channel.busy = True
        assert self._tg is not None
        self._tg.start_soon(self._run_op, channel, op, done)

    async def _run_op(
        self, channel: Channel, op: Callable[[], Awaitable[Any]], done: Callable[[Any], None]
    ) -> None:
        result: Any
        try:
            result = await op()
        except Exception as exc:
            result = exc
        if self.closed or self.channels.get(channel.number) is not channel:
            return  # the channel or connection went meanwhile: nobody to answer
        self._now_ms = int(time.time() * 1000)
        try:
            done(result)
        except ChannelError as exc:
            self._fail(channel, exc.error)
        channel.busy = False
        self._resume(channel)
        if channel.confirm:
            channel.flush_confirms()
        self.node.mark_dirty(self)
        self.node.dispatch()
        if self.closed:
            self._stop()

    def _resume(self, channel: Channel) -> None:
        """Handle the methods that waited while `channel` was busy, until it is again."""
        backlog = channel.backlog
        while backlog and not channel.busy and self.channels.get(channel.number) is channel:
            event = backlog.popleft()
            if type(event) is ChannelContent:
                self._on_channel_content(event)
            else:
                self._on_channel_method(event)

    # ---- tasks -------------------------------------------------------------------------

    async def run(self) -> None:
        self.log.info("connection.accepted", peer=self.peer)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._writer)
            tg.start_soon(self._ticker)
            try:
                with self._reader_scope:
                    await self._reader()
            finally:
                self.closed = True
                with anyio.move_on_after(1.0 + self._linger, shield=True):
                    await self._goodbye()
                tg.cancel_scope.cancel()

    async def _goodbye(self) -> None:
        """Put the last frames (close, close-ok) on the wire, then half-close and drain
        what the client still sends, so that closing does not reset the connection (a
        reset can discard our connection.close before the client reads it)."""
        self._flush_pending()
        while self._out_bytes > 0:
            self._drained = anyio.Event()
            await self._drained.wait()
        if self._linger:
            await anyio.sleep(self._linger)
        try:
            await self.stream.send_eof()
            reader = self._input
            reader.discard()
            with anyio.move_on_after(0.5):
                reader.resume()
                while await reader.wait():
                    reader.resume()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        except OSError:
            pass

    def _stop(self) -> None:
        """The protocol says the connection is over: stop reading, flush, close."""
        self.closed = True
        self._reader_scope.cancel()

    async def _reader(self) -> None:
        """Input runs in `_on_data`, called by the transport; this task waits while the
        reader is paused (backpressure) and resumes it, or returns when the stream ends."""
        reader = self._input
        while not self.closed:
            if self.node.alarm and self.publisher:
                await self._blocked_wait()
                continue
            if self._out_bytes > OUT_HIGH:
                # The client is not reading what we send: stop reading what it sends.
                self._drained = anyio.Event()
                await self._drained.wait()
                continue
            if self.publisher and self.node.publishers_wait():
                await self._flow_wait()
            reader.resume()
            if not await reader.wait():
                if not self.closed:
                    reason = "socket closed" if reader.lost is None else str(reader.lost)
                    self.log.info("connection.lost", peer=self.peer, reason=reason)
                return

    def _on_data(self, data: bytes) -> None:
        if self.closed:
            return  # (closing: what still comes is drained by _goodbye)
        self.proto.receive_data(data, time.monotonic())
        self.process_events()
        self.node.dispatch()
        node = self.node
        publisher_waits = self.publisher and (node.alarm or node.publishers_wait())
        if publisher_waits or self._out_bytes > OUT_HIGH:
            self._input.pause()  # (the _reader task waits, then resumes it)

    async def _flow_wait(self) -> None:
        """Credit flow, RabbitMQ style: while a queue this node feeds has a backlog its
        consumers have not caught up with, a publisher pauses between reads (bounded, so a
        connection that both publishes and consumes the same queue cannot deadlock)."""
        with anyio.move_on_after(FLOW_WAIT_S):
            while self.node.publishers_wait():  # noqa: ASYNC110 - polled: no event on the ack path
                await anyio.sleep(FLOW_POLL_S)

    async def _blocked_wait(self) -> None:
        if not self.blocked:
            self.blocked = True
            self.proto.send_blocked("low on memory")
            self.node.mark_dirty(self)
            self.node.dispatch()
            self.log.info("connection.blocked", reason="low on memory")
        await self.node.alarm_cleared.wait()
        self.blocked = False
        self.proto.send_unblocked()
        self.node.mark_dirty(self)
        self.node.dispatch()
        self.log.info("connection.unblocked")

    async def _writer(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready = anyio.Event()
            while self._out:
                if len(self._out) == 1:
                    chunk = self._out.popleft()
                else:
                    chunk = b"".join(self._out)
                    self._out.clear()
                self._sending = True
                try:
                    await self.stream.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    self._out.clear()
                    self._out_bytes = 0
                    self.closed = True
                    self._drained.set()
                    return
                finally:
                    self._sending = False
                self._out_bytes -= len(chunk)
                if not self.writable and self._out_bytes < OUT_LOW and not self.closed:
                    self.writable = True
                    self.node.execute(cmd.SetWritable(conn=self.conn_id, writable=True))
                    self.node.dispatch()
            self._drained.set()

    async def _ticker(self) -> None:
        """Heartbeats and the protocol's timeouts (handshake, close-ok, missed beats)."""
        while not self.closed:
            deadline = self.proto.next_deadline()
            delay = 1.0 if deadline is None else deadline - time.monotonic()
            await anyio.sleep(min(max(delay, 0.01), 1.0))
            if self.blocked:
                # Not reading while blocked: keep the client's heartbeat monitor fed.
                if self.proto.heartbeat:
                    self._enqueue(HEARTBEAT_FRAME)
                continue
            self.proto.tick(time.monotonic())
            self.process_events()
            self.node.dispatch()

    # ---- events from the protocol ------------------------------------------------------

    def process_events(self) -> None:
        self._now_ms = int(time.time() * 1000)
        proto = self.proto
        handlers = self._handlers
        channels = self.channels
        next_event = proto.next_event
        next_single_ack = proto.next_single_ack
        while True:
            event = next_event()
            if event is None:
                break
            if type(event) is ChannelContent:  # the hot path, inlined: _on_channel_content
                channel = channels.get(event.channel)
                if channel is None:
                    continue
                if channel.busy:
                    channel.backlog.append(event)
                    continue
                try:
                    channel.handle_publish(event)
                except ChannelError as exc:
                    self._fail(channel, exc.error)
                else:
                    if channel.confirm:
                        self._confirming.add(channel)
            elif type(event) is ChannelMethod and type(ack := event.method) is AckMethod:
                number = event.channel  # the other hot path: basic.ack
                channel = channels.get(number)
                if channel is None:
                    continue
                if channel.busy:
                    channel.backlog.append(event)
                    continue
                # Consumers ack one tag at a time: the single-tag acks of this channel that
                # come right after this one go with it as one command (Channel.ack_many).
                more = None if ack.multiple else next_single_ack(number)
                try:
                    if more is None:
                        channel.ack(ack.delivery_tag, ack.multiple)
                    else:
                        run = [ack.delivery_tag, more]
                        while (more := next_single_ack(number)) is not None:
                            run.append(more)
                        channel.ack_many(tuple(run))
                except ChannelError as exc:
                    self._fail(channel, exc.error)
                else:
                    if channel.confirm:
                        self._confirming.add(channel)
            else:
                handlers[type(event)](event)
        for channel in self._confirming:
            channel.flush_confirms()
        self._confirming.clear()
        self.node.mark_dirty(self)
        if self.closed:
            self._stop()

    def _on_login(self, ev: LoginRequested) -> None:
        user = self.node.config.user(ev.username)
        refused = f"ACCESS_REFUSED - Login was refused using authentication mechanism {ev.mechanism}. For details see the broker logfile."  # noqa: E501
        if user is None or user.password != ev.password:
            self.log.info("auth.refused", user=ev.username, peer=self.peer, reason="credentials")
            self.proto.refuse_login(refused)
        elif ev.username in self.node.config.loopback_users and not is_loopback(self.host):
            self.log.info("auth.refused", user=ev.username, peer=self.peer, reason="loopback_only")
            self.proto.refuse_login(refused)
        else:
            self.user = ev.username
            self.proto.accept_login()

    def _on_vhost(self, ev: VhostRequested) -> None:
        if ev.vhost in self.node.config.vhosts:
            self.vhost = ev.vhost
            self.opened = True
            self.node.stats.connections_opened += 1
            self.proto.accept_vhost()
            self.log.info("connection.opened", user=self.user, vhost=ev.vhost, peer=self.peer)
        else:
            self.log.info("connection.refused", vhost=ev.vhost, reason="vhost not found")
            self.proto.refuse_vhost(530, f"NOT_ALLOWED - vhost {ev.vhost} not found")

    def _on_channel_opened(self, ev: ChannelOpened) -> None:
        channel = Channel(self, ev.channel)
        self.channels[ev.channel] = channel
        self.stats.channels_opened += 1
        self.node.execute(cmd.OpenChannel(channel=channel.ref))

    def _on_channel_method(self, ev: ChannelMethod) -> None:
        channel = self.channels.get(ev.channel)
        if channel is None:
            return  # closing on our side: the protocol discards, this is belt and braces
        if channel.busy:
            channel.backlog.append(ev)
            return
        method = ev.method
        try:
            if type(method) is AckMethod:
                channel.ack(method.delivery_tag, method.multiple)
            else:
                channel.handle_method(method)
        except ChannelError as exc:
            self._fail(channel, exc.error)
        else:
            if channel.confirm:
                self._confirming.add(channel)

    def _on_channel_content(self, ev: ChannelContent) -> None:
        channel = self.channels.get(ev.channel)
        if channel is None:
            return
        if channel.busy:
            channel.backlog.append(ev)
            return
        try:
            channel.handle_publish(ev)
        except ChannelError as exc:
            self._fail(channel, exc.error)
        else:
            if channel.confirm:
                self._confirming.add(channel)

    def _on_channel_closed(self, ev: ChannelClosed) -> None:
        channel = self.channels.pop(ev.channel, None)
        if channel is not None:
            self._close_channel(channel)

    def _close_channel(self, channel: Channel) -> None:
        """The channel is gone (either side closed it, or an error did): its state goes
        here and at every queue leader holding a proxy of it. Methods still waiting behind
        a cluster round trip are dropped (the client already has its close-ok)."""
        channel.backlog.clear()
        channel.closed = True
        self.stats.channels_closed += 1
        self.node.execute(cmd.CloseChannel(channel=channel.ref))
        if self.cluster is not None:
            for node in channel.proxies:
                self.cluster.send_command(node, cmd.CloseChannel(channel=channel.ref))

    def _on_connection_closed(self, ev: ConnectionClosed) -> None:
        self.log.info(
            "connection.closed",
            peer=self.peer,
            by_peer=ev.by_peer,
            reply_code=ev.reply_code,
            reply_text=ev.reply_text,
        )
        self._linger = ev.linger
        self.closed = True

    def _on_channel_error(self, ev: ProtocolChannelError) -> None:
        """The protocol layer closed a channel itself (e.g. a message over the size limit)."""
        self.log.info(
            "channel.error", channel=ev.channel, reply_code=ev.reply_code, reply_text=ev.reply_text
        )
        channel = self.channels.pop(ev.channel, None)
        if channel is not None:
            self._close_channel(channel)

    def _on_secret_updated(self, ev: SecretUpdated) -> None:
        self.log.info("connection.secret_updated", reason=ev.reason)

    def _on_connection_lost(self, ev: ConnectionLost) -> None:
        self.log.info("connection.lost", peer=self.peer, reason=ev.reason)
        self.closed = True

    def _fail(self, channel: Channel, error: AmqpError) -> None:
        channel.flush_confirms()
        self.log.info(
            "channel.error",
            channel=channel.number,
            reply_code=error.reply_code,
            reply_text=error.reply_text,
        )
        if error.connection or error.reply_code in HARD_ERRORS:
            self.force_close(error.reply_code, error.reply_text, error.class_id, error.method_id)
            return
        self.proto.close_channel(
            channel.number, error.reply_code, error.reply_text, error.class_id, error.method_id
        )
        self.channels.pop(channel.number, None)
        self._close_channel(channel)

    def force_close(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        """Server-initiated connection.close; the socket goes after close-ok or a timeout."""
        self.proto.close(code, text, class_id, method_id)
        self.node.mark_dirty(self)

    # ---- effects and output ------------------------------------------------------------

    def apply_effect(self, effect: Effect) -> None:
        if type(effect) is Deliver:
            msg = effect.message
            self.stats.deliver(effect.no_ack, effect.redelivered)
            self.proto.send_deliver(
                effect.channel.channel,
                effect.consumer_tag,
                effect.delivery_tag,
                effect.redelivered,
                msg.exchange,
                msg.routing_key,
                msg.properties,
                msg.body,
            )
        elif type(effect) is CancelConsumer:
            self.proto.send_method(
                effect.channel.channel, spec.Basic.Cancel(effect.consumer_tag, True)
            )
        self.node.mark_dirty(self)

    def _enqueue(self, data: bytes) -> None:
        if not self._out and not self._sending and not self.closed and self._direct.write(data):
            return
        self._out.append(data)
        self._out_bytes += len(data)
        self._out_ready.set()

    def confirms_due(self, channel: Channel) -> None:
        """`channel` has confirms to send: at the next flush (the caller marks this
        connection dirty)."""
        self._confirms_due[channel] = None

    def _flush_pending(self) -> None:
        if self._confirms_due:
            due, self._confirms_due = self._confirms_due, {}
            for channel in due:
                if not channel.closed:
                    channel.flush_confirms()
        data = self.proto.data_to_send()
        if data:
            self._enqueue(data)

    def flush_out(self) -> None:
        self._flush_pending()
        if self.writable and self._out_bytes > OUT_HIGH:
            self.writable = False
            self.node.execute(cmd.SetWritable(conn=self.conn_id, writable=False))

    def release(self) -> None:
        """The connection is gone: its channels close, its exclusive queues go."""
        if self._released:
            return
        self._released = True
        if self.opened:
            self.stats.connections_closed += 1
        self.stats.channels_closed += len(self.channels)
        proxies: set[str] = set()
        for channel in self.channels.values():
            channel.closed = True
            proxies |= channel.proxies
        self.channels.clear()
        self.node.execute(cmd.CloseConnection(conn=self.conn_id))
        if self.cluster is not None:
            for node in proxies:
                self.cluster.send_command(node, cmd.CloseConnection(conn=self.conn_id))
        self.node.dispatch()
        self.log.info("connection.released", peer=self.peer)


async def serve(
    config: NodeConfig,
    log: EventLogger,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
    cluster: ClusterConfig | None = None,
) -> None:
    """Listen for AMQP clients until SIGTERM/SIGINT, then close them with 320 and return.

    In a cluster the AMQP port is bound at once but clients are served only once the
    node has caught up with the Raft log and announced itself (`cluster.ready`)."""
    node = BrokerNode(config, log, cluster)
    listener = await anyio.create_tcp_listener(local_host=config.host, local_port=config.port)
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def start() -> None:
                if node.cluster is not None:
                    await tg.start(node.cluster.run)
                if config.management_port is not None:
                    from node.management import management_server

                    await tg.start(management_server(node, config, log).serve)
                if config.metrics_port is not None:
                    from node.metrics import metrics_server

                    server = metrics_server(node, config.management_host, config.metrics_port, log)
                    await tg.start(server.serve)

                async def accept_loop() -> None:
                    async with listener:
                        await listener.serve(node.handle_client)

                tg.start_soon(accept_loop)
                tg.start_soon(node.run_clock)
                tg.start_soon(node.run_gc_guard)
                log.info(
                    "node.listening",
                    version=__version__,
                    data_dir=str(config.data_dir),
                    host=config.host,
                    port=config.port,
                    memory_high_watermark_bytes=node.watermark,
                    cluster=node.cluster is not None,
                )
                if on_ready is not None:
                    result = on_ready()
                    if result is not None:
                        await result

            tg.start_soon(start)
            async for signum in signals:
                log.info("node.signal", signal=signal.Signals(signum).name)
                break
        await node.shutdown()
        tg.cancel_scope.cancel()
    log.info("node.stopped")
