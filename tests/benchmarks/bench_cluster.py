"""Warren vs RabbitMQ, three nodes each: the producer on node A, the consumer on node B.

    python tests/benchmarks/bench_cluster.py [--only SCENARIO] [--duration S] [--repeat N]
        [--rabbitmq/--no-rabbitmq] [--warren/--no-warren] [--markdown OUT]
        [--profile DIR [--profile-scenario SCENARIO] [--profile-args ARGS]]

The transient scenarios of bench_node.py, across nodes, against a 3-node RabbitMQ cluster and
a 3-node Warren cluster started on this machine in the same run:
- throughput: 1→1, producer on A, consumer on B, the queue on B.
- local: the same 1→1 with producer and consumer both on A (the queue on A), for context.
- fanout: 1→10, producer on A, the 10 queues and their consumers on B.
- latency: 1→1 at a fixed rate (1000 msg/s), producer on A, consumer on B: p50, p99, max.
Every queue is declared through the consumer's node, so that its leader is that node: a
RabbitMQ classic queue lives on the node of the declaring connection, and Warren's default
`client-local` queue-leader locator does the same. After each declare the benchmark reads
where the queues really live (rabbitmqctl list_queues / Warren's /api/queues) and notes any
queue that is elsewhere.

Rules: as bench_node.py, whose machinery this imports (Options, Measured, the loadgen worker
processes, the RabbitMQ node starter, the report's cells):
- Every run starts its own clusters and stops them at the end, whatever happens. RabbitMQ:
  three fresh nodes (bench<pid><a|b|c>@localhost; own ports, mnesia and log dirs under a temp
  dir owned by user `rabbitmq`, the Erlang cookie of that user's home, no plugins), B and C
  joined to A with `rabbitmqctl stop_app / join_cluster / start_app`, each stopped with
  `rabbitmqctl -n NODE stop`, SIGKILL as the last resort. Warren: three
  `python -m node.cli node` processes with --peer lists and one random WARREN_CLUSTER_SECRET,
  ready when every node's GET /api/healthz answers 200; stopped with SIGTERM (all at once),
  then SIGKILL.
- Both clusters get the same scenario with the same parameters, one after the other
  (RabbitMQ first). The other cluster is paused meanwhile (SIGSTOP of its process trees,
  SIGCONT after, then it must settle: an idle RabbitMQ cluster burns ~30% of a core, which
  would bias against whichever runs beside it); --no-pause-idle lets it idle instead, and
  its CPU in the window is reported beside the results.
- The load comes from loadgen.py workers, each in its own process. Rates are counted in a
  window after a warm-up; each node's CPU (its process tree, from /proc) is reported.
- --profile DIR: after the measured runs, one extra (unreported) run on Warren of
  --profile-scenario (default: the cross-node 1→1) with py-spy recording nodes A and B
  (non-blocking sampling, plus --profile-args) over the window; the collapsed stacks go to
  DIR and the top functions to the report. py-spy counts a thread that waits for the CPU or
  for the GIL as busy: --profile-args=--gil keeps only the samples of the GIL's holder.
- Progress goes to stderr through logging; the table to stdout (and --markdown). Only
  127.0.0.1 is ever contacted, every port is a free one. Outside the default pytest run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_node as bn  # the sibling modules, found through the path above
import loadgen as lg

log = logging.getLogger("bench_cluster")

HOST = bn.HOST
LETTERS = ("a", "b", "c")
A, B = 0, 1  # node indexes: the producer's and the consumer's
RABBITMQCTL_TIMEOUT_S = 120.0
CLUSTER_READY_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 30.0  # after resuming a paused cluster
PY_SPY_GRACE_S = 60.0
PROFILE_TOP = 15
SCENARIOS = ("throughput", "local", "fanout", "latency")
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


# ---------------------------------------------------------------------------------------------
# Clusters


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on HOST (all held open until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


class Cluster:
    """Three broker nodes; node i's clients connect to `endpoint(i)`."""

    label = "cluster"

    def __init__(self) -> None:
        self.nodes: list[bn.Broker] = []
        self.notes: list[str] = []
        self.idle_pids: list[int] = []  # the other cluster's nodes, measured while idle
        self._noted: set[str] = set()
        self.placed = [0, 0]  # queues checked, queues not where meant

    def endpoint(self, i: int) -> lg.Endpoint:
        return self.nodes[i].endpoint

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid is not None]

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def ensure_running(self) -> None:
        dead = [LETTERS[i].upper() for i, n in enumerate(self.nodes) if not n.alive()]
        if dead:
            raise bn.BenchError(f"{self.label} node(s) {', '.join(dead)} not running")

    def pause(self) -> None:
        """SIGSTOP every process of the cluster (the idle one: it then costs no CPU)."""
        for pid in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.settle()

    def settle(self) -> None:
        """After a resume: until the cluster serves as before (bounded)."""

    def _tree(self) -> list[int]:
        return [p for pid in self.pids for p in bn.process_tree(pid)]

    def log_tail(self, lines: int = 10) -> str:
        parts = []
        for i, n in enumerate(self.nodes):
            tail = n.log_tail(lines)
            if tail:
                parts.append(f"--- node {LETTERS[i].upper()}:\n{tail}")
        return "\n".join(parts)

    def note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.notes.append(text)

    def queue_homes(self) -> dict[str, int]:
        """Every queue's leader: {queue name: node index} (-1: a node not of this cluster)."""
        raise NotImplementedError

    def check_homes(self, queues: Sequence[str], expected: int) -> None:
        """Note (not fail) when a benchmark queue is not led by node `expected`."""
        try:
            homes = self.queue_homes()
        except (OSError, ValueError, subprocess.SubprocessError, bn.BenchError) as exc:
            log.warning("  could not read where the queues live: %r", exc)
            self.note(f"{self.label}: could not read where the queues live ({bn._cell(str(exc))})")
            return
        want = LETTERS[expected].upper()
        wrong = {q: homes.get(q) for q in queues if homes.get(q) != expected}
        self.placed[0] += len(queues)
        self.placed[1] += len(wrong)
        if not wrong:
            log.info("  %d queue(s) led by node %s, as meant", len(queues), want)
            return
        where = ", ".join(
            sorted({"?" if i is None or i < 0 else LETTERS[i].upper() for i in wrong.values()})
        )
        log.warning("  %d of %d queue(s) not on node %s: %s", len(wrong), len(queues), want, wrong)
        self.note(
            f"{self.label}: {len(wrong)} of {len(queues)} benchmark queue(s) meant for node "
            f"{want} were led by {where}"
        )

    def placement_note(self) -> str | None:
        checked, wrong = self.placed
        if not checked:
            return None
        if not wrong:
            return f"{self.label}: all {checked} benchmark queues were led by the node meant"
        return f"{self.label}: {wrong} of {checked} benchmark queues were not on the node meant"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class RabbitNode(bn.RabbitMQ):
    """bench_node's RabbitMQ starter, as one named node of a cluster."""

    def __init__(self, workdir: Path, letter: str) -> None:
        super().__init__(workdir)
        self.letter = letter
        self.dir = workdir / f"rabbitmq-{letter}"
        self.node = f"bench{os.getpid()}{letter}@localhost"
        self.pid_file = self.dir / "rabbitmq.pid"
        self.label = f"RabbitMQ {letter.upper()}"

    def ctl(self, *args: str, timeout: float = RABBITMQCTL_TIMEOUT_S) -> str:
        """rabbitmqctl -n THIS-NODE ARGS..., its stdout; BenchError if it fails."""
        cmd = self._command("rabbitmqctl", "-n", self.node, *args)
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.dir
            )
        except subprocess.TimeoutExpired as exc:
            raise bn.BenchError(f"rabbitmqctl {' '.join(args)} timed out") from exc
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise bn.BenchError(
                f"rabbitmqctl -n {self.node} {' '.join(args)}: exit {done.returncode}"
                f" ({why[-1] if why else ''})"
            )
        return done.stdout


