"""Does the expiry of a million messages block the broker's event loop? One command measures it.

    python tests/benchmarks/bench_ttl.py [--messages N] [--ttl-ms MS] [--body-size B]
        [--rabbitmq/--no-rabbitmq] [--warren/--no-warren] [--gc-log/--no-gc-log]
        [--py-spy OUT] [--markdown OUT]

Per broker, on a fresh node (bench_node.py's Warren / RabbitMQ starters):
1. A probe process starts a continuous round trip on its own connection: queue.declare
   passive of a small idle queue, one request in flight, each round trip's latency recorded
   with the time it started. While the event loop is blocked, the request in flight waits:
   the probe's worst round trip bounds the longest block from below.
2. baseline: the probe alone on the idle node.
3. fill: N small transient messages published flat out, with confirms (a window of
   unconfirmed messages), into a queue with x-message-ttl; all confirmed (none nacked) and a
   passive declare counts N before the TTL runs out, or the run fails.
4. hold: the messages sit in the queue until the first one is due (fill start + TTL).
5. expiry: from then until a monitor connection (a passive declare of the TTL queue every
   MONITOR_INTERVAL_S, which may do a bounded share of the expiry itself) counts 0.
The probe's samples are split by the phase in which they started; the table gives p50, p99,
p99.9, max and how many exceeded the 10 ms target, per broker and phase.

With --gc-log (the default) Warren runs under a small wrapper that registers a `gc.callbacks`
hook and writes every cyclic-GC pass longer than 1 ms to the node's log (generation,
duration, CLOCK_MONOTONIC instant); the report lists them per phase beside the probe's
figures, so a stall can be matched to a collection. Nothing in node/ is changed. --py-spy
OUT records the Warren node (with native frames) over the fill, hold and expiry phases.

Rules: as bench_node.py (own brokers, always stopped; only 127.0.0.1; progress on stderr
through logging, the result table on stdout). Outside the default pytest run.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_node as bn  # the sibling modules, found through the path above
import loadgen as lg

log = logging.getLogger("bench_ttl")

TARGET_MS = 10.0  # the bound on any single block of the event loop
MONITOR_INTERVAL_S = 0.1
GC_REPORT_MS = 1.0  # collections at least this long are logged by the wrapper
PROBE_READY_TIMEOUT_S = 30.0
EXPIRY_TIMEOUT_S = 300.0  # after the last message is due, how long the queue may take to empty
PHASES = ("baseline", "fill", "hold", "expiry")

# Run by the Warren node's interpreter before node.cli (python -c): times every cyclic GC
# pass with gc.callbacks and writes the long ones to stderr (the node's log file).
GC_HOOK = f"""\
import gc, runpy, sys, time
_t0 = [0]
def _gc_timer(phase, info):
    if phase == "start":
        _t0[0] = time.perf_counter_ns()
        return
    ns = time.perf_counter_ns() - _t0[0]
    if ns >= {int(GC_REPORT_MS * 1e6)}:
        sys.stderr.write(
            "gc-pause gen=%d ms=%.2f collected=%d at=%.6f\\n"
            % (info["generation"], ns / 1e6, info["collected"], time.monotonic())
        )
        sys.stderr.flush()
