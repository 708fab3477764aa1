"""Messages across nodes: publishes routed on the client's node and forwarded to each
queue's leader, remote consumers, and settlement (ack, reject, nack, get, purge) from
nodes that do not lead the queue. The default placement (`client-local`) puts a queue on
the node its declaring client is connected to, so declaring on node i makes i its leader.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.cluster.support import Cluster, unique, wait_until


def _queue_on(cluster: Cluster, i: int, prefix: str, **kwargs: Any) -> str:
    """Declare a queue through node i (so node i leads it); its name."""
    name = unique(prefix)
    cluster.channel(i).queue_declare(name, **kwargs)
    assert cluster.queue_leader(i, name) == cluster[i].name
    return name


class Collector:
    """A basic.consume callback that records (body, redelivered, delivery tag)."""

    def __init__(self, *, ack: bool = False) -> None:
        self.ack = ack
        self.received: list[tuple[bytes, bool, int]] = []

    def __call__(self, ch: Any, method: Any, _props: Any, body: bytes) -> None:
        self.received.append((body, method.redelivered, method.delivery_tag))
        if self.ack:
            ch.basic_ack(method.delivery_tag)

    @property
    def bodies(self) -> list[bytes]:
        return [body for body, _, _ in self.received]

    def wait_for(self, conn: Any, count: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)
        return self.bodies

    @staticmethod
    def idle(conn: Any, seconds: float) -> None:
        """Serve the connection's events for `seconds` (deliveries that should not come)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.05)


def _count_on(cluster: Cluster, i: int, queue: str) -> tuple[int, int]:
    ok = cluster.channel(i).queue_declare(queue, passive=True)
    return ok.method.message_count, ok.method.consumer_count


def test_publish_on_a_consume_on_b_from_a_queue_led_by_c_keeps_order(cluster: Cluster) -> None:
    queue = _queue_on(cluster, 2, "q-fifo")
    publisher = cluster.channel(0)
    expected = [f"msg-{n:04d}".encode() for n in range(1000)]
    for body in expected:
        publisher.basic_publish("", queue, body)
    consumer_conn = cluster.connect(1)
    consumer = consumer_conn.channel()
    consumer.basic_qos(prefetch_count=100)
    collector = Collector(ack=True)
    consumer.basic_consume(queue, collector)
    got = collector.wait_for(consumer_conn, len(expected), timeout=30)
    assert len(got) == len(expected), f"received {len(got)} of {len(expected)}"
    assert got == expected
    assert not any(redelivered for _, redelivered, _ in collector.received)
    consumer_conn.process_data_events(time_limit=0.2)  # flush the last acks
    info = wait_until(
        lambda: (q := cluster.queue_info(2, queue)) and q["messages"] == 0 and q,
        5,
        "the leader to settle every message",
    )
    assert info["consumers"] == 1


def test_fanout_bound_on_b_delivers_one_copy_to_queues_led_by_each_node(cluster: Cluster) -> None:
    exchange = unique("x-fanout")
    cluster.channel(1).exchange_declare(exchange, "fanout")
    queues = [_queue_on(cluster, i, f"q-fan{i}") for i in range(3)]
    binder = cluster.channel(1)
    for queue in queues:
        binder.queue_bind(queue, exchange)
    publisher = cluster.channel(0, confirm=True)
    expected = [f"fan-{n}".encode() for n in range(10)]
    for body in expected:
        publisher.basic_publish(exchange, "", body, mandatory=True)
    for i, queue in enumerate(queues):
        assert _count_on(cluster, (i + 1) % 3, queue) == (len(expected), 0)
        # read each queue through a node that does not lead it
        reader = cluster.channel((i + 2) % 3)
        bodies = []
        while (got := reader.basic_get(queue, auto_ack=True))[0] is not None:
            bodies.append(got[2])
        assert bodies == expected, f"queue led by {cluster[i].name}"


def test_confirms_on_a_for_a_queue_led_by_c(cluster: Cluster) -> None:
    queue = _queue_on(cluster, 2, "q-confirm")
    publisher = cluster.channel(0, confirm=True)
    started = time.monotonic()
    for n in range(500):
        # raises NackError / UnroutableError if the broker does not confirm it
        publisher.basic_publish("", queue, f"c{n}".encode(), mandatory=True)
    took = time.monotonic() - started
    print(f"500 confirmed publishes A -> leader C: {took:.2f}s")
    # every confirmed message is on the leader already
    assert _count_on(cluster, 2, queue) == (500, 0)
    assert _count_on(cluster, 1, queue) == (500, 0)


def test_persistent_confirmed_messages_keep_their_properties_across_nodes(
    cluster: Cluster,
) -> None:
    queue = _queue_on(cluster, 2, "q-props", durable=True)
    publisher = cluster.channel(0, confirm=True)
    props = pika.BasicProperties(
        delivery_mode=2,
        content_type="application/json",
        correlation_id="corr-1",
        headers={"k": "v", "n": 7},
        priority=3,
    )
    publisher.basic_publish("", queue, b'{"a": 1}', properties=props)
    method, got, body = cluster.channel(1).basic_get(queue, auto_ack=True)
    assert method is not None
    assert body == b'{"a": 1}'
    assert (got.delivery_mode, got.content_type, got.correlation_id, got.priority) == (
        2,
        "application/json",
        "corr-1",
        3,
    )
    assert got.headers == {"k": "v", "n": 7}


