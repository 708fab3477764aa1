"""One node's membership in the cluster: Raft, the node link, queue leaders, forwarding.

Rules:
- Runs on the node's event loop. pysyncobj's thread only hands entries over
  (`call_soon_threadsafe`); every entry is applied to the node's `StateMachine` on the
  loop, in log order, so the state is never touched by two threads. Raft snapshots are
  taken on the loop too (the tick thread waits for them): they hold exactly the entries
  the tick thread has handed over.
- Topology changes and cluster commands go through `replicate`: the client's -ok is sent
  once the entry is applied here AND every other reachable node has said it applied it
  (APPLIED), so whatever node the client uses next already sees the change.
- A queue lives on its leader. The node a client is connected to (the origin) routes its
  publishes with its full copy of the bindings, keeps the local copies and forwards the
  rest to each target queue's leader once (ENQUEUE); consumers of queues led elsewhere
  are remote consumers: the leader holds a proxy channel with the client's (globally
  unique) channel ref and sends its deliveries back (DELIVER); acks travel the other way
  as commands for that proxy channel.
- The Raft leader watches the members: one that stays unreachable over the link for
  DOWN_AFTER_S is replicated as NodeDown (its queues move to live nodes), and NodeUp when
  it is back and serves. A node says it serves (READY) over the link once it has caught
  up; one that is back on the link after a restart and still catching up is down.
- Nothing here blocks the loop; nothing here raises into a client's connection: failures
  become `ClusterUnavailable` (the channel answers with a channel error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

import anyio
from anyio.abc import TaskGroup
from prometheus_client import Histogram

from cluster import codec, placement, wire
from cluster import commands as c
from cluster.durable import MAX_ENTRY_BYTES, DurableLog
from cluster.leadership import LeadershipFollowsLoad
from cluster.link import NodeLink
from cluster.raft import MaybeApplied, NotApplied, RaftClosed, RaftConfig, RaftError, RaftNode
from cluster.state import MemberInfo, StateMachine
from node.broker.types import (
    AmqpError,
    CancelConsumer,
    ChannelRef,
    Condemned,
    Count,
    Deliver,
    Effect,
    Forward,
    Outcome,
    QueueDeclared,
    RemoteSettle,
    Reply,
)
from node.logs import EventLogger

# How long a client waits for a topology change before it is told the cluster cannot
# take it (pika's blocking calls have no timeout of their own: never hang past this).
REPLICATE_TIMEOUT_S: Final = 5.0
# How long the origin waits for other reachable nodes to apply an entry before it
# answers anyway (a slow node must not stall every declare).
APPLIED_WAIT_S: Final = 2.0
RPC_TIMEOUT_S: Final = 5.0
MONITOR_PERIOD_S: Final = 0.02  # (a member down is declared at most this late)
# A member unreachable over the link this long is declared down by the Raft leader.
DOWN_AFTER_S: Final = 0.1
SNAPSHOT_WAIT_S: Final = 60.0
# Bytes waiting in the link for one peer above which this node's publishers pause.
LINK_HIGH_BYTES: Final = 1 << 20
# A new Raft leader waits this long before it judges members (links come up).
LEADER_GRACE_S: Final = 0.3
# A member that is alive again (it announced itself after a restart) has this long for
# the link to reach it before it can be judged down again: the dialer may be in its
# backoff (at most 1 s) from the attempts made while the member was dead. The grace
# ends when the link comes up.
REVIVED_GRACE_S: Final = 1.5
# After this node became ready, members it has not reached yet are not judged for a
# while: links come up. (One it reached and then lost is judged at once, grace or not.)
STARTUP_GRACE_S: Final = 3.0
# A member whose link came back up has this long to say it serves (READY, sent at once
# by a node that serves) before it counts as down: it restarted and is catching up.
READY_WAIT_S: Final = 0.5
# warren_raft_commit_latency_seconds buckets: fsynced commits take milliseconds to tens.
COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
NO_QUORUM = 541  # replaced by the channel's error: see unavailable()


class ClusterUnavailable(Exception):
    """The cluster could not take a change or answer a request; `error` is what the
    client's channel is closed with."""

    def __init__(self, error: AmqpError) -> None:
        super().__init__(error.reply_text)
        self.error = error


def unavailable(node: str, why: str) -> ClusterUnavailable:
    return ClusterUnavailable(
        AmqpError(
            406,
            f"PRECONDITION_FAILED - node {node} cannot change the cluster's topology now: {why}",
        )
    )


