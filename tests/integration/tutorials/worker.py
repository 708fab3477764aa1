"""Tutorial 2 (work queues), the worker: take one task at a time (prefetch 1) from
"task_queue", work SECONDS_PER_DOT per dot in it, then acknowledge it.

Usage: worker.py AMQP_URL [SECONDS_PER_DOT]    (default 0.1; runs until interrupted)
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pika
from ctrl_c import consume_until_interrupted


def main(argv: list[str]) -> int:
    seconds_per_dot = float(argv[2]) if len(argv) > 2 else 0.1
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.queue_declare(queue="task_queue", durable=True)

    def on_task(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        task = body.decode()
        print(f" [x] Received {task!r}", flush=True)
        time.sleep(task.count(".") * seconds_per_dot)
        print(f" [x] Done {task!r}", flush=True)
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue="task_queue", on_message_callback=on_task)
    print(" [*] Waiting for messages. To exit press CTRL+C", flush=True)
    consume_until_interrupted(connection, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
