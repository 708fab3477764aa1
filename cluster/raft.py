"""The Raft adapter: the one place Warren touches pysyncobj.

Rules of this module:

- It is the ONLY module that imports pysyncobj. Everything else sees `RaftConfig`,
  `RaftNode`, `RaftStatus` and the exceptions below; entries are opaque `bytes` (the
  command codec lives elsewhere and versions them).
- Exactly ONE replicated entry point (`_Replica.apply_entry`). pysyncobj numbers
  replicated methods by sorted name and writes the number into the journal: adding or
  renaming one would change what old journals replay to. Never add a second one.
- `apply` is made total here: an exception from it is logged and turned into an error
  marker (the submitter's future fails with `ApplyFailed`), because an exception inside
  a replicated body makes pysyncobj retry the entry on every tick forever.
- Nothing from pysyncobj's tick thread touches event-loop objects. Results travel back
  through `concurrent.futures.Future`s; `submit_async` wraps them with
  `asyncio.wrap_future`, which hops to the loop with `call_soon_threadsafe`. Done
  callbacks added to a returned future run on the tick thread: keep them tiny.
- apply, snapshot and restore all run on pysyncobj's single tick thread, never
  concurrently with each other. A slow one stalls Raft (heartbeats, elections).
- No pickle of our state: snapshots are written by pysyncobj's `serializer` hook in our
  own format (see `_write_dump`): a header with the two raft entries pysyncobj needs and
  the member list, then what `snapshot()` gives, then its length and CRC-32.
  `restore(bytes)` must discard all previous state (it is also called when a follower
  installs the leader's snapshot).
- Snapshots never stall the tick thread for long: `snapshot()` may return a writer
  (a function of a binary file) instead of bytes, i.e. a capture of the state; the
  dump is then written by a thread of its own while Raft goes on. pysyncobj supports
  that only for its fork mode, through its `serializeChecker` hook: `_write_dump`
  starts the thread and raises `_DumpInBackground` (pysyncobj then skips its own rename
  of the temp file, which we never wrote), the checker reports SERIALIZING until the
  thread has written, fsynced and renamed the dump, then SUCCESS once (pysyncobj then
  compacts the journal) or FAILED (the journal is kept).
- Always a password (peers that do not know it are disconnected at the handshake), an
  explicit bind address, journal AND full dump file, `useFork=False`.
- The Raft log is OUR journal (`cluster/journal.py`, fsync per entry by default), never
  pysyncobj's FileJournal (an mmap that is never flushed). pysyncobj opens its journal in
  `SyncObj.__init__` by calling the name `createJournal` of the `pysyncobj.syncobj`
  module; at import we replace that name, once, with `_create_journal` (refusing to
  import if it is not pysyncobj's original, i.e. pysyncobj changed). `RaftNode` opens
  the `DurableJournal` itself, before pysyncobj starts anything (so a bad or old-format
  journal fails the constructor cleanly), and hands it over for the duration of
  `SyncObj.__init__` only, through a context variable: `SyncObj.__init__` runs on the
  constructing thread, so nothing global outlives the call and two nodes in one process
  never see each other's journal. After `__init__` we check the journal was taken (else
  pysyncobj no longer calls `createJournal` and we refuse to run on its own journal).
  A journal path nobody handed over gets a `DurableJournal` in "fsync" mode.
- A journal written by pysyncobj itself (an older Warren) is refused with an error that
  says to start from an empty data dir: there is no migration (pre-release).
- Full dumps are durable: the dump thread fsyncs the file, renames it over the dump and
  fsyncs the data dir before it reports SUCCESS. A dump installed from the leader is
  written by pysyncobj without fsync: `_read_dump` fsyncs it (and the directory) before
  restoring, i.e. before pysyncobj clears the journal. The journal itself also fsyncs
  its directory before dropping entries that a dump covers, so a dump's rename is on
  disk before the entries it replaces are gone.
- The `RaftNode` must be created on a thread that outlives it (normally the main
  thread): pysyncobj's tick thread stops when its creating thread exits.
- Snapshot installs are guarded (`_Replica._on_message`), because pysyncobj 0.3 has two
  faults there that chaos runs hit (a restarted node installed the same snapshot five
  times in 0.6 s, each time going back from the entries it had applied to the
  snapshot's):
  - A follower's commit index moves on every message of a snapshot transfer, to the
    leader's commit index capped by its own log's end, although nothing checked that
    log against the leader's: a member with an old term's entries would apply them. The
    commit index stays where it was until a transfer is installed.
  - A leader keeps sending a snapshot to a member that has installed it (it moves its
    next index on a success only when the match index grows): its next index follows a
    success now. And a member refuses a snapshot that is not newer than what it has
    applied (it would go back, apply entries a second time and drop fsynced entries
    from its journal) and asks the leader for the entries after its own instead.
  - Our dump thread's rename and pysyncobj's rename of an installed snapshot over the
    same dump file take one lock; a dump that finds a snapshot installed since it began
    is discarded (FAILED), so an older dump never replaces a newer one.

Leadership: `transfer_leadership` hands it to an up-to-date member (pysyncobj's
TimeoutNow), appending nothing meanwhile (`_Replica._checkCommandsToApply`). When the
leader's connection closes (its process is gone; a partition keeps sockets open), the
members left stand for election at once, staggered by rank (`_Replica`), instead of after
raft_min..max_timeout: a dead leader costs tens of milliseconds, not up to 1.4 s. (Also
when a candidate's request_vote arrives before the disconnect notice: pysyncobj forgets
the leader on the higher term, so the member remembers the leader it last knew.)

Outcomes of `submit`: the future resolves with `apply`'s result once the entry is
committed and applied on THIS node (so a read on this node right after sees it). Failures
that pysyncobj reports as definite (no leader, leader lost the entry, queue full) are
retried inside the deadline and then raised as `NotApplied`; timeouts, LEADER_CHANGED and
UNKNOWN_OUTCOME raise `MaybeApplied` (LEADER_CHANGED is retried too for an `idempotent`
submit): the entry may still be applied later, so commands
must be idempotent (ids + de-duplication in the state machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import heapq
import itertools
import json
import logging
import math
import os
import random
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import pysyncobj.journal
import pysyncobj.syncobj
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.encryptor import HAS_CRYPTO
from pysyncobj.monotonic import monotonic as _pysyncobj_clock
from pysyncobj.node import TCPNode

from cluster.journal import DURABILITIES, DurableJournal, fsync_dir

__all__ = [
    "ApplyFailed",
    "MaybeApplied",
    "NotApplied",
    "RaftClosed",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "RaftStatus",
    "load_or_create_secret",
]

logger = logging.getLogger(__name__)

SECRET_FILE: Final = "raft.secret"
JOURNAL_FILE: Final = "raft.journal"
DUMP_FILE: Final = "raft.dump"
# Our full-dump format: magic, u32 header length, JSON header, snapshot bytes.
_DUMP_MAGIC: Final = b"WARRAFT\x02"
_DUMP_VERSION: Final = 2
_DUMP_TRAILER: Final = struct.Struct(">QI")  # the snapshot's length and CRC-32
# How long to wait before resubmitting an entry pysyncobj definitely did not log
# (no leader during an election, old leader lost it): a few ticks.
_RETRY_DELAY_S: Final = 0.02
# pysyncobj wraps an entry in a type byte and a pickled (method id, args) tuple.
_ENTRY_OVERHEAD: Final = 4096
# How long a peer's resolved address, and a failed lookup of it, are trusted (seconds).
# When the leader's connection closes (its process is gone), the members left stand for
# election in rank order, this far apart, plus up to the jitter (see _Replica).
ELECTION_STEP_S: Final = 0.1
ELECTION_JITTER_S: Final = 0.01
# How long a leadership transfer may take before the held entries go out anyway, and how
# often the tick thread looks at it meanwhile.
TRANSFER_TIMEOUT_S: Final = 1.0
TRANSFER_POLL_S: Final = 0.01
# A tick woken for a due time comes this much after it (pysyncobj compares with `>`).
_WAKE_SLACK_S: Final = 0.001
DNS_CACHE_S: Final = 5.0
DNS_FAIL_CACHE_S: Final = 1.0
_ROLES: Final = {0: "follower", 1: "candidate", 2: "leader"}
# pysyncobj's outcomes that mean "not in the log": submitted again within the deadline.
_RETRIED: Final = (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED)
# What pysyncobj's own FileJournal writes first (an older Warren's data dir).
_PYSYNCOBJ_JOURNAL_MAGIC: Final = b"PYSYNCOBJ"


# --------------------------------------------------------------------------- errors


class RaftError(Exception):
    """Base of everything `RaftNode` raises into a future."""


class MaybeApplied(RaftError):
    """The entry may or may not have been (or may later be) applied: make commands idempotent.

    Raised for a submit timeout, pysyncobj's LEADER_CHANGED and UNKNOWN_OUTCOME.
    """


class NotApplied(RaftError):
    """The entry was definitely not logged (no leader until the deadline, queue full, denied)."""


class ApplyFailed(RaftError):
    """The entry was committed, but `apply` raised on this node (logged; the node carries on)."""


class RaftClosed(RaftError):
    """The node was closed before the entry's outcome was known (treat as maybe applied)."""


