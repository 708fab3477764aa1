"""An in-memory stand-in for the Raft log: one list of encoded entries, applied in order
to several `StateMachine` replicas, as pysyncobj would on every node.

No sockets, no threads, no clock. A replica can be disconnected (it stops applying) and
reconnected (it catches up from where it stopped), so tests can script lagging nodes.
Like a node's shell, it remembers the `Condemned` effects a replica reports (a queue that
replica deleted on its own: auto-delete, exclusive owner gone, x-expires) and
`replicate_condemned` submits their DropQueue commands.
Entries go through the real codec (`encode_batch` / `decode_entry`), so what a replica
applies is exactly what a journal would hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cluster import codec
from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import Condemned, Outcome


class FakeRaft:
    """The log and the replicas that apply it. `submit` appends one entry (a batch) and
    every connected replica applies it at once; the outcomes are per replica."""

    def __init__(self, names: Iterable[str]) -> None:
        self.log: list[bytes] = []
        self.replicas: dict[str, StateMachine] = {n: StateMachine(node_name=n) for n in names}
        self.applied: dict[str, int] = dict.fromkeys(self.replicas, 0)
        self.connected: set[str] = set(self.replicas)
        self.condemned: list[tuple[str, Condemned]] = []  # (reporting node, effect)
        self._next_id = 0

    def new_id(self, origin: str = "t") -> bytes:
        """A fresh command id, shaped like the node's (origin, NUL, counter)."""
        self._next_id += 1
        return origin.encode() + b"\x00" + str(self._next_id).encode()

    def submit(
        self,
        commands: Sequence[c.AnyCommand],
        ids: Sequence[bytes | None] | None = None,
    ) -> dict[str, list[Outcome | None]]:
        """Append one entry; each command gets a fresh id unless `ids` is given."""
        if ids is None:
            ids = [self.new_id() for _ in commands]
        self.log.append(codec.encode_batch(commands, command_ids=ids))
        return self.catch_up()

    def submit_raw(self, entry: bytes) -> dict[str, list[Outcome | None]]:
        """Append an entry encoded by the caller (a retried submission, a single command)."""
        self.log.append(entry)
        return self.catch_up()

    def catch_up(self) -> dict[str, list[Outcome | None]]:
        """Every connected replica applies the entries it has not applied yet; the
        outcomes of the last entry each applied, by replica."""
        last: dict[str, list[Outcome | None]] = {}
        for name in sorted(self.connected):
            machine = self.replicas[name]
            while self.applied[name] < len(self.log):
                entry = self.log[self.applied[name]]
                last[name] = outs = machine.apply_logged(codec.decode_entry(entry))
                self.applied[name] += 1
                for out in outs:
                    if out is not None:
                        self._note(name, out)
        return last

    def local(self, name: str, command: c.AnyCommand) -> Outcome:
        """A command of a client connected to `name`, applied there only (not logged)."""
        out = self.replicas[name].apply(command)
        self._note(name, out)
        return out

    def _note(self, name: str, out: Outcome) -> None:
        self.condemned.extend((name, e) for e in out.effects if isinstance(e, Condemned))

    def replicate_condemned(self) -> int:
        """Submit the DropQueue of every reported condemnation (as each node's shell
        does), until none is left; how many were submitted."""
        count = 0
        while self.condemned:
            name, effect = self.condemned.pop(0)
            command = c.DropQueue(vhost=effect.vhost, queue=effect.queue, touched=effect.touched)
            self.submit([command], [self.new_id(name)])
            count += 1
        return count

    def disconnect(self, name: str) -> None:
        self.connected.discard(name)

    def reconnect(self, name: str) -> None:
        self.connected.add(name)
        self.catch_up()

    def restart(self, name: str) -> None:
        """The node restarts from its own topology snapshot (messages are gone)."""
        data = self.replicas[name].topology_snapshot()
        self.replicas[name] = StateMachine.restore_topology(data, name)

    def snapshots(self) -> dict[str, bytes]:
        return {name: sm.topology_snapshot() for name, sm in self.replicas.items()}

    def __getitem__(self, name: str) -> StateMachine:
        return self.replicas[name]
