"""Tutorial 3 (publish/subscribe), the subscriber: a fresh exclusive server-named queue
bound to the fanout exchange "logs"; print every log line.

Usage: receive_logs.py AMQP_URL    (runs until interrupted)
"""

from __future__ import annotations

import sys
from typing import Any

import pika
from ctrl_c import consume_until_interrupted


def on_log(_channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
    print(f" [x] {body.decode()}", flush=True)


def main(argv: list[str]) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.exchange_declare(exchange="logs", exchange_type="fanout")
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    channel.queue_bind(exchange="logs", queue=queue)
    channel.basic_consume(queue=queue, on_message_callback=on_log, auto_ack=True)
    print(f" [*] Waiting for logs on {queue}. To exit press CTRL+C", flush=True)
    consume_until_interrupted(connection, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
