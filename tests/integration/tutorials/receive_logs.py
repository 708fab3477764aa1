"""Tutorial 3 (publish/subscribe), the subscriber: a fresh exclusive server-named queue
bound to the fanout exchange "logs"; print every log line.

Usage: receive_logs.py AMQP_URL    (runs until interrupted)
"""

from __future__ import annotations

import sys
from typing import Any

import pika


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
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        # Like RabbitMQ's tutorials: Ctrl+C ends the process, and the broker sees the
        # socket close. (Closing politely here could hang if the interrupt landed inside
        # pika's own I/O.)
        print(" [*] Interrupted", flush=True)
        return 0
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
