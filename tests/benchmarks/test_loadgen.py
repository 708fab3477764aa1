"""Checks of the load generator's hand-written hot path against pamqp (no broker, no sockets).

Outside the default test run (testpaths are tests/unit and tests/integration):
`pytest tests/benchmarks`.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands, frame
from pamqp import header as pheader

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg


class _Capture(lg._NullTransport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: Any) -> None:
        self.data += data


def _frames(data: bytes) -> list[tuple[int, Any]]:
    out = []
    while data:
        n, ch, value = frame.unmarshal(data)
        out.append((ch, value))
        data = data[n:]
    return out


def _deliveries(tags: list[int], body_sizes: list[int], ch: int = 1) -> bytes:
    parts = []
    for tag, size in zip(tags, body_sizes, strict=True):
        parts.append(
            frame.marshal(
                commands.Basic.Deliver(
                    consumer_tag="ctag", delivery_tag=tag, exchange="ex", routing_key="rk"
                ),
                ch,
            )
        )
        parts.append(frame.marshal(pheader.ContentHeader(0, size, commands.Basic.Properties()), ch))
        for i in range(0, size, 1000):  # several body frames for big bodies
            parts.append(frame.marshal(pbody.ContentBody(b"y" * min(1000, size - i)), ch))
    return b"".join(parts)


def _feed(proto: lg.ClientProtocol, stream: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        proto.data_received(stream[pos:cut] if cut > pos else b"")
        pos = max(pos, cut)
    proto.data_received(stream[pos:])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 2500), min_size=1, max_size=20),
    cuts=st.lists(st.integers(0, 100_000), max_size=30),
    ack_every=st.sampled_from([1, 3]),
)
def test_any_chunking_counts_every_delivery_and_acks_like_pamqp(
    sizes: list[int], cuts: list[int], ack_every: int
) -> None:
    async def run() -> None:
        tags = list(range(1, len(sizes) + 1))
        proto = lg.ClientProtocol(ack_every=ack_every)
        transport = _Capture()
        proto.connection_made(transport)
        proto.open_inbound(1)
        _feed(proto, _deliveries(tags, sizes), cuts)
        assert proto.delivered == len(sizes)
        acks = _frames(bytes(transport.data))
        assert all(isinstance(v, commands.Basic.Ack) and ch == 1 for ch, v in acks)
        if ack_every == 1:
            assert [(v.delivery_tag, v.multiple) for _, v in acks] == [(t, False) for t in tags]
        else:
            expected = [(t, True) for t in tags if t % ack_every == 0]
            assert [(v.delivery_tag, v.multiple) for _, v in acks] == expected

    asyncio.run(run())


def test_latency_is_read_from_the_body_timestamp() -> None:
    async def run() -> None:
        proto = lg.ClientProtocol(measure_latency=True)
        proto.connection_made(_Capture())
        proto.open_inbound(1)
        proto.recording = True
        pub = lg.TimestampedPublish(1, "", "q", 100, persistent=False)
        published = _frames(pub.encode(1))
        body = published[2][1].value
        stamp = struct.unpack(">Q", body[:8])[0]
        stream = frame.marshal(
            commands.Basic.Deliver(consumer_tag="c", delivery_tag=1, routing_key="q"), 1
        )
        stream += frame.marshal(published[1][1], 1) + frame.marshal(published[2][1], 1)
        proto.data_received(stream)
        assert proto.delivered == 1
        assert len(proto.latencies_ns) == 1
        assert 0 <= proto.latencies_ns[0] < 10**9
        assert stamp > 0

    asyncio.run(run())


@given(
    exchange=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=20),
    key=st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=20),
    size=st.integers(0, 300_000),
    persistent=st.booleans(),
)
@settings(max_examples=30, deadline=None)
def test_pre_encoded_publish_decodes_with_pamqp(
    exchange: str, key: str, size: int, persistent: bool
) -> None:
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    frames = _frames(lg.encode_publish(3, exchange, key, body, persistent=persistent))
    method, content = frames[0][1], frames[1][1]
    assert isinstance(method, commands.Basic.Publish)
    assert (method.exchange, method.routing_key) == (exchange, key)
    assert isinstance(content, pheader.ContentHeader)
    assert content.body_size == size
    assert content.properties.delivery_mode == (2 if persistent else 1)
    assert b"".join(v.value for _, v in frames[2:]) == body
    assert all(ch == 3 for ch, _ in frames)
    assert all(len(v.value) <= lg.CLIENT_FRAME_MAX - 8 for _, v in frames[2:])


def test_confirm_tracker_counts_single_and_multiple_acks() -> None:
    t = lg._ConfirmTracker()
    for tag in (2, 3, 1):
        t.settle(tag, multiple=False)
    assert (t.upto, t.settled) == (3, 3)
    t.settle(6, multiple=False)
    assert t.settled == 4
    t.settle(10, multiple=True)
    assert (t.upto, t.singles, t.settled) == (10, set(), 10)
