"""cluster/raft.py against real pysyncobj members on 127.0.0.1 (one process, free ports).

Each member replicates into a tiny state machine (a list of entries). The tests check
what the node core will rely on: same entries in the same order everywhere, commits with
a member down, catch-up of a restarted member from its data dir, an apply that raises
not wedging anyone, the cluster secret, and peers with the wrong password kept out.
"""

from __future__ import annotations

import asyncio
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.config import SERIALIZER_STATE

from cluster.journal import DurableJournal
from cluster.raft import (
    ApplyFailed,
    MaybeApplied,
    NotApplied,
    RaftConfig,
    RaftError,
    RaftNode,
    load_or_create_secret,
)

PASSWORD = "test-cluster-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ListMachine:
    """Deterministic toy state: the list of applied entries; b"boom" raises; an entry
    applied before is skipped (as Warren's state machine skips a command id it saw)."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.restores = 0
        self.lock = threading.Lock()

    def apply(self, entry: bytes) -> bytes:
        if entry == b"boom":
            raise RuntimeError("boom")
        with self.lock:
            if entry not in self.entries:
                self.entries.append(entry)
            return b"ok:%d" % len(self.entries)

    def snapshot(self) -> bytes:
        with self.lock:
            return b"".join(len(e).to_bytes(4, "big") + e for e in self.entries)

    def restore(self, data: bytes) -> None:
        out, i = [], 0
        while i < len(data):
            n = int.from_bytes(data[i : i + 4], "big")
            out.append(data[i + 4 : i + 4 + n])
            i += 4 + n
        with self.lock:
            self.entries = out
            self.restores += 1

    def copy(self) -> list[bytes]:
        with self.lock:
            return list(self.entries)


class Member:
    def __init__(self, config: RaftConfig) -> None:
        self.config = config
        self.machine = ListMachine()
        self.node = RaftNode(
            config, self.machine.apply, self.machine.snapshot, self.machine.restore
        )


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., list[Member]]]:
    started: list[Member] = []

    def make(n: int = 3, passwords: list[str] | None = None, **kw: object) -> list[Member]:
        addrs = [("127.0.0.1", free_port()) for _ in range(n)]
        members = []
        for i, addr in enumerate(addrs):
            cfg = RaftConfig(
                self_address=addr,
                peers=tuple(a for a in addrs if a != addr),
                data_dir=tmp_path / f"n{i}",
                password=passwords[i] if passwords else PASSWORD,
                **kw,  # type: ignore[arg-type]
            )
            members.append(Member(cfg))
        started.extend(members)
        return members

    def restart(old: Member) -> Member:
        old.node.close()
        new = Member(old.config)
        started.append(new)
        return new

    make.restart = restart  # type: ignore[attr-defined]
    yield make
    for m in started:
        m.node.close()


def leader_of(members: list[Member], timeout: float = 10.0) -> Member:
    found: list[Member] = []

    def one_leader() -> bool:
        leaders = [m for m in members if m.node.status().role == "leader"]
        if len(leaders) == 1 and all(
            m.node.status().leader == leaders[0].node.status().self_address for m in members
        ):
            found[:] = leaders
            return True
        return False

    wait_until(one_leader, timeout, "one leader known to every member")
    return found[0]


@pytest.mark.timeout(30)
def test_three_members_apply_the_same_entries_in_the_same_order(
    make_cluster: Callable[..., list[Member]],
) -> None:
    members = make_cluster(3)
    leader = leader_of(members)
    follower = next(m for m in members if m is not leader)
    futures = []
    for i in range(30):
        via = leader if i % 2 == 0 else follower
        futures.append(via.node.submit(b"e%d" % i))
    results = [f.result(timeout=10) for f in futures]
    assert all(r.startswith(b"ok:") for r in results)
    # Read-your-writes on the submitting member: applied there when its future resolves.
    assert b"e29" in follower.machine.copy()
    wait_until(lambda: all(len(m.machine.copy()) == 30 for m in members), 5, "all applied")
    order = members[0].machine.copy()
    assert sorted(order) == sorted(b"e%d" % i for i in range(30))
    assert all(m.machine.copy() == order for m in members)
    statuses = [m.node.status() for m in members]
    assert all(s.is_ready and s.leader == leader.node.status().self_address for s in statuses)
    assert all(len(s.members) == 3 for s in statuses)
    assert {s.role for s in statuses} == {"leader", "follower"}


def thirty_applied(
    make_cluster: Callable[..., list[Member]],
) -> tuple[list[Member], Member, Member]:
    """Three members compacting every 20 entries, 30 entries applied on the leader and a
    follower: (members, leader, follower)."""
    members = make_cluster(3, log_compaction_min_entries=20)
    leader = leader_of(members)
    for i in range(30):
        leader.node.submit(b"a%d" % i).result(timeout=10)
    follower = next(m for m in members if m is not leader)
    wait_until(lambda: len(follower.machine.copy()) == 30, 5, "the follower applied them")
    return members, leader, follower


def compact(member: Member) -> None:
    dump = member.config.dump_file
    before = dump.stat().st_mtime_ns if dump.exists() else 0
    member.node.force_compaction()
    wait_until(lambda: dump.exists() and dump.stat().st_mtime_ns != before, 5, "compacted")


@pytest.mark.timeout(40)
def test_two_of_three_commit_and_a_restarted_member_catches_up(
    make_cluster: Callable[..., list[Member]],
) -> None:
    # Compact often so the restart goes through our dump format, not only the journal.
    members, leader, victim = thirty_applied(make_cluster)
    wait_until(lambda: victim.config.dump_file.exists(), 10, "victim wrote a full dump")
    victim.node.close()

    survivors = [m for m in members if m is not victim]
    for i in range(40):
        survivors[i % 2].node.submit(b"b%d" % i).result(timeout=10)
    # The survivors compacted past what the victim has: it needs the leader's snapshot.
    compact(leader)

    reborn = make_cluster.restart(victim)  # type: ignore[attr-defined]
    expected = leader.machine.copy()
    assert len(expected) == 70
    wait_until(lambda: reborn.machine.copy() == expected, 15, "restarted member caught up")
    assert reborn.node.wait_ready(5)
    # Its own dump at restart, then the leader's snapshot (its log was compacted past ours).
    assert reborn.machine.restores == 2
    # And it takes part again.
    reborn.node.submit(b"after").result(timeout=10)
    wait_until(
        lambda: all(m.machine.copy()[-1:] == [b"after"] for m in [*survivors, reborn]),
        5,
        "everyone applied the entry submitted by the restarted member",
    )


@pytest.mark.timeout(40)
def test_a_member_does_not_go_back_to_a_snapshot_it_has_applied(
    make_cluster: Callable[..., list[Member]],
) -> None:
    """pysyncobj's leader sends its snapshot to any member whose next index is at or
    below the start of its log, and kept doing so after the member had installed it (a
    chaos run saw one member install the same snapshot five times in 0.6 s). A member
    that has applied what the snapshot holds refuses it and asks for the entries after
    its own: installing it would take its state back and apply entries a second time."""
    _, leader, follower = thirty_applied(make_cluster)
    compact(leader)
    restores = follower.machine.restores
    # As after a stale reset: the leader believes the follower needs its snapshot.
    replica = leader.node._replica
    next_index = replica._SyncObj__raftNextIndex
    address = follower.node.status().self_address
    node = next(n for n in next_index if str(n) == address)
    next_index[node] = 1
    for i in range(10):
        leader.node.submit(b"b%d" % i).result(timeout=10)
    expected = leader.machine.copy()
    wait_until(lambda: follower.machine.copy() == expected, 10, "the follower caught up")
    assert follower.machine.restores == restores  # never went back to the snapshot
    assert len(expected) == 40


@pytest.mark.timeout(40)
def test_a_refused_candidate_ahead_of_the_leaders_disconnect_still_hurries_the_election(
    make_cluster: Callable[..., list[Member]],
) -> None:
    """When the leader's connection closes, the member first in rank stands at once and
    the next one ELECTION_STEP_S later. Here the first one's log is behind: the other
    refuses it. That member sees the candidate's request_vote before its own notice of
    the leader's disconnect (held back here until then); pysyncobj has forgotten the
    leader on the higher term by the time the notice comes. The member must still stand
    in its own slot, not after raft_min_timeout (0.8 s)."""
    members = make_cluster()
    leader = leader_of(members)
    first, second = sorted(
        (m for m in members if m is not leader), key=lambda m: m.node.status().self_address
    )
    first_replica, second_replica = first.node._replica, second.node._replica

    # `first` misses the next entry, which `leader` and `second` commit: its log is behind.
    deaf = threading.Event()
    deaf.set()

    def first_gets(node: Any, message: Any) -> None:
        if not (deaf.is_set() and message.get("type") == "append_entries"):
            first_replica._on_message(node, message)

    first_replica._SyncObj__transport.setOnMessageReceivedCallback(first_gets)
    # `second` notices a disconnect only after the next request_vote it gets.
    held: list[Any] = []

    def second_gets(node: Any, message: Any) -> None:
        second_replica._on_message(node, message)
        if message.get("type") == "request_vote":
            while held:
                second_replica._on_node_disconnected(held.pop())

    second_transport = second_replica._SyncObj__transport
    second_transport.setOnNodeDisconnectedCallback(held.append)
    second_transport.setOnMessageReceivedCallback(second_gets)

    leader.node.submit(b"only-two-have-it").result(timeout=10)
    wait_until(lambda: second.machine.copy()[-1:] == [b"only-two-have-it"], 5, "second applied")
    assert first.machine.copy()[-1:] != [b"only-two-have-it"]
    term = leader.node.status().term
    leader.node.close()  # (returns once its tick thread has closed the sockets)
    closed = time.monotonic()
    deaf.clear()
    wait_until(lambda: second.node.status().role == "leader", 10, "second elected")
    took = time.monotonic() - closed
    print(f"\nsecond elected {took * 1000:.0f} ms after the leader closed")
    assert second.node.status().term > term + 1  # (first stood in term + 1 and lost)
    assert took < 0.5, f"second was elected {took:.2f}s after the leader closed"
    second.node.submit(b"after").result(timeout=10)
    wait_until(lambda: first.machine.copy()[-1:] == [b"after"], 5, "first caught up")


@pytest.mark.timeout(20)
def test_a_dump_written_while_a_snapshot_was_installed_is_discarded(tmp_path: Path) -> None:
    """Our own dump is written by a thread; if the leader's (newer) snapshot is renamed
    over the dump file meanwhile, ours must not replace it: at the next start the
    journal would not begin at the dump's entries and pysyncobj would clear it."""
    cfg = RaftConfig(
        self_address=("127.0.0.1", free_port()), peers=(), data_dir=tmp_path, password=PASSWORD
    )
    member = Member(cfg)
    node = member.node
    target = cfg.dump_file
    target.write_bytes(b"the leader's snapshot")

    def writer(out: Any) -> None:
        out.write(b"our older state")
        node.dumps_installed += 1  # as if an install completed while we were writing

    node._dump_in_background(target, b"{}", writer, node.dumps_installed)
    assert target.read_bytes() == b"the leader's snapshot"
    assert node._check_dump() == SERIALIZER_STATE.FAILED
    assert not target.with_name(target.name + ".writing").exists()
    node._dump_in_background(target, b"{}", lambda out: out.write(b"x"), node.dumps_installed)
    assert target.read_bytes() != b"the leader's snapshot"  # nothing installed: it is ours
    assert node._check_dump() == SERIALIZER_STATE.SUCCESS


