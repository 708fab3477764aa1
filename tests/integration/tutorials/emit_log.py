"""Tutorial 3 (publish/subscribe), the producer: broadcast one log line on the fanout
exchange "logs".

Usage: emit_log.py AMQP_URL [MESSAGE...]
"""

from __future__ import annotations

import sys

import pika


def main(argv: list[str]) -> int:
    message = " ".join(argv[2:]) or "info: Hello World!"
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.exchange_declare(exchange="logs", exchange_type="fanout")
    channel.basic_publish(exchange="logs", routing_key="", body=message.encode())
    print(f" [x] Sent {message!r}", flush=True)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
