"""Failover of the compose cluster, counted by `warren verify` on the host.

`warren verify` publishes confirmed persistent messages (for `--duration` seconds) to a
durable quorum queue through the published ports while its --chaos / --restart commands act on the
containers: `docker kill` / `docker start` of the queue leader's container mid-stream,
`docker network disconnect` / `connect` of the queue leader (a real partition: its
container is off the compose network), and `docker restart` of all three at once. Each
run ends with lost == 0 and every duplicate flagged redelivered; the counts are printed
in pytest's terminal summary.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.docker.support import NODES, ComposeCluster, VerifyRun, note, unique, warren_verify

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

LEADER = 1  # node2 leads the verify queue (declared there: client-local placement)
PUBLISHER, CONSUMER = 0, 2  # verify publishes through node1, consumes through node3


def _declare_on_leader(c: ComposeCluster, queue: str) -> None:
    """The queue verify uses, declared through node2 so that node2 leads it."""
    conn = c.connect(LEADER)
    try:
        conn.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        conn.close()
    assert c.queue_leader(PUBLISHER, queue) == NODES[LEADER]


def _urls(c: ComposeCluster) -> list[str]:
    return [c.amqp_url(PUBLISHER), c.amqp_url(CONSUMER), c.amqp_url(LEADER)]


def _check(result: VerifyRun, scenario: str, *, chaos: int = 1) -> None:
    note(result.line(scenario))
    s = result.summary
    assert s, f"warren verify printed no summary (exit {result.returncode})\n{result.stderr}"
    assert s["lost"] == 0, f"confirmed messages lost: {s['lost_sample']}"
    assert s["duplicates_unflagged"] == 0
    assert s["complete"], "not every message was confirmed"
    assert s["chaos_events"] >= chaos, "the chaos command never ran (publishing too short?)"
    assert s["chaos_failures"] == 0, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]


def test_docker_kill_of_the_queue_leader_mid_stream(compose_cluster: ComposeCluster) -> None:
    c = compose_cluster
    c.wait_settled()
    queue = unique("verify-kill")
    _declare_on_leader(c, queue)
    container = c.container(LEADER)
    started_before = c.inspect(LEADER)["State"]["StartedAt"]
    result = warren_verify(
        _urls(c),
        "--count", "10000000", "--duration", "10", "--queue", queue,
        "--chaos", "docker kill {node}", "--restart", "docker start {node}",
        "--chaos-nodes", container, "--chaos-every", "3", "--down", "3",
        "--timeout", "180",
    )  # fmt: skip
    _check(result, "docker kill + docker start of the queue leader")
    assert c.inspect(LEADER)["State"]["StartedAt"] != started_before
    c.wait_settled()


def test_network_disconnect_of_the_queue_leader(compose_cluster: ComposeCluster) -> None:
    """A real partition: node2 leaves the compose network for 8 s (the majority moves its
    queue after 3 s of silence), then joins again under its service name."""
    c = compose_cluster
    c.wait_settled()
    queue = unique("verify-partition")
    _declare_on_leader(c, queue)
    network = c.network()
    container = c.container(LEADER)
    disconnect = f"docker network disconnect {shlex.quote(network)} {{node}}"
    connect = f"docker network connect --alias {NODES[LEADER]} {shlex.quote(network)} {{node}}"
    result = warren_verify(
        _urls(c),
        "--count", "10000000", "--duration", "14", "--queue", queue,
        "--chaos", disconnect, "--restart", connect,
        "--chaos-nodes", container, "--chaos-every", "3", "--down", "8",
        "--timeout", "180",
    )  # fmt: skip
    _check(result, "docker network disconnect + connect of the queue leader")
    c.wait_settled()


def test_docker_restart_of_all_three(compose_cluster: ComposeCluster, tmp_path: Path) -> None:
    """`docker restart` (SIGTERM, then start) of every container at once, once, mid-stream:
    every confirmed message is there when the cluster is back."""
    c = compose_cluster
    c.wait_settled()
    queue = unique("verify-restart")
    _declare_on_leader(c, queue)
    started_before = [c.inspect(i)["State"]["StartedAt"] for i in range(3)]
    restart_all = " & ".join(f"docker restart -t 10 {c.container(i)}" for i in range(3))
    once = shlex.quote(str(tmp_path / "restarted"))  # later chaos steps do nothing
    chaos = f"test -e {once} || {{ touch {once}; {restart_all} & wait; }}"
    result = warren_verify(
        _urls(c),
        "--count", "10000000", "--duration", "10", "--queue", queue,
        "--chaos", chaos, "--chaos-every", "4",
        "--timeout", "180",
    )  # fmt: skip
    _check(result, "docker restart of all three at once (once; later chaos steps are no-ops)")
    started_after = [c.inspect(i)["State"]["StartedAt"] for i in range(3)]
    assert all(a != b for a, b in zip(started_before, started_after, strict=True))
    c.wait_settled()