@pytest.mark.timeout(30)
def test_an_apply_that_raises_does_not_wedge_the_cluster(
    make_cluster: Callable[..., list[Member]],
) -> None:
    members = make_cluster(3)
    leader = leader_of(members)
    leader.node.submit(b"before").result(timeout=10)
    with pytest.raises(ApplyFailed, match="boom"):
        leader.node.submit(b"boom").result(timeout=10)
    for m in members:
        m.node.submit(b"after-" + m.node.status().self_address.encode()).result(timeout=10)
    wait_until(lambda: all(len(m.machine.copy()) == 4 for m in members), 5, "all applied")
    assert all(m.machine.copy() == members[0].machine.copy() for m in members)
    wait_until(lambda: all(m.node.status().apply_errors == 1 for m in members), 5, "errors counted")


@pytest.mark.timeout(30)
def test_submit_async_and_minority_refusal(make_cluster: Callable[..., list[Member]]) -> None:
    members = make_cluster(3)
    leader = leader_of(members)
    follower = next(m for m in members if m is not leader)

    async def drive() -> list[bytes]:
        return list(
            await asyncio.gather(*(follower.node.submit_async(b"x%d" % i) for i in range(5)))
        )

    assert all(r.startswith(b"ok:") for r in asyncio.run(drive()))

    # Alone, a member cannot commit: the caller gets an error within its deadline.
    for m in members:
        if m is not follower:
            m.node.close()
    started = time.monotonic()
    with pytest.raises((MaybeApplied, NotApplied)):
        follower.node.submit(b"lonely", timeout=1.0).result(timeout=5)
    assert time.monotonic() - started < 2.5
    assert b"lonely" not in follower.machine.copy()


