"""AMQP 0-9-1 constants: reply codes, frame types, limits.

Rules: plain int/float/bytes constants (and one read-only mapping), each limit with the
reason beside it. Imports only the standard library. Values that RabbitMQ fixes (3.10
behaviour, checked against a reference broker) say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# ---- Reply codes (AMQP 0-9-1 spec, section "constants") -------------------------------
REPLY_SUCCESS: Final = 200
CONTENT_TOO_LARGE: Final = 311
NO_ROUTE: Final = 312
NO_CONSUMERS: Final = 313
CONNECTION_FORCED: Final = 320
INVALID_PATH: Final = 402
ACCESS_REFUSED: Final = 403
NOT_FOUND: Final = 404
RESOURCE_LOCKED: Final = 405
PRECONDITION_FAILED: Final = 406
FRAME_ERROR: Final = 501
SYNTAX_ERROR: Final = 502
COMMAND_INVALID: Final = 503
CHANNEL_ERROR: Final = 504
UNEXPECTED_FRAME: Final = 505
RESOURCE_ERROR: Final = 506
NOT_ALLOWED: Final = 530
NOT_IMPLEMENTED: Final = 540
INTERNAL_ERROR: Final = 541

# The symbolic name RabbitMQ puts in front of every reply text ("NOT_FOUND - no queue ...").
REPLY_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        REPLY_SUCCESS: "REPLY_SUCCESS",
        CONTENT_TOO_LARGE: "CONTENT_TOO_LARGE",
        NO_ROUTE: "NO_ROUTE",
        NO_CONSUMERS: "NO_CONSUMERS",
        CONNECTION_FORCED: "CONNECTION_FORCED",
        INVALID_PATH: "INVALID_PATH",
        ACCESS_REFUSED: "ACCESS_REFUSED",
        NOT_FOUND: "NOT_FOUND",
        RESOURCE_LOCKED: "RESOURCE_LOCKED",
        PRECONDITION_FAILED: "PRECONDITION_FAILED",
        FRAME_ERROR: "FRAME_ERROR",
        SYNTAX_ERROR: "SYNTAX_ERROR",
        COMMAND_INVALID: "COMMAND_INVALID",
        CHANNEL_ERROR: "CHANNEL_ERROR",
        UNEXPECTED_FRAME: "UNEXPECTED_FRAME",
        RESOURCE_ERROR: "RESOURCE_ERROR",
        NOT_ALLOWED: "NOT_ALLOWED",
        NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
        INTERNAL_ERROR: "INTERNAL_ERROR",
    }
)

# Soft errors close only the channel; every other error code closes the connection.
SOFT_ERRORS: Final = frozenset(
    {
        CONTENT_TOO_LARGE,
        NO_ROUTE,
        NO_CONSUMERS,
        ACCESS_REFUSED,
        NOT_FOUND,
        RESOURCE_LOCKED,
        PRECONDITION_FAILED,
    }
)

# ---- Framing ------------------------------------------------------------------------------
AMQP_HEADER: Final = b"AMQP\x00\x00\x09\x01"
# RabbitMQ also accepts the pre-0-9-1 style header for 0-9-1 and answers it as 0-9-1.
AMQP_HEADER_ALT: Final = b"AMQP\x01\x01\x00\x09"

FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
FRAME_HEARTBEAT: Final = 8
FRAME_END: Final = 0xCE
FRAME_HEADER_SIZE: Final = 7  # type (1) + channel (2) + payload size (4)
FRAME_OVERHEAD: Final = 8  # header + the frame-end octet: payload room is frame_max - 8

# ---- Limits ---------------------------------------------------------------------------------
# The spec's minimum frame size; it is also the frame_max in force before tune-ok arrives
# (RabbitMQ rejects a 4300-byte start-ok) and the smallest frame_max a client may ask for.
FRAME_MIN_SIZE: Final = 4096
# RabbitMQ's default frame_max: big enough that a typical message is one body frame.
DEFAULT_FRAME_MAX: Final = 131072
# RabbitMQ's default channel_max (2047: leaves the Erlang process count bounded).
DEFAULT_CHANNEL_MAX: Final = 2047
# RabbitMQ's default heartbeat proposal, seconds; the client's tune-ok value is what counts.
DEFAULT_HEARTBEAT: Final = 60
# RabbitMQ 3.x max_message_size default (128 MiB): larger bodies are a channel error 406.
DEFAULT_MAX_MESSAGE_SIZE: Final = 134217728
# A reply text is a shortstr: RabbitMQ cuts longer texts to 252 bytes plus "...".
REPLY_TEXT_MAX: Final = 255
# RabbitMQ waits this long before dropping a connection that failed its handshake (a client
# cannot hammer the auth backend); after sending connection.close it waits about as long for
# close-ok before giving up.
HANDSHAKE_ERROR_DELAY: Final = 3.0
CLOSE_OK_TIMEOUT: Final = 3.0
# RabbitMQ's handshake_timeout: the whole handshake (header to open-ok) must fit in it.
HANDSHAKE_TIMEOUT: Final = 10.0
# Lower and upper bounds of a tune-ok channel_max (RabbitMQ refuses 0 when it has a limit).
CHANNEL_MIN: Final = 1
