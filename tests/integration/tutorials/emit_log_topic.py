"""Tutorial 5 (topics), the producer: publish one log line with a "<facility>.<severity>"
routing key on the topic exchange "topic_logs".

Usage: emit_log_topic.py AMQP_URL [ROUTING_KEY] [MESSAGE...]
"""

from __future__ import annotations

import sys

import pika


def main(argv: list[str]) -> int:
    routing_key = argv[2] if len(argv) > 2 else "anonymous.info"
    message = " ".join(argv[3:]) or "Hello World!"
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.exchange_declare(exchange="topic_logs", exchange_type="topic")
    channel.basic_publish(exchange="topic_logs", routing_key=routing_key, body=message.encode())
    print(f" [x] Sent {routing_key}:{message}", flush=True)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
