"""Prometheus metrics of a real three-node cluster: pika traffic through several nodes, then
every node's /metrics and /metrics/per-object scraped and compared with what was done.

Counters count on the node the client is connected to, so their sum over the nodes is the
cluster's total; queue gauges are reported by the queue's leader only. Counters are
compared as differences across a test (the cluster is shared by the module's tests).
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.support import Cluster, build_cluster, free_port, unique, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PERSISTENT = pika.BasicProperties(delivery_mode=2)
COUNTER_WAIT_S = 10.0


# ---- helpers (tests/cluster/test_dashboards.py uses them too) ------------------------------


@contextlib.contextmanager
def metrics_cluster(tmp: Path, *extra: str) -> Iterator[tuple[Cluster, list[int]]]:
    """A started three-node cluster whose nodes serve Prometheus metrics; (cluster, the
    nodes' metrics ports)."""
    cluster = build_cluster(tmp, extra=extra)
    ports = []
    for node in cluster.nodes:
        port = free_port()
        ports.append(port)
        node.extra = (*node.extra, "--metrics-port", str(port))  # the last one counts
    try:
        cluster.start()
        yield cluster, ports
    finally:
        cluster.close()


def scrape_text(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def scrape(port: int, path: str = "/metrics") -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(port, path)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def total(samples: list[Samples], name: str, **labels: str) -> float:
    return sum(value(s, name, **labels) for s in samples)


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[int]]]:
    with metrics_cluster(tmp_path_factory.mktemp("metrics")) as pair:
        yield pair


@pytest.fixture
def cluster(mc: tuple[Cluster, list[int]]) -> Cluster:
    return mc[0]


@pytest.fixture
def ports(mc: tuple[Cluster, list[int]]) -> list[int]:
    return mc[1]


def scrape_all(ports: list[int], path: str = "/metrics") -> list[Samples]:
    return [scrape(p, path) for p in ports]


GLOBAL = (
    "received",
    "received_confirm",
    "routed",
    "confirmed",
    "unroutable_dropped",
    "unroutable_returned",
    "delivered",
    "delivered_consume_manual_ack",
    "redelivered",
    "acknowledged",
    "get_empty",
)


def global_counts(ports: list[int]) -> list[dict[str, float]]:
    """Per node, the rabbitmq_global_messages_*_total counters by short name."""
    out = []
    for s in scrape_all(ports):
        out.append(
            {
                name: value(s, f"rabbitmq_global_messages_{name}_total", protocol="amqp091")
                for name in GLOBAL
            }
        )
    return out


def deltas(before: list[dict[str, float]], after: list[dict[str, float]]) -> list[dict[str, int]]:
    return [{k: int(a[k] - b[k]) for k in a} for b, a in zip(before, after, strict=True)]


# ---- tests ---------------------------------------------------------------------------------


