"""Tutorial 4 (routing), the subscriber: an exclusive server-named queue bound to
"direct_logs" once per severity given; print every log line with its severity.

Usage: receive_logs_direct.py AMQP_URL SEVERITY...    (runs until interrupted)
"""

from __future__ import annotations

import sys
from typing import Any

import pika
from ctrl_c import consume_until_interrupted


def on_log(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
    print(f" [x] {method.routing_key}:{body.decode()}", flush=True)


def main(argv: list[str]) -> int:
    severities = argv[2:]
    if not severities:
        sys.stderr.write(f"Usage: {argv[0]} AMQP_URL [info] [warning] [error]\n")
        return 1
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.exchange_declare(exchange="direct_logs", exchange_type="direct")
    queue = channel.queue_declare(queue="", exclusive=True).method.queue
    for severity in severities:
        channel.queue_bind(exchange="direct_logs", queue=queue, routing_key=severity)
    channel.basic_consume(queue=queue, on_message_callback=on_log, auto_ack=True)
    print(" [*] Waiting for logs. To exit press CTRL+C", flush=True)
    consume_until_interrupted(connection, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
