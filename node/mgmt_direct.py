"""A connection inside the node for the management API (RabbitMQ's "direct" connection).

Rules: what the API changes or reads from queues (declare, delete, purge, get, publish,
bindings, definitions import, the aliveness test) goes through a real `node.channel.Channel`
driven by AMQP methods, so it takes exactly the path a client's method takes: replicated
through Raft in a cluster, placed like a client's queue, forwarded to the queue's leader.
The channel's replies are recorded instead of encoded; a channel error is raised as
`DirectError` carrying the `AmqpError`. A direct connection is not in `BrokerNode.
connections` (it is listed nowhere, as RabbitMQ's management connections are not) and is
closed by leaving `open_direct` (its channel state goes everywhere it went). Never awaits
anything but the channel's own cluster round trips.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pamqp import base
from pamqp import commands as spec

from cluster import commands as cmd
from cluster.state import StateMachine
from node.broker.types import AmqpError, ChannelRef, Reply
from node.channel import Channel, ChannelError
from node.protocol.connection import ServerConnection
from node.protocol.events import ChannelContent

if TYPE_CHECKING:
    from cluster.node import ClusterNode
    from node.server import BrokerNode
    from node.stats import NodeStats

CHANNEL = 1


class DirectError(Exception):
    """The channel was closed with `error` (RabbitMQ's reply code and text)."""

    def __init__(self, error: AmqpError) -> None:
        super().__init__(error.reply_text)
        self.error = error


@dataclass(frozen=True, slots=True)
class Sent:
    """One method the channel answered with (content-bearing ones carry their content)."""

    method: base.Frame
    properties: bytes = b""
    body: bytes = b""


class _Recorder(ServerConnection):
    """The channel's `proto`: records what it sends instead of encoding frames."""

    def __init__(self) -> None:
        super().__init__(server_properties={}, now=time.monotonic())
        self.sent: list[Sent] = []

    def send_method(self, channel: int, method: base.Frame) -> bool:
        self.sent.append(Sent(method))
        return True

    def send_content(
        self, channel: int, method: base.Frame, properties: bytes, body: bytes
    ) -> bool:
        self.sent.append(Sent(method, properties, body))
        return True

    def send_deliver(self, channel: int, *args: Any) -> bool:
        return False  # a direct channel never consumes

    def send_ack(self, channel: int, delivery_tag: int, multiple: bool) -> bool:
        self.sent.append(Sent(spec.Basic.Ack(delivery_tag, multiple)))
        return True

    def close_channel(
        self, channel: int, reply_code: int, reply_text: str, class_id: int = 0, method_id: int = 0
    ) -> bool:
        return True


class DirectConnection:
    """One vhost's internal connection with one channel (the `Host` a Channel needs)."""

    def __init__(self, node: BrokerNode, vhost: str, user: str) -> None:
        self.node = node
        self.conn_id = node.new_conn_id()
        self.vhost = vhost
        self.user = user
        self.proto: ServerConnection = _Recorder()
        self.cluster: ClusterNode | None = node.cluster
        self.stats: NodeStats = node.stats
        self.execute: Callable[[cmd.AnyCommand], Reply] = node.execute
        self.reply_address: Callable[[ChannelRef], str | None] = node.state.reply_address
        self._pending: list[tuple[Callable[[], Awaitable[Any]], Callable[[Any], None]]] = []
        self._proxies: set[str] = set()
        self.channel = self._open()

    # ---- the Host protocol -------------------------------------------------------------

    @property
    def state(self) -> StateMachine:
        return self.node.state

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def note_publish(self) -> None:
        pass

    def confirms_due(self, channel: Channel) -> None:
        channel.flush_confirms()  # (never in confirm mode: nothing to send)

    def run_async(
        self, channel: Channel, op: Callable[[], Awaitable[Any]], done: Callable[[Any], None]
    ) -> None:
        channel.busy = True
        self._pending.append((op, done))

    # ---- driving the channel -----------------------------------------------------------

    def _open(self) -> Channel:
        channel = Channel(self, CHANNEL)
        self.node.execute(cmd.OpenChannel(channel=channel.ref))
        return channel

    async def call(self, method: base.Frame) -> list[Sent]:
        """Handle `method` on the channel; what it answered. A channel error closes the
        channel (a fresh one takes the next call) and raises DirectError."""
        channel = self.channel

        async def step() -> None:
            channel.handle_method(method)
            await self._settle(channel)

        return await self._recorded(step)

    async def publish(
        self, exchange: str, routing_key: str, properties: bytes, body: bytes, mandatory: bool
    ) -> list[Sent]:
        """basic.publish (not in confirm mode): what the channel answered (basic.return)."""
        content = ChannelContent(CHANNEL, exchange, routing_key, mandatory, False, properties, body)

        async def step() -> None:
            self.channel.handle_publish(content)

        return await self._recorded(step)

    async def _recorded(self, step: Callable[[], Awaitable[None]]) -> list[Sent]:
        """Run `step` on the channel; what the channel sent meanwhile. A channel error
        closes the channel (a fresh one takes the next call) and raises DirectError."""
        recorder = self.proto
        assert isinstance(recorder, _Recorder)
        recorder.sent = []
        try:
            await step()
        except ChannelError as exc:
            self._reset()
            raise DirectError(exc.error) from None
        finally:
            self.node.dispatch()
        return recorder.sent

    async def _settle(self, channel: Channel) -> None:
        """Run the cluster round trips the method started, in order, as the connection
        shell does (`ClientConnection._run_op`)."""
        while self._pending:
            op, done = self._pending.pop(0)
            result: Any
            try:
                result = await op()
            except Exception as exc:
                result = exc
            try:
                done(result)
            finally:
                channel.busy = False
                self._proxies |= channel.proxies
                self.node.dispatch()

    def _close_channel(self, channel: Channel) -> None:
        channel.closed = True
        self._proxies |= channel.proxies
        self.node.execute(cmd.CloseChannel(channel=channel.ref))

    def _reset(self) -> None:
        self._pending.clear()
        self._close_channel(self.channel)
        self.channel = self._open()

    def close(self) -> None:
        """The connection is gone: its channel's unacked messages go back to their queues,
        here and at every queue leader that held a proxy of it."""
        self._close_channel(self.channel)
        self.node.execute(cmd.CloseConnection(conn=self.conn_id))
        cluster = self.cluster
        if cluster is not None:
            for node in self._proxies:
                cluster.send_command(node, cmd.CloseConnection(conn=self.conn_id))
        self.node.dispatch()


@asynccontextmanager
async def open_direct(node: BrokerNode, vhost: str, user: str) -> AsyncIterator[DirectConnection]:
    conn = DirectConnection(node, vhost, user)
    try:
        yield conn
    finally:
        conn.close()
