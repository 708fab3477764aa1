"""Benchmark load generator: a small raw-socket AMQP 0-9-1 client on asyncio (uvloop if present).

pika is far too slow to load a broker, so the benchmark drives brokers with this client.

Rules:
- pamqp encodes and decodes everything that is not on the hot path (handshake, declares,
  consume, close). The hot path is hand-written: a publish (method + header + body frames)
  is encoded once and the same bytes are written in batches; basic.deliver and its content
  frames are split and parsed with `struct` straight out of one receive buffer; acks
  (per message by default, or `multiple` every N) and publisher confirms are packed and
  parsed the same way. Nothing on the hot path goes through pamqp.
- All writes produced while handling one socket read are sent with a single write.
- A publisher honours TCP backpressure (the transport's pause/resume), connection.blocked
  and, with confirms on, its window of unconfirmed messages.
- One worker is one process with one event loop: the benchmark driver (bench_node.py) starts
  each worker with multiprocessing, so the generator never shares a GIL with the broker or
  with another worker. Workers talk to the driver through a pipe only:
  child -> ("ready",), ("result", WorkerResult) or ("error", text);
  parent -> ("go", t_start, t_end) with `time.monotonic()` instants (CLOCK_MONOTONIC is
  one clock for every process on the machine) or ("abort",).
- Latency timestamps are `time.monotonic_ns()` in the first 8 bytes of the body.
- Library code: no print(); logging only. Imports nothing from Warren.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import struct
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from pamqp import body as pbody
from pamqp import commands, frame
from pamqp import header as pheader

log = logging.getLogger("loadgen")

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
# Frame header: type, channel, payload size.
_FRAME_HDR = struct.Struct(">BHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# A whole basic.ack frame: header, class 60, method 80, delivery tag, multiple bit, frame end.
_ACK = struct.Struct(">BHIHHQBB")
_ACK_PAYLOAD_SIZE = 13
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
# (class << 16 | method) of the methods parsed on the hot path.
_BASIC_DELIVER = 60 << 16 | 60
_BASIC_ACK = 60 << 16 | 80
_BASIC_NACK = 60 << 16 | 120

CLIENT_FRAME_MAX = 131072
CONNECT_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
WRITE_HIGH_WATER = 256 * 1024  # bytes buffered in user space before the producer waits

CLIENT_PROPERTIES: dict[str, Any] = {
    "product": "warren-bench-loadgen",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
    },
}


class AmqpError(Exception):
    """The broker closed the channel or the connection (or the socket went away)."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"


# Kinds of content a channel may be receiving.
_CONTENT_DELIVER, _CONTENT_OTHER = 1, 2


class _Inbound:
    """Per-channel state of the content (header + body frames) being received."""

    __slots__ = ("kind", "remaining", "since_ack", "tag", "want_ts")

    def __init__(self) -> None:
        self.kind = 0
        self.tag = 0
        self.remaining = 0
        self.want_ts = False
        self.since_ack = 0


class _ConfirmTracker:
    """Counts publisher confirms: every tag <= `upto` is settled, plus the tags in `singles`."""

    __slots__ = ("nacked", "singles", "upto")

    def __init__(self) -> None:
        self.upto = 0
        self.singles: set[int] = set()
        self.nacked = 0

    def settle(self, tag: int, multiple: bool) -> None:
        if multiple:
            if tag > self.upto:
                self.upto = tag
                if self.singles:
                    self.singles = {t for t in self.singles if t > tag}
        elif tag == self.upto + 1:
            self.upto = tag
            singles = self.singles
            while singles and self.upto + 1 in singles:
                self.upto += 1
                singles.discard(self.upto)
        elif tag > self.upto:
            self.singles.add(tag)

    @property
    def settled(self) -> int:
        return self.upto + len(self.singles)


