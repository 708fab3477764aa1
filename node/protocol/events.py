"""Events a `ServerConnection` hands to the I/O shell, one per `next_event()` call.

Rules: frozen, slotted value types; no behaviour. Imports pamqp (method objects travel inside
`ChannelMethod`) and `codec` (for `AckMethod`) only. The hot-path events have a fast
constructor beside them (same object, built by the slot descriptors directly: a frozen
dataclass's __init__ costs about 1.1 µs for seven fields, this about 0.4 µs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pamqp import base

from .codec import AckMethod, PeekedProperties


@dataclass(frozen=True, slots=True)
class LoginRequested:
    """Start-ok arrived. Answer with `accept_login()` or `refuse_login()`; no other frame
    is read until then. `password` is the raw response for mechanisms other than PLAIN and
    AMQPLAIN."""

    mechanism: str
    username: str
    password: str
    client_properties: dict[str, Any]


@dataclass(frozen=True, slots=True)
class VhostRequested:
    """connection.open arrived. Answer with `accept_vhost()` or `refuse_vhost()`."""

    vhost: str


@dataclass(frozen=True, slots=True)
class SecretUpdated:
    """connection.update-secret arrived (already answered with update-secret-ok)."""

    new_secret: str | bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    channel: int


@dataclass(frozen=True, slots=True)
class ChannelMethod:
    """A method for the channel layer: a pamqp method object, or the `AckMethod` fast-path
    event for basic.ack. Never a channel.* method, never a content-bearing method."""

    channel: int
    method: base.Frame | AckMethod


@dataclass(frozen=True, slots=True)
class ChannelContent:
    """A complete basic.publish: method, content header and body. `properties` is the raw
    property block; the connection has validated it (a malformed block closes the connection
    with 541, as RabbitMQ's channel crash does) and `peeked` holds what
    `codec.peek_properties` read from it: (delivery_mode, priority, expiration, headers)."""

    channel: int
    exchange: str
    routing_key: str
    mandatory: bool
    immediate: bool
    properties: bytes
    body: bytes
    peeked: PeekedProperties | None = field(default=None, compare=False)  # derived


_new = object.__new__
_set_method_channel, _set_method_method = (
    ChannelMethod.__dict__[n].__set__ for n in ChannelMethod.__slots__
)
(
    _set_channel,
    _set_exchange,
    _set_routing_key,
    _set_mandatory,
    _set_immediate,
    _set_properties,
    _set_body,
    _set_peeked,
) = (ChannelContent.__dict__[name].__set__ for name in ChannelContent.__slots__)


def channel_method(channel: int, method: base.Frame | AckMethod) -> ChannelMethod:
    """Fast `ChannelMethod(channel, method)`."""
    event: ChannelMethod = _new(ChannelMethod)
    _set_method_channel(event, channel)
    _set_method_method(event, method)
    return event


def channel_content(
    channel: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    immediate: bool,
    properties: bytes,
    body: bytes,
    peeked: PeekedProperties | None = None,
) -> ChannelContent:
    """Fast `ChannelContent(...)`, same arguments."""
    event: ChannelContent = _new(ChannelContent)
    _set_channel(event, channel)
    _set_exchange(event, exchange)
    _set_routing_key(event, routing_key)
    _set_mandatory(event, mandatory)
    _set_immediate(event, immediate)
    _set_properties(event, properties)
    _set_body(event, body)
    _set_peeked(event, peeked)
    return event


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The channel id is free again: the client closed it (`by_peer`, close-ok already
    sent) or it answered our channel.close with close-ok."""

    channel: int
    by_peer: bool = True
    reply_code: int = 200
    reply_text: str = ""


@dataclass(frozen=True, slots=True)
class ChannelError:
    """The protocol layer itself closed a channel with channel.close (e.g. a message over
    the size limit). A `ChannelClosed` follows when the client's close-ok arrives."""

    channel: int
    reply_code: int
    reply_text: str
    class_id: int
    method_id: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over: flush `data_to_send()` and close the socket. `linger` is the
    delay RabbitMQ waits before closing a connection that failed its handshake (seconds,
    0 means close at once)."""

    reply_code: int
    reply_text: str
    by_peer: bool
    linger: float = 0.0


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The connection died without a close handshake (heartbeat or handshake timeout):
    close the socket."""

    reason: str


Event = (
    LoginRequested
    | VhostRequested
    | SecretUpdated
    | ChannelOpened
    | ChannelMethod
    | ChannelContent
    | ChannelClosed
    | ChannelError
    | ConnectionClosed
    | ConnectionLost
)
