"""The node's Prometheus endpoint: `/metrics`, read from the live node at scrape time.

Rules: one `CollectorRegistry` per node (never prometheus-client's global registry: several
nodes may share a process in tests); values are read from the node when Prometheus
scrapes, so counting costs nothing on the message path. Names follow rabbitmq_prometheus
where one exists (`rabbitmq_identity_info` is what existing dashboards join on); Warren's
own are `warren_*`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node import __version__
from node.http import HttpServer, Request, Response, Router
from node.logs import EventLogger

if TYPE_CHECKING:
    from node.server import BrokerNode

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ROLES = ("follower", "candidate", "leader")


class NodeCollector(Collector):
    def __init__(self, node: BrokerNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        config = node.config
        identity = GaugeMetricFamily(
            "rabbitmq_identity_info",
            "RabbitMQ node & cluster identity info",
            labels=["rabbitmq_node", "rabbitmq_cluster", "rabbitmq_endpoint"],
        )
        identity.add_metric([config.name, config.cluster_name, "metrics"], 1)
        yield identity
        build = GaugeMetricFamily(
            "rabbitmq_build_info", "Warren build info", labels=["rabbitmq_version", "product"]
        )
        build.add_metric([__version__, "Warren"], 1)
        yield build
        connections = list(node.connections.values())
        yield GaugeMetricFamily(
            "rabbitmq_connections", "Connections currently open", value=len(connections)
        )
        yield GaugeMetricFamily(
            "rabbitmq_channels",
            "Channels currently open",
            value=sum(len(c.channels) for c in connections),
        )
        queues = [q for vhost in config.vhosts for q in node.state.queues(vhost)]
        yield GaugeMetricFamily("rabbitmq_queues", "Queues available", value=len(queues))
        yield GaugeMetricFamily(
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers (queues led here)",
            value=sum(q.messages for q in queues),
        )
        yield GaugeMetricFamily(
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged (queues led here)",
            value=sum(q.unacked for q in queues),
        )
        cluster = node.cluster
        if cluster is None:
            return
        status = cluster.status()
        raft = status["raft"]
        yield GaugeMetricFamily("rabbitmq_raft_term_total", "Current Raft term", value=raft["term"])
        yield GaugeMetricFamily(
            "rabbitmq_raft_log_commit_index", "Raft log commit index", value=raft["commit_index"]
        )
        role = GaugeMetricFamily("warren_raft_role", "1 for this node's Raft role", labels=["role"])
        for name in _ROLES:
            role.add_metric([name], 1 if raft["role"] == name else 0)
        yield role
        yield GaugeMetricFamily(
            "warren_raft_leader_changes", "Raft leader changes seen", value=raft["leader_changes"]
        )
        members = GaugeMetricFamily(
            "warren_cluster_member_up",
            "1 when the member is alive and reachable",
            labels=["member"],
        )
        led = GaugeMetricFamily(
            "warren_cluster_queues_led", "Queues led by each member", labels=["member"]
        )
        for m in status["members"]:
            members.add_metric([m["name"]], 1 if m["alive"] and m["reachable"] else 0)
            led.add_metric([m["name"]], m["queues_led"])
        yield members
        yield led
        yield GaugeMetricFamily(
            "warren_link_forwarded_messages",
            "Messages forwarded to queue leaders over the node link",
            value=cluster.forwarded_messages,
        )
        yield GaugeMetricFamily(
            "warren_link_forwarded_bytes",
            "Bytes forwarded to queue leaders over the node link",
            value=cluster.forwarded_bytes,
        )


def metrics_server(node: BrokerNode, host: str, port: int, log: EventLogger) -> HttpServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))

    async def metrics(request: Request, params: dict[str, str]) -> Response:
        return Response(200, generate_latest(registry), content_type=CONTENT_TYPE)

    router = Router()
    router.add("GET", "/metrics", metrics, auth=False)
    return HttpServer(router, host=host, port=port, log=log.bind(component="metrics"))