def test_mandatory_unroutable_publish_is_returned_on_the_publishing_node(
    cluster: Cluster,
) -> None:
    exchange = unique("x-unroutable")
    cluster.channel(1).exchange_declare(exchange, "direct")
    # in confirm mode pika raises UnroutableError for a basic.return before the ack
    confirming = cluster.channel(0, confirm=True)
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        confirming.basic_publish(exchange, "nowhere", b"lost", mandatory=True)
    (returned,) = info.value.messages
    assert returned.body == b"lost"
    assert returned.method.reply_code == 312
    assert returned.method.exchange == exchange
    assert returned.method.routing_key == "nowhere"
    # without confirms: the return arrives through the channel's return callback
    conn = cluster.connect(0)
    ch = conn.channel()
    returns: list[tuple[int, str, bytes]] = []
    ch.add_on_return_callback(
        lambda _ch, method, _props, body: returns.append(
            (method.reply_code, method.reply_text, body)
        )
    )
    ch.basic_publish("", unique("no-such-queue"), b"lost too", mandatory=True)
    wait_until(lambda: conn.process_data_events(time_limit=0.05) or returns, 5, "basic.return")
    assert returns == [(312, "NO_ROUTE", b"lost too")]
    # a mandatory publish routed to a queue led elsewhere is not returned
    queue = _queue_on(cluster, 2, "q-mandatory")
    confirming.basic_publish("", queue, b"kept", mandatory=True)
    assert _count_on(cluster, 1, queue) == (1, 0)


def test_get_reject_requeue_nack_and_ack_from_a_non_leader(cluster: Cluster) -> None:
    queue = _queue_on(cluster, 2, "q-settle")
    publisher = cluster.channel(1, confirm=True)
    for body in (b"m0", b"m1", b"m2", b"m3"):
        publisher.basic_publish("", queue, body)
    a = cluster.channel(0)

    method, _props, body = a.basic_get(queue)
    assert (body, method.redelivered, method.message_count) == (b"m0", False, 3)
    a.basic_reject(method.delivery_tag, requeue=True)

    method, _props, body = a.basic_get(queue)
    assert (body, method.redelivered) == (b"m0", True)
    a.basic_ack(method.delivery_tag)

    method, _props, body = a.basic_get(queue)
    assert (body, method.redelivered) == (b"m1", False)
    a.basic_nack(method.delivery_tag, requeue=True)
    method, _props, body = a.basic_get(queue)
    assert (body, method.redelivered) == (b"m1", True)
    a.basic_nack(method.delivery_tag, requeue=False)  # dropped (no dead-letter exchange)

    method, _props, body = a.basic_get(queue)
    assert (body, method.redelivered) == (b"m2", False)
    a.basic_reject(method.delivery_tag, requeue=False)

    method, _props, body = a.basic_get(queue)
    assert (body, method.redelivered, method.message_count) == (b"m3", False, 0)
    a.basic_ack(method.delivery_tag)

    assert a.basic_get(queue)[0] is None
    wait_until(
        lambda: (q := cluster.queue_info(2, queue)) and q["messages"] == 0,
        5,
        "the leader to have no ready or unacked message",
    )
    assert _count_on(cluster, 0, queue) == (0, 0)


def test_unacked_gets_on_a_non_leader_are_requeued_when_the_channel_closes(
    cluster: Cluster,
) -> None:
    queue = _queue_on(cluster, 1, "q-getclose")
    cluster.channel(1, confirm=True).basic_publish("", queue, b"only")
    conn = cluster.connect(2)
    ch = conn.channel()
    method, _props, body = ch.basic_get(queue)
    assert (body, method.redelivered) == (b"only", False)
    conn.close()
    reader = cluster.channel(0)
    method = wait_until(lambda: reader.basic_get(queue, auto_ack=True)[0], 5, "the requeue")
    assert method.redelivered is True


