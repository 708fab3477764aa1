"""Durable queues over time on a 3-node Warren cluster: bounded resources and catch-up.

    python tests/benchmarks/bench_soak.py [--soak S] [--backlog N] [--compaction N]

1. soak: 1 producer (256 confirms in flight, 64-byte persistent messages) into one
   quorum queue on node A, 1 consumer on node B, for S seconds. Every 5 s: each node's RSS
   and the size of its data dir (journal + snapshot), and the messages confirmed so far.
   Shows whether disk and memory follow the live messages or the history.
2. catch-up: node C is killed; N persistent messages are published into a queue nobody
   consumes (so they all stay in its log); C restarts and must install a snapshot
   holding them. Reported: the time until C's copy of the log holds all N, and the worst
   latency a probe on node A saw meanwhile (a passive queue.declare every 20 ms: does the
   leader stall while it writes and sends the snapshot?).

Rules: as bench_cluster.py (its Warren cluster machinery; free loopback ports; stopped at
the end whatever happens). Progress on stderr, the report on stdout. Outside pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

import bench_cluster as bc  # the sibling modules, found through the path above
import bench_durable as bd
import bench_node as bn
import loadgen as lg

log = logging.getLogger("bench_soak")
A, B, C = 0, 1, 2
SAMPLE_S = 5.0
TABLE_EVERY_S = 60.0  # the report's table: a sample about this often


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


class Cluster(bc.WarrenCluster):
    """bench_cluster's Warren cluster, whose nodes can be started again."""

    def __init__(self, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        super().__init__(workdir, extra_args)
        self.user_args = list(extra_args)
        self.secret = secrets.token_hex(16)

    def start(self) -> None:
        for n in self.wnodes:
            n.spawn(self.wnodes, self.secret)
        for n in self.wnodes:
            wait_healthy(n)


def wait_healthy(node: bc.WarrenNode) -> None:
    deadline = time.monotonic() + bc.CLUSTER_READY_TIMEOUT_S
    while not node.healthy():
        if time.monotonic() > deadline or not node.alive():
            raise bn.BenchError(f"{node.label} is not up\n{node.log_tail()}")
        time.sleep(0.25)


def _status(node: bc.WarrenNode) -> dict[str, object]:
    status, body = node.api("/api/warren/cluster", timeout=5.0)
    if status != 200 or not isinstance(body, dict):
        raise bn.BenchError(f"status: {status}")
    return body


def soak(c: bc.WarrenCluster, seconds: float) -> list[str]:
    queue = bn._name("soak")
    bd._declare(c, A, queue)
    samples: list[tuple[float, list[int], list[int], int]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            logged = 0
            try:
                durable = _status(c.wnodes[A])["durable"]
                logged = int(durable["messages_written"])  # type: ignore[index]
            except (OSError, ValueError, KeyError, bn.BenchError):
                pass
            samples.append(
                (
                    time.monotonic() - started,
                    [rss_bytes(n.pid or 0) for n in c.wnodes],
                    [dir_bytes(n.dir / "data") for n in c.wnodes],
                    logged,
                )
            )
            log.info("  t=%.0fs rss=%s disk=%s messages=%d", *samples[-1][:2], samples[-1][2],
                     logged)  # fmt: skip

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load = bc.run_load_cluster(
            c,
            [lg.ConsumeSpec(c.endpoint(B), (queue,), prefetch=512)],
            [bd.publisher(c, A, queue)],
            warmup=1.0,
            duration=seconds,
        )
    finally:
        stop.set()
        sampler.join(10)
    producer = load.of("producer")[0]
    lines = [
        f"soak: {seconds:.0f} s, {producer.confirmed:,} confirmed "
        f"({producer.confirmed / producer.window_s:,.0f}/s), "
        f"{load.rate('consumer') * load.window_s:,.0f} delivered",
        "",
        "| t (s) | RSS A / B / C (MB) | data dir A / B / C (MB) | messages logged by A |",
        "|---|---|---|---|",
    ]
    every = max(1, round(TABLE_EVERY_S / SAMPLE_S))  # a long soak: a row per minute or so
    for k, (t, rss, disk, logged) in enumerate(samples):
        if k % every and k != len(samples) - 1:
            continue
        lines.append(
            f"| {t:.0f} | {' / '.join(f'{r / 2**20:.0f}' for r in rss)} | "
            f"{' / '.join(f'{d / 2**20:.1f}' for d in disk)} | {logged:,} |"
        )
    lines += _flatness(samples)
    bn._cleanup(c.endpoint(A), [queue])
    return lines


def _flatness(samples: list[tuple[float, list[int], list[int], int]]) -> list[str]:
    """Is it flat? Each node's RSS and data dir, the highest in each third of the soak."""
    if len(samples) < 3:
        return []
    third = len(samples) // 3
    parts = [samples[:third], samples[third : 2 * third], samples[2 * third :]]
    lines = ["", "highest in each third of the soak (first / second / last):", ""]
    for i, label in enumerate("ABC"):
        rss = [max(s[1][i] for s in part) / 2**20 for part in parts]
        disk = [max(s[2][i] for s in part) / 2**20 for part in parts]
        lines.append(
            f"- node {label}: RSS {' / '.join(f'{r:.0f}' for r in rss)} MB, "
            f"data dir {' / '.join(f'{d:.0f}' for d in disk)} MB"
        )
    return lines


class _Probe(threading.Thread):
    """A passive declare on node A every 20 ms; the worst round trip."""

    def __init__(self, endpoint: lg.Endpoint, queue: str) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.queue = endpoint, queue
        self.worst = 0.0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        client = await lg.with_client(self.endpoint)
        try:
            while not self.halt.is_set():
                t = time.monotonic()
                await client.declare_queue(1, self.queue, passive=True)
                self.worst = max(self.worst, time.monotonic() - t)
                self.samples += 1
                await asyncio.sleep(0.02)
        finally:
            await client.close()


def catch_up(c: Cluster, backlog: int) -> list[str]:
    queue = bn._name("backlog")
    bd._declare(c, A, queue)
    victim = c.wnodes[C]
    assert victim.proc is not None
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    log.info("catch-up: C killed; publishing %d messages", backlog)
    probe = _Probe(c.endpoint(A), queue)  # from now on: snapshots happen while it fills
    probe.start()
    published = 0
    t0 = time.monotonic()
    while published < backlog:
        bc.run_load_cluster(
            c,
            [],
            [bd.publisher(c, A, queue)],
            warmup=0.0,
            duration=min(60.0, max(5.0, (backlog - published) / 2000)),
        )
        published = int(_status(c.wnodes[A])["durable"]["logged_messages"])  # type: ignore[index]
        log.info("  %d logged on A", published)
    publish_s = time.monotonic() - t0
    worst_filling = probe.worst
    time.sleep(2.0)
    restarted = time.monotonic()
    spawn_same(victim, c)
    deadline = restarted + 600
    caught = float("nan")
    while time.monotonic() < deadline:
        try:
            if int(_status(victim)["durable"]["logged_messages"]) >= published:  # type: ignore[index]
                caught = time.monotonic() - restarted
                break
        except (OSError, ValueError, KeyError, bn.BenchError):
            pass
        time.sleep(0.5)
    time.sleep(2.0)
    probe.halt.set()
    probe.join(10)
    snap = _status(c.wnodes[A])["durable"]
    return [
        f"catch-up: {published:,} messages logged while C was down ({publish_s:.0f} s); "
        f"C restarted and held all of them after {caught:.1f} s; the leader's last snapshot: "
        f"{snap['last_snapshot_bytes'] / 2**20:.0f} MB in {snap['last_snapshot_seconds']:.1f} s "  # type: ignore[index]
        f"(written by its own thread); worst passive-declare round trip on A: "
        f"{worst_filling * 1000:.0f} ms while the backlog filled (with its snapshots), "
        f"{probe.worst * 1000:.0f} ms until C caught up, over {probe.samples} probes",
    ]


def spawn_same(node: bc.WarrenNode, c: Cluster) -> None:
    """Start `node` again with its data dir (bench_cluster's spawn rebuilds arguments)."""
    node.extra_args = list(c.user_args)
    node.spawn(c.wnodes, c.secret)
    wait_healthy(node)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak", type=float, default=300.0, help="seconds of the soak phase")
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--compaction", type=int, default=5000, help="--raft-compaction-entries")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )  # fmt: skip
    lg.install_event_loop_policy()
    workdir = Path(tempfile.mkdtemp(prefix="warren-bench-soak-"))
    c = Cluster(workdir, ["--raft-compaction-entries", str(args.compaction)])
    lines: list[str] = []
    try:
        with bn._signals_raise():
            c.start()
            if args.soak > 0:
                lines += soak(c, args.soak)
            if args.backlog > 0:
                lines += ["", *catch_up(c, args.backlog)]
    finally:
        bc._stop_quietly(c)
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
