"""The server side of one AMQP 0-9-1 connection, as a state machine with no I/O (like h11).

This file owns the connection's state: `ConnectionState` plus the `_TRANSITIONS` table,
keyed by (state, input). Every change of state goes through `_transition`; an input the
table does not list is our caller's bug (`LocalProtocolError`). What the *peer* may send in
each state is decided by the frame handlers, which raise `ProtocolError` for anything else.

Rules:
- Bytes in (`receive_data`), events out (`next_event`), bytes out (`data_to_send`). Time
  is an argument (`now`), never read from a clock. No sockets, no asyncio, no anyio.
- A peer's mistake never raises out of `receive_data`/`next_event`: it becomes the
  connection.close RabbitMQ 3.10 would send (same code, text and ids) and a
  `ConnectionClosed` event. Before tune-ok RabbitMQ sends nothing on a handshake error and
  drops the socket after 3 s (`ConnectionClosed.linger`); we do the same.
- Frames are assembled per channel number like RabbitMQ's command assembler: content
  frames are matched to their method before the channel's state is looked at, so content
  errors win over channel errors. Bodies are copied once (joined only when split).
- Channel bookkeeping lives here: open, close (both directions), flow, channel_max, and
  dropping everything but close/close-ok on a channel we closed until the client's
  close-ok. Everything else on an open channel goes to the shell as `ChannelMethod` or
  `ChannelContent`.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pamqp import base, commands

from .codec import (
    AckMethod,
    ContentBody,
    ContentHeader,
    DeliverWriter,
    Frame,
    FrameDecoder,
    Heartbeat,
    MethodFrame,
    ProtocolHeader,
    PublishMethod,
    ack_method,
    body_at,
    encode_ack,
    encode_content,
    encode_method,
    parse_ack,
    parse_content_header,
    parse_publish,
    peek_properties,
)
from .constants import (
    ACCESS_REFUSED,
    AMQP_HEADER,
    CHANNEL_ERROR,
    CLOSE_OK_TIMEOUT,
    DEFAULT_CHANNEL_MAX,
    DEFAULT_FRAME_MAX,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE_SIZE,
    FRAME_BODY,
    FRAME_HEADER,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    HANDSHAKE_ERROR_DELAY,
    HANDSHAKE_TIMEOUT,
    INTERNAL_ERROR,
    NOT_ALLOWED,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    REPLY_SUCCESS,
    UNEXPECTED_FRAME,
)
from .errors import (
    BadProtocolHeader,
    LocalProtocolError,
    ProtocolError,
    clip_reply_text,
    login_refused_text,
    unexpected_frame,
    unimplemented_method,
)
from .events import (
    ChannelClosed,
    ChannelContent,
    ChannelError,
    ChannelMethod,
    ChannelOpened,
    ConnectionClosed,
    ConnectionLost,
    Event,
    LoginRequested,
    SecretUpdated,
    VhostRequested,
    channel_content,
    channel_method,
)
from .fields import FieldError, decode_table
from .methods import (
    CLIENT_CHANNEL_METHODS,
    CONTENT_METHODS,
    AccessRequest,
    AccessRequestOk,
    encode_arguments,
    method_ids,
)

__all__ = [
    "ChannelClosed",
    "ChannelContent",
    "ChannelError",
    "ChannelMethod",
    "ChannelOpened",
    "ConnectionClosed",
    "ConnectionLost",
    "ConnectionState",
    "Event",
    "LoginRequested",
    "SecretUpdated",
    "ServerConnection",
    "VhostRequested",
]

log = logging.getLogger(__name__)
_U32 = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">BHI")
_HEADER_FRAME_HEAD = struct.Struct(">BHIHHQ")  # frame head + class, weight, body size
_FRAME_END = 0xCE
_ACK_FRAME_HEAD = struct.Struct(">BHII")  # frame head + method id of a basic.ack frame
_ACK_FRAME_SIZE = 21  # 7 head + 4 method id + 8 delivery tag + 1 bits + frame end


class ConnectionState(enum.Enum):
    AWAIT_HEADER = "awaiting protocol header"
    STARTING = "starting"  # connection.start sent, waiting for start-ok
    AUTHENTICATING = "authenticating"  # LoginRequested out, waiting for the shell
    TUNING = "tuning"  # connection.tune sent, waiting for tune-ok
    OPENING = "opening"  # waiting for connection.open
    CHECKING_VHOST = "checking vhost"  # VhostRequested out, waiting for the shell
    OPEN = "running"
    CLOSING = "closing"  # our connection.close sent, waiting for close-ok
    CLOSED = "closed"


class _In(enum.Enum):
    """What moves a connection from one state to the next."""

    PROTOCOL_HEADER = enum.auto()
    START_OK = enum.auto()
    LOGIN_ACCEPTED = enum.auto()
    TUNE_OK = enum.auto()
    OPEN = enum.auto()
    VHOST_ACCEPTED = enum.auto()
    SEND_CLOSE = enum.auto()  # we queue connection.close and wait for close-ok
    CLOSE_DONE = enum.auto()  # close handshake finished (close-ok, or crossing close)
    ABORT = enum.auto()  # over at once: hard error, peer's close, timeout


_S = ConnectionState
_TRANSITIONS: Mapping[tuple[ConnectionState, _In], ConnectionState] = MappingProxyType(
    {
        (_S.AWAIT_HEADER, _In.PROTOCOL_HEADER): _S.STARTING,
        (_S.STARTING, _In.START_OK): _S.AUTHENTICATING,
        (_S.AUTHENTICATING, _In.LOGIN_ACCEPTED): _S.TUNING,
        (_S.AUTHENTICATING, _In.SEND_CLOSE): _S.CLOSING,
        (_S.TUNING, _In.TUNE_OK): _S.OPENING,
        (_S.OPENING, _In.OPEN): _S.CHECKING_VHOST,
        (_S.OPENING, _In.SEND_CLOSE): _S.CLOSING,
        (_S.CHECKING_VHOST, _In.VHOST_ACCEPTED): _S.OPEN,
        (_S.CHECKING_VHOST, _In.SEND_CLOSE): _S.CLOSING,
        (_S.OPEN, _In.SEND_CLOSE): _S.CLOSING,
        (_S.CLOSING, _In.CLOSE_DONE): _S.CLOSED,
        **{(state, _In.ABORT): _S.CLOSED for state in ConnectionState if state is not _S.CLOSED},
    }
)

# States in which no frame is read: the shell has to answer first (or it is over).
_PAUSED = frozenset({_S.AUTHENTICATING, _S.CHECKING_VHOST, _S.CLOSED})
# States before tune-ok: RabbitMQ answers any error there by dropping the socket silently.
_SILENT = frozenset({_S.AWAIT_HEADER, _S.STARTING, _S.AUTHENTICATING, _S.TUNING})
# States in which heartbeats run (RabbitMQ starts them at tune-ok).
_HEARTBEATING = frozenset({_S.OPENING, _S.CHECKING_VHOST, _S.OPEN, _S.CLOSING})

_OPEN = ConnectionState.OPEN
_BASIC_PUBLISH = 0x003C0028
_BASIC_ACK = 0x003C0050
_CHANNEL_OPEN = 0x0014000A
_CHANNEL_FLOW = 0x00140014
_CHANNEL_CLOSE = 0x00140028
_CHANNEL_CLOSE_OK = 0x00140029
_CONNECTION_CLOSE = 0x000A0032
_CONNECTION_CLOSE_OK = 0x000A0033
_UPDATE_SECRET = 0x000A0046

# Assembly phases of one channel's pending content.
_WANT_HEADER = 1
_WANT_BODY = 2


class _Pending:
    """Content being assembled on one channel: the method, then header, then bodies.
    Only a basic.publish keeps its arguments; other content-bearing methods from a client
    are assembled and then dropped, as RabbitMQ does."""

    __slots__ = (
        "bits",
        "body_size",
        "class_id",
        "exchange",
        "method_id",
        "parts",
        "phase",
        "props",
        "received",
        "routing_key",
    )

    def __init__(
        self,
        class_id: int,
        method_id: int,
        exchange: str = "",
        routing_key: str = "",
        bits: int = 0,
    ) -> None:
        self.class_id = class_id
        self.method_id = method_id
        self.exchange = exchange
        self.routing_key = routing_key
        self.bits = bits
        self.phase = _WANT_HEADER
        self.props = b""
        self.body_size = 0
        self.received = 0
        self.parts: list[bytes] | None = []


def _raw_payload(frame: Frame) -> tuple[int, bytes]:
    """(frame type, payload) of a decoded frame, for RabbitMQ's "all octets" texts."""
    if isinstance(frame, MethodFrame):
        return 1, encode_arguments(frame.method)
    if isinstance(frame, PublishMethod):
        ex = frame.exchange.encode()
        rk = frame.routing_key.encode()
        bits = int(frame.mandatory) | int(frame.immediate) << 1
        return 1, b"\x00\x3c\x00\x28\x00\x00" + bytes((len(ex),)) + ex + bytes(
            (len(rk),)
        ) + rk + bytes((bits,))
    if isinstance(frame, AckMethod):
        return 1, b"\x00\x3c\x00\x50" + frame.delivery_tag.to_bytes(8, "big") + bytes(
            (int(frame.multiple),)
        )
    if isinstance(frame, ContentHeader):
        head = frame.class_id.to_bytes(2, "big") + frame.weight.to_bytes(2, "big")
        return 2, head + frame.body_size.to_bytes(8, "big") + frame.properties
    if isinstance(frame, ContentBody):
        return 3, frame.payload
    return 8, b""


