"""The node's management HTTP API: RabbitMQ's JSON API, cluster-wide, plus Warren's own.

Rules: handlers read the node's state and call the cluster; they never block the loop and
never raise into the server: a client's mistake is RabbitMQ's JSON error and status
(404 `{"error":"Object Not Found","reason":"Not Found"}`, 400 bad_request, ...). Every
change (declare, delete, purge, bind, import) and every read of messages (get, the
aliveness test) goes through an internal AMQP channel (node/mgmt_direct.py), so it means
what the same AMQP method means. Listings answer for the whole cluster from any node:
what only a member knows (its connections, channels, consumers, counters, and the counts
of the queues it leads) comes from its `/api/warren/local/...` endpoints
(node/mgmt_peers.py); the JSON objects are built in node/mgmt_views.py. The routes are
listed in `ROUTES` below and documented in docs/management-api.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
from anyio.abc import SocketAttribute
from pamqp import commands as spec

from node import __version__
from node import mgmt_views as views
from node.broker.types import AmqpError
from node.http import (
    HttpServer,
    Request,
    Response,
    Router,
    error_response,
    json_response,
)
from node.logs import EventLogger
from node.mgmt_direct import DirectConnection, DirectError, Sent, open_direct
from node.mgmt_peers import gather, live_peers, local_path
from node.protocol.codec import decode_properties, encode_properties

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.server import BrokerNode, ClientConnection

JsonObject = dict[str, Any]
Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]

NO_CONTENT = Response(204, b"")
CONNECTION_FORCED = 320
DEFAULT_CLOSE_REASON = "Closed via management plugin"
ACK_MODES = {
    # ackmode -> (basic.get no_ack, settle afterwards: None, or requeue?)
    "ack_requeue_true": (False, True),
    "reject_requeue_true": (False, True),
    "reject_requeue_false": (False, False),
    "ack_requeue_false": (True, None),
}
ALIVENESS_QUEUE = "aliveness-test"
ALIVENESS_BODY = b"test_message"
ALIVENESS_TRIES = 40  # basic.get retries (50 ms apart) while a forwarded publish lands
DEFAULT_EXCHANGE_ALIAS = "amq.default"  # how paths name the default exchange ("")
# Passed on to members asked for their part of a listing.
_FORWARDED_HEADERS = ("authorization", "x-reason")


def management_server(node: BrokerNode, config: NodeConfig, log: EventLogger) -> HttpServer:
    assert config.management_port is not None
    router = Router()
    api = _Api(node, config)
    for method, pattern, handler, auth in api.routes():
        router.add(method, pattern, handler, auth=auth)

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


def not_found() -> Response:
    return error_response(404, "Object Not Found", "Not Found")


def bad_request(reason: object) -> Response:
    return json_response(400, {"error": "bad_request", "reason": reason})


def amqp_error(error: AmqpError) -> Response:
    """A channel error as RabbitMQ's management API reports it: 404 not_found with the
    AMQP text, anything else 400 bad_request with the text after "CODE_NAME - "."""
    text = error.reply_text
    if error.reply_code == 404:
        return error_response(404, "not_found", text)
    _, sep, reason = text.partition(" - ")
    return bad_request(reason if sep else text)


def _json(request: Request) -> Any:
    """The request's JSON body (None when empty); BadRequest when it is not JSON."""
    if not request.body.strip():
        return None
    try:
        return json.loads(request.body)
    except (UnicodeDecodeError, ValueError):
        raise views.BadRequest("not_json") from None


def _flag(request: Request, name: str) -> bool:
    return request.query.get(name, "").lower() == "true"


def _exchange_name(name: str) -> str:
    return "" if name == DEFAULT_EXCHANGE_ALIAS else name


def _listing(request: Request, rows: list[JsonObject]) -> Response:
    return json_response(200, views.select(rows, request.query))


def _guard(handler: Handler) -> Handler:
    """A client's mistake the handler found deep down (BadRequest, a channel error) as
    RabbitMQ's 400/404 answer."""

    async def guarded(request: Request, params: dict[str, str]) -> Response:
        try:
            return await handler(request, params)
        except views.BadRequest as exc:
            return bad_request(str(exc))
        except DirectError as exc:
            return amqp_error(exc.error)

    guarded.__name__ = getattr(handler, "__name__", "handler")
    return guarded


