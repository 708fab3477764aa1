"""Consecutive basic.acks read together run as one command (AckMany), with the meaning of
one Ack each: an unknown tag fails the channel there, acks before it stay applied, acks
after it are ignored. Driven in-process: a ClientConnection fed bytes, no socket."""

from __future__ import annotations

import logging
import time

import anyio
from pamqp import body as pbody
from pamqp import commands as spec
from pamqp import frame as pframe
from pamqp import header as pheader

from node.config import NodeConfig
from node.logs import EventLogger
from node.server import BrokerNode, ClientConnection


def _feed(conn: ClientConnection, data: bytes) -> bytes:
    conn.proto.receive_data(data, time.monotonic())
    conn.process_events()
    conn.node.dispatch()
    out = b"".join(conn._out)
    conn._out.clear()
    conn._out_bytes = 0
    return out


def _open(node: BrokerNode, conn_id: int) -> ClientConnection:
    conn = ClientConnection(node, None, conn_id, "127.0.0.1", "peer")
    node.connections[conn_id] = conn
    login = "\x00guest\x00guest"
    _feed(conn, b"AMQP\x00\x00\x09\x01")
    _feed(conn, pframe.marshal(spec.Connection.StartOk(mechanism="PLAIN", response=login), 0))
    _feed(
        conn,
        pframe.marshal(spec.Connection.TuneOk(channel_max=2047, frame_max=131072), 0)
        + pframe.marshal(spec.Connection.Open(virtual_host="/"), 0),
    )
    _feed(conn, pframe.marshal(spec.Channel.Open(), 1))
    return conn


def _ack(tag: int) -> bytes:
    return pframe.marshal(spec.Basic.Ack(delivery_tag=tag), 1)


def _run(acks: list[int], tx: bool = False) -> tuple[bytes, int]:
    """Four messages delivered on channel 1, then `acks` in one read: (the bytes the
    consumer got back, the queue's ready count once the channel is gone)."""

    async def main() -> tuple[bytes, int]:
        node = BrokerNode(NodeConfig(), EventLogger(logging.getLogger("test")))
        conn = _open(node, 1)
        _feed(conn, pframe.marshal(spec.Queue.Declare(queue="q"), 1))
        props = spec.Basic.Properties()
        publish = (
            pframe.marshal(spec.Basic.Publish(exchange="", routing_key="q"), 1)
            + pframe.marshal(pheader.ContentHeader(0, 1, props), 1)
            + pframe.marshal(pbody.ContentBody(b"x"), 1)
        )
        _feed(conn, publish * 4)
        if tx:
            _feed(conn, pframe.marshal(spec.Tx.Select(), 1))
        _feed(conn, pframe.marshal(spec.Basic.Consume(queue="q", consumer_tag="c"), 1))
        out = _feed(conn, b"".join(_ack(tag) for tag in acks))
        other = _open(node, 2)
        reply = _feed(other, pframe.marshal(spec.Queue.Declare(queue="q", passive=True), 1))
        declare_ok = pframe.unmarshal(reply)[2]
        assert isinstance(declare_ok, spec.Queue.DeclareOk)
        return out, declare_ok.message_count

    return anyio.run(main)


def test_a_run_of_known_tags_acks_each() -> None:
    out, _ready = _run([1, 2, 3])
    assert b"unknown delivery tag" not in out


def test_unknown_tag_in_a_run_fails_there_earlier_applied_later_ignored() -> None:
    out, ready = _run([1, 2, 99, 3])
    close = pframe.unmarshal(out)[2]
    assert isinstance(close, spec.Channel.Close)
    assert (close.reply_code, close.reply_text) == (
        406,
        "PRECONDITION_FAILED - unknown delivery tag 99",
    )
    assert (close.class_id, close.method_id) == (60, 80)
    assert ready == 2  # 1 and 2 acked; 3 (after the failure) was not: back with 4


def test_a_duplicate_tag_in_a_run_is_the_unknown_tag() -> None:
    out, ready = _run([1, 2, 2, 3])
    assert b"PRECONDITION_FAILED - unknown delivery tag 2" in out
    assert ready == 2


def test_in_a_transaction_acks_wait_for_commit() -> None:
    out, ready = _run([1, 2, 3], tx=True)
    assert b"unknown delivery tag" not in out
    assert ready == 0  # all four still unacked by the open channel (nothing committed)
