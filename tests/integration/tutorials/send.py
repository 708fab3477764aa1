"""Tutorial 1 (hello world), the producer: send one message to the queue "hello".

Usage: send.py AMQP_URL [MESSAGE]
"""

from __future__ import annotations

import sys

import pika


def main(argv: list[str]) -> int:
    url = argv[1]
    message = " ".join(argv[2:]) or "Hello World!"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    channel.basic_publish(exchange="", routing_key="hello", body=message.encode())
    print(f" [x] Sent {message!r}", flush=True)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
