"""The node link: authenticated, framed, ordered byte messages between broker nodes.

Each node dials every peer it knows (one OUTBOUND connection per peer) and accepts the
peers' connections (INBOUND). Node X sends to node Y only on X's outbound connection to
Y, so X's messages reach Y in the order X sent them (per-pair FIFO). Inbound connections
carry nothing from the acceptor but heartbeats. Payloads are opaque `bytes`: encoding is
someone else's job.

Rules of this module:

- anyio only (asyncio backend, with or without uvloop); no threads. Every callback
  (`on_message`, `on_peer_up`, `on_peer_down`) runs on the event loop, synchronously; an
  exception in one is logged (`link.handler_failed`) and swallowed.
- Wire format: every frame is a u32 big-endian length and that many bytes. A zero-length
  frame is a heartbeat, never delivered; so an empty payload cannot be sent.
- Handshake, before any data (the dialer D, the acceptor A), each message one frame:
  both send HELLO = MAGIC, version byte, role byte, 32-byte random nonce, name (UTF-8);
  D sends PROOF_D; A checks it, then answers PROOF_A (or REJECT and closes); D checks
  PROOF_A. A proof is HMAC-SHA256(secret, label of the role, HELLO_D, HELLO_A): it covers
  both nonces and both names, and the per-role label stops a proof being reflected.
  The acceptor proves nothing to a dialer that has not proved itself first, so probing
  a node's port yields nothing to attack the secret with offline. Digests are compared
  with `hmac.compare_digest`. Every version keeps MAGIC and the version byte first, so
  any two versions can tell each other apart (`link.version_mismatch`).
- Liveness: each side writes a heartbeat on each connection (outbound and inbound) when
  it wrote nothing for `heartbeat_s`; a connection on which nothing arrived for
  `dead_after_s` is closed as dead. That detects partitions where packets are silently
  dropped and no socket is ever closed. Silence this node did not listen to is no
  verdict: when its own watch woke STOOD_STILL_S or more past its deadline (the process
  was stopped, its VM paused, its loop blocked), the peer gets another `dead_after_s`,
  and what it sent meanwhile is read first.
- One writer task per connection drains a deque filled by `send` (which never awaits).
  That deque is the only buffer: the caller watches `buffered_bytes` for backpressure.
  A connection that is lost drops what it had queued ("peer down" means "messages may
  be lost"); `on_peer_down` is called only for a peer whose `on_peer_up` was called.
- Refused, reset, closed and silent connections are normal events: one info line, then
  a retry with backoff. Tracebacks are logged only for our own bugs.
- No module-level mutable state: several links live in one process in the tests.
- Never imports the broker, the AMQP protocol, pysyncobj or a codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from node.direct_io import DirectReader, DirectWriter
from node.logs import EventLogger

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"WRNL"

# A forwarded publish carries a whole message body, up to the broker's max_message_size
# (128 MiB, RabbitMQ 3.x's default, see node/protocol/constants.py), plus its envelope
# (routing key, raw properties, ids). 1 MiB of headroom covers the envelope; anything
# larger is a bug or an attack, and the receiver must not buffer it.
MAX_FRAME: Final = 128 * 2**20 + 2**20
# Before authentication a peer gets no more than the handshake needs.
HANDSHAKE_MAX_FRAME: Final = 1024
# A write batch stops growing at this size: beyond it, joining only adds copying.
BATCH_BYTES: Final = 1 << 20
RECEIVE_BYTES: Final = 256 * 1024
# Longest pause of an inbound connection's reading per turn while the receiving node is
# backlogged (hold_reading): bounded, so a node that feeds itself cannot deadlock.
HOLD_READING_S: Final = 0.05
HOLD_POLL_S: Final = 0.001
BACKOFF_MIN_S: Final = 0.1
# A silence watch that wakes this much past its deadline says this node stood still.
STOOD_STILL_S: Final = 1.0
BACKOFF_MAX_S: Final = 1.0
NONCE_BYTES: Final = 32
MAX_NAME_BYTES: Final = 255

_LEN: Final = struct.Struct(">I")
_HELLO: Final = struct.Struct(">4sBB32s")  # magic, version, role, nonce; then the name
_HEARTBEAT: Final = _LEN.pack(0)

_ROLE_DIALER: Final = 1
_ROLE_ACCEPTOR: Final = 2
_DIALER_LABEL: Final = b"warren-link dialer"
_ACCEPTOR_LABEL: Final = b"warren-link acceptor"
_PROOF_BYTES: Final = hashlib.sha256().digest_size
_KIND_PROOF: Final = b"P"
_KIND_REJECT: Final = b"R"
_REJECT_AUTH: Final = 1  # the dialer's proof was wrong
_REJECT_PROTOCOL: Final = 2  # anything else

# What a socket may raise when the other end goes away; TimeoutError is an OSError.
_NET_ERRORS: Final = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


# ---- framing (sans-I/O) ----------------------------------------------------------------


class FrameTooLarge(Exception):
    """The remote end announced a frame longer than our limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


