"""The management HTTP API on a real three-node cluster: any node answers for all of them.

Clients are pika connections to different nodes; the API is asked through one node and
must list what the others hold (connections, channels, consumers), the counts of a queue
another node leads, close a connection another node holds, and change queues through the
same replicated paths a client's AMQP methods take.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest

from tests.cluster.support import REPO_ROOT, Cluster, free_port, unique, wait_until

_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def api(
    c: Cluster | str,
    i: int,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    base = c if isinstance(c, str) else c[i].management_url
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", _AUTH)
    request.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
        exc.close()
    return status, json.loads(raw) if raw.strip() else None


def get(c: Cluster, i: int, path: str) -> Any:
    status, body = api(c, i, "GET", path)
    assert status == 200, (path, status, body)
    return body


def named(c: Cluster, i: int, label: str) -> Any:
    """A connection to node i whose client_properties carry connection_name=label."""
    return c.connect(i, client_properties={"connection_name": label})


def by_label(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    found = [r for r in rows if r["client_properties"].get("connection_name") == label]
    assert len(found) == 1, (label, [r["client_properties"] for r in rows])
    return found[0]


def test_any_node_lists_every_nodes_connections_channels_consumers_and_counts(
    cluster: Cluster,
) -> None:
    labels = [unique(f"conn{i}") for i in range(3)]
    conns = [named(cluster, i, labels[i]) for i in range(3)]
    owner = conns[2].channel()
    queue = unique("q-led-by-w3")
    owner.queue_declare(queue, durable=True)  # client-local: led by w3
    publisher = conns[0].channel()
    publisher.confirm_delivery()
    for n in range(3):
        publisher.basic_publish("", queue, f"m{n}".encode())
    consumer = conns[1].channel()
    consumer.basic_qos(prefetch_count=1)
    got: list[bytes] = []
    tag = unique("ctag")
    consumer.basic_consume(queue, lambda ch, m, p, body: got.append(body), consumer_tag=tag)
    wait_until(lambda: conns[1].process_data_events(0.05) or got, 5, "the first delivery")

    rows = get(cluster, 0, "/api/connections")
    for i, label in enumerate(labels):
        row = by_label(rows, label)
        assert row["node"] == cluster[i].name
        assert row["port"] == cluster[i].amqp_port
        assert row["host"] == "127.0.0.1"
        assert row["name"] == f"127.0.0.1:{row['peer_port']} -> 127.0.0.1:{cluster[i].amqp_port}"
        assert (row["user"], row["vhost"], row["protocol"], row["type"]) == (
            "guest",
            "/",
            "AMQP 0-9-1",
            "network",
        )
        assert (row["ssl"], row["state"], row["auth_mechanism"]) == (False, "running", "PLAIN")
        assert row["channels"] == 1
        assert row["client_properties"]["product"] == "Pika Python Client Library"
        assert isinstance(row["connected_at"], int)
        assert isinstance(row["timeout"], int)
        assert row["frame_max"] == 131072

    consumer_conn = by_label(rows, labels[1])
    channels = get(cluster, 2, "/api/channels")
    mine = [c for c in channels if c["connection_details"]["name"] == consumer_conn["name"]]
    assert len(mine) == 1
    channel = mine[0]
    assert channel["name"] == f"{consumer_conn['name']} (1)"
    assert (channel["number"], channel["node"], channel["user"], channel["vhost"]) == (
        1,
        cluster[1].name,
        "guest",
        "/",
    )
    assert channel["connection_details"] == {
        "name": consumer_conn["name"],
        "peer_host": "127.0.0.1",
        "peer_port": consumer_conn["peer_port"],
    }
    assert (channel["consumer_count"], channel["prefetch_count"]) == (1, 1)
    assert (channel["messages_unacknowledged"], channel["messages_unconfirmed"]) == (1, 0)
    assert (channel["confirm"], channel["transactional"], channel["state"]) == (
        False,
        False,
        "running",
    )
    publisher_conn = by_label(rows, labels[0])
    assert [
        c["confirm"] for c in channels if c["connection_details"]["name"] == publisher_conn["name"]
    ] == [True]

    consumers = [c for c in get(cluster, 0, "/api/consumers") if c["consumer_tag"] == tag]
    assert consumers == [
        {
            "consumer_tag": tag,
            "channel_details": {
                "name": channel["name"],
                "number": 1,
                "node": cluster[1].name,
                "connection_name": consumer_conn["name"],
                "peer_host": "127.0.0.1",
                "peer_port": consumer_conn["peer_port"],
                "user": "guest",
            },
            "queue": {"name": queue, "vhost": "/"},
            "ack_required": True,
            "prefetch_count": 1,
            "exclusive": False,
            "active": True,
            "activity_status": "up",
            "arguments": {},
        }
    ]

    for i in (0, 1):  # neither leads the queue
        q = get(cluster, i, f"/api/queues/%2F/{queue}")
        assert (q["name"], q["vhost"], q["node"], q["type"], q["state"]) == (
            queue,
            "/",
            cluster[2].name,
            "classic",
            "running",
        )
        assert (q["durable"], q["auto_delete"], q["exclusive"], q["arguments"]) == (
            True,
            False,
            False,
            {},
        )
        assert (q["messages"], q["messages_ready"], q["messages_unacknowledged"]) == (3, 2, 1)
        assert (q["message_bytes"], q["message_bytes_ready"]) == (6, 4)
        assert q["message_bytes_unacknowledged"] == 2
        assert (q["consumers"], q["policy"], q["exclusive_consumer_tag"]) == (1, None, None)
        assert q["memory"] > 6
        listed = [r for r in get(cluster, i, "/api/queues/%2F") if r["name"] == queue]
        assert listed == [q | {"memory": listed[0]["memory"]}]

    overview = get(cluster, 1, "/api/overview")
    assert (overview["node"], overview["product_name"]) == (cluster[1].name, "Warren")
    totals = overview["object_totals"]
    assert min(totals["connections"], totals["channels"]) >= 3
    assert min(totals["consumers"], totals["queues"], totals["exchanges"] - 6) >= 1
    assert overview["queue_totals"]["messages"] >= 3
    assert overview["message_stats"]["publish"] >= 3
    assert overview["message_stats"]["confirm"] >= 3
    assert overview["message_stats"]["deliver"] >= 1
    assert isinstance(overview["message_stats"]["publish_details"]["rate"], float)
    nodes = get(cluster, 2, "/api/nodes")
    assert [(n["name"], n["running"], n["type"]) for n in nodes] == [
        (node.name, True, "disc") for node in cluster.nodes
    ]
    listeners = {(lst["node"], lst["protocol"], lst["port"]) for lst in overview["listeners"]}
    assert (cluster[0].name, "amqp", cluster[0].amqp_port) in listeners
    assert (cluster[2].name, "http", cluster[2].management_port) in listeners


def serve_until_closed(conn: Any, timeout: float = 5.0) -> None:
    """Run pika's I/O until the broker closes the connection (pika raises then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.process_data_events(0.1)