# --------------------------------------------------------------------------- config


Address = tuple[str, int]


def _addr(a: Address) -> str:
    return f"{a[0]}:{a[1]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RaftConfig:
    """Everything one Raft member needs. Times are seconds.

    Tuning (measured, see the research notes on pysyncobj): with pysyncobj's batching
    (its default) a new command waits for the next tick and heartbeat, so the tick period
    dominated single-command latency (0.05 → ~100 ms; 0.005 → ~11 ms). We turn batching off
    (`appendEntriesUseBatch=False`): a submit wakes the tick thread through pysyncobj's pipe
    and the entry is sent at once, and a leader that commits tells the followers at once,
    so neither period sets commit latency. The tick thread sleeps until its next due time
    (heartbeat, election deadline, a retry: `_Replica._onTick`), at most
    `auto_tick_period`. The heartbeat period is long (200 ms): every heartbeat round costs
    each node ~0.3 ms of CPU (pickling and Fernet), at moments that collide with message
    traffic; at 50 ms they made p99 latency of transient messages between nodes ~40%
    worse. A frozen leader (not a crashed one: its socket closes, see `_Replica`) is
    replaced after `raft_min_timeout`..`raft_max_timeout`. `connection_timeout` is how long
    a silent peer connection is kept: it must outlast a full snapshot transfer (the
    receiving follower sends nothing until it has it all; 3.5 s made a 100 MB catch-up loop
    forever, 60 s let it finish in 39 s). Its
    cost: a peer that vanishes silently (partition, frozen host — not a crash, whose socket
    closes at once) still counts as connected for that long, and the leader buffers its
    appends to it in memory meanwhile. Elections do not wait for it (they run on the
    `raft_*_timeout` timers), and `leader_fallback_timeout` makes a leader cut off from the
    majority step down after a few seconds regardless.
    """

    self_address: Address
    peers: tuple[Address, ...]
    data_dir: Path
    password: str | None = None
    # Address the Raft port binds to; None = the host of self_address (never 0.0.0.0
    # unless asked for explicitly here).
    bind_host: str | None = None
    auto_tick_period: float = 0.2
    append_entries_period: float = 0.2
    raft_min_timeout: float = 0.8
    raft_max_timeout: float = 1.6
    connection_timeout: float = 60.0
    connection_retry_time: float = 0.5
    leader_fallback_timeout: float = 5.0
    submit_timeout: float = 10.0
    log_compaction_min_entries: int = 5000
    log_compaction_min_time: float = 300.0
    commands_queue_size: int = 100_000
    # Largest entry `submit` accepts. pysyncobj sends a single entry at least as large as
    # its append-entries batch size in chunks, and that path is broken in 0.3.17 (the last
    # chunk is computed from the wrong length: followers fail to unpickle it, measured
    # with 70 KB entries). We size the batch above this limit so that path is never taken.
    max_entry_bytes: int = 1 << 20
    # "fsync": an entry counts (leader) or is acknowledged (follower) only once fsynced,
    # so a commit survives a power loss of every member (one fdatasync per entry, and an
    # entry is a batch). "os-cache": written to the page cache only (pysyncobj's own
    # guarantee: survives kill -9, not a power loss). Term and vote are synced in both.
    durability: str = "fsync"

    def __post_init__(self) -> None:
        if self.self_address in self.peers:
            object.__setattr__(
                self, "peers", tuple(p for p in self.peers if p != self.self_address)
            )
        if not self.auto_tick_period > 0 or not self.append_entries_period > 0:
            raise ValueError("tick and append-entries periods must be positive")
        if self.raft_min_timeout <= 3 * self.append_entries_period:
            raise ValueError("raft_min_timeout must exceed 3 x append_entries_period")
        if self.raft_max_timeout <= self.raft_min_timeout:
            raise ValueError("raft_max_timeout must exceed raft_min_timeout")
        if self.connection_timeout < self.raft_max_timeout:
            raise ValueError("connection_timeout must be >= raft_max_timeout")
        if self.leader_fallback_timeout <= self.append_entries_period:
            raise ValueError("leader_fallback_timeout must exceed append_entries_period")
        if self.max_entry_bytes < 1:
            raise ValueError("max_entry_bytes must be positive")
        if self.log_compaction_min_entries < 2:
            raise ValueError("log_compaction_min_entries must be >= 2")
        if self.durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {self.durability!r}")

    @property
    def journal_file(self) -> Path:
        return self.data_dir / JOURNAL_FILE

    @property
    def dump_file(self) -> Path:
        return self.data_dir / DUMP_FILE