def encode_frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


class FrameDecoder:
    """Bytes in, whole frame payloads out (b"" for a heartbeat). No I/O.

    A header announcing more than `max_frame` bytes is fatal: `feed` returns the frames
    before it, sets `error`, and every later call raises it (at once if no frame came
    before it), so the caller delivers what arrived intact and then closes.
    """

    __slots__ = ("_buf", "error", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self.error: FrameTooLarge | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Append `data`; return the frames it completed, in order."""
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        end_of_buf = len(buf)
        with memoryview(buf) as view:
            while end_of_buf - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > self.max_frame:
                    self.error = FrameTooLarge(size, self.max_frame)
                    break
                end = pos + 4 + size
                if end > end_of_buf:
                    break
                out.append(view[pos + 4 : end].tobytes())
                pos = end
        if pos:
            del buf[:pos]
        if self.error is not None and not out:
            raise self.error
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


# ---- handshake messages (sans-I/O) -----------------------------------------------------


class HandshakeError(Exception):
    """The handshake failed; `event` is the log event naming the kind of failure."""

    def __init__(self, event: str, reason: str, peer: str = "") -> None:
        super().__init__(reason)
        self.event = event
        self.reason = reason
        self.peer = peer


@dataclass(frozen=True, slots=True)
class Hello:
    role: int
    nonce: bytes
    name: str


def encode_hello(role: int, nonce: bytes, name: str) -> bytes:
    return _HELLO.pack(MAGIC, PROTOCOL_VERSION, role, nonce) + name.encode()


def parse_hello(frame: bytes, expect_role: int) -> Hello:
    if frame[:4] != MAGIC or len(frame) < 5:
        raise HandshakeError("link.handshake_failed", "not a warren node link peer")
    if frame[4] != PROTOCOL_VERSION:
        raise HandshakeError(
            "link.version_mismatch",
            f"peer speaks link protocol version {frame[4]}, this node {PROTOCOL_VERSION}",
        )
    if len(frame) <= _HELLO.size or len(frame) > _HELLO.size + MAX_NAME_BYTES:
        raise HandshakeError("link.handshake_failed", "malformed hello")
    _, _, role, nonce = _HELLO.unpack_from(frame)
    try:
        name = frame[_HELLO.size :].decode()
    except UnicodeDecodeError:
        raise HandshakeError("link.handshake_failed", "node name is not UTF-8") from None
    if role != expect_role:
        raise HandshakeError("link.handshake_failed", f"unexpected role {role}", peer=name)
    return Hello(role=role, nonce=nonce, name=name)


def compute_proof(key: bytes, role: int, dialer_hello: bytes, acceptor_hello: bytes) -> bytes:
    """What the side in `role` sends to prove it knows the secret; the hellos hold both
    nonces and both names."""
    mac = hmac.new(key, _DIALER_LABEL if role == _ROLE_DIALER else _ACCEPTOR_LABEL, hashlib.sha256)
    mac.update(_LEN.pack(len(dialer_hello)) + dialer_hello)
    mac.update(_LEN.pack(len(acceptor_hello)) + acceptor_hello)
    return mac.digest()


def _reject(code: int, reason: str) -> bytes:
    return encode_frame(_KIND_REJECT + bytes([code]) + reason.encode()[:200])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, anyio.EndOfStream):
        return "closed by peer"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, anyio.BrokenResourceError):
        cause = exc.__cause__
        return f"broken: {_describe(cause)}" if cause is not None else "broken"
    if isinstance(exc, anyio.ClosedResourceError):
        return "closed locally"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _remote(stream: anyio.abc.SocketStream) -> str:
    try:
        addr = stream.extra(SocketAttribute.remote_address)
    except (anyio.TypedAttributeLookupError, OSError):
        return "?"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


# ---- connection state ------------------------------------------------------------------


class _Reader:
    """One frame at a time for the handshake; whatever came after it stays in `pending`."""

    __slots__ = ("decoder", "pending", "stream")

    def __init__(self, stream: anyio.abc.SocketStream, max_frame: int) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)
        self.pending: deque[bytes] = deque()

    async def frame(self) -> bytes:
        while not self.pending:
            self.pending.extend(self.decoder.feed(await self.stream.receive(RECEIVE_BYTES)))
        return self.pending.popleft()


class _Conn:
    """One authenticated connection: outbound (we send data) or inbound (we receive)."""

    __slots__ = (
        "closed",
        "direct",
        "flush_due",
        "in_flight",
        "last_write",
        "outbound",
        "peer",
        "queue",
        "queued",
        "remote",
        "scope",
        "sending",
        "wake",
    )

    def __init__(self, peer: str, outbound: bool, remote: str, direct: DirectWriter) -> None:
        self.peer = peer
        self.outbound = outbound
        self.remote = remote
        self.queue: deque[bytes] = deque()
        self.queued = 0  # bytes in `queue`, framing included
        self.in_flight = 0  # bytes handed to the socket, not yet accepted by the kernel
        self.wake = anyio.Event()
        self.closed = False
        self.scope = anyio.CancelScope()
        # Writes skip the writer task when they can (node/direct_io.py): `flush_due`
        # while a flush is scheduled for this event-loop turn, `sending` while the
        # writer task is inside `send` (then it writes what is queued, in order).
        self.direct = direct
        self.flush_due = False
        self.sending = False
        self.last_write = time.monotonic()


def _take_batch(conn: _Conn) -> tuple[list[bytes], int, int]:
    """Frame queued payloads for one write: (parts, bytes with framing, frame count). A
    payload that would push the batch past BATCH_BYTES waits for the next batch, unless
    it is alone: then it is written without a join."""
    queue = conn.queue
    parts: list[bytes] = []
    size = frames = 0
    while queue and (not parts or size + 4 + len(queue[0]) <= BATCH_BYTES):
        payload = queue.popleft()
        parts.append(_LEN.pack(len(payload)))
        parts.append(payload)
        size += 4 + len(payload)
        frames += 1
    conn.queued -= size
    return parts, size, frames


class _Peer:
    __slots__ = ("address", "last_failure", "name", "scope")

    def __init__(self, name: str, address: tuple[str, int]) -> None:
        self.name = name
        self.address = address
        self.scope: anyio.CancelScope | None = None  # its dialer, while serving
        self.last_failure: tuple[str, str] | None = None


# ---- the link --------------------------------------------------------------------------


class NodeLink:
    """This node's end of the node links: one listener, one dialer per peer."""

    def __init__(
        self,
        *,
        name: str,
        host: str,
        port: int,
        secret: str,
        log: EventLogger,
        on_message: Callable[[str, bytes], None],
        on_peer_up: Callable[[str], None] | None = None,
        on_peer_down: Callable[[str], None] | None = None,
        heartbeat_s: float = 0.5,
        dead_after_s: float = 3.0,
        max_frame: int = MAX_FRAME,
        on_batch_end: Callable[[], None] | None = None,
        hold_reading: Callable[[], bool] | None = None,
    ) -> None:
        if not name or len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"node name must be 1 to {MAX_NAME_BYTES} UTF-8 bytes")
        if not host:
            raise ValueError("the link's bind address must be given explicitly")
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        if not 0 < heartbeat_s < dead_after_s:
            raise ValueError("need 0 < heartbeat_s < dead_after_s")
        self.name = name
        self._host = host
        self._port = port
        self._key = secret.encode()
        self._log = log
        self._on_message = on_message
        # Called after the messages of one socket read were handed over (the caller
        # flushes what they caused once per read, not once per message).
        self._on_batch_end = on_batch_end
        # While it answers True, inbound connections pause before their next read, for at
        # most HOLD_READING_S a turn: TCP backpressure then reaches the sending node.
        self._hold_reading = hold_reading
        self._on_peer_up = on_peer_up
        self._on_peer_down = on_peer_down
        self._heartbeat_s = heartbeat_s
        self._dead_after_s = dead_after_s
        self._max_frame = max_frame
        self._bound_port: int | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._peers: dict[str, _Peer] = {}
        self._up: dict[str, _Conn] = {}  # authenticated outbound connections
        self._inbound: dict[str, _Conn] = {}
        # Metrics: payload bytes and data frames (not heartbeats, not framing).
        self.messages_sent = 0
        self.bytes_sent = 0
        self.messages_received = 0
        self.bytes_received = 0

    # ---- public API --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port; valid once `serve` has started."""
        if self._bound_port is None:
            raise RuntimeError("the link is not listening yet")
        return self._bound_port

    def set_peer(self, name: str, address: tuple[str, int]) -> None:
        """Add a peer or change its address; it is dialed (forever, with backoff) while
        `serve` runs. Changing the address closes the current connection first."""
        if name == self.name:
            raise ValueError("a node is not its own peer")
        old = self._peers.get(name)
        if old is not None:
            if old.address == address:
                return
            self._drop_peer(old, "address changed")
        peer = _Peer(name, address)
        self._peers[name] = peer
        self._log.info("link.peer_set", peer=name, address=f"{address[0]}:{address[1]}")
        if self._tg is not None:
            self._start_dialer(peer)

    def remove_peer(self, name: str) -> None:
        """Stop dialing `name` and close its connections (on_peer_down if it was up)."""
        peer = self._peers.pop(name, None)
        if peer is not None:
            self._drop_peer(peer, "removed")
            self._log.info("link.peer_removed", peer=name)
        inbound = self._inbound.get(name)
        if inbound is not None:
            self._close(inbound, "peer removed")

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, dial every peer, run until cancelled; close everything on the way out."""
        if self._tg is not None:
            raise RuntimeError("this link is already serving")
        listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        async with listener:
            self._bound_port = listener.listeners[0].extra(SocketAttribute.local_port)
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    for each in listener.listeners:
                        assert isinstance(each, anyio.abc.SocketListener)
                        tg.start_soon(self._accept_loop, each)
                    for peer in self._peers.values():
                        self._start_dialer(peer)
                    self._log.info("link.listening", host=self._host, port=self._bound_port)
                    task_status.started()
                    await anyio.sleep_forever()
            finally:
                self._tg = None
                for peer in self._peers.values():
                    peer.scope = None

    def send(self, peer: str, payload: bytes) -> bool:
        """Queue `payload` for `peer`; False (dropped) when that peer is not up. Raises
        ValueError for an empty payload or one larger than the frame limit."""
        size = len(payload)
        if not 0 < size <= self._max_frame:
            raise ValueError(f"payload size {size} not in 1..{self._max_frame}")
        conn = self._up.get(peer)
        if conn is None:
            return False
        conn.queue.append(payload)
        conn.queued += 4 + size
        if not conn.direct.available:
            conn.wake.set()
        elif not conn.flush_due:
            # Whatever else is sent during this event-loop turn joins the same write.
            conn.flush_due = True
            asyncio.get_running_loop().call_soon(self._flush, conn)
        return True

    def _flush(self, conn: _Conn) -> None:
        """Write what `conn` has queued straight to its socket, or leave it to the writer
        task when that would bypass it: it is sending, the socket is backed up, or the
        queue is more than one batch."""
        conn.flush_due = False
        if conn.closed or not conn.queue:
            return
        if conn.sending or conn.queued > BATCH_BYTES or not conn.direct.ready:
            conn.wake.set()
            return
        parts, size, frames = _take_batch(conn)
        conn.direct.write(b"".join(parts))
        self._sent(conn, size, frames)

    def _sent(self, conn: _Conn, size: int, frames: int) -> None:
        self.messages_sent += frames
        self.bytes_sent += size - 4 * frames
        conn.last_write = time.monotonic()

    def is_up(self, peer: str) -> bool:
        """True while our outbound connection to `peer` is authenticated and alive."""
        return peer in self._up

    def up_peers(self) -> frozenset[str]:
        return frozenset(self._up)

    def buffered_bytes(self, peer: str) -> int:
        """Bytes queued for `peer` and not yet taken by the kernel (framing included)."""
        conn = self._up.get(peer)
        return 0 if conn is None else conn.queued + conn.in_flight + conn.direct.buffered()

    # ---- internals: lifecycle ----------------------------------------------------------

    def _start_dialer(self, peer: _Peer) -> None:
        assert self._tg is not None
        peer.scope = anyio.CancelScope()
        self._tg.start_soon(self._dial_loop, peer, peer.scope)

    def _drop_peer(self, peer: _Peer, reason: str) -> None:
        if peer.scope is not None:
            peer.scope.cancel()
            peer.scope = None
        conn = self._up.get(peer.name)
        if conn is not None:
            self._close(conn, reason)

    def _close(self, conn: _Conn, reason: str) -> None:
        """Mark `conn` dead (idempotent): drop its queue, stop its tasks, tell the caller."""
        if conn.closed:
            return
        conn.closed = True
        dropped = len(conn.queue)
        conn.queue.clear()
        conn.queued = 0
        conn.in_flight = 0
        conn.scope.cancel()
        if conn.outbound:
            if self._up.get(conn.peer) is conn:
                del self._up[conn.peer]
                self._log.info("link.peer_down", peer=conn.peer, reason=reason, dropped=dropped)
                if self._on_peer_down is not None:
                    self._call(self._on_peer_down, "on_peer_down", conn.peer)
        else:
            if self._inbound.get(conn.peer) is conn:
                del self._inbound[conn.peer]
            self._log.info("link.inbound_down", peer=conn.peer, remote=conn.remote, reason=reason)

    def _call(self, callback: Callable[[str], None], what: str, peer: str) -> None:
        try:
            callback(peer)
        except Exception:
            self._log.exception("link.handler_failed", peer=peer, callback=what)

    def _dial_failed(self, peer: _Peer, event: str, reason: str) -> None:
        """Log a failed attempt at info (auth: warning), a repeat of the same at debug."""
        address = f"{peer.address[0]}:{peer.address[1]}"
        if peer.last_failure == (event, reason):
            self._log.debug(event, peer=peer.name, address=address, reason=reason, repeat=True)
            return
        peer.last_failure = (event, reason)
        if event == "link.connect_failed":
            self._log.info(event, peer=peer.name, address=address, reason=reason)
        else:
            self._log.warning(event, peer=peer.name, address=address, reason=reason)

    # ---- internals: outbound -----------------------------------------------------------

    async def _dial_loop(self, peer: _Peer, scope: anyio.CancelScope) -> None:
        backoff = BACKOFF_MIN_S
        with scope:
            while True:
                try:
                    if await self._dial_once(peer):
                        backoff = BACKOFF_MIN_S
                except Exception:
                    self._log.exception("link.internal_error", peer=peer.name)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _dial_once(self, peer: _Peer) -> bool:
        """One connection's life; True if it got authenticated."""
        host, port = peer.address
        try:
            with anyio.fail_after(self._dead_after_s):
                stream = await anyio.connect_tcp(host, port)
        except _NET_ERRORS as exc:
            self._dial_failed(peer, "link.connect_failed", _describe(exc))
            return False
        async with stream:
            reader = _Reader(stream, HANDSHAKE_MAX_FRAME)
            try:
                with anyio.fail_after(self._dead_after_s):
                    await self._dialer_handshake(stream, reader, peer.name)
            except HandshakeError as exc:
                self._dial_failed(peer, exc.event, exc.reason)
                return False
            except FrameTooLarge as exc:
                self._dial_failed(peer, "link.handshake_failed", str(exc))
                return False
            except _NET_ERRORS as exc:
                self._dial_failed(peer, "link.handshake_failed", _describe(exc))
                return False
            if self._peers.get(peer.name) is not peer:
                return False  # removed or re-addressed while we were shaking hands
            reader.decoder.max_frame = self._max_frame
            peer.last_failure = None
            conn = _Conn(
                peer.name, outbound=True, remote=_remote(stream), direct=DirectWriter(stream)
            )
            self._up[peer.name] = conn
            self._log.info("link.peer_up", peer=peer.name, remote=conn.remote)
            if self._on_peer_up is not None:
                self._call(self._on_peer_up, "on_peer_up", peer.name)
            try:
                await self._pump(conn, stream, reader)
            finally:
                self._close(conn, "link stopped")
        return True

    async def _dialer_handshake(
        self, stream: anyio.abc.SocketStream, reader: _Reader, expected: str
    ) -> None:
        mine = encode_hello(_ROLE_DIALER, os.urandom(NONCE_BYTES), self.name)
        await stream.send(encode_frame(mine))
        theirs = await reader.frame()
        hello = parse_hello(theirs, expect_role=_ROLE_ACCEPTOR)
        if hello.name != expected:
            raise HandshakeError(
                "link.handshake_failed", f"the node at this address is {hello.name!r}"
            )
        proof = compute_proof(self._key, _ROLE_DIALER, mine, theirs)
        await stream.send(encode_frame(_KIND_PROOF + proof))
        answer = await reader.frame()
        kind = answer[:1]
        if kind == _KIND_REJECT and len(answer) >= 2:
            event = "link.auth_failed" if answer[1] == _REJECT_AUTH else "link.handshake_failed"
            text = answer[2:].decode(errors="replace")
            raise HandshakeError(event, f"rejected by peer: {text}")
        if kind != _KIND_PROOF or len(answer) != 1 + _PROOF_BYTES:
            raise HandshakeError("link.handshake_failed", "malformed proof")
        expect = compute_proof(self._key, _ROLE_ACCEPTOR, mine, theirs)
        if not hmac.compare_digest(answer[1:], expect):
            raise HandshakeError("link.auth_failed", "peer's proof is wrong (different secret?)")

    # ---- internals: inbound ------------------------------------------------------------

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
        assert self._tg is not None
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. out of file descriptors: wait, do not die
                self._log.warning("link.accept_failed", reason=_describe(exc))
                await anyio.sleep(BACKOFF_MIN_S)
                continue
            self._tg.start_soon(self._handle_inbound, stream)

    async def _handle_inbound(self, stream: anyio.abc.SocketStream) -> None:
        remote = _remote(stream)
        try:
            async with stream:
                reader = _Reader(stream, HANDSHAKE_MAX_FRAME)
                try:
                    with anyio.fail_after(self._dead_after_s):
                        name = await self._acceptor_handshake(stream, reader)
                except HandshakeError as exc:
                    log = (
                        self._log.info
                        if exc.event == "link.handshake_failed"
                        else self._log.warning
                    )
                    log(exc.event, peer=exc.peer, remote=remote, reason=exc.reason)
                    return
                except FrameTooLarge as exc:
                    self._log.info("link.handshake_failed", remote=remote, reason=str(exc))
                    return
                except _NET_ERRORS as exc:
                    self._log.info("link.handshake_failed", remote=remote, reason=_describe(exc))
                    return
                reader.decoder.max_frame = self._max_frame
                conn = _Conn(name, outbound=False, remote=remote, direct=DirectWriter(stream))
                old = self._inbound.get(name)
                if old is not None:
                    # The peer redialed: whatever the old connection still holds must not
                    # be delivered after the new one's messages.
                    self._close(old, "replaced by a new connection")
                self._inbound[name] = conn
                self._log.info("link.inbound_up", peer=name, remote=remote)
                try:
                    await self._pump(conn, stream, reader)
                finally:
                    self._close(conn, "link stopped")
        except Exception:
            self._log.exception("link.internal_error", remote=remote)

    async def _acceptor_handshake(self, stream: anyio.abc.SocketStream, reader: _Reader) -> str:
        mine = encode_hello(_ROLE_ACCEPTOR, os.urandom(NONCE_BYTES), self.name)
        await stream.send(encode_frame(mine))
        theirs = await reader.frame()
        hello = parse_hello(theirs, expect_role=_ROLE_DIALER)
        if hello.name == self.name:
            await self._send_reject(stream, _REJECT_PROTOCOL, "same node name as mine")
            raise HandshakeError("link.handshake_failed", "peer has my name", peer=hello.name)
        answer = await reader.frame()
        if answer[:1] != _KIND_PROOF or len(answer) != 1 + _PROOF_BYTES:
            await self._send_reject(stream, _REJECT_PROTOCOL, "malformed proof")
            raise HandshakeError("link.handshake_failed", "malformed proof", peer=hello.name)
        expect = compute_proof(self._key, _ROLE_DIALER, theirs, mine)
        if not hmac.compare_digest(answer[1:], expect):
            await self._send_reject(stream, _REJECT_AUTH, "wrong proof (different secret?)")
            raise HandshakeError(
                "link.auth_failed", "peer's proof is wrong (different secret?)", peer=hello.name
            )
        await stream.send(
            encode_frame(_KIND_PROOF + compute_proof(self._key, _ROLE_ACCEPTOR, theirs, mine))
        )
        return hello.name

    @staticmethod
    async def _send_reject(stream: anyio.abc.SocketStream, code: int, reason: str) -> None:
        with contextlib.suppress(*_NET_ERRORS):
            await stream.send(_reject(code, reason))

    # ---- internals: a connection's two tasks -------------------------------------------

    async def _pump(self, conn: _Conn, stream: anyio.abc.SocketStream, reader: _Reader) -> None:
        """Run the reader and the writer until either ends or `_close` cancels them."""
        with conn.scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop, conn, stream)
                tg.start_soon(self._read_loop, conn, reader)

    async def _write_loop(self, conn: _Conn, stream: anyio.abc.SocketStream) -> None:
        heartbeat_s = self._heartbeat_s
        queue = conn.queue
        try:
            while True:
                if queue:
                    parts, size, frames = _take_batch(conn)
                    conn.in_flight = size
                    conn.sending = True
                    try:
                        if size > BATCH_BYTES:
                            await stream.send(parts[0])
                            await stream.send(parts[1])
                        else:
                            await stream.send(b"".join(parts))
                    finally:
                        conn.sending = False
                    conn.in_flight = 0
                    self._sent(conn, size, frames)
                    continue
                idle_left = conn.last_write + heartbeat_s - time.monotonic()
                if idle_left <= 0:
                    await stream.send(_HEARTBEAT)
                    conn.last_write = time.monotonic()
                    continue
                conn.wake = anyio.Event()  # `send` sets it; checked `queue` just above
                with anyio.move_on_after(idle_left):
                    await conn.wake.wait()
        except _NET_ERRORS as exc:
            self._close(conn, f"write: {_describe(exc)}")

    def _on_frames(self, conn: _Conn, frames: list[bytes], direct: DirectReader) -> None:
        """The frames of one read, in order; raises the decoder's error after them."""
        for payload in frames:
            if conn.closed:
                return
            if not payload:
                continue  # heartbeat
            if conn.outbound:
                self._log.warning("link.protocol_error", peer=conn.peer)
                self._close(conn, "data frame on an outbound connection")
                return
            self.messages_received += 1
            self.bytes_received += len(payload)
            try:
                self._on_message(conn.peer, payload)
            except Exception:
                self._log.exception("link.handler_failed", peer=conn.peer, callback="on_message")
        if frames and self._on_batch_end is not None:
            try:
                self._on_batch_end()
            except Exception:
                self._log.exception("link.handler_failed", peer=conn.peer, callback="on_batch_end")
        hold = self._hold_reading
        if hold is not None and not conn.outbound and hold():
            direct.pause()

    async def _read_loop(self, conn: _Conn, reader: _Reader) -> None:
        """Input runs in `on_data` (`_on_frames`), called by the transport
        (node/direct_io.py); this task watches for silence and holds reading while the
        caller asks to."""
        dead_after_s = self._dead_after_s
        decoder = reader.decoder
        frames = list(reader.pending)
        reader.pending.clear()

        def on_data(data: bytes) -> None:
            self._on_frames(conn, decoder.feed(data), direct)
            if decoder.error is not None:
                raise decoder.error  # (after the intact frames before it)

        direct = DirectReader(reader.stream, on_data, RECEIVE_BYTES)
        try:
            self._on_frames(conn, frames, direct)
            if decoder.error is not None:
                raise decoder.error
            while not conn.closed:
                deadline = time.monotonic() + dead_after_s
                with anyio.move_on_after(dead_after_s):
                    if not await direct.wait():
                        lost = direct.lost
                        self._close(conn, f"read: {_describe(lost or anyio.EndOfStream())}")
                        return
                    # Paused: the caller holds reading (for at most HOLD_READING_S a turn).
                    hold = self._hold_reading
                    with anyio.move_on_after(HOLD_READING_S):
                        while hold is not None and hold():  # noqa: ASYNC110 - no event on the ack path
                            await anyio.sleep(HOLD_POLL_S)
                    direct.resume()
                    continue
                now = time.monotonic()
                if now - deadline >= STOOD_STILL_S:
                    self._log.info(
                        "link.stood_still", peer=conn.peer, late_s=round(now - deadline, 1)
                    )
                    continue  # (this node did not listen: no verdict on the peer)
                if now - direct.last_data >= dead_after_s:
                    self._close(conn, f"nothing received for {dead_after_s}s")
                    return
        except FrameTooLarge as exc:
            self._log.warning(
                "link.frame_too_large", peer=conn.peer, size=exc.size, limit=exc.limit
            )
            self._close(conn, "frame too large")
        except _NET_ERRORS as exc:
            self._close(conn, f"read: {_describe(exc)}")