class ClientProtocol(asyncio.Protocol):
    """The asyncio protocol: splits frames, runs the hot path, queues the rest for `Client`."""

    def __init__(
        self, *, ack_every: int = 1, no_ack: bool = False, measure_latency: bool = False
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.ack_every = ack_every
        self.no_ack = no_ack
        self.measure_latency = measure_latency
        self.recording = False  # latencies are kept only while True (the measurement window)
        self.latencies_ns: list[int] = []
        self.sent_ns: list[int] = []  # each latency's start (monotonic_ns), same order
        self.delivered = 0
        self.returned = 0
        self.heartbeats = 0
        self.blocked = False
        self.confirms = _ConfirmTracker()
        self.confirm_channel = -1
        self.error: AmqpError | None = None
        self._buf = bytearray()
        self._inbound: dict[int, _Inbound] = {}
        self._inbox: dict[int, deque[Any]] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self._unblocked: asyncio.Event = asyncio.Event()
        self._unblocked.set()
        self._confirm_waiter: asyncio.Future[None] | None = None
        self._confirm_target = 0
        # Publisher confirm latency: (last tag of a written batch, its size, monotonic_ns)
        self.sent_batches: deque[tuple[int, int, int]] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack like one.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = AmqpError(0, f"socket closed: {exc!r}" if exc else "socket closed")
        if not self.closed.done():
            self.closed.set_result(None)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._wake_writer()
        if self._confirm_waiter is not None and not self._confirm_waiter.done():
            self._confirm_waiter.set_result(None)
        self._unblocked.set()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        out = bytearray()
        unpack_hdr = _FRAME_HDR.unpack_from
        unpack_u64 = _U64.unpack_from
        inbound = self._inbound
        now_ns = time.monotonic_ns() if self.recording else 0
        while n - pos >= 8:
            ftype, ch, size = unpack_hdr(buf, pos)
            end = pos + 7 + size
            if end >= n:
                break
            if buf[end] != FRAME_END:
                self._fail(AmqpError(501, "FRAME_ERROR - bad frame end from broker"))
                return
            p = pos + 7
            if ftype == FRAME_BODY:
                st = inbound[ch]
                if st.want_ts:
                    st.want_ts = False
                    if now_ns and size >= 8:
                        sent = unpack_u64(buf, p)[0]
                        self.latencies_ns.append(now_ns - sent)
                        self.sent_ns.append(sent)
                st.remaining -= size
                if st.remaining <= 0:
                    self._complete(ch, st, out)
            elif ftype == FRAME_METHOD:
                cm = _U32.unpack_from(buf, p)[0]
                if cm == _BASIC_DELIVER:
                    st = inbound[ch]
                    st.kind = _CONTENT_DELIVER
                    st.tag = unpack_u64(buf, p + 5 + buf[p + 4])[0]
                    st.want_ts = self.measure_latency
                elif cm in (_BASIC_ACK, _BASIC_NACK) and ch == self.confirm_channel:
                    tag = unpack_u64(buf, p + 4)[0]
                    if cm == _BASIC_NACK:
                        self.confirms.nacked += 1
                    self.confirms.settle(tag, bool(buf[p + 12] & 1))
                    sent = self.sent_batches
                    if sent:
                        now_ns = time.monotonic_ns()
                        upto = self.confirms.upto
                        while sent and sent[0][0] <= upto:
                            _, size, at = sent.popleft()
                            if self.recording:
                                self.latencies_ns.extend([now_ns - at] * size)
                                self.sent_ns.extend([at] * size)
                    waiter = self._confirm_waiter
                    if waiter is not None and self.confirms.settled >= self._confirm_target:
                        self._confirm_waiter = None
                        if not waiter.done():
                            waiter.set_result(None)
                else:
                    self._slow_frame(bytes(buf[pos : end + 1]), out)
            elif ftype == FRAME_HEADER:
                st = inbound[ch]
                st.remaining = unpack_u64(buf, p + 4)[0]
                if st.remaining == 0:
                    self._complete(ch, st, out)
            elif ftype == FRAME_HEARTBEAT:
                self.heartbeats += 1
                out += _HEARTBEAT_FRAME
            pos = end + 1
        if pos:
            del buf[:pos]
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    # -- hot-path helpers -------------------------------------------------------------------
    def _complete(self, ch: int, st: _Inbound, out: bytearray) -> None:
        if st.kind != _CONTENT_DELIVER:
            self.returned += 1
            return
        self.delivered += 1
        if self.no_ack:
            return
        if self.ack_every == 1:
            out += _ACK.pack(FRAME_METHOD, ch, _ACK_PAYLOAD_SIZE, 60, 80, st.tag, 0, FRAME_END)
            return
        st.since_ack += 1
        if st.since_ack >= self.ack_every:
            st.since_ack = 0
            out += _ACK.pack(FRAME_METHOD, ch, _ACK_PAYLOAD_SIZE, 60, 80, st.tag, 1, FRAME_END)

    # -- everything else, through pamqp --------------------------------------------------------
    def _slow_frame(self, raw: bytes, out: bytearray) -> None:
        _, ch, value = frame.unmarshal(raw)
        if isinstance(value, commands.Basic.GetOk | commands.Basic.Return):
            self._inbound.setdefault(ch, _Inbound()).kind = _CONTENT_OTHER
            if isinstance(value, commands.Basic.GetOk):
                self._deliver_to_inbox(ch, value)
            return
        if isinstance(value, commands.Basic.Deliver):  # reached only if parsed elsewhere
            st = self._inbound.setdefault(ch, _Inbound())
            st.kind, st.tag = _CONTENT_DELIVER, value.delivery_tag or 0
            return
        if isinstance(value, commands.Connection.Blocked):
            log.info("connection.blocked: %s", value.reason)
            self.blocked = True
            self._unblocked.clear()
            return
        if isinstance(value, commands.Connection.Unblocked):
            log.info("connection.unblocked")
            self.blocked = False
            self._unblocked.set()
            return
        if isinstance(value, commands.Channel.Close):
            out += frame.marshal(commands.Channel.CloseOk(), ch)
            err = AmqpError(value.reply_code or 0, value.reply_text)
            log.warning("channel %d closed by broker: %s", ch, err)
            self._deliver_to_inbox(ch, err)
            return
        if isinstance(value, commands.Connection.Close):
            err = AmqpError(value.reply_code or 0, value.reply_text)
            log.warning("connection closed by broker: %s", err)
            if self.transport is not None:
                self.transport.write(bytes(out) + frame.marshal(commands.Connection.CloseOk(), 0))
                out.clear()
            self._fail(err)
            return
        if isinstance(value, commands.Basic.Cancel):
            log.warning("consumer %s cancelled by broker", value.consumer_tag)
            return
        self._deliver_to_inbox(ch, value)

    def _deliver_to_inbox(self, ch: int, value: Any) -> None:
        self._inbox.setdefault(ch, deque()).append(value)
        fut = self._waiters.get(ch)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail(self, err: AmqpError) -> None:
        self.error = err
        if self.transport is not None:
            self.transport.close()

    # -- used by Client ----------------------------------------------------------------------
    def open_inbound(self, ch: int) -> None:
        self._inbound[ch] = _Inbound()

    async def next_frame(self, ch: int, limit_s: float = RPC_TIMEOUT_S) -> Any:
        """The next frame for channel `ch` that the hot path did not consume."""
        inbox = self._inbox.setdefault(ch, deque())
        deadline = asyncio.get_running_loop().time() + limit_s
        while not inbox:
            if self.closed.done():
                raise self.error or AmqpError(0, "socket closed")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters[ch] = fut
            try:
                async with asyncio.timeout_at(deadline):
                    await fut
            finally:
                self._waiters.pop(ch, None)
        value = inbox.popleft()
        if isinstance(value, AmqpError):
            raise value
        return value

    async def writable(self) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        while self._paused and not self.closed.done():
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume

    async def unblocked(self) -> None:
        await self._unblocked.wait()

    async def confirms_reach(self, target: int) -> None:
        """Wait until at least `target` publishes are confirmed (acked or nacked)."""
        if self.confirms.settled >= target or self.closed.done():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm_target = target
        self._confirm_waiter = fut
        await fut


class Client:
    """One AMQP connection: handshake, a few synchronous methods, raw writes."""

    def __init__(self, proto: ClientProtocol) -> None:
        self.proto = proto
        self.frame_max = CLIENT_FRAME_MAX

    @classmethod
    async def connect(
        cls,
        ep: Endpoint,
        *,
        ack_every: int = 1,
        no_ack: bool = False,
        measure_latency: bool = False,
        limit_s: float = CONNECT_TIMEOUT_S,
    ) -> Client:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit_s):
            _, proto = await loop.create_connection(
                lambda: ClientProtocol(
                    ack_every=ack_every, no_ack=no_ack, measure_latency=measure_latency
                ),
                ep.host,
                ep.port,
            )
            client = cls(proto)
            try:
                await client._handshake(ep)
            except BaseException:
                client.abort()
                raise
        return client

    async def _handshake(self, ep: Endpoint) -> None:
        self.write(PROTOCOL_HEADER)
        start = await self.proto.next_frame(0)
        if not isinstance(start, commands.Connection.Start):
            raise AmqpError(0, f"expected connection.start, got {start!r}")
        response = f"\0{ep.user}\0{ep.password}"
        self.write(
            frame.marshal(
                commands.Connection.StartOk(
                    client_properties=CLIENT_PROPERTIES, mechanism="PLAIN", response=response
                ),
                0,
            )
        )
        tune = await self.proto.next_frame(0)
        if not isinstance(tune, commands.Connection.Tune):
            raise AmqpError(0, f"expected connection.tune, got {tune!r}")
        server_max = tune.frame_max or CLIENT_FRAME_MAX
        self.frame_max = min(server_max, CLIENT_FRAME_MAX)
        self.write(
            frame.marshal(
                commands.Connection.TuneOk(
                    channel_max=tune.channel_max, frame_max=self.frame_max, heartbeat=0
                ),
                0,
            )
            + frame.marshal(commands.Connection.Open(virtual_host=ep.vhost), 0)
        )
        await self.expect(0, commands.Connection.OpenOk)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.proto.transport
        if transport is None or transport.is_closing():
            raise self.proto.error or AmqpError(0, "socket closed")
        transport.write(data)

    async def expect(self, ch: int, kind: type[Any]) -> Any:
        value = await self.proto.next_frame(ch)
        if not isinstance(value, kind):
            raise AmqpError(0, f"expected {kind.__name__}, got {value!r}")
        return value

    async def rpc(self, ch: int, method: Any, reply: type[Any]) -> Any:
        self.write(frame.marshal(method, ch))
        return await self.expect(ch, reply)

    async def open_channel(self, ch: int) -> None:
        self.proto.open_inbound(ch)
        await self.rpc(ch, commands.Channel.Open(), commands.Channel.OpenOk)

    async def qos(self, ch: int, prefetch: int) -> None:
        await self.rpc(ch, commands.Basic.Qos(prefetch_count=prefetch), commands.Basic.QosOk)

    async def declare_queue(self, ch: int, name: str, **kwargs: Any) -> Any:
        return await self.rpc(
            ch, commands.Queue.Declare(queue=name, **kwargs), commands.Queue.DeclareOk
        )

    async def delete_queue(self, ch: int, name: str) -> None:
        await self.rpc(ch, commands.Queue.Delete(queue=name), commands.Queue.DeleteOk)

    async def declare_exchange(self, ch: int, name: str, kind: str) -> None:
        await self.rpc(
            ch,
            commands.Exchange.Declare(exchange=name, exchange_type=kind),
            commands.Exchange.DeclareOk,
        )

    async def delete_exchange(self, ch: int, name: str) -> None:
        await self.rpc(ch, commands.Exchange.Delete(exchange=name), commands.Exchange.DeleteOk)

    async def bind(self, ch: int, queue: str, exchange: str, routing_key: str = "") -> None:
        await self.rpc(
            ch,
            commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key),
            commands.Queue.BindOk,
        )

    async def consume(self, ch: int, queue: str, *, no_ack: bool = False) -> str:
        ok = await self.rpc(
            ch, commands.Basic.Consume(queue=queue, no_ack=no_ack), commands.Basic.ConsumeOk
        )
        return str(ok.consumer_tag)

    async def confirm_select(self, ch: int) -> None:
        await self.rpc(ch, commands.Confirm.Select(), commands.Confirm.SelectOk)
        self.proto.confirm_channel = ch

    async def close(self, limit_s: float = CLOSE_TIMEOUT_S) -> None:
        """connection.close, wait for close-ok, close the socket (abort on any trouble)."""
        try:
            self.write(
                frame.marshal(
                    commands.Connection.Close(
                        reply_code=200, reply_text="Goodbye", class_id=0, method_id=0
                    ),
                    0,
                )
            )
            async with asyncio.timeout(limit_s):
                await self.expect(0, commands.Connection.CloseOk)
        except (AmqpError, TimeoutError, OSError):
            self.abort()
            return
        if self.proto.transport is not None:
            self.proto.transport.close()

    def abort(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.abort()


# ---------------------------------------------------------------------------------------------
# Pre-encoded publishes


def encode_publish(
    ch: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    persistent: bool = False,
    frame_max: int = CLIENT_FRAME_MAX,
) -> bytes:
    """method + content header + body frame(s) of one basic.publish."""
    props = commands.Basic.Properties(delivery_mode=2 if persistent else 1)
    parts = [
        frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key), ch),
        frame.marshal(pheader.ContentHeader(0, len(body), props), ch),
    ]
    chunk = frame_max - 8
    for i in range(0, len(body), chunk):
        parts.append(frame.marshal(pbody.ContentBody(body[i : i + chunk]), ch))
    return b"".join(parts)


