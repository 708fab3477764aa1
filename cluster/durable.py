"""Durable queues' logs: batching what this node must replicate into Raft entries.

Persistent messages for durable queues, and their leaders' settles, go through the Raft
log (`Persist` and `Settle` commands; the broker model collects them, see
`Broker.to_log` and `Broker.settled`). This module turns them into log entries:

Rules:
- Group commit. Everything collected during one turn of the event loop goes into one
  entry (flushed with `call_soon`), cut earlier at ENTRY_BYTES; at most MAX_IN_FLIGHT
  entries are in flight, the rest waits and grows into bigger entries meanwhile. Each
  entry is fsynced once on every node that stores it (cluster/journal.py), so a confirm
  costs one fsync per batch, not per message.
- A publisher's confirm (a `ticket`) is resolved when the entry holding its messages has
  been applied on this node: committed, so on disk on a majority. Refused (the queue's
  reject-publish limit) or not committed in time (no quorum) means a nack; never silence.
- Settles are idempotent: an entry that failed is retried with the next one, so every
  acked message leaves every log eventually; a message whose settle is lost with its
  leader is delivered again, flagged redelivered (at least once).
- One id per entry, on its first command: the state machine skips a whole entry that
  was applied before (a retried submission), so no message is logged twice by a retry.
- Runs on the event loop only. Never raises into a client's connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import Histogram

from cluster import commands as c
from node.broker.types import Message, Outcome, Routed

if TYPE_CHECKING:
    from cluster.node import ClusterNode
    from cluster.state import StateMachine

# An entry is cut at about this many bytes of commands (a burst makes several entries).
ENTRY_BYTES: Final = 512 * 1024
# The largest entry (cluster/raft.py refuses bigger ones): one entry holds a message
# whole, so a bigger persistent message for a durable queue is refused (a nack), never
# silently kept in memory only.
MAX_ENTRY_BYTES: Final = 16 * 1024 * 1024 + 4096
# Entries submitted and not yet applied here; more wait (and grow) in the open batch.
MAX_IN_FLIGHT: Final = 16
SETTLE_CHUNK: Final = 32_768  # rids per Settle command
# Messages per entry (the group commit's batch size), as /metrics shows them.
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_COMMAND_OVERHEAD: Final = 96  # bytes of a Persist beyond its body, properties and names

Ticket = Callable[[bool], None]


@dataclass(slots=True)
class _Batch:
    persists: list[c.Persist] = field(default_factory=list)
    settles: dict[tuple[str, str], tuple[list[int], list[int]]] = field(default_factory=dict)
    settle_count: int = 0
    size: int = 0
    # (first persist index, end index, callback): a publish's persists and its confirm.
    tickets: list[tuple[int, int, Ticket]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persists or self.settles)


class DurableLog:
    """This node's writer of durable-queue log entries (see the module rules)."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node
        self._open = _Batch()
        self._last = (0, 0)  # the persists the latest collect() added to the open batch
        self._in_flight = 0
        self._scheduled = False
        self._waiting: list[_Batch] = []  # cut batches not yet submitted
        self.entries = 0
        self.messages = 0
        self.failures = 0
        self.batch_size = Histogram(
            "warren_durable_batch_messages",
            "Persistent messages per durable log entry written by this node",
            registry=None,
            buckets=BATCH_BUCKETS,
        )

    # ---- collecting ---------------------------------------------------------------------

    def collect(self, state: StateMachine) -> int:
        """Take what the model collected since the last call; the number of messages."""
        if not state.durable_pending():
            self._last = (len(self._open.persists), len(self._open.persists))
            return 0
        to_log, settled = state.take_durable()
        if to_log:
            size = sum(_size(queue.name, m) for queue, m in to_log)
            if self._open and self._open.size + size > ENTRY_BYTES:
                self._cut()  # (a message bigger than an entry goes alone, and fails alone)
            batch = self._open
            start = len(batch.persists)
            for queue, message in to_log:
                batch.persists.append(_persist(queue.vhost, queue.name, message))
            batch.size += size
            self._last = (start, len(batch.persists))
        else:
            self._last = (len(self._open.persists), len(self._open.persists))
        for queue, (gone, returned) in settled.items():
            self._add_settles((queue.vhost, queue.name), gone, returned)
        self._schedule()
        return len(to_log)

    def _add_settles(self, key: tuple[str, str], gone: list[int], returned: list[int]) -> None:
        batch = self._open
        held = batch.settles.get(key)
        if held is None:
            batch.settles[key] = (list(gone), list(returned))
        else:
            held[0].extend(gone)
            held[1].extend(returned)
        batch.settle_count += len(gone) + len(returned)
        batch.size += 8 * (len(gone) + len(returned))

    def ticket(self, state: StateMachine, done: Ticket) -> bool:
        """Call `done(ok)` once the messages the latest command logged are committed (or
        failed). False (and `done` is not kept) when that command logged nothing."""
        self.collect(state)
        start, end = self._last
        if start == end:
            return False
        self._open.tickets.append((start, end, done))
        self._last = (end, end)
        return True

    # ---- flushing -----------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _cut(self) -> None:
        if self._open:
            self._waiting.append(self._open)
        self._open = _Batch()
        self._last = (0, 0)

    def _flush(self) -> None:
        self._scheduled = False
        self._cut()
        while self._waiting and self._in_flight < MAX_IN_FLIGHT:
            batch = self._waiting.pop(0)
            self._in_flight += 1
            self._node.spawn(self._submit, batch)

    async def _submit(self, batch: _Batch) -> None:
        ok = False
        outcomes: list[Outcome | None] = []
        try:
            for i, commands in enumerate(_entries(batch)):
                result = await self._node.log_entry(commands)
                if i == 0:
                    if result is None:
                        break
                    outcomes = result
                    ok = True
                elif result is None:
                    break
        finally:
            self._in_flight -= 1
            self.entries += 1
            self.messages += len(batch.persists)
            if batch.persists:
                self.batch_size.observe(len(batch.persists))
            if not ok:
                self.failures += 1
                self._retry_settles(batch)
            self._resolve(batch, outcomes if ok else None)
            if self._waiting or self._open:
                self._schedule()

    def _retry_settles(self, batch: _Batch) -> None:
        """Settles are idempotent: a failed entry's go again with the next one."""
        for key, (gone, returned) in batch.settles.items():
            self._add_settles(key, gone, returned)

    def _resolve(self, batch: _Batch, outcomes: list[Outcome | None] | None) -> None:
        for start, end, done in batch.tickets:
            ok = outcomes is not None and all(_taken(outcomes[i]) for i in range(start, end))
            try:
                done(ok)
            except Exception:
                self._node.log.exception("durable.ticket_failed")
        self._node.shell.dispatch()


