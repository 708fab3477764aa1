"""Real three-node Warren clusters for the tests in tests/cluster (see conftest.py for
the fixtures): node processes, their ports and logs, the management API, bounded waits.

Tests import from here (`from tests.cluster.support import ...`), never from conftest.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 60
SECRET = "warren-cluster-tests"
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll `predicate` until it returns something truthy; AssertionError after `timeout`.
    Exceptions from the predicate count as "not yet" (the last one is reported)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def member(status: dict[str, Any], name: str) -> dict[str, Any]:
    """Member `name`'s row of a node's /api/warren/cluster answer (`Cluster.status`)."""
    return next(m for m in status["members"] if m["name"] == name)


def http_get(url: str, timeout: float = 2.0, *, auth: bool = True) -> tuple[int, Any]:
    """(status, decoded JSON body or None)."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", _AUTH)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body = exc.read()
        status = exc.code
        exc.close()
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def http_post(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Authorization", _AUTH)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body = exc.read()
        status = exc.code
        exc.close()
    return status, json.loads(body) if body else None


@dataclass
class ClusterNode:
    """One member: its ports, data dir, log and process."""

    index: int
    name: str
    host: str
    amqp_port: int
    raft_port: int
    link_port: int
    management_port: int
    data_dir: Path
    log_path: Path
    peers: list[tuple[str, str, int]]
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", "ns1")
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.amqp_port}/%2F"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    def command(self) -> list[str]:
        cmd = [
            *self.prefix,
            sys.executable, "-m", "node.cli", "node",
            "--name", self.name, "--host", self.host, "--port", str(self.amqp_port),
            "--raft-port", str(self.raft_port), "--link-port", str(self.link_port),
            "--management-port", str(self.management_port), "--metrics-port", "0",
            "--data-dir", str(self.data_dir),
            *self.extra,
        ]  # fmt: skip
        for name, host, port in self.peers:
            cmd += ["--peer", f"{name}={host}:{port}"]
        return cmd

    def start(self) -> None:
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        env = {**os.environ, "WARREN_CLUSTER_SECRET": SECRET}
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, like a crashed machine; returns once the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def restart(self) -> None:
        """Start again with the same name, ports and data dir (kill first if running)."""
        self.kill()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def healthy(self) -> bool:
        try:
            status, _ = http_get(f"{self.management_url}/api/healthz", 1.0, auth=False)
        except OSError:
            return False
        return status == 200

    def connect(self, **params: Any) -> Any:
        """A pika BlockingConnection to this node (the caller closes it)."""
        import pika

        parameters = pika.URLParameters(self.amqp_url)
        parameters.socket_timeout = params.pop("socket_timeout", 5)
        parameters.blocked_connection_timeout = params.pop("blocked_connection_timeout", 10)
        parameters.connection_attempts = params.pop("connection_attempts", 1)
        for key, value in params.items():
            setattr(parameters, key, value)
        return pika.BlockingConnection(parameters)


# A Raft leader judges no member during its first seconds (cluster/node.py
# STARTUP_GRACE_S = 3.0): tests that kill a node wait this long after start-up first,
# so that what they measure is failure detection, not the grace period.
MONITOR_GRACE_S = 3.2


