"""Topology through Raft: a declare, bind or delete on one node is seen by every other
node as soon as its -ok arrives; errors are the same whichever node the client uses."""

from __future__ import annotations

import time
from collections import Counter

import pika
import pika.exceptions
import pytest

from tests.cluster.support import Cluster, unique, wait_until


def test_queue_declared_on_a_is_visible_on_b_and_c(cluster: Cluster) -> None:
    name = unique("q-visible")
    ok = cluster.channel(0).queue_declare(name)
    assert ok.method.queue == name
    for i in (1, 2):
        passive = cluster.channel(i).queue_declare(name, passive=True)
        assert (passive.method.queue, passive.method.message_count) == (name, 0)
        # client-local placement: led by the node the declaring client used
        assert cluster.queue_leader(i, name) == cluster[0].name


def test_exchange_and_binding_declared_on_b_route_publishes_on_c(cluster: Cluster) -> None:
    exchange, queue = unique("x-direct"), unique("q-bound")
    b = cluster.channel(1)
    b.exchange_declare(exchange, "direct")
    b.queue_declare(queue)
    b.queue_bind(queue, exchange, routing_key="rk")
    # the exchange exists on A and C right after bind-ok
    cluster.channel(0).exchange_declare(exchange, "direct", passive=True)
    c = cluster.channel(2, confirm=True)
    c.exchange_declare(exchange, "direct", passive=True)
    c.basic_publish(exchange, "rk", b"routed", mandatory=True)
    c.basic_publish(exchange, "other-key", b"not routed")
    a = cluster.channel(0)
    method, _props, body = a.basic_get(queue, auto_ack=True)
    assert method is not None
    assert body == b"routed"
    assert a.basic_get(queue, auto_ack=True)[0] is None


def test_queue_deleted_on_c_is_gone_on_a(cluster: Cluster) -> None:
    name = unique("q-deleted")
    a = cluster.channel(0, confirm=True)
    a.queue_declare(name)
    for n in range(3):
        a.basic_publish("", name, f"m{n}".encode())
    deleted = cluster.channel(2).queue_delete(name)
    assert deleted.method.message_count == 3
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(0).queue_declare(name, passive=True)
    assert info.value.reply_code == 404
    assert name in info.value.reply_text
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(1).queue_declare(name, passive=True)
    assert info.value.reply_code == 404
    assert all(q["name"] != name for i in range(3) for q in cluster.queues(i))


def test_exchange_deleted_on_a_is_gone_on_b(cluster: Cluster) -> None:
    exchange = unique("x-deleted")
    cluster.channel(2).exchange_declare(exchange, "fanout")
    cluster.channel(0).exchange_delete(exchange)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(1).exchange_declare(exchange, "fanout", passive=True)
    assert info.value.reply_code == 404


def test_inequivalent_redeclare_on_another_node_is_406(cluster: Cluster) -> None:
    name = unique("q-equiv")
    cluster.channel(0).queue_declare(name, durable=False)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(1).queue_declare(name, durable=True)
    assert info.value.reply_code == 406
    assert "inequivalent arg 'durable'" in info.value.reply_text
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(2).queue_declare(name, arguments={"x-max-length": 10})
    assert info.value.reply_code == 406
    assert "x-max-length" in info.value.reply_text
    # an equivalent redeclare from a third node is fine and keeps the leader
    cluster.channel(2).queue_declare(name, durable=False)
    assert cluster.queue_leader(2, name) == cluster[0].name


def test_inequivalent_exchange_redeclare_on_another_node_is_406(cluster: Cluster) -> None:
    exchange = unique("x-equiv")
    cluster.channel(1).exchange_declare(exchange, "direct")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(2).exchange_declare(exchange, "topic")
    assert info.value.reply_code == 406
    assert "inequivalent arg 'type'" in info.value.reply_text


def test_invalid_queue_leader_locator_is_406(cluster: Cluster) -> None:
    name = unique("q-badlocator")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        cluster.channel(1).queue_declare(name, arguments={"x-queue-leader-locator": "nearest"})
    assert info.value.reply_code == 406
    assert "x-queue-leader-locator" in info.value.reply_text
    # nothing was declared anywhere
    for i in range(3):
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            cluster.channel(i).queue_declare(name, passive=True)
        assert info.value.reply_code == 404


