"""Publisher confirms and transactions as RabbitMQ shows them to clients.

Confirms: confirm.select, one confirm per publish with delivery tags counting from 1 per
channel, acks folded with multiple=True when contiguous, basic.nack when a queue refuses a
message (x-overflow=reject-publish). Acks may come out of order and may be folded, so the
raw-socket tests expand every ack/nack into the set of tags it settles (multiple=True settles
every still-unconfirmed tag up to its own).

Transactions: publishes invisible until tx.commit and dropped by tx.rollback; acks, rejects
and returns take effect at commit; mixing tx and confirm mode is a 406.

Every expected reply code and text here was read from RabbitMQ 3.10. Names are unique per test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pika
import pytest
from pamqp import body as pamqp_body
from pamqp import commands, frame, header


def raw_client(raw_amqp: Callable[..., Any], channels: tuple[int, ...] = (1,)) -> Any:
    client = raw_amqp()
    _start, _tune, opened = client.handshake()
    assert isinstance(opened, commands.Connection.OpenOk), opened
    for channel in channels:
        client.open_channel(channel)
    return client


def publish_frames(channel: int, routing_key: str, body: bytes, exchange: str = "") -> bytes:
    data = frame.marshal(
        commands.Basic.Publish(exchange=exchange, routing_key=routing_key), channel
    )
    data += frame.marshal(header.ContentHeader(0, len(body), commands.Basic.Properties()), channel)
    if body:
        data += frame.marshal(pamqp_body.ContentBody(body), channel)
    return data


def rpc(client: Any, channel: int, method: Any, reply: type) -> Any:
    client.send_method(method, channel)
    got = client.recv()
    assert isinstance(got, reply), got
    return got


class Confirms:
    """Collects confirms for one channel, expanding multiple=True into tags."""

    def __init__(self, published: int) -> None:
        self.unconfirmed = set(range(1, published + 1))
        self.acked: list[int] = []
        self.nacked: list[int] = []
        self.frames: list[tuple[str, int, bool]] = []

    def feed(self, confirm: Any) -> None:
        kind = "ack" if isinstance(confirm, commands.Basic.Ack) else "nack"
        assert isinstance(confirm, commands.Basic.Ack | commands.Basic.Nack), confirm
        self.frames.append((kind, confirm.delivery_tag, confirm.multiple))
        if confirm.multiple:
            tags = sorted(t for t in self.unconfirmed if t <= confirm.delivery_tag)
        else:
            tags = [confirm.delivery_tag]
        assert tags, f"{kind} {confirm.delivery_tag} settles nothing new"
        assert set(tags) <= self.unconfirmed, f"{set(tags) - self.unconfirmed} confirmed twice"
        self.unconfirmed -= set(tags)
        (self.acked if kind == "ack" else self.nacked).extend(tags)

    def read_all(self, client: Any, channel: int = 1) -> None:
        """Read frames until every publish is confirmed; all of them must be confirms."""
        while self.unconfirmed:
            got_channel, confirm = recv_with_channel(client)
            assert got_channel == channel, (got_channel, confirm)
            self.feed(confirm)


def recv_with_channel(client: Any) -> tuple[int, Any]:
    """The next non-heartbeat frame as (channel, decoded frame)."""
    while True:
        raw = client.recv_raw()
        assert raw is not None, "the broker closed the connection"
        if raw.kind != client.HEARTBEAT:
            return raw.channel, raw.decode()


# --- confirms -----------------------------------------------------------------------------------


def test_every_publish_is_confirmed_once_and_contiguous_acks_are_folded(
    pika_env: Any, raw_amqp: Callable[..., Any]
) -> None:
    queue = pika_env.queue()
    client = raw_client(raw_amqp)
    rpc(client, 1, commands.Confirm.Select(), commands.Confirm.SelectOk)
    n = 500
    client.send(b"".join(publish_frames(1, queue, f"m{i}".encode()) for i in range(n)))
    confirms = Confirms(n)
    confirms.read_all(client)
    assert sorted(confirms.acked) == list(range(1, n + 1))
    assert confirms.nacked == []
    # a burst is not confirmed one frame per message: contiguous acks are folded
    assert len(confirms.frames) < n
    assert any(multiple for _kind, _tag, multiple in confirms.frames)
    assert pika_env.channel().queue_declare(queue, passive=True).method.message_count == n


def test_delivery_tags_count_from_one_per_channel(
    pika_env: Any, raw_amqp: Callable[..., Any]
) -> None:
    queue = pika_env.queue()
    client = raw_client(raw_amqp, channels=(1, 2))
    for channel in (1, 2):
        rpc(client, channel, commands.Confirm.Select(), commands.Confirm.SelectOk)
    # a second confirm.select on a confirm channel is fine
    rpc(client, 1, commands.Confirm.Select(), commands.Confirm.SelectOk)
    seen = []
    for channel, routing_key in [(1, queue), (1, queue), (2, queue), (1, "no-such-queue")]:
        client.send(publish_frames(channel, routing_key, b"x"))
        got_channel, confirm = recv_with_channel(client)
        assert isinstance(confirm, commands.Basic.Ack), confirm
        seen.append((got_channel, confirm.delivery_tag))
    # the unroutable (non-mandatory) message is acked too
    assert seen == [(1, 1), (1, 2), (2, 1), (1, 3)]


def test_confirm_select_nowait_gets_no_reply(pika_env: Any, raw_amqp: Callable[..., Any]) -> None:
    queue = pika_env.queue()
    client = raw_client(raw_amqp)
    client.send_method(commands.Confirm.Select(nowait=True), 1)
    client.send(publish_frames(1, queue, b"x"))
    confirm = client.recv()
    assert isinstance(confirm, commands.Basic.Ack), confirm  # no select-ok before it
    assert confirm.delivery_tag == 1


def test_pika_blocking_confirms(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue()
    for i in range(10):
        ch.basic_publish("", queue, f"m{i}".encode())  # returns once acked; raises if nacked
    ch.basic_publish("", pika_env.name("nowhere"), b"unroutable but confirmed")
    assert ch.queue_declare(queue, passive=True).method.message_count == 10


def test_queue_refusing_a_message_nacks_it(pika_env: Any, raw_amqp: Callable[..., Any]) -> None:
    queue = pika_env.queue(arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    client = raw_client(raw_amqp)
    rpc(client, 1, commands.Confirm.Select(), commands.Confirm.SelectOk)
    client.send(b"".join(publish_frames(1, queue, f"m{i}".encode()) for i in range(3)))
    confirms = Confirms(3)
    confirms.read_all(client)
    assert (sorted(confirms.acked), sorted(confirms.nacked)) == ([1], [2, 3])
    ch = pika_env.channel()
    assert pika_env.drain(ch, queue) == [b"m0"]


def test_pika_blocking_confirm_raises_on_nack(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    queue = pika_env.queue(arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    ch.basic_publish("", queue, b"fits")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish("", queue, b"refused")
    assert ch.is_open


# --- transactions -------------------------------------------------------------------------------


def ready(pika_env: Any, queue: str) -> int:
    return int(pika_env.channel().queue_declare(queue, passive=True).method.message_count)


def test_tx_publishes_are_invisible_until_commit(pika_env: Any) -> None:
    queue = pika_env.queue()
    tx = pika_env.connect().channel()
    tx.tx_select()
    tx.basic_publish("", queue, b"a")
    tx.basic_publish("", queue, b"b")
    time.sleep(0.1)
    assert ready(pika_env, queue) == 0
    tx.tx_commit()
    assert ready(pika_env, queue) == 2
    assert pika_env.drain(pika_env.channel(), queue) == [b"a", b"b"]


def test_tx_rollback_drops_publishes_and_the_channel_stays_transactional(
    pika_env: Any,
) -> None:
    queue = pika_env.queue()
    tx = pika_env.connect().channel()
    tx.tx_select()
    tx.basic_publish("", queue, b"dropped")
    tx.tx_rollback()
    assert ready(pika_env, queue) == 0
    tx.tx_commit()  # an empty commit: nothing appears
    assert ready(pika_env, queue) == 0
    tx.basic_publish("", queue, b"kept")
    time.sleep(0.1)
    assert ready(pika_env, queue) == 0  # still transactional after rollback and commit
    tx.tx_commit()
    assert pika_env.drain(pika_env.channel(), queue) == [b"kept"]


def test_tx_uncommitted_publishes_vanish_with_the_channel(pika_env: Any) -> None:
    queue = pika_env.queue()
    tx = pika_env.connect().channel()
    tx.tx_select()
    tx.basic_publish("", queue, b"never")
    tx.close()
    assert ready(pika_env, queue) == 0


def test_tx_acks_apply_at_commit(pika_env: Any) -> None:
    queue = pika_env.queue()
    pub = pika_env.channel(confirm=True)
    pub.basic_publish("", queue, b"a")
    pub.basic_publish("", queue, b"b")
    conn = pika_env.connect()
    tx = conn.channel()
    tx.tx_select()
    method, _props, body = tx.basic_get(queue)
    assert body == b"a"
    tx.basic_ack(method.delivery_tag)
    tx.tx_rollback()  # the ack is discarded; "a" stays unacked (not requeued)
    assert ready(pika_env, queue) == 1
    tx.basic_ack(method.delivery_tag)  # the tag is still valid
    tx.tx_commit()
    tx.close()  # nothing unacked is left to requeue
    assert pika_env.drain(pika_env.channel(), queue) == [b"b"]


def test_tx_uncommitted_ack_is_lost_with_the_channel(pika_env: Any) -> None:
    queue = pika_env.queue()
    pika_env.channel(confirm=True).basic_publish("", queue, b"a")
    tx = pika_env.connect().channel()
    tx.tx_select()
    method, _props, _body = tx.basic_get(queue)
    tx.basic_ack(method.delivery_tag)
    tx.close()  # not committed: the message is requeued
    ch = pika_env.channel()
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert (body, method.redelivered) == (b"a", True)


def test_tx_reject_requeue_applies_at_commit(pika_env: Any) -> None:
    queue = pika_env.queue()
    pika_env.channel(confirm=True).basic_publish("", queue, b"a")
    tx = pika_env.connect().channel()
    tx.tx_select()
    method, _props, _body = tx.basic_get(queue)
    tx.basic_reject(method.delivery_tag, requeue=True)
    time.sleep(0.1)
    assert ready(pika_env, queue) == 0
    tx.tx_commit()
    assert ready(pika_env, queue) == 1
    method, _props, body = tx.basic_get(queue, auto_ack=True)
    assert (body, method.redelivered) == (b"a", True)


def test_tx_mandatory_return_comes_at_commit(pika_env: Any) -> None:
    conn = pika_env.connect()
    tx = conn.channel()
    tx.tx_select()
    returned: list[Any] = []
    tx.add_on_return_callback(lambda _ch, method, _props, body: returned.append((method, body)))
    x = pika_env.exchange("direct")
    tx.basic_publish(x, "nowhere", b"back at commit", mandatory=True)
    conn.process_data_events(time_limit=0.3)
    assert returned == []
    tx.tx_commit()
    deadline = time.monotonic() + 5
    while not returned and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    ((method, body),) = returned
    assert (method.reply_code, method.reply_text, method.routing_key) == (
        312,
        "NO_ROUTE",
        "nowhere",
    )
    assert body == b"back at commit"


def test_tx_select_twice_is_fine(pika_env: Any) -> None:
    tx = pika_env.channel()
    tx.tx_select()
    tx.tx_select()
    tx.tx_commit()


def test_tx_select_on_a_confirm_channel_is_406(pika_env: Any) -> None:
    ch = pika_env.channel(confirm=True)
    with pika_env.closes_channel(
        406, "PRECONDITION_FAILED - cannot switch from confirm to tx mode"
    ):
        ch.tx_select()


def test_confirm_select_on_a_tx_channel_is_406(pika_env: Any) -> None:
    ch = pika_env.channel()
    ch.tx_select()
    with pika_env.closes_channel(
        406, "PRECONDITION_FAILED - cannot switch from tx to confirm mode"
    ):
        ch.confirm_delivery()


@pytest.mark.parametrize("call", ["tx_commit", "tx_rollback"])
def test_commit_or_rollback_without_select_is_406(pika_env: Any, call: str) -> None:
    ch = pika_env.channel()
    with pika_env.closes_channel(406, "PRECONDITION_FAILED - channel is not transactional"):
        getattr(ch, call)()
