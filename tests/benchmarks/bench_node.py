"""Warren vs RabbitMQ: one command that starts both brokers, loads both the same way, compares.

    python tests/benchmarks/bench_node.py [--only SCENARIO] [--duration S]
        [--rabbitmq/--no-rabbitmq] [--warren/--no-warren] [--markdown OUT]

Rules:
- Every run starts its own brokers and stops them at the end, whatever happens (error,
  Ctrl-C, SIGTERM): a fresh RabbitMQ (own node name, ports, mnesia and log dirs under a temp
  dir owned by user `rabbitmq`, `rabbitmq-server -detached`, stopped with
  `rabbitmqctl -n NODE stop`, SIGKILL as the last resort) and a fresh Warren node
  (`python -m node.cli node --host 127.0.0.1 ...`, SIGTERM then SIGKILL). It never touches
  any other broker on the machine.
- Both brokers get the same scenario with the same parameters, one after the other
  (RabbitMQ first), while the other one idles.
- The load comes from loadgen.py workers, each in its own process (multiprocessing, fork),
  never from this process, except the queue-memory scenario (declares are not the measure).
- Rates are counted inside a measurement window that starts after a warm-up; the CPU used by
  the broker (its whole process tree, from /proc) and by every worker in that window is
  reported beside the results, to show whether the generator or the broker is the limit.
- Memory is resident set size (VmRSS) of the broker's process tree, from /proc.
- Progress goes to stderr through logging; the result table goes to stdout (and --markdown).
- Only 127.0.0.1 is ever contacted. Outside the default pytest run (not a test module).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import platform
import pwd
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg  # the sibling module, found through the path above

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_LIB = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

BROKER_START_TIMEOUT_S = 90.0
RABBITMQ_STOP_TIMEOUT_S = 60.0
WARREN_STOP_TIMEOUT_S = 15.0
WORKER_READY_TIMEOUT_S = 60.0
RESULT_GRACE_S = 60.0  # after the window ends, how long workers get to report
SCENARIO_TIMEOUT_S = 600.0  # queue-memory scenario, a hard cap per broker

# Run order: the memory measure first, on brokers that have not yet held any messages.
SCENARIOS = ("queues", "throughput", "fanout", "latency", "churn", "confirms")
DEFAULT_SCENARIOS = ("queues", "throughput", "fanout", "latency", "churn")
_ROLE_ABBREV = {"consumer": "cons", "producer": "prod", "churn": "churn"}


class BenchError(Exception):
    """A scenario could not be measured on one broker (the run goes on)."""


# ---------------------------------------------------------------------------------------------
# /proc readings


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids.extend(int(c) for c in (task / "children").read_text().split())
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree (children that already exited are not counted)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def _probe(ep: lg.Endpoint) -> None:
    client = await lg.Client.connect(ep, limit_s=5.0)
    await client.open_channel(1)
    await client.close()


def wait_amqp(ep: lg.Endpoint, timeout: float, alive: Callable[[], bool]) -> None:
    """Wait until an AMQP handshake + channel.open succeeds."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"broker exited while starting ({last})")
        try:
            asyncio.run(_probe(ep))
            return
        except (OSError, lg.AmqpError, TimeoutError) as exc:
            last = repr(exc)
            time.sleep(0.25)
    raise BenchError(f"no AMQP on {ep.host}:{ep.port} after {timeout:.0f}s ({last})")


# ---------------------------------------------------------------------------------------------
# Brokers


class Broker:
    label = "broker"

    def __init__(self) -> None:
        self.port = 0
        self.pid: int | None = None
        self.notes: list[str] = []  # events worth a line under the table

    @property
    def endpoint(self) -> lg.Endpoint:
        return lg.Endpoint(HOST, self.port)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def ensure_running(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.label} is not running")

    def log_tail(self, lines: int = 20) -> str:
        return ""


