"""Connection-level protocol: header, start, tune, channel limits, heartbeats, frame_max.

Every assertion is what RabbitMQ 3.10 answers (checked against a real one with
WARREN_TEST_BROKER_URL). Raw-socket tests use the `raw_amqp` fixture, which speaks AMQP
through pamqp without pika's client-side checks in the way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

RawFactory = Callable[..., Any]  # the raw_amqp fixture: (url=None, timeout=5.0) -> RawAmqp
AMQP_0091_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8

CAPABILITIES = (
    "publisher_confirms",
    "exchange_exchange_bindings",
    "basic.nack",
    "consumer_cancel_notify",
    "connection.blocked",
    "consumer_priorities",
    "authentication_failure_close",
    "per_consumer_qos",
    "direct_reply_to",
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def params(url: str, **kwargs: Any) -> pika.URLParameters:
    p = pika.URLParameters(url)
    for key, value in kwargs.items():
        setattr(p, key, value)
    return p


# --- protocol header -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"AMQP\x00\x00\x08\x00",  # AMQP 0-8
        b"AMQP\x00\x00\x09\x00",  # 0-9 (not 0-9-1)
        b"AMQP\x00\x01\x00\x00",  # AMQP 1.0
        b"GET / HT",  # someone speaking HTTP
        b"\x00" * 8,
    ],
    ids=["amqp-0-8", "amqp-0-9", "amqp-1-0", "http", "zeros"],
)
def test_wrong_protocol_header_is_answered_with_0091_header_then_closed(
    raw_amqp: RawFactory, header: bytes
) -> None:
    client = raw_amqp()
    client.send(header)
    assert client.read_until_closed(timeout=5) == AMQP_0091_HEADER


# --- connection.start ----------------------------------------------------------------------


def test_connection_start_announces_server_properties_and_capabilities(
    raw_amqp: RawFactory,
) -> None:
    client = raw_amqp()
    client.send(AMQP_0091_HEADER)
    start = client.recv()
    assert isinstance(start, commands.Connection.Start)
    assert (start.version_major, start.version_minor) == (0, 9)
    props = start.server_properties
    for key in ("product", "version", "platform"):
        assert isinstance(props.get(key), str), key
        assert props[key], key
    caps = props["capabilities"]
    assert {name: caps.get(name) for name in CAPABILITIES} == dict.fromkeys(CAPABILITIES, True)
    assert {"PLAIN", "AMQPLAIN"} <= set(start.mechanisms.split())
    assert "en_US" in start.locales.split()


def test_amqplain_login_opens_the_connection(raw_amqp: RawFactory) -> None:
    client = raw_amqp()
    _start, _tune, opened = client.handshake("guest", "guest", mechanism="AMQPLAIN")
    assert isinstance(opened, commands.Connection.OpenOk)
    client.open_channel(1)
    client.send_method(commands.Queue.Declare(queue="", exclusive=True), 1)
    declared = client.recv()
    assert isinstance(declared, commands.Queue.DeclareOk)
    assert declared.queue.startswith("amq.gen-")


def test_amqplain_wrong_password_is_403(raw_amqp: RawFactory) -> None:
    client = raw_amqp()
    _start, close, opened = client.handshake("guest", "not-the-password", mechanism="AMQPLAIN")
    assert opened is None
    assert isinstance(close, commands.Connection.Close)
    assert close.reply_code == 403
    assert close.reply_text == (
        "ACCESS_REFUSED - Login was refused using authentication mechanism AMQPLAIN. "
        "For details see the broker logfile."
    )


def test_unknown_mechanism_is_refused_before_tune(raw_amqp: RawFactory) -> None:
    client = raw_amqp()
    client.send(AMQP_0091_HEADER)
    assert isinstance(client.recv(), commands.Connection.Start)
    client.send_method(
        commands.Connection.StartOk(
            client_properties={"capabilities": {"authentication_failure_close": True}},
            mechanism="CRAM-MD5",
            response="whatever",
        )
    )
    # RabbitMQ 3.10 simply drops the socket here; a connection.close saying why is fine too.
    reply = client.recv()
    if reply is not None:
        assert isinstance(reply, commands.Connection.Close), reply
        assert reply.reply_code in (403, 503)
        assert "CRAM-MD5" in reply.reply_text
        client.send_method(commands.Connection.CloseOk())
    assert client.read_until_closed() == b""


# --- connection.tune -----------------------------------------------------------------------


def test_server_proposes_rabbitmq_default_tuning(raw_amqp: RawFactory) -> None:
    client = raw_amqp()
    _start, tune, opened = client.handshake()
    assert isinstance(opened, commands.Connection.OpenOk)
    assert (tune.channel_max, tune.frame_max, tune.heartbeat) == (2047, 131072, 60)


def test_client_smaller_tuning_wins(broker_url: str) -> None:
    proposed: list[int] = []

    def heartbeat(_conn: object, server_value: int) -> int:
        proposed.append(server_value)
        return 5

    conn = pika.BlockingConnection(
        params(broker_url, channel_max=16, frame_max=8192, heartbeat=heartbeat)
    )
    try:
        negotiated = conn._impl.params
        assert proposed == [60]
        assert (negotiated.channel_max, negotiated.frame_max, negotiated.heartbeat) == (
            16,
            8192,
            5,
        )
        # The connection works under those limits: a body bigger than frame_max both ways.
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        body = bytes(range(256)) * 100
        ch.basic_publish("", queue, body)
        method, _props, got = ch.basic_get(queue, auto_ack=True)
        assert method is not None
        assert got == body
    finally:
        conn.close()


def test_channel_beyond_negotiated_channel_max_closes_connection_530(
    raw_amqp: RawFactory,
) -> None:
    client = raw_amqp()
    client.handshake(channel_max=3)
    for number in (1, 2, 3):
        client.open_channel(number)
    client.send_method(commands.Channel.Open(), 4)
    close = client.expect_connection_close()
    assert close.reply_code == 530
    assert close.reply_text == (
        "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)"
    )


def test_channel_flow_active_is_acknowledged(raw_amqp: RawFactory) -> None:
    client = raw_amqp()
    client.handshake()
    client.open_channel(1)
    client.send_method(commands.Channel.Flow(active=True), 1)
    reply = client.recv()
    assert isinstance(reply, commands.Channel.FlowOk)
    assert reply.active is True


def test_channel_flow_inactive_closes_connection_540(raw_amqp: RawFactory) -> None:
    client = raw_amqp()
    client.handshake()
    client.open_channel(1)
    client.send_method(commands.Channel.Flow(active=False), 1)
    close = client.expect_connection_close()
    assert (close.reply_code, close.reply_text) == (540, "NOT_IMPLEMENTED - active=false")
    assert (close.class_id, close.method_id) == (20, 20)


# --- heartbeats ----------------------------------------------------------------------------


def watch_silent_client(client: Any, limit: float) -> tuple[float, int]:
    """Read (never write) until the server drops us: (seconds until EOF, heartbeats seen)."""
    began = time.monotonic()
    heartbeats = 0
    while True:
        frame = client.recv_raw(timeout=limit)
        if frame is None:
            return time.monotonic() - began, heartbeats
        if frame.kind == FRAME_HEARTBEAT:
            assert frame.channel == 0
            heartbeats += 1
        # A connection.close before the drop is acceptable; we stay silent regardless.


def test_silent_client_is_dropped_after_missed_heartbeats(raw_amqp: RawFactory) -> None:
    client = raw_amqp(timeout=10)
    client.handshake(heartbeat=1)  # the client asks for 1 s; the smaller value wins
    elapsed, heartbeats = watch_silent_client(client, limit=8)
    assert 1.5 <= elapsed <= 4.5, elapsed
    assert heartbeats >= 1


def test_node_heartbeat_option_is_proposed_and_enforced(
    start_node: Callable[..., Any], raw_amqp: RawFactory
) -> None:
    node = start_node("--heartbeat", "1")
    client = raw_amqp(node.url, timeout=10)
    _start, tune, opened = client.handshake(heartbeat=1)
    assert isinstance(opened, commands.Connection.OpenOk)
    assert tune.heartbeat == 1
    elapsed, heartbeats = watch_silent_client(client, limit=8)
    assert 1.5 <= elapsed <= 4.5, elapsed
    assert heartbeats >= 1


def test_pika_client_with_one_second_heartbeat_survives_idling(broker_url: str) -> None:
    conn = pika.BlockingConnection(params(broker_url, heartbeat=1))
    try:
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        conn.sleep(4.0)  # pika answers heartbeats while it sleeps
        assert conn.is_open
        ch.basic_publish("", queue, b"still here")
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        assert method is not None
        assert body == b"still here"
    finally:
        if conn.is_open:
            conn.close()


# --- frame_max -----------------------------------------------------------------------------


def publish_with_pika(url: str, queue: str, body: bytes) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare(queue, auto_delete=False)
        ch.basic_publish("", queue, body, mandatory=True)
    finally:
        conn.close()


def delete_queue(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.close()


def test_deliveries_are_split_into_frames_of_negotiated_frame_max(
    broker_url: str, raw_amqp: RawFactory
) -> None:
    queue = unique("frame-max")
    body = bytes(i % 251 for i in range(100_000))
    publish_with_pika(broker_url, queue, body)
    try:
        client = raw_amqp()
        client.handshake(frame_max=4096)
        client.open_channel(1)
        client.send_method(commands.Basic.Get(queue=queue, no_ack=True), 1)
        get_ok = client.recv_raw()
        assert get_ok is not None
        assert get_ok.kind == FRAME_METHOD
        assert isinstance(get_ok.decode(), commands.Basic.GetOk)
        header = client.recv_raw()
        assert header is not None
        assert header.kind == FRAME_HEADER
        assert header.decode().body_size == len(body)
        received = b""
        sizes = []
        while len(received) < len(body):
            frame = client.recv_raw()
            assert frame is not None
            assert (frame.kind, frame.channel) == (FRAME_BODY, 1)
            sizes.append(frame.wire_size)
            received += frame.payload
        assert received == body
        assert max(sizes) <= 4096
        assert len(sizes) >= 25  # 100 000 bytes cannot fit in fewer 4 KiB frames
    finally:
        delete_queue(broker_url, queue)


def test_pika_with_small_frame_max_gets_large_body_intact(broker_url: str) -> None:
    body = bytes(i % 253 for i in range(100_000))
    conn = pika.BlockingConnection(params(broker_url, frame_max=4096))
    try:
        assert conn._impl.params.frame_max == 4096
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", queue, body)
        deliveries: list[bytes] = []

        def on_message(channel: Any, method: Any, _props: pika.BasicProperties, got: bytes) -> None:
            deliveries.append(got)
            channel.basic_ack(method.delivery_tag)
            channel.stop_consuming()

        ch.basic_consume(queue, on_message)
        conn.call_later(10, ch.stop_consuming)
        ch.start_consuming()
        assert deliveries == [body]
    finally:
        conn.close()


def test_frame_larger_than_negotiated_frame_max_closes_connection_501(
    raw_amqp: RawFactory,
) -> None:
    client = raw_amqp()
    client.handshake(frame_max=4096)
    client.open_channel(1)
    client.send_method(commands.Basic.Publish(exchange="", routing_key=unique("nowhere")), 1)
    client.send_method(ContentHeader(0, 10_000, commands.Basic.Properties()), 1)
    client.send(client.encode_frame(FRAME_BODY, 1, b"x" * 10_000))
    close = client.expect_connection_close(eof=False)
    assert close.reply_code == 501
    assert close.reply_text.startswith("FRAME_ERROR - ")


def test_body_frames_within_frame_max_are_accepted(raw_amqp: RawFactory) -> None:
    """The other side of the previous test: 4096-byte frames are fine at frame_max 4096."""
    client = raw_amqp()
    client.handshake(frame_max=4096)
    client.open_channel(1)
    client.send_method(commands.Queue.Declare(queue="", exclusive=True), 1)
    queue = client.recv().queue
    body = bytes(i % 256 for i in range(3 * 4088))
    client.send_method(commands.Basic.Publish(exchange="", routing_key=queue), 1)
    client.send_method(ContentHeader(0, len(body), commands.Basic.Properties()), 1)
    for offset in range(0, len(body), 4088):  # 4088 + 8 bytes of framing = 4096
        client.send_method(ContentBody(body[offset : offset + 4088]), 1)
    client.send_method(commands.Basic.Get(queue=queue, no_ack=True), 1)
    get_ok = client.recv()
    assert isinstance(get_ok, commands.Basic.GetOk), get_ok
    header = client.recv()
    assert header.body_size == len(body)
    received = b""
    while len(received) < len(body):
        received += client.recv().value
    assert received == body
