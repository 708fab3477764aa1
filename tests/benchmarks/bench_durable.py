"""Durable queues: Warren vs RabbitMQ quorum queues, three nodes each, in the same run.

    python tests/benchmarks/bench_durable.py [--duration S] [--repeat N] [--markdown OUT]
        [--rabbitmq/--no-rabbitmq] [--warren/--no-warren] [--no-failover]

What the durability issue asks for: 1 producer with 256 confirms in flight, 1 consumer,
64-byte persistent messages, one quorum queue (RabbitMQ: x-queue-type=quorum; Warren: the
same declare, a durable queue whose messages go through Raft, fsync on):
- local: producer and consumer on node A, the queue led by A.
- remote: producer on A, consumer on B, the queue led by B.
Reported: confirmed messages/s at the producer, delivered messages/s at the consumer, and
the p50/p99 confirm latency (a publish's batch written -> its confirm).
- failover (last: it kills a node): a confirmed persistent stream (pika, one confirm in
  flight) from A, consumed on B, through a queue led by C; C gets SIGKILL; the time from
  the kill until the consumer (a client that re-subscribes on a consumer-cancel, as
  RabbitMQ's clients do) receives a message published after the kill, and lost
  confirmed messages.

Rules: as bench_cluster.py, whose clusters this reuses (fresh 3-node clusters on free
loopback ports, stopped at the end whatever happens; the other cluster paused with
SIGSTOP while one is measured). Progress on stderr; the table on stdout (and --markdown).
Outside the default pytest run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cluster as bc  # the sibling modules, found through the path above
import bench_node as bn
import loadgen as lg

log = logging.getLogger("bench_durable")

A, B, C = 0, 1, 2
WINDOW = 256  # confirms in flight
BODY = 64
FAILOVER_GAP_LIMIT_S = 60.0
QUORUM = {"x-queue-type": "quorum"}


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _declare(c: bc.Cluster, node: int, queue: str) -> None:
    async def declare() -> None:
        client = await lg.with_client(c.endpoint(node))
        try:
            await client.declare_queue(1, queue, durable=True, arguments=QUORUM)
        finally:
            await client.close()

    bn.run_async(declare(), timeout=60)


def publisher(c: bc.Cluster, node: int, queue: str, **options: bool) -> lg.PublishSpec:
    """The producer of these benchmarks: 64-byte persistent messages, 256 confirms in
    flight, through node `node`."""
    return lg.PublishSpec(
        c.endpoint(node), "", queue, body_size=BODY, persistent=True, confirm_window=WINDOW,
        **options,
    )  # fmt: skip


def throughput(c: bc.Cluster, pub: int, cons: int, duration: float, warmup: float) -> Result:
    queue = bn._name("durable")
    _declare(c, cons, queue)
    try:
        c.check_homes([queue], cons)
        load = bc.run_load_cluster(
            c,
            [lg.ConsumeSpec(c.endpoint(cons), (queue,), prefetch=WINDOW * 2)],
            [publisher(c, pub, queue, measure_confirms=True)],
            warmup=warmup,
            duration=duration,
        )
    finally:
        bn._cleanup(c.endpoint(cons), [queue])
    producer = load.of("producer")[0]
    latencies = sorted(producer.latencies_ns)
    result = Result(
        {
            "confirmed msg/s": producer.confirmed / producer.window_s,
            "delivered msg/s": load.rate("consumer"),
            "confirm p50 ms": _pct(latencies, 0.50),
            "confirm p99 ms": _pct(latencies, 0.99),
        }
    )
    nodes = " ".join(f"{bc.LETTERS[i].upper()} {x:.0f}%" for i, x in enumerate(load.node_cpu))
    result.notes.append(f"CPU {nodes}")
    return result


def _pct(sorted_ns: Sequence[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e6


# ---- failover --------------------------------------------------------------------------


class _Probe:
    """A pika publisher on one node and a consumer on another, as real clients."""

    def __init__(self, c: bc.Cluster, queue: str, pub: int, cons: int) -> None:
        self.c, self.queue, self.pub, self.cons = c, queue, pub, cons
        self.stop = threading.Event()
        self.stop_publishing = threading.Event()
        self.confirmed: list[int] = []
        self.received: dict[int, int] = {}
        self.deliveries: list[tuple[float, int]] = []  # (monotonic time, message number)
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._publish, daemon=True),
            threading.Thread(target=self._consume, daemon=True),
        ]

    def _params(self, node: int) -> object:
        import pika

        ep = self.c.endpoint(node)
        credentials = pika.PlainCredentials("guest", "guest")
        p = pika.ConnectionParameters(ep.host, ep.port, "/", credentials)
        p.socket_timeout = 3
        p.blocked_connection_timeout = 10
        return p

    def _publish(self) -> None:
        import pika

        i = 0
        while not self.stop_publishing.is_set():
            conn = None
            try:
                conn = pika.BlockingConnection(self._params(self.pub))
                ch = conn.channel()
                ch.confirm_delivery()
                props = pika.BasicProperties(delivery_mode=2)
                while not self.stop_publishing.is_set():
                    try:
                        ch.basic_publish("", self.queue, str(i).encode(), props)
                    except pika.exceptions.NackError:
                        time.sleep(0.02)
                        continue
                    self.confirmed.append(i)
                    i += 1
            except Exception as exc:  # a client survives by reconnecting
                self.errors.append(f"publisher: {exc!r}")
                time.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()

    def _consume(self) -> None:
        import pika

        while not self.stop.is_set():
            conn = None
            try:
                conn = pika.BlockingConnection(self._params(self.cons))
                ch = conn.channel()
                ch.basic_qos(prefetch_count=100)
                cancelled = threading.Event()

                def on_message(ch: object, method: object, _p: object, body: bytes) -> None:
                    n = int(body)
                    self.received[n] = self.received.get(n, 0) + 1
                    self.deliveries.append((time.monotonic(), n))
                    ch.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]

                ch.add_on_cancel_callback(lambda _f, done=cancelled: done.set())
                ch.basic_consume(self.queue, on_message)
                while not self.stop.is_set() and not cancelled.is_set():
                    conn.process_data_events(time_limit=0.05)
            except Exception as exc:
                self.errors.append(f"consumer: {exc!r}")
                time.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()


def failover(c: bc.Cluster, settle_s: float = 8.0, after_s: float = 8.0) -> Result:
    queue = bn._name("failover")
    _declare(c, C, queue)
    c.check_homes([queue], C)
    probe = _Probe(c, queue, A, B)
    for t in probe.threads:
        t.start()
    time.sleep(settle_s)
    victim = c.nodes[C]
    assert victim.pid is not None
    raft_leader = ""
    if isinstance(c, bc.WarrenCluster):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            raft_leader = str(c.wnodes[A].api("/api/warren/cluster")[1]["raft"]["leader"])  # type: ignore[index]
    before = len(probe.deliveries)
    in_flight = len(probe.confirmed)  # the number of the message being published now
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    log.info("  %s: SIGKILL node C (pid %d) after %d deliveries", c.label, victim.pid, before)
    # Service is back when a message published after the kill reaches the consumer (a
    # delivery already on its way when the node died does not count).
    deadline = killed + FAILOVER_GAP_LIMIT_S
    after: list[float] = []
    while time.monotonic() < deadline:
        after = [t for t, n in probe.deliveries[before:] if n > in_flight]
        if after:
            break
        time.sleep(0.01)
    gap = after[0] - killed if after else float("nan")
    time.sleep(after_s)
    probe.stop_publishing.set()
    probe.threads[0].join(10)
    drained = time.monotonic() + 15.0  # the consumer takes what is left, to count losses
    while set(probe.confirmed) - set(probe.received) and time.monotonic() < drained:
        time.sleep(0.1)
    probe.stop.set()
    probe.threads[1].join(10)
    lost = sorted(set(probe.confirmed) - set(probe.received))
    duplicates = sum(n - 1 for n in probe.received.values())
    result = Result({"failover s": gap, "lost": float(len(lost))})
    result.notes.append(
        f"confirmed {len(probe.confirmed)}, received {len(probe.received)}, "
        f"lost {len(lost)}, duplicates {duplicates}"
        + (f"; Raft leader before the kill: {raft_leader}" if raft_leader else "")
    )
    return result


# ---- the run ---------------------------------------------------------------------------


def _median(runs: list[Result]) -> Result:
    out = Result()
    for key in runs[0].values:
        vals = [r.values[key] for r in runs if key in r.values]
        out.values[key] = statistics.median(vals)
    out.notes = [n for r in runs for n in r.notes]
    return out


def render(results: dict[str, dict[str, Result]], header: list[str]) -> str:
    lines = [*header, ""]
    lines.append("| scenario | metric | RabbitMQ (quorum) | Warren | Warren / RabbitMQ |")
    lines.append("|---|---|---|---|---|")
    scenarios: list[str] = []
    for per in results.values():
        scenarios += [s for s in per if s not in scenarios]
    for sc in scenarios:
        rmq = results.get("RabbitMQ", {}).get(sc)
        war = results.get("Warren", {}).get(sc)
        keys = list((war or rmq or Result()).values)
        for key in keys:
            a = rmq.values.get(key, float("nan")) if rmq else float("nan")
            b = war.values.get(key, float("nan")) if war else float("nan")
            ratio = b / a if a and a == a and b == b else float("nan")
            lines.append(f"| {sc} | {key} | {a:,.2f} | {b:,.2f} | {ratio:.2f} |")
    lines.append("")
    for label, per in results.items():
        for sc, r in per.items():
            for n in r.notes:
                lines.append(f"- {label} {sc}: {n}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rabbitmq", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warren", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--failover", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--keep-temp", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    lg.install_event_loop_policy()
    workdir = Path(tempfile.mkdtemp(prefix="warren-bench-durable-"))
    clusters: list[bc.Cluster] = []
    results: dict[str, dict[str, Result]] = {}
    runs_failover: dict[str, list[Result]] = {}
    load_start = os.getloadavg()[0]
    try:
        with bn._signals_raise():
            if args.rabbitmq:
                clusters.append(bc.RabbitCluster(workdir))
            if args.warren:
                clusters.append(bc.WarrenCluster(workdir))
            for c in clusters:
                bc._start(c)
            scenarios = [("local", A, A), ("remote", A, B)] if args.throughput else []
            for name, pub, cons in scenarios:
                runs: dict[str, list[Result]] = {}
                for _ in range(args.repeat):
                    for c in clusters:
                        others = [o for o in clusters if o is not c]
                        for o in others:
                            o.pause()
                        try:
                            log.info("%s: %s", c.label, name)
                            got = throughput(c, pub, cons, args.duration, args.warmup)
                            log.info("  %s", got.values)
                            runs.setdefault(c.label, []).append(got)
                        finally:
                            for o in others:
                                o.resume()
                for label, got in runs.items():
                    results.setdefault(label, {})[name] = _median(got)
            for _ in range(1 if args.failover else 0):  # (it kills node C: once)
                for c in clusters:
                    others = [o for o in clusters if o is not c]
                    for o in others:
                        o.pause()
                    try:
                        log.info("%s: failover", c.label)
                        got = failover(c)
                        log.info("  %s", got.values)
                        runs_failover.setdefault(c.label, []).append(got)
                    finally:
                        for o in others:
                            o.resume()
            for label, got in runs_failover.items():
                results.setdefault(label, {})["failover"] = _median(got)
    finally:
        for c in clusters:
            bc._stop_quietly(c)
        if not args.keep_temp:
            shutil.rmtree(workdir, ignore_errors=True)
    header = [
        "Durable queues, 3 nodes each, same run: 1 producer (256 confirms in flight), "
        f"1 consumer, {BODY}-byte persistent messages; {args.duration:.0f} s windows, "
        f"median of {args.repeat}; load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}, "
        f"{os.cpu_count()} CPUs.",
    ]
    table = render(results, header)
    sys.stdout.write(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