def load_or_create_secret(data_dir: Path) -> str:
    """The cluster password stored in `data_dir/raft.secret` (mode 0600), created once.

    Every member of a cluster needs the same secret: whoever starts the cluster generates
    it once (this function, on one data dir) and hands it to the others.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text(encoding="ascii").strip()
        if not secret:
            raise ValueError(f"{path} is empty") from None
        return secret
    secret = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class RaftStatus:
    self_address: str
    leader: str | None
    role: str  # "leader" | "follower" | "candidate"
    term: int
    commit_index: int
    last_applied: int
    is_ready: bool
    has_quorum: bool
    members: tuple[str, ...]  # every voting member, self included, sorted
    connected: tuple[str, ...]  # peers with a live connection
    apply_errors: int


# --------------------------------------------------------------------------- pysyncobj glue


@dataclass(slots=True)
class _JournalHandoff:
    journal: DurableJournal
    taken: bool = False


# The journal `_Replica.__init__` hands to `_create_journal` while SyncObj.__init__ runs.
_journal_handoff: contextvars.ContextVar[_JournalHandoff | None] = contextvars.ContextVar(
    "warren_raft_journal_handoff", default=None
)
_pysyncobj_create_journal: Final = pysyncobj.journal.createJournal


def _create_journal(journal_file: str | None = None) -> Any:
    """Stands in for `pysyncobj.syncobj.createJournal` (installed below)."""
    handoff = _journal_handoff.get()
    if (
        handoff is not None
        and not handoff.taken
        and journal_file is not None
        and Path(journal_file) == handoff.journal.path
    ):
        handoff.taken = True
        return handoff.journal
    if journal_file is None:
        return _pysyncobj_create_journal(None)  # pysyncobj's in-memory journal
    return _open_journal(Path(journal_file), "fsync")


def _install_journal_factory() -> None:
    current = getattr(pysyncobj.syncobj, "createJournal", None)
    if getattr(current, "__module__", None) == __name__:
        return  # already ours (this module was reloaded)
    if current is not _pysyncobj_create_journal:
        raise ImportError(
            "pysyncobj.syncobj.createJournal is not pysyncobj's journal factory: this "
            "pysyncobj version is not supported (Warren replaces its journal)"
        )
    pysyncobj.syncobj.createJournal = _create_journal


_install_journal_factory()


def _open_journal(path: Path, durability: str) -> DurableJournal:
    """Our journal at `path`, refusing one that pysyncobj's own FileJournal wrote."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_PYSYNCOBJ_JOURNAL_MAGIC))
    except FileNotFoundError:
        head = b""
    if head == _PYSYNCOBJ_JOURNAL_MAGIC:
        raise ValueError(
            f"{path} is a journal in pysyncobj's own format (written by an older Warren); "
            "this version keeps the Raft log in its own fsynced format and does not "
            f"migrate it: start this node with an empty data dir instead of {path.parent}"
        )
    return DurableJournal(path, durability)


@dataclass(frozen=True, slots=True)
class _ApplyError:
    """What the replicated body returns when apply raised (never leaves this module)."""

    text: str