gc.callbacks.append(_gc_timer)
sys.argv[0] = "node.cli"
runpy.run_module("node.cli", run_name="__main__", alter_sys=True)
"""
_GC_LINE = re.compile(r"gc-pause gen=(\d) ms=([\d.]+) collected=(\d+) at=([\d.]+)")


# ---------------------------------------------------------------------------------------------
# The probe: its own process and event loop


async def _probe_main(ep: lg.Endpoint, queue: str, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    client = await lg.Client.connect(ep)
    await client.open_channel(1)
    await client.declare_queue(1, queue, passive=True)
    starts = array.array("q")
    lats = array.array("q")
    pipe.send(("ready",))
    stop = loop.run_in_executor(None, pipe.recv)
    clock = time.monotonic_ns
    while not stop.done():
        t0 = clock()
        await client.declare_queue(1, queue, passive=True)
        lats.append(clock() - t0)
        starts.append(t0)
    await client.close()
    pipe.send(("result", starts, lats))


def _run_probe(ep: lg.Endpoint, queue: str, pipe: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    lg.install_event_loop_policy()
    try:
        asyncio.run(_probe_main(ep, queue, pipe))
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", traceback.format_exc()))
        raise
    finally:
        pipe.close()


class Probe:
    """The probe process, started and stopped by the driver."""

    def __init__(self, ep: lg.Endpoint, queue: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_run_probe, args=(ep, queue, child), daemon=True)
        self.proc.start()
        child.close()
        self._expect("ready", PROBE_READY_TIMEOUT_S)

    def _expect(self, what: str, timeout: float) -> tuple[object, ...]:
        if not self.pipe.poll(timeout):
            raise bn.BenchError(f"probe sent no {what} in {timeout:.0f}s")
        msg: tuple[object, ...] = self.pipe.recv()
        if msg[0] == "error":
            raise bn.BenchError(f"probe failed: {str(msg[1]).strip().splitlines()[-1]}")
        return msg

    def stop(self) -> tuple[array.array[int], array.array[int]]:
        self.pipe.send(("stop",))
        msg = self._expect("result", 60.0)
        self.close()
        starts, lats = msg[1], msg[2]
        assert isinstance(starts, array.array)
        assert isinstance(lats, array.array)
        return starts, lats

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.pipe.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ---------------------------------------------------------------------------------------------
# Fill and monitor (in the driver's process)


async def fill(ep: lg.Endpoint, queue: str, count: int, body_size: int, window: int) -> int:
    """Publish `count` transient messages to `queue` (default exchange) with confirms; return
    the queue's message count afterwards."""
    client = await lg.Client.connect(ep)
    try:
        await client.open_channel(1)
        await client.confirm_select(1)
        batch = 500
        one = lg.encode_publish(1, "", queue, b"x" * body_size, frame_max=client.frame_max)
        payload = one * batch
        proto = client.proto
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            await proto.writable()
            await proto.confirms_reach(sent + n - window)
            client.write(payload if n == batch else one * n)
            sent += n
        await proto.confirms_reach(count)
        if proto.error is not None:
            raise proto.error
        if proto.confirms.nacked:
            raise bn.BenchError(f"{proto.confirms.nacked} publishes were nacked")
        ok = await client.declare_queue(1, queue, passive=True)
        return int(ok.message_count)
    finally:
        await client.close()


async def wait_empty(ep: lg.Endpoint, queue: str, deadline: float) -> tuple[float, int]:
    """Poll the queue's message count until 0; return (monotonic instant, polls)."""
    client = await lg.Client.connect(ep)
    polls = 0
    try:
        await client.open_channel(1)
        while True:
            ok = await client.declare_queue(1, queue, passive=True)
            polls += 1
            if ok.message_count == 0:
                return time.monotonic(), polls
            if time.monotonic() > deadline:
                raise bn.BenchError(f"{ok.message_count} messages left at the deadline")
            await asyncio.sleep(MONITOR_INTERVAL_S)
    finally:
        await client.close()


async def declare(ep: lg.Endpoint, queue: str, arguments: dict[str, object]) -> None:
    client = await lg.with_client(ep)
    try:
        await client.declare_queue(1, queue, arguments=arguments)
    finally:
        await client.close()


async def delete(ep: lg.Endpoint, queues: Sequence[str]) -> None:
    client = await lg.with_client(ep)
    try:
        for q in queues:
            await client.delete_queue(1, q)
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Stats:
    samples: int
    p50: float
    p99: float
    p999: float
    max: float
    over: int  # samples above TARGET_MS
    worst: list[tuple[float, float]]  # (ms, seconds since the phase began), worst first


def stats(lats_ns: Sequence[int], starts_ns: Sequence[int], t0_ns: int) -> Stats | None:
    if not lats_ns:
        return None
    ordered = sorted(lats_ns)
    ms = 1e-6
    worst_idx = sorted(range(len(lats_ns)), key=lats_ns.__getitem__, reverse=True)[:5]
    return Stats(
        samples=len(ordered),
        p50=bn.percentile(ordered, 0.50) * ms,
        p99=bn.percentile(ordered, 0.99) * ms,
        p999=bn.percentile(ordered, 0.999) * ms,
        max=ordered[-1] * ms,
        over=sum(1 for x in ordered if x > TARGET_MS * 1e6),
        worst=[(lats_ns[i] * ms, (starts_ns[i] - t0_ns) / 1e9) for i in worst_idx],
    )


@dataclass
class GcPause:
    generation: int
    ms: float
    collected: int
    at: float  # monotonic seconds


@dataclass
class Run:
    broker: str
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # monotonic s
    stats: dict[str, Stats | None] = field(default_factory=dict)
    gc: list[GcPause] = field(default_factory=list)
    fill_s: float = 0.0
    expiry_s: float = 0.0  # first message due -> queue empty
    lag_s: float = 0.0  # last message due -> queue empty
    polls: int = 0
    error: str = ""


def split_phases(run: Run, starts: Sequence[int], lats: Sequence[int]) -> None:
    for name in PHASES:
        if name not in run.phases:
            continue
        a, b = (int(t * 1e9) for t in run.phases[name])
        idx = [i for i, t in enumerate(starts) if a <= t < b]
        run.stats[name] = stats([lats[i] for i in idx], [starts[i] for i in idx], a)


