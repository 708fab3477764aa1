"""Tutorial 6 (RPC), the client: for each n, send "n" to "rpc_queue" with reply_to set to
an exclusive server-named callback queue and a fresh correlation_id, then wait for the
reply carrying that correlation_id (replies with another id are ignored).

Usage: rpc_client.py AMQP_URL N...
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import pika


class FibonacciRpcClient:
    """One connection, one callback queue, one request in flight at a time."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.callback_queue = self.channel.queue_declare(queue="", exclusive=True).method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.correlation_id: str | None = None
        self.response: int | None = None

    def on_response(self, _ch: Any, _method: Any, properties: Any, body: bytes) -> None:
        if properties.correlation_id == self.correlation_id:
            self.response = int(body)

    def call(self, n: int) -> int:
        self.response = None
        self.correlation_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key="rpc_queue",
            properties=pika.BasicProperties(
                reply_to=self.callback_queue, correlation_id=self.correlation_id
            ),
            body=str(n).encode(),
        )
        while self.response is None:
            self.connection.process_data_events(time_limit=None)
        return self.response

    def close(self) -> None:
        self.connection.close()


def main(argv: list[str]) -> int:
    client = FibonacciRpcClient(argv[1])
    for arg in argv[2:] or ["30"]:
        print(f" [x] Requesting fib({arg})", flush=True)
        print(f" [.] Got {client.call(int(arg))}", flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