class RabbitMQ(Broker):
    label = "RabbitMQ"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.dir = workdir / "rabbitmq"
        self.node = f"bench{os.getpid()}@localhost"
        self.pid_file = self.dir / "rabbitmq.pid"
        self.started = False

    def _env(self) -> dict[str, str]:
        return {
            "HOME": str(RABBITMQ_HOME),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _command(self, tool: str, *args: str) -> list[str]:
        env = [f"{k}={v}" for k, v in self._env().items()]
        cmd = ["env", *env, str(RABBITMQ_LIB / tool), *args]
        if os.geteuid() == 0:
            return ["runuser", "-u", "rabbitmq", "--", *cmd]
        return cmd

    def start(self) -> None:
        if not (RABBITMQ_LIB / "rabbitmq-server").exists():
            raise BenchError(f"RabbitMQ is not installed ({RABBITMQ_LIB}/rabbitmq-server)")
        self.port, self.dist_port = free_port(), free_port()
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            user = pwd.getpwnam("rabbitmq")
            for p in [self.dir, *self.dir.rglob("*")]:
                os.chown(p, user.pw_uid, user.pw_gid)
            for parent in self.dir.parents:  # let user rabbitmq traverse the temp dir
                if parent == Path(tempfile.gettempdir()):
                    break
                parent.chmod(parent.stat().st_mode | 0o711)
        log.info("starting RabbitMQ node=%s port=%d dir=%s", self.node, self.port, self.dir)
        self.started = True
        subprocess.run(
            self._command("rabbitmq-server", "-detached"),
            cwd=self.dir,
            check=True,
            timeout=60,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while self.pid is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int(self.pid_file.read_text().strip())
            time.sleep(0.2)
        if self.pid is None:
            raise BenchError(f"RabbitMQ wrote no pid file in {BROKER_START_TIMEOUT_S:.0f}s")
        wait_amqp(self.endpoint, BROKER_START_TIMEOUT_S, self.alive)
        log.info("RabbitMQ up pid=%d rss_mb=%.1f", self.pid, rss_bytes(self.pid) / 2**20)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        log.info("stopping RabbitMQ node=%s", self.node)
        try:
            subprocess.run(
                self._command("rabbitmqctl", "-n", self.node, "stop", str(self.pid_file)),
                timeout=RABBITMQ_STOP_TIMEOUT_S,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.warning("rabbitmqctl stop timed out")
        if self.pid is not None and pid_alive(self.pid):
            log.warning("RabbitMQ pid=%d still alive: SIGKILL", self.pid)
            self.notes.append("RabbitMQ did not stop with rabbitmqctl and was killed")
            for p in reversed(process_tree(self.pid)):
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "log" / f"{self.node}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Warren(Broker):
    label = "Warren"

    def __init__(self, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.dir = workdir / "warren"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "node.cli", *args]

    def _other_port_options(self) -> list[str]:
        """Give every other `--something-port` option of `node` a free port.

        The node may listen on more than AMQP (metrics, management, Raft, node link);
        their default ports could be taken by other nodes on this machine.
        """
        try:
            out = subprocess.run(
                self._cli("node", "--help"),
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
        except subprocess.TimeoutExpired:
            return []
        given = set(self.extra_args)
        args: list[str] = []
        for opt in sorted(set(re.findall(r"(--[a-z0-9-]*-port)\b", out))):
            if opt not in given:
                args += [opt, str(free_port())]
        return args

    def start(self) -> None:
        self.port = free_port()
        self.starts += 1
        data_dir = self.dir / f"data{self.starts}"
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = self._cli(
            "node",
            "--host", HOST, "--port", str(self.port),
            "--data-dir", str(data_dir), "--name", "bench",
            *self._other_port_options(), *self.extra_args,
        )  # fmt: skip
        self.log_path = self.dir / f"node{self.starts}.log"
        log.info("starting Warren: %s", shlex.join(cmd))
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.proc.pid
        try:
            wait_amqp(self.endpoint, BROKER_START_TIMEOUT_S, self.alive)
        except BenchError as exc:
            self.stop()
            raise BenchError(f"{exc}\n{self.log_tail()}") from exc
        log.info("Warren up pid=%d rss_mb=%.1f", self.pid, rss_bytes(self.pid) / 2**20)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        if self.proc is not None and not self.alive():
            log.warning(
                "Warren exited (code %s); restarting it. Log tail:\n%s",
                self.proc.returncode,
                self.log_tail(),
            )
            self.notes.append(
                f"Warren exited with code {self.proc.returncode} during the run and was restarted"
            )
            self.start()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            log.info("stopping Warren pid=%d (SIGTERM)", proc.pid)
            proc.terminate()
            try:
                proc.wait(WARREN_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("Warren did not exit in %.0fs: SIGKILL", WARREN_STOP_TIMEOUT_S)
                self.notes.append(f"Warren ignored SIGTERM for {WARREN_STOP_TIMEOUT_S:.0f}s")
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.info("Warren exit code %s", proc.returncode)
        if proc.returncode != 0:
            self.notes.append(f"Warren's exit code on SIGTERM at the end: {proc.returncode}")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError, AttributeError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


# ---------------------------------------------------------------------------------------------
# Running workers


@dataclass
class LoadResult:
    results: list[lg.WorkerResult]
    broker_cpu_percent: float
    window_s: float

    def of(self, role: str) -> list[lg.WorkerResult]:
        return [r for r in self.results if r.role == role]

    def rate(self, role: str) -> float:
        return sum(r.count for r in self.of(role)) / self.window_s

    @property
    def generator_cpu(self) -> str:
        return " ".join(
            f"{_ROLE_ABBREV.get(r.role, r.role)} {r.cpu_percent:.0f}%" for r in self.results
        )


@dataclass
class _Worker:
    proc: multiprocessing.process.BaseProcess
    pipe: Connection
    spec: lg.WorkerSpec


def _recv(w: _Worker, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.pipe.poll(0.2):
            try:
                msg = w.pipe.recv()
            except EOFError:
                raise BenchError(f"worker died before {what}") from None
            if msg[0] == "error":
                raise BenchError(f"worker failed before {what}: {msg[1].strip().splitlines()[-1]}")
            return msg
        if not w.proc.is_alive() and not w.pipe.poll(0):
            raise BenchError(f"worker exited (code {w.proc.exitcode}) before {what}")
    raise BenchError(f"worker timed out waiting for {what}")


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_load(
    broker: Broker,
    first: Sequence[lg.WorkerSpec],
    then: Sequence[lg.WorkerSpec],
    *,
    warmup: float,
    duration: float,
) -> LoadResult:
    """Start `first` (consumers), wait until ready, then `then` (producers), run the window."""
    ctx = multiprocessing.get_context("fork")
    workers: list[_Worker] = []
    try:
        for group in (first, then):
            started = []
            for spec in group:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=lg.run_worker, args=(spec, child), daemon=True)
                proc.start()
                child.close()
                w = _Worker(proc, parent, spec)
                workers.append(w)
                started.append(w)
            for w in started:
                _recv(w, WORKER_READY_TIMEOUT_S, "ready")
        t_start = time.monotonic() + warmup
        t_end = t_start + duration
        for w in workers:
            w.pipe.send(("go", t_start, t_end))
        assert broker.pid is not None
        _sleep_until(t_start)
        cpu0, w0 = cpu_seconds(broker.pid), time.monotonic()
        _sleep_until(t_end)
        cpu1, w1 = cpu_seconds(broker.pid), time.monotonic()
        results = [_recv(w, RESULT_GRACE_S, "its result")[1] for w in workers]
        for r in results:
            if r.note:
                log.warning("%s: %s", r.role, r.note)
        return LoadResult(results, 100.0 * (cpu1 - cpu0) / (w1 - w0), duration)
    finally:
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


def run_async(coro: Any, timeout: float = SCENARIO_TIMEOUT_S) -> Any:
    async def capped() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(capped())


# ---------------------------------------------------------------------------------------------
# Scenarios: each returns {metric name: value} plus CPU notes for one broker


@dataclass(frozen=True)
class Options:
    duration: float
    warmup: float
    prefetch: int
    ack_every: int
    body_size: int
    fanout_queues: int
    consumer_procs: int
    latency_rate: float
    churn_concurrency: int
    churn_procs: int
    queues: int
    queue_channels: int
    confirm_window: int


@dataclass
class Measured:
    values: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, str] = field(default_factory=dict)  # sub-run -> "broker X% | gen ..."


def _note_cpu(m: Measured, name: str, load: LoadResult) -> None:
    m.cpu[name] = f"broker {load.broker_cpu_percent:.0f}% · workers: {load.generator_cpu}"
    log.info(
        "  %s: broker_cpu=%.0f%% worker_cpu: %s",
        name,
        load.broker_cpu_percent,
        load.generator_cpu,
    )


def _name(kind: str) -> str:
    return f"bench.{kind}.{uuid.uuid4().hex[:8]}"


def _cleanup(ep: lg.Endpoint, queues: Sequence[str], exchange: str | None = None) -> None:
    try:
        run_async(lg.teardown_topology(ep, queues, exchange), timeout=60)
    except (OSError, lg.AmqpError, TimeoutError) as exc:
        log.warning("cleanup failed: %r", exc)


def scenario_throughput(b: Broker, o: Options, confirm_window: int = 0) -> Measured:
    ep, q = b.endpoint, _name("tp")
    run_async(lg.setup_topology(ep, [q]), timeout=60)
    try:
        load = run_load(
            b,
            [lg.ConsumeSpec(ep, (q,), prefetch=o.prefetch, ack_every=o.ack_every)],
            [lg.PublishSpec(ep, "", q, body_size=o.body_size, confirm_window=confirm_window)],
            warmup=o.warmup,
            duration=o.duration,
        )
    finally:
        _cleanup(ep, [q])
    m = Measured({"delivered": load.rate("consumer"), "published": load.rate("producer")})
    if confirm_window:
        m.values["confirmed"] = sum(r.confirmed for r in load.of("producer")) / load.window_s
    _note_cpu(m, "confirms" if confirm_window else "throughput", load)
    return m


def scenario_confirms(b: Broker, o: Options) -> Measured:
    return scenario_throughput(b, o, confirm_window=o.confirm_window)


def _split(items: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    parts = max(1, min(parts, len(items)))
    return [tuple(items[i::parts]) for i in range(parts)]


def scenario_fanout(b: Broker, o: Options) -> Measured:
    ep, ex = b.endpoint, _name("fanout")
    queues = [f"{ex}.q{i}" for i in range(o.fanout_queues)]
    run_async(
        lg.setup_topology(ep, queues, (ex, "fanout"), [(q, ex, "") for q in queues]),
        timeout=60,
    )
    try:
        consumers = [
            lg.ConsumeSpec(ep, part, prefetch=o.prefetch, ack_every=o.ack_every)
            for part in _split(queues, o.consumer_procs)
        ]
        load = run_load(
            b,
            consumers,
            [lg.PublishSpec(ep, ex, "", body_size=o.body_size)],
            warmup=o.warmup,
            duration=o.duration,
        )
    finally:
        _cleanup(ep, queues, ex)
    m = Measured({"delivered": load.rate("consumer"), "published": load.rate("producer")})
    _note_cpu(m, "fanout", load)
    return m


def percentile(sorted_values: Sequence[int], p: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(p * len(sorted_values)) - 1)
    return float(sorted_values[k])


def scenario_latency(b: Broker, o: Options) -> Measured:
    ep, q = b.endpoint, _name("lat")
    run_async(lg.setup_topology(ep, [q]), timeout=60)
    try:
        load = run_load(
            b,
            [
                lg.ConsumeSpec(
                    ep, (q,), prefetch=o.prefetch, ack_every=o.ack_every, measure_latency=True
                )
            ],
            [lg.PublishSpec(ep, "", q, body_size=max(8, o.body_size), rate=o.latency_rate)],
            warmup=o.warmup,
            duration=o.duration,
        )
    finally:
        _cleanup(ep, [q])
    lat = sorted(x for r in load.of("consumer") for x in r.latencies_ns)
    if not lat:
        raise BenchError("no message was delivered during the window")
    ms = 1e-6
    m = Measured(
        {
            "p50": percentile(lat, 0.50) * ms,
            "p99": percentile(lat, 0.99) * ms,
            "max": lat[-1] * ms,
            "delivered": load.rate("consumer"),
            "samples": float(len(lat)),
        }
    )
    _note_cpu(m, "latency", load)
    return m


def scenario_churn(b: Broker, o: Options) -> Measured:
    ep = b.endpoint
    m = Measured()
    seq = run_load(b, [], [lg.ChurnSpec(ep, 1)], warmup=o.warmup, duration=o.duration)
    m.values["sequential"] = seq.rate("churn")
    _note_cpu(m, "churn sequential", seq)
    procs = max(1, min(o.churn_procs, o.churn_concurrency))
    per = [o.churn_concurrency // procs + (i < o.churn_concurrency % procs) for i in range(procs)]
    b.ensure_running()
    conc = run_load(b, [], [lg.ChurnSpec(ep, n) for n in per], warmup=o.warmup, duration=o.duration)
    m.values["concurrent"] = conc.rate("churn")
    _note_cpu(m, f"churn concurrency {o.churn_concurrency}", conc)
    errors = sum(r.errors for r in seq.results + conc.results)
    if errors:
        log.warning("  churn: %d failed connection attempts", errors)
    m.values["errors"] = float(errors)
    return m


async def _queue_memory(b: Broker, o: Options) -> Measured:
    assert b.pid is not None
    prefix = _name("mem")
    names = [f"{prefix}.{i:05d}" for i in range(o.queues)]
    client = await lg.with_client(b.endpoint, o.queue_channels)
    try:
        await asyncio.sleep(2.0)
        rss0 = rss_bytes(b.pid)
        elapsed = await lg.run_on_channels(client, o.queue_channels, names)
        await asyncio.sleep(3.0)
        rss1 = rss_bytes(b.pid)
        log.info(
            "  queues: %d declared in %.1fs, rss %.1f -> %.1f MB",
            o.queues,
            elapsed,
            rss0 / 2**20,
            rss1 / 2**20,
        )
        t_del = await lg.run_on_channels(client, o.queue_channels, names, delete=True)
        log.info("  queues: deleted in %.1fs", t_del)
    finally:
        await client.close()
    return Measured(
        {
            "per_queue": (rss1 - rss0) / o.queues,
            "declare_rate": o.queues / elapsed,
            "rss_before_mb": rss0 / 2**20,
            "rss_after_mb": rss1 / 2**20,
        }
    )


def scenario_queues(b: Broker, o: Options) -> Measured:
    return run_async(_queue_memory(b, o))  # type: ignore[no-any-return]


RUNNERS: dict[str, Callable[[Broker, Options], Measured]] = {
    "throughput": scenario_throughput,
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "churn": scenario_churn,
    "queues": scenario_queues,
    "confirms": scenario_confirms,
}


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Metric:
    scenario: str
    key: str
    label: str
    unit: str
    better: str  # "higher", "lower" or "" (reported only)
    target: float | None  # Warren/RabbitMQ ratio to meet, None = no target
    fmt: str = "{:,.0f}"


METRICS: tuple[Metric, ...] = (
    Metric("throughput", "delivered", "1. transient 1→1, delivered", "msg/s", "higher", 1.0),
    Metric("throughput", "published", "1. transient 1→1, published", "msg/s", "higher", None),
    Metric("fanout", "delivered", "2. fanout 1→10, delivered (total)", "msg/s", "higher", 1.0),
    Metric("fanout", "published", "2. fanout 1→10, published", "msg/s", "higher", None),
    Metric("latency", "p50", "3. latency @fixed rate, p50", "ms", "lower", None, "{:.3f}"),
    Metric("latency", "p99", "3. latency @fixed rate, p99", "ms", "lower", 1.0, "{:.3f}"),
    Metric("latency", "max", "3. latency @fixed rate, max", "ms", "lower", None, "{:.3f}"),
    Metric("churn", "sequential", "4. connection churn, sequential", "conn/s", "higher", None),
    Metric("churn", "concurrent", "4. connection churn, concurrent", "conn/s", "higher", None),
    Metric("queues", "per_queue", "5. memory per declared queue", "bytes", "lower", 1.0),
    Metric("queues", "declare_rate", "5. queue.declare rate", "queues/s", "higher", None),
    Metric("confirms", "delivered", "6. 1→1 with confirms, delivered", "msg/s", "higher", 1.0),
    Metric("confirms", "confirmed", "6. 1→1 with confirms, confirmed", "msg/s", "higher", None),
)


def _fmt(metric: Metric, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return metric.fmt.format(value)


def _cell(text: str, limit: int = 160) -> str:
    """One line of text that is safe inside a markdown table cell."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    return first.replace("|", "\\|")


def render(
    results: dict[str, dict[str, Measured | str]],
    scenarios: Sequence[str],
    brokers: Sequence[str],
    header: list[str],
    notes: Sequence[str] = (),
) -> str:
    lines = [*header, ""]
    lines.append("| scenario | unit | RabbitMQ | Warren | ratio W/R | target | met? |")
    lines.append("|---|---|---:|---:|---:|---|---|")
    for metric in METRICS:
        if metric.scenario not in scenarios:
            continue
        cells: dict[str, str] = {}
        values: dict[str, float | None] = {}
        for broker in ("RabbitMQ", "Warren"):
            got = results.get(broker, {}).get(metric.scenario)
            if broker not in brokers:
                cells[broker], values[broker] = "not run", None
            elif isinstance(got, Measured):
                values[broker] = got.values.get(metric.key)
                cells[broker] = _fmt(metric, values[broker])
            else:
                cells[broker], values[broker] = ("error" if got else "—"), None
        r, w = values["RabbitMQ"], values["Warren"]
        ratio = w / r if r and w is not None and not math.isnan(r) and not math.isnan(w) else None
        if metric.target is None:
            target = "(reported)"
            met = "n/a"
        else:
            sign = "≥" if metric.better == "higher" else "≤"
            target = f"{sign} {metric.target:.1f}"
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
    cpu_rows: list[str] = []
    for broker in brokers:
        for scenario in scenarios:
            got = results.get(broker, {}).get(scenario)
            if isinstance(got, Measured):
                for run, cpu in got.cpu.items():
                    cpu_rows.append(f"| {broker} | {run} | {cpu} |")
            elif isinstance(got, str):
                cpu_rows.append(f"| {broker} | {scenario} | error: {_cell(got)} |")
    if cpu_rows:
        lines += [
            "",
            "CPU in the measurement window (or the error), % of one core",
            "(broker: its whole process tree; workers: one figure per load-generator process):",
            "",
            "| broker | run | CPU |",
            "|---|---|---|",
            *cpu_rows,
        ]
    if notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def _measure(scenario: str, b: Broker, opts: Options, rep: int, repeat: int) -> Measured | str:
    """One scenario on one broker: its measures, or the error text (the run goes on)."""
    log.info("== %s on %s%s", scenario, b.label, f" (run {rep}/{repeat})" if repeat > 1 else "")
    try:
        b.ensure_running()
        m = RUNNERS[scenario](b, opts)
    except Exception as exc:  # one failed measurement must not end the run
        if not isinstance(exc, BenchError | OSError | lg.AmqpError | TimeoutError):
            log.exception("unexpected error")
        log.error("%s on %s failed: %s", scenario, b.label, exc)
        tail = b.log_tail()
        if tail:
            log.error("%s log tail:\n%s", b.label, tail)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    if repeat > 1:
        m.cpu = {f"{run} #{rep}": cpu for run, cpu in m.cpu.items()}
    return m


def _combine(got: Sequence[Measured | str]) -> Measured | str:
    """Repeated runs: the median of each value over the runs that succeeded."""
    ok = [m for m in got if isinstance(m, Measured)]
    if not ok:
        return next((e for e in got if isinstance(e, str)), "no run")
    if len(ok) == 1 and len(got) == 1:
        return ok[0]
    out = Measured()
    for key in ok[0].values:
        out.values[key] = statistics.median(m.values[key] for m in ok if key in m.values)
    for m in ok:
        out.cpu.update(m.cpu)
    for e in got:
        if isinstance(e, str):
            out.cpu[f"failed run ({len(got) - len(ok)} of {len(got)})"] = _cell(e)
    return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}; "
        f"default: {', '.join(DEFAULT_SCENARIOS)}",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window opens")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every scenario N times per broker (alternating) and report medians",
    )
    p.add_argument("--rabbitmq", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warren", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--markdown", type=Path, metavar="OUT", help="also write the table here")
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
    p.add_argument("--latency-rate", type=float, default=1000.0, help="msg/s, scenario 3")
    p.add_argument("--churn-concurrency", type=int, default=8)
    p.add_argument("--churn-procs", type=int, default=2)
    p.add_argument("--queues", type=int, default=10_000, help="queues declared, scenario 5")
    p.add_argument("--queue-channels", type=int, default=10, help="channels declaring them")
    p.add_argument("--confirm-window", type=int, default=1000, help="scenario 'confirms'")
    p.add_argument("--warren-args", default="", help="extra `node` options for Warren (one string)")
    p.add_argument("--keep-temp", action="store_true", help="keep broker dirs and logs")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not 1 <= args.ack_every <= args.prefetch:
        p.error("--ack-every must be between 1 and --prefetch")
    if not (args.rabbitmq or args.warren):
        p.error("nothing to run: both --no-rabbitmq and --no-warren")
    return args


class _Interrupted(BaseException):
    pass


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _header(
    args: argparse.Namespace,
    loop_kind: str,
    cap: tuple[float, float],
    load: tuple[float, float],
) -> list[str]:
    return [
        "## Warren vs RabbitMQ (tests/benchmarks/bench_node.py)",
        "",
        f"- host: {platform.node()} · {os.cpu_count()} CPUs (shared) · "
        f"Python {platform.python_version()} · load generator on {loop_kind}",
        f"- window {args.duration:g}s after {args.warmup:g}s warm-up · body {args.body_size} B "
        f"· non-persistent · prefetch {args.prefetch} · "
        f"{'ack per message' if args.ack_every == 1 else f'ack multiple every {args.ack_every}'}"
        f"{f' · median of {args.repeat} runs' if args.repeat > 1 else ''}"
        f" · latency at {args.latency_rate:g} msg/s · churn concurrency "
        f"{args.churn_concurrency} · {args.queues:,} queues",
        f"- load generator capacity, one core, no broker: consume+ack {cap[0]:,.0f} msg/s, "
        f"publish {cap[1]:,.0f} msg/s",
        f"- machine load average (1 min) at start {load[0]:.1f}, at end {load[1]:.1f} "
        f"(above {os.cpu_count()} means other work competed for the CPUs: noisy figures)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    scenarios = [s for s in SCENARIOS if s in (args.only or DEFAULT_SCENARIOS)]
    opts = Options(
        duration=args.duration,
        warmup=args.warmup,
        prefetch=args.prefetch,
        ack_every=args.ack_every,
        body_size=args.body_size,
        fanout_queues=args.fanout_queues,
        consumer_procs=args.consumer_procs,
        latency_rate=args.latency_rate,
        churn_concurrency=args.churn_concurrency,
        churn_procs=args.churn_procs,
        queues=args.queues,
        queue_channels=args.queue_channels,
        confirm_window=args.confirm_window,
    )
    loop_kind = lg.install_event_loop_policy()
    cap = (asyncio.run(lg.consumer_capacity(100_000)), asyncio.run(lg.producer_capacity(1.0)))
    log.info("load generator capacity: consume+ack %.0f msg/s, publish %.0f msg/s", *cap)
    load_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="warren-bench-"))
    brokers: list[Broker] = []
    runs: dict[str, dict[str, list[Measured | str]]] = {}
    interrupted = ""
    try:
        with _signals_raise():
            if args.rabbitmq:
                brokers.append(RabbitMQ(workdir))
            if args.warren:
                brokers.append(Warren(workdir, shlex.split(args.warren_args)))
            live: list[Broker] = []
            for b in brokers:
                try:
                    b.start()
                    live.append(b)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    log.error("%s did not start: %s", b.label, exc)
                    why = f"did not start: {_cell(str(exc))}"
                    runs[b.label] = {sc: [why] for sc in scenarios}
            for scenario in scenarios:
                for rep in range(1, args.repeat + 1):
                    for b in live:
                        got = _measure(scenario, b, opts, rep, args.repeat)
                        runs.setdefault(b.label, {}).setdefault(scenario, []).append(got)
    except (KeyboardInterrupt, _Interrupted) as exc:
        why = exc.args[0] if exc.args else "SIGINT"
        log.error("interrupted (%s): stopping the brokers", why)
        interrupted = f"interrupted by {why}: the table holds what was measured before"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        for b in reversed(brokers):
            try:
                b.stop()
            except Exception:
                log.exception("stopping %s failed", b.label)
        if args.keep_temp:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {
        broker: {sc: _combine(got) for sc, got in per.items()} for broker, per in runs.items()
    }
    notes = [n for b in brokers for n in b.notes]
    if interrupted:
        notes.append(interrupted)
    table = render(
        results,
        scenarios,
        [b.label for b in brokers],
        _header(args, loop_kind, cap, (load_start, os.getloadavg()[0])),
        notes,
    )
    sys.stdout.write(table)
    if args.markdown:
        args.markdown.write_text(table)
        log.info("wrote %s", args.markdown)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