class RabbitCluster(Cluster):
    label = "RabbitMQ"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.rnodes = [RabbitNode(workdir, x) for x in LETTERS]
        self.nodes = list(self.rnodes)

    def start(self) -> None:
        # A first and alone: its start writes user rabbitmq's Erlang cookie if there is none.
        self.rnodes[0].start()
        first = self.rnodes[0].node
        for n in self.rnodes[1:]:
            n.start()
            log.info("joining %s to %s", n.node, first)
            n.ctl("stop_app")
            n.ctl("join_cluster", first)
            n.ctl("start_app")
            bn.wait_amqp(n.endpoint, bn.BROKER_START_TIMEOUT_S, n.alive)
        status = self.rnodes[0].ctl("cluster_status", "--formatter", "json")
        running = json.loads(status).get("running_nodes", [])
        missing = [n.node for n in self.rnodes if n.node not in running]
        if missing:
            raise bn.BenchError(f"RabbitMQ cluster: {missing} not running in {running}")
        log.info("RabbitMQ cluster up: %s", ", ".join(running))

    def stop(self) -> None:
        for n in reversed(self.rnodes):
            try:
                n.stop()
            except Exception:
                log.exception("stopping %s failed", n.node)
            self.notes.extend(n.notes)
            n.notes.clear()

    def queue_homes(self) -> dict[str, int]:
        out = self.rnodes[A].ctl("list_queues", "--quiet", "--no-table-headers", "name", "pid")
        index = {n.node: i for i, n in enumerate(self.rnodes)}
        homes: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            m = re.match(r"<(.+?)\.\d+\.\d+\.\d+>", parts[-1].strip())
            homes[parts[0].strip()] = index.get(m[1], -1) if m else -1
        return homes


