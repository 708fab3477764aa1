"""Tutorial 6 (RPC), the server: answer "fib(n)" requests from the queue "rpc_queue",
one at a time, replying to each request's reply_to with its correlation_id.

Usage: rpc_server.py AMQP_URL    (runs until interrupted)
"""

from __future__ import annotations

import sys
from typing import Any

import pika
from ctrl_c import consume_until_interrupted


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def on_request(ch: Any, method: Any, properties: Any, body: bytes) -> None:
    n = int(body)
    print(f" [.] fib({n})", flush=True)
    ch.basic_publish(
        exchange="",
        routing_key=properties.reply_to,
        properties=pika.BasicProperties(correlation_id=properties.correlation_id),
        body=str(fib(n)).encode(),
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


def main(argv: list[str]) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.queue_declare(queue="rpc_queue")
    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue="rpc_queue", on_message_callback=on_request)
    print(" [x] Awaiting RPC requests", flush=True)
    consume_until_interrupted(connection, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
