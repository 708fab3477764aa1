"""A pika client for the three-node compose cluster: it knows all three nodes and, when
the one it uses fails, carries on through another.

Any Warren node serves every queue, so a client needs no "right" node: it keeps the list
of all of them and moves to the next one when its connection drops. This one publishes
COUNT persistent messages with publisher confirms to a durable quorum queue, then
consumes and acks them; a message whose confirm did not arrive is published again, so
every message is received at least once (duplicates are counted once).

    python deploy/examples/pika_any_node.py                     # localhost:5672-5674
    WARREN_HOSTS=10.0.0.1:5672,10.0.0.2:5672 python deploy/examples/pika_any_node.py
    python deploy/examples/pika_any_node.py --count 10000 --queue orders

Kill the node it is connected to meanwhile (`docker kill <container>`): it says so, moves
to the next node and finishes. Exit status 0 once every message came back.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

import pika
import pika.exceptions

DEFAULT_HOSTS = "localhost:5672,localhost:5673,localhost:5674"
RETRY_PAUSE_S = 0.5  # between two connection attempts
GIVE_UP_S = 120.0  # no node reachable for this long: stop
CONSUME_IDLE_S = 10.0  # nothing more to consume for this long: stop

# What a dead or failing node looks like to pika: move on to the next one.
FAILOVER_ERRORS = (
    pika.exceptions.AMQPConnectionError,  # refused, lost, closed by the broker, ...
    pika.exceptions.AMQPChannelError,  # e.g. the queue's leader went down mid-operation
    pika.exceptions.NackError,  # the broker could not take a message (no quorum)
    pika.exceptions.UnroutableError,
    ConnectionError,
)


def parse_hosts(text: str) -> list[tuple[str, int]]:
    hosts = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        hosts.append((host or item.strip(), int(port) if port.isdigit() else 5672))
    return hosts


def connect(hosts: list[tuple[str, int]], start: int) -> tuple[pika.BlockingConnection, int]:
    """A connection to the first node that answers, trying them in turn from `start`."""
    credentials = pika.PlainCredentials(
        os.environ.get("WARREN_USER", "guest"), os.environ.get("WARREN_PASSWORD", "guest")
    )
    deadline = time.monotonic() + GIVE_UP_S
    i = start
    while True:
        host, port = hosts[i % len(hosts)]
        params = pika.ConnectionParameters(
            host=host,
            port=port,
            credentials=credentials,
            heartbeat=10,  # a silent node is given up after ~20 s
            socket_timeout=5,
            blocked_connection_timeout=30,
            connection_attempts=1,
        )
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPConnectionError as exc:
            print(f"cannot connect to {host}:{port} ({type(exc).__name__})", flush=True)
            if time.monotonic() > deadline:
                raise
            i += 1
            time.sleep(RETRY_PAUSE_S)
            continue
        print(f"connected to {host}:{port}", flush=True)
        return connection, i % len(hosts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default=os.environ.get("WARREN_HOSTS", DEFAULT_HOSTS))
    parser.add_argument("--queue", default="pika-any-node")
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    hosts = parse_hosts(args.hosts)
    run = uuid.uuid4().hex[:8]  # this run's messages are "RUN:N"; others are acked and skipped
    persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    confirmed = 0  # messages 0 .. confirmed-1 have their confirm
    received: set[int] = set()
    node, failovers = 0, 0
    while len(received) < args.count:
        try:
            connection, node = connect(hosts, node)
            try:
                channel = connection.channel()
                channel.confirm_delivery()  # basic_publish now waits for the broker's ack
                channel.queue_declare(
                    args.queue, durable=True, arguments={"x-queue-type": "quorum"}
                )
                while confirmed < args.count:
                    body = f"{run}:{confirmed}".encode()
                    channel.basic_publish("", args.queue, body, persistent, mandatory=True)
                    confirmed += 1
                    if confirmed % 500 == 0:
                        print(f"published {confirmed}", flush=True)
                channel.basic_qos(prefetch_count=200)
                for method, _props, body in channel.consume(
                    args.queue, inactivity_timeout=CONSUME_IDLE_S
                ):
                    if method is None:  # idle: nothing more is coming
                        break
                    tag, _, number = body.decode(errors="replace").partition(":")
                    if tag == run and number.isdigit():
                        received.add(int(number))
                    channel.basic_ack(method.delivery_tag)
                    if len(received) >= args.count:
                        break
                channel.cancel()
                break
            finally:
                if connection.is_open:
                    connection.close()
        except FAILOVER_ERRORS as exc:
            failovers += 1
            host, port = hosts[node]
            print(f"lost {host}:{port} ({type(exc).__name__}): moving to the next node", flush=True)
            node += 1
            time.sleep(RETRY_PAUSE_S)
    missing = args.count - len(received)
    print(
        f"done: {confirmed} confirmed, {len(received)} received, {missing} missing, "
        f"{failovers} failovers",
        flush=True,
    )
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