def _taken(outcome: Outcome | None) -> bool:
    # None: the entry was applied before (a retried submission): its messages are logged.
    return outcome is None or not (type(outcome.reply) is Routed and outcome.reply.rejected)


def _size(queue: str, message: Message) -> int:
    return (
        len(message.body)
        + len(message.properties)
        + len(queue)
        + len(message.exchange)
        + len(message.routing_key)
        + _COMMAND_OVERHEAD
    )


def _persist(vhost: str, queue: str, m: Message) -> c.Persist:
    return c.new_persist(
        m.published_ms, vhost, queue, m.exchange, m.routing_key, m.properties, m.props,
        m.body, m.redelivered, m.delivery_count,
    )  # fmt: skip


def _entries(batch: _Batch) -> list[list[Any]]:
    """The batch as log entries: the persists (and their tickets) in the first, settles
    chunked after them, cut at ENTRY_BYTES."""
    entries: list[list[Any]] = []
    current: list[Any] = list(batch.persists)
    size = batch.size - 8 * batch.settle_count
    for (vhost, queue), (gone, returned) in batch.settles.items():
        for i in range(0, max(len(gone), len(returned)), SETTLE_CHUNK):
            part_gone = tuple(gone[i : i + SETTLE_CHUNK])
            part_returned = tuple(returned[i : i + SETTLE_CHUNK])
            cost = 8 * (len(part_gone) + len(part_returned)) + _COMMAND_OVERHEAD
            if current and size + cost > ENTRY_BYTES:
                entries.append(current)
                current, size = [], 0
            current.append(
                c.Settle(
                    now_ms=0,
                    vhost=vhost,
                    queue=queue,
                    gone=part_gone,
                    returned=part_returned,
                )
            )
            size += cost
    if current:
        entries.append(current)
    return entries