class _Api:
    def __init__(self, node: BrokerNode, config: NodeConfig) -> None:
        self.node = node
        self.config = config
        self.started = time.monotonic()

    def routes(self) -> list[tuple[str, str, Handler, bool]]:
        g = _guard
        return [
            ("GET", "/api/healthz", self.healthz, False),
            # Warren's own
            ("GET", "/api/warren/cluster", self.cluster, True),
            ("POST", "/api/warren/members", self.add_member, True),
            ("DELETE", "/api/warren/members/{name}", self.remove_member, True),
            ("POST", "/api/warren/rebalance", self.rebalance, True),
            ("GET", "/api/warren/local/{kind}", self.local, True),
            ("DELETE", "/api/warren/local/connections/{name}", self.local_close, True),
            # RabbitMQ's
            ("GET", "/api/overview", self.overview, True),
            ("GET", "/api/nodes", self.nodes, True),
            ("GET", "/api/nodes/{name}", self.node_one, True),
            ("GET", "/api/connections", self.connections, True),
            ("GET", "/api/connections/{name}", self.connection_one, True),
            ("DELETE", "/api/connections/{name}", self.connection_close, True),
            ("GET", "/api/connections/{name}/channels", self.connection_channels, True),
            ("GET", "/api/vhosts/{vhost}/connections", self.vhost_connections, True),
            ("GET", "/api/channels", self.channels, True),
            ("GET", "/api/channels/{name}", self.channel_one, True),
            ("GET", "/api/consumers", self.consumers, True),
            ("GET", "/api/consumers/{vhost}", self.consumers, True),
            ("GET", "/api/exchanges", self.exchanges, True),
            ("GET", "/api/exchanges/{vhost}", self.exchanges, True),
            ("GET", "/api/exchanges/{vhost}/{name}", self.exchange_one, True),
            ("PUT", "/api/exchanges/{vhost}/{name}", g(self.exchange_put), True),
            ("DELETE", "/api/exchanges/{vhost}/{name}", g(self.exchange_delete), True),
            ("POST", "/api/exchanges/{vhost}/{name}/publish", g(self.publish), True),
            ("GET", "/api/queues", self.queues, True),
            ("GET", "/api/queues/{vhost}", self.queues, True),
            ("GET", "/api/queues/{vhost}/{name}", self.queue_one, True),
            ("PUT", "/api/queues/{vhost}/{name}", g(self.queue_put), True),
            ("DELETE", "/api/queues/{vhost}/{name}", g(self.queue_delete), True),
            ("DELETE", "/api/queues/{vhost}/{name}/contents", g(self.queue_purge), True),
            ("POST", "/api/queues/{vhost}/{name}/get", g(self.queue_get), True),
            ("GET", "/api/queues/{vhost}/{name}/bindings", self.queue_bindings, True),
            ("GET", "/api/bindings", self.bindings, True),
            ("GET", "/api/bindings/{vhost}", self.bindings, True),
            *self._binding_routes(),
            ("GET", "/api/vhosts", self.vhosts, True),
            ("GET", "/api/vhosts/{vhost}", self.vhost_one, True),
            ("GET", "/api/users", self.users, True),
            ("GET", "/api/users/{name}", self.user_one, True),
            ("GET", "/api/whoami", self.whoami, True),
            ("GET", "/api/definitions", self.definitions, True),
            ("POST", "/api/definitions", g(self.definitions_import), True),
            ("GET", "/api/health/checks/alarms", self.health_alarms, True),
            ("GET", "/api/health/checks/local-alarms", self.health_local_alarms, True),
            ("GET", "/api/health/checks/ready-to-serve-clients", self.health_ready, True),
            ("GET", "/api/aliveness-test/{vhost}", g(self.aliveness), True),
        ]

    def _binding_routes(self) -> list[tuple[str, str, Handler, bool]]:
        routes: list[tuple[str, str, Handler, bool]] = []
        for kind in ("q", "e"):
            pair = f"/api/bindings/{{vhost}}/e/{{source}}/{kind}/{{dest}}"
            routes += [
                ("GET", pair, self.binding_list, True),
                ("POST", pair, _guard(self.binding_add), True),
                ("GET", pair + "/{props}", self.binding_one, True),
                ("DELETE", pair + "/{props}", _guard(self.binding_delete), True),
            ]
        return routes

    # ---- helpers -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    def vhosts_of(self, params: dict[str, str]) -> list[str] | None:
        """The vhosts a listing covers ({vhost} or all); None for an unknown vhost."""
        vhost = params.get("vhost")
        if vhost is None:
            return list(self.config.vhosts)
        return [vhost] if self.known_vhost(vhost) else None

    def known_vhost(self, vhost: str) -> bool:
        return vhost in self.config.vhosts and self.node.state.vhost_exists(vhost)

    def leader(self, leader: str | None) -> str:
        return leader or self.name

    def _forwarded(self, request: Request) -> dict[str, str]:
        return {k: request.headers[k] for k in _FORWARDED_HEADERS if k in request.headers}

    async def everywhere(self, request: Request, kind: str) -> list[JsonObject]:
        """This node's and every live member's `local(kind)` answer (this node first)."""
        parts = [self.local_part(kind)]
        answers = await gather(
            live_peers(self.node), "GET", local_path(kind), self._forwarded(request)
        )
        for _, (status, value) in sorted(answers.items()):
            if status == 200 and isinstance(value, dict):
                parts.append(value)
        return parts

    # ---- Warren's own ------------------------------------------------------------------

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
                    "cluster_name": self.config.cluster_name,
                    "node": self.name,
                    "raft": None,
                    "members": [],
                    "queues": sum(1 for _ in self.node.state.queues("/")),
                },
            )
        return json_response(200, {"cluster_name": self.config.cluster_name, **cluster.status()})

    async def add_member(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is None:
            return _not_clustered()
        try:
            body = _json(request)
        except views.BadRequest:
            body = None
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

    # ---- what only this node knows (its part of a cluster-wide listing) ---------------

    async def local(self, request: Request, params: dict[str, str]) -> Response:
        if params["kind"] not in _LOCAL_KINDS:
            return not_found()
        return json_response(200, self.local_part(params["kind"]))

    def local_part(self, kind: str) -> JsonObject:
        return getattr(self, f"_local_{kind}")()  # type: ignore[no-any-return]

    def _open_connections(self) -> list[ClientConnection]:
        return [c for c in list(self.node.connections.values()) if c.opened and not c.closed]

    def _connection_row(self, conn: ClientConnection) -> JsonObject:
        stream = conn.stream
        peer = stream.extra(SocketAttribute.remote_address, conn.peer)
        local = stream.extra(SocketAttribute.local_address, ("", self.config.port))
        return views.connection_row(conn, self.name, peer, local)

    def _local_connections(self) -> JsonObject:
        return {"connections": [self._connection_row(c) for c in self._open_connections()]}

    def _local_channels(self) -> JsonObject:
        state = self.node.state
        rows = []
        for conn in self._open_connections():
            connection = self._connection_row(conn)
            for channel in list(conn.channels.values()):
                counts = state.channel_counts(channel.ref)
                rows.append(
                    views.channel_row(
                        connection,
                        channel,
                        prefetch=counts.prefetch if counts else 0,
                        global_prefetch=counts.global_prefetch if counts else 0,
                        unacked=counts.unacked if counts else 0,
                        consumers=(counts.consumers if counts else 0)
                        + len(channel.remote_consumers),
                    )
                )
        return {"channels": rows}

    def _local_consumers(self) -> JsonObject:
        """The consumers this node holds (those of the queues it leads, remote clients'
        included: their channel is named by connection id, joined by the asker), and
        the channel details of this node's own connections, by connection id."""
        details = {
            str(conn.conn_id): self._connection_row(conn) for conn in self._open_connections()
        }
        consumers = [
            {
                **views.consumer_row(view, None),
                "_channel": [view.channel.conn, view.channel.channel],
            }
            for view in self.node.state.consumers()
        ]
        connections = {
            key: {k: row[k] for k in ("name", "node", "peer_host", "peer_port", "user")}
            for key, row in details.items()
        }
        return {"consumers": consumers, "connections": connections}

    def _led_here(self, leader: str) -> bool:
        return not leader or leader == self.name

    def _local_queues(self) -> JsonObject:
        state = self.node.state
        return {
            "queues": [
                [q.vhost, q.name, views.queue_counts(q)]
                for vhost in self.config.vhosts
                for q in state.queues(vhost)
                if self._led_here(q.leader)
            ]
        }

    def _local_node(self) -> JsonObject:
        node = self.node
        stats = node.stats
        connections = self._open_connections()
        totals = {"messages": 0, "messages_ready": 0, "messages_unacknowledged": 0}
        for _, _, counts in self._local_queues()["queues"]:
            for key in totals:
                totals[key] += counts[key]
        try:
            disk_free = shutil.disk_usage(self.config.data_dir).free
        except OSError:
            disk_free = 0
        return {
            "node": {
                "name": self.name,
                "type": "disc",
                "running": True,
                "being_drained": False,
                "os_pid": str(os.getpid()),
                "mem_used": _rss_bytes(),
                "mem_limit": node.watermark,
                "mem_alarm": node.alarm,
                "mem_calculation_strategy": "rss",
                "disk_free": disk_free,
                "disk_free_limit": 0,
                "disk_free_alarm": False,
                "processors": os.cpu_count() or 1,
                "uptime": int((time.monotonic() - self.started) * 1000),
                "rates_mode": "basic",
                "partitions": [],
                "sockets_used": len(connections),
                "exchange_types": [
                    {"name": t, "description": "", "enabled": True}
                    for t in ("direct", "fanout", "topic", "headers")
                ],
                "enabled_plugins": ["rabbitmq_management"],
            },
            "counters": stats.snapshot(),
            "rates": stats.rates(),
            "object_totals": {
                "connections": len(connections),
                "channels": sum(len(c.channels) for c in connections),
                "consumers": sum(1 for _ in node.state.consumers()),
            },
            "queue_totals": totals,
        }

    async def local_close(self, request: Request, params: dict[str, str]) -> Response:
        reason = request.headers.get("x-reason") or DEFAULT_CLOSE_REASON
        for conn in self._open_connections():
            if self._connection_row(conn)["name"] == params["name"]:
                conn.force_close(CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
                conn.process_events()
                self.node.dispatch()
                return NO_CONTENT
        return not_found()

    # ---- overview, nodes ---------------------------------------------------------------

    async def overview(self, request: Request, params: dict[str, str]) -> Response:
        parts = await self.everywhere(request, "node")
        counters = views.sum_counters(p.get("counters", {}) for p in parts)
        rates = views.sum_counters(p.get("rates", {}) for p in parts)
        object_totals = views.sum_counters(p.get("object_totals", {}) for p in parts)
        state = self.node.state
        object_totals["queues"] = sum(
            1 for vhost in self.config.vhosts for _ in state.queues(vhost)
        )
        object_totals["exchanges"] = sum(
            1 for vhost in self.config.vhosts for _ in state.exchanges(vhost)
        )
        queue_totals = views.sum_counters(p.get("queue_totals", {}) for p in parts)
        return json_response(
            200,
            {
                "management_version": __version__,
                "rates_mode": "basic",
                "product_version": __version__,
                "product_name": "Warren",
                "rabbitmq_version": __version__,
                "cluster_name": self.config.cluster_name,
                "node": self.name,
                "disable_stats": False,
                "enable_queue_totals": True,
                "message_stats": views.message_stats(counters, rates),
                "churn_rates": views.churn_rates(counters, rates),
                "queue_totals": {k: int(v) for k, v in queue_totals.items()},
                "object_totals": {
                    k: int(object_totals.get(k, 0))
                    for k in ("channels", "connections", "consumers", "exchanges", "queues")
                },
                "statistics_db_event_queue": 0,
                "listeners": self._listeners(),
                "contexts": [
                    {
                        "node": m_name,
                        "description": "Warren Management",
                        "path": "/",
                        "port": port,
                    }
                    for m_name, _, port in self._addresses("management")
                ],
                "exchange_types": [
                    {"name": t, "description": "", "enabled": True}
                    for t in ("direct", "fanout", "topic", "headers")
                ],
            },
        )

    def _addresses(self, what: str) -> list[tuple[str, str, str]]:
        """(node, host, port) of every member's `what` ("amqp" or "management")."""
        members = self.node.state.members
        if self.node.cluster is None or not members:
            if what == "amqp":
                return [(self.name, self.config.host, str(self.config.port))]
            return [(self.name, self.config.management_host, str(self.config.management_port))]
        out = []
        for m in sorted(members.values(), key=lambda m: m.name):
            address = m.amqp if what == "amqp" else m.management
            if address:
                host, _, port = address.rpartition(":")
                out.append((m.name, host, port))
        return out

    def _listeners(self) -> list[JsonObject]:
        rows = []
        for what, protocol in (("amqp", "amqp"), ("management", "http")):
            for m_name, host, port in self._addresses(what):
                rows.append(
                    {
                        "node": m_name,
                        "protocol": protocol,
                        "ip_address": host,
                        "port": int(port) if port.isdigit() else port,
                    }
                )
        return rows

    async def _node_rows(self, request: Request) -> list[JsonObject]:
        parts = await self.everywhere(request, "node")
        rows = {p["node"]["name"]: p["node"] for p in parts if isinstance(p.get("node"), dict)}
        for name in self.node.state.members:
            rows.setdefault(name, {"name": name, "type": "disc", "running": False})
        return [rows[n] for n in sorted(rows)]

    async def nodes(self, request: Request, params: dict[str, str]) -> Response:
        return _listing(request, await self._node_rows(request))

    async def node_one(self, request: Request, params: dict[str, str]) -> Response:
        return _one(r for r in await self._node_rows(request) if r["name"] == params["name"])

    # ---- connections and channels ------------------------------------------------------

    async def _connection_rows(self, request: Request) -> list[JsonObject]:
        parts = await self.everywhere(request, "connections")
        return [row for p in parts for row in p.get("connections", [])]

    async def connections(self, request: Request, params: dict[str, str]) -> Response:
        return _listing(request, await self._connection_rows(request))

    async def vhost_connections(self, request: Request, params: dict[str, str]) -> Response:
        if self.vhosts_of(params) is None:
            return not_found()
        rows = await self._connection_rows(request)
        return _listing(request, [r for r in rows if r["vhost"] == params["vhost"]])

    async def connection_one(self, request: Request, params: dict[str, str]) -> Response:
        rows = await self._connection_rows(request)
        return _one(r for r in rows if r["name"] == params["name"])

    async def connection_close(self, request: Request, params: dict[str, str]) -> Response:
        """Close a connection held by any member (connection.close 320, the X-Reason)."""
        here = await self.local_close(request, params)
        if here.status == 204:
            return here
        answers = await gather(
            live_peers(self.node),
            "DELETE",
            local_path("connections", params["name"]),
            self._forwarded(request),
        )
        if any(status == 204 for status, _ in answers.values()):
            return NO_CONTENT
        return not_found()

    async def _channel_rows(self, request: Request) -> list[JsonObject]:
        parts = await self.everywhere(request, "channels")
        return [row for p in parts for row in p.get("channels", [])]

    async def channels(self, request: Request, params: dict[str, str]) -> Response:
        return _listing(request, await self._channel_rows(request))

    async def channel_one(self, request: Request, params: dict[str, str]) -> Response:
        rows = await self._channel_rows(request)
        return _one(r for r in rows if r["name"] == params["name"])

    async def connection_channels(self, request: Request, params: dict[str, str]) -> Response:
        rows = await self._channel_rows(request)
        mine = [r for r in rows if r["connection_details"]["name"] == params["name"]]
        if not mine and not any(
            r["name"] == params["name"] for r in await self._connection_rows(request)
        ):
            return not_found()
        return _listing(request, mine)

    async def consumers(self, request: Request, params: dict[str, str]) -> Response:
        vhosts = self.vhosts_of(params)
        if vhosts is None:
            return not_found()
        parts = await self.everywhere(request, "consumers")
        connections: dict[str, JsonObject] = {}
        for p in parts:
            connections.update(p.get("connections", {}))
        rows = []
        for p in parts:
            for row in p.get("consumers", []):
                conn, number = row.pop("_channel")
                if row["queue"]["vhost"] not in vhosts:
                    continue
                connection = connections.get(str(conn))
                if connection is None:
                    continue  # a direct connection's, or one closing meanwhile
                row["channel_details"] = views.channel_details(connection, number)
                rows.append(row)
        return _listing(request, rows)

    # ---- exchanges ---------------------------------------------------------------------

    async def exchanges(self, request: Request, params: dict[str, str]) -> Response:
        vhosts = self.vhosts_of(params)
        if vhosts is None:
            return not_found()
        state = self.node.state
        rows = [views.exchange_row(x) for v in vhosts for x in state.exchanges(v)]
        return _listing(request, rows)

    def _exchange(self, vhost: str, name: str) -> JsonObject | None:
        if not self.known_vhost(vhost):
            return None
        return next(
            (views.exchange_row(x) for x in self.node.state.exchanges(vhost) if x.name == name),
            None,
        )

    async def exchange_one(self, request: Request, params: dict[str, str]) -> Response:
        row = self._exchange(params["vhost"], _exchange_name(params["name"]))
        return not_found() if row is None else json_response(200, row)

    async def exchange_put(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], _exchange_name(params["name"])
        if not self.known_vhost(vhost):
            return not_found()
        kind, durable, auto_delete, internal, arguments = views.exchange_settings(_json(request))
        existed = self._exchange(vhost, name) is not None
        async with self.direct(request, vhost) as direct:
            await direct.call(
                spec.Exchange.Declare(
                    exchange=name,
                    exchange_type=kind,
                    durable=durable,
                    auto_delete=auto_delete,
                    internal=internal,
                    arguments=arguments,
                )
            )
        return NO_CONTENT if existed else Response(201, b"")

    async def exchange_delete(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], _exchange_name(params["name"])
        if self._exchange(vhost, name) is None:
            return not_found()
        async with self.direct(request, vhost) as direct:
            await direct.call(
                spec.Exchange.Delete(exchange=name, if_unused=_flag(request, "if-unused"))
            )
        return NO_CONTENT

    async def publish(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], _exchange_name(params["name"])
        if self._exchange(vhost, name) is None:
            return not_found()
        body = _json(request)
        if not isinstance(body, dict):
            raise views.BadRequest("not_json")
        missing = [k for k in ("routing_key", "payload", "payload_encoding") if k not in body]
        if missing:
            raise views.BadRequest("[" + ",".join(f"{{key_missing,{k}}}" for k in missing) + "]")
        if not isinstance(body["routing_key"], str):
            raise views.BadRequest("routing_key must be a string")
        payload = views.decode_payload(body["payload"], body["payload_encoding"])
        properties = spec.Basic.Properties(**views.properties_arguments(body.get("properties")))
        async with self.direct(request, vhost) as direct:
            sent = await direct.publish(
                name, body["routing_key"], encode_properties(properties), payload, True
            )
        returned = any(isinstance(s.method, spec.Basic.Return) for s in sent)
        return json_response(200, {"routed": not returned})

    # ---- queues ------------------------------------------------------------------------

    async def _queue_counts(
        self, request: Request, leaders: Iterable[str]
    ) -> dict[tuple[str, str], JsonObject]:
        """Counts of the queues led by `leaders`, from those leaders (this node's own
        without a request)."""
        wanted = set(leaders)
        parts: list[JsonObject] = []
        if self.name in wanted:
            parts.append(self._local_queues())
        peers = [p for p in live_peers(self.node) if p.name in wanted]
        if peers:
            answers = await gather(peers, "GET", local_path("queues"), self._forwarded(request))
            parts += [v for s, v in answers.values() if s == 200 and isinstance(v, dict)]
        counts: dict[tuple[str, str], JsonObject] = {}
        for part in parts:
            for vhost, name, value in part.get("queues", []):
                counts[(vhost, name)] = value
        return counts

    async def queues(self, request: Request, params: dict[str, str]) -> Response:
        vhosts = self.vhosts_of(params)
        if vhosts is None:
            return not_found()
        state = self.node.state
        listed = [q for v in vhosts for q in state.queues(v)]
        counts = await self._queue_counts(request, {self.leader(q.leader) for q in listed})
        rows = [
            views.queue_row(q, self.leader(q.leader), counts.get((q.vhost, q.name))) for q in listed
        ]
        return _listing(request, rows)

    def _queue_view(self, vhost: str, name: str) -> Any:
        if not self.known_vhost(vhost):
            return None
        return next((q for q in self.node.state.queues(vhost) if q.name == name), None)

    async def queue_one(self, request: Request, params: dict[str, str]) -> Response:
        view = self._queue_view(params["vhost"], params["name"])
        if view is None:
            return not_found()
        leader = self.leader(view.leader)
        counts = await self._queue_counts(request, [leader])
        row = views.queue_row(view, leader, counts.get((view.vhost, view.name)))
        return json_response(200, row)

    async def queue_put(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], params["name"]
        if not self.known_vhost(vhost):
            return not_found()
        durable, auto_delete, arguments = views.queue_settings(_json(request))
        existed = self.node.state.queue_exists(vhost, name)
        async with self.direct(request, vhost) as direct:
            await direct.call(
                spec.Queue.Declare(
                    queue=name, durable=durable, auto_delete=auto_delete, arguments=arguments
                )
            )
        return NO_CONTENT if existed else Response(201, b"")

    async def queue_delete(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], params["name"]
        if self._queue_view(vhost, name) is None:
            return not_found()
        async with self.direct(request, vhost) as direct:
            await direct.call(
                spec.Queue.Delete(
                    queue=name,
                    if_unused=_flag(request, "if-unused"),
                    if_empty=_flag(request, "if-empty"),
                )
            )
        return NO_CONTENT

    async def queue_purge(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], params["name"]
        if self._queue_view(vhost, name) is None:
            return not_found()
        async with self.direct(request, vhost) as direct:
            await direct.call(spec.Queue.Purge(queue=name))
        return NO_CONTENT

    async def queue_get(self, request: Request, params: dict[str, str]) -> Response:
        """basic.get `count` times on an internal channel, then settle as `ackmode` says
        (the channel closes afterwards: anything unsettled goes back to the queue)."""
        vhost, name = params["vhost"], params["name"]
        if not self.known_vhost(vhost):
            return not_found()
        body = _json(request)
        if not isinstance(body, dict):
            raise views.BadRequest("not_json")
        missing = [k for k in ("ackmode", "encoding") if k not in body]
        if missing:
            raise views.BadRequest("[" + ",".join(f"{{key_missing,{k}}}" for k in missing) + "]")
        ackmode, encoding = body["ackmode"], body["encoding"]
        if ackmode not in ACK_MODES:
            raise views.BadRequest(f"unknown ackmode {ackmode!r}")
        if encoding not in ("auto", "base64"):
            raise views.BadRequest(f"unknown encoding {encoding!r}")
        count, truncate = body.get("count", 1), body.get("truncate")
        if isinstance(count, str) and count.isdigit():
            count = int(count)  # (the web UI sends strings)
        if isinstance(truncate, str) and truncate.isdigit():
            truncate = int(truncate)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise views.BadRequest("count must be a positive integer")
        if truncate is not None and (not isinstance(truncate, int) or truncate < 0):
            raise views.BadRequest("truncate must be a non-negative integer")
        no_ack, requeue = ACK_MODES[ackmode]
        rows: list[JsonObject] = []
        async with self.direct(request, vhost) as direct:
            last_tag = 0
            for _ in range(count):
                got = _get_ok(await direct.call(spec.Basic.Get(queue=name, no_ack=no_ack)))
                if got is None:
                    break
                method = got.method
                assert isinstance(method, spec.Basic.GetOk)
                last_tag = int(method.delivery_tag or 0)
                rows.append(
                    views.message_row(
                        body=got.body,
                        redelivered=bool(method.redelivered),
                        exchange=method.exchange,
                        routing_key=method.routing_key or "",
                        message_count=int(method.message_count or 0),
                        properties=decode_properties(got.properties),
                        encoding=encoding,
                        truncate=truncate,
                    )
                )
            if last_tag and requeue is not None:
                await direct.call(
                    spec.Basic.Nack(delivery_tag=last_tag, multiple=True, requeue=requeue)
                )
        return json_response(200, rows)

    async def queue_bindings(self, request: Request, params: dict[str, str]) -> Response:
        vhost, name = params["vhost"], params["name"]
        if self._queue_view(vhost, name) is None:
            return not_found()
        rows = [
            views.binding_row(b)
            for b in self.node.state.bindings(vhost)
            if b.destination_type == "queue" and b.destination == name
        ]
        return _listing(request, rows)

    def direct(self, request: Request, vhost: str) -> Any:
        return open_direct(self.node, vhost, request.user or "")

    # ---- bindings ----------------------------------------------------------------------

    async def bindings(self, request: Request, params: dict[str, str]) -> Response:
        vhosts = self.vhosts_of(params)
        if vhosts is None:
            return not_found()
        state = self.node.state
        return _listing(request, [views.binding_row(b) for v in vhosts for b in state.bindings(v)])

    def _binding_ends(self, request: Request, params: dict[str, str]) -> tuple[str, str] | None:
        """(destination type, source) when the vhost and both ends exist."""
        vhost = params["vhost"]
        segments = request.path.split("/")
        kind = "queue" if segments[6] == "q" else "exchange"
        source = _exchange_name(params["source"])
        if self._exchange(vhost, source) is None:
            return None
        dest = params["dest"]
        if kind == "queue" and self._queue_view(vhost, dest) is None:
            return None
        if kind == "exchange" and self._exchange(vhost, _exchange_name(dest)) is None:
            return None
        return kind, source

    def _binding_rows(self, request: Request, params: dict[str, str]) -> list[JsonObject] | None:
        ends = self._binding_ends(request, params)
        if ends is None:
            return None
        kind, source = ends
        dest = params["dest"] if kind == "queue" else _exchange_name(params["dest"])
        return [
            views.binding_row(b)
            for b in self.node.state.bindings(params["vhost"])
            if b.source == source and b.destination == dest and b.destination_type == kind
        ]

    async def binding_list(self, request: Request, params: dict[str, str]) -> Response:
        rows = self._binding_rows(request, params)
        return not_found() if rows is None else _listing(request, rows)

    async def binding_one(self, request: Request, params: dict[str, str]) -> Response:
        rows = self._binding_rows(request, params) or []
        return _one(r for r in rows if r["properties_key"] == params["props"])

    async def binding_add(self, request: Request, params: dict[str, str]) -> Response:
        ends = self._binding_ends(request, params)
        if ends is None:
            return not_found()
        kind, source = ends
        body = _json(request) or {}
        if not isinstance(body, dict):
            raise views.BadRequest("not_json")
        routing_key = body.get("routing_key", "")
        arguments = body.get("arguments") or {}
        if not isinstance(routing_key, str) or not isinstance(arguments, dict):
            raise views.BadRequest("routing_key must be a string, arguments an object")
        async with self.direct(request, params["vhost"]) as direct:
            await _bind(direct, kind, source, params["dest"], routing_key, arguments)
        location = f"{quote(params['dest'], safe='')}/"
        location += quote(views.properties_key(routing_key, arguments), safe="")
        return Response(201, b"", headers=(("Location", location),))

    async def binding_delete(self, request: Request, params: dict[str, str]) -> Response:
        ends = self._binding_ends(request, params)
        rows = self._binding_rows(request, params) or []
        found = next((r for r in rows if r["properties_key"] == params["props"]), None)
        if ends is None or found is None:
            return not_found()
        kind, source = ends
        async with self.direct(request, params["vhost"]) as direct:
            if kind == "queue":
                method: Any = spec.Queue.Unbind(
                    queue=found["destination"],
                    exchange=source,
                    routing_key=found["routing_key"],
                    arguments=found["arguments"],
                )
            else:
                method = spec.Exchange.Unbind(
                    destination=found["destination"],
                    source=source,
                    routing_key=found["routing_key"],
                    arguments=found["arguments"],
                )
            await direct.call(method)
        return NO_CONTENT

    # ---- vhosts, users -----------------------------------------------------------------

    def _vhost_row(self, vhost: str, counts: dict[tuple[str, str], JsonObject]) -> JsonObject:
        mine = [c for (v, _), c in counts.items() if v == vhost]
        members = sorted(self.node.state.members) or [self.name]
        return {
            "name": vhost,
            "description": "Default virtual host" if vhost == "/" else "",
            "tags": [],
            "metadata": {"description": "", "tags": []},
            "default_queue_type": "classic",
            "tracing": False,
            "messages": sum(c["messages"] for c in mine),
            "messages_ready": sum(c["messages_ready"] for c in mine),
            "messages_unacknowledged": sum(c["messages_unacknowledged"] for c in mine),
            "cluster_state": {m: "running" for m in members},
        }

    async def _all_counts(self, request: Request) -> dict[tuple[str, str], JsonObject]:
        state = self.node.state
        leaders = {self.leader(q.leader) for v in self.config.vhosts for q in state.queues(v)}
        return await self._queue_counts(request, leaders)

    async def vhosts(self, request: Request, params: dict[str, str]) -> Response:
        counts = await self._all_counts(request)
        return _listing(request, [self._vhost_row(v, counts) for v in self.config.vhosts])

    async def vhost_one(self, request: Request, params: dict[str, str]) -> Response:
        if not self.known_vhost(params["vhost"]):
            return not_found()
        return json_response(200, self._vhost_row(params["vhost"], await self._all_counts(request)))

    def _user_rows(self) -> list[JsonObject]:
        return [views.user_row(u.name, u.password, os.urandom(4)) for u in self.config.users]

    async def users(self, request: Request, params: dict[str, str]) -> Response:
        return _listing(request, self._user_rows())

    async def user_one(self, request: Request, params: dict[str, str]) -> Response:
        return _one(r for r in self._user_rows() if r["name"] == params["name"])

    async def whoami(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, {"name": request.user, "tags": ["administrator"]})

    # ---- definitions -------------------------------------------------------------------

    async def definitions(self, request: Request, params: dict[str, str]) -> Response:
        state = self.node.state
        vhosts = list(self.config.vhosts)
        document = views.definitions(
            version=__version__,
            users=self._user_rows(),
            vhosts=vhosts,
            queues=[q for v in vhosts for q in state.queues(v)],
            exchanges=[x for v in vhosts for x in state.exchanges(v)],
            bindings=[b for v in vhosts for b in state.bindings(v)],
        )
        return json_response(200, document)

    async def definitions_import(self, request: Request, params: dict[str, str]) -> Response:
        """Declare the exchanges, then the queues, then the bindings (users, vhosts and
        permissions are the nodes' configuration: they are not imported)."""
        try:
            body = _json(request)
        except views.BadRequest:
            raise views.BadRequest("failed_to_parse_json") from None
        exchanges, queues, bindings = views.parse_definitions(body)
        for item in (*exchanges, *queues, *bindings):
            if not self.known_vhost(item["vhost"]):
                return bad_request(["no_such_vhost", item["vhost"]])
        for vhost in self.config.vhosts:
            if not any(i["vhost"] == vhost for i in (*exchanges, *queues, *bindings)):
                continue
            async with self.direct(request, vhost) as direct:
                for x in exchanges:
                    if x["vhost"] == vhost and not views.is_builtin(x["name"]):
                        await direct.call(
                            spec.Exchange.Declare(
                                exchange=x["name"],
                                exchange_type=x["type"],
                                durable=x["durable"],
                                auto_delete=x["auto_delete"],
                                internal=x["internal"],
                                arguments=x["arguments"],
                            )
                        )
                for q in queues:
                    if q["vhost"] == vhost:
                        await direct.call(
                            spec.Queue.Declare(
                                queue=q["name"],
                                durable=q["durable"],
                                auto_delete=q["auto_delete"],
                                arguments=q["arguments"],
                            )
                        )
                for b in bindings:
                    if b["vhost"] == vhost:
                        await _bind(
                            direct,
                            b["destination_type"],
                            b["source"],
                            b["destination"],
                            b["routing_key"],
                            b["arguments"],
                        )
        return NO_CONTENT

    # ---- health ------------------------------------------------------------------------

    async def health_alarms(self, request: Request, params: dict[str, str]) -> Response:
        rows = await self._node_rows(request)
        return _alarms([r["name"] for r in rows if r.get("mem_alarm")], "in the cluster")

    async def health_local_alarms(self, request: Request, params: dict[str, str]) -> Response:
        return _alarms([self.name] if self.node.alarm else [], "locally")

    async def health_ready(self, request: Request, params: dict[str, str]) -> Response:
        cluster = self.node.cluster
        if cluster is not None and not cluster.ready.is_set():
            return json_response(503, {"status": "failed", "reason": "not yet in the cluster"})
        return json_response(200, {"status": "ok"})

    async def aliveness(self, request: Request, params: dict[str, str]) -> Response:
        """Declare "aliveness-test" in the vhost, publish "test_message" to it and get it
        back (RabbitMQ's aliveness test), through the same paths a client takes."""
        vhost = params["vhost"]
        if not self.known_vhost(vhost):
            return not_found()
        async with self.direct(request, vhost) as direct:
            await direct.call(spec.Queue.Declare(queue=ALIVENESS_QUEUE))
            await direct.publish("", ALIVENESS_QUEUE, b"\x00\x00", ALIVENESS_BODY, False)
            for _ in range(ALIVENESS_TRIES):
                got = _get_ok(await direct.call(spec.Basic.Get(queue=ALIVENESS_QUEUE, no_ack=True)))
                if got is not None:
                    if got.body == ALIVENESS_BODY:
                        return json_response(200, {"status": "ok"})
                    continue  # an old message: the next one may be ours
                await anyio.sleep(0.05)
        return json_response(
            503, {"status": "failed", "reason": "the test message did not come back"}
        )


_LOCAL_KINDS = frozenset({"connections", "channels", "consumers", "queues", "node"})


def _one(rows: Iterable[JsonObject]) -> Response:
    row = next(iter(rows), None)
    return not_found() if row is None else json_response(200, row)


def _not_clustered() -> Response:
    return error_response(400, "bad_request", "this node is not part of a cluster")


def _alarms(nodes: list[str], where: str) -> Response:
    if not nodes:
        return json_response(200, {"status": "ok"})
    return json_response(
        503,
        {
            "status": "failed",
            "reason": f"There are alarms in effect {where}",
            "alarms": [{"node": n, "resource": "memory"} for n in nodes],
        },
    )


def _get_ok(sent: list[Sent]) -> Sent | None:
    return next((s for s in sent if isinstance(s.method, spec.Basic.GetOk)), None)


async def _bind(
    direct: DirectConnection,
    kind: str,
    source: str,
    destination: str,
    routing_key: str,
    arguments: dict[str, Any],
) -> None:
    if kind == "queue":
        await direct.call(
            spec.Queue.Bind(
                queue=destination, exchange=source, routing_key=routing_key, arguments=arguments
            )
        )
    else:
        await direct.call(
            spec.Exchange.Bind(
                destination=_exchange_name(destination),
                source=source,
                routing_key=routing_key,
                arguments=arguments,
            )
        )


def _rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
