"""docker-compose.yml and deploy/Dockerfile as a user runs them: the file validates with
Compose v1 and v2, the image is small, non-root and healthchecked, pika works through
every node, the example client moves to another node when its node dies, and `docker
stop` (SIGTERM) stops a node gracefully within Docker's 10 s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import pika
import pytest

from tests.docker.support import (
    COMPOSE_FILE,
    NODES,
    REPO_ROOT,
    ComposeCluster,
    compose_v1,
    compose_v2,
    note,
    run,
    unique,
    wait_until,
)

SERVICES = {"node1", "node2", "node3", "prometheus", "grafana"}
VOLUMES = {"node1-data", "node2-data", "node3-data", "prometheus-data", "grafana-data"}
PERSISTENT = pika.BasicProperties(delivery_mode=2)
STOP_LIMIT_S = 10.0  # docker stop's default grace before SIGKILL


def _consume(channel: Any, queue: str, count: int) -> list[bytes]:
    """Up to `count` bodies from `queue`, acked one by one (stops after 5 s of silence)."""
    got: list[bytes] = []
    for method, _props, body in channel.consume(queue, inactivity_timeout=5):
        if method is None:
            break
        got.append(body)
        channel.basic_ack(method.delivery_tag)
        if len(got) == count:
            break
    channel.cancel()
    return got


def _check_config(compose: list[str]) -> None:
    cmd = [*compose, "-f", str(COMPOSE_FILE)]
    run([*cmd, "config", "-q"], 60, cwd=REPO_ROOT)
    services = set(run([*cmd, "config", "--services"], 60, cwd=REPO_ROOT).stdout.split())
    assert services == SERVICES
    volumes = set(run([*cmd, "config", "--volumes"], 60, cwd=REPO_ROOT).stdout.split())
    assert volumes == VOLUMES
    full = run([*cmd, "config"], 60, cwd=REPO_ROOT).stdout
    if compose == compose_v2():
        # v2 renders ports in the long syntax: compare what its JSON says instead.
        config = json.loads(run([*cmd, "config", "--format", "json"], 60, cwd=REPO_ROOT).stdout)
        published = {
            f"{p['published']}:{p['target']}"
            for service in config["services"].values()
            for p in service.get("ports", [])
        }
    else:  # v1: "- 127.0.0.1:5673:5672/tcp"
        published = {f"{a}:{b}" for a, b in re.findall(r"(\d+):(\d+)/tcp", full)}
    for port in ("5672:5672", "5673:5672", "5674:5672", "15672:15672", "15694:15692", "3000:3000"):
        assert port in published, f"{port} not published ({sorted(published)})"
    assert "node1=node1:4321 node2=node2:4321 node3=node3:4321" in full
    assert "WARREN_CLUSTER_SECRET" in full


def test_compose_file_validates_with_compose_v1() -> None:
    compose = compose_v1()
    if compose is None:
        pytest.skip("docker-compose (Compose v1) is not installed")
    _check_config(compose)


def test_compose_file_validates_with_compose_v2() -> None:
    compose = compose_v2()
    if compose is None:
        pytest.skip("`docker compose` (Compose v2) is not installed here (Debian has v1 only)")
    _check_config(compose)


@pytest.mark.docker
@pytest.mark.timeout(900)  # the session's image build runs in the first docker test
def test_image_is_small_non_root_and_healthchecked(image: str) -> None:
    info = run(["docker", "image", "inspect", image], 30).stdout
    (meta,) = json.loads(info)
    config = meta["Config"]
    assert config["User"] == "warren"
    assert config["Entrypoint"] == ["warren", "node"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"] == ["CMD", "warren", "healthcheck"]
    assert "/var/lib/warren" in config["Volumes"]
    assert {"5672/tcp", "15672/tcp", "15692/tcp", "4321/tcp", "4322/tcp"} <= set(
        config["ExposedPorts"]
    )
    script = (
        "id -u; warren --version; "
        "for t in pip pip3 gcc cc make; do command -v $t >/dev/null && echo has-$t; done; true"
    )
    cmd = ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script]
    probe = run(cmd, 60).stdout.split("\n")
    assert probe[0] == "10001"
    assert "warren, version" in probe[1]
    assert not [line for line in probe if line.startswith("has-")], probe
    size_mb = int(meta["Size"]) / 1e6
    assert size_mb < 400, f"image is {size_mb:.0f} MB"


@pytest.mark.docker
@pytest.mark.timeout(900)
def test_pika_through_every_node(compose_cluster: ComposeCluster) -> None:
    """Declared on one node, published on another, consumed on the third; every way round."""
    c = compose_cluster
    for i in range(3):
        declare, publish, consume = i, (i + 1) % 3, (i + 2) % 3
        queue = unique(f"pika-{NODES[i]}")
        conns = [c.connect(n) for n in (declare, publish, consume)]
        try:
            conns[0].channel().queue_declare(queue, durable=True)
            assert c.queue_leader(publish, queue) == NODES[declare]
            ch = conns[1].channel()
            ch.confirm_delivery()
            for n in range(50):
                ch.basic_publish("", queue, f"m{n}".encode(), PERSISTENT)
            assert _consume(conns[2].channel(), queue, 50) == [f"m{n}".encode() for n in range(50)]
            conns[2].channel().queue_delete(queue)
        finally:
            for conn in conns:
                if conn.is_open:
                    conn.close()


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_the_other_compose_runs_the_cluster_too(compose_cluster: ComposeCluster) -> None:
    """The session's cluster runs with one Compose (v2 where installed); the other one
    starts the same file's three nodes too, and they serve pika: `up -d`, healthy,
    publish on node1 and consume on node3, `down -v`."""
    others = [c for c in (compose_v2(), compose_v1()) if c and c != compose_cluster.compose]
    if not others:
        pytest.skip("only one Compose is installed here")
    compose = others[0]
    other = ComposeCluster.create(unique("warrenother"), compose_cluster.image, compose)
    try:
        other.up()
        note(
            f"docker: compose ({' '.join(compose)}) too: cluster healthy "
            f"{other.healthy_after_s:.1f} s after `up`"
        )
        queue = unique("other")
        publisher, consumer = other.connect(0), other.connect(2)
        try:
            ch = publisher.channel()
            ch.queue_declare(queue, durable=True)
            ch.confirm_delivery()
            for n in range(20):
                ch.basic_publish("", queue, f"m{n}".encode(), PERSISTENT)
            assert _consume(consumer.channel(), queue, 20) == [f"m{n}".encode() for n in range(20)]
        finally:
            for conn in (publisher, consumer):
                if conn.is_open:
                    conn.close()
    except BaseException:
        if other.containers:
            print(other.logs())
        raise
    finally:
        other.down()


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_example_client_moves_to_another_node_when_its_node_dies(
    compose_cluster: ComposeCluster,
) -> None:
    """deploy/examples/pika_any_node.py, its node `docker kill`ed mid-run."""
    c = compose_cluster
    c.wait_settled()
    hosts = ",".join(f"127.0.0.1:{port}" for port in c.amqp_ports)
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "deploy/examples/pika_any_node.py"),
         "--hosts", hosts, "--count", "1500", "--queue", unique("example")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    killed = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line.rstrip())
            if killed is None and line.startswith("published 500"):
                connected = [x for x in lines if x.startswith("connected to ")][-1]
                port = int(connected.rsplit(":", 1)[1])
                killed = c.amqp_ports.index(port)
                run(["docker", "kill", c.container(killed)], 30)
            if time.monotonic() > deadline:
                break
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if killed is not None:
            run(["docker", "start", c.container(killed)], 60)
    output = "\n".join(lines)
    assert killed is not None, output
    assert code == 0, output
    assert any(x.startswith("lost ") for x in lines), output
    assert lines[-1].startswith("done: 1500 confirmed, 1500 received, 0 missing"), output
    note(f"docker: example client, {NODES[killed]} killed mid-run: {lines[-1]}")
    c.wait_settled()


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_docker_stop_is_graceful_within_10_s(compose_cluster: ComposeCluster) -> None:
    """SIGTERM to PID 1 of the Raft leader's container while a publisher streams into it:
    clients get 320, the node exits 0 well before Docker's SIGKILL."""
    c = compose_cluster
    c.wait_settled()
    leader = c.raft_leader()
    other = (leader + 1) % 3
    queue = unique("stop")
    verify = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "verify", "--url", c.amqp_url(leader),
         "--url", c.amqp_url(other), "--count", "1000000", "--queue", queue,
         "--timeout", "30", "--log-level", "error", "--json"],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: c.queue_leader(other, queue), 20, "the publisher's queue")
        time.sleep(2.0)  # streaming: confirms in flight, durable batches being committed
        started = time.monotonic()
        run(["docker", "stop", "-t", str(int(STOP_LIMIT_S)), c.container(leader)], 60)
        took = time.monotonic() - started
        state = c.inspect(leader)["State"]
    finally:
        verify.kill()
        verify.wait(10)
        run(["docker", "start", c.container(leader)], 60)
    logs = run(["docker", "logs", "--tail", "30", c.container(leader)], 30).stderr
    note(
        f"docker: docker stop of the Raft leader ({NODES[leader]}) under load: exit code "
        f"{state['ExitCode']} after {took:.2f} s"
    )
    assert state["ExitCode"] == 0, logs
    assert took < STOP_LIMIT_S - 1, logs
    assert "event=node.stopped" in logs
    c.wait_settled()