class TimestampedPublish:
    """A publish whose body starts with `time.monotonic_ns()`; everything else pre-encoded."""

    def __init__(
        self, ch: int, exchange: str, routing_key: str, body_size: int, *, persistent: bool
    ) -> None:
        if body_size < 8:
            raise ValueError("a timestamped body needs at least 8 bytes")
        props = commands.Basic.Properties(delivery_mode=2 if persistent else 1)
        self._prefix = (
            frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key), ch)
            + frame.marshal(pheader.ContentHeader(0, body_size, props), ch)
            + _FRAME_HDR.pack(FRAME_BODY, ch, body_size)
        )
        self._suffix = b"\x00" * (body_size - 8) + bytes([FRAME_END])

    def encode(self, count: int) -> bytes:
        stamp = _U64.pack(time.monotonic_ns())
        one = self._prefix + stamp + self._suffix
        return one * count


# ---------------------------------------------------------------------------------------------
# Worker roles


@dataclass(frozen=True, slots=True)
class ConsumeSpec:
    """One connection with one channel per queue name in `queues`."""

    endpoint: Endpoint
    queues: tuple[str, ...]
    prefetch: int = 100
    ack_every: int = 1
    no_ack: bool = False
    measure_latency: bool = False
    channels_per_connection: int = 1