def read_gc_log(path: Path) -> list[GcPause]:
    pauses = []
    with contextlib.suppress(OSError):
        for m in _GC_LINE.finditer(path.read_text(errors="replace")):
            pauses.append(GcPause(int(m[1]), float(m[2]), int(m[3]), float(m[4])))
    return pauses


def phase_of(run: Run, at: float) -> str:
    for name, (a, b) in run.phases.items():
        if a <= at < b:
            return name
    return "other"


# ---------------------------------------------------------------------------------------------
# One broker


class TracedWarren(bn.Warren):
    """bench_node's Warren, optionally run under the GC-timing wrapper (GC_HOOK)."""

    def __init__(self, workdir: Path, gc_log: bool) -> None:
        super().__init__(workdir)
        self.gc_log = gc_log

    def _cli(self, *args: str) -> list[str]:
        if self.gc_log:
            return [sys.executable, "-c", GC_HOOK, *args]
        return super()._cli(*args)


def measure(b: bn.Broker, args: argparse.Namespace) -> Run:
    run = Run(b.label)
    ep = b.endpoint
    tag = uuid.uuid4().hex[:8]
    ttl_q, probe_q = f"bench.ttl.{tag}", f"bench.probe.{tag}"
    bn.run_async(declare(ep, probe_q, {}), timeout=60)
    bn.run_async(declare(ep, ttl_q, {"x-message-ttl": args.ttl_ms}), timeout=60)
    spy: subprocess.Popen[bytes] | None = None
    probe = Probe(ep, probe_q)
    try:
        t = time.monotonic()
        time.sleep(args.baseline)
        run.phases["baseline"] = (t, time.monotonic())
        if args.py_spy and isinstance(b, bn.Warren) and b.pid is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(b.pid), "--native", "--rate", "250",
                 "--format", "speedscope", "--output", str(args.py_spy)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )  # fmt: skip
        t_fill0 = time.monotonic()
        log.info("%s: publishing %d messages (TTL %d ms)", b.label, args.messages, args.ttl_ms)
        count = bn.run_async(
            fill(ep, ttl_q, args.messages, args.body_size, args.confirm_window), timeout=600
        )
        t_fill1 = time.monotonic()
        run.fill_s = t_fill1 - t_fill0
        log.info(
            "%s: %d in the queue after %.1fs (%.0f msg/s)",
            b.label,
            count,
            run.fill_s,
            args.messages / run.fill_s,
        )
        first_due = t_fill0 + args.ttl_ms / 1000
        if count != args.messages or t_fill1 >= first_due:
            raise bn.BenchError(
                f"the queue held {count} of {args.messages} after the fill ({run.fill_s:.1f}s): "
                "raise --ttl-ms above the fill time"
            )
        run.phases["fill"] = (t_fill0, t_fill1)
        bn._sleep_until(first_due)
        run.phases["hold"] = (t_fill1, first_due)
        last_due = t_fill1 + args.ttl_ms / 1000
        t_empty, run.polls = bn.run_async(
            wait_empty(ep, ttl_q, last_due + EXPIRY_TIMEOUT_S), timeout=EXPIRY_TIMEOUT_S * 2
        )
        run.phases["expiry"] = (first_due, t_empty)
        run.expiry_s, run.lag_s = t_empty - first_due, t_empty - last_due
        log.info(
            "%s: empty %.2fs after the first message was due (%.2fs after the last)",
            b.label,
            run.expiry_s,
            run.lag_s,
        )
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        try:
            starts, lats = probe.stop()
        finally:
            probe.close()
    split_phases(run, starts, lats)
    if isinstance(b, TracedWarren) and b.gc_log:
        run.gc = read_gc_log(b.log_path)
    with contextlib.suppress(OSError, lg.AmqpError, TimeoutError):
        bn.run_async(delete(ep, [ttl_q, probe_q]), timeout=60)
    return run


# ---------------------------------------------------------------------------------------------
# Report