class WarrenNode(bn.Warren):
    """bench_node's Warren starter, as one member of a cluster (its own start, no restart)."""

    def __init__(
        self, workdir: Path, letter: str, extra_args: Sequence[str], ports: Sequence[int]
    ) -> None:
        super().__init__(workdir, extra_args)
        self.letter = letter
        self.name = f"bench-{letter}"
        self.dir = workdir / f"warren-{letter}"
        self.label = f"Warren {letter.upper()}"
        self.port, self.raft_port, self.link_port, self.management_port = ports

    def spawn(self, peers: Sequence[WarrenNode], secret: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cluster_args = [
            "--name", self.name,
            "--host", HOST, "--port", str(self.port), "--advertise-host", HOST,
            "--raft-port", str(self.raft_port), "--link-port", str(self.link_port),
            "--management-port", str(self.management_port), "--metrics-port", "0",
            "--data-dir", str(self.dir / "data"),
        ]  # fmt: skip
        for p in peers:
            if p is not self:
                cluster_args += ["--peer", f"{p.name}={HOST}:{p.raft_port}"]
        user_args = list(self.extra_args)
        self.extra_args = cluster_args + user_args  # _other_port_options skips these
        cmd = self._cli("node", *cluster_args, *self._other_port_options(), *user_args)
        self.log_path = self.dir / "node.log"
        log.info("starting %s: %s", self.label, shlex.join(cmd))
        env = {**os.environ, "WARREN_CLUSTER_SECRET": secret}
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=bn.REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.pid = self.proc.pid

    def api(self, path: str, timeout: float = 5.0) -> tuple[int, object]:
        request = urllib.request.Request(f"http://{HOST}:{self.management_port}{path}")
        request.add_header("Authorization", _AUTH)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
            exc.close()
        return status, json.loads(body) if body else None

    def healthy(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return self.api("/api/healthz", timeout=2.0)[0] == 200
        return False

    def ensure_running(self) -> None:
        if not self.alive():
            raise bn.BenchError(f"{self.label} is not running")


class WarrenCluster(Cluster):
    label = "Warren"

    def __init__(self, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        ports = free_ports(4 * len(LETTERS))
        self.wnodes = [
            WarrenNode(workdir, x, extra_args, ports[4 * i : 4 * i + 4])
            for i, x in enumerate(LETTERS)
        ]
        self.nodes = list(self.wnodes)

    def start(self) -> None:
        secret = secrets.token_hex(16)
        for n in self.wnodes:
            n.spawn(self.wnodes, secret)
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
        waiting = list(self.wnodes)
        while waiting:
            for n in waiting:
                if not n.alive():
                    raise bn.BenchError(f"{n.label} exited while starting\n{n.log_tail()}")
            waiting = [n for n in waiting if not n.healthy()]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(n.label for n in waiting)
                raise bn.BenchError(
                    f"Warren cluster not ready after {CLUSTER_READY_TIMEOUT_S:.0f}s: {names}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)
        for n in self.wnodes:
            bn.wait_amqp(n.endpoint, bn.BROKER_START_TIMEOUT_S, n.alive)
        leader = None
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            status = self.wnodes[A].api("/api/warren/cluster")[1]
            leader = status["raft"]["leader"]  # type: ignore[index]
        log.info(
            "Warren cluster up: %s (Raft leader %s)",
            ", ".join(f"{n.name} pid={n.pid}" for n in self.wnodes),
            leader,
        )
        if leader:
            self.note(f"Warren: Raft leader at start: {leader}")

    def settle(self) -> None:
        """After SIGCONT: every node healthy, every member alive and reachable with a
        quorum, as seen from every node (links and Raft notice the pause and recover)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
                views = [n.api("/api/warren/cluster", timeout=2.0)[1] for n in self.wnodes]
                if all(
                    v["raft"]["has_quorum"]  # type: ignore[index]
                    and all(m["alive"] and m["reachable"] for m in v["members"])  # type: ignore[index]
                    for v in views
                ):
                    return
            time.sleep(0.2)
        log.warning("Warren cluster not settled %.0fs after a resume", SETTLE_TIMEOUT_S)

    def stop(self) -> None:
        procs = [(n, n.proc) for n in self.wnodes if n.proc is not None]
        for n, proc in procs:
            if proc.poll() is None:
                log.info("stopping %s pid=%d (SIGTERM)", n.label, proc.pid)
                with contextlib.suppress(OSError):
                    proc.terminate()
        deadline = time.monotonic() + bn.WARREN_STOP_TIMEOUT_S
        for n, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit on SIGTERM: SIGKILL", n.label)
                self.note(f"{n.label} ignored SIGTERM for {bn.WARREN_STOP_TIMEOUT_S:.0f}s")
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            n.proc = None
            log.info("%s exit code %s", n.label, proc.returncode)
            if proc.returncode != 0:
                self.note(f"{n.label}'s exit code on SIGTERM at the end: {proc.returncode}")

    def queue_homes(self) -> dict[str, int]:
        status, rows = self.wnodes[A].api("/api/queues")
        if status != 200 or not isinstance(rows, list):
            raise bn.BenchError(f"GET /api/queues: {status}")
        index = {n.name: i for i, n in enumerate(self.wnodes)}
        return {str(r["name"]): index.get(str(r.get("node")), -1) for r in rows}


# ---------------------------------------------------------------------------------------------
# Running workers (bench_node.run_load, with one CPU figure per node)


@dataclass(frozen=True)
class Profile:
    """py-spy on some nodes over the window: {title: (pid, output file)}, extra options."""

    targets: dict[str, tuple[int, Path]]
    args: tuple[str, ...] = ()


@dataclass
class ClusterLoad(bn.LoadResult):
    node_cpu: list[float] = field(default_factory=list)
    idle_cpu: float = math.nan


def _spy_options(extra: Sequence[str]) -> list[str]:
    """py-spy's options: non-blocking, 100 samples/s unless `extra` sets its own rate."""
    rate = [] if any(a == "--rate" or a.startswith(("--rate=", "-r")) for a in extra) else [
        "--rate", "100"]  # fmt: skip
    return ["--nonblocking", *rate, *extra]


def _spy(pid: int, out: Path, seconds: float, extra: Sequence[str]) -> subprocess.Popen[bytes]:
    secs = str(max(1, round(seconds)))
    out.unlink(missing_ok=True)  # (a failed py-spy must not leave an older run's stacks)
    cmd = ["py-spy", "record", "--pid", str(pid), *_spy_options(extra),
           "--duration", secs, "--format", "raw", "--output", str(out)]  # fmt: skip
    log.info("  %s", shlex.join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def run_load_cluster(
    cluster: Cluster,
    first: Sequence[lg.WorkerSpec],
    then: Sequence[lg.WorkerSpec],
    *,
    warmup: float,
    duration: float,
    profile: Profile | None = None,
) -> ClusterLoad:
    """As bench_node.run_load: `first` (consumers) ready, then `then` (producers), the window;
    CPU per node of `cluster` and of its idle pids; py-spy as `profile` says."""
    ctx = multiprocessing.get_context("fork")
    workers: list[bn._Worker] = []
    spies: list[subprocess.Popen[bytes]] = []
    try:
        for group in (first, then):
            started = []
            for spec in group:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=lg.run_worker, args=(spec, child), daemon=True)
                proc.start()
                child.close()
                w = bn._Worker(proc, parent, spec)
                workers.append(w)
                started.append(w)
            for w in started:
                bn._recv(w, bn.WORKER_READY_TIMEOUT_S, "ready")
        t_start = time.monotonic() + warmup
        t_end = t_start + duration
        for w in workers:
            w.pipe.send(("go", t_start, t_end))
        pids, idle = cluster.pids, list(cluster.idle_pids)
        bn._sleep_until(t_start)
        if profile:
            spies = [_spy(p, out, duration, profile.args) for p, out in profile.targets.values()]
        cpu0 = [bn.cpu_seconds(p) for p in pids]
        idle0, w0 = sum(bn.cpu_seconds(p) for p in idle), time.monotonic()
        bn._sleep_until(t_end)
        cpu1 = [bn.cpu_seconds(p) for p in pids]
        idle1, w1 = sum(bn.cpu_seconds(p) for p in idle), time.monotonic()
        results = [bn._recv(w, bn.RESULT_GRACE_S, "its result")[1] for w in workers]
        for r in results:
            if r.note:
                log.warning("%s: %s", r.role, r.note)
        wall = w1 - w0
        per_node = [100.0 * (b - a) / wall for a, b in zip(cpu0, cpu1, strict=True)]
        for s in spies:
            try:
                s.wait(PY_SPY_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("py-spy did not finish: killed")
                s.kill()
                s.wait()
            if s.returncode:
                log.warning("py-spy exited with %s: %s", s.returncode, shlex.join(s.args))
        spies = []
        return ClusterLoad(
            results,
            sum(per_node),
            duration,
            node_cpu=per_node,
            idle_cpu=100.0 * (idle1 - idle0) / wall if idle else math.nan,
        )
    finally:
        for s in spies:
            with contextlib.suppress(OSError):
                s.kill()
            s.wait()
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.pipe.close()
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()


# ---------------------------------------------------------------------------------------------
# Scenarios: each returns {metric name: value} plus CPU notes for one cluster


def _note_cpu(m: bn.Measured, name: str, load: ClusterLoad) -> None:
    nodes = " ".join(f"{LETTERS[i].upper()} {c:.0f}%" for i, c in enumerate(load.node_cpu))
    idle = "" if math.isnan(load.idle_cpu) else f" · idle other cluster {load.idle_cpu:.0f}%"
    m.cpu[name] = f"nodes {nodes}{idle} · workers: {load.generator_cpu}"
    log.info("  %s: node_cpu %s%s worker_cpu: %s", name, nodes, idle, load.generator_cpu)


def _route(pub: int, cons: int) -> str:
    return f"{LETTERS[pub].upper()}→{LETTERS[cons].upper()}"


def one_to_one(
    c: Cluster,
    o: bn.Options,
    pub: int,
    cons: int,
    *,
    rate: float = 0.0,
    profile: Profile | None = None,
) -> tuple[bn.Measured, ClusterLoad]:
    """1→1 through one queue declared on (so led by) node `cons`; flat out, or at `rate`."""
    q = bn._name("lat" if rate else "tp")
    bn.run_async(lg.setup_topology(c.endpoint(cons), [q]), timeout=60)
    try:
        c.check_homes([q], cons)
        load = run_load_cluster(
            c,
            [
                lg.ConsumeSpec(
                    c.endpoint(cons),
                    (q,),
                    prefetch=o.prefetch,
                    ack_every=o.ack_every,
                    measure_latency=rate > 0,
                )
            ],
            [
                lg.PublishSpec(
                    c.endpoint(pub),
                    "",
                    q,
                    body_size=max(8, o.body_size) if rate else o.body_size,
                    rate=rate,
                )
            ],
            warmup=o.warmup,
            duration=o.duration,
            profile=profile,
        )
    finally:
        bn._cleanup(c.endpoint(cons), [q])
    m = bn.Measured({"delivered": load.rate("consumer"), "published": load.rate("producer")})
    return m, load


def scenario_throughput(c: Cluster, o: bn.Options, profile: Profile | None = None) -> bn.Measured:
    m, load = one_to_one(c, o, A, B, profile=profile)
    _note_cpu(m, f"1→1 {_route(A, B)}", load)
    return m


def scenario_local(c: Cluster, o: bn.Options, profile: Profile | None = None) -> bn.Measured:
    m, load = one_to_one(c, o, A, A, profile=profile)
    _note_cpu(m, f"1→1 {_route(A, A)}", load)
    return m


def scenario_fanout(c: Cluster, o: bn.Options, profile: Profile | None = None) -> bn.Measured:
    ep, ex = c.endpoint(B), bn._name("fanout")
    queues = [f"{ex}.q{i}" for i in range(o.fanout_queues)]
    bn.run_async(
        lg.setup_topology(ep, queues, (ex, "fanout"), [(q, ex, "") for q in queues]),
        timeout=60,
    )
    try:
        c.check_homes(queues, B)
        consumers = [
            lg.ConsumeSpec(ep, part, prefetch=o.prefetch, ack_every=o.ack_every)
            for part in bn._split(queues, o.consumer_procs)
        ]
        load = run_load_cluster(
            c,
            consumers,
            [lg.PublishSpec(c.endpoint(A), ex, "", body_size=o.body_size)],
            warmup=o.warmup,
            duration=o.duration,
            profile=profile,
        )
    finally:
        bn._cleanup(ep, queues, ex)
    m = bn.Measured({"delivered": load.rate("consumer"), "published": load.rate("producer")})
    _note_cpu(m, f"fanout 1→{o.fanout_queues} {_route(A, B)}", load)
    return m


# --latency-trace: every latency run's (sent_ns, latency_ns) pairs, per cluster label.
TRACES: dict[str, list[list[tuple[int, int]]]] = {}
# Periods (ms) the slowest messages are folded by, to find a periodic cause.
TRACE_PERIODS_MS = (10, 20, 50, 100, 200, 250, 500, 1000)
TRACE_BINS = 10


def scenario_latency(c: Cluster, o: bn.Options, profile: Profile | None = None) -> bn.Measured:
    m, load = one_to_one(c, o, A, B, rate=o.latency_rate, profile=profile)
    consumers = load.of("consumer")
    TRACES.setdefault(c.label, []).append(
        sorted(pair for r in consumers for pair in zip(r.sent_ns, r.latencies_ns, strict=True))
    )
    lat = sorted(x for r in consumers for x in r.latencies_ns)
    if not lat:
        raise bn.BenchError("no message was delivered during the window")
    ms = 1e-6
    m.values.update(
        {
            "p50": bn.percentile(lat, 0.50) * ms,
            "p99": bn.percentile(lat, 0.99) * ms,
            "max": lat[-1] * ms,
            "samples": float(len(lat)),
        }
    )
    _note_cpu(m, f"latency @{o.latency_rate:g}/s {_route(A, B)}", load)
    return m


RUNNERS: dict[str, Callable[..., bn.Measured]] = {
    "throughput": scenario_throughput,
    "local": scenario_local,
    "fanout": scenario_fanout,
    "latency": scenario_latency,
}

_M = bn.Metric
METRICS: tuple[bn.Metric, ...] = (
    _M("throughput", "delivered", "1. transient 1→1 A→B, delivered", "msg/s", "higher", 1.0),
    _M("throughput", "published", "1. transient 1→1 A→B, published", "msg/s", "higher", None),
    _M("fanout", "delivered", "2. fanout 1→10 A→B, delivered (total)", "msg/s", "higher", 1.0),
    _M("fanout", "published", "2. fanout 1→10 A→B, published", "msg/s", "higher", None),
    _M("latency", "p50", "3. latency @fixed rate A→B, p50", "ms", "lower", None, "{:.3f}"),
    _M("latency", "p99", "3. latency @fixed rate A→B, p99", "ms", "lower", 1.0, "{:.3f}"),
    _M("latency", "max", "3. latency @fixed rate A→B, max", "ms", "lower", None, "{:.3f}"),
    _M("local", "delivered", "(context) 1→1 A→A, delivered", "msg/s", "higher", None),
    _M("local", "published", "(context) 1→1 A→A, published", "msg/s", "higher", None),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Profile (py-spy's collapsed stacks)


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)', paths shortened to the repo or pkg."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m[1], m[2]
    root = str(bn.REPO_ROOT) + "/"
    if path.startswith(root):
        path = path[len(root) :]
    elif "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python" in path:
        path = "stdlib/" + path.rsplit("/", 1)[-1]
    return f"{func} ({path})"


def summarize_profile(path: Path, top: int = PROFILE_TOP) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) of the samples, the `top` functions by self time."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("thread (", "process "))] or frames
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return []
    return [(f, 100.0 * n / total, 100.0 * incl[f] / total) for f, n in own.most_common(top)]


def profile_warren(
    c: WarrenCluster, o: bn.Options, scenario: str, out_dir: Path, spy_args: Sequence[str]
) -> list[str]:
    """One extra, unreported run of `scenario` with py-spy on nodes A and B: markdown lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("py-spy") is None:
        return ["", "Profile: py-spy is not installed (pip install py-spy); none taken."]
    c.ensure_running()
    a, b = c.wnodes[A], c.wnodes[B]
    assert a.pid is not None
    assert b.pid is not None
    b_role = "consumer's node" if scenario == "local" else "queue leader, consumer's node"
    a_role = "publisher's node" + (", queue leader, consumer's node" if scenario == "local" else "")
    profile = Profile(
        {
            f"A ({a.name}, {a_role})": (a.pid, out_dir / f"warren-{scenario}-a.txt"),
            f"B ({b.name}, {b_role})": (b.pid, out_dir / f"warren-{scenario}-b.txt"),
        },
        tuple(spy_args),
    )
    log.info("== profile: Warren %s with py-spy on nodes A and B", scenario)
    m = RUNNERS[scenario](c, o, profile=profile)
    (run, cpu), *_ = m.cpu.items()
    rates = " · ".join(f"{k} {v:,.3f}" if k in ("p50", "p99", "max") else f"{k} {v:,.0f}"
                       for k, v in m.values.items() if k != "samples")  # fmt: skip
    opts = shlex.join(_spy_options(spy_args))
    lines = [
        "",
        f"### Profile: Warren {run}, one extra run under py-spy ({o.duration:g}s, `{opts}`; "
        "not in the table above)",
        "",
        f"- under the profiler: {rates}; {cpu}",
        f"- collapsed stacks: {', '.join(str(out) for _, out in profile.targets.values())}",
    ]
    for title, (_, out) in profile.targets.items():
        lines += ["", f"Node {title}: top {PROFILE_TOP} functions by own samples", ""]
        try:
            rows = summarize_profile(out)
        except OSError as exc:
            lines.append(f"(no profile: {exc})")
            continue
        if not rows:
            lines.append("(no samples)")
            continue
        lines += ["| function | self % | incl. % |", "|---|---:|---:|"]
        lines += [f"| `{bn._cell(f)}` | {s:.1f} | {i:.1f} |" for f, s, i in rows]
    return lines


def trace_summary(trace: Sequence[tuple[int, int]]) -> str:
    """One line on a latency trace's tail: percentiles, and the period (if any) the
    slowest 1% of messages line up with (their send times folded by each candidate
    period into TRACE_BINS bins; the period whose fullest bin stands out most)."""
    lat = sorted(x for _, x in trace)
    if not lat:
        return "no samples"
    pcts = " · ".join(
        f"p{q * 100:g} {bn.percentile(lat, q) / 1e3:,.0f}" for q in (0.5, 0.9, 0.95, 0.99, 0.999)
    )
    cut = bn.percentile(lat, 0.99)
    slow = [sent for sent, x in trace if x >= cut]
    best = ""
    if len(slow) >= 3 * TRACE_BINS:
        scores = []
        for period in TRACE_PERIODS_MS:
            bins = [0] * TRACE_BINS
            for sent in slow:
                bins[int((sent / 1e6 % period) / period * TRACE_BINS)] += 1
            scores.append((max(bins) * TRACE_BINS / len(slow), period))
        score, period = max(scores)
        best = (
            f" · slowest 1% ({len(slow)}) fold best at a {period} ms period: "
            f"{score:.1f}x the mean bin"
        )
    return f"{len(lat):,} samples, µs: {pcts}{best}"


def write_traces(out_dir: Path) -> list[str]:
    """Write every latency run's trace (TSV: sent_ns, latency_ns) and summarize each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["", "### Latency traces (`--latency-trace`)", ""]
    for label, runs in TRACES.items():
        for i, trace in enumerate(runs, start=1):
            path = out_dir / f"{label.lower().replace(' ', '-')}-latency-{i}.tsv"
            with path.open("w") as f:
                f.write("sent_ns\tlatency_ns\n")
                f.writelines(f"{sent}\t{x}\n" for sent, x in trace)
            lines.append(f"- {label} #{i} ({path}): {trace_summary(trace)}")
    return lines


# ---------------------------------------------------------------------------------------------
# The report


def render(
    results: dict[str, dict[str, bn.Measured | str]],
    scenarios: Sequence[str],
    clusters: Sequence[str],
    header: list[str],
    notes: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> str:
    lines = [*header, ""]
    lines.append("| scenario | unit | RabbitMQ | Warren | ratio W/R | target | met? |")
    lines.append("|---|---|---:|---:|---:|---|---|")
    for metric in METRICS:
        if metric.scenario not in scenarios:
            continue
        cells: dict[str, str] = {}
        values: dict[str, float | None] = {}
        for name in ("RabbitMQ", "Warren"):
            got = results.get(name, {}).get(metric.scenario)
            if name not in clusters:
                cells[name], values[name] = "not run", None
            elif isinstance(got, bn.Measured):
                values[name] = got.values.get(metric.key)
                cells[name] = bn._fmt(metric, values[name])
            else:
                cells[name], values[name] = ("error" if got else "—"), None
        r, w = values["RabbitMQ"], values["Warren"]
        ratio = w / r if r and w is not None and not math.isnan(r) and not math.isnan(w) else None
        if metric.target is None:
            target, met = "(reported)", "n/a"
        else:
            target = f"{'≥' if metric.better == 'higher' else '≤'} {metric.target:.1f}"
            if ratio is None:
                met = "?"
            elif metric.better == "higher":
                met = "yes" if ratio >= metric.target else "**no**"
            else:
                met = "yes" if ratio <= metric.target else "**no**"
        ratio_s = f"{ratio:.2f}" if ratio is not None else "—"
        lines.append(
            f"| {metric.label} | {metric.unit} | {cells['RabbitMQ']} | {cells['Warren']} "
            f"| {ratio_s} | {target} | {met} |"
        )
    cross = []
    for name in clusters:
        tp, lo = results.get(name, {}).get("throughput"), results.get(name, {}).get("local")
        if isinstance(tp, bn.Measured) and isinstance(lo, bn.Measured):
            d_ab, d_aa = tp.values.get("delivered"), lo.values.get("delivered")
            if d_ab and d_aa:
                cross.append(f"{name} {d_ab / d_aa:.2f}")
    if cross:
        lines += ["", f"Cross-node cost, 1→1 delivered A→B / A→A: {' · '.join(cross)}"]
    cpu_rows: list[str] = []
    for name in clusters:
        for scenario in scenarios:
            got = results.get(name, {}).get(scenario)
            if isinstance(got, bn.Measured):
                cpu_rows += [f"| {name} | {run} | {cpu} |" for run, cpu in got.cpu.items()]
            elif isinstance(got, str):
                cpu_rows.append(f"| {name} | {scenario} | error: {bn._cell(got)} |")
    if cpu_rows:
        lines += [
            "",
            "CPU in the measurement window (or the error), % of one core (each node: its whole",
            "process tree; idle other cluster: its three nodes together; workers: one figure per",
            "load-generator process):",
            "",
            "| cluster | run | CPU |",
            "|---|---|---|",
            *cpu_rows,
        ]
    if notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    lines += list(extra)
    return "\n".join(lines) + "\n"


def _header(
    args: argparse.Namespace,
    loop_kind: str,
    cap: tuple[float, float],
    load: tuple[float, float],
) -> list[str]:
    return [
        "## Warren vs RabbitMQ, 3-node clusters, producer on A, consumer on B "
        "(tests/benchmarks/bench_cluster.py)",
        "",
        f"- host: {platform.node()} · {os.cpu_count()} CPUs (shared) · "
        f"Python {platform.python_version()} · load generator on {loop_kind} · "
        "all six nodes and the workers on this machine",
        "- every queue declared through (and led by) the consumer's node: B, or A for A→A · "
        "RabbitMQ classic non-durable queues · Warren queue leader locator client-local",
        f"- window {args.duration:g}s after {args.warmup:g}s warm-up · body {args.body_size} B "
        f"· non-persistent · prefetch {args.prefetch} · "
        f"{'ack per message' if args.ack_every == 1 else f'ack multiple every {args.ack_every}'}"
        f"{f' · median of {args.repeat} runs' if args.repeat > 1 else ''}"
        f" · latency at {args.latency_rate:g} msg/s · fanout to {args.fanout_queues} queues",
        f"- load generator capacity, one core, no broker: consume+ack {cap[0]:,.0f} msg/s, "
        f"publish {cap[1]:,.0f} msg/s",
        f"- machine load average (1 min) at start {load[0]:.1f}, at end {load[1]:.1f} "
        f"(above {os.cpu_count()} means other work competed for the CPUs: noisy figures)",
    ]


# ---------------------------------------------------------------------------------------------
# Main


def _measure(
    scenario: str, c: Cluster, opts: bn.Options, rep: int, repeat: int
) -> bn.Measured | str:
    """One scenario on one cluster: its measures, or the error text (the run goes on)."""
    log.info("== %s on %s%s", scenario, c.label, f" (run {rep}/{repeat})" if repeat > 1 else "")
    try:
        c.ensure_running()
        m = RUNNERS[scenario](c, opts)
    except Exception as exc:  # one failed measurement must not end the run
        if not isinstance(exc, bn.BenchError | OSError | lg.AmqpError | TimeoutError):
            log.exception("unexpected error")
        log.error("%s on %s failed: %s", scenario, c.label, exc)
        tail = c.log_tail()
        if tail:
            log.error("%s log tails:\n%s", c.label, tail)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    if repeat > 1:
        m.cpu = {f"{run} #{rep}": cpu for run, cpu in m.cpu.items()}
    return m


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}; default: all",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window opens")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every scenario N times per cluster (alternating) and report medians",
    )
    p.add_argument("--rabbitmq", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warren", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--markdown", type=Path, metavar="OUT", help="also write the table here")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the runs, one extra Warren run (--profile-scenario) under py-spy on nodes "
        "A and B; collapsed stacks to DIR, top functions to the report",
    )
    p.add_argument(
        "--profile-scenario", choices=SCENARIOS, default="throughput", help="default: throughput"
    )
    p.add_argument(
        "--profile-args",
        default="",
        help="extra `py-spy record` options, one string (e.g. --gil: only the GIL holder)",
    )
    p.add_argument("--prefetch", type=int, default=100)
    p.add_argument(
        "--ack-every",
        type=int,
        default=1,
        help="1 = basic.ack per message (default); N = one ack with multiple=true per N",
    )
    p.add_argument("--body-size", type=int, default=100)
    p.add_argument("--fanout-queues", type=int, default=10)
    p.add_argument(
        "--consumer-procs", type=int, default=2, help="processes sharing the fanout consumers"
    )
    p.add_argument("--latency-rate", type=float, default=1000.0, help="msg/s, scenario latency")
    p.add_argument(
        "--latency-trace",
        type=Path,
        metavar="DIR",
        help="write each latency run's per-message (sent_ns, latency_ns) to DIR and report "
        "its tail (percentiles, a period the slowest messages line up with)",
    )
    p.add_argument("--warren-args", default="", help="extra `node` options for every Warren node")
    p.add_argument("--keep-temp", action="store_true", help="keep node dirs and logs")
    p.add_argument(
        "--pause-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SIGSTOP the other cluster while one is measured (an idle RabbitMQ cluster "
        "burns ~30%% of a core, an idle Warren one ~2%%: either way it is not competing)",
    )
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not 1 <= args.ack_every <= args.prefetch:
        p.error("--ack-every must be between 1 and --prefetch")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if not (args.rabbitmq or args.warren):
        p.error("nothing to run: both --no-rabbitmq and --no-warren")
    return args


def _start(c: Cluster) -> None:
    """Start a cluster; on failure, stop what did start (and re-raise)."""
    try:
        c.start()
    except BaseException:
        c.stop()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    scenarios = [s for s in SCENARIOS if s in (args.only or SCENARIOS)]
    opts = bn.Options(
        duration=args.duration,
        warmup=args.warmup,
        prefetch=args.prefetch,
        ack_every=args.ack_every,
        body_size=args.body_size,
        fanout_queues=args.fanout_queues,
        consumer_procs=args.consumer_procs,
        latency_rate=args.latency_rate,
        churn_concurrency=1,
        churn_procs=1,
        queues=0,
        queue_channels=1,
        confirm_window=0,
    )
    loop_kind = lg.install_event_loop_policy()
    cap = (asyncio.run(lg.consumer_capacity(100_000)), asyncio.run(lg.producer_capacity(1.0)))
    log.info("load generator capacity: consume+ack %.0f msg/s, publish %.0f msg/s", *cap)
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="warren-bench-cluster-"))
    clusters: list[Cluster] = []
    runs: dict[str, dict[str, list[bn.Measured | str]]] = {}
    extra: list[str] = []
    interrupted = ""
    try:
        with bn._signals_raise():
            if args.rabbitmq:
                clusters.append(RabbitCluster(workdir))
            if args.warren:
                clusters.append(WarrenCluster(workdir, shlex.split(args.warren_args)))
            live: list[Cluster] = []
            for c in clusters:
                try:
                    _start(c)
                    live.append(c)
                except (bn.BenchError, OSError, subprocess.SubprocessError, ValueError) as exc:
                    log.error("%s cluster did not start: %s", c.label, exc)
                    why = f"did not start: {bn._cell(str(exc))}"
                    runs[c.label] = {sc: [why] for sc in scenarios}
            for c in live:
                c.idle_pids = [p for o in live if o is not c for p in o.pids]
            for scenario in scenarios:
                for rep in range(1, args.repeat + 1):
                    for c in live:
                        others = [o for o in live if o is not c] if args.pause_idle else []
                        for o in others:
                            o.pause()
                        try:
                            got = _measure(scenario, c, opts, rep, args.repeat)
                        finally:
                            for o in others:
                                o.resume()
                        runs.setdefault(c.label, {}).setdefault(scenario, []).append(got)
            warren = next((c for c in live if isinstance(c, WarrenCluster)), None)
            if args.profile and warren is not None:
                try:
                    extra = profile_warren(
                        warren,
                        opts,
                        args.profile_scenario,
                        args.profile,
                        shlex.split(args.profile_args),
                    )
                except (bn.BenchError, OSError, lg.AmqpError, TimeoutError) as exc:
                    log.error("profile run failed: %s", exc)
                    extra = ["", f"Profile run failed: {bn._cell(str(exc))}"]
    except (KeyboardInterrupt, bn._Interrupted) as exc:
        why = exc.args[0] if exc.args else "SIGINT"
        log.error("interrupted (%s): stopping the clusters", why)
        interrupted = f"interrupted by {why}: the table holds what was measured before"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        stoppers = [threading.Thread(target=_stop_quietly, args=(c,)) for c in clusters]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        if args.keep_temp:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.latency_trace and TRACES:
        extra += write_traces(args.latency_trace)
    results = {
        name: {sc: bn._combine(got) for sc, got in per.items()} for name, per in runs.items()
    }
    notes = [n for c in clusters for n in c.notes]
    notes += [n for c in clusters if (n := c.placement_note())]
    if interrupted:
        notes.append(interrupted)
    table = render(
        results,
        scenarios,
        [c.label for c in clusters],
        _header(args, loop_kind, cap, (load_start, os.getloadavg()[0])),
        notes,
        extra,
    )
    sys.stdout.write(table)
    if args.markdown:
        args.markdown.write_text(table)
        log.info("wrote %s", args.markdown)
    return 130 if interrupted else 0


def _stop_quietly(c: Cluster) -> None:
    try:
        c.stop()
    except Exception:
        log.exception("stopping %s failed", c.label)


if __name__ == "__main__":
    sys.exit(main())