@dataclass(frozen=True, slots=True)
class PublishSpec:
    endpoint: Endpoint
    exchange: str
    routing_key: str
    body_size: int = 100
    persistent: bool = False
    rate: float = 0.0  # messages per second; 0 = as fast as the broker takes them
    confirm_window: int = 0  # 0 = no confirms
    batch: int = 64
    # With confirms: each publish's confirm latency (send of its batch -> its confirm),
    # for publishes confirmed inside the window, in WorkerResult.latencies_ns.
    measure_confirms: bool = False


@dataclass(frozen=True, slots=True)
class ChurnSpec:
    """`concurrency` loops of: connect, handshake, channel.open, connection.close."""

    endpoint: Endpoint
    concurrency: int = 1


WorkerSpec = ConsumeSpec | PublishSpec | ChurnSpec


@dataclass(frozen=True, slots=True)
class WorkerResult:
    role: str
    count: int  # delivered / published / connections completed, inside the window
    window_s: float
    cpu_s: float  # this process's user+system CPU inside the window
    confirmed: int = 0
    errors: int = 0
    blocked: bool = False
    latencies_ns: tuple[int, ...] = field(default=())
    sent_ns: tuple[int, ...] = field(default=())  # when each latency started (monotonic_ns)
    note: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.window_s if self.window_s > 0 else 0.0

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_s / self.window_s if self.window_s > 0 else 0.0


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Window:
    """Counter snapshots at the start and the end of the measurement window."""

    def __init__(self) -> None:
        self.t0 = self.t1 = 0.0
        self.cpu0 = self.cpu1 = 0.0

    def start(self) -> None:
        self.t0, self.cpu0 = time.monotonic(), _cpu_seconds()

    def stop(self) -> None:
        self.t1, self.cpu1 = time.monotonic(), _cpu_seconds()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    @property
    def cpu(self) -> float:
        return self.cpu1 - self.cpu0