def _f(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"


def render(runs: Sequence[Run], args: argparse.Namespace, load: tuple[float, float]) -> str:
    lines = [
        "## Event-loop blocking during TTL expiry (tests/benchmarks/bench_ttl.py)",
        "",
        f"- host: {platform.node()} · {os.cpu_count()} CPUs (shared) · Python "
        f"{platform.python_version()} · load average (1 min) {load[0]:.1f} → {load[1]:.1f}",
        f"- {args.messages:,} transient messages of {args.body_size} B, x-message-ttl "
        f"{args.ttl_ms} ms, published with confirms (window {args.confirm_window}); probe: "
        "queue.declare passive of an idle queue on its own connection, one in flight",
        f"- target: no single block of the event loop above {TARGET_MS:g} ms",
        "",
        "| broker | phase | seconds | probes | p50 ms | p99 ms | p99.9 ms | max ms "
        f"| > {TARGET_MS:g} ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if run.error:
            lines.append(f"| {run.broker} | error: {bn._cell(run.error)} | | | | | | | |")
        for name in PHASES:
            s = run.stats.get(name)
            if name not in run.phases or s is None:
                continue
            a, b = run.phases[name]
            lines.append(
                f"| {run.broker} | {name} | {b - a:.1f} | {s.samples:,} | {_f(s.p50)} "
                f"| {_f(s.p99)} | {_f(s.p999)} | {_f(s.max)} | {s.over} |"
            )
    lines.append("")
    for run in runs:
        if run.error:
            continue
        lines.append(
            f"- {run.broker}: fill {run.fill_s:.1f}s ({args.messages / run.fill_s:,.0f} msg/s); "
            f"expiry took {run.expiry_s:.2f}s from the first message due to an empty queue "
            f"({run.lag_s:.2f}s after the last was due; {run.polls} monitor polls)"
        )
        for name in ("fill", "hold", "expiry"):
            s = run.stats.get(name)
            if s is not None and s.worst:
                worst = ", ".join(f"{ms:.1f} ms at +{at:.2f}s" for ms, at in s.worst)
                lines.append(f"  - worst probes in {name}: {worst}")
        if run.gc or (args.gc_log and run.broker == "Warren"):
            lines.append(f"  - cyclic GC passes ≥ {GC_REPORT_MS:g} ms (gc.callbacks in the node):")
            for name in PHASES:
                got = [p for p in run.gc if phase_of(run, p.at) == name]
                if not got:
                    lines.append(f"    - {name}: none")
                    continue
                gens = {g: sum(1 for p in got if p.generation == g) for g in (0, 1, 2)}
                top = max(got, key=lambda p: p.ms)
                a = run.phases[name][0]
                lines.append(
                    f"    - {name}: {len(got)} (gen0 {gens[0]}, gen1 {gens[1]}, gen2 {gens[2]}), "
                    f"total {sum(p.ms for p in got):.0f} ms, longest {top.ms:.1f} ms "
                    f"(gen{top.generation}, at +{top.at - a:.2f}s)"
                )
                older = [p for p in got if p.generation > 0]
                if older:
                    lines.append(
                        "      - gen1/gen2 passes: "
                        + ", ".join(
                            f"gen{p.generation} {p.ms:.1f} ms at +{p.at - a:.2f}s" for p in older
                        )
                    )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--ttl-ms", type=int, default=30_000, help="x-message-ttl of the queue")
    p.add_argument("--body-size", type=int, default=16)
    p.add_argument("--confirm-window", type=int, default=20_000)
    p.add_argument("--baseline", type=float, default=5.0, help="seconds of probe on an idle node")
    p.add_argument("--rabbitmq", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warren", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--gc-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time Warren's cyclic GC passes through gc.callbacks (a wrapper, node/ unchanged)",
    )
    p.add_argument("--py-spy", type=Path, metavar="OUT", help="py-spy record Warren (speedscope)")
    p.add_argument("--markdown", type=Path, metavar="OUT", help="also write the table here")
    p.add_argument("--keep-temp", action="store_true", help="keep broker dirs and logs")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not (args.rabbitmq or args.warren):
        p.error("nothing to run: both --no-rabbitmq and --no-warren")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    lg.install_event_loop_policy()
    load0 = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="warren-bench-ttl-"))
    runs: list[Run] = []
    code = 0
    try:
        with bn._signals_raise():
            brokers: list[bn.Broker] = []
            if args.rabbitmq:
                brokers.append(bn.RabbitMQ(workdir))
            if args.warren:
                brokers.append(TracedWarren(workdir, args.gc_log))
            for b in brokers:  # one at a time: the other one is not even running
                try:
                    b.start()
                    runs.append(measure(b, args))
                except (bn.BenchError, OSError, lg.AmqpError, TimeoutError) as exc:
                    log.error("%s failed: %s", b.label, exc)
                    runs.append(Run(b.label, error=str(exc) or repr(exc)))
                    code = 1
                finally:
                    b.stop()
    except (KeyboardInterrupt, bn._Interrupted) as exc:
        log.error("interrupted (%s)", exc.args[0] if exc.args else "SIGINT")
        code = 130
    finally:
        if args.keep_temp:
            log.info("kept %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = render(runs, args, (load0, os.getloadavg()[0]))
    sys.stdout.write(table)
    if args.markdown:
        args.markdown.write_text(table)
    return code


if __name__ == "__main__":
    sys.exit(main())
