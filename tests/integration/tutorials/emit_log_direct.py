"""Tutorial 4 (routing), the producer: publish one log line with its severity as the
routing key on the direct exchange "direct_logs".

Usage: emit_log_direct.py AMQP_URL [SEVERITY] [MESSAGE...]
"""

from __future__ import annotations

import sys

import pika


def main(argv: list[str]) -> int:
    severity = argv[2] if len(argv) > 2 else "info"
    message = " ".join(argv[3:]) or "Hello World!"
    connection = pika.BlockingConnection(pika.URLParameters(argv[1]))
    channel = connection.channel()
    channel.exchange_declare(exchange="direct_logs", exchange_type="direct")
    channel.basic_publish(exchange="direct_logs", routing_key=severity, body=message.encode())
    print(f" [x] Sent {severity}:{message}", flush=True)
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