def test_global_counters_sum_to_what_clients_did(cluster: Cluster, ports: list[int]) -> None:
    queue = unique("m-global")
    cluster.channel(0).queue_declare(queue, durable=True)
    assert cluster.queue_leader(0, queue) == "w1"
    before = global_counts(ports)

    via1 = cluster.channel(1, confirm=True)
    for i in range(20):
        via1.basic_publish("", queue, b"p%d" % i, PERSISTENT)
    via2 = cluster.channel(2, confirm=True)
    for i in range(10):
        via2.basic_publish("", queue, b"t%d" % i)
    with pytest.raises(pika.exceptions.UnroutableError):
        via1.basic_publish("", unique("nowhere"), b"x", mandatory=True)
    cluster.channel(2).basic_publish("", unique("nowhere"), b"dropped")

    consumer = cluster.channel(2)  # a remote consumer: the queue's leader is w1
    consumer.basic_qos(prefetch_count=50)
    taken = 0
    nacked = False
    for method, _props, _body in consumer.consume(queue, inactivity_timeout=5):
        assert method is not None, f"only {taken} of 30 messages arrived"
        if not nacked:
            consumer.basic_nack(method.delivery_tag, requeue=True)
            nacked = True
            continue
        consumer.basic_ack(method.delivery_tag)
        taken += 1
        if taken == 30:
            break
    consumer.cancel()
    getter = cluster.channel(0)
    assert getter.basic_get(queue)[0] is None

    expected = {
        "received": 32,
        "received_confirm": 31,
        "routed": 30,
        "confirmed": 31,
        "unroutable_dropped": 1,
        "unroutable_returned": 1,
        "delivered": 31,
        "delivered_consume_manual_ack": 31,
        "redelivered": 1,
        "acknowledged": 30,
        "get_empty": 1,
    }

    def summed() -> dict[str, int]:
        per_node = deltas(before, global_counts(ports))
        return {k: sum(d[k] for d in per_node) for k in expected}

    wait_until(lambda: summed() == expected, COUNTER_WAIT_S, f"cluster totals {expected}")
    per_node = deltas(before, global_counts(ports))
    # Each event counts once, at the node the client is connected to.
    assert [d["received"] for d in per_node] == [0, 21, 11]
    assert [d["confirmed"] for d in per_node] == [0, 21, 10]
    assert [d["unroutable_returned"] for d in per_node] == [0, 1, 0]
    assert [d["unroutable_dropped"] for d in per_node] == [0, 0, 1]
    assert [d["delivered"] for d in per_node] == [0, 0, 31]
    assert [d["acknowledged"] for d in per_node] == [0, 0, 30]
    assert [d["get_empty"] for d in per_node] == [1, 0, 0]


def test_queue_gauges_come_from_the_leader_only(cluster: Cluster, ports: list[int]) -> None:
    on_w1, on_w3 = unique("m-led1"), unique("m-led3")
    cluster.channel(0).queue_declare(on_w1)
    cluster.channel(2).queue_declare(on_w3, durable=True)
    assert (cluster.queue_leader(0, on_w1), cluster.queue_leader(0, on_w3)) == ("w1", "w3")
    publisher = cluster.channel(1, confirm=True)  # leads neither queue
    for i in range(7):
        publisher.basic_publish("", on_w1, b"%d" % i)
    for _ in range(5):
        publisher.basic_publish("", on_w3, b"12345678", PERSISTENT)

    def queue_series(name: str) -> list[dict[str, float]]:
        """Per node: queue -> value of `name` for our two queues."""
        out = []
        for s in scrape_all(ports, "/metrics/per-object"):
            out.append(
                {
                    q: v
                    for labels, v in series(s, name).items()
                    if (q := dict(labels).get("queue")) in (on_w1, on_w3)
                }
            )
        return out

    assert queue_series("rabbitmq_queue_messages_ready") == [{on_w1: 7}, {}, {on_w3: 5}]
    assert queue_series("rabbitmq_queue_messages_bytes") == [{on_w1: 7}, {}, {on_w3: 40}]
    w1 = scrape(ports[0], "/metrics/per-object")
    info = series(w1, "rabbitmq_queue_info")
    assert (
        info[
            frozenset(
                {
                    "vhost": "/",
                    "queue": on_w1,
                    "queue_type": "rabbit_classic_queue",
                    "membership": "leader",
                }.items()
            )
        ]
        == 1
    )

    # A consumer on w2 of a queue led by w1 is counted by w1, with its unacked messages.
    consumer = cluster.channel(1)
    consumer.basic_qos(prefetch_count=3)
    consumer.basic_consume(on_w1, lambda *args: None)
    expected = {
        "rabbitmq_queue_messages_ready": [{on_w1: 4}, {}, {on_w3: 5}],
        "rabbitmq_queue_messages_unacked": [{on_w1: 3}, {}, {on_w3: 0}],
        "rabbitmq_queue_messages": [{on_w1: 7}, {}, {on_w3: 5}],
        "rabbitmq_queue_consumers": [{on_w1: 1}, {}, {on_w3: 0}],
    }

    def gauges() -> dict[str, list[dict[str, float]]]:
        consumer.connection.process_data_events(0)
        return {name: queue_series(name) for name in expected}

    wait_until(lambda: gauges() == expected, COUNTER_WAIT_S, f"per-queue gauges {expected}")

    # /metrics sums the same figures per node: the sum over nodes is the cluster's.
    aggregated, per_object = scrape_all(ports), scrape_all(ports, "/metrics/per-object")
    for name in expected:
        agg = [value(s, name) for s in aggregated]
        per = [sum(series(s, name).values()) for s in per_object]
        assert agg == per, name
    queues_total = total(aggregated, "rabbitmq_queues")
    assert queues_total == len(cluster.queues(0))
    assert total(aggregated, "rabbitmq_consumers") >= 1
    for s in aggregated:
        assert not any("queue" in dict(labels) for (_n, labels) in s), "per-queue series"


