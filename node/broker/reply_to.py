"""Direct reply-to (`amq.rabbitmq.reply-to`): RPC replies routed to a channel, no queue.

Rules (RabbitMQ 3.x, observed on 3.10):
- A channel consumes the pseudo-queue `amq.rabbitmq.reply-to` in no-ack mode (406 "reply
  consumer cannot acknowledge" otherwise; 406 "reply consumer already set" for a second).
- Its requests carry `reply_to = amq.rabbitmq.reply-to`, which the channel layer rewrites to
  `amq.rabbitmq.reply-to.<key>` (406 "fast reply consumer does not exist" without a
  consumer). The key is chosen by the channel layer (random, unguessable) and travels in
  the Consume command, so applying stays deterministic.
- A publish to the default exchange with that routing key is delivered straight to the
  consumer. RabbitMQ quirk kept: a mandatory reply is delivered AND returned (312).
- An unknown or cancelled key is unroutable.
- Declaring the pseudo-queue answers message_count 0, consumer_count 1 and creates nothing.
Pure: imports only the broker's own modules.
"""

from __future__ import annotations

import base64
import binascii

from node.broker.types import AmqpError, ChannelRef

REPLY_QUEUE = "amq.rabbitmq.reply-to"
REPLY_PREFIX = REPLY_QUEUE + "."
_CONSUME = (60, 20)
_PUBLISH = (60, 40)


def _precondition(text: str, ids: tuple[int, int]) -> AmqpError:
    return AmqpError(406, f"PRECONDITION_FAILED - {text}", ids[0], ids[1])


CANNOT_ACK = _precondition("reply consumer cannot acknowledge", _CONSUME)
ALREADY_SET = _precondition("reply consumer already set", _CONSUME)
NO_CONSUMER = _precondition("fast reply consumer does not exist", _PUBLISH)


def node_suffix(node: str) -> str:
    """In a cluster, a reply key ends with "." and its node's name (url-safe base64), so a
    reply published on any node finds the node of the requesting channel."""
    return "." + base64.urlsafe_b64encode(node.encode()).decode().rstrip("=")


def reply_node(routing_key: str) -> str | None:
    """The node named by a reply address's key, if it names one."""
    _, dot, token = routing_key[len(REPLY_PREFIX) :].rpartition(".")
    if not dot or not token:
        return None
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class DirectReply:
    """The reply consumers of one broker: key → (channel, consumer tag)."""

    __slots__ = ("_by_channel", "_by_key")

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[ChannelRef, str]] = {}
        self._by_channel: dict[ChannelRef, str] = {}

    def consume(self, ref: ChannelRef, tag: str, key: str, *, no_ack: bool) -> AmqpError | None:
        if not no_ack:
            return CANNOT_ACK
        if ref in self._by_channel:
            return ALREADY_SET
        self._by_key[key] = (ref, tag)
        self._by_channel[ref] = key
        return None

    def address(self, ref: ChannelRef) -> str | None:
        """The reply-to address of the channel's reply consumer, if it has one."""
        key = self._by_channel.get(ref)
        return None if key is None else REPLY_PREFIX + key

    def target(self, routing_key: str) -> tuple[ChannelRef, str] | None:
        return self._by_key.get(routing_key[len(REPLY_PREFIX) :])

    def cancel(self, ref: ChannelRef, tag: str) -> bool:
        key = self._by_channel.get(ref)
        if key is None or self._by_key[key][1] != tag:
            return False
        del self._by_channel[ref]
        del self._by_key[key]
        return True

    def close_channel(self, ref: ChannelRef) -> None:
        key = self._by_channel.pop(ref, None)
        if key is not None:
            del self._by_key[key]