def _assert_spread_two_each(c: Cluster, names: list[str]) -> None:
    leaders = {q["name"]: q["node"] for q in c.queues(1) if q["name"] in names}
    assert sorted(leaders) == sorted(names)
    assert Counter(leaders.values()) == {n.name: 2 for n in c.nodes}
    # every node agrees on the placement
    for i in (0, 2):
        assert {q["name"]: q["node"] for q in c.queues(i) if q["name"] in names} == leaders
    # and each queue works from a node that does not lead it
    publisher = c.channel(0, confirm=True)
    for name in names:
        publisher.basic_publish("", name, name.encode())
    for name in names:
        other = next(n.index for n in c.nodes if n.name != leaders[name])
        method, _props, body = c.channel(other).basic_get(name, auto_ack=True)
        assert method is not None
        assert body == name.encode()


def test_balanced_locator_spreads_queues_over_the_nodes(own_cluster: Cluster) -> None:
    names = [unique(f"q-balanced{n}") for n in range(6)]
    ch = own_cluster.channel(0)
    for name in names:
        ch.queue_declare(name, arguments={"x-queue-leader-locator": "balanced"})
    _assert_spread_two_each(own_cluster, names)


def test_min_masters_locator_spreads_queues_over_the_nodes(own_cluster: Cluster) -> None:
    # RabbitMQ 3.x's older argument for classic queues means `balanced` too
    names = [unique(f"q-minmasters{n}") for n in range(6)]
    ch = own_cluster.channel(2)
    for name in names:
        ch.queue_declare(name, arguments={"x-queue-master-locator": "min-masters"})
    _assert_spread_two_each(own_cluster, names)


def test_default_locator_is_client_local_on_every_node(cluster: Cluster) -> None:
    names = [unique(f"q-local{i}") for i in range(3)]
    for i, name in enumerate(names):
        cluster.channel(i).queue_declare(name)
    for i, name in enumerate(names):
        assert wait_until(lambda n=name: cluster.queue_leader(0, n), 2, name) == cluster[i].name


def test_cluster_status_lists_three_live_members(cluster: Cluster) -> None:
    leader = cluster.raft_leader()
    for i in range(3):
        status = cluster.status(i)
        assert status["node"] == cluster[i].name
        assert status["raft"]["leader"] == cluster[leader].name
        assert status["raft"]["has_quorum"] is True
        members = {m["name"]: m for m in status["members"]}
        assert sorted(members) == sorted(n.name for n in cluster.nodes)
        assert all(m["alive"] and m["reachable"] for m in members.values())
        for node in cluster.nodes:
            assert members[node.name]["amqp_address"] == f"{node.host}:{node.amqp_port}"


def test_topology_changes_through_any_node_are_quick(cluster: Cluster) -> None:
    # The -ok waits for the other nodes to apply the change; they answer in milliseconds
    # on a local machine, so no node's declare may sit out a timeout.
    timings: dict[str, list[float]] = {}
    raft_leader = cluster[cluster.raft_leader()].name
    for node in cluster.nodes:
        ch = cluster.channel(node.index)
        exchange, queue = unique("x-quick"), unique("q-quick")
        took = timings.setdefault(node.name, [])
        for step in ("exchange.declare", "queue.declare", "queue.bind", "queue.delete"):
            started = time.monotonic()
            if step == "exchange.declare":
                ch.exchange_declare(exchange, "fanout")
            elif step == "queue.declare":
                ch.queue_declare(queue)
            elif step == "queue.bind":
                ch.queue_bind(queue, exchange)
            else:
                ch.queue_delete(queue)
            took.append(round(time.monotonic() - started, 3))
    print(f"topology change seconds per node (Raft leader {raft_leader}):", timings)
    slow = {name: t for name, t in timings.items() if max(t) > 1.0}
    assert not slow, f"topology changes took over 1 s on {slow} (all: {timings})"