def test_delete_closes_a_connection_held_by_another_node(cluster: Cluster) -> None:
    label = unique("victim")
    victim = named(cluster, 2, label)
    name = by_label(get(cluster, 0, "/api/connections"), label)["name"]
    status, _ = api(
        cluster, 0, "DELETE", f"/api/connections/{quote(name, safe='')}", None, {"X-Reason": "bye"}
    )
    assert status == 204
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        serve_until_closed(victim)
    assert (info.value.reply_code, info.value.reply_text) == (320, "CONNECTION_FORCED - bye")
    wait_until(
        lambda: all(
            r["client_properties"].get("connection_name") != label
            for r in get(cluster, 1, "/api/connections")
        ),
        5,
        "the connection to leave the listing",
    )
    status, body = api(cluster, 1, "DELETE", f"/api/connections/{quote(name, safe='')}")
    assert (status, body) == (404, {"error": "Object Not Found", "reason": "Not Found"})


def test_put_on_one_node_declare_passive_on_another_then_get_purge_delete(
    cluster: Cluster,
) -> None:
    queue = unique("q-put")
    path = f"/api/queues/%2F/{queue}"
    body = {"durable": True, "auto_delete": False, "arguments": {"x-max-length": 10}}
    assert api(cluster, 0, "PUT", path, body) == (201, None)
    assert api(cluster, 1, "PUT", path, body) == (204, None)
    assert api(cluster, 2, "PUT", path, {"durable": False}) == (
        400,
        {
            "error": "bad_request",
            "reason": f"inequivalent arg 'durable' for queue '{queue}' in vhost '/': "
            "received 'false' but current is 'true'",
        },
    )
    ch = cluster.channel(2, confirm=True)
    declared = ch.queue_declare(queue, passive=True)
    assert declared.method.message_count == 0
    assert get(cluster, 2, path)["node"] == cluster[0].name  # placed where it was PUT
    assert get(cluster, 2, path)["arguments"] == {"x-max-length": 10}
    for n in range(3):
        ch.basic_publish("", queue, f"m{n}".encode(), pika.BasicProperties(content_type="text/x"))

    # basic.get through node 3, whose queue is led by node 1 (forwarded there)
    status, got = api(
        cluster,
        2,
        "POST",
        f"{path}/get",
        {"count": 2, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50000},
    )
    assert status == 200
    assert got == [
        {
            "payload_bytes": 2,
            "redelivered": False,
            "exchange": "",
            "routing_key": queue,
            "message_count": 2 - n,
            "properties": {"content_type": "text/x"},
            "payload": f"m{n}",
            "payload_encoding": "string",
        }
        for n in range(2)
    ]
    q = wait_until(
        lambda: (q := get(cluster, 1, path)) and q["messages_ready"] == 3 and q, 5, "requeue"
    )
    assert q["messages_unacknowledged"] == 0
    status, got = api(
        cluster, 1, "POST", f"{path}/get", {"count": 1, "ackmode": "reject_requeue_false",
                                             "encoding": "base64"}
    )  # fmt: skip
    assert status == 200
    assert [(m["payload"], m["payload_encoding"], m["redelivered"]) for m in got] == [
        (base64.b64encode(b"m0").decode(), "base64", True)
    ]
    wait_until(lambda: get(cluster, 0, path)["messages"] == 2, 5, "the rejected message gone")

    assert api(cluster, 1, "DELETE", f"{path}/contents") == (204, None)
    assert get(cluster, 2, path)["messages"] == 0
    assert api(cluster, 2, "DELETE", path) == (204, None)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(0).queue_declare(queue, passive=True)
    assert info.value.reply_code == 404
    assert api(cluster, 0, "DELETE", path) == (
        404,
        {"error": "Object Not Found", "reason": "Not Found"},
    )
    assert api(cluster, 0, "GET", path)[0] == 404


