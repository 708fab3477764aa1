"""`cluster.link.NodeLink` on loopback: real sockets, several links in one process.

Every async test runs on asyncio and on uvloop (the node uses uvloop where installed).
Timing: the links here use short heartbeats (50 ms) and a short dead time (400 ms) so
that the liveness tests take well under a second each. `wait_for` polls a condition
instead of sleeping a fixed time.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.link import (
    HANDSHAKE_MAX_FRAME,
    MAGIC,
    FrameDecoder,
    FrameTooLarge,
    NodeLink,
    encode_frame,
)
from node.logs import EventLogger

HEARTBEAT_S = 0.05
DEAD_AFTER_S = 0.4
SECRET = "s3cret-cluster"
LOGGER = "warren.test.link"


@pytest.fixture(autouse=True)
def _capture_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)


def events(caplog: pytest.LogCaptureFixture, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The `fields` of each log record named `event` whose fields include `fields`."""
    found = []
    for record in caplog.records:
        got: dict[str, Any] = getattr(record, "fields", {})
        if record.getMessage() == event and all(got.get(k) == v for k, v in fields.items()):
            found.append(got)
    return found


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `condition` (the callbacks under test set no events to wait on)."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - deliberate polling
            await anyio.sleep(0.005)


class Node:
    """A NodeLink plus what its callbacks saw."""

    def __init__(self, name: str, *, secret: str = SECRET, port: int = 0, **kw: Any) -> None:
        self.name = name
        self.received: dict[str, list[bytes]] = {}
        self.transitions: list[tuple[str, str]] = []  # ("up" | "down", peer)
        self.link = NodeLink(
            name=name,
            host="127.0.0.1",
            port=port,
            secret=secret,
            log=EventLogger(logging.getLogger(LOGGER), node=name),
            on_message=self._on_message,
            on_peer_up=lambda peer: self.transitions.append(("up", peer)),
            on_peer_down=lambda peer: self.transitions.append(("down", peer)),
            heartbeat_s=kw.pop("heartbeat_s", HEARTBEAT_S),
            dead_after_s=kw.pop("dead_after_s", DEAD_AFTER_S),
            **kw,
        )

    def _on_message(self, peer: str, payload: bytes) -> None:
        self.received.setdefault(peer, []).append(payload)

    def got(self, peer: str) -> list[bytes]:
        return self.received.get(peer, [])

    def count(self, kind: str, peer: str) -> int:
        return self.transitions.count((kind, peer))


@asynccontextmanager
async def serving(*nodes: Node, connect: bool = True) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Serve every node; with `connect`, make all of them peers and wait until all are up."""
    async with anyio.create_task_group() as tg:
        for node in nodes:
            await tg.start(node.link.serve)
        if connect:
            for a in nodes:
                for b in nodes:
                    if a is not b:
                        a.link.set_peer(b.name, ("127.0.0.1", b.link.port))
            await wait_for(
                lambda: all(
                    a.link.up_peers() == {b.name for b in nodes if b is not a} for a in nodes
                )
            )
        yield tg
        tg.cancel_scope.cancel()


def payloads(count: int, seed: int) -> list[bytes]:
    """`count` distinct payloads of varying size: mostly small, some up to 256 KiB."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        size = rng.choice((0, 10, 100, 1000, 5000)) + rng.randrange(64)
        if i % 1000 == 999:
            size = 256 * 1024
        out.append(struct.pack(">I", i) + rng.randbytes(size))
    return out


# ---- framing -----------------------------------------------------------------------------


