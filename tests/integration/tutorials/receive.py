"""Tutorial 1 (hello world), the consumer: print every message from the queue "hello".

Usage: receive.py AMQP_URL    (runs until interrupted)
"""

from __future__ import annotations

import sys
from typing import Any

import pika
from ctrl_c import consume_until_interrupted


def on_message(_channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
    print(f" [x] Received {body.decode()!r}", flush=True)


def main(argv: list[str]) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    channel.basic_consume(queue="hello", on_message_callback=on_message, auto_ack=True)
    print(" [*] Waiting for messages. To exit press CTRL+C", flush=True)
    consume_until_interrupted(connection, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