class _Replica(SyncObj):  # type: ignore[misc]
    """The pysyncobj object: one replicated method, nothing else of ours in its state."""

    def __init__(
        self,
        owner: RaftNode,
        self_addr: str,
        peers: list[str],
        conf: SyncObjConf,
        journal: DurableJournal,
    ) -> None:
        # Set before SyncObj.__init__: its tick thread may call into us at once.
        self._warren_owner = owner
        self._last_tick: float | None = None  # (pysyncobj's clock)
        self._stood_still_s = conf.raftMinTimeout
        self._listen_first_s = 2 * conf.appendEntriesPeriod
        self._fallback_s = conf.leaderFallbackTimeout
        handoff = _JournalHandoff(journal)
        token = _journal_handoff.set(handoff)
        try:
            super().__init__(self_addr, peers, conf)
        finally:
            _journal_handoff.reset(token)
        if not handoff.taken:
            self.destroy()
            raise RuntimeError(
                "pysyncobj did not open its journal through createJournal: the durable "
                "journal is not in use (unsupported pysyncobj version)"
            )
        self._SyncObj__transport.setOnNodeDisconnectedCallback(self._on_node_disconnected)
        self._incoming_index: int | None = None  # the snapshot being received (its index)
        # The leader this member knew of when a request_vote last came in: a higher term
        # makes pysyncobj forget it, possibly before the leader's disconnect is noticed.
        # (Only a request_vote, or this member's own candidacy, clears a follower's.)
        self._last_leader: Any = None
        serializer = self._SyncObj__serializer
        receive = serializer.setTransmissionData

        def set_transmission_data(data: Any) -> bool:
            # The last chunk of the leader's snapshot renames it over the dump file.
            with owner.dump_lock:
                complete = bool(receive(data))
                if complete:
                    owner.dumps_installed += 1
                return complete

        serializer.setTransmissionData = set_transmission_data
        self._SyncObj__transport.setOnMessageReceivedCallback(self._on_message)

    def _on_message(self, node: Any, message: Any) -> None:
        # Tick thread (pysyncobj's transport). See the module rules: snapshot installs.
        kind = message.get("type") if type(message) is dict else None
        if kind == "request_vote":
            self._note_leader()  # (a higher term makes pysyncobj forget the leader)
        if kind == "append_entries" and "prevLogIdx" not in message:
            self._on_snapshot_message(node, message)
            return
        self._SyncObj__onMessageReceived(node, message)
        if kind == "next_node_idx" and message.get("success") and self._isLeader():
            next_index = self._SyncObj__raftNextIndex
            reported = message.get("next_node_idx")
            if node in next_index and type(reported) is int and next_index[node] < reported:
                next_index[node] = reported

    def _on_snapshot_message(self, node: Any, message: dict[str, Any]) -> None:
        refused = False
        serialized = message.get("serialized")
        applied = int(self._SyncObj__raftLastApplied)
        current = message.get("term", -1) >= self.raftCurrentTerm  # (else pysyncobj ignores it)
        if current and serialized is not None:
            data, first, last = serialized
            if first:
                self._incoming_index = snapshot_index(data)
            index = self._incoming_index
            if last:
                self._incoming_index = None
            # At the first chunk, and again at the last (this member may have applied
            # more while the transfer ran: it replays its own journal after a start).
            if (first or last) and index is not None and index <= applied:
                refused = True
                message = {**message, "serialized": None}
                logger.info(
                    "raft snapshot at %d refused (%d applied here): asking for entries",
                    index,
                    applied,
                )
        commit = int(getattr(self, "_SyncObj__raftCommitIndex"))  # noqa: B009
        installs = self._warren_owner.installs
        self._SyncObj__onMessageReceived(node, message)
        moved = int(getattr(self, "_SyncObj__raftCommitIndex")) > commit  # noqa: B009
        if moved and self._warren_owner.installs == installs:
            # Not installed (yet): nothing checked this log against the leader's.
            setattr(self, "_SyncObj__raftCommitIndex", commit)  # noqa: B010
            self._SyncObj__raftLog.setRaftCommitIndex(commit)
        if refused:
            self._SyncObj__transport.send(
                node,
                {
                    "type": "next_node_idx",
                    "next_node_idx": applied + 1,
                    "reset": True,
                    "success": False,
                },
            )

    def _note_leader(self) -> None:
        leader = self._getLeader()
        if leader is not None:
            self._last_leader = leader

    def _on_node_disconnected(self, node: Any) -> None:
        # Tick thread (pysyncobj's transport). pysyncobj's own bookkeeping first.
        self._SyncObj__onNodeDisconnected(node)
        if self._isLeader() or not self._lost_leader(node):
            return
        # The leader's connection closed: its process died or restarted (a partition or
        # a frozen host keeps the socket open; those wait for the election timeout). Elect
        # now rather than raft_min..max_timeout later, staggered by rank among the members
        # left so that one candidate goes first and the others vote for it. One whose log
        # is behind is refused, and the next in rank stands ELECTION_STEP_S later.
        me = self._SyncObj__selfNode.address
        left = sorted([me, *(n.address for n in self._SyncObj__otherNodes if n != node)])
        delay = left.index(me) * ELECTION_STEP_S + random.random() * ELECTION_JITTER_S
        deadline = _pysyncobj_clock() + delay  # (CLOCK_MONOTONIC_RAW, not time.monotonic)
        current = float(getattr(self, "_SyncObj__raftElectionDeadline"))  # noqa: B009
        if deadline < current:
            self._SyncObj__raftElectionDeadline = deadline
            logger.info("raft leader %s disconnected: election in %.0f ms", node, 1000 * delay)
            self.notify_tick()  # tick again now, not after a poll period of silence

    def _lost_leader(self, node: Any) -> bool:
        """`node`, whose connection closed, is the leader this member follows; or it was,
        and a candidate's request_vote (a higher term) came first: pysyncobj then knows
        no leader, and if it refused that candidate (its log is behind this member's)
        nothing hurries this member's own election but this. A member that voted in this
        term waits for its candidate instead."""
        leader = self._getLeader()
        if leader is not None:
            return bool(node == leader)
        voted = getattr(self, "_SyncObj__votedForNodeId")  # noqa: B009
        return bool(node == self._last_leader and voted is None)

    def _onTick(self, timeToWait: float = 0.0) -> None:  # pysyncobj calls it by this name
        # pysyncobj's tick thread polls its sockets for `timeToWait` (auto_tick_period)
        # between ticks. Sleep only until the next due time instead: the leader's next
        # heartbeat, a follower's election deadline, or one of ours (RaftNode.next_due_in).
        if timeToWait > 0:
            timeToWait = min(timeToWait, self._due_in(), self._warren_owner.next_due_in())
        self._listen_after_standing_still()
        super()._onTick(timeToWait)

    def _listen_after_standing_still(self) -> None:
        # A member whose tick thread stood still past the election timeout (its process
        # stopped, its VM paused, the GIL held) acts on timers it did not listen through.
        # A follower finds its election deadline past: it would stand at once, before
        # reading the heartbeats waiting in its sockets, and depose a leader that is alive
        # (after a pause of the whole cluster, every follower does). A leader finds its
        # members' last responses older than leader_fallback_timeout and steps down.
        # Either listens for 2 heartbeat periods first.
        now = _pysyncobj_clock()
        last, self._last_tick = self._last_tick, now
        if last is None or now - last < self._stood_still_s:
            return
        if self._isLeader():
            heard = self._SyncObj__lastResponseTime
            fresh = now - self._fallback_s + self._listen_first_s
            for node in list(heard):
                heard[node] = max(heard[node], fresh)
            logger.info("raft tick stood still %.1fs: leading on for now", now - last)
            return
        listen_until = now + self._listen_first_s
        if float(getattr(self, "_SyncObj__raftElectionDeadline")) < listen_until:  # noqa: B009
            self._SyncObj__raftElectionDeadline = listen_until
            logger.info(
                "raft tick stood still %.1fs: listening %.0f ms before any election",
                now - last,
                1000 * self._listen_first_s,
            )

    def _due_in(self) -> float:
        # Seconds (pysyncobj's clock) until Raft itself has something to do; inf when the
        # time is past (a follower connected to nobody does not elect: nothing is due).
        if self._isLeader():
            due = float(getattr(self, "_SyncObj__newAppendEntriesTime"))  # noqa: B009
        else:
            due = float(getattr(self, "_SyncObj__raftElectionDeadline"))  # noqa: B009
        left = due - _pysyncobj_clock()
        return left + _WAKE_SLACK_S if left > 0 else math.inf

    @replicated  # type: ignore[untyped-decorator]
    def apply_entry(self, entry: bytes) -> bytes | _ApplyError:
        return self._warren_owner._apply_total(entry)

    def _checkCommandsToApply(self) -> None:  # pysyncobj calls it by this name
        # While this leader hands its leadership over, it appends nothing new (see
        # RaftNode.transfer_leadership): its own and forwarded commands wait in
        # pysyncobj's queue, and go to the new leader (or are refused as NOT_LEADER, and
        # retried by their submitters) once it leads.
        owner = self._warren_owner
        if owner._transfer is not None and self._isLeader():
            return
        super()._checkCommandsToApply()

    def notify_tick(self) -> None:
        """Wake the tick thread now (pysyncobj's pipe notifier, there without batching);
        else the next tick comes within auto_tick_period anyway."""
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()