def test_health_and_aliveness_from_any_node(cluster: Cluster) -> None:
    for i in range(3):
        assert api(cluster, i, "GET", "/api/health/checks/alarms") == (200, {"status": "ok"})
        assert api(cluster, i, "GET", "/api/health/checks/ready-to-serve-clients") == (
            200,
            {"status": "ok"},
        )
        assert api(cluster, i, "GET", "/api/aliveness-test/%2F") == (200, {"status": "ok"})
    assert api(cluster, 0, "GET", "/api/aliveness-test/nope")[0] == 404


@contextlib.contextmanager
def fresh_node(tmp: Path) -> Iterator[str]:
    """A standalone node with a management API: its base URL."""
    amqp, mgmt = free_port(), free_port()
    log = tmp / "fresh.log"
    cmd = [
        sys.executable, "-m", "node.cli", "node", "--host", "127.0.0.1", "--port", str(amqp),
        "--name", "fresh", "--data-dir", str(tmp / "fresh-data"),
        "--management-port", str(mgmt), "--metrics-port", "0",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{mgmt}"
    try:
        wait_until(lambda: api(url, 0, "GET", "/api/healthz")[0] == 200, 20, "the fresh node")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_definitions_export_imports_into_a_fresh_node(cluster: Cluster, tmp_path: Path) -> None:
    exchange, queue, lazy = unique("x-defs"), unique("q-defs"), unique("q-defs-ttl")
    ch = cluster.channel(1)
    ch.exchange_declare(exchange, "topic", durable=True)
    ch.queue_declare(queue, durable=True)
    ch.queue_declare(lazy, arguments={"x-message-ttl": 60000})
    ch.queue_bind(queue, exchange, "a.*.c")
    ch.queue_bind(lazy, exchange, "k", arguments={"x-match": "any"})
    exported = get(cluster, 2, "/api/definitions")
    assert (exported["product_name"], exported["vhosts"]) == ("Warren", [{"name": "/"}])
    assert exported["users"][0]["hashing_algorithm"] == "rabbit_password_hashing_sha256"

    def ours(document: dict[str, Any]) -> dict[str, Any]:
        names = {exchange, queue, lazy}
        return {
            "exchanges": [x for x in document["exchanges"] if x["name"] in names],
            "queues": sorted(
                (q for q in document["queues"] if q["name"] in names), key=lambda q: q["name"]
            ),
            "bindings": [b for b in document["bindings"] if b["source"] in names],
        }

    mine = ours(exported)
    assert mine["exchanges"] == [
        {
            "name": exchange,
            "vhost": "/",
            "type": "topic",
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
    ]
    assert (len(mine["queues"]), len(mine["bindings"])) == (2, 2)
    with fresh_node(tmp_path) as url:
        start = time.monotonic()
        assert api(url, 0, "POST", "/api/definitions", exported) == (204, None)
        assert time.monotonic() - start < 10
        assert ours(api(url, 0, "GET", "/api/definitions")[1]) == mine
        assert api(
            url, 0, "POST", "/api/definitions", {"queues": [{"name": "x", "vhost": "v"}]}
        ) == (
            400,
            {"error": "bad_request", "reason": ["no_such_vhost", "v"]},
        )
