"""Tutorial 2 (work queues), the producer: send one persistent task to the durable
queue "task_queue". Each dot in the task is one unit of work for the worker.

Usage: new_task.py AMQP_URL [TASK...]
"""

from __future__ import annotations

import sys

import pika


def main(argv: list[str]) -> int:
    message = " ".join(argv[2:]) or "Hello World!"
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.queue_declare(queue="task_queue", durable=True)
    channel.basic_publish(
        exchange="",
        routing_key="task_queue",
        body=message.encode(),
        properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
    )
    print(f" [x] Sent {message!r}", flush=True)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
