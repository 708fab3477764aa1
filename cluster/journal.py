"""The Raft journal on disk: pysyncobj's log, made durable with fsync.

Rules of this module:

- It never imports pysyncobj (nor anything of the broker, the protocol or anyio): it
  duck-types the journal interface that pysyncobj's `SyncObj` uses, and
  `cluster/raft.py` is what installs it. Only the standard library and `node.logs`.
- Durability "fsync" (the default): `add` returns only after its record is on disk
  (`fdatasync`). pysyncobj calls `add` synchronously for every entry, on the leader
  before the entry counts towards its own majority and on a follower before it answers
  the AppendEntries, so "committed" means "fsynced by a majority". Each Raft entry is a
  batch of messages: one fsync per batch (group commit).
- `deleteEntriesFrom` (a follower dropping its log after the leader's prevLogIdx) keeps
  the dropped records on disk as a stale suffix until an `add` differs from them: an
  `add` identical to the next stale record (same command, idx and term) takes it back
  without writing or fsyncing; the first one that differs truncates the file there and
  its fdatasync makes the truncation durable with it. pysyncobj truncates after
  prevLogIdx on EVERY AppendEntries that overlaps what the follower has, and the leader
  re-sends everything in flight at each ack. Rewriting and fsyncing them again fed on
  itself (measured, 3 members in one process, 2,000 entries in flight: 32,858 adds for
  2,000 entries, 125 entries/s; taking them back: ~6,500 adds, ~350 entries/s; os-cache
  ~650 entries/s). A crash can therefore leave a journal that still holds
  entries dropped by `deleteEntriesFrom` after the last differing `add`. That is the
  Raft paper's own follower rule ("if an existing entry conflicts with a new one, delete
  it and all that follow"; matching entries stay), and those entries are ones this node
  durably accepted earlier: they are uncommitted-or-identical, and a leader truncates
  them again if they conflict. `close`, `clear`, `flush` and compaction make the
  truncation real; a journal closed normally reopens exactly as its list.
- Durability "os-cache": records are written, never fsynced (page-cache durability,
  what pysyncobj itself gives): a power loss can lose acknowledged entries. Everything
  else is still synced: term and vote, a compaction's rewrite, the repair at open.
- Term and vote (`setCurrentTerm`) are durable before the call returns, in both modes
  (temp file, fsync, rename, fsync of the directory): Raft requires it before the vote
  or the new term is sent. The commit index is kept lazily, like pysyncobj: saved by
  `onOneSecondTimer` and at close.
- Entries are `(command: bytes, idx: int, term: int)` tuples held in memory (a list, as
  pysyncobj's own journal does); `deleteEntriesFrom` / `deleteEntriesTo` take list
  POSITIONS, not Raft indexes. Dropping entries from the front (compaction, `clear`)
  first fsyncs the journal's directory, so a snapshot the caller renamed into that
  directory beforehand (Warren keeps its full dump next to the journal) is durable
  before the entries it replaces are gone.
- Single-threaded: pysyncobj calls every method from its tick thread. No locks.
- An I/O error raises out of the method; an `add` that failed leaves neither the file
  nor the list holding the entry.

On-disk format (ours, versioned; big endian):

    header  b"WARRJRNL" | u32 version (1)
    record  u32 length | u32 crc32 | u64 idx | u64 term | command (length bytes)

The CRC covers length, idx, term and the command. At open the first record that is
short or fails its CRC starts a torn tail: the file is truncated there, one warning
`raft.journal_torn_tail` is logged with the counts, and later appends go on from there.
A file with another magic or version raises `ValueError` naming the path. The meta file
`<journal>.meta` is JSON: `{"version", "term", "votedFor", "commitIndex"}`.

Test hook for power-loss tests: if the environment variable `WARREN_JOURNAL_SYNC_MARKS`
is "1" when a journal is opened, then after every successful fsync of the journal it
writes the synced byte length of the journal (u64, big endian) at offset 0 of the
sidecar `<journal>.synced` (pwrite, no fsync of its own). In os-cache mode that only
happens where a real fsync happens (open, compaction), so after appends the mark keeps
the older, shorter length. `simulate_power_loss(path)` truncates a closed journal to
the recorded length ("the page cache is lost, only fsynced bytes survive") and returns
how many bytes it dropped.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Final, overload

from node.logs import EventLogger

__all__ = [
    "DURABILITIES",
    "SYNC_MARKS_ENV",
    "DurableJournal",
    "fsync_dir",
    "simulate_power_loss",
]

_log = EventLogger(logging.getLogger(__name__))

DURABILITIES: Final = ("fsync", "os-cache")
SYNC_MARKS_ENV: Final = "WARREN_JOURNAL_SYNC_MARKS"

_MAGIC: Final = b"WARRJRNL"
_VERSION: Final = 1
_HEADER: Final = _MAGIC + struct.pack(">I", _VERSION)
_RECORD: Final = struct.Struct(">IIQQ")  # length, crc32, idx, term
_CRC_FIELDS: Final = struct.Struct(">IQQ")  # what the CRC covers besides the command
_MAX_COMMAND: Final = 0xFFFF_FFFF  # the u32 length field
_META_VERSION: Final = 1
_MARK: Final = struct.Struct(">Q")
# Compaction writes the rewritten journal in chunks of about this size.
_REWRITE_CHUNK: Final = 4 << 20

Entry = tuple[bytes, int, int]


def _crc(command: bytes, idx: int, term: int) -> int:
    return zlib.crc32(command, zlib.crc32(_CRC_FIELDS.pack(len(command), idx, term)))


def _encode(command: bytes, idx: int, term: int) -> bytes:
    return _RECORD.pack(len(command), _crc(command, idx, term), idx, term) + command


def _datasync(fd: int) -> None:
    # Looked up at call time (tests count the calls by monkeypatching os).
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS, Windows
        os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """Make the renames and creations in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DurableJournal:
    """pysyncobj's `Journal` interface over our own fsynced file (see the module doc)."""

    def __init__(self, path: Path | str, durability: str = "fsync") -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        self._path = Path(path)
        self._durability = durability
        self._sync = durability == "fsync"
        self._meta_path = self._path.with_name(self._path.name + ".meta")
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each entry's record
        self._end = len(_HEADER)  # end of the last entry's record
        # Records dropped by deleteEntriesFrom but still in the file after _end (module
        # doc), LAST FIRST: the next one to take back is at [-1].
        self._stale: list[Entry] = []
        self._stale_offsets: list[int] = []
        self._disk_end = len(_HEADER)  # the file's length
        self._fd = -1
        self._mark_fd = -1
        self._closed = False

        meta = self._read_meta()
        self._term: int = meta["term"]
        self._voted_for: str | None = meta["votedFor"]
        self._commit_index: int = meta["commitIndex"]
        self._meta_dirty = False

        if not self._path.exists() or self._path.stat().st_size == 0:
            _atomic_write(self._path, _HEADER)
        self._fd = os.open(self._path, os.O_RDWR)
        try:
            self._load()
            if os.environ.get(SYNC_MARKS_ENV) == "1":
                self._mark_fd = os.open(self._mark_path(self._path), os.O_RDWR | os.O_CREAT, 0o600)
            # Whatever an earlier process left in the page cache is on disk from here on.
            self._synced()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def durability(self) -> str:
        return self._durability

    # ----------------------------------------------------------------- log entries

    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append one entry; in "fsync" mode it is on disk when this returns."""
        self._check_open()
        command = bytes(command)
        if len(command) > _MAX_COMMAND:
            raise ValueError(f"a journal entry is limited to {_MAX_COMMAND} bytes")
        idx, term = int(idx), int(term)
        entry = (command, idx, term)
        if self._stale:
            if self._stale[-1] == entry:  # a re-sent entry we still have on disk: take it back
                self._entries.append(self._stale.pop())
                self._offsets.append(self._stale_offsets.pop())
                self._end = self._stale_offsets[-1] if self._stale_offsets else self._disk_end
                return
            self._drop_stale()  # made durable by this add's fdatasync
        record = _encode(command, idx, term)
        offset = self._end
        try:
            _write_all(self._fd, record, offset)
            if self._sync:
                _datasync(self._fd)
        except BaseException:
            # Leave no partial record behind: the next add writes at the same offset.
            os.ftruncate(self._fd, offset)
            self._disk_end = offset
            raise
        self._end = self._disk_end = offset + len(record)
        self._entries.append(entry)
        self._offsets.append(offset)
        if self._sync:
            self._mark()

    def clear(self) -> None:
        """Drop every entry (pysyncobj does this before logging an installed snapshot)."""
        self._check_open()
        fsync_dir(self._path.parent)
        self._entries.clear()
        self._offsets.clear()
        self._end = len(_HEADER)
        self._drop_stale()
        if self._sync:
            self._synced()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop the entries at positions >= entryFrom (`del log[entryFrom:]`).

        No I/O: the records stay on disk as a stale suffix until an `add` differs from
        them (see the module doc)."""
        self._check_open()
        start = slice(entryFrom, None).indices(len(self._entries))[0]
        if start < len(self._entries):
            self._stale.extend(reversed(self._entries[start:]))
            self._stale_offsets.extend(reversed(self._offsets[start:]))
            del self._entries[start:]
            del self._offsets[start:]
            self._end = self._stale_offsets[-1]

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop the entries at positions < entryTo (`del log[:entryTo]`): compaction.

        The remaining records are rewritten to a temp file, fsynced and renamed over the
        journal (in both modes: a rename of unsynced data can leave an empty file)."""
        self._check_open()
        start = slice(entryTo, None).indices(len(self._entries))[0]
        if start == 0:
            return
        fsync_dir(self._path.parent)  # the caller's snapshot rename first (module doc)
        keep = self._entries[start:]
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        offsets: list[int] = []
        try:
            pos = 0
            chunk = [_HEADER]
            size = len(_HEADER)
            for command, idx, term in keep:
                offsets.append(pos + size)
                record = _encode(command, idx, term)
                chunk.append(record)
                size += len(record)
                if size >= _REWRITE_CHUNK:
                    _write_all(fd, b"".join(chunk), pos)
                    pos, chunk, size = pos + size, [], 0
            _write_all(fd, b"".join(chunk), pos)
            end = pos + size
            os.fsync(fd)
            os.replace(tmp, self._path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        old, self._fd = self._fd, fd
        os.close(old)
        self._entries, self._offsets, self._end, self._disk_end = keep, offsets, end, end
        self._stale, self._stale_offsets = [], []
        fsync_dir(self._path.parent)
        self._mark()

    @overload
    def __getitem__(self, item: int) -> Entry: ...
    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...
    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def flush(self) -> None:
        """Force the journal, and any pending truncation, to disk (whatever the durability)."""
        self._check_open()
        self._drop_stale()
        self._synced()

    # ----------------------------------------------------------------- raft meta

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if raftCommitIndex != self._commit_index:
            self._commit_index = int(raftCommitIndex)
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        """Durable before it returns (Raft: before any message reflecting it is sent)."""
        self._check_open()
        self._term = int(term)
        self._voted_for = None if votedForNodeId is None else str(votedForNodeId)
        self._save_meta()

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty and not self._closed:
            self._save_meta()

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Save the commit index and close the files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._stale and self._fd >= 0:
                self._drop_stale()
                if self._sync:
                    self._synced()
            if self._meta_dirty and self._fd >= 0:
                self._save_meta()
        finally:
            for fd in (self._fd, self._mark_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._mark_fd = -1

    def _destroy(self) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _mark_path(path: Path) -> Path:
        return path.with_name(path.name + ".synced")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._path}: journal is closed")

    def _drop_stale(self) -> None:
        """Cut the file at the end of the last entry (not synced here)."""
        if self._disk_end != self._end:
            os.ftruncate(self._fd, self._end)
            self._disk_end = self._end
        self._stale.clear()
        self._stale_offsets.clear()

    def _synced(self) -> None:
        _datasync(self._fd)
        self._mark()

    def _mark(self) -> None:
        if self._mark_fd >= 0:
            _write_all(self._mark_fd, _MARK.pack(self._disk_end), 0)

    def _load(self) -> None:
        size = os.fstat(self._fd).st_size
        with open(self._fd, "rb", closefd=False) as f:
            head = f.read(len(_HEADER))
            if head != _HEADER:
                if head[: len(_MAGIC)] == _MAGIC:
                    raise ValueError(
                        f"{self._path}: unsupported raft journal version "
                        f"{head[len(_MAGIC) :].hex()} (this build reads version {_VERSION})"
                    )
                raise ValueError(f"{self._path}: not a Warren raft journal (bad magic)")
            offset = len(_HEADER)
            reason = ""
            while offset < size:
                raw = f.read(_RECORD.size)
                if len(raw) < _RECORD.size:
                    reason = "short header"
                    break
                length, crc, idx, term = _RECORD.unpack(raw)
                if offset + _RECORD.size + length > size:
                    reason = "short record"
                    break
                command = f.read(length)
                if len(command) < length:
                    reason = "short record"
                    break
                if _crc(command, idx, term) != crc:
                    reason = "crc mismatch"
                    break
                self._entries.append((command, idx, term))
                self._offsets.append(offset)
                offset += _RECORD.size + length
        self._end = self._disk_end = offset
        if offset < size:
            os.ftruncate(self._fd, offset)
            _log.warning(
                "raft.journal_torn_tail",
                path=str(self._path),
                reason=reason,
                kept_entries=len(self._entries),
                offset=offset,
                dropped_bytes=size - offset,
            )

    def _read_meta(self) -> dict[str, Any]:
        try:
            raw = self._meta_path.read_bytes()
        except FileNotFoundError:
            return {"term": 0, "votedFor": None, "commitIndex": 1}
        try:
            meta = json.loads(raw)
            if meta.get("version") != _META_VERSION:
                raise ValueError(f"unknown version {meta.get('version')!r}")
            voted = meta["votedFor"]
            return {
                "term": int(meta["term"]),
                "votedFor": None if voted is None else str(voted),
                "commitIndex": int(meta["commitIndex"]),
            }
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Written atomically and fsynced: this is real damage, and guessing a term or
            # a vote could break Raft's safety. An operator has to decide.
            raise ValueError(f"{self._meta_path}: unreadable raft meta file: {e}") from e

    def _save_meta(self) -> None:
        meta = {
            "version": _META_VERSION,
            "term": self._term,
            "votedFor": self._voted_for,
            "commitIndex": self._commit_index,
        }
        _atomic_write(self._meta_path, json.dumps(meta, separators=(",", ":")).encode())
        self._meta_dirty = False


def simulate_power_loss(journal_path: Path | str) -> int:
    """Test hook: cut a (closed) journal back to its last fsynced length; bytes dropped.

    Needs the `.synced` sidecar written under `WARREN_JOURNAL_SYNC_MARKS=1`; without it
    nothing is known to be lost and 0 is returned. A journal shorter than its mark (an
    unsynced truncation in os-cache mode) is left alone: a real power loss might bring
    the old bytes back, which this cannot model."""
    path = Path(journal_path)
    mark_path = DurableJournal._mark_path(path)
    try:
        raw = mark_path.read_bytes()
    except FileNotFoundError:
        return 0
    if len(raw) < _MARK.size:
        return 0
    synced = int(_MARK.unpack_from(raw)[0])
    size = path.stat().st_size
    if size <= synced:
        return 0
    os.truncate(path, synced)
    return size - synced