@dataclass(slots=True)
class _Pending:
    future: concurrent.futures.Future[Any]
    deadline: float
    resubmit: Callable[[Callable[[Any, int], None]], None]
    void: bool
    idempotent: bool = False
    attempt: int = 0
    retry_at: float | None = None
    done: bool = False


@dataclass(slots=True)
class _Transfer:
    """A leadership transfer under way (see `RaftNode.transfer_leadership`)."""

    target: str  # "host:port"
    started: float
    deadline: float
    future: concurrent.futures.Future[bool]
    sent: bool = False


# --------------------------------------------------------------------------- the node


class RaftNode:
    """One Raft member replicating opaque byte entries into `apply`.

    `apply(entry) -> bytes` must be deterministic and is called once per committed entry
    on every member, in log order. `snapshot() -> bytes` captures the whole state;
    `restore(bytes)` replaces it. All three run on pysyncobj's tick thread.
    """

    def __init__(
        self,
        config: RaftConfig,
        apply: Callable[[bytes], bytes],
        snapshot: Callable[[], bytes | Callable[[BinaryIO], None]],
        restore: Callable[[bytes], None],
    ) -> None:
        if not HAS_CRYPTO:
            raise RuntimeError("pysyncobj needs the 'cryptography' package to use a password")
        self._config = config
        self._apply = apply
        self._snapshot = snapshot
        self._restore = restore
        self._apply_errors = 0
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._retries: list[tuple[float, int]] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._transfer: _Transfer | None = None
        self._ready = threading.Event()
        self.installs = 0  # snapshots loaded (at start and from the leader): _Replica
        # The leader's snapshots renamed over the dump file (pysyncobj does it in its
        # serializer; `_Replica` wraps that under `dump_lock`), against our own dump
        # thread's rename (see `_dump_in_background`).
        self.dump_lock = threading.Lock()
        self.dumps_installed = 0
        # The background dump (see the module rules): SERIALIZING while its thread runs,
        # then SUCCESS or FAILED until pysyncobj's checker call reads it.
        self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
        self._dump_thread: threading.Thread | None = None
        self.last_dump_seconds = 0.0
        self.last_dump_bytes = 0

        config.data_dir.mkdir(parents=True, exist_ok=True)
        password = config.password or load_or_create_secret(config.data_dir)
        self_addr = _addr(config.self_address)
        bind_host = config.bind_host or config.self_address[0]
        conf = SyncObjConf(
            password=password,
            bindAddress=f"{bind_host}:{config.self_address[1]}",
            autoTick=True,
            autoTickPeriod=config.auto_tick_period,
            appendEntriesPeriod=config.append_entries_period,
            # No batching window: a submitted entry wakes the tick thread (pysyncobj's pipe
            # notifier) and is sent at once, and a commit is announced to followers at
            # once. So commit latency does not depend on the tick or heartbeat periods,
            # which can then be long (fewer wake-ups of the tick thread, which competes
            # with the event loop for the GIL: measured, 5 ms ticks added ~1 ms to p99).
            appendEntriesUseBatch=False,
            raftMinTimeout=config.raft_min_timeout,
            raftMaxTimeout=config.raft_max_timeout,
            connectionTimeout=config.connection_timeout,
            connectionRetryTime=config.connection_retry_time,
            # Peers named by host name (docker-compose service names) change address when
            # their container is recreated, and have none while it is down: pysyncobj's
            # defaults would keep a stale address for 600 s and a failed lookup for 30 s
            # before trying again, so a restarted member would rejoin that late.
            dnsCacheTime=DNS_CACHE_S,
            dnsFailCacheTime=DNS_FAIL_CACHE_S,
            leaderFallbackTimeout=config.leader_fallback_timeout,
            commandsQueueSize=config.commands_queue_size,
            appendEntriesBatchSizeBytes=config.max_entry_bytes + _ENTRY_OVERHEAD,
            # Fail fast when there is no leader; we retry inside the deadline ourselves,
            # so an entry never waits unseen in pysyncobj's queue past its caller.
            commandsWaitLeader=False,
            journalFile=str(config.journal_file),
            fullDumpFile=str(config.dump_file),
            serializer=self._write_dump,
            deserializer=self._read_dump,
            serializeChecker=self._check_dump,
            useFork=False,
            logCompactionMinEntries=config.log_compaction_min_entries,
            logCompactionMinTime=config.log_compaction_min_time,
            dynamicMembershipChange=True,
            onReady=self._ready.set,
            onStateChanged=self._on_state_changed,
        )
        # Opened here, before pysyncobj binds or starts anything: a bad journal fails cleanly.
        self._journal = _open_journal(config.journal_file, config.durability)
        try:
            self._replica = _Replica(
                self, self_addr, [_addr(p) for p in config.peers], conf, self._journal
            )
        except BaseException:
            self._journal.close()
            raise
        self._replica.addOnTickCallback(self._on_tick)

    # ----------------------------------------------------------------- public API

    @property
    def config(self) -> RaftConfig:
        return self._config

    def submit(
        self, entry: bytes, timeout: float | None = None, *, idempotent: bool = False
    ) -> concurrent.futures.Future[bytes]:
        """Replicate `entry`; the future gets apply's result once applied on this node.

        `idempotent`: applying `entry` twice is harmless (its commands carry ids the
        state machine skips when seen before). Then a LEADER_CHANGED outcome (an entry
        forwarded to a leader that lost its leadership before saying where it logged
        it, as after every leadership transfer) is submitted again within the
        deadline, instead of failing as `MaybeApplied`."""
        if not isinstance(entry, bytes):
            raise TypeError("entries are bytes")
        if len(entry) > self._config.max_entry_bytes:
            raise ValueError(
                f"entry of {len(entry)} bytes exceeds max_entry_bytes "
                f"({self._config.max_entry_bytes}); split it"
            )

        def resubmit(cb: Callable[[Any, int], None]) -> None:
            self._replica.apply_entry(entry, callback=cb)

        return self._start(resubmit, timeout, idempotent=idempotent)

    async def submit_async(
        self, entry: bytes, raft_timeout: float | None = None, *, idempotent: bool = False
    ) -> bytes:
        """`submit` for the event loop: the result is handed over via call_soon_threadsafe.

        `raft_timeout` is the deadline after which the outcome is `MaybeApplied` (not a
        cancellation: cancelling the awaiting task does not withdraw the entry)."""
        return await asyncio.wrap_future(self.submit(entry, raft_timeout, idempotent=idempotent))

    def add_member(
        self, address: Address, timeout: float | None = None
    ) -> concurrent.futures.Future[None]:
        """Add one voting member (one change at a time). The new node must be started with
        every current member as its peers, the same password, and an empty data dir."""
        node = _addr(address)
        return self._start(
            lambda cb: self._replica.addNodeToCluster(node, callback=cb), timeout, void=True
        )

    def remove_member(
        self, address: Address, timeout: float | None = None
    ) -> concurrent.futures.Future[None]:
        """Remove one voting member (one change at a time)."""
        node = _addr(address)
        return self._start(
            lambda cb: self._replica.removeNodeFromCluster(node, callback=cb), timeout, void=True
        )

    def transfer_leadership(
        self, to: Address, timeout: float = TRANSFER_TIMEOUT_S
    ) -> concurrent.futures.Future[bool]:
        """Hand Raft leadership to member `to` (Raft's TimeoutNow, pysyncobj's
        `transferLeadership`); the future says whether `to` leads within `timeout`.

        Only a leader transfers (False otherwise), one transfer at a time. Meanwhile
        this leader appends nothing new, its own entries nor those other members forward
        (`_Replica._checkCommandsToApply`): they wait in pysyncobj's queue until the
        transfer ended either way, then go to the new leader (or are refused and retried
        by their submitters, see `_on_result`). So the target catches up within a round
        trip and is asked (each tick until it has every entry), and no entry is appended
        after that: one would leave the target's log the shorter, this node would refuse
        it its vote, and the entry would be lost to the new term (a nack for nothing).
        Entries already in the log are the new leader's too (it had them all), so their
        submitters get their outcomes as usual."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed or self._transfer is not None:
                future.set_result(False)
                return future
            now = time.monotonic()
            self._transfer = _Transfer(_addr(to), now, now + timeout, future)
        self._replica.notify_tick()
        return future

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until this node has caught up with the leader's commit index once."""
        return self._ready.wait(timeout)

    def status(self) -> RaftStatus:
        """A consistent-enough view for operators (read from another thread, retried)."""
        for _ in range(10):
            try:
                raw = self._replica.getStatus()
                break
            except RuntimeError:  # a set changed size under us (membership change)
                time.sleep(0.001)
        else:
            raw = self._replica.getStatus()
        self_addr = _addr(self._config.self_address)
        peers = sorted(str(n) for n in self._replica.otherNodes)
        leader = raw.get("leader")
        return RaftStatus(
            self_address=self_addr,
            leader=None if leader is None else str(leader),
            role=_ROLES.get(int(raw["state"]), "unknown"),
            term=int(raw["raft_term"]),
            commit_index=int(raw["commit_idx"]),
            last_applied=int(raw["last_applied"]),
            is_ready=bool(self._replica.isReady()),
            has_quorum=bool(raw["has_quorum"]),
            members=tuple(sorted([self_addr, *peers])),
            connected=tuple(p for p in peers if raw.get("partner_node_status_server_" + p) == 2),
            apply_errors=self._apply_errors,
        )

    def force_compaction(self) -> None:
        """Ask pysyncobj to snapshot + truncate the journal at the next tick."""
        self._replica.forceLogCompaction()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the tick thread, close sockets and files; fail what is still pending."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._replica.destroy()
        deadline = time.monotonic() + timeout
        while self._replica.tick_thread_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._replica.tick_thread_alive():
            logger.warning("raft tick thread still alive %.1fs after close", timeout)
        else:
            # pysyncobj closes it on the way out, except when its thread never got going
            # (bind failure): close it here too (idempotent), never under a live thread.
            self._journal.close()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            self._finish(p, exc=RaftClosed("raft node closed before the outcome was known"))

    # ----------------------------------------------------------------- internals

    def _start(
        self,
        resubmit: Callable[[Callable[[Any, int], None]], None],
        timeout: float | None,
        *,
        void: bool = False,
        idempotent: bool = False,
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # RUNNING: a cancel from asyncio.wrap_future can no longer race our set_result.
        future.set_running_or_notify_cancel()
        limit = self._config.submit_timeout if timeout is None else timeout
        pending = _Pending(future, time.monotonic() + limit, resubmit, void, idempotent)
        with self._lock:
            if self._closed:
                future.set_exception(RaftClosed("raft node is closed"))
                return future
            rid = next(self._ids)
            self._pending[rid] = pending
            heapq.heappush(self._deadlines, (pending.deadline, rid))
        self._send(rid, pending)
        return future

    def _send(self, rid: int, pending: _Pending) -> None:
        attempt = pending.attempt

        def callback(result: Any, err: int) -> None:
            self._on_result(rid, attempt, result, err)

        pending.resubmit(callback)

    def _on_result(self, rid: int, attempt: int, result: Any, err: int) -> None:
        # Runs on the tick thread.
        with self._lock:
            pending = self._pending.get(rid)
            if pending is None or pending.attempt != attempt:
                return
            if err in _RETRIED or (pending.idempotent and err == FAIL_REASON.LEADER_CHANGED):
                # Definitely not in the log (or harmless if it is): try again in a few
                # ticks if time remains.
                now = time.monotonic()
                if now + _RETRY_DELAY_S < pending.deadline:
                    pending.attempt += 1
                    pending.retry_at = now + _RETRY_DELAY_S
                    heapq.heappush(self._retries, (pending.retry_at, rid))
                    return
            del self._pending[rid]
        if err == FAIL_REASON.SUCCESS:
            if isinstance(result, _ApplyError):
                self._finish(pending, exc=ApplyFailed(result.text))
            else:
                self._finish(pending, result=None if pending.void else result)
        elif err in (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME):
            self._finish(pending, exc=MaybeApplied(f"raft: {_reason(err)}; maybe applied"))
        else:
            self._finish(pending, exc=NotApplied(f"raft: {_reason(err)}; not applied"))

    def next_due_in(self) -> float:
        """Tick thread: seconds until a retry or deadline of ours is due (inf: none)."""
        if self._transfer is not None:
            return TRANSFER_POLL_S
        with self._lock:
            heads = [heap[0][0] for heap in (self._deadlines, self._retries) if heap]
        if not heads:
            return math.inf
        return max(0.0, min(heads) - time.monotonic()) + _WAKE_SLACK_S

    def _on_tick(self) -> None:
        # Runs on the tick thread at every tick: cheap when nothing is due.
        now = time.monotonic()
        expired: list[_Pending] = []
        due: list[tuple[int, _Pending]] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, rid = heapq.heappop(self._deadlines)
                pending = self._pending.pop(rid, None)
                if pending is not None:
                    expired.append(pending)
            while self._retries and self._retries[0][0] <= now:
                _, rid = heapq.heappop(self._retries)
                pending = self._pending.get(rid)
                if pending is not None and pending.retry_at is not None:
                    pending.retry_at = None
                    due.append((rid, pending))
        for pending in expired:
            self._finish(
                pending, exc=MaybeApplied("raft: no outcome before the deadline; maybe applied")
            )
        for rid, pending in due:
            self._send(rid, pending)
        if self._transfer is not None:
            self._step_transfer(now)

    def _step_transfer(self, now: float) -> None:
        # Tick thread. Ask the target once it is up to date; done when someone else
        # leads (or nobody does: an election is on), or at the deadline.
        transfer = self._transfer
        assert transfer is not None
        replica = self._replica
        leading = replica._isLeader()
        if leading and not transfer.sent and now < transfer.deadline:
            asked: list[int] = []
            replica.transferLeadership(transfer.target, callback=lambda _r, err: asked.append(err))
            transfer.sent = asked == [FAIL_REASON.SUCCESS]  # else not up to date yet
        leader = replica._getLeader()
        if (leading or leader is None) and now < transfer.deadline:
            return
        with self._lock:
            self._transfer = None
        moved = leader is not None and leader.address == transfer.target
        logger.debug(
            "raft leadership transfer to %s %s in %.0f ms",
            transfer.target,
            "done" if moved else "not done",
            1000 * (now - transfer.started),
        )
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            transfer.future.set_result(moved)

    def _finish(
        self, pending: _Pending, *, result: Any = None, exc: BaseException | None = None
    ) -> None:
        if pending.done:
            return
        pending.done = True
        try:
            if exc is not None:
                pending.future.set_exception(exc)
            else:
                pending.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass

    def _on_state_changed(self, old: int, new: int) -> None:
        # Tick thread: one line per role change (when an election took place, exactly).
        logger.info("raft role %s -> %s", _ROLES.get(old, old), _ROLES.get(new, new))

    def _apply_total(self, entry: bytes) -> bytes | _ApplyError:
        # Runs on the tick thread, inside pysyncobj's replicated body: must never raise.
        try:
            result = self._apply(entry)
            if not isinstance(result, bytes):
                raise TypeError(f"apply returned {type(result).__name__}, not bytes")
            return result
        except Exception as e:
            self._apply_errors += 1
            logger.exception("raft apply failed for a %d-byte entry; node carries on", len(entry))
            return _ApplyError(f"{type(e).__name__}: {e}")

    # --- full dump (pysyncobj `serializer` / `deserializer` hooks, tick thread) ----------

    def _write_dump(self, filename: str, raft_data: tuple[Any, Any, Any]) -> None:
        """pysyncobj calls this with (last applied entry, entry before it, members); we
        capture the state here and write it on a thread of our own (see the rules)."""
        try:
            last, prev, cluster = raft_data
            captured = self._snapshot()
            header = {
                "version": _DUMP_VERSION,
                "last": _entry_to_json(last),
                "prev": _entry_to_json(prev),
                "members": sorted(str(n) for n in cluster),
            }
            head = json.dumps(header, separators=(",", ":")).encode()
        except Exception:
            logger.exception("raft snapshot failed; the journal is kept")
            raise
        writer: Callable[[BinaryIO], None]
        if isinstance(captured, bytes):
            body = captured

            def writer(out: BinaryIO) -> None:
                out.write(body)

        else:
            writer = captured
        self._dump_state = SERIALIZER_STATE.SERIALIZING
        self._dump_thread = threading.Thread(
            target=self._dump_in_background,
            args=(Path(self._config.dump_file), head, writer, self.dumps_installed),
            name="warren-raft-dump",
            daemon=True,
        )
        self._dump_thread.start()
        raise _DumpInBackground

    def _dump_in_background(
        self, target: Path, head: bytes, writer: Callable[[BinaryIO], None], installed: int
    ) -> None:
        started = time.monotonic()
        temp = target.with_name(target.name + ".writing")
        try:
            with open(temp, "wb") as f:
                f.write(_DUMP_MAGIC + struct.pack(">I", len(head)) + head)
                sink = _Sink(f)
                writer(sink)  # type: ignore[arg-type]
                f.write(_DUMP_TRAILER.pack(sink.size, sink.crc))
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            with self.dump_lock:
                if self.dumps_installed != installed:
                    # The leader's snapshot was installed over the dump file meanwhile: it
                    # is newer than this one, which must not replace it (at the next start
                    # the journal would not begin at the dump's entries, and pysyncobj
                    # would clear it). FAILED: pysyncobj keeps the journal as it is.
                    temp.unlink(missing_ok=True)
                    logger.info("raft snapshot discarded: the leader's was installed meanwhile")
                    self._dump_state = SERIALIZER_STATE.FAILED
                    return
                os.replace(temp, target)
            fsync_dir(target.parent)
        except Exception:
            logger.exception("raft snapshot failed; the journal is kept")
            self._dump_state = SERIALIZER_STATE.FAILED
            return
        self.last_dump_seconds = time.monotonic() - started
        self.last_dump_bytes = size
        logger.info("raft snapshot written: %d bytes in %.2fs", size, self.last_dump_seconds)
        self._dump_state = SERIALIZER_STATE.SUCCESS

    def _check_dump(self) -> int:
        """pysyncobj's serializeChecker: how the background dump is doing."""
        state: int = self._dump_state
        if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
            self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
        return state

    def _read_dump(self, filename: str) -> tuple[Any, Any, set[Any]]:
        """Restore our state from a dump and give pysyncobj back its raft metadata."""
        self.installs += 1
        with open(filename, "rb") as f:
            # A dump installed from the leader was written and renamed without fsync, and
            # pysyncobj clears the journal right after this returns: make it durable first.
            os.fsync(f.fileno())
            data = f.read()
        fsync_dir(Path(filename).parent)
        if data[: len(_DUMP_MAGIC)] != _DUMP_MAGIC:
            raise ValueError(f"{filename}: not a Warren raft dump")
        (hlen,) = struct.unpack_from(">I", data, len(_DUMP_MAGIC))
        start = len(_DUMP_MAGIC) + 4
        header = json.loads(data[start : start + hlen])
        if header.get("version") != _DUMP_VERSION:
            raise ValueError(f"{filename}: unknown dump version {header.get('version')!r}")
        body = data[start + hlen : len(data) - _DUMP_TRAILER.size]
        if len(data) - start - hlen < _DUMP_TRAILER.size:
            raise ValueError(f"{filename}: snapshot is truncated")
        size, crc = _DUMP_TRAILER.unpack_from(data, len(data) - _DUMP_TRAILER.size)
        if len(body) != size or zlib.crc32(body) != crc:
            raise ValueError(f"{filename}: snapshot is truncated or corrupt")
        self._restore(body)
        members = {TCPNode(m) for m in header["members"]}
        return _entry_from_json(header["last"]), _entry_from_json(header["prev"]), members


class _DumpInBackground(Exception):
    """Raised from the serializer hook: the dump is being written by our thread."""


class _Sink:
    """A file that counts the bytes written to it and their CRC-32."""

    __slots__ = ("crc", "f", "size")

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.crc = 0
        self.size = 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return len(data)


def _entry_to_json(entry: Any) -> list[Any]:
    command, idx, term = entry
    return [bytes(command).hex(), int(idx), int(term)]


def snapshot_index(head: bytes) -> int | None:
    """The Raft index a dump covers, from its first bytes (the start of a snapshot
    transfer); None when they do not hold a whole header of ours."""
    start = len(_DUMP_MAGIC) + 4
    if len(head) < start or head[: len(_DUMP_MAGIC)] != _DUMP_MAGIC:
        return None
    (size,) = struct.unpack_from(">I", head, len(_DUMP_MAGIC))
    if len(head) < start + size:
        return None
    try:
        last = json.loads(head[start : start + size])["last"]
        return int(last[1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _entry_from_json(raw: list[Any]) -> tuple[bytes, int, int]:
    return bytes.fromhex(raw[0]), int(raw[1]), int(raw[2])


def _reason(err: int) -> str:
    for name in dir(FAIL_REASON):
        if not name.startswith("_") and getattr(FAIL_REASON, name) == err:
            return str(name)
    return f"error {err}"
