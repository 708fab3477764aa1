"""The management HTTP API of one real node, driven by pika traffic, field by field, and
`warren ctl`'s listings on it (tables and --json)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()
NOT_FOUND = {"error": "Object Not Found", "reason": "Not Found"}

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("WARREN_TEST_BROKER_URL")), reason="starts its own Warren nodes"
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MgmtNode:
    amqp_port: int
    url: str
    proc: subprocess.Popen[bytes]

    def connect(self, label: str) -> Any:
        params = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F")
        params.client_properties = {"connection_name": label}
        return pika.BlockingConnection(params)

    def api(
        self, method: str, path: str, body: object = None, *, auth: str | None = _AUTH
    ) -> tuple[int, Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if auth is not None:
            request.add_header("Authorization", auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, raw, headers = answer.status, answer.read(), dict(answer.headers)
        except urllib.error.HTTPError as exc:
            status, raw, headers = exc.code, exc.read(), dict(exc.headers)
            exc.close()
        return status, json.loads(raw) if raw.strip() else None, headers

    def get(self, path: str) -> Any:
        status, body, _ = self.api("GET", path)
        assert status == 200, (path, status, body)
        return body


def _start(tmp: Path, *extra: str) -> MgmtNode:
    amqp, mgmt = _free_port(), _free_port()
    cmd = [
        sys.executable, "-m", "node.cli", "node", "--host", "127.0.0.1", "--port", str(amqp),
        "--name", f"mgmt-{amqp}", "--data-dir", str(tmp / f"data-{amqp}"),
        "--management-port", str(mgmt), "--metrics-port", "0", *extra,
    ]  # fmt: skip
    with (tmp / f"node-{amqp}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    node = MgmtNode(amqp, f"http://127.0.0.1:{mgmt}", proc)
    deadline = time.monotonic() + 20
    while True:
        try:
            if node.api("GET", "/api/healthz", auth=None)[0] == 200:
                return node
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((tmp / f"node-{amqp}.log").read_text())
        time.sleep(0.05)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MgmtNode]:
    started = _start(tmp_path_factory.mktemp("mgmt"))
    yield started
    started.proc.terminate()
    started.proc.wait(10)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_auth_unknown_paths_and_methods_answer_like_rabbitmq(node: MgmtNode) -> None:
    status, body, headers = node.api("GET", "/api/overview", auth=None)
    assert (status, body["error"]) == (401, "not_authorized")
    assert headers["WWW-Authenticate"].startswith("Basic realm=")
    bad = "Basic " + base64.b64encode(b"guest:wrong").decode()
    status, body, _ = node.api("GET", "/api/queues", auth=bad)
    assert (status, body) == (401, {"error": "not_authorized", "reason": "Login failed"})
    assert node.api("GET", "/api/queues/%2F/no-such-queue")[:2] == (404, NOT_FOUND)
    assert node.api("GET", "/api/queues/no-such-vhost")[:2] == (404, NOT_FOUND)
    assert node.api("GET", "/api/exchanges/%2F/no-such-x")[:2] == (404, NOT_FOUND)
    status, _, headers = node.api("POST", "/api/overview", {})
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    status, body, _ = node.api("PUT", f"/api/queues/%2F/{unique('q')}", "not an object")
    assert (status, body) == (400, {"error": "bad_request", "reason": "not_json"})
    status, body, _ = node.api("POST", "/api/queues/%2F/q/get", {"count": 1})
    assert (status, body) == (
        400,
        {"error": "bad_request", "reason": "[{key_missing,ackmode},{key_missing,encoding}]"},
    )
    status, body, _ = node.api(
        "POST", "/api/queues/%2F/no-such-q/get", {"ackmode": "ack_requeue_true", "encoding": "auto"}
    )
    assert (status, body) == (
        404,
        {"error": "not_found", "reason": "NOT_FOUND - no queue 'no-such-q' in vhost '/'"},
    )


def test_listings_carry_rabbitmqs_fields(node: MgmtNode) -> None:
    label = unique("client")
    conn = node.connect(label)
    try:
        ch = conn.channel()
        queue = unique("q")
        ch.queue_declare(queue, arguments={"x-max-priority": 5})
        ch.confirm_delivery()
        for n in range(2):
            ch.basic_publish("", queue, b"x" * (n + 1), pika.BasicProperties(priority=1))
        consumer = conn.channel()
        consumer.basic_qos(prefetch_count=3)
        tag = unique("ctag")
        consumer.basic_consume(queue, lambda *_: None, consumer_tag=tag, exclusive=True)
        conn.process_data_events(0.3)

        (row,) = [
            c
            for c in node.get("/api/connections")
            if c["client_properties"].get("connection_name") == label
        ]
        assert row["name"] == f"127.0.0.1:{row['peer_port']} -> 127.0.0.1:{node.amqp_port}"
        assert node.get(f"/api/connections/{quote(row['name'], safe='')}") == row
        expected = {
            "node": f"mgmt-{node.amqp_port}",
            "type": "network",
            "protocol": "AMQP 0-9-1",
            "host": "127.0.0.1",
            "port": node.amqp_port,
            "peer_host": "127.0.0.1",
            "user": "guest",
            "vhost": "/",
            "auth_mechanism": "PLAIN",
            "ssl": False,
            "timeout": 60,
            "frame_max": 131072,
            "channel_max": 2047,
            "channels": 2,
            "state": "running",
        }
        assert {k: row[k] for k in expected} == expected
        assert abs(row["connected_at"] / 1000 - time.time()) < 60

        channels = node.get(f"/api/connections/{quote(row['name'], safe='')}/channels")
        assert [(c["number"], c["confirm"], c["consumer_count"]) for c in channels] == [
            (1, True, 0),
            (2, False, 1),
        ]
        assert (channels[1]["prefetch_count"], channels[1]["messages_unacknowledged"]) == (3, 2)
        assert channels[1]["name"] == f"{row['name']} (2)"

        (consumer_row,) = [c for c in node.get("/api/consumers/%2F") if c["consumer_tag"] == tag]
        assert consumer_row["exclusive"] is True
        assert consumer_row["prefetch_count"] == 3
        assert consumer_row["channel_details"]["name"] == channels[1]["name"]

        q = node.get(f"/api/queues/%2F/{queue}")
        assert q["arguments"] == {"x-max-priority": 5}
        assert (q["messages"], q["messages_unacknowledged"], q["messages_ready"]) == (2, 2, 0)
        assert (q["message_bytes"], q["consumers"], q["exclusive_consumer_tag"]) == (3, 1, tag)
        assert q["node"] == expected["node"]
        assert "idle_since" not in q  # (it has a consumer)

        (binding,) = [b for b in node.get("/api/bindings/%2F") if b["destination"] == queue]
        assert binding == {
            "source": "",
            "vhost": "/",
            "destination": queue,
            "destination_type": "queue",
            "routing_key": queue,
            "arguments": {},
            "properties_key": queue,
        }
        (vhost,) = node.get("/api/vhosts")
        assert (vhost["name"], vhost["tracing"]) == ("/", False)
        assert vhost["messages"] >= 2
        (user,) = node.get("/api/users")
        assert (user["name"], user["tags"]) == ("guest", ["administrator"])
        assert node.get("/api/whoami") == {"name": "guest", "tags": ["administrator"]}
        overview = node.get("/api/overview")
        assert overview["object_totals"]["consumers"] >= 1
        assert overview["message_stats"]["confirm"] >= 2
        rows = node.get("/api/queues?columns=name,messages&sort=name")
        assert [r["name"] for r in rows] == sorted(r["name"] for r in rows)
        assert all(set(r) <= {"name", "messages"} for r in rows)
    finally:
        conn.close()


def test_exchanges_bindings_publish_and_get_through_the_api(node: MgmtNode) -> None:
    exchange, queue = unique("x"), unique("q")
    assert node.api("PUT", f"/api/exchanges/%2F/{exchange}", {"type": "topic"})[:2] == (201, None)
    assert node.api("PUT", f"/api/exchanges/%2F/{exchange}", {"type": "topic"})[:2] == (204, None)
    status, body, _ = node.api("PUT", f"/api/exchanges/%2F/{unique('x')}", {"type": "bogus"})
    assert (status, body["error"]) == (400, "bad_request")
    assert node.get(f"/api/exchanges/%2F/{exchange}") == {
        "name": exchange,
        "vhost": "/",
        "type": "topic",
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
        "user_who_performed_action": "",
    }
    assert node.api("PUT", f"/api/queues/%2F/{queue}", {"durable": False})[:2] == (201, None)
    pair = f"/api/bindings/%2F/e/{exchange}/q/{queue}"
    status, _, headers = node.api("POST", pair, {"routing_key": "a.#", "arguments": {}})
    assert (status, headers["Location"]) == (201, f"{queue}/a.%23")
    assert [b["properties_key"] for b in node.get(pair)] == ["a.#"]
    publish = f"/api/exchanges/%2F/{exchange}/publish"
    message = {
        "routing_key": "a.b",
        "payload": "héllo",
        "payload_encoding": "string",
        "properties": {"content_type": "text/plain", "headers": {"k": "v"}, "delivery_mode": 2},
    }
    assert node.api("POST", publish, message)[:2] == (200, {"routed": True})
    assert node.api("POST", publish, {**message, "routing_key": "z"})[:2] == (
        200,
        {"routed": False},
    )
    raw = {
        **message,
        "payload": base64.b64encode(b"\xff\x00").decode(),
        "payload_encoding": "base64",
    }
    assert node.api("POST", publish, raw)[:2] == (200, {"routed": True})
    status, got, _ = node.api(
        "POST",
        f"/api/queues/%2F/{queue}/get",
        {"count": 5, "ackmode": "ack_requeue_false", "encoding": "auto", "truncate": 3},
    )
    assert status == 200
    assert [(m["payload"], m["payload_encoding"], m["payload_bytes"]) for m in got] == [
        ("hé", "string", 6),
        (base64.b64encode(b"\xff\x00").decode(), "base64", 2),
    ]
    assert got[0]["properties"] == {
        "content_type": "text/plain",
        "headers": {"k": "v"},
        "delivery_mode": 2,
    }
    assert (got[0]["exchange"], got[0]["routing_key"], got[0]["message_count"]) == (
        exchange,
        "a.b",
        1,
    )
    assert node.get(f"/api/queues/%2F/{queue}")["messages"] == 0
    assert node.api("DELETE", f"{pair}/a.%23")[:2] == (204, None)
    assert node.get(pair) == []
    assert node.api("DELETE", f"{pair}/a.%23")[:2] == (404, NOT_FOUND)
    assert node.api("DELETE", f"/api/exchanges/%2F/{exchange}")[:2] == (204, None)
    assert node.api("DELETE", f"/api/exchanges/%2F/{exchange}")[:2] == (404, NOT_FOUND)
    assert node.api("DELETE", f"/api/queues/%2F/{queue}?if-empty=true")[:2] == (204, None)


def test_memory_alarm_fails_the_alarms_health_check(tmp_path: Path) -> None:
    small = _start(tmp_path, "--memory-high-watermark", "2000")
    try:
        assert small.api("GET", "/api/health/checks/alarms")[:2] == (200, {"status": "ok"})
        queue = unique("q-big")
        assert small.api("PUT", f"/api/queues/%2F/{queue}", {})[0] == 201
        big = {"routing_key": queue, "payload": "x" * 5000, "payload_encoding": "string"}
        assert small.api("POST", "/api/exchanges/%2F/amq.default/publish", big)[:2] == (
            200,
            {"routed": True},
        )
        status, body, _ = small.api("GET", "/api/health/checks/alarms")
        assert status == 503
        assert body["status"] == "failed"
        assert body["alarms"] == [{"node": f"mgmt-{small.amqp_port}", "resource": "memory"}]
        assert small.get("/api/nodes")[0]["mem_alarm"] is True
        assert small.api("DELETE", f"/api/queues/%2F/{queue}/contents")[0] == 204
        assert small.api("GET", "/api/health/checks/alarms")[:2] == (200, {"status": "ok"})
    finally:
        small.proc.terminate()
        small.proc.wait(10)


def _ctl(node: MgmtNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "ctl", "--node", node.url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )


def test_ctl_lists_tables_and_json(node: MgmtNode) -> None:
    label = unique("ctl-client")
    conn = node.connect(label)
    try:
        queue = unique("q-ctl")
        ch = conn.channel()
        ch.queue_declare(queue)
        ch.basic_publish("", queue, b"one")
        tag = unique("ctag")
        conn.channel().basic_consume(queue, lambda *_: None, consumer_tag=tag)
        conn.process_data_events(0.2)
        table = _ctl(node, "queues")
        assert table.returncode == 0, table.stderr
        header, *lines = table.stdout.splitlines()
        assert header.split() == [
            "name", "vhost", "type", "durable", "auto", "delete", "exclusive", "messages",
            "messages", "ready", "messages", "unacknowledged", "consumers", "node", "state",
        ]  # fmt: skip
        (line,) = [ln for ln in lines if ln.startswith(queue + " ")]
        assert line.split() == [queue, "/", "classic", "no", "no", "no", "1", "0", "1", "1",
                                f"mgmt-{node.amqp_port}", "running"]  # fmt: skip
        as_json = _ctl(node, "--json", "consumers")
        assert as_json.returncode == 0, as_json.stderr
        (row,) = [c for c in json.loads(as_json.stdout) if c["consumer_tag"] == tag]
        assert row["queue"] == {"name": queue, "vhost": "/"}
        consumers = _ctl(node, "consumers", "--vhost", "/")
        assert consumers.stdout.splitlines()[0].split()[:5] == [
            "consumer", "tag", "vhost", "queue", "channel",
        ]  # fmt: skip
        assert any(ln.startswith(tag + " ") for ln in consumers.stdout.splitlines())
        for kind in ("exchanges", "bindings", "connections", "channels"):
            listed = _ctl(node, kind)
            assert listed.returncode == 0, listed.stderr
            assert len(listed.stdout.splitlines()) >= 2
            assert json.loads(_ctl(node, "--json", "list", kind).stdout)
        assert label not in _ctl(node, "connections").stdout  # (names, not client labels)
        missing = _ctl(node, "queues", "--vhost", "nope")
        assert missing.returncode == 2
        assert missing.stderr.count("\n") == 1
        assert "404 Object Not Found" in missing.stderr
    finally:
        conn.close()
