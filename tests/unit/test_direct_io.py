"""DirectWriter and DirectReader (node/direct_io.py) on loopback sockets, asyncio and uvloop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from node.direct_io import DirectReader, DirectWriter


@asynccontextmanager
async def _pair() -> AsyncIterator[tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]]:
    """A connected (client, server) pair on loopback, closed (with its listener) after."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    client = await anyio.connect_tcp("127.0.0.1", port)
    server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
    try:
        yield client, server
    finally:
        await client.aclose()
        await server.aclose()
        await listener.aclose()


@pytest.mark.anyio
async def test_writes_reach_the_peer_in_order_and_refuse_once_the_socket_is_full() -> None:
    async with _pair() as (client, server):
        writer = DirectWriter(client)
        assert writer.available
        assert writer.ready
        assert writer.write(b"one ")
        assert writer.write(b"two ")
        assert await server.receive() == b"one two "
        # Nobody reads: the kernel's buffers fill and the transport starts holding bytes.
        chunk = b"x" * 65536
        written = 0
        while writer.write(chunk):
            written += len(chunk)
            assert written < 64 * 1024 * 1024, "the socket never filled"
        assert not writer.ready
        assert writer.buffered() > 0
        got = 0
        while got < written:
            got += len(await server.receive(1 << 20))
        assert got == written
        with anyio.fail_after(5):
            while not writer.ready:  # noqa: ASYNC110 - the transport has no event for it
                await anyio.sleep(0.01)
        assert writer.buffered() == 0


@pytest.mark.anyio
async def test_a_closed_stream_is_never_written() -> None:
    async with _pair() as (client, _server):
        writer = DirectWriter(client)
        await client.aclose()
        assert not writer.ready
        assert not writer.write(b"late")


def test_a_stream_without_a_transport_always_queues() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    writer = DirectWriter(send)
    assert not writer.available
    assert not writer.ready
    assert not writer.write(b"data")
    assert writer.buffered() == 0
    send.close()
    receive.close()


@pytest.mark.anyio
async def test_reader_delivers_in_order_pauses_resumes_and_sees_the_end() -> None:
    async with _pair() as (client, server):
        got: list[bytes] = []
        paused_once: list[bool] = []

        def on_data(data: bytes) -> None:
            got.append(data)
            if not paused_once and sum(map(len, got)) >= 1_000_000:
                paused_once.append(True)
                reader.pause()  # backpressure from inside the callback, as the node does

        reader = DirectReader(server, on_data, 65536)
        total = 3_000_000
        payload = bytes(i % 251 for i in range(total))
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, payload)
            with anyio.fail_after(5):
                assert await reader.wait()  # paused by on_data after ~1 MB
            held = sum(map(len, got))
            await anyio.sleep(0.1)
            assert sum(map(len, got)) == held < total  # paused: nothing more handed over
            reader.resume()
            with anyio.fail_after(5):
                while sum(map(len, got)) < total:  # noqa: ASYNC110 - no event to wait on
                    await anyio.sleep(0.01)
        assert b"".join(got) == payload
        await client.send_eof()
        with anyio.fail_after(5):
            assert not await reader.wait()  # the end of the stream


@pytest.mark.anyio
async def test_reader_raises_what_the_callback_raised_and_stops() -> None:
    async with _pair() as (client, server):
        calls: list[bytes] = []

        def on_data(data: bytes) -> None:
            calls.append(data)
            raise ValueError("bad input")

        reader = DirectReader(server, on_data, 65536)
        await client.send(b"first")
        with anyio.fail_after(5), pytest.raises(ValueError, match="bad input"):
            await reader.wait()
        await client.send(b"second")
        await anyio.sleep(0.1)
        assert calls == [b"first"]


class _ChunkStream:
    """A byte stream without a transport (as another backend's would be)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)[:max_bytes]


@pytest.mark.anyio
async def test_reader_without_a_transport_reads_with_receive() -> None:
    got: list[bytes] = []
    reader = DirectReader(_ChunkStream([b"a", b"b"]), got.append, 65536)
    with anyio.fail_after(5):
        assert not await reader.wait()
    assert got == [b"a", b"b"]


@pytest.mark.anyio
async def test_a_discarding_reader_drains_to_the_end_after_an_error() -> None:
    async with _pair() as (client, server):

        def on_data(data: bytes) -> None:
            raise ValueError("bad input")

        reader = DirectReader(server, on_data, 65536)
        await client.send(b"first")
        with anyio.fail_after(5), pytest.raises(ValueError, match="bad input"):
            await reader.wait()
        reader.discard()  # closing: what still comes is dropped, the old error forgotten
        reader.resume()
        await client.send(b"more")
        await client.send_eof()
        with anyio.fail_after(5):
            assert not await reader.wait()
