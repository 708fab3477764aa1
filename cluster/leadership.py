"""Raft leadership follows the durable load.

Why: one Raft log carries every durable queue's messages and settles. A persistent
message for a queue led by node Q is logged by Q; when Q does not lead Raft, its entry
travels Q -> Raft leader (pysyncobj forwards it) -> followers -> Raft leader, and the
commit comes back to Q with the next append: one more hop and one more wait before the
confirm. With Q leading Raft too, that hop and wait are gone (bench_durable, one
producer with 256 confirms in flight: 8,200-8,600 confirmed msg/s with the Raft leader
elsewhere, 10,200-10,500 with it on Q). RabbitMQ gets the same from one Raft group per
quorum queue, led by the queue's leader.

Rules:
- Every node counts the durable-log entries (of Persist and Settle commands) it applies,
  by the node that wrote each (the origin of its first command id): the hop is paid per
  entry, whatever the number of messages in it (one for a publisher waiting for each
  confirm, dozens under load). Every node applies every entry, so every node sees the
  same counts; only the Raft leader acts on them.
- Every CHECK_S the leader turns the counts into rates. The busiest writer becomes the
  target when it writes at least MIN_RATE entries/s and at least FACTOR times what the
  leader's own node writes, in STREAK checks in a row (a burst does not move it).
- The target must be an alive member this node's link reaches. One transfer at a time,
  then none for COOLDOWN_S, whatever its outcome (no ping-pong between two busy nodes:
  FACTOR is the hysteresis, COOLDOWN_S the limit).
- A transfer costs a pause of the log, not messages: the Raft adapter appends nothing
  while it hands over, and entries in flight are retried (`RaftNode.transfer_leadership`).
- `enabled` False (`--no-raft-leader-follows-load`) keeps the leader wherever Raft's
  elections put it.
- Runs on the event loop only; pure decisions in `choose`, for tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Final

CHECK_S: Final = 1.0
MIN_RATE: Final = 50.0  # durable-log entries per second
FACTOR: Final = 2.0
STREAK: Final = 2
COOLDOWN_S: Final = 30.0


def choose(rates: Mapping[str, float], me: str, candidates: Iterable[str]) -> str | None:
    """The node that should lead Raft instead of `me`, by one window's `rates`
    (durable-log entries/s by writing node), among `candidates`; None to stay."""
    allowed = set(candidates) - {me}
    best = max(allowed, key=lambda n: (rates.get(n, 0.0), n), default=None)
    if best is None:
        return None
    rate = rates.get(best, 0.0)
    if rate < MIN_RATE or rate < FACTOR * rates.get(me, 0.0):
        return None
    return best


class LeadershipFollowsLoad:
    """The counts and the leader's decisions (see the module rules)."""

    def __init__(self, me: str, *, enabled: bool = True) -> None:
        self.me = me
        self.enabled = enabled
        self._counts: Counter[str] = Counter()
        self._window_start = time.monotonic()
        self._streak: tuple[str | None, int] = (None, 0)
        self._quiet_until = 0.0
        self.transfers = 0  # asked for by this node
        self.transferring = False

    def count(self, origin: str, entries: int = 1) -> None:
        """Durable-log entries written by `origin` were applied."""
        self._counts[origin] += entries

    def check(self, now: float, leading: bool, candidates: Iterable[str]) -> str | None:
        """Called often; every CHECK_S closes a window. The target to hand over to, now."""
        elapsed = now - self._window_start
        if elapsed < CHECK_S:
            return None
        rates = {n: k / elapsed for n, k in self._counts.items()}
        self._counts.clear()
        self._window_start = now
        if not (self.enabled and leading) or self.transferring or now < self._quiet_until:
            self._streak = (None, 0)
            return None
        target = choose(rates, self.me, candidates)
        previous, streak = self._streak
        streak = streak + 1 if target is not None and target == previous else 1
        self._streak = (target, streak if target is not None else 0)
        if target is None or streak < STREAK:
            return None
        self._streak = (None, 0)
        return target

    async def transfer(
        self,
        target: str,
        start: Callable[[], asyncio.Future[bool]],
        log: Callable[..., None],
    ) -> None:
        """Run one transfer to `target` (`start` asks the Raft adapter for it)."""
        self.transferring = True
        self.transfers += 1
        started = time.monotonic()
        try:
            moved = await start()
        except Exception as exc:  # the Raft node closed meanwhile
            log("raft.leadership_transfer_failed", target=target, reason=str(exc))
            moved = False
        finally:
            self.transferring = False
            self._quiet_until = time.monotonic() + COOLDOWN_S
        log(
            "raft.leadership_transferred" if moved else "raft.leadership_kept",
            target=target,
            took_ms=round(1000 * (time.monotonic() - started)),
            reason="that node writes the most durable log entries",
        )
