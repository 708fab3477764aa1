"""cluster/journal.py: the durable Raft journal, on real files in a temp dir.

Round trips across reopen, truncation at both ends, torn tails and CRC damage, term and
vote, list semantics of indexing, the power-loss model (sync marks) in both durability
modes, the number of fsyncs per add, and a hypothesis model test against a plain list.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.journal import SYNC_MARKS_ENV, DurableJournal, simulate_power_loss

ROOT = Path(__file__).resolve().parents[3]
HEADER_LEN = 12  # magic (8) + version (4)
RECORD_HEAD = 24  # length, crc32, idx, term


def entries(n: int, start: int = 1, term: int = 1) -> list[tuple[bytes, int, int]]:
    return [(b"cmd-%d" % i * (i % 7 + 1), i, term + i // 10) for i in range(start, start + n)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "raft.journal"


@pytest.fixture
def open_journal(path: Path) -> Iterator[Callable[..., DurableJournal]]:
    opened: list[DurableJournal] = []

    def open_(durability: str = "fsync") -> DurableJournal:
        j = DurableJournal(path, durability)
        opened.append(j)
        return j

    yield open_
    for j in opened:
        j.close()


@pytest.fixture
def fsync_counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"fdatasync": 0, "fsync": 0}
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd: int) -> None:
        counts["fdatasync"] += 1
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        counts["fsync"] += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    return counts


# --------------------------------------------------------------------------- basics


def test_a_new_journal_is_empty_with_pysyncobj_defaults(
    open_journal: Callable[..., DurableJournal],
) -> None:
    j = open_journal()
    assert len(j) == 0
    assert j[:] == []
    assert j.getCurrentTerm() == 0
    assert j.getVotedForNodeId() is None
    assert j.getRaftCommitIndex() == 1
    assert j.path.read_bytes()[:8] == b"WARRJRNL"


def test_entries_round_trip_across_reopen(
    path: Path, open_journal: Callable[..., DurableJournal]
) -> None:
    j = open_journal()
    want = entries(25)
    for e in want:
        j.add(*e)
    assert j[:] == want
    j.close()
    again = open_journal()
    assert again[:] == want
    assert all(isinstance(c, bytes) for c, _, _ in again[:])
    again.add(b"more", 26, 3)
    again.close()
    assert open_journal()[:] == [*want, (b"more", 26, 3)]


def test_indexing_behaves_like_a_list(open_journal: Callable[..., DurableJournal]) -> None:
    j = open_journal()
    model = entries(10)
    for e in model:
        j.add(*e)
    assert j[0] == model[0]
    assert j[-1] == model[-1]
    assert j[-3] == model[-3]
    assert j[2:5] == model[2:5]
    assert j[7:] == model[7:]
    assert j[8:100] == model[8:100]
    assert j[20:] == []
    assert j[-2:] == model[-2:]
    assert len(j) == 10
    with pytest.raises(IndexError):
        j[10]
    with pytest.raises(IndexError):
        j[-11]


def test_delete_entries_from_and_to_survive_reopen(
    path: Path, open_journal: Callable[..., DurableJournal]
) -> None:
    j = open_journal()
    model = entries(20)
    for e in model:
        j.add(*e)
    j.deleteEntriesFrom(15)  # a follower drops a conflicting suffix
    del model[15:]
    j.add(b"new-16", 16, 9)
    model.append((b"new-16", 16, 9))
    j.deleteEntriesTo(5)  # compaction
    del model[:5]
    assert j[:] == model
    assert j[0][1] == 6
    j.deleteEntriesFrom(100)  # past the end: nothing
    j.deleteEntriesTo(0)  # nothing
    assert j[:] == model
    j.add(b"after-compaction", 17, 9)
    model.append((b"after-compaction", 17, 9))
    j.close()
    assert open_journal()[:] == model
    assert not path.with_name(path.name + ".tmp").exists()


def test_clear_then_add(open_journal: Callable[..., DurableJournal]) -> None:
    j = open_journal()
    for e in entries(5):
        j.add(*e)
    j.clear()
    assert len(j) == 0
    j.add(b"snap-prev", 40, 3)
    j.add(b"snap-last", 41, 3)
    j.close()
    assert open_journal()[:] == [(b"snap-prev", 40, 3), (b"snap-last", 41, 3)]


def test_term_vote_and_commit_index_survive_reopen(
    path: Path, open_journal: Callable[..., DurableJournal]
) -> None:
    j = open_journal()
    j.setCurrentTerm(7, "127.0.0.1:4001")
    j.setRaftCommitIndex(42)
    meta = json.loads(path.with_name("raft.journal.meta").read_bytes())
    assert (meta["term"], meta["votedFor"]) == (7, "127.0.0.1:4001")
    assert meta["commitIndex"] == 1  # lazily kept: not written yet
    j.onOneSecondTimer()
    assert json.loads(path.with_name("raft.journal.meta").read_bytes())["commitIndex"] == 42
    j.setRaftCommitIndex(43)
    j.close()  # close saves it too
    again = open_journal()
    assert again.getCurrentTerm() == 7
    assert again.getVotedForNodeId() == "127.0.0.1:4001"
    assert again.getRaftCommitIndex() == 43
    again.setCurrentTerm(8, None)
    again.close()
    third = open_journal()
    assert (third.getCurrentTerm(), third.getVotedForNodeId()) == (8, None)


def test_resent_identical_entries_are_taken_back_without_writing(
    path: Path, open_journal: Callable[..., DurableJournal], fsync_counts: dict[str, int]
) -> None:
    # pysyncobj's follower drops everything after prevLogIdx, then re-adds what the
    # leader re-sent: identical entries are still on disk and cost nothing.
    j = open_journal()
    model = entries(10)
    for e in model:
        j.add(*e)
    size = path.stat().st_size
    fsync_counts.update(fdatasync=0, fsync=0)
    j.deleteEntriesFrom(5)
    assert j[:] == model[:5]
    for e in model[5:]:
        j.add(*e)
    assert j[:] == model
    assert fsync_counts == {"fdatasync": 0, "fsync": 0}
    assert path.stat().st_size == size
    # The first entry that differs truncates there, and its one fdatasync covers both.
    j.deleteEntriesFrom(7)
    j.add(*model[7])
    j.add(b"other", 9, 5)
    assert fsync_counts == {"fdatasync": 1, "fsync": 0}
    assert j[:] == [*model[:8], (b"other", 9, 5)]
    assert path.stat().st_size < size
    j.close()
    assert open_journal()[:] == [*model[:8], (b"other", 9, 5)]


def test_a_crash_after_delete_from_may_keep_the_dropped_entries(
    path: Path, tmp_path: Path, open_journal: Callable[..., DurableJournal]
) -> None:
    j = open_journal()
    model = entries(6)
    for e in model:
        j.add(*e)
    j.deleteEntriesFrom(2)
    j.add(*model[2])
    assert j[:] == model[:3]
    crashed = tmp_path / "crashed.journal"
    crashed.write_bytes(path.read_bytes())  # the file as a crash right now would leave it
    image = DurableJournal(crashed)
    try:
        assert image[:] == model  # the dropped suffix is still there (the Raft rule)
    finally:
        image.close()
    j.close()  # a normal close makes the truncation real
    assert open_journal()[:] == model[:3]


# --------------------------------------------------------------------------- damage


def test_a_torn_tail_of_garbage_is_dropped_and_appends_go_on(
    path: Path, open_journal: Callable[..., DurableJournal], caplog: pytest.LogCaptureFixture
) -> None:
    j = open_journal()
    model = entries(5)
    for e in model:
        j.add(*e)
    j.close()
    good_size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00\x05garbage that is not a record")
    with caplog.at_level(logging.WARNING, logger="cluster.journal"):
        again = open_journal()
    assert again[:] == model
    assert path.stat().st_size == good_size
    torn = [r for r in caplog.records if r.getMessage() == "raft.journal_torn_tail"]
    assert len(torn) == 1
    fields: dict[str, Any] = torn[0].fields  # type: ignore[attr-defined]
    assert fields["kept_entries"] == 5
    assert fields["dropped_bytes"] == 32
    again.add(b"next", 6, 2)
    again.close()
    assert open_journal()[:] == [*model, (b"next", 6, 2)]


@pytest.mark.parametrize("cut", [1, RECORD_HEAD - 1, RECORD_HEAD, RECORD_HEAD + 3])
def test_a_record_cut_short_is_dropped(
    path: Path, open_journal: Callable[..., DurableJournal], cut: int
) -> None:
    j = open_journal()
    model = entries(4)
    for e in model:
        j.add(*e)
    j.add(b"x" * 10, 5, 1)
    j.close()
    last_record = RECORD_HEAD + 10
    os.truncate(path, path.stat().st_size - last_record + cut)
    again = open_journal()
    assert again[:] == model
    again.add(b"replacement", 5, 2)
    again.close()
    assert open_journal()[:] == [*model, (b"replacement", 5, 2)]


def test_crc_damage_drops_that_record_and_everything_after(
    path: Path, open_journal: Callable[..., DurableJournal], caplog: pytest.LogCaptureFixture
) -> None:
    j = open_journal()
    model = entries(6)
    for e in model:
        j.add(*e)
    j.close()
    # Flip one byte inside the command of the 4th record.
    offset = HEADER_LEN + sum(RECORD_HEAD + len(c) for c, _, _ in model[:3]) + RECORD_HEAD
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="cluster.journal"):
        again = open_journal()
    assert again[:] == model[:3]
    (torn,) = [r for r in caplog.records if r.getMessage() == "raft.journal_torn_tail"]
    assert torn.fields["reason"] == "crc mismatch"  # type: ignore[attr-defined]


def test_a_damaged_idx_field_is_caught_by_the_crc(
    path: Path, open_journal: Callable[..., DurableJournal]
) -> None:
    j = open_journal()
    for e in entries(2):
        j.add(*e)
    j.close()
    data = bytearray(path.read_bytes())
    data[HEADER_LEN + 8 + 7] ^= 0xFF  # low byte of the first record's idx
    path.write_bytes(bytes(data))
    assert open_journal()[:] == []


def test_wrong_magic_or_version_is_refused(path: Path) -> None:
    path.write_bytes(b"NOTAJRNL\x00\x00\x00\x01")
    with pytest.raises(ValueError, match=r"raft\.journal.*not a Warren raft journal"):
        DurableJournal(path)
    path.write_bytes(b"WARRJRNL\x00\x00\x00\x09")
    with pytest.raises(ValueError, match="unsupported raft journal version"):
        DurableJournal(path)


def test_an_unreadable_meta_file_is_refused(path: Path) -> None:
    DurableJournal(path).close()
    path.with_name("raft.journal.meta").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="unreadable raft meta"):
        DurableJournal(path)


def test_unknown_durability_is_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        DurableJournal(path, "fast")
    assert not path.exists()


def test_a_closed_journal_refuses_writes(open_journal: Callable[..., DurableJournal]) -> None:
    j = open_journal()
    j._destroy()
    j._destroy()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        j.add(b"x", 1, 1)


# --------------------------------------------------------------------------- durability


def test_fsync_mode_does_one_data_fsync_per_add(
    open_journal: Callable[..., DurableJournal], fsync_counts: dict[str, int]
) -> None:
    j = open_journal("fsync")
    fsync_counts.update(fdatasync=0, fsync=0)
    for e in entries(10):
        j.add(*e)
    assert fsync_counts == {"fdatasync": 10, "fsync": 0}


def test_os_cache_mode_does_no_fsync_per_add(
    open_journal: Callable[..., DurableJournal], fsync_counts: dict[str, int]
) -> None:
    j = open_journal("os-cache")
    fsync_counts.update(fdatasync=0, fsync=0)
    for e in entries(10):
        j.add(*e)
    j.deleteEntriesFrom(8)
    assert fsync_counts == {"fdatasync": 0, "fsync": 0}
    j.setCurrentTerm(3, "n1")  # term and vote are synced in every mode
    assert fsync_counts["fsync"] >= 1


def test_fsync_mode_loses_nothing_at_power_loss(
    path: Path, open_journal: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SYNC_MARKS_ENV, "1")
    j = open_journal("fsync")
    model = entries(30)
    for e in model:
        j.add(*e)
    j.deleteEntriesFrom(25)
    j.add(b"tail", 26, 5)
    j.deleteEntriesTo(3)
    j.add(b"last", 27, 5)
    want = [*model[3:25], (b"tail", 26, 5), (b"last", 27, 5)]
    j.close()
    assert simulate_power_loss(path) == 0
    assert open_journal("fsync")[:] == want


def test_os_cache_mode_loses_appends_after_the_last_fsync(
    path: Path, open_journal: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SYNC_MARKS_ENV, "1")
    j = open_journal("os-cache")
    model = entries(20)
    for e in model[:10]:
        j.add(*e)
    j.deleteEntriesTo(2)  # compaction rewrites with fsync: what is there now is safe
    for e in model[10:]:
        j.add(*e)
    assert j[:] == model[2:]
    j.close()
    dropped = simulate_power_loss(path)
    assert dropped == sum(RECORD_HEAD + len(c) for c, _, _ in model[10:])
    assert open_journal("os-cache")[:] == model[2:10]


def test_power_loss_without_marks_drops_nothing(
    path: Path, open_journal: Callable[..., DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SYNC_MARKS_ENV, raising=False)
    j = open_journal("os-cache")
    j.add(b"a", 1, 1)
    j.close()
    assert simulate_power_loss(path) == 0
    assert not path.with_name("raft.journal.synced").exists()


def test_cluster_journal_imports_no_raft_library() -> None:
    code = (
        "import sys, cluster.journal\n"
        "bad = [m for m in ('pysyncobj', 'anyio', 'asyncio', 'pickle') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""


# --------------------------------------------------------------------------- model test

Model = list[tuple[bytes, int, int]]
_entry = st.tuples(st.binary(max_size=40), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
_op = st.one_of(
    st.tuples(st.just("add"), _entry),
    st.tuples(st.just("from"), st.integers(-3, 12)),
    st.tuples(st.just("to"), st.integers(-3, 12)),
    # pysyncobj's follower: drop the last k entries, the leader re-sends the first j.
    st.tuples(st.just("resend"), st.tuples(st.integers(0, 6), st.integers(0, 6))),
    st.tuples(st.just("clear"), st.none()),
    st.tuples(st.just("reopen"), st.none()),
    st.tuples(st.just("crash"), st.none()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=40), durability=st.sampled_from(["fsync", "os-cache"]))
def test_random_operations_match_a_list(ops: list[tuple[str, Any]], durability: str) -> None:
    """The journal is the list `model`; a crash image is `model + stale`, where `stale` is
    what deleteEntriesFrom dropped and no differing add has overwritten yet."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "raft.journal"
        j = DurableJournal(path, durability)
        model: Model = []
        stale: Model = []

        def add(e: tuple[bytes, int, int]) -> None:
            j.add(*e)
            model.append(e)
            if stale and stale[0] == e:
                stale.pop(0)
            else:
                stale.clear()

        def delete_from(pos: int) -> None:
            j.deleteEntriesFrom(pos)
            stale[:0] = model[pos:]
            del model[pos:]

        try:
            for op, arg in ops:
                if op == "add":
                    add(arg)
                elif op == "from":
                    delete_from(arg)
                elif op == "resend":
                    k, n = arg
                    dropped = model[len(model) - k :] if k else []
                    delete_from(len(model) - len(dropped))
                    for e in dropped[:n]:
                        add(e)
                elif op == "to":
                    j.deleteEntriesTo(arg)
                    if model[:arg]:  # a compaction happened: the file was rewritten
                        stale.clear()
                    del model[:arg]
                elif op == "clear":
                    j.clear()
                    model.clear()
                    stale.clear()
                elif op == "reopen":
                    j.close()
                    j = DurableJournal(path, durability)
                    stale.clear()
                else:
                    crashed = Path(d) / "crashed.journal"
                    crashed.write_bytes(path.read_bytes())
                    image = DurableJournal(crashed, durability)
                    try:
                        assert image[:] == model + stale
                    finally:
                        image.close()
                assert len(j) == len(model)
                assert j[:] == model
                if model:
                    assert j[-1] == model[-1]
                    assert j[0] == model[0]
        finally:
            j.close()
        final = DurableJournal(path, durability)
        try:
            assert final[:] == model
        finally:
            final.close()