def _unexpected_method(state: ConnectionState, class_id: int, method_id: int) -> ProtocolError:
    return ProtocolError(
        CHANNEL_ERROR,
        f"CHANNEL_ERROR - unexpected method in connection state {state.value}",
        class_id,
        method_id,
    )


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class ServerConnection:
    """One client connection, server side. See the module docstring for the rules."""

    def __init__(
        self,
        *,
        server_properties: dict[str, Any],
        channel_max: int = DEFAULT_CHANNEL_MAX,
        frame_max: int = DEFAULT_FRAME_MAX,
        heartbeat: int = DEFAULT_HEARTBEAT,
        mechanisms: tuple[str, ...] = ("PLAIN", "AMQPLAIN"),
        now: float,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        if frame_max and frame_max < FRAME_MIN_SIZE:
            raise ValueError(f"frame_max must be at least {FRAME_MIN_SIZE} (or 0)")
        self.server_properties = server_properties
        self.mechanisms = tuple(mechanisms)
        self.max_message_size = max_message_size
        # Our limits, proposed in connection.tune ...
        self._channel_max_limit = channel_max
        self._frame_max_limit = frame_max
        self._heartbeat_proposal = heartbeat
        # ... and the values in force (negotiated at tune-ok).
        self.channel_max = channel_max
        self.frame_max = frame_max
        self.heartbeat = 0
        self.state = ConnectionState.AWAIT_HEADER
        self.client_properties: dict[str, Any] = {}
        self.mechanism = ""
        self.vhost = ""
        self._decoder = FrameDecoder(FRAME_MIN_SIZE, expect_protocol_header=True)
        self._out = bytearray()
        self._deliver = DeliverWriter()
        self._events: deque[Event] = deque()
        self._channels: dict[int, bool] = {}  # open channel -> True, closing -> False
        self._pending: dict[int, _Pending] = {}
        self._channel_close_reply: dict[int, tuple[int, str]] = {}
        self._created = now
        self._clock = now
        self._last_received = now
        self._last_sent = now
        self._close_deadline = 0.0
        self._close_reply: tuple[int, str] = (REPLY_SUCCESS, "")
        self._blocked = False

    # ---- State -----------------------------------------------------------------------------

    def _transition(self, event: _In) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LocalProtocolError(
                f"{event.name} is not allowed in state {self.state.name}"
            ) from None

    @property
    def open_channels(self) -> frozenset[int]:
        """Channel ids in use (open, or closed by us and waiting for close-ok)."""
        return frozenset(self._channels)

    @property
    def client_capabilities(self) -> dict[str, Any]:
        caps = self.client_properties.get("capabilities")
        return caps if isinstance(caps, dict) else {}

    # ---- Bytes in, events out ----------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Take bytes read from the socket (b"" is ignored; EOF is the shell's business)."""
        self._clock = now
        self._last_received = now
        if self.state is not ConnectionState.CLOSED and data:
            self._decoder.feed(data)

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes (or an answer from the shell) are needed."""
        events = self._events
        decoder = self._decoder
        while not events:
            state = self.state
            try:
                if state is _OPEN:
                    raw = decoder.next_raw()
                    if raw is None:
                        return None
                    self._handle_raw(*raw)
                elif state in _PAUSED:
                    return None
                else:
                    frame = decoder.next_frame()
                    if frame is None:
                        return None
                    self._handle_handshake(frame)
            except ProtocolError as exc:
                self._fail(exc)
            except Exception:  # a bug of ours must not take the node down
                log.exception("internal error while handling AMQP input")
                self._fail(ProtocolError(INTERNAL_ERROR, "INTERNAL_ERROR"))
        return events.popleft()

    def next_single_ack(self, channel: int) -> int | None:
        """The delivery tag of the next frame when, with no event pending, it is a whole
        single-tag basic.ack (multiple=false) on open `channel`: the frame is consumed, as
        `next_event` would have (no event is made). Otherwise None and nothing consumed.
        Lets the shell apply a run of consecutive acks as one command."""
        if self._events or self.state is not _OPEN or self._channels.get(channel) is not True:
            return None
        decoder = self._decoder
        buf = decoder.buffer
        pos = len(buf) - decoder.buffered
        if (
            len(buf) - pos < _ACK_FRAME_SIZE
            or channel in self._pending
            or _ACK_FRAME_HEAD.unpack_from(buf, pos) != (FRAME_METHOD, channel, 13, _BASIC_ACK)
            or buf[pos + _ACK_FRAME_SIZE - 1] != _FRAME_END
            or buf[pos + _ACK_FRAME_SIZE - 2] & 1
        ):
            return None
        raw = decoder.next_raw()
        assert raw is not None
        tag: int = parse_ack(buf, raw[2] + 4, raw[3])[0]
        return tag

    def data_to_send(self) -> bytes:
        """Everything queued for the socket since the last call."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def _write(self, data: bytes) -> None:
        self._out += data
        self._last_sent = self._clock

    def _send(self, channel: int, method: base.Frame) -> None:
        self._write(encode_method(channel, method))

    # ---- Time ----------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Let time pass: heartbeats, handshake and close-ok timeouts."""
        self._clock = now
        state = self.state
        if state is ConnectionState.CLOSED:
            return
        if state is ConnectionState.CLOSING and now >= self._close_deadline:
            code, text = self._close_reply
            self._finish(ConnectionClosed(code, text, by_peer=False))
            return
        if state in _HEARTBEATING:
            heartbeat = self.heartbeat
            if heartbeat:
                if now - self._last_received >= 2 * heartbeat:
                    self._lose(f"missed heartbeats from client, timeout: {heartbeat}s")
                    return
                if now - self._last_sent >= heartbeat / 2:
                    self._write(b"\x08\x00\x00\x00\x00\x00\x00\xce")
        if (
            state is not ConnectionState.OPEN
            and state is not ConnectionState.CLOSING
            and now - self._created >= HANDSHAKE_TIMEOUT
        ):
            self._lose("handshake timeout")

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing until more input)."""
        state = self.state
        if state is ConnectionState.CLOSED:
            return None
        deadlines: list[float] = []
        if state is ConnectionState.CLOSING:
            deadlines.append(self._close_deadline)
        if state in _HEARTBEATING and self.heartbeat:
            deadlines.append(self._last_sent + self.heartbeat / 2)
            deadlines.append(self._last_received + 2 * self.heartbeat)
        if state is not ConnectionState.OPEN and state is not ConnectionState.CLOSING:
            deadlines.append(self._created + HANDSHAKE_TIMEOUT)
        return min(deadlines) if deadlines else None

    # ---- Ending --------------------------------------------------------------------------------

    def _finish(self, event: Event) -> None:
        self._transition(_In.CLOSE_DONE if self.state is ConnectionState.CLOSING else _In.ABORT)
        self._events.append(event)
        self._pending.clear()
        self._channels.clear()

    def _lose(self, reason: str) -> None:
        self._transition(_In.ABORT)
        self._events.append(ConnectionLost(reason))
        self._pending.clear()
        self._channels.clear()

    def _fail(self, exc: ProtocolError) -> None:
        """Turn the peer's protocol error into what RabbitMQ does in this state."""
        state = self.state
        if state is ConnectionState.CLOSED:
            return
        if isinstance(exc, BadProtocolHeader):
            self._write(AMQP_HEADER)
            self._finish(ConnectionClosed(exc.reply_code, exc.reply_text, by_peer=False))
        elif state in _SILENT:
            # before tune-ok: no connection.close, the socket is dropped after a pause
            self._finish(
                ConnectionClosed(
                    exc.reply_code, exc.reply_text, by_peer=False, linger=HANDSHAKE_ERROR_DELAY
                )
            )
        elif state is ConnectionState.CLOSING:
            code, text = self._close_reply
            self._finish(ConnectionClosed(code, text, by_peer=False))
        else:
            text = clip_reply_text(exc.reply_text)
            self._send(
                0, commands.Connection.Close(exc.reply_code, text, exc.class_id, exc.method_id)
            )
            self._finish(ConnectionClosed(exc.reply_code, text, by_peer=False))

    # ---- Handshake -------------------------------------------------------------------------

    def _handle_handshake(self, frame: Frame) -> None:
        state = self.state
        if state is ConnectionState.CLOSING:
            self._handle_closing(frame)
            return
        if isinstance(frame, Heartbeat):
            if frame.channel != 0:
                raise unexpected_frame(8, b"")
            return
        if state is ConnectionState.AWAIT_HEADER:
            assert type(frame) is ProtocolHeader
            self._transition(_In.PROTOCOL_HEADER)
            self._send(
                0,
                commands.Connection.Start(
                    version_major=0,
                    version_minor=9,
                    server_properties=self.server_properties,
                    mechanisms=" ".join(self.mechanisms),
                    locales="en_US",
                ),
            )
            return
        method = frame.method if isinstance(frame, MethodFrame) else None
        if state is ConnectionState.STARTING:
            if frame.channel == 0 and isinstance(method, commands.Connection.StartOk):
                self._start_ok(method)
                return
            raise ProtocolError(UNEXPECTED_FRAME, "UNEXPECTED_FRAME - expected connection.start-ok")
        if state is ConnectionState.TUNING:
            if frame.channel == 0 and isinstance(method, commands.Connection.TuneOk):
                self._tune_ok(method)
                return
            raise ProtocolError(UNEXPECTED_FRAME, "UNEXPECTED_FRAME - expected connection.tune-ok")
        # OPENING: errors from here on are answered with connection.close
        if frame.channel != 0:
            raise unexpected_frame(*_raw_payload(frame))
        if isinstance(method, commands.Connection.Open):
            self.vhost = _as_text(method.virtual_host)
            self._transition(_In.OPEN)
            self._events.append(VhostRequested(self.vhost))
            return
        if method is not None:
            raise _unexpected_method(state, *method_ids(method))
        if isinstance(frame, PublishMethod | AckMethod):
            raise _unexpected_method(state, frame.class_id, frame.method_id)
        raise unexpected_frame(*_raw_payload(frame))

    def _start_ok(self, method: commands.Connection.StartOk) -> None:
        props = method.client_properties
        self.client_properties = dict(props) if isinstance(props, dict) else {}
        mechanism = _as_text(method.mechanism)
        self.mechanism = mechanism
        if mechanism not in self.mechanisms:
            raise ProtocolError(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - unsupported authentication mechanism '{mechanism}'",
            )
        response = method.response
        raw = response.encode("utf-8") if isinstance(response, str) else bytes(response or b"")
        if mechanism == "PLAIN":
            username, password = _parse_plain(raw)
        elif mechanism == "AMQPLAIN":
            username, password = _parse_amqplain(raw)
        else:
            username, password = "", raw.decode("utf-8", "replace")
        self._transition(_In.START_OK)
        self._events.append(LoginRequested(mechanism, username, password, self.client_properties))

    def _tune_ok(self, method: commands.Connection.TuneOk) -> None:
        channel_max = method.channel_max or 0
        frame_max = method.frame_max or 0
        limit = self._frame_max_limit
        if limit and (frame_max == 0 or frame_max > limit):
            raise ProtocolError(
                NOT_ALLOWED, f"NOT_ALLOWED - frame_max={frame_max} > {limit} max size"
            )
        if frame_max and frame_max < FRAME_MIN_SIZE:
            raise ProtocolError(
                NOT_ALLOWED, f"NOT_ALLOWED - frame_max={frame_max} < {FRAME_MIN_SIZE} min size"
            )
        limit = self._channel_max_limit
        if limit and (channel_max == 0 or channel_max > limit):
            raise ProtocolError(
                NOT_ALLOWED, f"NOT_ALLOWED - channel_max={channel_max} > {limit} max size"
            )
        self.channel_max = channel_max
        self.frame_max = frame_max
        self.heartbeat = method.heartbeat or 0
        self._decoder.frame_max = frame_max
        self._last_received = self._last_sent = self._clock
        self._transition(_In.TUNE_OK)

    # ---- The shell's answers -------------------------------------------------------------

    def accept_login(self) -> None:
        """The credentials are good: queue connection.tune."""
        self._transition(_In.LOGIN_ACCEPTED)
        self._send(
            0,
            commands.Connection.Tune(
                channel_max=self._channel_max_limit,
                frame_max=self._frame_max_limit,
                heartbeat=self._heartbeat_proposal,
            ),
        )

    def refuse_login(self, text: str | None = None) -> None:
        """The credentials are bad. Clients that advertise authentication_failure_close get
        connection.close 403 (and `ConnectionClosed` after their close-ok); others are
        dropped without a word after RabbitMQ's 3 s pause (`ConnectionClosed.linger`)."""
        if self.state is not ConnectionState.AUTHENTICATING:
            raise LocalProtocolError(f"refuse_login in state {self.state.name}")
        text = clip_reply_text(text or login_refused_text(self.mechanism))
        if self.client_capabilities.get("authentication_failure_close") is True:
            self._send_close(ACCESS_REFUSED, text, 0, 0)
        else:
            self._finish(
                ConnectionClosed(ACCESS_REFUSED, text, by_peer=False, linger=HANDSHAKE_ERROR_DELAY)
            )

    def accept_vhost(self) -> None:
        """The vhost exists and the user may use it: queue connection.open-ok."""
        self._transition(_In.VHOST_ACCEPTED)
        self._send(0, commands.Connection.OpenOk())

    def refuse_vhost(self, reply_code: int, reply_text: str) -> None:
        """Queue connection.close (class 10, method 40) and end, e.g.
        refuse_vhost(530, "NOT_ALLOWED - vhost x not found")."""
        if self.state is not ConnectionState.CHECKING_VHOST:
            raise LocalProtocolError(f"refuse_vhost in state {self.state.name}")
        text = clip_reply_text(reply_text)
        self._send(0, commands.Connection.Close(reply_code, text, 10, 40))
        self._finish(ConnectionClosed(reply_code, text, by_peer=False))

    # ---- Running ------------------------------------------------------------------------------

    def _handle_raw(self, frame_type: int, channel: int, start: int, end: int) -> None:
        """The hot path: publishes and their content frames are handled straight from the
        decoder's buffer; everything else (and every error) goes through frame objects."""
        if channel:
            buf = self._decoder.buffer
            if frame_type == FRAME_BODY:
                pending = self._pending.get(channel)
                if pending is not None and pending.phase == _WANT_BODY:
                    self._body(channel, pending, body_at(buf, start, end))
                    return
            elif frame_type == FRAME_HEADER:
                pending = self._pending.get(channel)
                if pending is not None and pending.phase == _WANT_HEADER:
                    class_id, weight, body_size, props = parse_content_header(buf, start, end)
                    self._header(channel, pending, class_id, weight, body_size, props)
                    return
            elif frame_type == FRAME_METHOD and end - start >= 4 and channel not in self._pending:
                method_id = _U32.unpack_from(buf, start)[0]
                if method_id == _BASIC_PUBLISH:
                    exchange, routing_key, bits = parse_publish(buf, start + 4, end)
                    if not self._whole_publish(channel, exchange, routing_key, bits):
                        self._pending[channel] = _Pending(60, 40, exchange, routing_key, bits)
                    return
                if method_id == _BASIC_ACK and self._channels.get(channel) is True:
                    tag, multiple = parse_ack(buf, start + 4, end)
                    self._events.append(channel_method(channel, ack_method(channel, tag, multiple)))
                    return
        self._handle_running(self._decoder.frame_at(frame_type, channel, start, end))

    def _whole_publish(self, channel: int, exchange: str, routing_key: str, bits: int) -> bool:
        """The hot path's hot path: when the content header and the one body frame of the
        basic.publish just parsed are already in the buffer, on the same open channel, and
        nothing about them is unusual, take all three at once. Returns False (nothing
        consumed) otherwise; the frame-by-frame path then raises every error it would."""
        decoder = self._decoder
        buf = decoder.buffer
        pos = decoder._pos
        size_all = len(buf)
        if size_all - pos < 19 or self._channels.get(channel) is not True:
            return False
        frame_type, ch, size, class_id, weight, body_size = _HEADER_FRAME_HEAD.unpack_from(buf, pos)
        frame_max = self.frame_max
        head_end = pos + 7 + size
        if (
            frame_type != FRAME_HEADER
            or ch != channel
            or size < 12
            or (size > frame_max and frame_max)
            or head_end >= size_all
            or buf[head_end] != _FRAME_END
            or class_id != 60
            or weight
            or body_size > self.max_message_size
        ):
            return False
        if body_size:
            start = head_end + 1
            if size_all - start < 7:
                return False
            frame_type, ch, size = _FRAME_HEAD.unpack_from(buf, start)
            start += 7
            end = start + size
            if (
                frame_type != FRAME_BODY
                or ch != channel
                or size != body_size
                or (size > frame_max and frame_max)
                or end >= size_all
                or buf[end] != _FRAME_END
            ):
                return False
            decoder._pos = end + 1
            body = body_at(buf, start, end)
        else:
            decoder._pos = head_end + 1
            body = b""
        props = bytes(buf[pos + 19 : head_end])
        peeked = peek_properties(props)  # PropertiesError: 541, like RabbitMQ
        self._events.append(
            channel_content(
                channel, exchange, routing_key, bits & 1 == 1, bits & 2 == 2, props, body, peeked
            )
        )
        return True

    def _body(self, channel: int, pending: _Pending, payload: bytes) -> None:
        received = pending.received + len(payload)
        if received > pending.body_size:
            raise _expected_body(pending)
        pending.received = received
        parts = pending.parts
        if parts is not None and payload:
            parts.append(payload)
        if received == pending.body_size:
            del self._pending[channel]
            self._complete(channel, pending)

    def _header(
        self,
        channel: int,
        pending: _Pending,
        class_id: int,
        weight: int,
        body_size: int,
        props: bytes,
    ) -> None:
        if class_id != pending.class_id:
            raise ProtocolError(
                UNEXPECTED_FRAME,
                f"UNEXPECTED_FRAME - expected content header for class {pending.class_id}, "
                f"got one for class {class_id} instead",
                pending.class_id,
                pending.method_id,
            )
        if weight != 0:
            raise _expected_header(pending)
        pending.props = props
        pending.body_size = body_size
        if body_size > self.max_message_size:
            pending.parts = None  # over the limit: count the bytes, keep none
        if body_size == 0:
            del self._pending[channel]
            self._complete(channel, pending)
        else:
            pending.phase = _WANT_BODY

    def _handle_running(self, frame: Frame) -> None:
        channel = frame.channel
        if channel == 0:
            self._handle_channel_zero(frame)
            return
        pending = self._pending.get(channel)
        if isinstance(frame, ContentBody):
            if pending is None:
                raise _expected_method_frame()
            if pending.phase != _WANT_BODY:
                raise _expected_header(pending)
            self._body(channel, pending, frame.payload)
            return
        if isinstance(frame, ContentHeader):
            if pending is None:
                raise _expected_method_frame()
            if pending.phase != _WANT_HEADER:
                raise _expected_body(pending)
            self._header(
                channel, pending, frame.class_id, frame.weight, frame.body_size, frame.properties
            )
            return
        if pending is not None:
            if isinstance(frame, Heartbeat):
                raise unexpected_frame(8, b"")
            if pending.phase == _WANT_HEADER:
                raise _expected_header(pending)
            raise _expected_body(pending)
        if isinstance(frame, PublishMethod):
            bits = int(frame.mandatory) | int(frame.immediate) << 1
            self._pending[channel] = _Pending(60, 40, frame.exchange, frame.routing_key, bits)
            return
        if isinstance(frame, AckMethod):
            self._command(channel, frame, 60, 80)
            return
        if not isinstance(frame, MethodFrame):  # a heartbeat on a channel
            raise unexpected_frame(*_raw_payload(frame))
        method = frame.method
        index = method.index
        if index in CONTENT_METHODS:
            self._pending[channel] = _Pending(index >> 16, index & 0xFFFF)
            return
        self._command(channel, method, index >> 16, index & 0xFFFF)

    def _complete(self, channel: int, pending: _Pending) -> None:
        """A content-bearing method with all its content."""
        state = self._channels.get(channel)
        if state is None:
            raise ProtocolError(
                CHANNEL_ERROR,
                "CHANNEL_ERROR - expected 'channel.open'",
                pending.class_id,
                pending.method_id,
            )
        if not state:  # we closed the channel: dropped like everything else
            return
        if pending.method_id != 40:
            return  # basic.deliver/return/get-ok from a client: RabbitMQ ignores them
        if pending.parts is None:
            text = (
                f"PRECONDITION_FAILED - message size {pending.body_size} is larger than "
                f"configured max size {self.max_message_size}"
            )
            self._events.append(ChannelError(channel, PRECONDITION_FAILED, text, 60, 40))
            self.close_channel(channel, PRECONDITION_FAILED, text, 60, 40)
            return
        peeked = peek_properties(pending.props)  # PropertiesError: 541, like RabbitMQ
        parts = pending.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        bits = pending.bits
        self._events.append(
            channel_content(
                channel,
                pending.exchange,
                pending.routing_key,
                bits & 1 == 1,
                bits & 2 == 2,
                pending.props,
                body,
                peeked,
            )
        )

    def _command(
        self, channel: int, method: base.Frame | AckMethod, class_id: int, method_id: int
    ) -> None:
        """A complete method without content on channel != 0."""
        state = self._channels.get(channel)
        index = (class_id << 16) | method_id
        if state is None:
            if index == _CHANNEL_OPEN:
                self._open_channel(channel)
                return
            raise ProtocolError(
                CHANNEL_ERROR, "CHANNEL_ERROR - expected 'channel.open'", class_id, method_id
            )
        if index == _CHANNEL_OPEN:
            raise ProtocolError(
                CHANNEL_ERROR, "CHANNEL_ERROR - second 'channel.open' seen", class_id, method_id
            )
        if not state:  # we closed it: only close and close-ok count
            if index == _CHANNEL_CLOSE_OK:
                del self._channels[channel]
                code, text = self._channel_close_reply.pop(channel, (REPLY_SUCCESS, ""))
                self._events.append(ChannelClosed(channel, False, code, text))
            elif index == _CHANNEL_CLOSE:
                self._send(channel, commands.Channel.CloseOk())
            return
        if isinstance(method, AckMethod) or index in CLIENT_CHANNEL_METHODS:
            if isinstance(method, AccessRequest):
                self._send(channel, AccessRequestOk(ticket=1))
                return
            self._events.append(channel_method(channel, method))
            return
        if index == _CHANNEL_CLOSE:
            assert isinstance(method, commands.Channel.Close)
            del self._channels[channel]
            self._send(channel, commands.Channel.CloseOk())
            self._events.append(
                ChannelClosed(channel, True, method.reply_code or 0, _as_text(method.reply_text))
            )
            return
        if index == _CHANNEL_FLOW:
            assert isinstance(method, commands.Channel.Flow)
            if not method.active:
                raise ProtocolError(NOT_IMPLEMENTED, "NOT_IMPLEMENTED - active=false", 20, 20)
            self._send(channel, commands.Channel.FlowOk(active=True))
            return
        raise unimplemented_method(class_id, method_id)

    def _open_channel(self, channel: int) -> None:
        limit = self.channel_max
        count = len(self._channels)
        if limit and count >= limit:
            raise ProtocolError(
                NOT_ALLOWED,
                f"NOT_ALLOWED - number of channels opened ({count}) has reached the "
                f"negotiated channel_max ({limit})",
            )
        self._channels[channel] = True
        ok = commands.Channel.OpenOk.__new__(commands.Channel.OpenOk)
        ok.channel_id = ""  # RabbitMQ sends an empty longstr; pamqp's default is "0"
        self._send(channel, ok)
        self._events.append(ChannelOpened(channel))

    def _handle_channel_zero(self, frame: Frame) -> None:
        if isinstance(frame, Heartbeat):
            return
        if isinstance(frame, PublishMethod | AckMethod):
            raise _unexpected_method(self.state, frame.class_id, frame.method_id)
        if not isinstance(frame, MethodFrame):
            raise unexpected_frame(*_raw_payload(frame))
        method = frame.method
        index = method.index
        if index == _CONNECTION_CLOSE:
            assert isinstance(method, commands.Connection.Close)
            self._send(0, commands.Connection.CloseOk())
            self._finish(
                ConnectionClosed(method.reply_code or 0, _as_text(method.reply_text), by_peer=True)
            )
            return
        if index == _UPDATE_SECRET:
            assert isinstance(method, commands.Connection.UpdateSecret)
            self._send(0, commands.Connection.UpdateSecretOk())
            self._events.append(SecretUpdated(method.new_secret or "", _as_text(method.reason)))
            return
        raise _unexpected_method(self.state, index >> 16, index & 0xFFFF)

    def _handle_closing(self, frame: Frame) -> None:
        """We sent connection.close: only close-ok (or a crossing close) matters now."""
        if frame.channel != 0 or not isinstance(frame, MethodFrame):
            return
        index = frame.method.index
        if index in (_CONNECTION_CLOSE_OK, _CONNECTION_CLOSE):
            if index == _CONNECTION_CLOSE:
                self._send(0, commands.Connection.CloseOk())
            code, text = self._close_reply
            self._finish(ConnectionClosed(code, text, by_peer=False))

    # ---- Server-initiated -----------------------------------------------------------------

    def _can_send(self, channel: int) -> bool:
        if self.state is not ConnectionState.OPEN:
            return False
        return channel == 0 or self._channels.get(channel) is True

    def send_method(self, channel: int, method: base.Frame) -> bool:
        """Queue a method; False (and nothing queued) if the channel is not open. A
        channel.close goes through `close_channel`, a connection.close through `close`."""
        if isinstance(method, commands.Channel.Close):
            return self.close_channel(
                channel,
                method.reply_code or 0,
                _as_text(method.reply_text),
                method.class_id or 0,
                method.method_id or 0,
            )
        if isinstance(method, commands.Connection.Close) and channel == 0:
            self.close(
                method.reply_code or 0,
                _as_text(method.reply_text),
                method.class_id or 0,
                method.method_id or 0,
            )
            return True
        if not self._can_send(channel):
            return False
        self._write(encode_method(channel, method))
        return True

    def send_content(
        self, channel: int, method: base.Frame, properties: bytes, body: bytes
    ) -> bool:
        """Queue a content-bearing method (basic.get-ok, basic.return, ...) with its content."""
        if not self._can_send(channel):
            return False
        self._write(encode_content(channel, method, properties, body, self.frame_max))
        return True

    def send_deliver(
        self,
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        properties: bytes,
        body: bytes,
    ) -> bool:
        """Queue basic.deliver + content (fast path, split to the negotiated frame_max)."""
        if self.state is not ConnectionState.OPEN or self._channels.get(channel) is not True:
            return False
        self._deliver.write(
            self._out,
            channel,
            consumer_tag,
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            properties,
            body,
            self.frame_max,
        )
        self._last_sent = self._clock
        return True

    def send_ack(self, channel: int, delivery_tag: int, multiple: bool) -> bool:
        """Queue basic.ack (publisher confirm), fast path."""
        if self.state is not ConnectionState.OPEN or self._channels.get(channel) is not True:
            return False
        self._out += encode_ack(channel, delivery_tag, multiple)
        self._last_sent = self._clock
        return True

    def close_channel(
        self, channel: int, reply_code: int, reply_text: str, class_id: int = 0, method_id: int = 0
    ) -> bool:
        """Queue channel.close. Until the client's close-ok every frame on the channel but
        close/close-ok is dropped; then `ChannelClosed(by_peer=False)` and the id is free.
        Does nothing (False) if the channel is not open."""
        if not self._can_send(channel) or channel == 0:
            return False
        text = clip_reply_text(reply_text)
        self._channels[channel] = False
        self._channel_close_reply[channel] = (reply_code, text)
        self._send(channel, commands.Channel.Close(reply_code, text, class_id, method_id))
        return True

    def close(
        self, reply_code: int, reply_text: str, class_id: int = 0, method_id: int = 0
    ) -> None:
        """Queue connection.close and wait for close-ok (or CLOSE_OK_TIMEOUT, see `tick`);
        then `ConnectionClosed(by_peer=False)`. Before tune-ok the connection just ends."""
        state = self.state
        if state is ConnectionState.CLOSED or state is ConnectionState.CLOSING:
            return
        text = clip_reply_text(reply_text)
        if state in _SILENT:
            self._finish(ConnectionClosed(reply_code, text, by_peer=False))
            return
        self._send_close(reply_code, text, class_id, method_id)

    def _send_close(self, reply_code: int, text: str, class_id: int, method_id: int) -> None:
        self._transition(_In.SEND_CLOSE)
        self._send(0, commands.Connection.Close(reply_code, text, class_id, method_id))
        self._close_reply = (reply_code, text)
        self._close_deadline = self._clock + CLOSE_OK_TIMEOUT
        self._pending.clear()

    def send_blocked(self, reason: str) -> bool:
        """connection.blocked, if the client advertised capabilities.connection.blocked."""
        if (
            self.state is not ConnectionState.OPEN
            or self._blocked
            or self.client_capabilities.get("connection.blocked") is not True
        ):
            return False
        self._blocked = True
        self._send(0, commands.Connection.Blocked(reason=reason))
        return True

    def send_unblocked(self) -> bool:
        """connection.unblocked, if connection.blocked was sent."""
        if self.state is not ConnectionState.OPEN or not self._blocked:
            return False
        self._blocked = False
        self._send(0, commands.Connection.Unblocked())
        return True


