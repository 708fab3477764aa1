"""node.protocol.connection driven by a scripted client (frames built with pamqp, no sockets).

Expected codes and texts are what a RabbitMQ 3.10 broker answered to the same bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import base, commands, header
from pamqp import body as pbody
from pamqp import encode as pencode
from pamqp import frame as pframe
from pamqp import heartbeat as pheartbeat

from node.protocol.codec import AMQP_HEADER, HEARTBEAT_FRAME, AckMethod, peek_properties
from node.protocol.connection import (
    ChannelClosed,
    ChannelContent,
    ChannelError,
    ChannelMethod,
    ChannelOpened,
    ConnectionClosed,
    ConnectionLost,
    ConnectionState,
    LoginRequested,
    SecretUpdated,
    ServerConnection,
    VhostRequested,
)
from node.protocol.errors import LocalProtocolError

C = commands
CAPS = {"authentication_failure_close": True, "connection.blocked": True}


def raw(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + end


def content_header(
    channel: int, size: int, props: bytes = b"\x00\x00", cls: int = 60, weight: int = 0
) -> bytes:
    return raw(2, channel, struct.pack(">HHQ", cls, weight, size) + props)


def publish(
    channel: int, body: bytes, exchange: str = "", routing_key: str = "q", props: Any = None
) -> bytes:
    props = props or C.Basic.Properties()
    return (
        pframe.marshal(C.Basic.Publish(exchange=exchange, routing_key=routing_key), channel)
        + pframe.marshal(header.ContentHeader(0, len(body), props), channel)
        + (pframe.marshal(pbody.ContentBody(body), channel) if body else b"")
    )


class Client:
    """A scripted client talking to one ServerConnection; time only moves when told."""

    def __init__(self, **options: Any) -> None:
        self.now = 1000.0
        self.conn = ServerConnection(
            server_properties={"product": "Warren"}, now=self.now, **options
        )

    def send(self, data: bytes) -> list[Any]:
        self.conn.receive_data(data, self.now)
        return self.events()

    def method(self, channel: int, method: base.Frame) -> list[Any]:
        return self.send(pframe.marshal(method, channel))

    def events(self) -> list[Any]:
        out = []
        while (event := self.conn.next_event()) is not None:
            out.append(event)
        return out

    def received(self) -> list[Any]:
        """What the server wrote, as (channel, method name, arguments) / frames."""
        data = self.conn.data_to_send()
        out: list[Any] = []
        while data:
            if data.startswith(b"AMQP"):
                out.append(data[:8])
                data = data[8:]
                continue
            used, channel, frame = pframe.unmarshal(data)
            data = data[used:]
            if isinstance(frame, base.Frame):
                out.append(
                    (channel, frame.name, {k: getattr(frame, k) for k in type(frame).__slots__})
                )
            elif isinstance(frame, pheartbeat.Heartbeat):
                out.append("heartbeat")
            else:
                out.append((channel, frame))
        return out

    def tick(self, seconds: float) -> list[Any]:
        self.now += seconds
        self.conn.tick(self.now)
        return self.events()

    def handshake(
        self,
        *,
        caps: dict[str, Any] | None = None,
        channel_max: int = 2047,
        frame_max: int = 131072,
        heartbeat: int = 0,
        channels: tuple[int, ...] = (1,),
    ) -> None:
        self.send(AMQP_HEADER)
        props = {"capabilities": CAPS if caps is None else caps}
        events = self.method(
            0, C.Connection.StartOk(client_properties=props, response="\0guest\0guest")
        )
        assert events == [LoginRequested("PLAIN", "guest", "guest", props)]
        self.conn.accept_login()
        events = self.method(0, C.Connection.TuneOk(channel_max, frame_max, heartbeat))
        events += self.method(0, C.Connection.Open(virtual_host="/"))
        assert events == [VhostRequested("/")]
        self.conn.accept_vhost()
        for channel in channels:
            assert self.method(channel, C.Channel.Open()) == [ChannelOpened(channel)]
        self.received()
        assert self.conn.state is ConnectionState.OPEN


def close_frame(
    code: int, text: str, class_id: int = 0, method_id: int = 0
) -> tuple[int, str, dict[str, Any]]:
    args = {"reply_code": code, "reply_text": text, "class_id": class_id, "method_id": method_id}
    return (0, "Connection.Close", args)


def channel_close_frame(
    channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0
) -> tuple[int, str, dict[str, Any]]:
    args = {"reply_code": code, "reply_text": text, "class_id": class_id, "method_id": method_id}
    return (channel, "Channel.Close", args)


def hard_error(
    client: Client, data: bytes, code: int, text: str, class_id: int = 0, method_id: int = 0
) -> None:
    """Sending `data` ends the connection with this connection.close, as RabbitMQ does."""
    events = client.send(data)
    assert events[-1] == ConnectionClosed(code, text, by_peer=False)
    assert client.received() == [close_frame(code, text, class_id, method_id)]
    assert client.conn.state is ConnectionState.CLOSED
    assert client.send(b"more bytes are ignored") == []


@pytest.fixture
def client() -> Client:
    c = Client()
    c.handshake()
    return c


# ---- handshake -------------------------------------------------------------------------------


def test_start_tune_open() -> None:
    c = Client(channel_max=100, frame_max=65536, heartbeat=30)
    assert c.send(AMQP_HEADER) == []
    [start] = c.received()
    assert start == (
        0,
        "Connection.Start",
        {
            "version_major": 0,
            "version_minor": 9,
            "server_properties": {"product": "Warren"},
            "mechanisms": "PLAIN AMQPLAIN",
            "locales": "en_US",
        },
    )
    response = pencode.field_table({"LOGIN": "bob", "PASSWORD": "secret"})[4:].decode()
    events = c.method(
        0, C.Connection.StartOk(client_properties={"x": 1}, mechanism="AMQPLAIN", response=response)
    )
    assert events == [LoginRequested("AMQPLAIN", "bob", "secret", {"x": 1})]
    assert c.received() == []
    c.conn.accept_login()
    assert c.received() == [
        (0, "Connection.Tune", {"channel_max": 100, "frame_max": 65536, "heartbeat": 30})
    ]
    assert c.method(0, C.Connection.TuneOk(50, 8192, 10)) == []
    assert (c.conn.channel_max, c.conn.frame_max, c.conn.heartbeat) == (50, 8192, 10)
    assert c.method(0, C.Connection.Open(virtual_host="vh")) == [VhostRequested("vh")]
    c.conn.accept_vhost()
    assert c.received() == [(0, "Connection.OpenOk", {"known_hosts": ""})]
    assert c.conn.state is ConnectionState.OPEN


def test_pipelined_handshake_waits_for_the_shell() -> None:
    c = Client()
    data = (
        AMQP_HEADER
        + pframe.marshal(C.Connection.StartOk(client_properties={}, response="\0a\0b"), 0)
        + pframe.marshal(C.Connection.TuneOk(2047, 131072, 0), 0)
        + pframe.marshal(C.Connection.Open(), 0)
        + pframe.marshal(C.Channel.Open(), 1)
    )
    assert c.send(data) == [LoginRequested("PLAIN", "a", "b", {})]
    assert c.events() == []  # nothing more is read until the login is answered
    c.conn.accept_login()
    assert c.events() == [VhostRequested("/")]
    c.conn.accept_vhost()
    assert c.events() == [ChannelOpened(1)]


@pytest.mark.parametrize(
    ("mechanism", "response"),
    [
        ("FOO", "\0guest\0guest"),  # unknown mechanism
        ("PLAIN", "garbage"),
        ("PLAIN", "authz\0guest\0guest"),  # RabbitMQ's PLAIN takes no authorisation id
        ("PLAIN", "\0guest\0guest\0"),
        ("AMQPLAIN", "garbage"),
        ("AMQPLAIN", pencode.field_table({"LOGIN": "guest"})[4:].decode()),
    ],
)
def test_bad_start_ok_is_a_silent_close(mechanism: str, response: str) -> None:
    # Before tune-ok RabbitMQ sends nothing and drops the socket after 3 s, even with
    # authentication_failure_close.
    c = Client()
    c.send(AMQP_HEADER)
    c.received()
    start_ok = C.Connection.StartOk(
        client_properties={"capabilities": CAPS}, mechanism=mechanism, response=response
    )
    [event] = c.method(0, start_ok)
    assert isinstance(event, ConnectionClosed)
    assert (event.reply_code, event.by_peer, event.linger) == (403, False, 3.0)
    assert c.received() == []


def test_refused_login_with_authentication_failure_close() -> None:
    c = Client()
    c.send(AMQP_HEADER)
    c.method(
        0, C.Connection.StartOk(client_properties={"capabilities": CAPS}, response="\0guest\0bad")
    )
    c.received()
    c.conn.refuse_login()
    text = (
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
        "For details see the broker logfile."
    )
    assert c.received() == [close_frame(403, text)]
    assert c.conn.state is ConnectionState.CLOSING
    assert c.method(0, C.Connection.CloseOk()) == [ConnectionClosed(403, text, by_peer=False)]


def test_refused_login_without_the_capability_is_silent() -> None:
    c = Client()
    c.send(AMQP_HEADER)
    c.method(0, C.Connection.StartOk(client_properties={}, response="\0guest\0bad"))
    c.received()
    c.conn.refuse_login("ACCESS_REFUSED - no")
    assert c.events() == [ConnectionClosed(403, "ACCESS_REFUSED - no", by_peer=False, linger=3.0)]
    assert c.received() == []


@pytest.mark.parametrize(
    ("channel_max", "frame_max"),
    [(2047, 4095), (2047, 131073), (2047, 0), (0, 131072), (2048, 131072)],
)
def test_tune_ok_out_of_bounds_is_a_silent_close(channel_max: int, frame_max: int) -> None:
    # RabbitMQ 3.10: frame_max must be 4096..ours, channel_max 1..ours (0 means "no limit",
    # which exceeds ours); it drops the socket without a word.
    c = Client()
    c.send(AMQP_HEADER)
    c.method(0, C.Connection.StartOk(client_properties={}, response="\0a\0b"))
    c.conn.accept_login()
    c.received()
    [event] = c.method(0, C.Connection.TuneOk(channel_max, frame_max, 0))
    assert isinstance(event, ConnectionClosed)
    assert (event.reply_code, event.linger) == (530, 3.0)
    assert c.received() == []


def test_tune_ok_frame_max_4096_is_fine_and_limits_frames() -> None:
    c = Client()
    c.handshake(frame_max=4096)
    assert c.conn.frame_max == 4096
    hard_error(
        c,
        raw(3, 1, b"x" * 4097),
        501,
        "FRAME_ERROR - type 3, all octets = <<>>: {frame_too_large,4097,4088}",
    )


def test_heartbeat_is_the_clients_value() -> None:
    c = Client(heartbeat=60)
    c.handshake(heartbeat=120)
    assert c.conn.heartbeat == 120


def test_frame_max_before_tune_is_4096() -> None:
    c = Client()
    c.send(AMQP_HEADER)
    [event] = c.method(
        0, C.Connection.StartOk(client_properties={"x": "y" * 4300}, response="\0a\0b")
    )
    assert isinstance(event, ConnectionClosed)
    assert event.linger == 3.0


def test_unexpected_frames_during_handshake() -> None:
    c = Client()
    c.send(AMQP_HEADER)
    [event] = c.method(0, C.Connection.TuneOk(2047, 131072, 0))  # start state: silent
    assert isinstance(event, ConnectionClosed)
    assert event.linger == 3.0
    # after tune-ok RabbitMQ answers with connection.close
    c = Client()
    c.send(AMQP_HEADER)
    c.method(0, C.Connection.StartOk(client_properties={}, response="\0a\0b"))
    c.conn.accept_login()
    c.method(0, C.Connection.TuneOk(2047, 131072, 0))
    c.received()
    assert c.send(HEARTBEAT_FRAME) == []
    hard_error(
        c,
        pframe.marshal(C.Channel.Open(), 1),
        505,
        "UNEXPECTED_FRAME - type 1, all octets = <<0,20,0,10,1,48>>",
    )


@pytest.mark.parametrize(
    ("data", "code", "text", "ids"),
    [
        (
            pframe.marshal(C.Connection.TuneOk(2047, 131072, 0), 0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state opening",
            (10, 31),
        ),
        (
            pframe.marshal(C.Connection.Close(200, "", 0, 0), 0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state opening",
            (10, 50),
        ),
        (raw(3, 0, b"abc"), 505, 'UNEXPECTED_FRAME - type 3, all octets = <<"abc">>', (0, 0)),
        (
            raw(9, 0, b"abc"),
            501,
            'FRAME_ERROR - type 9, all octets = <<"abc">>: unknown_frame',
            (0, 0),
        ),
    ],
)
def test_errors_in_opening_state(data: bytes, code: int, text: str, ids: tuple[int, int]) -> None:
    c = Client()
    c.send(AMQP_HEADER)
    c.method(0, C.Connection.StartOk(client_properties={}, response="\0a\0b"))
    c.conn.accept_login()
    c.method(0, C.Connection.TuneOk(2047, 131072, 0))
    c.received()
    hard_error(c, data, code, text, *ids)


def test_vhost_refused() -> None:
    c = Client()
    c.send(AMQP_HEADER)
    c.method(0, C.Connection.StartOk(client_properties={}, response="\0a\0b"))
    c.conn.accept_login()
    c.method(0, C.Connection.TuneOk(2047, 131072, 0))
    c.method(0, C.Connection.Open(virtual_host="nope"))
    c.received()
    c.conn.refuse_vhost(530, "NOT_ALLOWED - vhost nope not found")
    assert c.events() == [
        ConnectionClosed(530, "NOT_ALLOWED - vhost nope not found", by_peer=False)
    ]
    assert c.received() == [close_frame(530, "NOT_ALLOWED - vhost nope not found", 10, 40)]


@pytest.mark.parametrize(
    "data", [b"AMQP\x00\x00\x09\x02", b"GET / HTTP/1.1\r\n\r\n", b"AMQP\x01\x01\x09\x01"]
)
def test_wrong_protocol_header(data: bytes) -> None:
    c = Client()
    [event] = c.send(data)
    assert isinstance(event, ConnectionClosed)
    assert not event.by_peer
    assert c.received() == [AMQP_HEADER]


def test_old_style_0_9_1_header_is_accepted() -> None:
    c = Client()
    c.send(b"AMQP\x01\x01\x00\x09")
    assert c.received()[0][1] == "Connection.Start"


def test_the_shell_must_answer_in_order() -> None:
    c = Client()
    with pytest.raises(LocalProtocolError):
        c.conn.accept_login()
    c.send(AMQP_HEADER)
    c.method(0, C.Connection.StartOk(client_properties={}, response="\0a\0b"))
    with pytest.raises(LocalProtocolError):
        c.conn.accept_vhost()
    c.conn.accept_login()
    with pytest.raises(LocalProtocolError):
        c.conn.refuse_login()


def test_handshake_timeout() -> None:
    c = Client()
    c.send(AMQP_HEADER)
    assert c.tick(9.0) == []
    assert c.tick(1.0) == [ConnectionLost("handshake timeout")]


# ---- channels ---------------------------------------------------------------------------------


def test_channel_open_close(client: Client) -> None:
    assert client.method(2, C.Channel.Open()) == [ChannelOpened(2)]
    assert client.received() == [(2, "Channel.OpenOk", {"channel_id": ""})]
    assert client.conn.open_channels == {1, 2}
    events = client.method(2, C.Channel.Close(200, "bye", 0, 0))
    assert events == [ChannelClosed(2, by_peer=True, reply_code=200, reply_text="bye")]
    assert client.received() == [(2, "Channel.CloseOk", {})]
    assert client.method(2, C.Channel.Open()) == [ChannelOpened(2)]  # the id is free again


def test_reopening_an_open_channel(client: Client) -> None:
    hard_error(
        client,
        pframe.marshal(C.Channel.Open(), 1),
        504,
        "CHANNEL_ERROR - second 'channel.open' seen",
        20,
        10,
    )


@pytest.mark.parametrize(
    "method",
    [C.Basic.Qos(), C.Channel.Close(200, "", 0, 0), C.Channel.CloseOk()],
    ids=lambda m: m.name,
)
def test_method_on_a_channel_that_is_not_open(client: Client, method: base.Frame) -> None:
    class_id, method_id = method.index >> 16, method.index & 0xFFFF
    hard_error(
        client,
        pframe.marshal(method, 2),
        504,
        "CHANNEL_ERROR - expected 'channel.open'",
        class_id,
        method_id,
    )


def test_publish_on_a_channel_that_is_not_open_fails_after_its_content(client: Client) -> None:
    data = publish(5, b"abc")
    assert client.send(data[:-12]) == []  # RabbitMQ assembles the content first
    hard_error(client, data[-12:], 504, "CHANNEL_ERROR - expected 'channel.open'", 60, 40)


@pytest.mark.parametrize("channel", [1, 2])
def test_content_frames_on_a_channel_that_is_not_open(channel: int) -> None:
    c = Client()
    c.handshake(channels=(1,))
    hard_error(
        c,
        raw(3, 5, b"abc"),
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
    )


def test_channel_max_counts_open_channels() -> None:
    # RabbitMQ 3.10 limits the number of open channels, not their ids
    c = Client()
    c.handshake(channel_max=2, channels=(7, 3000))
    hard_error(
        c,
        pframe.marshal(C.Channel.Open(), 1),
        530,
        "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)",
    )


def test_channel_zero(client: Client) -> None:
    hard_error(
        client,
        pframe.marshal(C.Channel.Open(), 0),
        504,
        "CHANNEL_ERROR - unexpected method in connection state running",
        20,
        10,
    )


@pytest.mark.parametrize(
    ("data", "code", "text", "ids"),
    [
        (
            pframe.marshal(C.Basic.Qos(), 0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state running",
            (60, 10),
        ),
        (
            pframe.marshal(C.Basic.Publish(), 0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state running",
            (60, 40),
        ),
        (
            pframe.marshal(C.Basic.Ack(), 0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state running",
            (60, 80),
        ),
        (
            pframe.marshal(C.Connection.CloseOk(), 0),
            504,
            "CHANNEL_ERROR - unexpected method in connection state running",
            (10, 51),
        ),
        (raw(3, 0, b"abc"), 505, 'UNEXPECTED_FRAME - type 3, all octets = <<"abc">>', (0, 0)),
        (
            content_header(0, 3),
            505,
            "UNEXPECTED_FRAME - type 2, all octets = <<0,60,0,0,0,0,0,0,0,0,0,3,0,0>>",
            (0, 0),
        ),
        (raw(8, 1, b""), 505, "UNEXPECTED_FRAME - type 8, all octets = <<>>", (0, 0)),
        (raw(8, 5, b""), 505, "UNEXPECTED_FRAME - type 8, all octets = <<>>", (0, 0)),
        (
            pframe.marshal(C.Connection.Open(), 1),
            503,
            "COMMAND_INVALID - unimplemented method",
            (10, 40),
        ),
        (
            pframe.marshal(C.Connection.Close(200, "", 0, 0), 1),
            503,
            "COMMAND_INVALID - unimplemented method",
            (10, 50),
        ),
    ],
)
def test_methods_on_the_wrong_channel(
    client: Client, data: bytes, code: int, text: str, ids: tuple[int, int]
) -> None:
    hard_error(client, data, code, text, *ids)


@pytest.mark.parametrize(
    "method",
    [
        C.Channel.OpenOk(),
        C.Channel.FlowOk(True),
        C.Channel.CloseOk(),
        C.Basic.GetEmpty(),
        C.Basic.ConsumeOk("x"),
        C.Basic.CancelOk("x"),
        C.Basic.QosOk(),
        C.Basic.RecoverOk(),
        C.Queue.DeclareOk("q", 0, 0),
        C.Exchange.DeclareOk(),
        C.Tx.SelectOk(),
        C.Confirm.SelectOk(),
        C.Connection.Secure("x"),
    ],
    ids=lambda m: m.name,
)
def test_server_only_methods_are_unimplemented(client: Client, method: base.Frame) -> None:
    class_id, method_id = method.index >> 16, method.index & 0xFFFF
    hard_error(
        client,
        pframe.marshal(method, 1),
        503,
        "COMMAND_INVALID - unimplemented method",
        class_id,
        method_id,
    )


def test_server_only_content_methods_are_dropped_after_their_content(client: Client) -> None:
    data = (
        pframe.marshal(C.Basic.Deliver("c", 1, False, "", "q"), 1)
        + content_header(1, 3)
        + raw(3, 1, b"abc")
        + pframe.marshal(C.Basic.Return(312, "x", "", "q"), 1)
        + content_header(1, 0)
        + pframe.marshal(C.Basic.Qos(), 1)
    )
    [event] = client.send(data)
    assert isinstance(event, ChannelMethod)
    assert isinstance(event.method, C.Basic.Qos)


def test_flow(client: Client) -> None:
    assert client.method(1, C.Channel.Flow(True)) == []
    assert client.received() == [(1, "Channel.FlowOk", {"active": True})]
    hard_error(
        client,
        pframe.marshal(C.Channel.Flow(False), 1),
        540,
        "NOT_IMPLEMENTED - active=false",
        20,
        20,
    )


def test_access_request_is_answered_with_ticket_1(client: Client) -> None:
    assert client.send(raw(1, 1, b"\x00\x1e\x00\x0a\x01/\x00")) == []
    assert client.conn.data_to_send() == raw(1, 1, b"\x00\x1e\x00\x0b\x00\x01")


def test_channel_methods_and_acks_reach_the_shell(client: Client) -> None:
    events = client.method(1, C.Queue.Declare(queue="q", durable=True))
    events += client.method(1, C.Basic.Ack(5, True))
    events += client.method(1, C.Basic.Nack(6, False, True))
    assert len(events) == 3
    assert isinstance(events[0].method, C.Queue.Declare)
    assert events[0].method.queue == "q"
    assert events[1] == ChannelMethod(1, AckMethod(1, 5, True))
    assert isinstance(events[2].method, C.Basic.Nack)
    assert events[2].method.requeue


# ---- server-closed channels ------------------------------------------------------------------


def test_server_channel_close_drops_frames_until_close_ok(client: Client) -> None:
    assert client.conn.close_channel(1, 404, "NOT_FOUND - no queue 'x' in vhost '/'", 50, 10)
    assert client.received() == [
        channel_close_frame(1, 404, "NOT_FOUND - no queue 'x' in vhost '/'", 50, 10)
    ]
    assert not client.conn.close_channel(1, 404, "again")  # already closing: nothing more
    assert not client.conn.send_method(1, C.Basic.QosOk())
    data = (
        pframe.marshal(C.Basic.Qos(), 1)
        + publish(1, b"abc")
        + pframe.marshal(C.Connection.Close(200, "", 0, 0), 1)
        + pframe.marshal(C.Basic.Ack(1), 1)
    )
    assert client.send(data) == []
    assert client.received() == []
    # a crossing channel.close is answered, but the channel still waits for close-ok
    assert client.method(1, C.Channel.Close(200, "", 0, 0)) == []
    assert client.received() == [(1, "Channel.CloseOk", {})]
    assert client.method(1, C.Basic.Qos()) == []
    events = client.method(1, C.Channel.CloseOk())
    assert events == [
        ChannelClosed(
            1, by_peer=False, reply_code=404, reply_text="NOT_FOUND - no queue 'x' in vhost '/'"
        )
    ]
    assert client.method(1, C.Channel.Open()) == [ChannelOpened(1)]


def test_closing_channel_still_checks_content_order(client: Client) -> None:
    client.conn.close_channel(1, 406, "PRECONDITION_FAILED - x")
    client.received()
    hard_error(
        client,
        content_header(1, 3),
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
    )


def test_closing_channel_refuses_a_second_open(client: Client) -> None:
    client.conn.close_channel(1, 406, "PRECONDITION_FAILED - x")
    client.received()
    hard_error(
        client,
        pframe.marshal(C.Channel.Open(), 1),
        504,
        "CHANNEL_ERROR - second 'channel.open' seen",
        20,
        10,
    )


# ---- content assembly ---------------------------------------------------------------------


def test_publish_assembly(client: Client) -> None:
    props = C.Basic.Properties(delivery_mode=2, headers={"a": 1}, expiration="60000")
    data = publish(1, b"hello", exchange="amq.direct", routing_key="rk", props=props)
    [event] = client.send(data)
    peeked = (2, None, "60000", {"a": 1})
    raw_props = props.marshal()
    assert event == ChannelContent(1, "amq.direct", "rk", False, False, raw_props, b"hello", peeked)
    assert peek_properties(event.properties) == peeked


@pytest.mark.parametrize(
    "props", [b"\x10\x00", b"\x10\x00\x02zz", b"\x20\x00\x00\x00\x00\x03\x01kZ"]
)
def test_publish_with_malformed_properties(client: Client, props: bytes) -> None:
    # RabbitMQ's channel crashes decoding them: connection.close 541
    data = PUB + content_header(1, 3, props) + raw(3, 1, b"abc")
    hard_error(client, data, 541, "INTERNAL_ERROR")


def test_publish_with_odd_properties_rabbitmq_accepts(client: Client) -> None:
    # delivery mode 7 is the channel's business (406); UTF-8 in shortstrs is not checked
    [event] = client.send(PUB + content_header(1, 0, b"\x90\x00\x01\xff\x07"))
    assert event.peeked == (7, None, None, None)


def test_publish_flags_and_empty_body(client: Client) -> None:
    data = pframe.marshal(
        C.Basic.Publish(exchange="x", routing_key="k", mandatory=True, immediate=True), 1
    )
    [event] = client.send(data + content_header(1, 0))
    assert event == ChannelContent(1, "x", "k", True, True, b"\x00\x00", b"")


def test_publish_with_many_body_frames() -> None:
    c = Client()
    c.handshake(frame_max=4096)
    body = bytes(range(256)) * 50
    frames = [raw(3, 1, body[i : i + 4088]) for i in range(0, len(body), 4088)]
    data = pframe.marshal(C.Basic.Publish(routing_key="q"), 1) + content_header(1, len(body))
    assert c.send(data) == []
    for frame in frames[:-1]:
        assert c.send(frame + raw(3, 1, b"")) == []  # empty body frames are allowed
    [event] = c.send(frames[-1])
    assert event.body == body


def test_publishes_interleaved_on_two_channels() -> None:
    c = Client()
    c.handshake(channels=(1, 2))
    one = [
        pframe.marshal(C.Basic.Publish(routing_key="a"), 1),
        content_header(1, 3),
        raw(3, 1, b"one"),
    ]
    two = [
        pframe.marshal(C.Basic.Publish(routing_key="b"), 2),
        content_header(2, 3),
        raw(3, 2, b"two"),
    ]
    data = one[0] + two[0] + one[1] + HEARTBEAT_FRAME + two[1] + two[2] + one[2]
    events = c.send(data)
    assert [(e.channel, e.routing_key, e.body) for e in events] == [
        (2, "b", b"two"),
        (1, "a", b"one"),
    ]


PUB = pframe.marshal(C.Basic.Publish(routing_key="q"), 1)
QOS = pframe.marshal(C.Basic.Qos(), 1)
EXPECTED_HEADER = (
    "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
)
EXPECTED_BODY = "UNEXPECTED_FRAME - expected content body, got non content body frame instead"
EXPECTED_METHOD = "UNEXPECTED_FRAME - expected method frame, got non method frame instead"


@pytest.mark.parametrize(
    ("data", "text", "ids"),
    [
        (content_header(1, 3), EXPECTED_METHOD, (0, 0)),
        (raw(3, 1, b"abc"), EXPECTED_METHOD, (0, 0)),
        (PUB + raw(3, 1, b"abc"), EXPECTED_HEADER, (60, 40)),
        (PUB + QOS, EXPECTED_HEADER, (60, 40)),
        (PUB + PUB, EXPECTED_HEADER, (60, 40)),
        (PUB + pframe.marshal(C.Channel.Close(200, "", 0, 0), 1), EXPECTED_HEADER, (60, 40)),
        (PUB + content_header(1, 3) + QOS, EXPECTED_BODY, (60, 40)),
        (PUB + content_header(1, 3) + raw(3, 1, b"a") + QOS, EXPECTED_BODY, (60, 40)),
        (PUB + content_header(1, 3) + content_header(1, 3), EXPECTED_BODY, (60, 40)),
        (PUB + content_header(1, 3) + raw(3, 1, b"abcd"), EXPECTED_BODY, (60, 40)),
        (PUB + content_header(1, 3) + raw(3, 1, b"ab") + raw(3, 1, b"cd"), EXPECTED_BODY, (60, 40)),
        (PUB + content_header(1, 3, weight=5), EXPECTED_HEADER, (60, 40)),
        (
            PUB + content_header(1, 3, cls=50),
            "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead",
            (60, 40),
        ),
        (PUB + content_header(1, 0) + raw(3, 1, b""), EXPECTED_METHOD, (0, 0)),
        (PUB + raw(8, 1, b""), "UNEXPECTED_FRAME - type 8, all octets = <<>>", (0, 0)),
    ],
)
def test_content_out_of_order(client: Client, data: bytes, text: str, ids: tuple[int, int]) -> None:
    hard_error(client, data, 505, text, *ids)


def test_content_header_too_short(client: Client) -> None:
    hard_error(
        client,
        PUB + raw(2, 1, b"\x00\x3c\x00"),
        501,
        "FRAME_ERROR - type 2, all octets = <<0,60,0>>: unknown_frame",
    )


def test_message_over_max_size_is_a_channel_error() -> None:
    c = Client(max_message_size=10)
    c.handshake()
    [event] = c.send(publish(1, b"x" * 10))
    assert event.body == b"x" * 10
    text = "PRECONDITION_FAILED - message size 11 is larger than configured max size 10"
    # RabbitMQ 3.10 reads the whole body, then closes the channel (not the connection)
    assert c.send(PUB + content_header(1, 11) + raw(3, 1, b"x" * 5)) == []
    assert c.send(raw(3, 1, b"x" * 6)) == [ChannelError(1, 406, text, 60, 40)]
    assert c.received() == [channel_close_frame(1, 406, text, 60, 40)]
    assert c.method(1, C.Channel.CloseOk()) == [ChannelClosed(1, False, 406, text)]


# ---- hard errors ---------------------------------------------------------------------------


def test_oversize_frame(client: Client) -> None:
    hard_error(
        client,
        struct.pack(">BHI", 1, 1, 131073),
        501,
        "FRAME_ERROR - type 1, all octets = <<>>: {frame_too_large,131073,131064}",
    )


def test_bad_frame_end(client: Client) -> None:
    hard_error(
        client,
        raw(1, 1, b"\x00\x3c\x00\x0a", end=b"\x00"),
        501,
        "FRAME_ERROR - type 1, all octets = <<0,60,0,10>>: {invalid_frame_end_marker,0}",
    )


def test_unknown_method(client: Client) -> None:
    hard_error(
        client,
        raw(1, 1, b"\x00\x3c\x00\x63"),
        540,
        "NOT_IMPLEMENTED - unknown method {60,99}",
        60,
        99,
    )


def test_undecodable_method(client: Client) -> None:
    hard_error(
        client, raw(1, 1, b"\x00\x32\x00\x0a\x00"), 501, "FRAME_ERROR - cannot decode <<0>>", 50, 10
    )


def test_long_reply_texts_are_clipped(client: Client) -> None:
    events = client.send(raw(1, 1, b"\x00\x3c\x00\x50" + bytes(9) + bytes(range(200))))
    assert isinstance(events[-1], ConnectionClosed)
    [(_, _, args)] = client.received()
    assert len(args["reply_text"].encode()) == 255
    assert args["reply_text"].endswith("...")


# ---- heartbeats -----------------------------------------------------------------------------


def test_heartbeats() -> None:
    # RabbitMQ sends a heartbeat when it sent nothing for heartbeat/2 seconds, and gives
    # up on a client it heard nothing from for 2 * heartbeat seconds.
    c = Client()
    c.handshake(heartbeat=10)  # at t=1000
    assert c.conn.next_deadline() == 1005.0
    assert c.tick(4.5) == []
    assert c.received() == []
    assert c.tick(0.5) == []
    assert c.received() == ["heartbeat"]
    c.send(HEARTBEAT_FRAME)  # t=1005: the client's last sign of life
    assert c.tick(5.0) == []
    assert c.received() == ["heartbeat"]
    c.conn.send_method(1, C.Basic.QosOk())  # t=1010: sending anything resets our side
    assert c.tick(4.0) == []
    assert c.received() == [(1, "Basic.QosOk", {})]
    assert c.tick(10.5) == []  # t=1024.5
    assert c.received() == ["heartbeat"]
    assert c.tick(0.5) == [ConnectionLost("missed heartbeats from client, timeout: 10s")]
    assert c.conn.state is ConnectionState.CLOSED
    assert c.conn.next_deadline() is None


def test_heartbeat_zero_disables_both() -> None:
    c = Client(heartbeat=60)
    c.handshake(heartbeat=0)
    assert c.conn.next_deadline() is None
    assert c.tick(10_000) == []
    assert c.received() == []


# ---- closing ----------------------------------------------------------------------------------


def test_client_closes_the_connection(client: Client) -> None:
    events = client.method(0, C.Connection.Close(200, "Normal shutdown", 0, 0))
    assert events == [ConnectionClosed(200, "Normal shutdown", by_peer=True)]
    assert client.received() == [(0, "Connection.CloseOk", {})]
    assert client.method(1, C.Basic.Qos()) == []


def test_server_closes_the_connection(client: Client) -> None:
    client.conn.close(
        320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    )
    [close] = client.received()
    assert close[1] == "Connection.Close"
    assert close[2]["reply_code"] == 320
    assert not client.conn.send_method(1, C.Basic.QosOk())
    assert client.send(pframe.marshal(C.Basic.Qos(), 1) + publish(1, b"x")) == []
    events = client.method(0, C.Connection.CloseOk())
    assert events == [ConnectionClosed(320, close[2]["reply_text"], by_peer=False)]
    assert client.received() == []


def test_frame_error_while_closing_ends_at_once(client: Client) -> None:
    client.conn.close(320, "CONNECTION_FORCED - x")
    client.received()
    assert client.send(raw(9, 9, b"")) == [
        ConnectionClosed(320, "CONNECTION_FORCED - x", by_peer=False)
    ]
    assert client.received() == []  # no second connection.close


def test_server_close_crossing_client_close(client: Client) -> None:
    client.conn.close(320, "CONNECTION_FORCED - x")
    client.received()
    events = client.method(0, C.Connection.Close(200, "bye", 0, 0))
    assert events == [ConnectionClosed(320, "CONNECTION_FORCED - x", by_peer=False)]
    assert client.received() == [(0, "Connection.CloseOk", {})]


def test_close_ok_timeout(client: Client) -> None:
    client.conn.close(320, "CONNECTION_FORCED - x")
    assert client.tick(2.9) == []
    assert client.tick(0.2) == [ConnectionClosed(320, "CONNECTION_FORCED - x", by_peer=False)]


# ---- other server-initiated frames -------------------------------------------------------------


def test_send_deliver_uses_the_negotiated_frame_max() -> None:
    c = Client()
    c.handshake(frame_max=4096)
    body = b"y" * 5000
    assert c.conn.send_deliver(1, "ctag", 7, True, "ex", "rk", b"\x00\x00", body)
    frames = c.received()
    assert frames[0] == (
        1,
        "Basic.Deliver",
        {
            "consumer_tag": "ctag",
            "delivery_tag": 7,
            "redelivered": True,
            "exchange": "ex",
            "routing_key": "rk",
        },
    )
    assert [len(f[1].value) for f in frames[2:]] == [4088, 912]
    assert not c.conn.send_deliver(2, "ctag", 8, False, "", "q", b"\x00\x00", b"")  # not open


def test_send_content_and_ack(client: Client) -> None:
    assert client.conn.send_content(1, C.Basic.GetOk(3, False, "", "q", 0), b"\x00\x00", b"hi")
    assert client.conn.send_ack(1, 9, True)
    frames = client.received()
    assert [f[1] if isinstance(f[1], str) else type(f[1]).__name__ for f in frames] == [
        "Basic.GetOk",
        "ContentHeader",
        "ContentBody",
        "Basic.Ack",
    ]


def test_blocked_needs_the_capability() -> None:
    c = Client()
    c.handshake()
    assert c.conn.send_blocked("low on memory")
    assert not c.conn.send_blocked("again")
    assert c.conn.send_unblocked()
    assert c.received() == [
        (0, "Connection.Blocked", {"reason": "low on memory"}),
        (0, "Connection.Unblocked", {}),
    ]
    c = Client()
    c.handshake(caps={})
    assert not c.conn.send_blocked("low on memory")
    assert c.received() == []


def test_update_secret(client: Client) -> None:
    events = client.method(0, C.Connection.UpdateSecret(new_secret="token", reason="refresh"))
    assert events == [SecretUpdated("token", "refresh")]
    assert client.received() == [(0, "Connection.UpdateSecretOk", {})]


# ---- properties of the whole machine ----------------------------------------------------------


def _session() -> bytes:
    props = C.Basic.Properties(headers={"k": "v"})
    return (
        pframe.marshal(C.Channel.Open(), 2)
        + publish(1, b"a" * 300, props=props)
        + pframe.marshal(C.Basic.Ack(3), 1)
        + publish(2, b"", routing_key="z")
        + HEARTBEAT_FRAME
        + pframe.marshal(C.Queue.Declare(queue="q"), 2)
        + pframe.marshal(C.Channel.Close(200, "", 0, 0), 2)
        + pframe.marshal(C.Connection.Close(200, "bye", 0, 0), 0)
    )


def _describe(event: Any) -> Any:
    if isinstance(event, ChannelMethod) and not isinstance(event.method, AckMethod):
        return ("method", event.channel, event.method.name)
    return event


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=st.lists(st.integers(1, 60), max_size=80))
def test_chunked_session_equals_whole_session(cuts: list[int]) -> None:
    session = _session()
    whole = Client()
    whole.handshake()
    expected = [_describe(e) for e in whole.send(session)]
    expected_out = whole.conn.data_to_send()
    chunked = Client()
    chunked.handshake()
    got: list[Any] = []
    rest = session
    for size in cuts:
        got += [_describe(e) for e in chunked.send(rest[:size])]
        rest = rest[size:]
    got += [_describe(e) for e in chunked.send(rest)]
    assert got == expected
    assert chunked.conn.data_to_send() == expected_out
    assert expected[-1] == ConnectionClosed(200, "bye", by_peer=True)


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.binary(max_size=200), prefix=st.sampled_from([b"", PUB, PUB + content_header(1, 5)])
)
def test_garbage_never_raises(garbage: bytes, prefix: bytes) -> None:
    c = Client()
    c.handshake()
    events = c.send(prefix + garbage)
    closed = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closed) <= 1
    if closed:
        assert events[-1] is closed[0]
        assert c.conn.state is ConnectionState.CLOSED
    c.conn.data_to_send()


def test_protocol_package_imports_no_io() -> None:
    import ast
    import pathlib

    import node.protocol

    forbidden = {"anyio", "asyncio", "socket", "pysyncobj", "time", "trio", "selectors"}
    for path in pathlib.Path(node.protocol.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node_ in ast.walk(tree):
            if isinstance(node_, ast.Import):
                names = {alias.name.split(".")[0] for alias in node_.names}
            elif isinstance(node_, ast.ImportFrom):
                names = {(node_.module or "").split(".")[0]}
            else:
                continue
            assert not names & forbidden, f"{path.name} imports {names & forbidden}"


def _publish_variants() -> list[bytes]:
    """Publishes, well formed and not, for the whole-publish fast path."""
    pub1 = pframe.marshal(C.Basic.Publish(exchange="x", routing_key="k", mandatory=True), 1)
    body = b"b" * 40
    return [
        publish(1, body),
        publish(1, b""),
        publish(1, body, props=C.Basic.Properties(headers={"a": 1}, priority=3)),
        publish(3, body),  # channel 3 is not open
        publish(2, body),  # channel 2 is closed by the server, waiting for close-ok
        pub1 + content_header(1, 40) + raw(3, 1, body[:10]) + raw(3, 1, body[10:]),
        pub1 + content_header(1, 40) + raw(3, 1, body + b"!"),  # body longer than announced
        pub1 + content_header(1, 40, cls=50) + raw(3, 1, body),
        pub1 + content_header(1, 40, weight=1) + raw(3, 1, body),
        pub1 + content_header(2, 40) + raw(3, 1, body),  # header on another channel
        pub1 + content_header(1, 40) + raw(3, 2, body),  # body on another channel
        pub1 + content_header(1, 40, props=b"\x80\x00") + raw(3, 1, body),  # bad properties
        pub1 + content_header(1, 40) + raw(3, 1, body, end=b"\x00"),
        pub1 + content_header(1, 40)[:-1] + b"\x00" + raw(3, 1, body),
        pub1 + raw(2, 1, b"\x00\x3c\x00\x00") + raw(3, 1, body),  # header too short
        pub1 + content_header(1, 5000) + raw(3, 1, b"z" * 5000),  # over max_message_size
        pub1 + content_header(1, 4096) + raw(3, 1, b"z" * 4096),  # over frame_max
        pub1 + raw(8, 1, b"") + raw(3, 1, body),
        pframe.marshal(C.Basic.Ack(1), 1),
        HEARTBEAT_FRAME,
    ]


@settings(max_examples=150, deadline=None)
@given(picks=st.lists(st.integers(0, len(_publish_variants()) - 1), min_size=1, max_size=6))
def test_whole_publishes_equal_frame_by_frame(picks: list[int]) -> None:
    """Publishes whose three frames arrive in one read take a fast path; it must give the
    same events and bytes as frames that arrive one byte at a time (the general path)."""
    variants = _publish_variants()
    stream = b"".join(variants[i] for i in picks)

    def run(step: int) -> tuple[list[Any], bytes]:
        c = Client(max_message_size=4000)
        c.handshake(frame_max=4096, channels=(1, 2))
        c.conn.close_channel(2, 406, "PRECONDITION_FAILED - test")
        c.conn.data_to_send()
        events: list[Any] = []
        for start in range(0, len(stream), step):
            events += c.send(stream[start : start + step])
        return [_describe(e) for e in events], c.conn.data_to_send()

    assert run(len(stream)) == run(1)
