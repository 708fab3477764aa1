"""Membership and leaders through `warren ctl`: add a fourth member, remove it, rebalance."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.cluster.support import (
    REPO_ROOT,
    Cluster,
    ClusterNode,
    free_port,
    unique,
    wait_until,
)


def ctl(c: Cluster, i: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "ctl", "--node", c[i].management_url, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )


def ctl_json(c: Cluster, i: int, *args: str) -> Any:
    result = ctl(c, i, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.timeout(120)
def test_add_and_remove_a_member_with_ctl(own_cluster: Cluster) -> None:
    c = own_cluster
    first = c[0]
    fourth = ClusterNode(
        index=3,
        name="w4",
        host=first.host,
        amqp_port=free_port(),
        raft_port=free_port(),
        link_port=free_port(),
        management_port=free_port(),
        data_dir=first.data_dir.parent / "w4-data",
        log_path=first.log_path.parent / "w4.log",
        peers=[(n.name, n.host, n.raft_port) for n in c.nodes],
    )
    queue = unique("q-before-w4")
    c.channel(0).queue_declare(queue)
    added = ctl(c, 0, "add-member", "w4", f"{fourth.host}:{fourth.raft_port}")
    assert added.returncode == 0, added.stderr
    assert "w4" in added.stdout
    fourth.start()
    try:
        wait_until(fourth.healthy, 30, "w4 to join and serve")
        status = ctl_json(c, 1, "status")
        names = {m["name"]: m for m in status["members"]}
        assert set(names) == {"w1", "w2", "w3", "w4"}
        wait_until(
            lambda: all(m["alive"] for m in ctl_json(c, 1, "status")["members"]),
            10,
            "every member alive",
        )
        # The newcomer has the whole topology and serves it.
        conn = fourth.connect()
        try:
            ok = conn.channel().queue_declare(queue, passive=True)
            assert ok.method.queue == queue
            conn.channel().queue_declare(unique("q-on-w4"))
        finally:
            conn.close()
        table = ctl(c, 2, "members")
        assert table.returncode == 0, table.stderr
        assert "w4" in table.stdout
        removed = ctl(c, 0, "remove-member", "w4")
        assert removed.returncode == 0, removed.stderr
        wait_until(
            lambda: {m["name"] for m in ctl_json(c, 1, "status")["members"]} == {"w1", "w2", "w3"},
            10,
            "w4 gone from the members",
        )
        # Its queue moved to one of the three that remain.
        leaders = {q["node"] for q in c.queues(0)}
        assert leaders <= {"w1", "w2", "w3"}
        c.channel(1).queue_declare(unique("q-after-w4"))  # three members still commit
    finally:
        fourth.kill()


def test_rebalance_spreads_leaders_evenly(cluster: Cluster) -> None:
    names = [unique("q-rebalance") for _ in range(6)]
    ch = cluster.channel(0)
    for name in names:
        ch.queue_declare(name)  # client-local: all on w1
    result = ctl_json(cluster, 1, "rebalance")
    assert result["moved"] >= 1
    mine = {q["name"]: q["node"] for q in cluster.queues(2) if q["name"] in names}
    per_node: dict[str, int] = {}
    for node in mine.values():
        per_node[node] = per_node.get(node, 0) + 1
    total = sum(result["leaders"].values())
    assert max(result["leaders"].values()) - min(result["leaders"].values()) <= 1, result
    assert total >= len(names)
    # Every moved queue serves from its new leader, through any node.
    for i, name in enumerate(names):
        pub = cluster.channel(i % 3)
        pub.basic_publish("", name, name.encode())
    for name in names:
        wait_until(
            lambda n=name: (
                cluster.channel(2).queue_declare(n, passive=True).method.message_count == 1
            ),
            5,
            f"{name} to hold its message",
        )
        method, _props, body = cluster.channel(1).basic_get(name, auto_ack=True)
        assert method is not None
        assert body == name.encode()
    human = ctl(cluster, 0, "status")
    assert human.returncode == 0, human.stderr
    assert "Raft leader" in human.stdout