# ---- Helpers -------------------------------------------------------------------------------


def _expected_method_frame() -> ProtocolError:
    return ProtocolError(
        UNEXPECTED_FRAME, "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
    )


def _expected_header(pending: _Pending) -> ProtocolError:
    return ProtocolError(
        UNEXPECTED_FRAME,
        f"UNEXPECTED_FRAME - expected content header for class {pending.class_id}, "
        "got non content header frame instead",
        pending.class_id,
        pending.method_id,
    )


def _expected_body(pending: _Pending) -> ProtocolError:
    return ProtocolError(
        UNEXPECTED_FRAME,
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
        pending.class_id,
        pending.method_id,
    )


def _parse_plain(raw: bytes) -> tuple[str, str]:
    """RabbitMQ's PLAIN: exactly b"\\0user\\0password" (no authorisation id)."""
    parts = raw.split(b"\x00")
    if len(parts) != 3 or parts[0]:
        raise ProtocolError(ACCESS_REFUSED, "ACCESS_REFUSED - invalid PLAIN response")
    return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")


def _parse_amqplain(raw: bytes) -> tuple[str, str]:
    """AMQPLAIN: a field table without its length prefix, with LOGIN and PASSWORD."""
    try:
        table, _ = decode_table(len(raw).to_bytes(4, "big") + raw, 0, len(raw) + 4)
    except FieldError:
        raise ProtocolError(ACCESS_REFUSED, "ACCESS_REFUSED - invalid AMQPLAIN response") from None
    login = table.get("LOGIN")
    password = table.get("PASSWORD")
    if login is None or password is None:
        raise ProtocolError(
            ACCESS_REFUSED, "ACCESS_REFUSED - AMQPLAIN response lacks LOGIN or PASSWORD"
        )
    return _as_text(login), _as_text(password)
