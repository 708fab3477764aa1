"""/metrics and /metrics/per-object of one real node, after pika traffic: exact counts, and
names, types and HELP texts as RabbitMQ's rabbitmq_prometheus has them."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
AMQP = {"protocol": "amqp091"}

# (type, HELP) of every rabbitmq_* metric Warren shares with RabbitMQ, as RabbitMQ 3.10.8's
# rabbitmq_prometheus printed them (its /metrics, scraped next to Warren's).
RABBITMQ_3_10: dict[str, tuple[str, str]] = {
    "rabbitmq_identity_info": ("untyped", "RabbitMQ node & cluster identity info"),
    "rabbitmq_build_info": ("untyped", "RabbitMQ & Erlang/OTP version info"),
    "rabbitmq_connections": ("gauge", "Connections currently open"),
    "rabbitmq_channels": ("gauge", "Channels currently open"),
    "rabbitmq_consumers": ("gauge", "Consumers currently connected"),
    "rabbitmq_queues": ("gauge", "Queues available"),
    "rabbitmq_connections_opened_total": ("counter", "Total number of connections opened"),
    "rabbitmq_connections_closed_total": (
        "counter",
        "Total number of connections closed or terminated",
    ),
    "rabbitmq_channels_opened_total": ("counter", "Total number of channels opened"),
    "rabbitmq_channels_closed_total": ("counter", "Total number of channels closed"),
    "rabbitmq_queues_declared_total": ("counter", "Total number of queues declared"),
    "rabbitmq_queues_created_total": ("counter", "Total number of queues created"),
    "rabbitmq_queues_deleted_total": ("counter", "Total number of queues deleted"),
    "rabbitmq_global_messages_received_total": (
        "counter",
        "Total number of messages received from publishers",
    ),
    "rabbitmq_global_messages_received_confirm_total": (
        "counter",
        "Total number of messages received from publishers expecting confirmations",
    ),
    "rabbitmq_global_messages_routed_total": (
        "counter",
        "Total number of messages routed to queues or streams",
    ),
    "rabbitmq_global_messages_unroutable_dropped_total": (
        "counter",
        "Total number of messages published as non-mandatory into an exchange and dropped as "
        "unroutable",
    ),
    "rabbitmq_global_messages_unroutable_returned_total": (
        "counter",
        "Total number of messages published as mandatory into an exchange and returned to the "
        "publisher as unroutable",
    ),
    "rabbitmq_global_messages_confirmed_total": (
        "counter",
        "Total number of messages confirmed to publishers",
    ),
    "rabbitmq_global_messages_delivered_total": (
        "counter",
        "Total number of messages delivered to consumers",
    ),
    "rabbitmq_global_messages_delivered_consume_manual_ack_total": (
        "counter",
        "Total number of messages delivered to consumers using basic.consume with manual "
        "acknowledgment",
    ),
    "rabbitmq_global_messages_delivered_consume_auto_ack_total": (
        "counter",
        "Total number of messages delivered to consumers using basic.consume with automatic "
        "acknowledgment",
    ),
    "rabbitmq_global_messages_delivered_get_manual_ack_total": (
        "counter",
        "Total number of messages delivered to consumers using basic.get with manual "
        "acknowledgment",
    ),
    "rabbitmq_global_messages_delivered_get_auto_ack_total": (
        "counter",
        "Total number of messages delivered to consumers using basic.get with automatic "
        "acknowledgment",
    ),
    "rabbitmq_global_messages_get_empty_total": (
        "counter",
        "Total number of times basic.get operations fetched no message",
    ),
    "rabbitmq_global_messages_redelivered_total": (
        "counter",
        "Total number of messages redelivered to consumers",
    ),
    "rabbitmq_global_messages_acknowledged_total": (
        "counter",
        "Total number of messages acknowledged by consumers",
    ),
    "rabbitmq_queue_messages_ready": ("gauge", "Messages ready to be delivered to consumers"),
    "rabbitmq_queue_messages_unacked": (
        "gauge",
        "Messages delivered to consumers but not yet acknowledged",
    ),
    "rabbitmq_queue_messages": (
        "gauge",
        "Sum of ready and unacknowledged messages - total queue depth",
    ),
    "rabbitmq_queue_messages_bytes": (
        "gauge",
        "Size in bytes of ready and unacknowledged messages",
    ),
    "rabbitmq_queue_consumers": ("gauge", "Consumers on a queue"),
    "rabbitmq_process_open_fds": ("gauge", "Open file descriptors"),
    "rabbitmq_process_max_fds": ("gauge", "Open file descriptors limit"),
    "rabbitmq_process_resident_memory_bytes": ("gauge", "Memory used in bytes"),
    "rabbitmq_resident_memory_limit_bytes": ("gauge", "Memory high watermark in bytes"),
    "rabbitmq_disk_space_available_bytes": ("gauge", "Disk space available in bytes"),
    "rabbitmq_alarms_memory_used_watermark": (
        "untyped",
        "is 1 if VM memory watermark alarm is in effect",
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics_node(start_node: Callable[..., Any]) -> tuple[Any, int]:
    port = free_port()
    node = start_node("--metrics-port", str(port), "--memory-high-watermark", "256MiB")
    deadline = time.monotonic() + 10
    while True:  # the AMQP port is bound first, the metrics port a moment later
        try:
            fetch(port, "/metrics")
            return node, port
        except OSError:
            assert time.monotonic() < deadline, "metrics port not listening"
            time.sleep(0.05)


def test_counts_after_traffic(metrics_node: tuple[Any, int]) -> None:
    node, port = metrics_node
    queue = f"metrics-{uuid.uuid4().hex[:12]}"
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue)
        for i in range(6):
            ch.basic_publish("", queue, b"body-%d" % i)
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", "nowhere", b"x", mandatory=True)
        plain = conn.channel()
        plain.basic_publish("", "nowhere", b"y")
        method, _, _ = plain.basic_get(queue, auto_ack=True)  # get, auto ack
        assert method is not None
        method, _, _ = plain.basic_get(queue)  # get, manual ack: nack and requeue it
        assert method is not None
        plain.basic_nack(method.delivery_tag, requeue=True)
        for got, (method, _props, _body) in enumerate(
            plain.consume(queue, inactivity_timeout=5), start=1
        ):
            assert method is not None, f"{got - 1} of 5 consumed"
            plain.basic_ack(method.delivery_tag)
            if got == 5:
                break
        plain.cancel()
        assert plain.basic_get(queue)[0] is None  # get-empty
        ch.queue_declare(queue, passive=True)
        holder = conn.channel()
        holder.basic_publish("", queue, b"12345")  # one left ready (5 bytes)

        def counts() -> Samples:
            return parse(fetch(port, "/metrics")[2])

        deadline = time.monotonic() + 5
        while value(counts(), "rabbitmq_global_messages_acknowledged_total", **AMQP) < 5:
            assert time.monotonic() < deadline, "acks not counted"
            time.sleep(0.05)
        s = counts()
        expected = {
            "received": 9,
            "received_confirm": 7,
            "routed": 7,
            "confirmed": 7,
            "unroutable_returned": 1,
            "unroutable_dropped": 1,
            "delivered": 7,
            "delivered_get_auto_ack": 1,
            "delivered_get_manual_ack": 1,
            "delivered_consume_manual_ack": 5,
            "delivered_consume_auto_ack": 0,
            "redelivered": 1,
            "acknowledged": 5,
            "get_empty": 1,
        }
        got_counts = {k: value(s, f"rabbitmq_global_messages_{k}_total", **AMQP) for k in expected}
        assert got_counts == expected
        assert value(s, "rabbitmq_connections") == 1
        assert value(s, "rabbitmq_channels") == 3
        assert value(s, "rabbitmq_connections_opened_total") == 1
        assert value(s, "rabbitmq_channels_opened_total") == 3
        assert value(s, "rabbitmq_queues_declared_total") == 2
        assert value(s, "rabbitmq_queues_created_total") == 1
        assert value(s, "rabbitmq_queues") == 1
        assert value(s, "rabbitmq_queue_messages_ready") == 1
        assert value(s, "rabbitmq_queue_messages_bytes") == 5
        assert value(s, "rabbitmq_resident_memory_limit_bytes") == 256 * 2**20
        assert value(s, "warren_confirm_latency_seconds_count") >= 1

        per = parse(fetch(port, "/metrics/per-object")[2])
        assert value(per, "rabbitmq_queue_messages_ready", vhost="/", queue=queue) == 1
        assert value(per, "rabbitmq_queue_messages_unacked", vhost="/", queue=queue) == 0
    finally:
        conn.close()
    deadline = time.monotonic() + 5
    while value(parse(fetch(port, "/metrics")[2]), "rabbitmq_connections_closed_total") != 1:
        assert time.monotonic() < deadline, "connection close not counted"
        time.sleep(0.05)
    s = parse(fetch(port, "/metrics")[2])
    assert value(s, "rabbitmq_connections") == 0
    assert value(s, "rabbitmq_channels") == 0
    assert value(s, "rabbitmq_channels_closed_total") == 3


def test_names_types_and_help_match_rabbitmq(metrics_node: tuple[Any, int]) -> None:
    _node, port = metrics_node
    status, content_type, text = fetch(port, "/metrics")
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    types = {}
    helps = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("# HELP "):
            _, _, name, help_text = line.split(" ", 3)
            helps[name] = help_text
    for name, (kind, help_text) in RABBITMQ_3_10.items():
        assert (types.get(name), helps.get(name)) == (kind, help_text), name
    assert "rabbitmq_raft_term_total" not in types  # no cluster, no Raft


def test_identity_and_endpoints(metrics_node: tuple[Any, int]) -> None:
    node, port = metrics_node
    name = f"test-{node.port}"
    for path, endpoint in (("/metrics", "aggregated"), ("/metrics/per-object", "per-object")):
        status, _, text = fetch(port, path)
        assert status == 200, path
        labels = {
            "rabbitmq_node": name,
            "rabbitmq_cluster": "warren",
            "rabbitmq_endpoint": endpoint,
        }
        assert value(parse(text), "rabbitmq_identity_info", **labels) == 1
    assert fetch(port, "/metrics/nope")[0] == 404
    assert fetch(port, "/")[0] == 404
