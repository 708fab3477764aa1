"""What one node counts as it serves clients: the numbers behind `/metrics` and the
management API's message_stats.

Rules: plain integer attributes bumped on the event loop (an attribute add is the whole
cost on the message path; nothing here locks, allocates or formats); every count is
taken on the node the client is connected to, once per client-visible event, so summing
the nodes of a cluster gives the cluster's totals, as rabbitmq_prometheus's global
counters do. Latencies are sampled (one publish in flight per channel is timed), never
timed per message. Readers (the Prometheus collector, the management API) only read.
This module imports nothing from the broker, the protocol or the cluster.
"""

from __future__ import annotations

import time
from typing import Final

from prometheus_client import Histogram

# Confirm latency buckets (seconds): a single node confirms in well under a millisecond,
# a cluster's fsynced group commit in tens of milliseconds.
CONFIRM_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
# A rate (per second) is the change of a counter over about this long.
RATE_WINDOW_S: Final = 5.0

# The counters, in the order `snapshot()` lists them.
COUNTERS: Final = (
    "received",
    "received_confirm",
    "routed",
    "unroutable_dropped",
    "unroutable_returned",
    "confirmed",
    "nacked",
    "delivered_consume_auto_ack",
    "delivered_consume_manual_ack",
    "delivered_get_auto_ack",
    "delivered_get_manual_ack",
    "get_empty",
    "redelivered",
    "acknowledged",
    "connections_opened",
    "connections_closed",
    "channels_opened",
    "channels_closed",
    "queues_declared",
    "queues_created",
    "queues_deleted",
)


class NodeStats:
    """One node's counters (see the module rules). Attribute names are COUNTERS."""

    __slots__ = (*COUNTERS, "_rate_at", "_rate_base", "_rates", "confirm_latency")

    def __init__(self) -> None:
        self.received = 0  # basic.publish received from clients
        self.received_confirm = 0  # ... of them on channels in confirm mode
        self.routed = 0  # publishes routed to at least one queue
        self.unroutable_dropped = 0  # routed nowhere, not mandatory: dropped
        self.unroutable_returned = 0  # routed nowhere, mandatory: basic.return
        self.confirmed = 0  # basic.ack sent to publishers (messages, not frames)
        self.nacked = 0  # basic.nack sent to publishers
        self.delivered_consume_auto_ack = 0  # basic.deliver to no-ack consumers
        self.delivered_consume_manual_ack = 0  # basic.deliver to acking consumers
        self.delivered_get_auto_ack = 0  # basic.get-ok, no-ack
        self.delivered_get_manual_ack = 0  # basic.get-ok, to be acked
        self.get_empty = 0  # basic.get-empty
        self.redelivered = 0  # deliveries (and get-oks) flagged redelivered
        self.acknowledged = 0  # messages acked by clients (a multiple ack counts each)
        self.connections_opened = 0
        self.connections_closed = 0
        self.channels_opened = 0
        self.channels_closed = 0
        self.queues_declared = 0  # queue.declare-ok sent (passive ones included)
        self.queues_created = 0  # ... of them that created the queue
        self.queues_deleted = 0  # queue.delete-ok sent
        # Publish to confirm, sampled: Channel keeps one timed publish in flight.
        self.confirm_latency = Histogram(
            "warren_confirm_latency_seconds",
            "Time from a publish to its confirm (sampled: one publish in flight per channel)",
            registry=None,
            buckets=CONFIRM_BUCKETS,
        )
        self._rate_at = time.monotonic()
        self._rate_base = self.snapshot()
        self._rates: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)

    @property
    def delivered(self) -> int:
        """Every basic.deliver and basic.get-ok (RabbitMQ's messages_delivered_total)."""
        return (
            self.delivered_consume_auto_ack
            + self.delivered_consume_manual_ack
            + self.delivered_get_auto_ack
            + self.delivered_get_manual_ack
        )

    def deliver(self, no_ack: bool, redelivered: bool) -> None:
        """A basic.deliver sent to a consumer."""
        if no_ack:
            self.delivered_consume_auto_ack += 1
        else:
            self.delivered_consume_manual_ack += 1
        if redelivered:
            self.redelivered += 1

    def get(self, no_ack: bool, redelivered: bool) -> None:
        """A basic.get-ok sent."""
        if no_ack:
            self.delivered_get_auto_ack += 1
        else:
            self.delivered_get_manual_ack += 1
        if redelivered:
            self.redelivered += 1

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def rates(self, now: float | None = None) -> dict[str, float]:
        """Per-second rates of every counter over the latest RATE_WINDOW_S (computed when
        asked: the window moves on when a reader comes after it has passed)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._rate_at
        if elapsed >= RATE_WINDOW_S:
            current = self.snapshot()
            self._rates = {
                name: (current[name] - self._rate_base[name]) / elapsed for name in COUNTERS
            }
            self._rate_base = current
            self._rate_at = now
        return self._rates
