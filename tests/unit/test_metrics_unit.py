"""node/metrics.py without sockets: a real BrokerNode (no listener, no cluster), its state
driven by commands, its counters set by hand, its registries scraped and parsed.
"""

from __future__ import annotations

import logging

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster import commands as c
from node.broker.types import ChannelRef, Properties
from node.config import NodeConfig
from node.logs import EventLogger
from node.metrics import GLOBAL_COUNTERS, registries
from node.server import BrokerNode
from node.stats import COUNTERS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CH = ChannelRef(1, 1)


def make_node(**config: object) -> BrokerNode:
    cfg = NodeConfig(name="unit@test", cluster_name="unit-cluster", **config)  # type: ignore[arg-type]
    return BrokerNode(cfg, EventLogger(logging.getLogger("test.metrics")))


def scrape(node: BrokerNode, path: str = "/metrics") -> tuple[str, Samples]:
    text = generate_latest(registries(node)[path]).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def types(text: str) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }


def publish(node: BrokerNode, queue: str, body: bytes = b"m") -> None:
    node.execute(
        c.Publish(
            channel=CH,
            vhost="/",
            exchange="",
            routing_key=queue,
            mandatory=False,
            properties=b"\x00\x00",
            props=Properties(),
            body=body,
        )
    )


def test_every_counter_is_exported_with_rabbitmq_types_and_labels() -> None:
    node = make_node()
    for n, name in enumerate(COUNTERS, start=1):
        setattr(node.stats, name, n)
    text, samples = scrape(node)
    kinds = types(text)
    for attribute, name, _help in GLOBAL_COUNTERS:
        assert kinds[name] == "counter", name
        assert value(samples, name, protocol="amqp091") == getattr(node.stats, attribute)
    assert value(samples, "rabbitmq_global_messages_delivered_total", protocol="amqp091") == (
        node.stats.delivered
    )
    for churn in ("connections_opened", "channels_closed", "queues_created", "queues_deleted"):
        name = f"rabbitmq_{churn}_total"
        assert kinds[name] == "counter"
        assert value(samples, name) == getattr(node.stats, churn)
    assert kinds["rabbitmq_identity_info"] == "untyped"
    assert kinds["rabbitmq_build_info"] == "untyped"
    assert kinds["rabbitmq_connections"] == "gauge"
    assert kinds["warren_confirm_latency_seconds"] == "histogram"


def test_identity_names_node_cluster_and_endpoint() -> None:
    node = make_node()
    for path, endpoint in (("/metrics", "aggregated"), ("/metrics/per-object", "per-object")):
        _, samples = scrape(node, path)
        labels = {
            "rabbitmq_node": "unit@test",
            "rabbitmq_cluster": "unit-cluster",
            "rabbitmq_endpoint": endpoint,
        }
        assert value(samples, "rabbitmq_identity_info", **labels) == 1


def test_queue_gauges_aggregated_and_per_object() -> None:
    node = make_node()
    node.execute(c.OpenChannel(channel=CH))
    node.execute(c.DeclareQueue(vhost="/", queue="a", owner=1))
    quorum = {"x-queue-type": "quorum"}
    node.execute(c.DeclareQueue(vhost="/", queue="b", owner=1, durable=True, arguments=quorum))
    for _ in range(3):
        publish(node, "a", b"12345")
    publish(node, "b", b"xy")
    node.execute(c.Get(channel=CH, vhost="/", queue="a", no_ack=False))  # one unacked

    text, samples = scrape(node)
    assert value(samples, "rabbitmq_queues") == 2
    assert value(samples, "rabbitmq_queue_messages_ready") == 3
    assert value(samples, "rabbitmq_queue_messages_unacked") == 1
    assert value(samples, "rabbitmq_queue_messages") == 4
    assert value(samples, "rabbitmq_queue_messages_bytes") == 3 * 5 + 2
    assert 'queue="' not in text  # aggregated: no per-queue series

    _, per = scrape(node, "/metrics/per-object")
    assert value(per, "rabbitmq_queue_messages_ready", vhost="/", queue="a") == 2
    assert value(per, "rabbitmq_queue_messages_unacked", vhost="/", queue="a") == 1
    assert value(per, "rabbitmq_queue_messages_ready", vhost="/", queue="b") == 1
    assert value(per, "rabbitmq_queue_messages_bytes", vhost="/", queue="b") == 2
    assert (
        value(
            per,
            "rabbitmq_queue_info",
            vhost="/",
            queue="b",
            queue_type="rabbit_quorum_queue",
            membership="leader",
        )
        == 1
    )
    assert ("rabbitmq_queue_messages_ready", frozenset()) not in per


def test_metrics_stay_constant_size_as_queues_grow() -> None:
    node = make_node()
    sizes = []
    for count in (1, 50):
        for i in range(count):
            node.execute(c.DeclareQueue(vhost="/", queue=f"q{count}-{i}", owner=1))
        text, _ = scrape(node)
        sizes.append(len([line for line in text.splitlines() if not line.startswith("#")]))
    assert sizes[0] == sizes[1]
    _, per = scrape(node, "/metrics/per-object")
    assert sum(1 for name, _ in per if name == "rabbitmq_queue_messages_ready") == 51


def test_resources_memory_limit_and_alarm() -> None:
    node = make_node(memory_high_watermark_bytes=123456789)
    _, samples = scrape(node)
    assert value(samples, "rabbitmq_resident_memory_limit_bytes") == 123456789
    assert value(samples, "rabbitmq_process_resident_memory_bytes") > 1_000_000
    assert value(samples, "rabbitmq_disk_space_available_bytes") > 0
    assert value(samples, "rabbitmq_process_open_fds") > 0
    assert value(samples, "rabbitmq_process_max_fds") >= value(samples, "rabbitmq_process_open_fds")
    assert value(samples, "rabbitmq_alarms_memory_used_watermark") == 0
    node.alarm = True
    _, samples = scrape(node)
    assert value(samples, "rabbitmq_alarms_memory_used_watermark") == 1


def test_confirm_latency_histogram_is_the_nodes() -> None:
    node = make_node()
    node.stats.confirm_latency.observe(0.003)
    _, samples = scrape(node)
    assert value(samples, "warren_confirm_latency_seconds_count") == 1
    assert value(samples, "warren_confirm_latency_seconds_bucket", le="0.005") == 1
    assert value(samples, "warren_confirm_latency_seconds_bucket", le="0.0025") == 0


def test_two_nodes_in_one_process_do_not_share_metrics() -> None:
    first, second = make_node(), make_node()
    first.stats.received = 7
    _, a = scrape(first)
    _, b = scrape(second)
    assert value(a, "rabbitmq_global_messages_received_total", protocol="amqp091") == 7
    assert value(b, "rabbitmq_global_messages_received_total", protocol="amqp091") == 0


def test_no_cluster_no_raft_metrics() -> None:
    text, _ = scrape(make_node())
    assert "rabbitmq_raft_" not in text
    assert "warren_raft_" not in text
