"""The node's management HTTP API: cluster operations and listings, as JSON.

Rules: handlers read the node's state and call the cluster; they never block the loop
and never raise into the server (a failure is a JSON error in RabbitMQ's shape:
`{"error": ..., "reason": ...}`). Listings follow RabbitMQ's management API field names
where one exists. Routes:

- GET  /api/warren/cluster           members, Raft leader and term, queues per leader
- POST /api/warren/members           {"name", "raft_address"}: add a voting member
- DELETE /api/warren/members/{name}  remove a member (its queues move first)
- POST /api/warren/rebalance         spread queue leaders evenly over live members
- GET  /api/queues, /api/exchanges, /api/bindings, /api/connections
- GET  /api/healthz (no auth)        200 once the node serves clients, else 503
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from node.http import HttpServer, Request, Response, Router, error_response, json_response
from node.logs import EventLogger

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.server import BrokerNode


def management_server(node: BrokerNode, config: NodeConfig, log: EventLogger) -> HttpServer:
    assert config.management_port is not None
    router = Router()
    api = _Api(node)
    router.add("GET", "/api/healthz", api.healthz, auth=False)
    router.add("GET", "/api/warren/cluster", api.cluster)
    router.add("POST", "/api/warren/members", api.add_member)
    router.add("DELETE", "/api/warren/members/{name}", api.remove_member)
    router.add("POST", "/api/warren/rebalance", api.rebalance)
    router.add("GET", "/api/queues", api.queues)
    router.add("GET", "/api/exchanges", api.exchanges)
    router.add("GET", "/api/bindings", api.bindings)
    router.add("GET", "/api/connections", api.connections)

    def check_user(name: str, password: str) -> bool:
        user = config.user(name)
        return user is not None and user.password == password

    return HttpServer(
        router,
        host=config.management_host,
        port=config.management_port,
        log=log.bind(component="management"),
        check_user=check_user,
    )


def _not_clustered() -> Response:
    return error_response(400, "bad_request", "this node is not part of a cluster")


class _Api:
    def __init__(self, node: BrokerNode) -> None:
        self.node = node

    async def healthz(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is not None and not cluster.ready.is_set():
            return json_response(503, {"status": "failed", "reason": "not yet in the cluster"})
        return json_response(200, {"status": "ok"})

    async def cluster(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is None:
            return json_response(
                200,
                {
                    "cluster_name": self.node.config.cluster_name,
                    "node": self.node.config.name,
                    "raft": None,
                    "members": [],
                    "queues": sum(1 for _ in self.node.state.queues("/")),
                },
            )
        return json_response(
            200, {"cluster_name": self.node.config.cluster_name, **cluster.status()}
        )

    async def add_member(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is None:
            return _not_clustered()
        body = _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("raft_address"), str):
            return error_response(400, "bad_request", "expected {name, raft_address}")
        from cluster.node import ClusterUnavailable

        try:
            await cluster.add_member(str(body.get("name", "")), body["raft_address"])
        except (ClusterUnavailable, ValueError) as exc:
            return error_response(409, "conflict", str(exc))
        return json_response(201, {"added": body.get("name"), "raft_address": body["raft_address"]})

    async def remove_member(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is None:
            return _not_clustered()
        from cluster.node import ClusterUnavailable

        try:
            await cluster.remove_member(params["name"])
        except ClusterUnavailable as exc:
            status = 404 if exc.error.reply_code == 404 else 409
            return error_response(status, "not_found" if status == 404 else "conflict", str(exc))
        return json_response(200, {"removed": params["name"]})

    async def rebalance(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is None:
            return _not_clustered()
        from cluster.node import ClusterUnavailable

        try:
            return json_response(200, await cluster.rebalance())
        except ClusterUnavailable as exc:
            return error_response(409, "conflict", str(exc))

    async def queues(self, request: Request, params: dict[str, str]) -> Response:
        state = self.node.state
        rows: list[dict[str, Any]] = []
        for vhost in self.node.config.vhosts:
            for q in state.queues(vhost):
                leader = state.leader_of(vhost, q.name) or self.node.config.name
                rows.append(
                    {
                        "name": q.name,
                        "vhost": q.vhost,
                        "durable": q.durable,
                        "exclusive": q.exclusive,
                        "auto_delete": q.auto_delete,
                        "arguments": _plain(q.arguments),
                        "node": leader,
                        "messages_ready": q.messages,
                        "messages_unacknowledged": q.unacked,
                        "messages": q.messages + q.unacked,
                        "consumers": q.consumers,
                        "type": str(q.arguments.get("x-queue-type", "classic")),
                    }
                )
        return json_response(200, rows)

    async def exchanges(self, request: Request, params: dict[str, str]) -> Response:
        rows = [
            {
                "name": x.name,
                "vhost": x.vhost,
                "type": x.type,
                "durable": x.durable,
                "auto_delete": x.auto_delete,
                "internal": x.internal,
                "arguments": _plain(x.arguments),
            }
            for vhost in self.node.config.vhosts
            for x in self.node.state.exchanges(vhost)
        ]
        return json_response(200, rows)

    async def bindings(self, request: Request, params: dict[str, str]) -> Response:
        rows = [
            {
                "source": b.source,
                "vhost": b.vhost,
                "destination": b.destination,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": _plain(b.arguments),
            }
            for vhost in self.node.config.vhosts
            for b in self.node.state.bindings(vhost)
        ]
        return json_response(200, rows)

    async def connections(self, request: Request, params: dict[str, str]) -> Response:
        rows = [
            {
                "name": f"{conn.peer} -> {self.node.config.name}",
                "node": self.node.config.name,
                "peer": conn.peer,
                "user": conn.user,
                "vhost": conn.vhost,
                "channels": len(conn.channels),
                "state": "blocked" if conn.blocked else "running",
            }
            for conn in list(self.node.connections.values())
        ]
        return json_response(200, rows)


def _json(request: Request) -> Any:
    try:
        return json.loads(request.body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _plain(table: Any) -> Any:
    """Field-table values as JSON can carry them (bytes as text, others as strings)."""
    if isinstance(table, dict):
        return {str(k): _plain(v) for k, v in table.items()}
    if isinstance(table, list | tuple):
        return [_plain(v) for v in table]
    if table is None or isinstance(table, bool | int | float | str):
        return table
    if isinstance(table, bytes | bytearray):
        return bytes(table).decode("utf-8", "replace")
    return str(table)
