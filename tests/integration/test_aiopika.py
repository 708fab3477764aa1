"""aio-pika (asyncio, on aiormq) against the broker: plain and robust connections.

Each test runs its coroutine with asyncio.run and a hard timeout, so a hang fails fast.
aio-pika channels have publisher confirms on by default: every awaited publish is confirmed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

TIMEOUT_S = 30


def run(factory: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(factory(), TIMEOUT_S)

    return asyncio.run(bounded())


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_declare_publish_consume_ack_with_queue_iterator(broker_url: str) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=4)
            queue = await channel.declare_queue(unique("aio"))
            for i in range(10):
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        f"job-{i}".encode(),
                        content_type="text/plain",
                        headers={"n": i},
                        message_id=str(i),
                    ),
                    routing_key=queue.name,
                )
            received: list[tuple[bytes, Any, str | None, bool]] = []
            async with queue.iterator() as messages:
                async for message in messages:
                    received.append(
                        (
                            message.body,
                            message.headers["n"],
                            message.message_id,
                            message.redelivered,
                        )
                    )
                    await message.ack()
                    if len(received) == 10:
                        break
            assert received == [(f"job-{i}".encode(), i, str(i), False) for i in range(10)]
            again = await channel.declare_queue(queue.name, passive=True)
            assert again.declaration_result.message_count == 0
            await queue.delete(if_unused=False, if_empty=False)

    run(scenario)


def test_consume_callback_and_reject_requeue(broker_url: str) -> None:
    """A callback consumer rejects the first delivery with requeue; it comes back redelivered."""

    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            seen: list[tuple[bytes, bool]] = []
            done = asyncio.Event()

            async def on_message(message: AbstractIncomingMessage) -> None:
                seen.append((message.body, message.redelivered))
                if len(seen) == 1:
                    await message.reject(requeue=True)
                else:
                    await message.ack()
                    done.set()

            tag = await queue.consume(on_message)
            await channel.default_exchange.publish(
                aio_pika.Message(b"twice"), routing_key=queue.name
            )
            await done.wait()
            await queue.cancel(tag)
            assert seen == [(b"twice", False), (b"twice", True)]

    run(scenario)


def test_exchange_routing_and_get(broker_url: str) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect(broker_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                unique("aio-topic"), aio_pika.ExchangeType.TOPIC, auto_delete=True
            )
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, routing_key="orders.*")
            await exchange.publish(aio_pika.Message(b"created"), routing_key="orders.created")
            await exchange.publish(aio_pika.Message(b"ignored"), routing_key="users.created")
            message = await queue.get(timeout=5)
            assert message is not None
            assert (message.body, message.routing_key, message.exchange) == (
                b"created",
                "orders.created",
                exchange.name,
            )
            await message.ack()
            assert await queue.get(fail=False) is None
            await exchange.delete()

    run(scenario)


def test_robust_connection_round_trip(broker_url: str) -> None:
    async def scenario() -> None:
        connection = await aio_pika.connect_robust(broker_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(unique("robust"), auto_delete=True)
            await channel.default_exchange.publish(
                aio_pika.Message(b"robust", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        assert message.body == b"robust"
                        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                    break
            assert not connection.is_closed
        assert connection.is_closed

    run(scenario)


def test_wrong_password_fails_to_connect(broker_url: str) -> None:
    async def scenario() -> None:
        with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(broker_url.replace("guest:guest@", "guest:wrong@", 1))

    run(scenario)