@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.lists(st.integers(min_value=1, max_value=50), max_size=10),
)
def test_decoder_chunked_input_equals_whole_input(frames: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder(max_frame=300)
    got: list[bytes] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        got.extend(decoder.feed(wire[pos : pos + cut]))
        pos += cut
    got.extend(decoder.feed(wire[pos:]))
    assert got == frames
    assert decoder.buffered == 0


def test_decoder_refuses_a_frame_over_the_limit_from_its_header_alone() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(encode_frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(struct.pack(">I", 11))
    assert (info.value.size, info.value.limit) == (11, 10)


def test_decoder_returns_the_intact_frames_before_an_oversized_one() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(encode_frame(b"a") + encode_frame(b"") + struct.pack(">I", 11)) == [
        b"a",
        b"",
    ]
    assert decoder.error is not None
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"")


# ---- delivery ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ten_thousand_messages_each_way_arrive_in_order() -> None:
    a, b = Node("a"), Node("b")
    to_b, to_a = payloads(10_000, seed=1), payloads(10_000, seed=2)
    async with serving(a, b):
        for i in range(10_000):
            assert a.link.send("b", to_b[i])
            assert b.link.send("a", to_a[i])
            if i % 500 == 0:
                await anyio.lowlevel.checkpoint()  # interleave sending with writing
        assert a.link.buffered_bytes("b") > 0
        await wait_for(lambda: len(b.got("a")) == 10_000 and len(a.got("b")) == 10_000)
        await wait_for(lambda: a.link.buffered_bytes("b") == 0)
    assert b.got("a") == to_b
    assert a.got("b") == to_a
    assert a.link.messages_sent == b.link.messages_received == 10_000
    assert a.link.bytes_sent == b.link.bytes_received == sum(map(len, to_b))
    assert b.link.bytes_sent == a.link.bytes_received == sum(map(len, to_a))
    assert a.transitions == [("up", "b"), ("down", "b")]  # down: the links were stopped


@pytest.mark.anyio
async def test_direct_and_queued_writes_keep_order_through_backpressure() -> None:
    """One message per event-loop turn goes straight to the socket; bursts larger than
    the socket buffers, sent while the receiver holds its reads, back up and go through
    the writer task. Every message arrives once and in order, in both regimes."""
    holding = True
    a, b = Node("a"), Node("b", hold_reading=lambda: holding)
    sent = payloads(3_000, seed=3)
    burst = [b"burst %d " % i + b"y" * 200_000 for i in range(100)]  # ~20 MB
    expected: list[bytes] = []
    async with serving(a, b):
        holding = False
        for payload in sent[:1_000]:  # trickle: written directly
            assert a.link.send("b", payload)
            await anyio.lowlevel.checkpoint()
        expected += sent[:1_000]
        await wait_for(lambda: len(b.got("a")) == 1_000)
        holding = True
        for payload in burst:  # flood while b is slow to read: backs up
            assert a.link.send("b", payload)
        for payload in sent[1_000:]:  # trickle behind the flood: must wait its turn
            assert a.link.send("b", payload)
            await anyio.lowlevel.checkpoint()
        expected += burst + sent[1_000:]
        assert a.link.buffered_bytes("b") > 1_000_000
        holding = False
        await wait_for(lambda: len(b.got("a")) == len(expected), within=30)
        await wait_for(lambda: a.link.buffered_bytes("b") == 0)
    assert b.got("a") == expected
    assert a.link.messages_sent == b.link.messages_received == len(expected)


@pytest.mark.anyio
async def test_three_nodes_keep_per_pair_order() -> None:
    nodes = [Node("a"), Node("b"), Node("c")]
    async with serving(*nodes):
        for i in range(300):
            for src in nodes:
                for dst in nodes:
                    if src is not dst:
                        assert src.link.send(dst.name, f"{src.name}>{dst.name}:{i}".encode())
        await wait_for(
            lambda: all(len(n.got(p.name)) == 300 for n in nodes for p in nodes if n is not p)
        )
    for dst in nodes:
        for src in nodes:
            if src is not dst:
                want = [f"{src.name}>{dst.name}:{i}".encode() for i in range(300)]
                assert dst.got(src.name) == want


@pytest.mark.anyio
async def test_send_to_unknown_or_down_peer_returns_false() -> None:
    a = Node("a")
    assert not a.link.send("b", b"x")  # not serving, no such peer
    async with serving(a, connect=False):
        assert not a.link.send("nobody", b"x")
        a.link.set_peer("b", ("127.0.0.1", 1))  # nothing listens on port 1
        await anyio.sleep(0.05)
        assert not a.link.is_up("b")
        assert not a.link.send("b", b"x")
        assert a.link.buffered_bytes("b") == 0
        assert a.link.up_peers() == frozenset()
    assert a.transitions == []


@pytest.mark.anyio
async def test_a_raising_callback_is_logged_and_the_connection_lives_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Node("a"), Node("b")
    seen: list[bytes] = []

    def on_message(peer: str, payload: bytes) -> None:
        seen.append(payload)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    b.link._on_message = on_message
    async with serving(a, b):
        for payload in (b"1", b"boom", b"2"):
            assert a.link.send("b", payload)
        await wait_for(lambda: len(seen) == 3)
        assert a.link.is_up("b")
    assert seen == [b"1", b"boom", b"2"]
    assert events(caplog, "link.handler_failed", peer="a", callback="on_message")
    assert a.transitions == [("up", "b"), ("down", "b")]


def test_bad_arguments_are_refused() -> None:
    log = EventLogger(logging.getLogger(LOGGER))

    def make(**kw: Any) -> NodeLink:
        args: dict[str, Any] = {
            "name": "a",
            "host": "127.0.0.1",
            "port": 0,
            "secret": SECRET,
            "log": log,
            "on_message": lambda peer, payload: None,
        }
        return NodeLink(**{**args, **kw})

    for bad in ({"secret": ""}, {"host": ""}, {"name": ""}, {"heartbeat_s": 5.0}):
        with pytest.raises(ValueError):  # noqa: PT011 - each message is different
            make(**bad)
    with pytest.raises(ValueError, match="own peer"):
        make().set_peer("a", ("127.0.0.1", 1))
    with pytest.raises(RuntimeError, match="not listening"):
        _ = make().port


# ---- authentication and handshake --------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_secret_never_comes_up_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Node("a"), Node("b", secret="another secret")
    async with serving(a, b, connect=False):
        a.link.set_peer("b", ("127.0.0.1", b.link.port))
        b.link.set_peer("a", ("127.0.0.1", a.link.port))
        await wait_for(lambda: len(events(caplog, "link.auth_failed")) >= 4)
        await anyio.sleep(0.2)  # time for a retry or two
        assert not a.link.is_up("b")
        assert not b.link.is_up("a")
        assert not a.link.send("b", b"x")
    assert a.transitions == b.transitions == []
    assert not b.received
    assert not a.received
    # Each acceptor logs the dialer's bad proof; each dialer logs its rejection.
    assert events(caplog, "link.auth_failed", node="b", peer="a")
    assert any(
        "rejected by peer" in e["reason"] for e in events(caplog, "link.auth_failed", node="a")
    )
    assert not events(caplog, "link.peer_up")
    assert not events(caplog, "link.inbound_up")


@pytest.mark.anyio
async def test_dialing_an_address_where_another_node_answers_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, c = Node("a"), Node("c")
    async with serving(a, c, connect=False):
        a.link.set_peer("b", ("127.0.0.1", c.link.port))
        await wait_for(lambda: bool(events(caplog, "link.handshake_failed", node="a", peer="b")))
        assert not a.link.is_up("b")
    (failure,) = events(caplog, "link.handshake_failed", node="a", peer="b")[:1]
    assert "'c'" in failure["reason"]


async def _raw_connect(port: int) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", port)


async def read_until_closed(stream: anyio.abc.SocketStream) -> bytes:
    """Everything the other end sends until it closes (within 2 s)."""
    received = b""
    with anyio.fail_after(2):
        try:
            while True:
                received += await stream.receive()
        except anyio.EndOfStream:
            return received


@pytest.mark.anyio
async def test_version_mismatch_is_rejected_clearly(caplog: pytest.LogCaptureFixture) -> None:
    a = Node("a")
    async with serving(a, connect=False):
        async with await _raw_connect(a.link.port) as stream:
            hello = MAGIC + bytes([99, 1]) + b"\x00" * 32 + b"future-node"
            await stream.send(encode_frame(hello))
            received = await read_until_closed(stream)
        # a's own hello came first: its version byte follows the magic.
        assert received[4:8] == MAGIC
        assert received[8] == 1
    (mismatch,) = events(caplog, "link.version_mismatch", node="a")
    assert "version 99" in mismatch["reason"]


@pytest.mark.anyio
async def test_garbage_and_silence_before_auth_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Node("a"), Node("b")
    async with serving(a, b):
        # An AMQP client on the wrong port: "AMQP" reads as a 1.1 GB length.
        async with await _raw_connect(a.link.port) as stream:
            await stream.send(b"AMQP\x00\x00\x09\x01")
            assert (await read_until_closed(stream))[4:8] == MAGIC
        # A client that connects and says nothing is dropped after dead_after_s.
        async with await _raw_connect(a.link.port) as stream:
            assert (await read_until_closed(stream))[4:8] == MAGIC
        assert a.link.send("b", b"still fine")
        await wait_for(lambda: b.got("a") == [b"still fine"])
    reasons = [e["reason"] for e in events(caplog, "link.handshake_failed", node="a")]
    assert any(f"limit of {HANDSHAKE_MAX_FRAME}" in r for r in reasons)
    assert "timed out" in reasons


# ---- failures and recovery ---------------------------------------------------------------


@pytest.mark.anyio
async def test_peer_restart_goes_down_then_up_and_new_messages_flow() -> None:
    a = Node("a")
    async with serving(a, connect=False):
        b1 = Node("b")
        async with serving(b1, connect=False):
            b1.link.set_peer("a", ("127.0.0.1", a.link.port))
            a.link.set_peer("b", ("127.0.0.1", b1.link.port))
            await wait_for(lambda: a.link.is_up("b") and b1.link.is_up("a"))
            assert a.link.send("b", b"before")
            await wait_for(lambda: b1.got("a") == [b"before"])
            port = b1.link.port
        # b1 stopped: a notices the closed connection.
        await wait_for(lambda: a.count("down", "b") == 1)
        assert not a.link.is_up("b")
        assert not a.link.send("b", b"lost")

        b2 = Node("b", port=port)
        async with serving(b2, connect=False):
            b2.link.set_peer("a", ("127.0.0.1", a.link.port))
            await wait_for(lambda: a.link.is_up("b") and b2.link.is_up("a"))
            assert a.link.send("b", b"after")
            assert b2.link.send("a", b"hello from b2")
            await wait_for(lambda: b2.got("a") == [b"after"])
            await wait_for(lambda: a.got("b") == [b"hello from b2"])
    assert a.transitions == [("up", "b"), ("down", "b"), ("up", "b"), ("down", "b")]


class FreezableProxy:
    """A TCP forwarder to `target_port` that can stop forwarding without closing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._thawed = anyio.Event()
        self._thawed.set()

    def freeze(self) -> None:
        self._thawed = anyio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            async with (
                client,
                await anyio.connect_tcp("127.0.0.1", self.target_port) as server,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(self._pump, client, server, tg.cancel_scope)
                tg.start_soon(self._pump, server, client, tg.cancel_scope)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    async def _pump(
        self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        try:
            async for chunk in src:
                await self._thawed.wait()
                await dst.send(chunk)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        scope.cancel()


@pytest.mark.anyio
async def test_frozen_network_is_detected_within_dead_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Node("a"), Node("b")
    async with serving(a, b, connect=False) as tg:
        proxy = FreezableProxy(b.link.port)
        await tg.start(proxy.serve)
        a.link.set_peer("b", ("127.0.0.1", proxy.port))
        b.link.set_peer("a", ("127.0.0.1", a.link.port))
        await wait_for(lambda: a.link.is_up("b") and b.link.is_up("a"))
        assert a.link.send("b", b"through the proxy")
        await wait_for(lambda: b.got("a") == [b"through the proxy"])

        proxy.freeze()
        frozen_at = anyio.current_time()
        assert a.link.send("b", b"into the void")
        await wait_for(lambda: a.count("down", "b") == 1, within=DEAD_AFTER_S + 1.0)
        detected_after = anyio.current_time() - frozen_at
        # The last heartbeat came at most HEARTBEAT_S before the freeze.
        assert DEAD_AFTER_S - HEARTBEAT_S - 0.02 <= detected_after <= DEAD_AFTER_S + 0.5
        assert not a.link.send("b", b"dropped")
        # b's end of the same connection times out too; b's own link to a is fine.
        await wait_for(lambda: bool(events(caplog, "link.inbound_down", node="b", peer="a")))
        assert b.link.is_up("a")

        proxy.thaw()
        await wait_for(lambda: a.count("up", "b") == 2)
        assert a.link.send("b", b"healed")
        await wait_for(lambda: b.got("a")[-1] == b"healed")
    assert b"dropped" not in b.got("a")
    (down,) = events(caplog, "link.peer_down", node="a", peer="b")[:1]
    assert "nothing received" in down["reason"]


@pytest.mark.anyio
async def test_oversized_frame_closes_that_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Node("a"), Node("b", max_frame=1000)
    async with serving(a, b):
        with pytest.raises(ValueError, match="payload size"):
            b.link.send("a", b"x" * 1001)  # the sender refuses what its own limit forbids
        with pytest.raises(ValueError, match="payload size"):
            b.link.send("a", b"")  # an empty frame is a heartbeat
        assert a.link.send("b", b"ok")
        assert a.link.send("b", b"y" * 2000)  # within a's limit, not within b's
        await wait_for(lambda: a.count("down", "b") == 1)
        assert b.got("a") == [b"ok"]
        (too_large,) = events(caplog, "link.frame_too_large", node="b")
        assert (too_large["size"], too_large["limit"]) == (2000, 1000)
        # a redials; the link works again.
        await wait_for(lambda: a.link.is_up("b"))
        assert a.link.send("b", b"small again")
        await wait_for(lambda: b.got("a") == [b"ok", b"small again"])
        assert b.link.is_up("a")  # b's own outbound connection was never affected


@pytest.mark.anyio
async def test_remove_peer_and_change_address() -> None:
    a, b, b_other = Node("a"), Node("b"), Node("b")
    async with serving(a, b), serving(b_other, connect=False):
        a.link.remove_peer("b")
        assert not a.link.is_up("b")
        assert a.transitions == [("up", "b"), ("down", "b")]
        await anyio.sleep(0.2)
        assert a.transitions == [("up", "b"), ("down", "b")]  # no redial
        a.link.set_peer("b", ("127.0.0.1", b.link.port))
        await wait_for(lambda: a.link.is_up("b"))
        # The same name at a new address: the old connection goes, the new comes.
        a.link.set_peer("b", ("127.0.0.1", b_other.link.port))
        assert not a.link.is_up("b")
        await wait_for(lambda: a.link.is_up("b"))
        assert a.link.send("b", b"to the new b")
        await wait_for(lambda: b_other.got("a") == [b"to the new b"])
    assert b.got("a") == []
    assert a.transitions[:6] == [("up", "b"), ("down", "b")] * 3
