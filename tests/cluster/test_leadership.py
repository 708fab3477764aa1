"""Raft leadership follows the durable load (cluster/leadership.py), with real nodes.

A node that writes the durable log (it leads a durable queue that pika publishes
persistent messages to) becomes the Raft leader within seconds, and the hand-over costs
the stream nothing: no nack, no loss, no duplicate, order kept. With
--no-raft-leader-follows-load the leader stays where the election put it.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.support import Cluster, ClusterFactory, unique, wait_until
from tests.cluster.traffic import Stream

MOVE_TIMEOUT_S = 20.0


def leader_name(c: Cluster, i: int) -> str | None:
    return c.status(i)["raft"]["leader"]  # type: ignore[no-any-return]


def durable_stream(c: Cluster, node: int) -> Stream:
    queue = unique("follow")
    c.channel(node).queue_declare(queue, durable=True)
    assert c.queue_leader(node, queue) == c[node].name
    return Stream(c, queue, publish_on=[node], consume_on=[node]).start()


@pytest.mark.timeout(90)
def test_raft_leadership_moves_to_the_writing_node_without_a_nack(own_cluster: Cluster) -> None:
    c = own_cluster
    before = c.raft_leader()
    writer = (before + 1) % len(c)
    stream = durable_stream(c, writer)
    wait_until(
        lambda: all(leader_name(c, i) == c[writer].name for i in range(len(c))),
        MOVE_TIMEOUT_S,
        f"Raft leadership on {c[writer].name}, the node writing the durable log",
    )
    moved_at = len(stream.confirmed)
    stream.wait_confirmed(moved_at + 300, 30)  # still flowing after the hand-over
    stream.stop_publishing()
    stream.drain()
    result = stream.result()
    assert result.lost == [], result.summary()
    assert (stream.nacks, result.duplicates, result.out_of_order) == (0, 0, 0), result.summary()
    assert result.publisher_reconnects == result.consumer_reconnects == 0, stream.errors
    status = c.status(before)["raft"]
    assert status["leader_follows_load"] is True
    assert status["leadership_transfers"] == 1
    assert "raft.leadership_transferred" in c[before].log_tail(400)
    # Settled there: the new leader writes the most, so nothing moves back.
    time.sleep(3)
    assert {leader_name(c, i) for i in range(len(c))} == {c[writer].name}


@pytest.mark.timeout(90)
def test_without_following_the_load_the_leader_stays(start_cluster: ClusterFactory) -> None:
    c = start_cluster(extra=("--no-raft-leader-follows-load",))
    before = c.raft_leader()
    writer = (before + 1) % len(c)
    stream = durable_stream(c, writer)
    stream.wait_confirmed(1500, 40)  # several check windows of a steady durable stream
    stream.stop_publishing()
    stream.drain()
    assert stream.result().lost == []
    assert {leader_name(c, i) for i in range(len(c))} == {c[before].name}
    status = c.status(before)["raft"]
    assert (status["leader_follows_load"], status["leadership_transfers"]) == (False, 0)
