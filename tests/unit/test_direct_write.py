"""DirectWriter (node/direct_write.py) on real loopback sockets, asyncio and uvloop."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from node.direct_write import DirectWriter


async def _pair() -> tuple[anyio.abc.SocketStream, anyio.abc.SocketStream, anyio.abc.Listener]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    client = await anyio.connect_tcp("127.0.0.1", port)
    server = await listener.listeners[0].accept()  # type: ignore[attr-defined]
    return client, server, listener


@pytest.mark.anyio
async def test_writes_reach_the_peer_in_order_and_refuse_once_the_socket_is_full() -> None:
    client, server, listener = await _pair()
    try:
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
    finally:
        await client.aclose()
        await server.aclose()
        await listener.aclose()


@pytest.mark.anyio
async def test_a_closed_stream_is_never_written() -> None:
    client, server, listener = await _pair()
    try:
        writer = DirectWriter(client)
        await client.aclose()
        assert not writer.ready
        assert not writer.write(b"late")
    finally:
        await server.aclose()
        await listener.aclose()


def test_a_stream_without_a_transport_always_queues() -> None:
    send, receive = anyio.create_memory_object_stream[bytes](1)
    writer = DirectWriter(send)
    assert not writer.available
    assert not writer.ready
    assert not writer.write(b"data")
    assert writer.buffered() == 0
    send.close()
    receive.close()