class Consumer:
    def __init__(self, spec: ConsumeSpec) -> None:
        self.spec = spec
        self.clients: list[Client] = []

    async def setup(self) -> None:
        s = self.spec
        per = max(1, s.channels_per_connection)
        for i in range(0, len(s.queues), per):
            client = await Client.connect(
                s.endpoint,
                ack_every=s.ack_every,
                no_ack=s.no_ack,
                measure_latency=s.measure_latency,
            )
            self.clients.append(client)
            for ch, queue in enumerate(s.queues[i : i + per], start=1):
                await client.open_channel(ch)
                await client.qos(ch, s.prefetch)
                await client.consume(ch, queue, no_ack=s.no_ack)

    async def run(self, t_start: float, t_end: float) -> WorkerResult:
        await _sleep_until(t_start)
        win = _Window()
        for c in self.clients:
            c.proto.recording = True
        d0 = sum(c.proto.delivered for c in self.clients)
        win.start()
        await _sleep_until(t_end)
        win.stop()
        d1 = sum(c.proto.delivered for c in self.clients)
        lat: list[int] = []
        sent: list[int] = []
        for c in self.clients:
            c.proto.recording = False
            lat.extend(c.proto.latencies_ns)
            sent.extend(c.proto.sent_ns)
        errors = [str(c.proto.error) for c in self.clients if c.proto.closed.done()]
        await asyncio.gather(*(c.close() for c in self.clients))
        return WorkerResult(
            role="consumer",
            count=d1 - d0,
            window_s=win.seconds,
            cpu_s=win.cpu,
            errors=len(errors),
            latencies_ns=tuple(lat),
            sent_ns=tuple(sent),
            note="; ".join(errors),
        )