@dataclass
class Cluster:
    nodes: list[ClusterNode]
    connections: list[Any] = field(default_factory=list)
    ready_at: float = 0.0

    def __getitem__(self, i: int) -> ClusterNode:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        for node in self.nodes:
            node.log_path.parent.mkdir(parents=True, exist_ok=True)
            node.start()
        self.wait_healthy()
        self.ready_at = time.monotonic()

    def wait_monitor_grace(self) -> None:
        """Sleep until the Raft leader watches the members (see MONITOR_GRACE_S)."""
        left = self.ready_at + MONITOR_GRACE_S - time.monotonic()
        if left > 0:
            time.sleep(left)

    def wait_healthy(
        self, nodes: Sequence[int] | None = None, timeout: float = STARTUP_TIMEOUT_S
    ) -> None:
        indexes = range(len(self.nodes)) if nodes is None else nodes
        deadline = time.monotonic() + timeout
        for i in indexes:
            node = self.nodes[i]
            while not node.healthy():
                if not node.running:
                    code = node.proc.returncode if node.proc else None
                    raise RuntimeError(f"{node.name} exited with {code}\n{self.logs()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} not healthy after {timeout}s\n{self.logs()}")
                time.sleep(0.1)

    def close_connections(self) -> None:
        for conn in self.connections:
            with contextlib.suppress(Exception):
                if conn.is_open:
                    conn.close()
        self.connections.clear()

    def close(self) -> None:
        """Close the test's connections (before the kills: no pika noise about lost
        sockets in failure reports), then kill every node."""
        self.close_connections()
        for node in self.nodes:
            node.kill()

    def logs(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(
            f"----- {node.name} ({node.log_path}) last {lines} lines -----\n{node.log_tail(lines)}"
            for node in self.nodes
        )

    # ---- clients -------------------------------------------------------------------

    def connect(self, i: int, **params: Any) -> Any:
        """A pika BlockingConnection to node i, closed at teardown."""
        conn = self.nodes[i].connect(**params)
        self.connections.append(conn)
        return conn

    def channel(self, i: int, *, confirm: bool = False) -> Any:
        """A channel on a new connection to node i."""
        ch = self.connect(i).channel()
        if confirm:
            ch.confirm_delivery()
        return ch

    # ---- management API ------------------------------------------------------------

    def status(self, i: int) -> dict[str, Any]:
        status, body = http_get(f"{self.nodes[i].management_url}/api/warren/cluster")
        assert status == 200, (status, body)
        return dict(body)

    def queues(self, i: int) -> list[dict[str, Any]]:
        status, body = http_get(f"{self.nodes[i].management_url}/api/queues")
        assert status == 200, (status, body)
        return list(body)

    def queue_info(self, i: int, name: str) -> dict[str, Any] | None:
        return next((q for q in self.queues(i) if q["name"] == name), None)

    def queue_leader(self, i: int, name: str) -> str | None:
        info = self.queue_info(i, name)
        return None if info is None else str(info["node"])

    def index_of(self, name: str) -> int:
        return next(n.index for n in self.nodes if n.name == name)

    def raft_leader(self, among: Sequence[int] | None = None, timeout: float = 15.0) -> int:
        """Index of the Raft leader, as the (running) nodes in `among` report it; waits until
        they agree on one."""
        indexes = [
            i for i in (range(len(self.nodes)) if among is None else among) if self.nodes[i].running
        ]

        def agreed() -> int | None:
            leaders = {self.status(i)["raft"]["leader"] for i in indexes}
            if len(leaders) == 1:
                (leader,) = leaders
                if leader is not None:
                    return self.index_of(leader) + 1  # +1: index 0 must be truthy
            return None

        return int(wait_until(agreed, timeout, "an agreed Raft leader")) - 1

    def replica_view(self, i: int) -> dict[str, Any]:
        """What node i's copy of the replicated state says, at the Raft index it applied:
        members and whether they are alive, how many queues each leads, every queue's
        leader, the messages in its copies of the durable logs. Nothing node-local."""
        status = self.status(i)
        raft = status["raft"]
        return {
            "applied": raft["last_applied"],
            "caught_up": raft["last_applied"] == raft["commit_index"],
            "members": [(m["name"], m["alive"], m["queues_led"]) for m in status["members"]],
            "queues": sorted((q["vhost"], q["name"], q["node"]) for q in self.queues(i)),
            "logged_messages": status["durable"]["logged_messages"],
        }

    def wait_replicas_agree(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every node has applied the same Raft index and its replica says the
        same as the others'; the agreed view. The AssertionError names each node's view."""
        views: list[dict[str, Any]] = []

        def agreed() -> dict[str, Any] | None:
            views[:] = [self.replica_view(i) for i in range(len(self.nodes))]
            first = views[0]
            if first["caught_up"] and all(view == first for view in views[1:]):
                return first
            return None

        try:
            return dict(wait_until(agreed, timeout, "the replicas to agree"))
        except AssertionError as exc:
            named = {node.name: view for node, view in zip(self.nodes, views, strict=False)}
            raise AssertionError(f"{exc}; views: {named}") from None

    def rebalance(self, i: int) -> dict[str, Any]:
        status, body = http_post(f"{self.nodes[i].management_url}/api/warren/rebalance")
        assert status == 200, (status, body)
        return dict(body)


def build_cluster(
    tmp: Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1",) * 3,
    prefixes: Sequence[tuple[str, ...]] | None = None,
    extra: tuple[str, ...] = (),
) -> Cluster:
    """A Cluster with free ports (not started). `hosts[i]` is node i's listen and advertise
    address; `prefixes[i]` wraps its command (e.g. `ip netns exec`)."""
    count = len(hosts)
    taken: set[int] = set()

    def port() -> int:
        # free_port() may hand out a port twice once it is closed again: keep them distinct
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    raft_ports = [port() for _ in range(count)]
    names = [f"w{i + 1}" for i in range(count)]
    nodes = []
    for i in range(count):
        nodes.append(
            ClusterNode(
                index=i,
                name=names[i],
                host=hosts[i],
                amqp_port=port(),
                raft_port=raft_ports[i],
                link_port=port(),
                management_port=port(),
                data_dir=tmp / f"{names[i]}-data",
                log_path=tmp / f"{names[i]}.log",
                peers=[(names[j], hosts[j], raft_ports[j]) for j in range(count) if j != i],
                prefix=prefixes[i] if prefixes else (),
                extra=extra,
            )
        )
    return Cluster(nodes)


@contextlib.contextmanager
def running_cluster(tmp: Path, **options: Any) -> Iterator[Cluster]:
    cluster = build_cluster(tmp, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


class ClusterFactory:
    """start_cluster(hosts=..., prefixes=...) -> a started Cluster, killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clusters: list[Cluster] = []

    def __call__(self, **options: Any) -> Cluster:
        c = build_cluster(self.tmp / f"cluster{len(self.clusters)}", **options)
        self.clusters.append(c)
        c.start()
        return c

    def close(self) -> None:
        for c in self.clusters:
            c.close()


def bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """fn() on a worker thread; its result, its exception, or AssertionError when it has
    not returned after `timeout` (a hung broker call fails the test instead of hanging it).
    fn must use only connections it opens itself (pika is not thread-safe)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"bounded:{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise AssertionError(f"{what} did not return within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("result")
