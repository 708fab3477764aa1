"""node/up.py and node/ctl.py: command lines, supervision with stand-in children, tables,
and `warren ctl` against a fake management API (a real HttpServer on a loopback port)."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from anyio.from_thread import start_blocking_portal
from click.testing import CliRunner

from node.ctl import ctl_group, format_table, list_columns
from node.http import Handler, HttpServer, Request, Response, Router, json_response
from node.logs import EventLogger
from node.up import NodeSpec, Supervisor, load_or_create_secret, node_commands, up_command

# --- warren up ----------------------------------------------------------------------------


def _three(tmp: Path) -> list[NodeSpec]:
    return node_commands(
        3,
        host="127.0.0.1",
        base_port=5672,
        raft_base_port=4321,
        link_base_port=4421,
        management_base_port=15672,
        metrics_base_port=15692,
        data_dir=tmp,
        log_level="info",
        python="/py",
    )


def test_node_commands_for_three_nodes(tmp_path: Path) -> None:
    specs = _three(tmp_path)
    assert [s.name for s in specs] == ["warren-1", "warren-2", "warren-3"]
    second = specs[1]
    assert (second.amqp_port, second.raft_port, second.link_port) == (5673, 4322, 4422)
    assert (second.management_port, second.metrics_port) == (15673, 15693)
    assert second.data_dir == tmp_path / "warren-2"
    assert second.amqp_url == "amqp://guest:guest@127.0.0.1:5673/%2F"
    assert second.management_url == "http://127.0.0.1:15673/"
    assert second.metrics_url == "http://127.0.0.1:15693/metrics"
    assert second.argv == (
        "/py",
        "-m",
        "node.cli",
        "node",
        "--name",
        "warren-2",
        "--host",
        "127.0.0.1",
        "--port",
        "5673",
        "--advertise-host",
        "127.0.0.1",
        "--raft-port",
        "4322",
        "--link-port",
        "4422",
        "--management-port",
        "15673",
        "--metrics-port",
        "15693",
        "--data-dir",
        str(tmp_path / "warren-2"),
        "--log-level",
        "info",
        "--peer",
        "warren-1=127.0.0.1:4321",
        "--peer",
        "warren-3=127.0.0.1:4323",
    )
    peers = [a for s in specs for a in s.argv if a.startswith("warren-") and "=" in a]
    assert len(peers) == 6


def test_node_commands_rejects_colliding_or_out_of_range_ports(tmp_path: Path) -> None:
    common = {
        "host": "127.0.0.1",
        "link_base_port": 4421,
        "management_base_port": 15672,
        "metrics_base_port": 15692,
        "data_dir": tmp_path,
        "log_level": "info",
    }
    with pytest.raises(ValueError, match="port 5674 is in both"):
        node_commands(3, base_port=5672, raft_base_port=5674, **common)
    with pytest.raises(ValueError, match="out of range"):
        node_commands(3, base_port=65534, raft_base_port=4321, **common)


def test_cluster_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "d" / "cluster.secret"
    secret = load_or_create_secret(path)
    assert len(secret) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == secret


def test_up_reports_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            up_command,
            ["--nodes", "1", "--base-port", str(port), "--data-dir", str(tmp_path / "data")],
        )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "warren-1 amqp port" in result.stderr
    assert "already in use" in result.stderr
    assert not (tmp_path / "data").exists()


def _stand_in(name: str, code: str) -> NodeSpec:
    return NodeSpec(name, "127.0.0.1", 1, 2, 3, 4, 5, Path("."), (sys.executable, "-c", code))


@dataclass
class Transcript:
    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def echo(self, line: str, err: bool) -> None:
        with self.changed:
            self.lines.append(("E " if err else "O ") + line)
            self.changed.notify_all()

    def wait_for(self, *needles: str, timeout: float = 5.0) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: all(any(n in line for line in self.lines) for n in needles), timeout
            )
        assert ok, (needles, self.lines)


def _supervise(
    specs: list[NodeSpec], transcript: Transcript, **kwargs: float
) -> tuple[threading.Event, threading.Thread, list[int]]:
    stop = threading.Event()
    codes: list[int] = []
    supervisor = Supervisor(
        specs, env=dict(os.environ), echo=transcript.echo, poll_s=0.05, **kwargs
    )
    thread = threading.Thread(target=lambda: codes.append(supervisor.run(stop)))
    thread.start()
    return stop, thread, codes


def test_supervisor_prefixes_output_reports_deaths_and_stops_the_rest() -> None:
    transcript = Transcript()
    specs = [
        _stand_in("warren-1", "print('bye', flush=True); raise SystemExit(3)"),
        _stand_in("warren-2", "import time; print('hello', flush=True); time.sleep(60)"),
    ]
    stop, thread, codes = _supervise(specs, transcript)
    transcript.wait_for("O warren-2 | hello", "E warren up: warren-1 exited with code 3")
    assert transcript.lines.index("O warren-1 | bye") < transcript.lines.index(
        "E warren up: warren-1 exited with code 3"
    )
    stop.set()
    thread.join(timeout=5)
    assert codes == [0]
    assert not any("warren-2 exited" in line for line in transcript.lines)


def test_supervisor_kills_a_node_that_ignores_sigterm() -> None:
    transcript = Transcript()
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(60)"
    )
    stop, thread, codes = _supervise([_stand_in("warren-1", code)], transcript, grace_s=0.3)
    transcript.wait_for("warren-1 | ready")
    stop.set()
    thread.join(timeout=5)
    assert codes == [0]
    assert "E warren up: warren-1 did not stop within 0.3 s; killed" in transcript.lines


def test_supervisor_returns_1_when_every_node_died() -> None:
    transcript = Transcript()
    _, thread, codes = _supervise([_stand_in("warren-1", "raise SystemExit(4)")], transcript)
    thread.join(timeout=5)
    assert codes == [1]
    assert "E warren up: warren-1 exited with code 4" in transcript.lines


# --- format_table -------------------------------------------------------------------------


def test_format_table_aligns_columns() -> None:
    rows: list[dict[str, object]] = [
        {"name": "q1", "durable": True, "messages": 5, "node": None},
        {"name": "a-longer-name", "durable": False, "messages": 1234},
    ]
    assert format_table(rows, ["name", "durable", "messages", "node"]).split("\n") == [
        "name           durable  messages  node",
        "q1             yes             5  -",
        "a-longer-name  no           1234  -",
    ]
    assert format_table([], ["name"]) == "name"
    assert list_columns("queues", [{"name": "q", "vhost": "/", "x": {}}]) == ["name", "vhost"]
    assert list_columns("other", [{"a": 1, "b": [1]}]) == ["a"]


# --- warren ctl against a fake node -------------------------------------------------------

CLUSTER = {
    "cluster_name": "warren",
    "node": "warren-1",
    "raft": {
        "leader": "warren-2",
        "role": "follower",
        "term": 7,
        "commit_index": 120,
        "last_applied": 119,
        "has_quorum": True,
    },
    "members": [
        {
            "name": "warren-1",
            "raft_address": "127.0.0.1:4321",
            "amqp_address": "127.0.0.1:5672",
            "link_address": "127.0.0.1:4421",
            "reachable": True,
            "serving": True,
            "alive": True,
            "queues_led": 3,
        },
        {
            "name": "warren-2",
            "raft_address": "127.0.0.1:4322",
            "amqp_address": None,
            "link_address": None,
            "reachable": False,
            "serving": False,
            "alive": True,
            "queues_led": 12,
        },
    ],
    "queues": 15,
}


@dataclass
class FakeNode:
    url: str
    requests: list[tuple[str, str, bytes]]


@pytest.fixture
def fake_node() -> Iterator[FakeNode]:
    requests: list[tuple[str, str, bytes]] = []

    def answer(
        value: object, status: int = 200, compute: Callable[[Request], object] | None = None
    ) -> Handler:
        async def handler(request: Request, params: dict[str, str]) -> Response:
            requests.append((request.method, request.path, request.body))
            return json_response(status, compute(request) if compute else value)

        return handler

    async def not_json(request: Request, params: dict[str, str]) -> Response:
        return Response(200, b"<html>hello</html>", content_type="text/html")

    router = Router()
    router.add("GET", "/api/warren/cluster", answer(CLUSTER))
    router.add(
        "POST",
        "/api/warren/members",
        answer(None, 201, lambda r: {"added": json.loads(r.body)["name"]}),
    )
    router.add("DELETE", "/api/warren/members/{name}", answer(None, 204))
    router.add(
        "POST",
        "/api/warren/rebalance",
        answer({"moved": 4, "leaders": {"warren-2": 8, "warren-1": 7}}),
    )
    queues = [
        {"name": "tasks", "vhost": "/", "type": "classic", "durable": True, "messages": 10},
        {"name": "q2", "vhost": "/", "type": "quorum", "durable": False, "messages": 0},
    ]
    router.add("GET", "/api/queues", answer(queues))
    router.add("GET", "/api/exchanges", answer([]))
    router.add("GET", "/api/bindings", not_json)
    consumers = [
        {
            "consumer_tag": "ctag-1",
            "queue": {"name": "tasks", "vhost": "/"},
            "channel_details": {"name": "1.2.3.4:5 -> 6.7.8.9:5672 (1)", "node": "warren-2"},
            "ack_required": True,
            "prefetch_count": 10,
            "exclusive": False,
            "active": True,
        }
    ]
    router.add("GET", "/api/consumers", answer(consumers))
    router.add("GET", "/api/queues/{vhost}", answer(queues[:1]))
    server = HttpServer(
        router,
        host="127.0.0.1",
        port=0,
        log=EventLogger(logging.getLogger("test.ctl")),
        check_user=lambda user, password: (user, password) == ("guest", "guest"),
    )
    with start_blocking_portal(backend="asyncio") as portal:
        future, _ = portal.start_task(server.serve)
        yield FakeNode(f"http://127.0.0.1:{server.port}", requests)
        future.cancel()


def _ctl(node: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(ctl_group, ["--node", node, *args])
    return result.exit_code, result.stdout, result.stderr


def test_ctl_status(fake_node: FakeNode) -> None:
    code, out, err = _ctl(fake_node.url, "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:8] == [
        "Cluster:      warren",
        "This node:    warren-1",
        "Role:         follower",
        "Raft leader:  warren-2",
        "Term:         7",
        "Commit index: 120 (applied 119)",
        "Quorum:       yes",
        "Queues:       15",
    ]
    assert lines[8:] == [
        "",
        "name      raft address    amqp address    reachable  serving  alive  queues led",
        "warren-1  127.0.0.1:4321  127.0.0.1:5672  yes        yes      yes             3",
        "warren-2  127.0.0.1:4322  -               no         no       yes            12",
    ]
    assert fake_node.requests == [("GET", "/api/warren/cluster", b"")]


def test_ctl_members_json_and_env_var(fake_node: FakeNode) -> None:
    result = CliRunner().invoke(
        ctl_group, ["--json", "members"], env={"WARREN_CTL_NODE": fake_node.url}
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout) == CLUSTER["members"]
    code, out, _ = _ctl(fake_node.url, "members")
    assert code == 0
    assert out.splitlines()[0].startswith("name ")
    assert len(out.splitlines()) == 3


def test_ctl_membership_and_rebalance(fake_node: FakeNode) -> None:
    assert _ctl(fake_node.url, "add-member", "warren-4", "127.0.0.1:4324") == (
        0,
        "added member warren-4 (raft 127.0.0.1:4324)\n",
        "",
    )
    assert _ctl(fake_node.url, "remove-member", "warren 4") == (0, "removed member warren 4\n", "")
    code, out, _ = _ctl(fake_node.url, "rebalance")
    assert code == 0
    assert out.splitlines() == [
        "moved 4 queue leaders",
        "node      queues led",
        "warren-1           7",
        "warren-2           8",
    ]
    method, path, body = fake_node.requests[0]
    assert (method, path, json.loads(body)) == (
        "POST",
        "/api/warren/members",
        {"name": "warren-4", "raft_address": "127.0.0.1:4324"},
    )
    assert fake_node.requests[1] == ("DELETE", "/api/warren/members/warren%204", b"")
    assert fake_node.requests[2][:2] == ("POST", "/api/warren/rebalance")
    code, _, err = _ctl(fake_node.url, "add-member", "warren-5", "no-port")
    assert code == 2
    assert "HOST:PORT" in err


def test_ctl_list(fake_node: FakeNode) -> None:
    code, out, _ = _ctl(fake_node.url, "list", "queues")
    assert code == 0
    assert out.splitlines() == [
        "name   vhost  type     durable  messages",
        "tasks  /      classic  yes            10",
        "q2     /      quorum   no              0",
    ]
    assert _ctl(fake_node.url, "list", "exchanges") == (0, "no exchanges\n", "")


def test_ctl_listing_commands_nested_columns_and_vhost(fake_node: FakeNode) -> None:
    code, out, _ = _ctl(fake_node.url, "consumers")
    assert code == 0
    assert out.splitlines() == [
        "consumer tag  vhost  queue  channel                        ack required"
        "  prefetch count  exclusive  active  node",
        "ctag-1        /      tasks  1.2.3.4:5 -> 6.7.8.9:5672 (1)  yes                       10"
        "  no         yes     warren-2",
    ]
    code, out, _ = _ctl(fake_node.url, "queues", "--vhost", "/")
    assert (code, out.splitlines()[1].split()[0]) == (0, "tasks")
    assert fake_node.requests[-1][:2] == ("GET", "/api/queues/%2F")
    code, out, _ = _ctl(fake_node.url, "--json", "queues")
    assert json.loads(out)[1]["name"] == "q2"
    code, _, err = _ctl(fake_node.url, "list", "connections", "--vhost", "/")
    assert code == 2
    assert "--vhost" in err


def test_ctl_errors_are_one_line_and_exit_2(fake_node: FakeNode) -> None:
    code, out, err = _ctl(fake_node.url, "--password", "wrong", "status")
    assert (code, out) == (2, "")
    assert err.startswith("warren ctl: GET ")
    assert "401 not_authorized" in err
    assert err.count("\n") == 1
    code, _, err = _ctl(fake_node.url, "list", "connections")  # not routed on the fake
    assert code == 2
    assert "404 Object Not Found: Not Found" in err
    assert err.count("\n") == 1
    code, _, err = _ctl(fake_node.url, "list", "bindings")
    assert code == 2
    assert "not JSON" in err
    assert err.count("\n") == 1


def test_ctl_against_a_closed_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = _ctl(f"127.0.0.1:{port}", "status")
    assert (code, out) == (2, "")
    assert err == f"warren ctl: cannot reach http://127.0.0.1:{port}: connection refused\n"