class Producer:
    CHANNEL = 1

    def __init__(self, spec: PublishSpec) -> None:
        self.spec = spec
        self.client: Client | None = None
        self.published = 0
        self.was_blocked = False

    async def setup(self) -> None:
        self.client = await Client.connect(self.spec.endpoint)
        await self.client.open_channel(self.CHANNEL)
        if self.spec.confirm_window:
            await self.client.confirm_select(self.CHANNEL)

    async def run(self, t_start: float, t_end: float) -> WorkerResult:
        assert self.client is not None
        win = _Window()
        marks: dict[str, int] = {}

        def mark(name: str) -> None:
            marks[name] = self.published
            marks[name + "_confirmed"] = self.client.proto.confirms.settled if self.client else 0

        def open_window() -> None:
            win.start()
            mark("start")
            if self.client is not None:
                self.client.proto.recording = True

        def close_window() -> None:
            win.stop()
            mark("end")
            if self.client is not None:
                self.client.proto.recording = False

        loop = asyncio.get_running_loop()
        h0 = loop.call_at(t_start, open_window)
        h1 = loop.call_at(t_end, close_window)
        note = ""
        try:
            if self.spec.rate > 0:
                await self._publish_at_rate(t_end)
            else:
                await self._publish_flat_out(t_end)
        except AmqpError as exc:
            note = str(exc)
            log.warning("producer stopped: %s", exc)
        finally:
            h0.cancel()
            h1.cancel()
        if "start" not in marks:
            win.start()
            mark("start")
        if "end" not in marks:
            win.stop()
            mark("end")
        await self.client.close()
        return WorkerResult(
            role="producer",
            count=marks["end"] - marks["start"],
            window_s=win.seconds,
            cpu_s=win.cpu,
            confirmed=marks["end_confirmed"] - marks["start_confirmed"],
            errors=1 if note else 0,
            blocked=self.was_blocked,
            latencies_ns=tuple(self.client.proto.latencies_ns),
            sent_ns=tuple(self.client.proto.sent_ns),
            note=note,
        )

    async def _wait_turn(self, extra: int) -> None:
        """Backpressure: TCP, connection.blocked, then the confirm window."""
        assert self.client is not None
        proto = self.client.proto
        if proto.closed.done():
            raise proto.error or AmqpError(0, "socket closed")
        if proto.blocked:
            self.was_blocked = True
            await proto.unblocked()
        await proto.writable()
        window = self.spec.confirm_window
        if window:
            await proto.confirms_reach(self.published + extra - window)

    async def _publish_flat_out(self, t_end: float) -> None:
        assert self.client is not None
        s = self.spec
        one = encode_publish(
            self.CHANNEL,
            s.exchange,
            s.routing_key,
            b"x" * s.body_size,
            persistent=s.persistent,
            frame_max=self.client.frame_max,
        )
        batch = max(1, min(s.batch, s.confirm_window or s.batch))
        payload = one * batch
        loop = asyncio.get_running_loop()
        write = self.client.write
        sent = None
        if s.measure_confirms and s.confirm_window:
            sent = self.client.proto.sent_batches = deque()
        while loop.time() < t_end:
            await self._wait_turn(batch)
            write(payload)
            self.published += batch
            if sent is not None:
                sent.append((self.published, batch, time.monotonic_ns()))
            await asyncio.sleep(0)

    async def _publish_at_rate(self, t_end: float) -> None:
        assert self.client is not None
        s = self.spec
        enc = TimestampedPublish(
            self.CHANNEL, s.exchange, s.routing_key, s.body_size, persistent=s.persistent
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            now = loop.time()
            if now >= t_end:
                return
            due = int((now - t0) * s.rate) - self.published
            if due > 0:
                await self._wait_turn(due)
                self.client.write(enc.encode(due))
                self.published += due
            await asyncio.sleep(0.001)


class Churner:
    def __init__(self, spec: ChurnSpec) -> None:
        self.spec = spec
        self.errors = 0
        self.last_error = ""

    async def setup(self) -> None:
        c = await Client.connect(self.spec.endpoint)  # fail fast if the broker is not there
        await c.close()

    async def _loop(self, t_start: float, t_end: float, counts: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < t_end:
            try:
                client = await Client.connect(self.spec.endpoint)
                await client.open_channel(1)
                await client.close()
            except (OSError, AmqpError, TimeoutError) as exc:
                self.errors += 1
                self.last_error = repr(exc)
                await asyncio.sleep(0.01)
                continue
            if t_start <= loop.time() <= t_end:
                counts[0] += 1

    async def run(self, t_start: float, t_end: float) -> WorkerResult:
        counts = [0]
        win = _Window()
        loop = asyncio.get_running_loop()
        h0 = loop.call_at(t_start, win.start)
        h1 = loop.call_at(t_end, win.stop)
        await asyncio.gather(
            *(self._loop(t_start, t_end, counts) for _ in range(self.spec.concurrency))
        )
        h0.cancel()
        h1.cancel()
        if win.t1 == 0.0:
            win.stop()
        return WorkerResult(
            role="churn",
            count=counts[0],
            window_s=win.seconds,
            cpu_s=win.cpu,
            errors=self.errors,
            note=self.last_error,
        )


def _make_role(spec: WorkerSpec) -> Consumer | Producer | Churner:
    if isinstance(spec, ConsumeSpec):
        return Consumer(spec)
    if isinstance(spec, PublishSpec):
        return Producer(spec)
    return Churner(spec)


def install_event_loop_policy() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _worker(spec: WorkerSpec, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    role = _make_role(spec)
    await role.setup()
    pipe.send(("ready",))
    msg = await loop.run_in_executor(None, pipe.recv)
    if msg[0] != "go":
        return
    _, t_start, t_end = msg
    result = await role.run(t_start, t_end)
    pipe.send(("result", result))


def run_worker(spec: WorkerSpec, pipe: Connection) -> None:
    """Entry point of a worker process (multiprocessing target).

    The driver ends workers itself (SIGTERM after the run), so a terminal's Ctrl-C, which
    reaches the whole process group, is ignored here.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    install_event_loop_policy()
    try:
        asyncio.run(_worker(spec, pipe))
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", traceback.format_exc()))
        raise
    finally:
        pipe.close()


# ---------------------------------------------------------------------------------------------
# Helpers the driver runs in its own process (setup, teardown, many declares)


async def with_client(ep: Endpoint, channels: int = 1) -> Client:
    client = await Client.connect(ep)
    for ch in range(1, channels + 1):
        await client.open_channel(ch)
    return client


async def setup_topology(
    ep: Endpoint,
    queues: Sequence[str],
    exchange: tuple[str, str] | None = None,
    bindings: Sequence[tuple[str, str, str]] = (),
) -> None:
    """Declare non-durable queues, an optional (name, type) exchange and bindings."""
    client = await with_client(ep)
    try:
        for q in queues:
            await client.declare_queue(1, q)
        if exchange is not None:
            await client.declare_exchange(1, *exchange)
        for queue, ex, key in bindings:
            await client.bind(1, queue, ex, key)
    finally:
        await client.close()


async def teardown_topology(
    ep: Endpoint, queues: Sequence[str], exchange: str | None = None
) -> None:
    client = await with_client(ep)
    try:
        for q in queues:
            await client.delete_queue(1, q)
        if exchange is not None:
            await client.delete_exchange(1, exchange)
    finally:
        await client.close()


async def run_on_channels(
    client: Client, channels: int, names: Sequence[str], delete: bool = False
) -> float:
    """Declare (or delete) every queue in `names`, one outstanding request per channel.

    Returns the elapsed seconds.
    """
    t0 = time.monotonic()

    async def one(ch: int) -> None:
        for name in names[ch - 1 :: channels]:
            if delete:
                await client.delete_queue(ch, name)
            else:
                await client.declare_queue(ch, name)

    await asyncio.gather(*(one(ch) for ch in range(1, channels + 1)))
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# Self-test: the generator's own capacity, without any broker


def _synthetic_deliveries(count: int, body_size: int) -> bytes:
    one_parts = []
    for tag in range(1, count + 1):
        one_parts.append(
            frame.marshal(
                commands.Basic.Deliver(
                    consumer_tag="amq.ctag-bench", delivery_tag=tag, exchange="", routing_key="q"
                ),
                1,
            )
        )
        one_parts.append(
            frame.marshal(
                pheader.ContentHeader(0, body_size, commands.Basic.Properties(delivery_mode=1)),
                1,
            )
        )
        one_parts.append(frame.marshal(pbody.ContentBody(b"x" * body_size), 1))
    return b"".join(one_parts)


class _NullTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None


async def consumer_capacity(messages: int = 200_000, body_size: int = 100) -> float:
    """Deliveries per second the consumer hot path parses and acks (one core, no broker)."""
    stream = _synthetic_deliveries(messages, body_size)
    proto = ClientProtocol(ack_every=1)
    proto.connection_made(_NullTransport())
    proto.open_inbound(1)
    chunk = 65536
    t0 = time.perf_counter()
    for i in range(0, len(stream), chunk):
        proto.data_received(stream[i : i + chunk])
    elapsed = time.perf_counter() - t0
    assert proto.delivered == messages, (proto.delivered, messages)
    return messages / elapsed


def _sink(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(1 << 20):
            pass


async def producer_capacity(seconds: float = 2.0, body_size: int = 100) -> float:
    """Publishes per second the producer hot path writes into a socket drained by another
    process (one core, no broker)."""
    import multiprocessing

    a, b = socket.socketpair()
    ctx = multiprocessing.get_context("fork")
    sink = ctx.Process(target=_sink, args=(b,), daemon=True)
    sink.start()
    b.close()
    try:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: ClientProtocol(), sock=a)
        client = Client(proto)
        producer = Producer(PublishSpec(Endpoint("", 0), "", "q", body_size=body_size))
        producer.client = client
        t_end = loop.time() + seconds
        await producer._publish_flat_out(t_end)
        rate = producer.published / seconds
        client.abort()
        return rate
    finally:
        sink.terminate()
        sink.join(5)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kind = install_event_loop_policy()
    c = asyncio.run(consumer_capacity())
    p = asyncio.run(producer_capacity())
    log.info("event loop=%s consumer_capacity=%.0f msg/s producer_capacity=%.0f msg/s", kind, c, p)


if __name__ == "__main__":
    main()
