"""Tutorial 5 (topics), the subscriber: an exclusive server-named queue bound to
"topic_logs" once per binding key given ("*" = one word, "#" = zero or more words).

Usage: receive_logs_topic.py AMQP_URL BINDING_KEY...    (runs until interrupted)
"""

from __future__ import annotations

import sys
from typing import Any

import pika
from ctrl_c import consume_until_interrupted


def on_log(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
    print(f" [x] {method.routing_key}:{body.decode()}", flush=True)


def main(argv: list[str]) -> int:
    binding_keys = argv[2:]
    if not binding_keys:
        sys.stderr.write(f"Usage: {argv[0]} AMQP_URL [binding_key]...\n")
        return 1
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.exchange_declare(exchange="topic_logs", exchange_type="topic")
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    for binding_key in binding_keys:
        channel.queue_bind(exchange="topic_logs", queue=queue, routing_key=binding_key)
    channel.basic_consume(queue=queue, on_message_callback=on_log, auto_ack=True)
    print(" [*] Waiting for logs. To exit press CTRL+C", flush=True)
    consume_until_interrupted(connection, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