def test_connection_and_channel_gauges_and_churn(cluster: Cluster, ports: list[int]) -> None:
    def figures() -> dict[str, float]:
        s = scrape(ports[1])
        return {
            "connections": value(s, "rabbitmq_connections"),
            "channels": value(s, "rabbitmq_channels"),
            "connections_opened": value(s, "rabbitmq_connections_opened_total"),
            "connections_closed": value(s, "rabbitmq_connections_closed_total"),
            "channels_opened": value(s, "rabbitmq_channels_opened_total"),
            "channels_closed": value(s, "rabbitmq_channels_closed_total"),
        }

    # Connections of earlier tests close asynchronously: start from a settled node.
    wait_until(lambda: figures()["connections"] == 0, COUNTER_WAIT_S, "no connection on w2")
    before = figures()
    first, second = cluster.nodes[1].connect(), cluster.nodes[1].connect()
    try:
        first.channel()
        first.channel()
        second.channel()
        opened = {
            "connections": 2,
            "channels": 3,
            "connections_opened": 2,
            "connections_closed": 0,
            "channels_opened": 3,
            "channels_closed": 0,
        }
        wait_until(
            lambda: {k: v - before[k] for k, v in figures().items()} == opened,
            COUNTER_WAIT_S,
            f"{opened}",
        )
    finally:
        first.close()
        second.close()
    closed = {
        "connections": 0,
        "channels": 0,
        "connections_opened": 2,
        "connections_closed": 2,
        "channels_opened": 3,
        "channels_closed": 3,
    }
    wait_until(
        lambda: {k: v - before[k] for k, v in figures().items()} == closed,
        COUNTER_WAIT_S,
        f"{closed}",
    )
    # Nothing on the other nodes.
    for port in (ports[0], ports[2]):
        assert value(scrape(port), "rabbitmq_connections") == 0


def test_global_publishers_and_consumers_count_at_the_clients_node(
    cluster: Cluster, ports: list[int]
) -> None:
    """A consumer on w2 of a queue led by w1 counts on w2 (rabbitmq_consumers, the queue's
    figure, stays on w1); a publishing connection counts on its node."""
    queue = unique("gc")
    owner = cluster.nodes[0].connect()
    client = cluster.nodes[1].connect()
    try:
        owner.channel().queue_declare(queue)
        channel = client.channel()
        channel.basic_consume(queue, lambda *_: None, auto_ack=True)
        channel.basic_consume(queue, lambda *_: None, auto_ack=True)
        channel.basic_publish("", queue, b"x")

        def figures() -> tuple[float, ...]:
            on = [scrape(p) for p in ports]
            label = {"protocol": "amqp091"}
            return (
                value(on[1], "rabbitmq_global_consumers", **label),
                value(on[1], "rabbitmq_global_publishers", **label),
                value(on[0], "rabbitmq_global_consumers", **label),
            )

        wait_until(lambda: figures() == (2, 1, 0), COUNTER_WAIT_S, "consumers 2 / publishers 1")
    finally:
        with contextlib.suppress(Exception):
            owner.channel().queue_delete(queue)
        owner.close()
        client.close()


