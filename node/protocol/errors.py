"""Protocol errors, and the reply texts RabbitMQ puts in them.

Rules: a `ProtocolError` is always the peer's fault and carries what goes into the
connection.close we answer with (code, text, class id, method id). A `LocalProtocolError`
is our own caller's fault (the I/O shell used the API out of order) and is a bug, never sent.
Reply texts follow RabbitMQ 3.10 word for word, including its Erlang term formatting of
frame octets (checked against a reference broker with raw sockets). Imports only constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .constants import (
    ACCESS_REFUSED,
    COMMAND_INVALID,
    FRAME_ERROR,
    INTERNAL_ERROR,
    REPLY_NAMES,
    REPLY_TEXT_MAX,
    UNEXPECTED_FRAME,
)


class ProtocolError(Exception):
    """A connection-level error caused by the peer: answer with connection.close."""

    def __init__(
        self, reply_code: int, reply_text: str, class_id: int = 0, method_id: int = 0
    ) -> None:
        super().__init__(reply_code, reply_text, class_id, method_id)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.class_id = class_id
        self.method_id = method_id

    def __str__(self) -> str:
        return f"{self.reply_code} {self.reply_text} ({self.class_id}, {self.method_id})"


class BadProtocolHeader(ProtocolError):
    """The first 8 bytes were not an AMQP 0-9-1 header. The server answers with
    `AMQP_HEADER` and closes the socket, sending no connection.close."""

    def __init__(self, received: bytes) -> None:
        super().__init__(FRAME_ERROR, f"FRAME_ERROR - bad protocol header {erl_p(received)}")
        self.received = received


class PropertiesError(ProtocolError):
    """A content header's property block does not decode. RabbitMQ's channel crashes on
    it, which the client sees as connection.close 541 INTERNAL_ERROR."""

    def __init__(self, detail: str) -> None:
        super().__init__(INTERNAL_ERROR, "INTERNAL_ERROR")
        self.detail = detail


class LocalProtocolError(Exception):
    """Our caller used the connection API in a state where that call makes no sense."""


# ---- Reply text helpers -------------------------------------------------------------------


def reply_text(code: int, explanation: str) -> str:
    """RabbitMQ's "NAME - explanation" reply text."""
    return f"{REPLY_NAMES.get(code, 'INTERNAL_ERROR')} - {explanation}"


def clip_reply_text(text: str) -> str:
    """Cut a reply text to fit a shortstr the way RabbitMQ does (252 bytes + "...")."""
    raw = text.encode("utf-8")
    if len(raw) <= REPLY_TEXT_MAX:
        return text
    return raw[: REPLY_TEXT_MAX - 3].decode("utf-8", "ignore") + "..."


_ESCAPES: Mapping[int, str] = MappingProxyType(
    {
        0x22: '\\"',
        0x5C: "\\\\",
        0x0A: "\\n",
        0x0D: "\\r",
        0x09: "\\t",
        0x0B: "\\v",
        0x08: "\\b",
        0x0C: "\\f",
        0x1B: "\\e",
    }
)


def erl_w(data: bytes) -> str:
    """An Erlang binary as `~w` prints it: <<0,1,2>>."""
    return "<<" + ",".join(map(str, data)) + ">>"


def erl_p(data: bytes) -> str:
    """An Erlang binary as `~p` prints it: <<"text">> when printable, else <<0,1,2>>.

    Erlang also counts Latin-1 letters (160-255) as printable and would put them in the
    text raw; we print those binaries as numbers so that the reply text stays UTF-8.
    Erlang's line wrapping of long terms is not reproduced."""
    if not data:
        return "<<>>"
    parts: list[str] = []
    for byte in data:
        if 32 <= byte <= 126 and byte not in (0x22, 0x5C):
            parts.append(chr(byte))
        elif byte in _ESCAPES:
            parts.append(_ESCAPES[byte])
        else:
            return erl_w(data)
    return '<<"' + "".join(parts) + '">>'


def _snippet(payload: bytes) -> str:
    if len(payload) <= 16:
        return f"all octets = {erl_p(payload)}"
    return f"first 16 octets = {erl_p(payload[:16])}"


def frame_error(frame_type: int, payload: bytes, reason: str) -> ProtocolError:
    """501 FRAME_ERROR about one frame: "type 1, all octets = <<...>>: reason"."""
    return ProtocolError(
        FRAME_ERROR, f"FRAME_ERROR - type {frame_type}, {_snippet(payload)}: {reason}"
    )


def frame_too_large(frame_type: int, size: int, frame_max: int) -> ProtocolError:
    """RabbitMQ reports the payload room (frame_max - 8) although it admits up to frame_max."""
    return ProtocolError(
        FRAME_ERROR,
        f"FRAME_ERROR - type {frame_type}, all octets = <<>>: "
        f"{{frame_too_large,{size},{frame_max - 8}}}",
    )


def unexpected_frame(frame_type: int, payload: bytes) -> ProtocolError:
    """505 about a frame on a channel where no frame of that kind may come."""
    return ProtocolError(
        UNEXPECTED_FRAME, f"UNEXPECTED_FRAME - type {frame_type}, {_snippet(payload)}"
    )


def cannot_decode(class_id: int, method_id: int, args: bytes) -> ProtocolError:
    """501 for method arguments that do not parse (short, long, or trailing bytes)."""
    return ProtocolError(
        FRAME_ERROR, f"FRAME_ERROR - cannot decode {erl_w(args)}", class_id, method_id
    )


def malformed_utf8() -> ProtocolError:
    """501 for a method's shortstr argument that is not UTF-8 (RabbitMQ omits the ids)."""
    return ProtocolError(FRAME_ERROR, "FRAME_ERROR - Malformed UTF-8 in shortstr")


def unimplemented_method(class_id: int, method_id: int) -> ProtocolError:
    """503 for a method a client may not send (server-to-client methods, *-ok replies)."""
    return ProtocolError(
        COMMAND_INVALID, "COMMAND_INVALID - unimplemented method", class_id, method_id
    )


def login_refused_text(mechanism: str) -> str:
    """The text RabbitMQ sends (with authentication_failure_close) for a failed login."""
    return reply_text(
        ACCESS_REFUSED,
        f"Login was refused using authentication mechanism {mechanism}. "
        "For details see the broker logfile.",
    )
