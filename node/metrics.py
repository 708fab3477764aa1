"""The node's Prometheus endpoint: `/metrics` and `/metrics/per-object`, read from the live
node at scrape time.

Rules:
- One `CollectorRegistry` per node and endpoint (never prometheus-client's global registry:
  several nodes may share a process in tests).
- Values are read from the node when Prometheus scrapes: nothing here runs on the message
  path, and nothing here changes the node. The counters are `BrokerNode.stats`
  (node/stats.py), the Raft and link figures `ClusterNode`'s (cluster/node.py).
- Names, types, HELP texts and labels follow rabbitmq_prometheus where it has the metric,
  so that its dashboards and alerts work unchanged (they join on `rabbitmq_identity_info`
  by instance and job); Warren's own metrics are `warren_*`.
- Sums over the nodes of a cluster are the cluster's totals: the `rabbitmq_global_*` and
  churn counters count on the node the client is connected to, once per event; the queue
  gauges (and `rabbitmq_queues`, `rabbitmq_consumers`) are reported by the queue's leader
  only.
- `/metrics` is aggregated: its size does not grow with the number of queues.
  `/metrics/per-object` has one set of `rabbitmq_queue_*` series per queue led here,
  labelled `vhost` and `queue`, and everything else `/metrics` has.
Differences from RabbitMQ (docs/monitoring.md): no `queue_type` label on the delivery
counters (Warren's counters do not tell queue types apart), no Erlang VM metrics.
This module imports nothing from the protocol or the broker model.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector

from node import __version__
from node.http import HttpServer, Request, Response, Router
from node.logs import EventLogger

if TYPE_CHECKING:
    from cluster.node import ClusterNode
    from node.broker.views import QueueView
    from node.server import BrokerNode
    from node.stats import NodeStats

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
PROTOCOL: Final = "amqp091"  # the `protocol` label of the global counters
AGGREGATED: Final = "aggregated"  # rabbitmq_identity_info's rabbitmq_endpoint, per path
PER_OBJECT: Final = "per-object"
RAFT_ROLES: Final = ("follower", "candidate", "leader")
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLIENT_VERSION: Final = metadata.version("prometheus-client")

# rabbitmq_global_* counters: (NodeStats attribute, metric name, RabbitMQ's HELP text).
GLOBAL_COUNTERS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "received",
        "rabbitmq_global_messages_received_total",
        "Total number of messages received from publishers",
    ),
    (
        "received_confirm",
        "rabbitmq_global_messages_received_confirm_total",
        "Total number of messages received from publishers expecting confirmations",
    ),
    (
        "routed",
        "rabbitmq_global_messages_routed_total",
        "Total number of messages routed to queues or streams",
    ),
    (
        "unroutable_dropped",
        "rabbitmq_global_messages_unroutable_dropped_total",
        "Total number of messages published as non-mandatory into an exchange and dropped "
        "as unroutable",
    ),
    (
        "unroutable_returned",
        "rabbitmq_global_messages_unroutable_returned_total",
        "Total number of messages published as mandatory into an exchange and returned to "
        "the publisher as unroutable",
    ),
    (
        "confirmed",
        "rabbitmq_global_messages_confirmed_total",
        "Total number of messages confirmed to publishers",
    ),
    (
        "delivered",
        "rabbitmq_global_messages_delivered_total",
        "Total number of messages delivered to consumers",
    ),
    (
        "delivered_consume_manual_ack",
        "rabbitmq_global_messages_delivered_consume_manual_ack_total",
        "Total number of messages delivered to consumers using basic.consume with manual "
        "acknowledgment",
    ),
    (
        "delivered_consume_auto_ack",
        "rabbitmq_global_messages_delivered_consume_auto_ack_total",
        "Total number of messages delivered to consumers using basic.consume with automatic "
        "acknowledgment",
    ),
    (
        "delivered_get_manual_ack",
        "rabbitmq_global_messages_delivered_get_manual_ack_total",
        "Total number of messages delivered to consumers using basic.get with manual "
        "acknowledgment",
    ),
    (
        "delivered_get_auto_ack",
        "rabbitmq_global_messages_delivered_get_auto_ack_total",
        "Total number of messages delivered to consumers using basic.get with automatic "
        "acknowledgment",
    ),
    (
        "get_empty",
        "rabbitmq_global_messages_get_empty_total",
        "Total number of times basic.get operations fetched no message",
    ),
    (
        "redelivered",
        "rabbitmq_global_messages_redelivered_total",
        "Total number of messages redelivered to consumers",
    ),
    (
        "acknowledged",
        "rabbitmq_global_messages_acknowledged_total",
        "Total number of messages acknowledged by consumers",
    ),
    (
        "nacked",
        "warren_global_messages_nacked_total",
        "Total number of messages negatively confirmed (basic.nack) to publishers",
    ),
)

# Connection, channel and queue churn (no labels): (NodeStats attribute, name, HELP).
CHURN_COUNTERS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "connections_opened",
        "rabbitmq_connections_opened_total",
        "Total number of connections opened",
    ),
    (
        "connections_closed",
        "rabbitmq_connections_closed_total",
        "Total number of connections closed or terminated",
    ),
    ("channels_opened", "rabbitmq_channels_opened_total", "Total number of channels opened"),
    ("channels_closed", "rabbitmq_channels_closed_total", "Total number of channels closed"),
    ("queues_declared", "rabbitmq_queues_declared_total", "Total number of queues declared"),
    ("queues_created", "rabbitmq_queues_created_total", "Total number of queues created"),
    ("queues_deleted", "rabbitmq_queues_deleted_total", "Total number of queues deleted"),
)

# Queue gauges, summed in /metrics, per queue in /metrics/per-object: (name, HELP, value).
QUEUE_GAUGES: Final[tuple[tuple[str, str, Callable[[QueueView], int]], ...]] = (
    (
        "rabbitmq_queue_messages_ready",
        "Messages ready to be delivered to consumers",
        lambda q: q.messages,
    ),
    (
        "rabbitmq_queue_messages_unacked",
        "Messages delivered to consumers but not yet acknowledged",
        lambda q: q.unacked,
    ),
    (
        "rabbitmq_queue_messages",
        "Sum of ready and unacknowledged messages - total queue depth",
        lambda q: q.messages + q.unacked,
    ),
    (
        "rabbitmq_queue_messages_bytes",
        "Size in bytes of ready and unacknowledged messages",
        lambda q: q.message_bytes,
    ),
    ("rabbitmq_queue_consumers", "Consumers on a queue", lambda q: q.consumers),
)

# x-queue-type -> rabbitmq_queue_info's queue_type (RabbitMQ's module names).
QUEUE_TYPES: Final = {"classic": "rabbit_classic_queue", "quorum": "rabbit_quorum_queue"}


class NodeCollector(Collector):
    """Every rabbitmq_* and warren_* metric of one node (see the module rules)."""

    def __init__(self, node: BrokerNode, *, per_object: bool) -> None:
        self.node = node
        self.per_object = per_object

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield from self._identity()
        yield from _stats_metrics(node.stats)
        yield from self._clients()
        yield from self._queues()
        yield from self._resources()
        if node.cluster is not None:
            yield from _cluster_metrics(node.cluster)

    def _identity(self) -> Iterator[Metric]:
        config = self.node.config
        identity = UnknownMetricFamily(
            "rabbitmq_identity_info",
            "RabbitMQ node & cluster identity info",
            labels=["rabbitmq_node", "rabbitmq_cluster", "rabbitmq_endpoint"],
        )
        endpoint = PER_OBJECT if self.per_object else AGGREGATED
        identity.add_metric([config.name, config.cluster_name, endpoint], 1)
        yield identity
        build = UnknownMetricFamily(
            "rabbitmq_build_info",
            "RabbitMQ & Erlang/OTP version info",
            labels=[
                "rabbitmq_version",
                "prometheus_plugin_version",
                "prometheus_client_version",
                "product_name",
                "product_version",
                "python_version",
            ],
        )
        build.add_metric(
            [
                __version__,
                __version__,
                _CLIENT_VERSION,
                "Warren",
                __version__,
                platform.python_version(),
            ],
            1,
        )
        yield build

    def _clients(self) -> Iterator[Metric]:
        connections = list(self.node.connections.values())
        yield GaugeMetricFamily(
            "rabbitmq_connections", "Connections currently open", value=len(connections)
        )
        yield GaugeMetricFamily(
            "rabbitmq_channels",
            "Channels currently open",
            value=sum(len(c.channels) for c in connections),
        )
        # RabbitMQ's global gauges count at the client's node: publishing connections, and
        # the consumers of its channels (attached here or at another node's queue leader).
        state = self.node.state
        consumers = 0
        for conn in connections:
            for channel in list(conn.channels.values()):
                counts = state.channel_counts(channel.ref)
                consumers += len(channel.remote_consumers) + (counts.consumers if counts else 0)
        publishers = GaugeMetricFamily(
            "rabbitmq_global_publishers",
            "Current number of message publishers",
            labels=["protocol"],
        )
        publishers.add_metric([PROTOCOL], sum(1 for c in connections if c.publisher))
        yield publishers
        family = GaugeMetricFamily(
            "rabbitmq_global_consumers", "Current number of message consumers", labels=["protocol"]
        )
        family.add_metric([PROTOCOL], consumers)
        yield family

    def _queues(self) -> Iterator[Metric]:
        led = list(self._led_queues())
        yield GaugeMetricFamily("rabbitmq_queues", "Queues available", value=len(led))
        yield GaugeMetricFamily(
            "rabbitmq_consumers",
            "Consumers currently connected",
            value=sum(q.consumers for q in led),
        )
        for name, help_text, value in QUEUE_GAUGES:
            if not self.per_object:
                yield GaugeMetricFamily(name, help_text, value=sum(value(q) for q in led))
                continue
            family = GaugeMetricFamily(name, help_text, labels=["vhost", "queue"])
            for q in led:
                family.add_metric([q.vhost, q.name], value(q))
            yield family
        if self.per_object:
            info = GaugeMetricFamily(
                "rabbitmq_queue_info",
                "A metric with a constant '1' value and labels that provide some queue details",
                labels=["vhost", "queue", "queue_type", "membership"],
            )
            for q in led:
                kind = str(q.arguments.get("x-queue-type") or "classic")
                info.add_metric([q.vhost, q.name, QUEUE_TYPES.get(kind, kind), "leader"], 1)
            yield info

    def _led_queues(self) -> Iterator[QueueView]:
        """The queues this node leads (every queue outside a cluster)."""
        node = self.node
        state = node.state
        me = node.cluster.name if node.cluster is not None else None
        for vhost in node.config.vhosts:
            if not state.vhost_exists(vhost):
                continue
            for q in state.queues(vhost):
                if me is None or state.leader_of(vhost, q.name) == me:
                    yield q

    def _resources(self) -> Iterator[Metric]:
        node = self.node
        yield GaugeMetricFamily(
            "rabbitmq_process_resident_memory_bytes",
            "Memory used in bytes",
            value=resident_memory_bytes(),
        )
        yield GaugeMetricFamily(
            "rabbitmq_resident_memory_limit_bytes",
            "Memory high watermark in bytes",
            value=node.watermark,
        )
        yield GaugeMetricFamily(
            "warren_message_bytes",
            "Bytes of message bodies held, ready and unacknowledged: what the memory high "
            "watermark is compared with",
            value=node.state.total_message_bytes,
        )
        yield UnknownMetricFamily(
            "rabbitmq_alarms_memory_used_watermark",
            "is 1 if VM memory watermark alarm is in effect",
            value=1 if node.alarm else 0,
        )
        yield GaugeMetricFamily(
            "rabbitmq_disk_space_available_bytes",
            "Disk space available in bytes",
            value=disk_free_bytes(node.config.data_dir),
        )
        open_fds = open_fd_count()
        if open_fds is not None:
            yield GaugeMetricFamily(
                "rabbitmq_process_open_fds", "Open file descriptors", value=open_fds
            )
        yield GaugeMetricFamily(
            "rabbitmq_process_max_fds",
            "Open file descriptors limit",
            value=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )


def _stats_metrics(stats: NodeStats) -> Iterator[Metric]:
    for attribute, name, help_text in GLOBAL_COUNTERS:
        family = CounterMetricFamily(name, help_text, labels=["protocol"])
        family.add_metric([PROTOCOL], getattr(stats, attribute))
        yield family
    for attribute, name, help_text in CHURN_COUNTERS:
        yield CounterMetricFamily(name, help_text, value=getattr(stats, attribute))
    yield from stats.confirm_latency.collect()


def _cluster_metrics(cluster: ClusterNode) -> Iterator[Metric]:
    status = cluster.status()
    raft = status["raft"]
    yield CounterMetricFamily(
        "rabbitmq_raft_term_total", "Current Raft term number", value=raft["term"]
    )
    yield GaugeMetricFamily(
        "rabbitmq_raft_log_commit_index", "Raft log commit index", value=raft["commit_index"]
    )
    yield GaugeMetricFamily(
        "rabbitmq_raft_log_last_applied_index",
        "Raft log last applied index",
        value=raft["last_applied"],
    )
    yield GaugeMetricFamily(
        "rabbitmq_raft_entry_commit_latency_seconds",
        "Time taken for a log entry to be committed",
        value=cluster.last_commit_latency,
    )
    yield from cluster.commit_latency.collect()
    role = GaugeMetricFamily(
        "warren_raft_role", "1 for this node's current Raft role, 0 for the others", labels=["role"]
    )
    for name in RAFT_ROLES:
        role.add_metric([name], 1 if raft["role"] == name else 0)
    yield role
    yield GaugeMetricFamily(
        "warren_raft_has_quorum",
        "1 when this node sees a Raft leader and reaches a majority of the members",
        value=1 if raft["has_quorum"] else 0,
    )
    yield CounterMetricFamily(
        "warren_raft_leader_changes_total",
        "Total number of Raft leader changes this node has seen",
        value=raft["leader_changes"],
    )
    yield GaugeMetricFamily(
        "warren_raft_apply_lag",
        "Raft log entries committed but not yet applied on this node",
        value=max(0, raft["commit_index"] - raft["last_applied"]),
    )
    durable = status["durable"]
    yield GaugeMetricFamily(
        "warren_raft_snapshot_duration_seconds",
        "Time the latest Raft snapshot of this node took to write",
        value=durable["last_snapshot_seconds"],
    )
    yield GaugeMetricFamily(
        "warren_raft_snapshot_bytes",
        "Size in bytes of the latest Raft snapshot of this node",
        value=durable["last_snapshot_bytes"],
    )
    yield from _members(status["members"])
    yield CounterMetricFamily(
        "warren_link_forwarded_messages_total",
        "Total number of messages forwarded to queue leaders over the node link",
        value=cluster.forwarded_messages,
    )
    yield CounterMetricFamily(
        "warren_link_forwarded_bytes_total",
        "Total number of bytes of messages forwarded to queue leaders over the node link",
        value=cluster.forwarded_bytes,
    )
    yield GaugeMetricFamily(
        "warren_durable_log_messages",
        "Messages in this node's copies of the durable queues' logs",
        value=durable["logged_messages"],
    )
    yield CounterMetricFamily(
        "warren_durable_entries_written_total",
        "Total number of durable-queue log entries (group commits of persistent messages and "
        "settles) this node wrote to the Raft log",
        value=durable["entries_written"],
    )
    yield CounterMetricFamily(
        "warren_durable_messages_written_total",
        "Total number of persistent messages for durable queues this node wrote to the Raft log "
        "(as their queues' leader)",
        value=durable["messages_written"],
    )
    yield CounterMetricFamily(
        "warren_durable_entries_failed_total",
        "Total number of durable log entries that failed to commit (their publishes nacked)",
        value=durable["entries_failed"],
    )
    yield from cluster.durable.batch_size.collect()


def _members(members: Iterable[dict[str, Any]]) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "warren_cluster_member_up",
        "1 when the cluster member is alive and reachable from this node",
        labels=["member"],
    )
    led = GaugeMetricFamily(
        "warren_cluster_queues_led", "Queues led by each cluster member", labels=["member"]
    )
    for m in members:
        name = str(m["name"])
        up.add_metric([name], 1 if m["alive"] and m["reachable"] else 0)
        led.add_metric([name], m["queues_led"])
    yield up
    yield led


# ---- the process, read at scrape time ------------------------------------------------------


def resident_memory_bytes() -> int:
    """Resident set size: /proc/self/statm on Linux, else the peak RSS (getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024


def open_fd_count() -> int | None:
    """Open file descriptors (Linux /proc), None where that is not cheap to know."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def disk_free_bytes(data_dir: Path) -> int:
    """Free bytes on the file system of the data directory (or of its nearest parent that
    exists yet)."""
    path = data_dir.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


# ---- the endpoint ---------------------------------------------------------------------------


def registries(node: BrokerNode) -> dict[str, CollectorRegistry]:
    """One registry per path: the node's metrics, and the process's (CPU, memory, fds, GC,
    Python version) as prometheus-client's standard collectors report them."""
    out: dict[str, CollectorRegistry] = {}
    for path, per_object in (("/metrics", False), ("/metrics/per-object", True)):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(node, per_object=per_object))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        out[path] = registry
    return out


def metrics_server(node: BrokerNode, host: str, port: int, log: EventLogger) -> HttpServer:
    router = Router()
    for path, registry in registries(node).items():

        async def metrics(
            request: Request, params: dict[str, str], registry: CollectorRegistry = registry
        ) -> Response:
            return Response(200, generate_latest(registry), content_type=CONTENT_TYPE)

        router.add("GET", path, metrics, auth=False)
    return HttpServer(router, host=host, port=port, log=log.bind(component="metrics"))