def test_remote_consumer_honours_prefetch(cluster: Cluster) -> None:
    queue = _queue_on(cluster, 2, "q-prefetch")
    publisher = cluster.channel(0, confirm=True)
    for n in range(20):
        publisher.basic_publish("", queue, f"p{n}".encode())
    conn = cluster.connect(1)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=5)
    collector = Collector(ack=False)
    ch.basic_consume(queue, collector)
    collector.wait_for(conn, 5, timeout=5)
    Collector.idle(conn, 1.0)
    assert collector.bodies == [f"p{n}".encode() for n in range(5)]
    info = cluster.queue_info(2, queue)
    assert info is not None
    assert (info["messages_ready"], info["messages_unacknowledged"]) == (15, 5)
    # one ack makes room for exactly one more
    ch.basic_ack(collector.received[0][2])
    collector.wait_for(conn, 6, timeout=5)
    Collector.idle(conn, 0.5)
    assert len(collector.received) == 6
    # acking everything so far (multiple) lets the rest come, still at most 5 in flight
    while len(collector.received) < 20:
        before = len(collector.received)
        ch.basic_ack(collector.received[-1][2], multiple=True)
        collector.wait_for(conn, min(before + 5, 20), timeout=5)
        assert len(collector.received) > before, "no delivery after an ack"
        Collector.idle(conn, 0.2)
        assert len(collector.received) <= before + 5
    assert collector.bodies == [f"p{n}".encode() for n in range(20)]
    ch.basic_ack(collector.received[-1][2], multiple=True)
    wait_until(
        lambda: (q := cluster.queue_info(2, queue)) and q["messages"] == 0,
        5,
        "every message settled on the leader",
    )


def test_cancel_of_a_remote_consumer_stops_deliveries(cluster: Cluster) -> None:
    queue = _queue_on(cluster, 0, "q-cancel")
    conn = cluster.connect(1)
    ch = conn.channel()
    collector = Collector(ack=True)
    tag = ch.basic_consume(queue, collector)
    assert _count_on(cluster, 0, queue) == (0, 1)
    publisher = cluster.channel(2, confirm=True)
    for n in range(3):
        publisher.basic_publish("", queue, f"before{n}".encode())
    assert collector.wait_for(conn, 3, timeout=5) == [b"before0", b"before1", b"before2"]
    ch.basic_cancel(tag)
    for n in range(3):
        publisher.basic_publish("", queue, f"after{n}".encode())
    Collector.idle(conn, 1.0)
    assert len(collector.received) == 3
    assert _count_on(cluster, 0, queue) == (3, 0)
    assert _count_on(cluster, 2, queue) == (3, 0)


def test_remote_consumer_unacked_messages_are_redelivered_after_its_connection_closes(
    cluster: Cluster,
) -> None:
    queue = _queue_on(cluster, 2, "q-redeliver")
    publisher = cluster.channel(0, confirm=True)
    for n in range(3):
        publisher.basic_publish("", queue, f"r{n}".encode())
    conn = cluster.connect(1)
    ch = conn.channel()
    collector = Collector(ack=False)
    ch.basic_consume(queue, collector)
    assert collector.wait_for(conn, 3, timeout=5) == [b"r0", b"r1", b"r2"]
    conn.close()
    reader = cluster.channel(0)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        method, _props, body = reader.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        got.append((body, method.redelivered))
    assert got == [(b"r0", True), (b"r1", True), (b"r2", True)]


def test_purge_from_a_non_leader_returns_the_count(cluster: Cluster) -> None:
    queue = _queue_on(cluster, 0, "q-purge")
    publisher = cluster.channel(1, confirm=True)
    for n in range(7):
        publisher.basic_publish("", queue, f"x{n}".encode())
    purged = cluster.channel(2).queue_purge(queue)
    assert purged.method.message_count == 7
    assert _count_on(cluster, 0, queue) == (0, 0)
    assert _count_on(cluster, 1, queue) == (0, 0)


def test_exclusive_queue_is_locked_for_others_and_gone_after_its_connection_closes(
    cluster: Cluster,
) -> None:
    owner_conn = cluster.connect(1)
    owner = owner_conn.channel()
    queue = unique("q-exclusive")
    owner.queue_declare(queue, exclusive=True)
    for i in range(3):
        info = cluster.queue_info(i, queue)
        assert info is not None, f"{cluster[i].name} does not list {queue}"
        assert (info["node"], info["exclusive"]) == (cluster[1].name, True)
    for i in (0, 2):
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            cluster.channel(i).queue_declare(queue, passive=True)
        assert info.value.reply_code == 405, info.value.reply_text
        assert "RESOURCE_LOCKED" in info.value.reply_text
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            cluster.channel(i).basic_consume(queue, lambda *_: None)
        assert info.value.reply_code == 405, info.value.reply_text
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            cluster.channel(i).basic_get(queue)
        assert info.value.reply_code == 405, info.value.reply_text
    # others may still publish to it (RabbitMQ allows that); the owner reads it
    cluster.channel(0, confirm=True).basic_publish("", queue, b"to the owner")
    method, _props, body = owner.basic_get(queue, auto_ack=True)
    assert (method is not None, body) == (True, b"to the owner")

    owner_conn.close()
    started = time.monotonic()

    def gone_on(i: int) -> bool:
        try:
            cluster.channel(i).queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return exc.reply_code == 404
        return False

    wait_until(lambda: gone_on(0), 5, f"{queue} to be deleted (passive declare on A)")
    print(f"exclusive queue gone on A {time.monotonic() - started:.2f}s after close")
    for i in (1, 2):
        assert gone_on(i), f"{queue} still exists on {cluster[i].name}"
        assert cluster.queue_info(i, queue) is None
