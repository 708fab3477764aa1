"""Errors: what closes a channel, what closes a connection, and that nothing else suffers.

Channel errors (soft) close only their channel, with RabbitMQ's code and text, and the
connection carries on. Connection errors (hard) and malformed input close the connection,
and a second client connected at the same time keeps working. Texts are RabbitMQ 3.10's;
where RabbitMQ prints Erlang terms (FRAME_ERROR details) only the code and the text's
prefix are asserted.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader

RawFactory = Callable[..., Any]  # the raw_amqp fixture: (url=None, timeout=5.0) -> RawAmqp
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def round_trip(conn: Any) -> None:
    """Prove a connection still works: new channel, private queue, publish, get."""
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    body = uuid.uuid4().bytes
    ch.basic_publish("", queue, body)
    method, _props, got = ch.basic_get(queue, auto_ack=True)
    assert method is not None
    assert got == body
    ch.close()


@dataclass
class World:
    """Connections and names for one test; cleans up everything it declared."""

    url: str
    connections: list[Any] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    _setup: Any = None

    def connect(self) -> Any:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.connections.append(conn)
        return conn

    @property
    def setup(self) -> Any:
        if self._setup is None or not self._setup.is_open:
            self._setup = self.connect().channel()
        return self._setup

    def queue(self, **kwargs: Any) -> str:
        name = unique("err-q")
        self.setup.queue_declare(name, **kwargs)
        self.queues.append(name)
        return name

    def exchange(self, kind: str = "direct") -> str:
        name = unique("err-x")
        self.setup.exchange_declare(name, kind)
        self.exchanges.append(name)
        return name

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            ch = self.connect().channel()
            for q in self.queues:
                ch.queue_delete(q)
            for x in self.exchanges:
                ch.exchange_delete(x)
        for conn in self.connections:
            if conn.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):
                    conn.close()


@pytest.fixture
def world(broker_url: str) -> Iterator[World]:
    w = World(broker_url)
    yield w
    w.close()


# --- channel errors --------------------------------------------------------------------------
# Each case sets up what it needs and returns (action on a fresh channel, code, text).

Action = Callable[[Any], object]
Case = Callable[[World], tuple[Action, int, str]]


def sync(ch: Any) -> None:
    """A harmless synchronous method: makes an asynchronous error surface in pika."""
    ch.basic_qos(prefetch_count=0)


def missing_queue_passive(w: World) -> tuple[Action, int, str]:
    q = unique("missing")
    return (
        (lambda ch: ch.queue_declare(q, passive=True)),
        404,
        f"NOT_FOUND - no queue '{q}' in vhost '/'",
    )


def missing_exchange_passive(w: World) -> tuple[Action, int, str]:
    x = unique("missing")
    return (
        lambda ch: ch.exchange_declare(x, passive=True),
        404,
        f"NOT_FOUND - no exchange '{x}' in vhost '/'",
    )


def publish_to_missing_exchange(w: World) -> tuple[Action, int, str]:
    x = unique("missing")

    def act(ch: Any) -> None:
        ch.basic_publish(x, "key", b"lost")
        sync(ch)

    return act, 404, f"NOT_FOUND - no exchange '{x}' in vhost '/'"


def consume_missing_queue(w: World) -> tuple[Action, int, str]:
    q = unique("missing")
    return (
        lambda ch: ch.basic_consume(q, lambda *a: None),
        404,
        f"NOT_FOUND - no queue '{q}' in vhost '/'",
    )


def get_missing_queue(w: World) -> tuple[Action, int, str]:
    q = unique("missing")
    return (lambda ch: ch.basic_get(q)), 404, f"NOT_FOUND - no queue '{q}' in vhost '/'"


def purge_missing_queue(w: World) -> tuple[Action, int, str]:
    q = unique("missing")
    return (lambda ch: ch.queue_purge(q)), 404, f"NOT_FOUND - no queue '{q}' in vhost '/'"


def bind_to_missing_exchange(w: World) -> tuple[Action, int, str]:
    q, x = w.queue(), unique("missing")
    return (lambda ch: ch.queue_bind(q, x, "k")), 404, f"NOT_FOUND - no exchange '{x}' in vhost '/'"


def bind_missing_queue(w: World) -> tuple[Action, int, str]:
    x, q = w.exchange(), unique("missing")
    return (lambda ch: ch.queue_bind(q, x, "k")), 404, f"NOT_FOUND - no queue '{q}' in vhost '/'"


def queue_inequivalent_durable(w: World) -> tuple[Action, int, str]:
    q = w.queue(durable=False)
    return (
        lambda ch: ch.queue_declare(q, durable=True),
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': "
        "received 'true' but current is 'false'",
    )


def exchange_inequivalent_type(w: World) -> tuple[Action, int, str]:
    x = w.exchange("direct")
    return (
        lambda ch: ch.exchange_declare(x, "fanout"),
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{x}' in vhost '/': "
        "received 'fanout' but current is 'direct'",
    )


def ack_unknown_tag(w: World) -> tuple[Action, int, str]:
    def act(ch: Any) -> None:
        ch.basic_ack(99)
        sync(ch)

    return act, 406, "PRECONDITION_FAILED - unknown delivery tag 99"


def ack_twice(w: World) -> tuple[Action, int, str]:
    q = w.queue()
    w.setup.basic_publish("", q, b"once")

    def act(ch: Any) -> None:
        method, _props, _body = ch.basic_get(q)
        assert method is not None
        ch.basic_ack(method.delivery_tag)
        ch.basic_ack(method.delivery_tag)
        sync(ch)

    return act, 406, "PRECONDITION_FAILED - unknown delivery tag 1"


def reserved_exchange_name(w: World) -> tuple[Action, int, str]:
    x = unique("amq.mine")
    return (
        lambda ch: ch.exchange_declare(x, "direct"),
        403,
        f"ACCESS_REFUSED - exchange name '{x}' contains reserved prefix 'amq.*'",
    )


def reserved_queue_name(w: World) -> tuple[Action, int, str]:
    q = unique("amq.gen")
    return (
        lambda ch: ch.queue_declare(q),
        403,
        f"ACCESS_REFUSED - queue name '{q}' contains reserved prefix 'amq.*'",
    )


def delete_default_exchange(w: World) -> tuple[Action, int, str]:
    return (
        lambda ch: ch.exchange_delete(""),
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    )


def bind_to_default_exchange(w: World) -> tuple[Action, int, str]:
    q = w.queue()
    return (
        lambda ch: ch.queue_bind(q, "", "k"),
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    )


def delete_non_empty_if_empty(w: World) -> tuple[Action, int, str]:
    q = w.queue()
    w.setup.basic_publish("", q, b"still here")
    return (
        lambda ch: ch.queue_delete(q, if_empty=True),
        406,
        f"PRECONDITION_FAILED - queue '{q}' in vhost '/' not empty",
    )


def commit_without_tx(w: World) -> tuple[Action, int, str]:
    return (lambda ch: ch.tx_commit()), 406, "PRECONDITION_FAILED - channel is not transactional"


def confirm_after_tx(w: World) -> tuple[Action, int, str]:
    def act(ch: Any) -> None:
        ch.tx_select()
        ch.confirm_delivery()

    return act, 406, "PRECONDITION_FAILED - cannot switch from tx to confirm mode"


def tx_after_confirm(w: World) -> tuple[Action, int, str]:
    def act(ch: Any) -> None:
        ch.confirm_delivery()
        ch.tx_select()

    return act, 406, "PRECONDITION_FAILED - cannot switch from confirm to tx mode"


def bad_queue_argument(w: World) -> tuple[Action, int, str]:
    q = unique("bad-arg")
    return (
        lambda ch: ch.queue_declare(q, arguments={"x-max-length": "ten"}),
        406,
        f"PRECONDITION_FAILED - invalid arg 'x-max-length' for queue '{q}' in vhost '/': "
        '"expected integer, got longstr"',
    )


def exclusive_queue_of_another_connection(w: World) -> tuple[Action, int, str]:
    q = unique("exclusive")
    w.connect().channel().queue_declare(q, exclusive=True)
    return (
        lambda ch: ch.queue_declare(q, passive=True),
        405,
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. "
        "It could be originally declared on another connection or the exclusive property "
        "value does not match that of the original declaration.",
    )


CHANNEL_ERRORS: list[Case] = [
    missing_queue_passive,
    missing_exchange_passive,
    publish_to_missing_exchange,
    consume_missing_queue,
    get_missing_queue,
    purge_missing_queue,
    bind_to_missing_exchange,
    bind_missing_queue,
    queue_inequivalent_durable,
    exchange_inequivalent_type,
    ack_unknown_tag,
    ack_twice,
    reserved_exchange_name,
    reserved_queue_name,
    delete_default_exchange,
    bind_to_default_exchange,
    delete_non_empty_if_empty,
    commit_without_tx,
    confirm_after_tx,
    tx_after_confirm,
    bad_queue_argument,
    exclusive_queue_of_another_connection,
]


def check_channel_error(w: World, case: Case) -> None:
    action, code, text = case(w)
    conn = w.connect()
    survivor = conn.channel()  # another channel on the same connection, open throughout
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        action(ch)
    assert (info.value.reply_code, info.value.reply_text) == (code, text)
    assert ch.is_closed
    assert conn.is_open
    assert survivor.is_open
    sync(survivor)
    round_trip(conn)


@pytest.mark.parametrize("case", CHANNEL_ERRORS, ids=lambda c: c.__name__)
def test_channel_error_closes_only_its_channel(world: World, case: Case) -> None:
    check_channel_error(world, case)


def test_many_channel_errors_on_one_connection(world: World) -> None:
    """RabbitMQ keeps a connection through any number of channel errors."""
    conn = world.connect()
    for _ in range(20):
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            ch.queue_declare(unique("missing"), passive=True)
    round_trip(conn)


def test_deleting_what_does_not_exist_is_not_an_error(world: World) -> None:
    """Deleting what does not exist is fine in RabbitMQ 3.10 (no error at all)."""
    conn = world.connect()
    ch = conn.channel()
    assert ch.queue_delete(unique("missing")).method.message_count == 0
    ch.exchange_delete(unique("missing"))
    ch.queue_unbind(world.queue(), unique("missing"), "k")
    ch.basic_cancel("no-such-consumer")
    assert ch.is_open
    round_trip(conn)


# --- connection errors (pika can send these) ---------------------------------------------


def test_unknown_exchange_type_closes_channel_406(world: World) -> None:
    # RabbitMQ 3.10 closed the connection with 503 COMMAND_INVALID; current RabbitMQ (and
    # pika's own acceptance suite) close only the channel with 406. Warren follows current.
    bystander = world.connect()
    conn = world.connect()
    x = unique("weird")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        conn.channel().exchange_declare(x, "no-such-type")
    assert (info.value.reply_code, info.value.reply_text) == (
        406,
        "PRECONDITION_FAILED - unknown exchange type 'no-such-type'",
    )
    assert conn.is_open
    round_trip(conn)
    round_trip(bystander)


def test_prefetch_size_closes_connection_540(world: World) -> None:
    bystander = world.connect()
    conn = world.connect()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        conn.channel().basic_qos(prefetch_size=4096)
    assert (info.value.reply_code, info.value.reply_text) == (
        540,
        "NOT_IMPLEMENTED - prefetch_size!=0 (4096)",
    )
    round_trip(bystander)


# --- protocol violations and malformed frames (raw socket) -------------------------------------


@dataclass(frozen=True)
class Violation:
    """Bytes sent after handshake + channel.open(1), and the connection.close expected."""

    name: str
    build: Callable[[], list[bytes]]
    code: int
    text: str  # exact, or a prefix when `exact` is False
    exact: bool = True
    class_method: tuple[int, int] | None = None
    # RabbitMQ drops the socket without connection.close for some inputs; for those,
    # `may_drop` lists the codes acceptable from a broker that does explain itself.
    may_drop: tuple[int, ...] = ()
    # After a bad frame boundary the server cannot parse our close-ok; it drops the socket
    # after its close-ok timeout (3 s in RabbitMQ), which the test does not wait for.
    stream_broken: bool = False


def frame(kind: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes([end])


def method(obj: Any, channel: int = 1) -> bytes:
    return bytes(pamqp_frame.marshal(obj, channel))


def publish() -> bytes:
    return method(commands.Basic.Publish(exchange="", routing_key=unique("nowhere")))


def content_header(size: int) -> bytes:
    return method(ContentHeader(0, size, commands.Basic.Properties()))


def consume_twice(tag: str) -> list[bytes]:
    queue = unique("consumed")
    return [
        method(commands.Queue.Declare(queue=queue, exclusive=True)),
        method(commands.Basic.Consume(queue=queue, consumer_tag=tag)),
        method(commands.Basic.Consume(queue=queue, consumer_tag=tag)),
    ]


UNEXPECTED_NON_METHOD = "UNEXPECTED_FRAME - expected method frame, got non method frame instead"

VIOLATIONS = [
    Violation(
        "bad-frame-end",
        lambda: [frame(FRAME_METHOD, 1, struct.pack(">HH", 20, 40), end=0x00)],
        501,
        "FRAME_ERROR - ",
        exact=False,
        stream_broken=True,
    ),
    Violation(
        "unknown-frame-type",
        lambda: [frame(9, 1, b"abc")],
        501,
        "FRAME_ERROR - ",
        exact=False,
    ),
    Violation(
        "garbage-bytes",
        lambda: [b"\xff" * 64],
        501,
        "FRAME_ERROR - ",
        exact=False,
        stream_broken=True,
    ),
    Violation(
        "huge-frame-size",
        lambda: [struct.pack(">BHI", FRAME_METHOD, 1, 2**31) + b"abc"],
        501,
        "FRAME_ERROR - ",
        exact=False,
        stream_broken=True,
    ),
    Violation(
        "truncated-arguments",
        lambda: [frame(FRAME_METHOD, 1, struct.pack(">HH", 50, 10) + b"\x00")],
        501,
        "FRAME_ERROR - ",
        exact=False,
    ),
    Violation(
        "body-without-header",
        lambda: [frame(FRAME_BODY, 1, b"hello")],
        505,
        UNEXPECTED_NON_METHOD,
    ),
    Violation("header-without-publish", lambda: [content_header(5)], 505, UNEXPECTED_NON_METHOD),
    Violation(
        "method-instead-of-body",
        lambda: [publish(), content_header(5), method(commands.Basic.Qos())],
        505,
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
        class_method=(60, 40),
    ),
    Violation(
        "header-of-wrong-class",
        lambda: [publish(), frame(FRAME_HEADER, 1, struct.pack(">HHQH", 50, 0, 5, 0))],
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead",
        class_method=(60, 40),
    ),
    Violation(
        "heartbeat-on-channel-1",
        lambda: [frame(FRAME_HEARTBEAT, 1, b"")],
        505,
        "UNEXPECTED_FRAME - ",
        exact=False,
    ),
    Violation(
        "body-on-channel-0",
        lambda: [frame(FRAME_BODY, 0, b"abc")],
        505,
        "UNEXPECTED_FRAME - ",
        exact=False,
    ),
    Violation(
        "method-on-unopened-channel",
        lambda: [method(commands.Queue.Declare(queue=unique("q")), channel=7)],
        504,
        "CHANNEL_ERROR - expected 'channel.open'",
        class_method=(50, 10),
    ),
    Violation(
        "second-channel-open",
        lambda: [method(commands.Channel.Open())],
        504,
        "CHANNEL_ERROR - second 'channel.open' seen",
        class_method=(20, 10),
    ),
    Violation(
        "queue-method-on-channel-0",
        lambda: [method(commands.Queue.Declare(queue=unique("q")), channel=0)],
        504,
        "CHANNEL_ERROR - unexpected method in connection state running",
        class_method=(50, 10),
    ),
    Violation(
        "unexpected-channel-close-ok",
        lambda: [method(commands.Channel.CloseOk())],
        503,
        "COMMAND_INVALID - unimplemented method",
        class_method=(20, 41),
    ),
    Violation(
        "reused-consumer-tag",
        lambda: consume_twice("twice"),
        530,
        "NOT_ALLOWED - attempt to reuse consumer tag 'twice'",
        class_method=(60, 20),
    ),
    # RabbitMQ 3.10 drops the socket for unknown class/method ids without a word.
    Violation(
        "unknown-method-id",
        lambda: [frame(FRAME_METHOD, 1, struct.pack(">HH", 60, 999))],
        540,
        "",
        exact=False,
        may_drop=(503, 540),
    ),
    Violation(
        "unknown-class-id",
        lambda: [frame(FRAME_METHOD, 1, struct.pack(">HH", 999, 10))],
        540,
        "",
        exact=False,
        may_drop=(503, 540),
    ),
]


def check_violation(raw_amqp: RawFactory, url: str, violation: Violation) -> None:
    client = raw_amqp(url)
    client.handshake()
    client.open_channel(1)
    for data in violation.build():
        client.send(data)
    while True:
        reply = client.recv()
        if reply is None or isinstance(reply, commands.Connection.Close):
            break
        # replies to the methods sent before the violation (declare-ok, consume-ok)
        assert not isinstance(reply, commands.Channel.Close), reply
    if reply is None:
        assert violation.may_drop, f"{violation.name}: socket closed without connection.close"
        return
    client.send_method(commands.Connection.CloseOk())
    if not violation.stream_broken:
        assert client.read_until_closed() == b""
    if violation.may_drop:
        assert reply.reply_code in violation.may_drop
        return
    assert reply.reply_code == violation.code
    if violation.exact:
        assert reply.reply_text == violation.text
    else:
        assert reply.reply_text.startswith(violation.text), reply.reply_text
    if violation.class_method is not None:
        assert (reply.class_id, reply.method_id) == violation.class_method


@pytest.mark.parametrize("violation", VIOLATIONS, ids=lambda v: v.name)
def test_protocol_violation_closes_connection(
    world: World, raw_amqp: RawFactory, broker_url: str, violation: Violation
) -> None:
    bystander = world.connect()
    bystander_channel = bystander.channel()
    check_violation(raw_amqp, broker_url, violation)
    assert bystander_channel.is_open
    round_trip(bystander)


def test_bad_input_never_hurts_the_node(
    start_node: Callable[..., Any], raw_amqp: RawFactory
) -> None:
    """Everything above against one dedicated node: it stays up, its log has no traceback."""
    node = start_node()
    w = World(node.url)
    try:
        bystander = w.connect()
        consumer = bystander.channel()
        feed = consumer.queue_declare("", exclusive=True).method.queue
        for case in CHANNEL_ERRORS:
            check_channel_error(w, case)
        for violation in VIOLATIONS:
            check_violation(raw_amqp, node.url, violation)
        for _ in range(3):
            client = raw_amqp(node.url)
            client.send(b"\x00" * 8)
            assert client.read_until_closed() == b"AMQP\x00\x00\x09\x01"
        # The connection that watched all of this still works, and so do new ones.
        consumer.basic_publish("", feed, b"after the storm")
        method_frame, _props, body = consumer.basic_get(feed, auto_ack=True)
        assert method_frame is not None
        assert body == b"after the storm"
        round_trip(w.connect())
    finally:
        w.close()
    assert node.proc.poll() is None, node.log()
    log = node.log()
    assert "Traceback" not in log, log
    assert node.stop() == 0
    assert "Traceback" not in node.log()