@pytest.mark.timeout(40)
def test_leadership_transfer_under_a_stream_of_submits_loses_nothing(
    make_cluster: Callable[..., list[Member]],
) -> None:
    members = make_cluster(3)
    leader = leader_of(members)
    target, other = (m for m in members if m is not leader)
    stop = threading.Event()
    futures: dict[str, list[Any]] = {"leader": [], "target": [], "other": []}

    def stream(name: str, member: Member) -> None:
        i = 0
        while not stop.is_set():
            entry = b"%s-%d" % (name.encode(), i)
            futures[name].append(member.node.submit(entry, idempotent=True))
            i += 1
            time.sleep(0.002)

    threads = [
        threading.Thread(target=stream, args=(name, m), daemon=True)
        for name, m in (("leader", leader), ("target", target), ("other", other))
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    moved = leader.node.transfer_leadership(target.config.self_address).result(timeout=5)
    took = time.monotonic() - started
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(5)
    assert moved, "the target did not become the leader"
    assert took < 1.0
    assert leader_of(members) is target
    submitted = [f for fs in futures.values() for f in fs]
    results = [f.result(timeout=10) for f in submitted]  # raises on any failed entry
    assert all(r.startswith(b"ok:") for r in results)
    wait_until(
        lambda: all(len(m.machine.copy()) == len(submitted) for m in members), 10, "all applied"
    )
    order = members[0].machine.copy()
    assert all(m.machine.copy() == order for m in members)
    assert len(set(order)) == len(order) == len(submitted)  # each entry exactly once
    # Only a leader transfers, and one transfer at a time.
    assert not leader.node.transfer_leadership(other.config.self_address).result(timeout=5)


@pytest.mark.timeout(30)
def test_membership_removal(make_cluster: Callable[..., list[Member]]) -> None:
    members = make_cluster(3)
    leader = leader_of(members)
    gone = next(m for m in members if m is not leader)
    gone.node.close()
    leader.node.remove_member(gone.config.self_address).result(timeout=10)
    rest = [m for m in members if m is not gone]
    wait_until(lambda: all(len(m.node.status().members) == 2 for m in rest), 5, "membership shrank")
    # Two members now form the whole cluster; both still commit.
    for m in rest:
        m.node.submit(b"two").result(timeout=10)


@pytest.mark.timeout(30)
def test_peers_with_the_wrong_password_do_not_join(
    make_cluster: Callable[..., list[Member]],
) -> None:
    members = make_cluster(3, passwords=[PASSWORD, PASSWORD, "intruder"])
    good, intruder = members[:2], members[2]
    leader = leader_of(good)
    for i in range(5):
        leader.node.submit(b"s%d" % i).result(timeout=10)
    time.sleep(1.0)
    assert intruder.machine.copy() == []
    status = intruder.node.status()
    assert status.leader is None
    assert status.connected == ()
    assert intruder.config.self_address[1] not in {
        int(a.rsplit(":", 1)[1]) for s in [m.node.status() for m in good] for a in s.connected
    }


def test_cluster_secret_is_generated_once_and_reused(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path / "d")
    again = load_or_create_secret(tmp_path / "d")
    assert first == again
    assert len(first) >= 32
    mode = stat.S_IMODE((tmp_path / "d" / "raft.secret").stat().st_mode)
    assert mode == 0o600


@pytest.mark.timeout(20)
def test_single_member_without_password_generates_and_reuses_its_secret(tmp_path: Path) -> None:
    cfg = RaftConfig(self_address=("127.0.0.1", free_port()), peers=(), data_dir=tmp_path)
    m = Member(cfg)
    try:
        assert m.node.submit(b"solo").result(timeout=10) == b"ok:1"
    finally:
        m.node.close()
    secret = (tmp_path / "raft.secret").read_text()
    m2 = Member(cfg)
    try:
        wait_until(lambda: m2.machine.copy() == [b"solo"], 5, "journal replayed on restart")
    finally:
        m2.node.close()
    assert (tmp_path / "raft.secret").read_text() == secret


def test_config_refuses_unsafe_tuning(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="raft_min_timeout"):
        RaftConfig(
            self_address=("127.0.0.1", 1),
            peers=(),
            data_dir=tmp_path,
            append_entries_period=0.3,  # 3 x 0.3 is not below the 0.8 s minimum timeout
        )
    m = Member(RaftConfig(self_address=("127.0.0.1", free_port()), peers=(), data_dir=tmp_path))
    try:
        with pytest.raises(TypeError):
            m.node.submit("not bytes")  # type: ignore[arg-type]
    finally:
        m.node.close()


def test_errors_are_raft_errors() -> None:
    assert issubclass(MaybeApplied, RaftError)
    assert issubclass(NotApplied, RaftError)
    assert issubclass(ApplyFailed, RaftError)


@pytest.mark.timeout(30)
def test_entries_larger_than_64k_replicate_and_oversized_ones_are_refused(
    make_cluster: Callable[..., list[Member]],
) -> None:
    # pysyncobj's own chunked path for single entries >= its batch size is broken;
    # the adapter sizes the batch above max_entry_bytes so it is never used.
    members = make_cluster(3, max_entry_bytes=300_000)
    leader = leader_of(members)
    follower = next(m for m in members if m is not leader)
    big = bytes(range(256)) * 800  # 204,800 bytes
    follower.node.submit(big).result(timeout=10)
    wait_until(lambda: all(m.machine.copy() == [big] for m in members), 5, "big entry everywhere")
    with pytest.raises(ValueError, match="max_entry_bytes"):
        leader.node.submit(bytes(300_001))


@pytest.mark.timeout(40)
@pytest.mark.parametrize("durability", ["fsync", "os-cache"])
def test_a_closed_and_reopened_cluster_replays_its_durable_journals(
    make_cluster: Callable[..., list[Member]], durability: str
) -> None:
    members = make_cluster(3, durability=durability)
    leader = leader_of(members)
    want = [b"d%d" % i for i in range(20)]
    for e in want:
        leader.node.submit(e).result(timeout=10)
    wait_until(lambda: all(m.machine.copy() == want for m in members), 5, "all applied")
    for m in members:
        m.node.close()
    for m in members:
        # Our own format, holding every entry (pysyncobj wraps each in its call record).
        assert m.config.journal_file.read_bytes()[:8] == b"WARRJRNL"
        journal = DurableJournal(m.config.journal_file, durability)
        try:
            logged = b"".join(command for command, _, _ in journal[:])
        finally:
            journal.close()
        assert all(e in logged for e in want)

    reborn = [make_cluster.restart(m) for m in members]  # type: ignore[attr-defined]
    wait_until(lambda: all(m.machine.copy() == want for m in reborn), 15, "replayed")
    assert all(m.machine.restores == 0 for m in reborn)  # from the journal, not a dump
    leader_of(reborn).node.submit(b"after").result(timeout=10)
    wait_until(lambda: all(m.machine.copy() == [*want, b"after"] for m in reborn), 5, "after")


def test_a_pysyncobj_format_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / "raft.journal").write_bytes(b"PYSYNCOBJ" + bytes(31))
    cfg = RaftConfig(
        self_address=("127.0.0.1", free_port()), peers=(), data_dir=tmp_path, password=PASSWORD
    )
    with pytest.raises(ValueError, match=r"pysyncobj's own format.*empty data dir"):
        Member(cfg)


def test_config_refuses_an_unknown_durability(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        RaftConfig(self_address=("127.0.0.1", 1), peers=(), data_dir=tmp_path, durability="none")