def test_queue_churn_counters(cluster: Cluster, ports: list[int]) -> None:
    def churn() -> list[float]:
        s = scrape(ports[2])
        return [
            value(s, "rabbitmq_queues_declared_total"),
            value(s, "rabbitmq_queues_created_total"),
            value(s, "rabbitmq_queues_deleted_total"),
        ]

    before = churn()
    ch = cluster.channel(2)
    name = unique("m-churn")
    ch.queue_declare(name)
    ch.queue_declare(name)
    ch.queue_declare(name, passive=True)
    ch.queue_delete(name)
    assert [a - b for a, b in zip(churn(), before, strict=True)] == [3, 1, 1]


def test_identity_raft_and_replication(cluster: Cluster, ports: list[int]) -> None:
    queue, transient = unique("m-raft"), unique("m-link")
    cluster.channel(0).queue_declare(queue, durable=True)
    cluster.channel(0).queue_declare(transient)
    names = ("warren_durable_messages_written_total", "warren_link_forwarded_messages_total")
    before = [[value(s, n) for n in names] for s in scrape_all(ports)]
    publisher = cluster.channel(2, confirm=True)
    for _ in range(5):
        publisher.basic_publish("", queue, b"durable", PERSISTENT)
    for _ in range(4):
        publisher.basic_publish("", transient, b"forwarded")
    after = [[value(s, n) for n in names] for s in scrape_all(ports)]
    durable_written = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    assert durable_written == 5
    forwarded = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    assert forwarded[2] >= 4  # w3 forwarded the transient ones to w1

    samples = scrape_all(ports)
    for i, s in enumerate(samples):
        name = cluster.nodes[i].name
        assert series(s, "rabbitmq_identity_info") == {
            frozenset(
                {
                    "rabbitmq_node": name,
                    "rabbitmq_cluster": "warren",
                    "rabbitmq_endpoint": "aggregated",
                }.items()
            ): 1
        }
        ups = series(s, "warren_cluster_member_up")
        assert {dict(k)["member"]: v for k, v in ups.items()} == {"w1": 1, "w2": 1, "w3": 1}
        assert value(s, "rabbitmq_raft_log_commit_index") > 0
        assert value(s, "warren_raft_has_quorum") == 1
        assert value(s, "warren_raft_apply_lag") >= 0
        assert value(s, "rabbitmq_build_info", **_build_labels(s)) == 1
    leaders = [value(s, "warren_raft_role", role="leader") for s in samples]
    assert sorted(leaders) == [0, 0, 1]
    assert len({value(s, "rabbitmq_raft_term_total") for s in samples}) == 1
    # The publishing node timed commits and confirms.
    w3 = samples[2]
    assert value(w3, "warren_raft_commit_latency_seconds_count") > 0
    assert value(w3, "rabbitmq_raft_entry_commit_latency_seconds") > 0
    assert value(w3, "warren_confirm_latency_seconds_count") > 0
    assert sum(value(s, "warren_durable_batch_messages_count") for s in samples) > 0


def _build_labels(s: Samples) -> dict[str, str]:
    (labels,) = series(s, "rabbitmq_build_info")
    return dict(labels)


def test_metrics_size_does_not_grow_with_queues(cluster: Cluster, ports: list[int]) -> None:
    def lines(path: str) -> int:
        text = scrape_text(ports[0], path)
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    before, before_per_object = lines("/metrics"), lines("/metrics/per-object")
    ch = cluster.channel(0)
    for _ in range(10):
        ch.queue_declare(unique("m-size"))
    deadline = time.monotonic() + COUNTER_WAIT_S
    while lines("/metrics/per-object") < before_per_object + 10 * 6:
        assert time.monotonic() < deadline, "per-object series for the new queues"
        time.sleep(0.1)
    assert lines("/metrics") == before