def leader_down(vhost: str, queue: str, leader: str) -> AmqpError:
    return AmqpError(
        404,
        f"NOT_FOUND - home node '{leader}' of queue '{queue}' in vhost '{vhost}' "
        "is down or inaccessible",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    name: str
    data_dir: Path
    raft_host: str  # bind address of the Raft port
    raft_port: int
    link_host: str
    link_port: int
    advertise_host: str  # how other nodes reach this one
    peers: tuple[tuple[str, str, int], ...]  # (name, host, raft port), self excluded
    secret: str
    amqp_address: str = ""
    management_address: str = ""
    queue_leader_locator: str = "client-local"
    durability: str = "fsync"  # or "os-cache" (cluster/journal.py)
    compaction_entries: int = 5000  # Raft log entries before a snapshot
    leader_follows_load: bool = True  # cluster/leadership.py

    @property
    def raft_address(self) -> str:
        return f"{self.advertise_host}:{self.raft_port}"


class Shell(Protocol):
    """What the cluster needs from the node that serves clients (node/server.py)."""

    state: StateMachine

    def execute(self, command: c.AnyCommand) -> Reply: ...

    def dispatch(self) -> None: ...

    def deliver_remote(self, delivery: wire.Delivery) -> bool: ...

    def remote_confirm(self, peer: str, ref: ChannelRef, seq: int, ok: bool) -> None: ...

    def absorb(self, effects: list[Effect]) -> None: ...

    def remote_cancel(self, ref: ChannelRef, tag: str) -> None: ...

    def peer_lost(self, node: str) -> None: ...

    def queue_moved(self) -> None: ...

    def replace_state(self, state: StateMachine) -> None: ...


class ClusterNode:
    def __init__(self, config: ClusterConfig, shell: Shell, log: EventLogger) -> None:
        self.config = config
        self.name = config.name
        self.shell = shell
        self.log = log.bind(component="cluster")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._inbox: deque[Callable[[], None]] = deque()
        self._inbox_ready = asyncio.Event()
        self._raft: RaftNode | None = None
        self._link = NodeLink(
            name=config.name,
            host=config.link_host,
            port=config.link_port,
            secret=config.secret,
            log=log,
            on_message=self._on_message,
            on_peer_up=self._on_peer_up,
            on_peer_down=self._on_peer_down,
            on_batch_end=shell.dispatch,
            # A leader whose consumed queues are backlogged reads forwarded publishes
            # slower: the sender's link buffer fills and slows its publishers.
            hold_reading=lambda: self.shell.state.flow_blocked(),
        )
        boot = os.urandom(4).hex()
        self._id_prefix = f"{config.name}\x00{boot}\x00".encode()
        self._ids = itertools.count(1)
        self._waiters: dict[bytes, asyncio.Future[Outcome | None]] = {}
        self._acks: dict[bytes, set[str]] = {}
        self._ack_events: dict[bytes, anyio.Event] = {}
        self._requests: dict[int, asyncio.Future[Reply]] = {}
        self._request_nodes: dict[int, str] = {}
        self._rids = itertools.count(1)
        # Proxy channels held here for other nodes' clients: connection id -> origin.
        self.remote_conns: dict[int, str] = {}
        self._applied_out: dict[str, list[bytes]] = {}
        self._down_since: dict[str, float] = {}
        # Peers that said READY on their current connection, and when each link came up.
        self._serving: set[str] = set()
        self._up_since: dict[str, float] = {}
        # Each member's `alive` at the last monitor turn, and when it was last seen
        # coming back (alive again): see REVIVED_GRACE_S.
        self._alive_seen: dict[str, bool] = {}
        self._revived_at: dict[str, float] = {}
        self._started = time.monotonic()
        self._leader_since = time.monotonic()
        self._tg: TaskGroup | None = None
        self._stopping = False  # run() is on its way out: spawn() starts nothing new
        self.ready = anyio.Event()
        self.leader_changes = 0
        self._last_leader: str | None = None
        self.forwarded_messages = 0
        self.forwarded_bytes = 0
        self.durable = DurableLog(self)
        self.leadership = LeadershipFollowsLoad(config.name, enabled=config.leader_follows_load)
        # From submitting an entry to applying it here (committed on a majority).
        self.commit_latency = Histogram(
            "warren_raft_commit_latency_seconds",
            "Time from submitting a Raft entry to its commit and apply on this node",
            registry=None,
            buckets=COMMIT_BUCKETS,
        )
        self.last_commit_latency = 0.0
        self._entry_waiters: dict[bytes, asyncio.Future[list[Outcome | None]]] = {}
        # Durable-log entries written here and not applied yet: entry bytes -> commands.
        self._own_entries: dict[bytes, list[tuple[c.AnyCommand, bytes | None]]] = {}

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def link(self) -> NodeLink:
        return self._link

    @property
    def raft(self) -> RaftNode:
        assert self._raft is not None
        return self._raft

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Link, Raft, announcement, then the monitor; `started()` once this node has
        caught up with the log and announced itself (it may then serve clients)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        cfg = self.config
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._applier)
            await tg.start(self._link.serve)
            raft_config = RaftConfig(
                self_address=(cfg.advertise_host, cfg.raft_port),
                peers=tuple((host, port) for _, host, port in cfg.peers),
                data_dir=cfg.data_dir,
                password=cfg.secret,
                bind_host=cfg.raft_host,
                max_entry_bytes=MAX_ENTRY_BYTES,
                durability=cfg.durability,
                log_compaction_min_entries=cfg.compaction_entries,
            )
            # Until it has caught up, the node only stores what the log holds.
            self.shell.state.begin_catch_up()
            self._raft = RaftNode(
                raft_config, self._apply_on_tick, self._snapshot_on_tick, self._restore_on_tick
            )
            self.log.info(
                "cluster.starting",
                raft=cfg.raft_address,
                link=f"{cfg.advertise_host}:{self._link.port}",
                peers=",".join(f"{n}={h}:{p}" for n, h, p in cfg.peers),
            )
            try:
                await self._wait_ready()
                # Announce before serving: pysyncobj is "ready" once this node applied its
                # own commit index, and a node elected leader just after a restart only
                # knows a stale one (the journal keeps it lazily). The rest of its log,
                # committed before the crash, applies once an entry of the new term
                # commits: this one. Applied while the node only stores, those messages
                # come back flagged redelivered; applied after `activate` they were fresh
                # copies of what it had already delivered (a chaos run's unflagged
                # duplicates: 106 messages, all delivered again 4 s later).
                await self._announce()
                self.shell.state.touch_queues(_now_ms())
                self.shell.absorb(self.shell.state.activate(_now_ms()))
                self.ready.set()
                for peer in self._link.up_peers():
                    self._link.send(peer, wire.ready())
                self._started = time.monotonic()
                self.log.info("cluster.ready", raft_leader=self.raft.status().leader)
                tg.start_soon(self._monitor)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self._stopping = True
                with anyio.CancelScope(shield=True):
                    raft = self._raft
                    self._raft = None
                    await anyio.to_thread.run_sync(raft.close)
                tg.cancel_scope.cancel()

    async def _wait_ready(self) -> None:
        started = time.monotonic()
        last_log = started
        while not await anyio.to_thread.run_sync(self.raft.wait_ready, 0.2):
            if time.monotonic() - last_log > 2.0:
                last_log = time.monotonic()
                status = self.raft.status()
                self.log.info(
                    "cluster.waiting",
                    reason="catching up with the raft log / no leader yet",
                    waited_s=round(last_log - started, 1),
                    raft_leader=status.leader,
                    connected=",".join(status.connected),
                )

    async def _announce(self) -> None:
        cfg = self.config
        member = c.Member(
            now_ms=_now_ms(),
            name=cfg.name,
            raft=cfg.raft_address,
            link=f"{cfg.advertise_host}:{self._link.port}",
            amqp=cfg.amqp_address,
            management=cfg.management_address,
        )
        while True:
            try:
                await self.replicate([member], wait_peers=False)
                return
            except ClusterUnavailable as exc:
                self.log.info("cluster.announce_retry", reason=str(exc))
                await anyio.sleep(0.5)

    # ---- Raft: entries in, on the loop -------------------------------------------------

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop, inside the applier task, after everything handed over
        before it (entries, restores and snapshots keep the log's order)."""
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._hand_over, fn)

    def _hand_over(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        self._inbox_ready.set()

    async def _applier(self) -> None:
        while True:
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            while self._inbox:
                fn = self._inbox.popleft()
                try:
                    fn()
                except Exception:
                    self.log.exception("raft.apply_failed")

    def _apply_on_tick(self, entry: bytes) -> bytes:
        # pysyncobj's thread: hand over, in order; the loop applies.
        self._call_on_loop(lambda: self._apply_entry(entry))
        return b""

    def _apply_entry(self, entry: bytes) -> None:
        entries = self._own_entries.pop(entry, None)
        if entries is None:
            try:
                entries = codec.decode_entry(entry)
            except codec.CodecError as exc:
                self.log.error("raft.entry_undecodable", size=len(entry), reason=str(exc))
                return
        state = self.shell.state
        outcomes = state.apply_logged(entries)
        if entries and entries[0][1] is not None:
            if type(entries[0][0]) in _DURABLE:
                self.leadership.count(_origin(entries[0][1]))
            entry_waiter = self._entry_waiters.pop(entries[0][1], None)
            if entry_waiter is not None and not entry_waiter.done():
                entry_waiter.set_result(outcomes)
        moved = False
        for (command, command_id), outcome in zip(entries, outcomes, strict=True):
            if outcome is not None and outcome.effects:
                self.shell.absorb(outcome.effects)
            if type(command) in _MOVES:
                moved = True
            if type(command) is c.Member:
                self._link_peer(command.name, command.link)
            if command_id is None:
                continue
            waiter = self._waiters.pop(command_id, None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(outcome)
            else:
                origin = _origin(command_id)
                if origin and origin != self.name:
                    self._applied_out.setdefault(origin, []).append(command_id)
        for origin, ids in self._applied_out.items():
            self._link.send(origin, wire.applied(tuple(ids)))
        self._applied_out.clear()
        if moved:
            self.shell.queue_moved()
        self.shell.dispatch()

    def _link_peer(self, name: str, link: str) -> None:
        """Dial a member's node link (as the replicated state announces it)."""
        if name != self.name and link:
            self._link.set_peer(name, _address(link))

    def _snapshot_on_tick(self) -> Callable[[BinaryIO], None]:
        """A capture of the state (on the loop, after every entry handed over before
        it); the Raft adapter writes it on a thread of its own."""
        box: concurrent.futures.Future[Callable[[BinaryIO], None]] = concurrent.futures.Future()

        def take() -> None:
            try:
                box.set_result(self.shell.state.snapshot_writer())
            except BaseException as exc:
                box.set_exception(exc)

        self._call_on_loop(take)
        return box.result(timeout=SNAPSHOT_WAIT_S)

    def _restore_on_tick(self, data: bytes) -> None:
        def restore() -> None:
            old = self.shell.state
            state = StateMachine.restore_topology(
                data, self.name, rewrite_headers=old._broker.rewrite_headers
            )
            state.touch_queues(_now_ms())
            if self.ready.is_set():
                self.shell.absorb(state.activate(_now_ms()))
            else:
                state.begin_catch_up()
            self.shell.replace_state(state)
            for member in state.members.values():
                self._link_peer(member.name, member.link)
            for peer in self._link.up_peers():
                self._send_reset(peer)
            self.log.info("raft.snapshot_restored", members=len(state.members))

        self._call_on_loop(restore)

    # ---- replicate ---------------------------------------------------------------------

    def new_id(self) -> bytes:
        return self._id_prefix + str(next(self._ids)).encode()

    async def replicate(
        self, commands: Sequence[c.AnyCommand], *, wait_peers: bool = True
    ) -> list[Outcome | None]:
        """Apply `commands` (one log entry) on every node; their outcomes here. Raises
        ClusterUnavailable when the cluster could not commit them in time."""
        raft = self._raft
        if raft is None:
            raise unavailable(self.name, "the node is stopping")
        ids = [self.new_id() for _ in commands]
        waiters: list[asyncio.Future[Outcome | None]] = []
        loop = asyncio.get_running_loop()
        for command_id in ids:
            waiter: asyncio.Future[Outcome | None] = loop.create_future()
            self._waiters[command_id] = waiter
            waiters.append(waiter)
        entry = codec.encode_batch(commands, command_ids=ids)
        last = ids[-1]
        if wait_peers:
            # Registered before submitting: other nodes may apply (and say so) before
            # this node's own submit returns.
            self._acks[last] = {p for p in self._link.up_peers() if p in self.shell.state.members}
            self._ack_events[last] = anyio.Event()
        started = time.perf_counter()
        try:
            try:
                await raft.submit_async(entry, REPLICATE_TIMEOUT_S, idempotent=True)
            except NotApplied as exc:
                raise unavailable(self.name, f"no Raft quorum ({exc})") from None
            except (MaybeApplied, RaftClosed) as exc:
                if not all(w.done() for w in waiters):
                    raise unavailable(self.name, f"no Raft quorum ({exc})") from None
            except RaftError as exc:
                raise unavailable(self.name, str(exc)) from None
            with anyio.move_on_after(APPLIED_WAIT_S):
                outcomes = [await w for w in waiters]
            if not all(w.done() for w in waiters):
                raise unavailable(self.name, "the entry was committed but not applied in time")
            self._committed(started)
            if wait_peers:
                await self._wait_applied(last)
        finally:
            for command_id in ids:
                self._waiters.pop(command_id, None)
            self._acks.pop(last, None)
            self._ack_events.pop(last, None)
        return outcomes

    async def log_entry(self, commands: Sequence[c.AnyCommand]) -> list[Outcome | None] | None:
        """One durable-log entry (cluster/durable.py): its commands' outcomes here once it
        is committed and applied, or None when that did not happen in time (it may still
        be applied later: its id makes a retry harmless)."""
        raft = self._raft
        if raft is None:
            return None
        command_id = self.new_id()
        waiter: asyncio.Future[list[Outcome | None]] = asyncio.get_running_loop().create_future()
        self._entry_waiters[command_id] = waiter
        ids: list[bytes | None] = [command_id] + [None] * (len(commands) - 1)
        entry = b""
        try:
            entry = codec.encode_batch(commands, command_ids=ids)
            # Applied here from these very commands, not decoded again (the codec gives
            # back equal ones, tests/unit/cluster/test_codec.py): a batch of persistent
            # messages is the hot path, and this node applies every entry it writes.
            self._own_entries[entry] = list(zip(commands, ids, strict=True))
            started = time.perf_counter()
            try:
                await raft.submit_async(entry, REPLICATE_TIMEOUT_S, idempotent=True)
            except (RaftError, ValueError) as exc:
                if not waiter.done():
                    self.log.warning(
                        "durable.not_committed", reason=str(exc), commands=len(commands)
                    )
                    return None
            with anyio.move_on_after(APPLIED_WAIT_S):
                outcomes = await waiter
                self._committed(started)
                return outcomes
            return None
        finally:
            self._entry_waiters.pop(command_id, None)
            self._own_entries.pop(entry, None)

    def _committed(self, started: float) -> None:
        self.last_commit_latency = latency = time.perf_counter() - started
        self.commit_latency.observe(latency)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` (async) in the node's task group; a bug in it is logged.
        Nothing starts once the node is stopping: a task that fails at once in the
        cancelled group and spawns its own retry (DurableLog._submit) would otherwise
        spin forever and keep the group, and so the process, from ending on SIGTERM."""
        assert self._tg is not None
        if self._stopping:
            return

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                self.log.exception("cluster.task_failed", task=getattr(fn, "__name__", "?"))

        self._tg.start_soon(guarded)

    async def _wait_applied(self, command_id: bytes) -> None:
        """Until every reachable node that had to apply `command_id` said it did."""
        with anyio.move_on_after(APPLIED_WAIT_S):
            while self._acks[command_id] & self._link.up_peers():
                event = self._ack_events[command_id]
                await event.wait()
                self._ack_events[command_id] = anyio.Event()

    def _on_applied(self, peer: str, ids: tuple[bytes, ...]) -> None:
        for command_id in ids:
            waiting = self._acks.get(command_id)
            if waiting is not None:
                waiting.discard(peer)
                self._ack_events[command_id].set()

    # ---- requests to other nodes -------------------------------------------------------

    async def call(self, node: str, command: c.AnyCommand) -> Reply:
        """A command answered by `node` (consume, get, purge, delete checks, counts)."""
        rid = next(self._rids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._requests[rid] = future
        self._request_nodes[rid] = node
        try:
            if not self._link.send(node, wire.request(rid, command)):
                raise ConnectionError(node)
            with anyio.fail_after(RPC_TIMEOUT_S):
                return await future
        finally:
            self._requests.pop(rid, None)
            self._request_nodes.pop(rid, None)

    def send_command(self, node: str, command: c.AnyCommand) -> bool:
        return self._link.send(node, wire.command(command))

    def forward(
        self,
        node: str,
        queues: tuple[str, ...],
        publish: c.Publish,
        seq: int,
        redelivered: bool = False,
    ) -> bool:
        payload = wire.enqueue(seq, queues, publish, redelivered)
        self.forwarded_messages += 1
        self.forwarded_bytes += len(payload)
        return self._link.send(node, payload)

    def link_backlogged(self) -> bool:
        """Forwarded messages wait in the link for a peer that reads them too slowly:
        publishers here should pause (credit flow across nodes)."""
        link = self._link
        return any(link.buffered_bytes(p) > LINK_HIGH_BYTES for p in link.up_peers())

    def _link_majority(self) -> bool:
        """This node and the members it reaches over the link are a majority."""
        members = self.shell.state.members
        reached = 1 + sum(1 for m in members if m != self.name and self._link.is_up(m))
        return reached * 2 > max(len(members), 1)

    def is_up(self, node: str) -> bool:
        return node == self.name or self._link.is_up(node)

    def serves(self, node: str) -> bool:
        """`node` has caught up and serves, as far as this node knows (READY)."""
        if node == self.name:
            return self.ready.is_set()
        return self._link.is_up(node) and node in self._serving

    # ---- effects the shell hands over --------------------------------------------------

    def remote_effect(self, effect: Deliver | CancelConsumer) -> None:
        """A delivery or cancel for a proxy channel: to the node of its client."""
        origin = self.remote_conns.get(effect.channel.conn)
        if origin is None:
            return
        if type(effect) is Deliver:
            message = effect.message
            payload = wire.delivery(
                effect.channel,
                effect.consumer_tag,
                effect.delivery_tag,
                effect.redelivered,
                False,
                "",
                "",
                message,
            )
            if not self._link.send(origin, payload):
                # Its node is gone: the proxy connection closes at peer_down (requeue).
                return
        else:
            self._link.send(origin, wire.cancel(effect.channel, effect.consumer_tag))

    def cluster_effects(self, effects: Sequence[Effect]) -> None:
        """Forward, RemoteSettle and Condemned effects, batching acks per channel."""
        acks: dict[tuple[str, ChannelRef], list[int]] = {}
        for effect in effects:
            if type(effect) is RemoteSettle:
                if not effect.leader:
                    continue
                if effect.op == "ack":
                    acks.setdefault((effect.leader, effect.channel), []).append(effect.tag)
                    continue
                self._flush_acks(acks)
                self.send_command(
                    effect.leader,
                    c.Nack(
                        now_ms=_now_ms(),
                        channel=effect.channel,
                        delivery_tag=effect.tag,
                        requeue=effect.requeue,
                        reject=effect.op == "reject",
                    ),
                )
            elif type(effect) is Forward:
                m = effect.message
                publish = c.new_publish(
                    _now_ms(),
                    ChannelRef(0, 0),
                    effect.vhost,
                    m.exchange,
                    m.routing_key,
                    False,
                    m.properties,
                    m.props,
                    m.body,
                )
                self.forward(effect.leader, (effect.queue,), publish, 0, m.redelivered)
            elif type(effect) is Condemned:
                assert self._tg is not None
                self._tg.start_soon(self._delete_condemned, effect)
        self._flush_acks(acks)

    def _flush_acks(self, acks: dict[tuple[str, ChannelRef], list[int]]) -> None:
        for (leader, channel), tags in acks.items():
            self.send_command(
                leader, c.AckMany(now_ms=_now_ms(), channel=channel, delivery_tags=tuple(tags))
            )
        acks.clear()

    async def _delete_condemned(self, effect: Condemned) -> None:
        command = c.DropQueue(
            now_ms=_now_ms(), vhost=effect.vhost, queue=effect.queue, touched=effect.touched
        )
        for _ in range(5):
            try:
                await self.replicate([command], wait_peers=False)
                return
            except ClusterUnavailable as exc:
                self.log.info("queue.delete_retry", queue=effect.queue, reason=str(exc))
                await anyio.sleep(1.0)

    # ---- the link ----------------------------------------------------------------------

    def _on_message(self, peer: str, payload: bytes) -> None:
        try:
            message = wire.decode(payload)
        except wire.WireError as exc:
            self.log.warning("link.bad_message", peer=peer, reason=str(exc))
            return
        kind = type(message)
        shell = self.shell
        if kind is wire.Enqueue:
            assert isinstance(message, wire.Enqueue)
            ok, effects = shell.state.enqueue_forwarded(
                message.publish, message.queues, message.redelivered
            )
            if effects:
                shell.absorb(effects)
            if message.seq:
                ref, seq = message.publish.channel, message.seq
                link = self._link

                def confirmed(logged: bool, ok: bool = ok) -> None:
                    link.send(peer, wire.confirm(ref, seq, ok and logged))

                if not self.durable.ticket(shell.state, confirmed):
                    link.send(peer, wire.confirm(ref, seq, ok))
        elif kind is wire.Delivery:
            assert isinstance(message, wire.Delivery)
            if not shell.deliver_remote(message) and not message.no_ack:
                self.send_command(
                    peer,
                    c.Nack(
                        now_ms=_now_ms(),
                        channel=message.channel,
                        delivery_tag=message.delivery_tag,
                        requeue=True,
                    ),
                )
        elif kind is wire.CommandMsg:
            assert isinstance(message, wire.CommandMsg)
            command = message.command
            conn = _conn_of(command)
            if conn is not None:
                if type(command) is c.CloseConnection:
                    self.remote_conns.pop(conn, None)
                else:
                    self.remote_conns[conn] = peer
            shell.execute(command)
        elif kind is wire.Request:
            assert isinstance(message, wire.Request)
            self._serve_request(peer, message)
        elif kind is wire.Response:
            assert isinstance(message, wire.Response)
            future = self._requests.get(message.request_id)
            if future is not None and not future.done():
                future.set_result(message.reply)
        elif kind is wire.Confirm:
            assert isinstance(message, wire.Confirm)
            shell.remote_confirm(peer, message.channel, message.seq, message.ok)
        elif kind is wire.Applied:
            assert isinstance(message, wire.Applied)
            self._on_applied(peer, message.ids)
        elif kind is wire.CancelNotify:
            assert isinstance(message, wire.CancelNotify)
            shell.remote_cancel(message.channel, message.consumer_tag)
        elif kind is wire.Reset:
            self._serving.discard(peer)  # (a READY follows if it serves)
            self._peer_gone(peer)
            if self.ready.is_set():
                self._link.send(peer, wire.ready())  # (its view of us starts over too)
        elif kind is wire.Ready:
            self._serving.add(peer)
            self._down_since.pop(peer, None)

    def _serve_request(self, peer: str, request: wire.Request) -> None:
        command = request.command
        shell = self.shell
        conn = _conn_of(command)
        if conn is not None:
            self.remote_conns[conn] = peer
        reply: Reply
        if type(command) is c.DeleteQueue:
            reply = shell.state.check_delete(command)
        elif type(command) is c.DeclareQueue:
            counts = shell.state.queue_counts(command.vhost, command.queue)
            reply = (
                Count(0) if counts is None else QueueDeclared(command.queue, counts[0], counts[1])
            )
        else:
            reply = shell.execute(command)
        # Deliveries the command caused go at the end of this read (on_batch_end), so
        # after the consume-ok / get-ok on the same ordered link.
        self._link.send(peer, wire.response(request.request_id, reply))

    def _on_peer_up(self, peer: str) -> None:
        """A (new) connection to `peer`: whatever it held for this node's clients, and
        this node for its clients, may be stale (either side may have restarted, or the
        link dropped one way only): RESET, first on the new connection, makes it drop
        both, as this node did when the link went down. Then READY if this node serves
        (the peer answers a RESET with its own READY if it does). When the link went
        down stays recorded until the peer says READY: back on the link, but not
        serving, it is still down (see judge_members)."""
        self._revived_at.pop(peer, None)
        self._up_since[peer] = time.monotonic()
        self.log.info("link.peer_up", peer=peer)
        self._send_reset(peer)

    def _send_reset(self, peer: str) -> None:
        """RESET, then READY if this node serves: a peer forgets that this node serves
        on a RESET (a restarted node's first message), and learns it again from READY."""
        self._link.send(peer, wire.reset())
        if self.ready.is_set():
            self._link.send(peer, wire.ready())

    def _on_peer_down(self, peer: str) -> None:
        self._down_since[peer] = time.monotonic()
        self._serving.discard(peer)
        self._up_since.pop(peer, None)
        self.log.info("link.peer_down", peer=peer)
        self._peer_gone(peer)

    def _peer_gone(self, peer: str) -> None:
        """`peer` lost what it held for us, or we cannot reach it: close the proxy channels
        of its clients here (their unacked messages are requeued, redelivered), fail its
        requests, and let the shell cancel consumers and fail confirms pending there."""
        for conn, origin in list(self.remote_conns.items()):
            if origin == peer:
                del self.remote_conns[conn]
                self.shell.execute(c.CloseConnection(now_ms=_now_ms(), conn=conn))
        for rid, node in list(self._request_nodes.items()):
            future = self._requests.get(rid)
            if node == peer and future is not None and not future.done():
                future.set_exception(ConnectionError(peer))
        for command_id, waiting in self._acks.items():
            if peer in waiting:
                waiting.discard(peer)
                self._ack_events[command_id].set()
        self.shell.peer_lost(peer)
        self.shell.dispatch()

    # ---- the Raft leader's watch over the members --------------------------------------

    async def _monitor(self) -> None:
        while True:
            await anyio.sleep(MONITOR_PERIOD_S)
            raft = self._raft
            if raft is None:
                return
            status = raft.status()
            now = time.monotonic()
            if status.leader != self._last_leader:
                self.leader_changes += 1
                self._last_leader = status.leader
                self._leader_since = now
                self.log.info("raft.leader", leader=status.leader, term=status.term)
            self._follow_load(now, status.role == "leader")
            self._note_revivals(now)
            if status.role != "leader":
                continue
            # Judge members only as a leader that reaches a majority over the link itself:
            # a leader cut off from the others must not propose that they are down (such
            # an entry could still commit once the partition heals). A member this node
            # saw go down (its link dropped, as any node records) is judged at once, also
            # by a leader elected just now because the old one died, and by a node that
            # started just now: that saves the graces below on every failover of a queue
            # whose node also led Raft, and a node that restarts and is elected at once
            # must not leave the dead leader's queues on it (they would wait for it, and
            # it serves nothing until it has caught up). One it never reached only once
            # this node has run and led for a while (links come up).
            if not self._link_majority():
                continue
            settled = (
                now - self._leader_since >= LEADER_GRACE_S
                and now - self._started >= STARTUP_GRACE_S
            )
            members = list(self.shell.state.members.values())
            verdicts = judge_members(
                self.name, members, self._link.is_up, self._serving.__contains__,
                self._down_since, self._up_since, self._revived_at, now, settled,
            )  # fmt: skip
            for down, name in verdicts:
                command = c.NodeDown if down else c.NodeUp
                await self._replicate_quietly(command(now_ms=_now_ms(), node=name))

    def _note_revivals(self, now: float) -> None:
        """Members alive again since the last turn (a restarted node announced itself):
        when it went down no longer counts (the stale time would have it declared down
        again at once, before the link redials it), and REVIVED_GRACE_S starts."""
        seen = self._alive_seen
        for name, member in self.shell.state.members.items():
            if member.alive and seen.get(name) is False:
                self._revived_at[name] = now
                self._down_since.pop(name, None)
            seen[name] = member.alive

    def _follow_load(self, now: float, leading: bool) -> None:
        """Hand Raft leadership to the node writing the most durable entries (see
        cluster/leadership.py), once this node has led for a while."""
        steady = leading and now - self._leader_since >= STARTUP_GRACE_S
        members = self.shell.state.members
        candidates = [
            name for name, m in members.items() if m.alive and m.raft and self._link.is_up(name)
        ]
        target = self.leadership.check(now, steady, candidates)
        if target is None or self._raft is None:
            return
        raft, address = self._raft, _address(members[target].raft)

        def start() -> asyncio.Future[bool]:
            return asyncio.wrap_future(raft.transfer_leadership(address))

        self.log.info("raft.leadership_transfer", target=target)
        self.spawn(self.leadership.transfer, target, start, self.log.info)

    async def _replicate_quietly(self, command: c.AnyCommand) -> None:
        try:
            await self.replicate([command], wait_peers=False)
            self.log.info(
                "cluster." + type(command).__name__.lower(), node=getattr(command, "node", "")
            )
        except ClusterUnavailable as exc:
            self.log.info("cluster.command_failed", command=type(command).__name__, reason=str(exc))

    # ---- operators ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        state = self.shell.state
        raft = self._raft
        counts = state.leader_counts()
        members = []
        raft_status = raft.status() if raft is not None else None
        for member in sorted(state.members.values(), key=lambda m: m.name):
            members.append(
                {
                    "name": member.name,
                    "raft_address": member.raft,
                    "amqp_address": member.amqp or None,
                    "link_address": member.link or None,
                    "management_address": member.management or None,
                    "reachable": self.is_up(member.name),
                    "serving": self.serves(member.name),
                    "alive": member.alive,
                    "queues_led": counts.get(member.name, 0),
                }
            )
        leader_name = None
        if raft_status is not None and raft_status.leader is not None:
            leader_name = next(
                (m.name for m in state.members.values() if m.raft == raft_status.leader),
                raft_status.leader,
            )
        # pysyncobj counts open TCP connections, which a silent partition keeps for its
        # 60 s connection timeout; the link notices within seconds.
        quorum = bool(raft_status and raft_status.has_quorum and raft_status.leader)
        quorum = quorum and self._link_majority()
        return {
            "node": self.name,
            "raft": {
                "leader": leader_name,
                "role": raft_status.role if raft_status else "stopped",
                "term": raft_status.term if raft_status else 0,
                "commit_index": raft_status.commit_index if raft_status else 0,
                "last_applied": raft_status.last_applied if raft_status else 0,
                "has_quorum": quorum,
                "leader_changes": self.leader_changes,
                "leader_follows_load": self.leadership.enabled,
                "leadership_transfers": self.leadership.transfers,
            },
            "members": members,
            "queues": sum(counts.values()),
            "durable": {
                # messages in this node's copies of the durable queues' logs
                "logged_messages": state.logged_messages(),
                "entries_written": self.durable.entries,
                "messages_written": self.durable.messages,
                "entries_failed": self.durable.failures,
                "last_snapshot_seconds": round(raft.last_dump_seconds, 3) if raft else 0.0,
                "last_snapshot_bytes": raft.last_dump_bytes if raft else 0,
            },
        }

    async def rebalance(self) -> dict[str, Any]:
        """Move queue leaders so that every live member leads about as many (exclusive
        queues stay with their connection's node)."""
        state = self.shell.state
        movable = [
            (v, q, leader) for v, q, leader, exclusive in state.queue_leaders() if not exclusive
        ]
        moves = placement.rebalance(movable, state.alive())
        current = {(v, q): leader for v, q, leader in movable}
        commands: list[c.AnyCommand] = [
            c.SetLeader(now_ms=_now_ms(), vhost=v, queue=q, leader=n, expect=current[(v, q)])
            for v, q, n in moves
        ]
        if commands:
            await self.replicate(commands)
        return {"moved": len(commands), "leaders": state.leader_counts()}

    async def add_member(self, name: str, raft_address: str) -> None:
        future = self.raft.add_member(_address(raft_address))
        try:
            await asyncio.wrap_future(future)
        except RaftError as exc:
            raise unavailable(self.name, f"add-member {name}: {exc}") from None

    async def remove_member(self, name: str) -> None:
        member = self.shell.state.members.get(name)
        if member is None:
            raise ClusterUnavailable(AmqpError(404, f"no member named {name!r}"))
        try:
            await asyncio.wrap_future(self.raft.remove_member(_address(member.raft)))
        except RaftError as exc:
            raise unavailable(self.name, f"remove-member {name}: {exc}") from None
        await self.replicate([c.ForgetMember(now_ms=_now_ms(), node=name)])
        self._link.remove_peer(name)


_MOVES = frozenset({c.SetLeader, c.NodeDown, c.ForgetMember, c.DeleteQueue, c.DropQueue})


def judge_members(
    me: str,
    members: Sequence[MemberInfo],
    is_up: Callable[[str], bool],
    serves: Callable[[str], bool],
    down_since: dict[str, float],
    up_since: Mapping[str, float],
    revived_at: dict[str, float],
    now: float,
    settled: bool,
) -> list[tuple[bool, str]]:
    """The Raft leader's verdicts on the members this turn: (True, name) to replicate
    NodeDown, (False, name) for NodeUp.

    A live member whose link is down is judged down once it has been down for
    DOWN_AFTER_S: at once counting from when this node saw its link drop (`down_since`),
    or, for one this node never reached, only when `settled` (this node has run and led
    for a while: links come up), counting from now (recorded in `down_since`). A member
    just back (`revived_at`) gets REVIVED_GRACE_S for the link to redial it.

    A live member whose link this node saw drop and come back up (`up_since`), and that
    has not said it serves (`serves`: READY) within READY_WAIT_S, is judged down too: it
    restarted and is catching up, and its queues would wait for it meanwhile (it refuses
    what is forwarded to it until it serves).

    A dead member is judged up when `settled`, its link is up and it serves: one that is
    still catching up is not, so it is no target for the next dead member's queues (once
    it serves it announces itself, which makes it alive as well)."""
    verdicts: list[tuple[bool, str]] = []
    for member in members:
        name = member.name
        if name == me:
            continue
        up = is_up(name)
        serving = up and serves(name)
        if member.alive and not serving:
            if now - revived_at.get(name, -math.inf) < REVIVED_GRACE_S:
                continue  # just back: the link has not redialed it yet
            since = down_since.get(name)
            if up:
                if since is None or now - up_since.get(name, now) < READY_WAIT_S:
                    continue  # not seen going down, or the link is only just back
            elif since is None:
                if not settled:
                    continue
                since = down_since.setdefault(name, now)
            if now - since >= DOWN_AFTER_S:
                verdicts.append((True, name))
        elif not member.alive and serving and settled:
            verdicts.append((False, name))
    return verdicts


def _now_ms() -> int:
    return int(time.time() * 1000)


def _address(text: str) -> tuple[str, int]:
    """ "host:port" (as members announce their addresses) as a socket address."""
    host, _, port = text.rpartition(":")
    return host, int(port)


_DURABLE: Final = (c.Persist, c.Settle)  # a durable-log entry starts with one of these


def _origin(command_id: bytes) -> str:
    name, sep, _ = command_id.partition(b"\x00")
    return name.decode("utf-8", "replace") if sep else ""


def _conn_of(command: c.AnyCommand) -> int | None:
    channel = getattr(command, "channel", None)
    if isinstance(channel, ChannelRef):
        return channel.conn
    conn = getattr(command, "conn", None)
    return conn if isinstance(conn, int) else None
