"""`warren verify`: the failover test a user runs against a cluster (Warren or RabbitMQ).

It publishes N persistent messages with publisher confirms through one node while a
consumer on another node takes them, an optional shell command kills and restarts nodes
meanwhile, and both clients reconnect like real ones. At the end it says how many messages
were confirmed, received, lost and duplicated; exit status 1 on any loss.

Rules:
- Identity: logical message i (0..N-1) is published as attempts 1, 2, ...; every attempt
  carries `message_id = "RUN:i:ATTEMPT"` (and the same id before a "|" in the body). An
  attempt that is nacked, returned, or whose connection drops before its confirm is
  unconfirmed, and i is published again with the next attempt number. Messages of other
  runs are acked and ignored.
- The accounting (`account`), the chaos schedule (`plan_chaos`, `ChaosPlan`), the argument
  checks and the summary's formatting are pure; tests drive them without a broker. `Chaos`
  takes its command runner as a parameter, so tests drive it with a fake one.
- Threads: one I/O thread runs a single pika IOLoop that owns both connections, the
  `Ledger` and every timer (progress, deadlines); the chaos thread only runs commands and
  counts; the main thread only waits (with deadlines) and turns Ctrl-C or SIGTERM into a
  stop request through `IOLoop.add_callback_threadsafe`. Every wait has a deadline; the
  threads are daemons and are joined with timeouts.
- Output: progress and events are EventLogger lines on stderr; the final summary is this
  command's only stdout (`click.echo`), never print(). Bad arguments are one line on
  stderr and exit code 2.
- pika is imported only when the command runs (it is not a dependency of the broker).
  This module imports nothing from the broker, the protocol or the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import click

from node.logs import EventLogger, configure, wall_time

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PREFETCH = 512  # deliveries in flight to the consumer
BACKOFF_MIN_S = 0.2  # first reconnect delay; doubled after each failure ...
BACKOFF_MAX_S = 1.0  # ... up to this
HEARTBEAT_S = 10  # unless the URL sets one: a silent node is given up after ~2 of these
CONNECT_TIMEOUT_S = 5.0  # TCP connect and AMQP handshake of one connection attempt
CONFIRM_STALL_S = 30.0  # no confirm for this long with publishes in flight: reconnect
RETRY_PAUSE_S = 0.1  # after a nack or a return, before publishing again
REDECLARE_S = 1.0  # after a return (no queue to route to), at most one re-declare per this
RESUBSCRIBE_S = 0.2  # after a consumer cancel notification, before subscribing again
CLOSE_GRACE_S = 2.0  # at the end, how long the connections get to close cleanly
JOIN_SLACK_S = 5.0  # the main thread's backstop beyond the I/O thread's own deadlines
CHAOS_COMMAND_TIMEOUT_S = 120.0  # one chaos or restart command; then its group is killed
PROGRESS_S = 1.0
LOST_SAMPLE = 10  # the summary lists this many lost message numbers
UNFLAGGED_SAMPLE = 10  # ... and this many unflagged duplicates, with where both copies came from
MAX_OUTPUT_CHARS = 300  # a failing chaos command's output is logged up to this much
# Node names are pasted into shell commands unquoted: keep them to plain characters.
NODE_NAME = re.compile(r"[A-Za-z0-9_.@:+-]+\Z")
NODE_PLACEHOLDER = "{node}"
BODY_SEPARATOR = b"|"


# --- pure parts: ids, arguments, chaos schedule, accounting, summary ------------------------


def attempt_id(run_id: str, index: int, attempt: int) -> str:
    """The message_id of one publish attempt."""
    return f"{run_id}:{index}:{attempt}"


def parse_attempt_id(text: str, run_id: str) -> tuple[int, int] | None:
    """(index, attempt) of an id of this run, or None (another run's, or not ours)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != run_id or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[1]), int(parts[2])


def make_body(message_id: str, size: int) -> bytes:
    """The id and a separator, padded with "x" to `size` bytes (never shorter than the id)."""
    head = message_id.encode() + BODY_SEPARATOR
    return head + b"x" * max(0, size - len(head))


def check_url(url: str) -> None:
    """ValueError unless `url` is an amqp:// or amqps:// URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--url {safe_url(url)!r}: {exc}") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"--url {safe_url(url)!r}: expected amqp://HOST[:PORT]/VHOST")
    if not parts.hostname:
        raise ValueError(f"--url {safe_url(url)!r}: no host")
    if port == 0:
        raise ValueError(f"--url {safe_url(url)!r}: port 0")


def safe_url(url: str) -> str:
    """`url` with its password, if any, replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = quote(parts.username or "", safe="")
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable url>"


def parse_nodes(text: str) -> tuple[str, ...]:
    """`a,b,c` as names; ValueError for a name a shell would read as more than a word."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if not NODE_NAME.match(name):
            raise ValueError(f"--chaos-nodes: {name!r} is not a plain node name")
    return names


@dataclass(frozen=True, slots=True)
class ChaosStep:
    """What the chaos thread runs at one tick: the command, then maybe the restart."""

    node: str
    command: str
    restart: str | None


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    """The chaos and restart commands and the nodes they take, round robin."""

    command: str
    restart: str | None
    nodes: tuple[str, ...]
    every: float
    down: float

    def step(self, k: int) -> ChaosStep:
        """The k-th step (k = 0, 1, ...): node k modulo the node list."""
        node = self.nodes[k % len(self.nodes)] if self.nodes else ""
        restart = self.restart.replace(NODE_PLACEHOLDER, node) if self.restart else None
        return ChaosStep(node, self.command.replace(NODE_PLACEHOLDER, node), restart)


def plan_chaos(
    chaos: str | None, restart: str | None, nodes: str | None, every: float, down: float
) -> ChaosPlan | None:
    """The chaos plan the options describe, None without --chaos, ValueError if they do
    not fit together."""
    if not chaos:
        if restart:
            raise ValueError("--restart needs --chaos")
        if nodes:
            raise ValueError("--chaos-nodes needs --chaos")
        return None
    names = parse_nodes(nodes or "")
    if not names and NODE_PLACEHOLDER in chaos + (restart or ""):
        raise ValueError(f"--chaos uses {NODE_PLACEHOLDER} but --chaos-nodes names no node")
    if every <= 0:
        raise ValueError("--chaos-every must be more than 0 seconds")
    if down < 0:
        raise ValueError("--down must not be negative")
    return ChaosPlan(chaos, restart or None, names, every, down)


@dataclass(frozen=True, slots=True)
class Tally:
    """What was published, confirmed and received, counted by logical message."""

    count: int
    published: int  # attempts, first ones and republished ones
    confirmed: int  # logical messages with a confirmed attempt
    received: int  # distinct logical messages received
    lost: int  # confirmed logical messages of which no attempt was received
    duplicates: int  # extra copies of one attempt
    duplicates_unflagged: int  # ... of which the redelivered flag was false
    unconfirmed_received: int  # received but never confirmed: allowed, not a loss
    republished: int  # attempts beyond the first
    lost_sample: tuple[int, ...]  # the first few lost message numbers


def account(
    count: int,
    attempts: Sequence[int],
    confirmed: Collection[int],
    copies: Mapping[tuple[int, int], Sequence[bool]],
) -> Tally:
    """Count a run: `attempts[i]` publishes of message i were made, the messages in
    `confirmed` had an attempt confirmed, and `copies[(i, attempt)]` are the redelivered
    flags of each copy of that attempt received, in arrival order. The first copy of an
    attempt is the delivery; every later one is a duplicate, and one whose flag is false
    is a duplicate the broker did not own up to."""
    received = {index for index, _attempt in copies}
    confirmed_set = set(confirmed)
    lost = sorted(confirmed_set - received)
    duplicates = unflagged = 0
    for flags in copies.values():
        extra = flags[1:]
        duplicates += len(extra)
        unflagged += sum(1 for flag in extra if not flag)
    return Tally(
        count=count,
        published=sum(attempts),
        confirmed=len(confirmed_set),
        received=len(received),
        lost=len(lost),
        duplicates=duplicates,
        duplicates_unflagged=unflagged,
        unconfirmed_received=len(received - confirmed_set),
        republished=sum(max(0, n - 1) for n in attempts),
        lost_sample=tuple(lost[:LOST_SAMPLE]),
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """A finished run: the tally plus what happened around it."""

    run_id: str
    queue: str
    queue_type: str
    tally: Tally
    stopped: str  # drained | drain-idle | timeout | interrupted | error
    publish_seconds: float  # first publish to the last new confirm
    elapsed_seconds: float
    nacked: int = 0
    returned: int = 0
    foreign: int = 0  # other runs' messages, acked and ignored
    publisher_reconnects: int = 0
    consumer_reconnects: int = 0
    consumer_cancels: int = 0
    chaos_events: int = 0
    restarts: int = 0
    chaos_failures: int = 0
    unflagged_sample: tuple[Copies, ...] = ()  # the first few, with both copies' times

    @property
    def complete(self) -> bool:
        """Every logical message was confirmed."""
        return self.tally.confirmed == self.tally.count

    @property
    def publish_rate(self) -> float:
        """Confirmed messages per second of publishing."""
        if self.publish_seconds <= 0:
            return 0.0
        return self.tally.confirmed / self.publish_seconds

    def problems(self) -> list[str]:
        """Why the run failed; empty when it passed."""
        found = []
        if self.tally.lost:
            found.append(f"{self.tally.lost} confirmed message(s) lost")
        if self.tally.duplicates_unflagged:
            found.append(
                f"{self.tally.duplicates_unflagged} duplicate(s) without the redelivered flag"
            )
        if not self.complete:
            found.append(f"only {self.tally.confirmed} of {self.tally.count} confirmed")
        return found

    def to_json(self) -> dict[str, Any]:
        tally = asdict(self.tally)
        tally["lost_sample"] = list(self.tally.lost_sample)
        facts = {k: v for k, v in asdict(self).items() if k not in ("tally", "unflagged_sample")}
        return {
            **tally,
            **facts,
            "reconnects": self.publisher_reconnects + self.consumer_reconnects,
            "complete": self.complete,
            "publish_seconds": round(self.publish_seconds, 3),
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "publish_rate": round(self.publish_rate, 1),
            "unflagged_sample": [copies.to_json() for copies in self.unflagged_sample],
            "ok": not self.problems(),
        }


def exit_status(summary: Summary) -> int:
    return EXIT_FAILED if summary.problems() else EXIT_OK


def format_summary(summary: Summary) -> str:
    """A readable two-column report."""
    t = summary.tally
    rows = [
        ("confirmed", f"{t.confirmed} of {t.count}"),
        ("received", f"{t.received}"),
        (
            "lost",
            f"{t.lost}" + (f"  (e.g. {', '.join(map(str, t.lost_sample))})" if t.lost else ""),
        ),
        ("duplicates", f"{t.duplicates}  (without redelivered flag: {t.duplicates_unflagged})"),
        ("unconfirmed received", f"{t.unconfirmed_received}"),
        ("published", f"{t.published}  (republished {t.republished})"),
        ("nacked / returned", f"{summary.nacked} / {summary.returned}"),
        (
            "reconnects",
            f"publisher {summary.publisher_reconnects}, consumer {summary.consumer_reconnects}"
            f", consumer cancels {summary.consumer_cancels}",
        ),
        (
            "chaos",
            f"{summary.chaos_events} command(s), {summary.restarts} restart(s),"
            f" {summary.chaos_failures} failed",
        ),
        (
            "publish rate",
            f"{summary.publish_rate:.0f} msg/s over {summary.publish_seconds:.1f} s",
        ),
        ("elapsed", f"{summary.elapsed_seconds:.1f} s (stopped: {summary.stopped})"),
    ]
    if summary.foreign:
        rows.append(("other runs' messages", f"{summary.foreign} (acked, ignored)"))
    for copies in summary.unflagged_sample:
        rows.append(("unflagged", copies.describe()))
    problems = summary.problems()
    rows.append(("result", "FAILED: " + "; ".join(problems) if problems else "OK"))
    width = max(len(label) for label, _ in rows)
    head = f"warren verify: run {summary.run_id}, queue {summary.queue} ({summary.queue_type})"
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)])


# --- the ledger: what the I/O thread records ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copies:
    """An unflagged duplicate: the message's first copy and this one (wall times)."""

    message: int
    attempt: int
    copy: int  # this copy's number among the attempt's copies (2: the first duplicate)
    first_at: float  # the message's first copy (of any attempt)
    first_subscription: int
    at: float
    subscription: int

    def describe(self) -> str:
        return (
            f"message {self.message} attempt {self.attempt}:"
            f" {wall_time(self.first_at)} (subscription {self.first_subscription}),"
            f" again {wall_time(self.at)} (subscription {self.subscription})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "attempt": self.attempt,
            "copy": self.copy,
            "first_at": wall_time(self.first_at),
            "first_subscription": self.first_subscription,
            "at": wall_time(self.at),
            "subscription": self.subscription,
        }


class Ledger:
    """Attempts, confirms and received copies of one run. Owned by the I/O thread."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.attempts = [0] * count
        self.confirmed = bytearray(count)
        self.confirmed_count = 0
        self.received = bytearray(count)
        self.received_count = 0
        self.received_confirmed = 0  # logical messages both confirmed and received
        self.copies: dict[tuple[int, int], list[bool]] = {}
        # Where each message's first copy came from (wall time, the consumer's
        # subscription number): an unflagged duplicate is reported with both copies.
        # Grown as messages arrive (a --duration run may be given a huge --count).
        self.first_at = array("d")
        self.first_subscription = array("I")
        self.unflagged: list[Copies] = []
        self.first_publish: float | None = None
        self.last_confirm: float | None = None

    @property
    def published(self) -> int:
        return sum(self.attempts)

    def next_attempt(self, index: int, now: float) -> int:
        if self.first_publish is None:
            self.first_publish = now
        self.attempts[index] += 1
        return self.attempts[index]

    def confirm(self, index: int, now: float) -> bool:
        """Record a confirmed attempt of `index`; True the first time."""
        if self.confirmed[index]:
            return False
        self.confirmed[index] = 1
        self.confirmed_count += 1
        self.received_confirmed += self.received[index]
        self.last_confirm = now
        return True

    def receive(
        self, index: int, attempt: int, redelivered: bool, at: float = 0.0, subscription: int = 0
    ) -> Copies | None:
        """Record one copy (received at wall time `at` by the consumer's `subscription`-th
        subscription). Returns the report of an unflagged duplicate, else None."""
        flags = self.copies.setdefault((index, attempt), [])
        flags.append(redelivered)
        if not self.received[index]:
            self.received[index] = 1
            self.received_count += 1
            self.received_confirmed += self.confirmed[index]
            if index >= len(self.first_at):
                more = max(index + 1 - len(self.first_at), len(self.first_at), 1024)
                self.first_at.frombytes(bytes(8 * more))
                self.first_subscription.frombytes(bytes(4 * more))
            self.first_at[index] = at
            self.first_subscription[index] = subscription
            return None
        if len(flags) < 2 or redelivered:
            return None
        report = Copies(
            index,
            attempt,
            len(flags),
            self.first_at[index],
            self.first_subscription[index],
            at,
            subscription,
        )
        if len(self.unflagged) < UNFLAGGED_SAMPLE:
            self.unflagged.append(report)
        return report

    def tally(self) -> Tally:
        n = self.count  # (--duration may have cut the run short: nothing was sent past it)
        confirmed = [i for i, flag in enumerate(self.confirmed[:n]) if flag]
        copies = {key: list(flags) for key, flags in list(self.copies.items())}
        return account(n, self.attempts[:n], confirmed, copies)

    @property
    def publish_seconds(self) -> float:
        if self.first_publish is None or self.last_confirm is None:
            return 0.0
        return max(0.0, self.last_confirm - self.first_publish)


# --- chaos: a thread that runs shell commands -------------------------------------------------

Runner = Callable[[str, float], tuple[int, str]]  # (command, timeout) -> (status, output)


def run_shell(command: str, timeout: float) -> tuple[int, str]:
    """Run `command` with the shell in its own session (a terminal's Ctrl-C reaches only
    us); on timeout its whole process group is killed. Output goes to a temporary file, not
    a pipe, so a daemon the command leaves running (`node ... &`) cannot keep us waiting.
    Status -1: it could not start or timed out."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                command,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return -1, f"cannot start: {exc.strerror or exc}"
        try:
            status = proc.wait(timeout)
            note = ""
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(CLOSE_GRACE_S)
            status, note = -1, f"timed out after {timeout:g} s; "
        out.seek(0)
        return status, note + out.read(64 * 1024).decode(errors="replace")


class Chaos:
    """Every `plan.every` seconds (the first time after one interval) run the chaos
    command for the next node and, with a restart command, `plan.down` seconds later the
    restart for the same node. `stop()` ends it after any pending restart has run;
    `hurry()` also skips the remaining `down` wait, so the restart runs at once."""

    def __init__(
        self,
        plan: ChaosPlan,
        log: EventLogger,
        runner: Runner = run_shell,
        command_timeout: float = CHAOS_COMMAND_TIMEOUT_S,
    ) -> None:
        self.plan = plan
        self.log = log
        self.runner = runner
        self.command_timeout = command_timeout
        self.events = 0
        self.restarts = 0
        self.failures = 0
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._run, name="verify-chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def hurry(self) -> None:
        self._stop.set()
        self._hurry.set()

    def join(self, timeout: float) -> bool:
        """Wait for the thread; True if it ended."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def longest_s(self) -> float:
        """The longest a stop can take: a running command, the down wait, the restart."""
        return 2 * self.command_timeout + self.plan.down + 2 * CLOSE_GRACE_S

    def _run(self) -> None:
        k = 0
        while not self._stop.wait(self.plan.every):
            step = self.plan.step(k)
            k += 1
            self.events += 1
            self._exec("verify.chaos", step.node, step.command)
            if step.restart is not None:
                self._hurry.wait(self.plan.down)
                self.restarts += 1
                self._exec("verify.restart", step.node, step.restart)

    def _exec(self, event: str, node: str, command: str) -> None:
        started = time.monotonic()
        status, output = self.runner(command, self.command_timeout)
        seconds = round(time.monotonic() - started, 2)
        if status == 0:
            self.log.info(event, node=node, command=command, status=status, seconds=seconds)
            return
        self.failures += 1
        self.log.warning(
            event,
            node=node,
            command=command,
            status=status,
            seconds=seconds,
            output=" ".join(output.split())[:MAX_OUTPUT_CHARS],
        )


# --- the two clients on one pika IOLoop ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    urls: tuple[str, ...]
    count: int
    queue: str
    queue_type: str
    size: int
    inflight: int
    timeout: float
    drain_idle: float
    purge: bool
    duration: float | None = None  # stop starting new messages after this long


def _transient(reason: BaseException) -> bool:
    """A channel error a retry may not meet again (the cluster is electing a leader)."""
    text = str(getattr(reason, "reply_text", "")).lower()
    return "no raft quorum" in text or "cannot change the cluster" in text


def _describe(error: BaseException | None) -> str:
    """A short human reason for a pika connection or channel error (pika wraps the socket's
    error in a workflow error in a connection error)."""
    if error is None:
        return "unknown error"
    inner = getattr(error, "exceptions", None)  # AMQPConnectionWorkflowFailed
    if isinstance(inner, tuple) and inner and isinstance(inner[-1], BaseException):
        return _describe(inner[-1])
    wrapped = getattr(error, "exception", None)  # AMQPConnectorPhaseErrorBase
    if isinstance(wrapped, BaseException):
        return _describe(wrapped)
    if len(error.args) == 1 and isinstance(error.args[0], BaseException):
        return _describe(error.args[0])
    code, text = getattr(error, "reply_code", None), getattr(error, "reply_text", None)
    if code is not None:
        return f"{code} {text}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Client:
    """What the publisher and the consumer share: one connection at a time, reconnected
    with a backoff to the next URL round robin."""

    role = "client"

    def __init__(self, run: Run, first_url: int) -> None:
        self.run = run
        self.log = run.log.bind(role=self.role)
        self.url_index = first_url
        self.url = ""
        self.conn: Any = None
        self.channel: Any = None
        self.backoff = BACKOFF_MIN_S
        self.reconnects = 0
        self.ever_opened = False
        self.failures = 0  # connection attempts failed in a row
        self.last_error = ""
        self.done = False  # no reconnect after this client's connection closes
        self.declaring = False  # a queue.declare is waiting for its declare-ok

    def connect(self) -> None:
        if self.done or self.run.stopping:
            return
        urls = self.run.settings.urls
        self.url = urls[self.url_index % len(urls)]
        self.url_index += 1
        self.conn = self.run.pika.SelectConnection(
            self.run.parameters(self.url, self.role),
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self.run.ioloop,
        )

    def close(self) -> None:
        """Close the connection, if open, and do not reconnect. One still opening is closed
        when it opens (pika's close() during the handshake can trip an assertion of its own
        connection workflow), or simply fails."""
        self.done = True
        if self.conn is not None and self.conn.is_open:
            with contextlib.suppress(Exception):
                self.conn.close()

    @property
    def idle(self) -> bool:
        """No connection open or opening."""
        return self.conn is None

    def _on_open(self, conn: Any) -> None:
        if self.done or self.run.stopping:
            with contextlib.suppress(Exception):
                conn.close()
            return
        self.backoff = BACKOFF_MIN_S
        self.failures = 0
        self.ever_opened = True
        self.log.info("verify.connected", url=safe_url(self.url))
        conn.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, conn: Any, error: BaseException) -> None:
        self.conn = None
        self.failures += 1
        self.last_error = f"{safe_url(self.url)}: {_describe(error)}"
        auth = (
            self.run.pika.exceptions.ProbableAuthenticationError,
            self.run.pika.exceptions.AuthenticationError,
            self.run.pika.exceptions.ProbableAccessDeniedError,
        )
        if isinstance(error, auth):
            self.run.fatal(
                f"{safe_url(self.url)}: {_describe(error)} (check the URL's user,"
                " password and vhost)"
            )
            return
        if self.failures == 1 or self.failures % 10 == 0:
            self.log.warning("verify.connect_failed", error=self.last_error, attempts=self.failures)
        self._schedule_reconnect()

    def _on_closed(self, conn: Any, reason: BaseException) -> None:
        self.conn = None
        self.channel = None
        self.declaring = False
        self._connection_lost()
        if self.done or self.run.stopping:
            self.run.client_closed()
            return
        self.reconnects += 1
        self.log.warning("verify.disconnected", url=safe_url(self.url), reason=_describe(reason))
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self.done or self.run.stopping:
            self.run.client_closed()
            return
        delay, self.backoff = self.backoff, min(BACKOFF_MAX_S, self.backoff * 2)
        self.run.ioloop.call_later(delay, self.connect)

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        """Any channel close ends the connection: the reconnect path handles it all."""
        if self.channel is channel:
            self.channel = None
        if self.done or self.run.stopping:
            return
        if isinstance(reason, self.run.pika.exceptions.ChannelClosedByBroker):
            # ACCESS_REFUSED, PRECONDITION_FAILED: a queue declared with other arguments, a
            # body above the broker's limit; no retry changes those. A cluster that cannot
            # take a change for now (Warren: "no Raft quorum" during an election) can.
            if reason.reply_code in (403, 406) and not _transient(reason):
                what = f"queue {self.run.settings.queue!r}" if self.declaring else self.role
                self.run.fatal(f"{what}: {_describe(reason)}")
                return
            self.log.warning("verify.channel_closed", reason=_describe(reason))
        if self.conn is not None and self.conn.is_open:
            with contextlib.suppress(Exception):
                self.conn.close()

    def _connection_lost(self) -> None:
        """Hook: the connection is gone (closed or lost)."""

    def _on_channel(self, channel: Any) -> None:
        raise NotImplementedError

    def declare(self, callback: Callable[[Any], None]) -> None:
        """Declare the run's queue (durable, of the run's type) on this client's channel."""
        settings = self.run.settings

        def declared(frame: Any) -> None:
            self.declaring = False
            callback(frame)

        self.declaring = True
        self.channel.queue_declare(
            settings.queue,
            durable=True,
            arguments={"x-queue-type": settings.queue_type},
            callback=declared,
        )


class Publisher(_Client):
    """Up to `inflight` unconfirmed publishes; what is not confirmed is published again."""

    role = "publisher"

    def __init__(self, run: Run) -> None:
        super().__init__(run, 0)
        self.ledger = run.ledger
        self.window = run.settings.inflight
        self.ready = False
        self.blocked = False
        self.purged = not run.settings.purge
        self.next_fresh = 0  # the next logical message never published
        self.retry: deque[int] = deque()  # logical messages to publish again
        self.inflight: dict[int, tuple[int, int]] = {}  # delivery tag -> (index, attempt)
        self.returned: set[tuple[int, int]] = set()
        self.next_tag = 1
        self.lowest_tag = 1  # no unsettled tag below this one
        self.pause_until = 0.0
        self.fill_scheduled = False
        self.last_progress = 0.0  # when the last confirm arrived (or publishing started)
        self.redeclare_after = 0.0
        self.nacked = 0
        self.returned_count = 0

    def _on_open(self, conn: Any) -> None:
        conn.add_on_connection_blocked_callback(self._on_blocked)
        conn.add_on_connection_unblocked_callback(self._on_unblocked)
        super()._on_open(conn)

    def _on_blocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = True
        self.log.warning("verify.blocked")

    def _on_unblocked(self, _conn: Any, _frame: Any) -> None:
        self.blocked = False
        self.log.info("verify.unblocked")
        self.fill()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=self._on_select_ok)

    def _on_select_ok(self, _frame: Any) -> None:
        self.declare(self._on_declared)

    def _on_declared(self, _frame: Any) -> None:
        if not self.purged:
            self.channel.queue_purge(self.run.settings.queue, callback=self._on_purged)
            return
        self._start()

    def _on_purged(self, frame: Any) -> None:
        self.purged = True
        self.log.info(
            "verify.purged", queue=self.run.settings.queue, messages=frame.method.message_count
        )
        self.run.consumer.subscribe_if_waiting()
        self._start()

    def _start(self) -> None:
        self.ready = True
        self.blocked = False
        self.next_tag = self.lowest_tag = 1
        self.last_progress = time.monotonic()
        self.fill()

    def fill(self) -> None:
        """Publish until the window is full or nothing is left to publish."""
        if not self.ready or self.blocked or self.channel is None:
            return
        now = time.monotonic()
        if now < self.pause_until:
            if not self.fill_scheduled:
                self.fill_scheduled = True
                self.run.ioloop.call_later(self.pause_until - now, self._scheduled_fill)
            return
        count = self.ledger.count
        duration = self.run.settings.duration
        first = self.ledger.first_publish
        over = duration is not None and first is not None and now - first >= duration
        if over and self.next_fresh < count:
            # --duration: the run is the messages started so far (retries go on).
            count = self.ledger.count = self.next_fresh
            self.log.info("verify.duration_reached", seconds=duration, count=count)
            if self.ledger.confirmed_count == count:
                self.run.published_all()
                return
        while len(self.inflight) < self.window:
            if self.retry:
                index = self.retry.popleft()
                if self.ledger.confirmed[index]:
                    continue
            elif self.next_fresh < count:
                index = self.next_fresh
                self.next_fresh += 1
            else:
                return
            self._publish(index, now)

    def _scheduled_fill(self) -> None:
        self.fill_scheduled = False
        self.fill()

    def _publish(self, index: int, now: float) -> None:
        attempt = self.ledger.next_attempt(index, now)
        message_id = attempt_id(self.run.run_id, index, attempt)
        properties = self.run.pika.BasicProperties(delivery_mode=2, message_id=message_id)
        self.channel.basic_publish(
            "",
            self.run.settings.queue,
            make_body(message_id, self.run.settings.size),
            properties,
            True,
        )
        self.inflight[self.next_tag] = (index, attempt)
        self.next_tag += 1

    def _on_return(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        key = parse_attempt_id(properties.message_id or "", self.run.run_id)
        if key is None:
            return
        self.returned.add(key)
        self.returned_count += 1
        now = time.monotonic()
        if now >= self.redeclare_after and self.channel is not None:
            # Nothing to route to: the queue may be gone (a node that held it died).
            self.redeclare_after = now + REDECLARE_S
            self.declare(lambda _frame: None)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ack = isinstance(method, self.run.pika.spec.Basic.Ack)
        tag = method.delivery_tag
        now = time.monotonic()
        self.last_progress = now
        failed = False
        if method.multiple:
            for t in range(self.lowest_tag, tag + 1):
                failed |= self._settle(t, ack, now)
            self.lowest_tag = max(self.lowest_tag, tag + 1)
        else:
            failed = self._settle(tag, ack, now)
            while self.lowest_tag < self.next_tag and self.lowest_tag not in self.inflight:
                self.lowest_tag += 1
        if failed:
            self.pause_until = now + RETRY_PAUSE_S
        if self.ledger.confirmed_count == self.ledger.count:
            self.run.published_all()
            return
        self.fill()

    def _settle(self, tag: int, ack: bool, now: float) -> bool:
        """Settle one publish; True if it failed and goes around again."""
        entry = self.inflight.pop(tag, None)
        if entry is None:
            return False
        returned = entry in self.returned
        if returned:
            self.returned.discard(entry)
        index = entry[0]
        if ack and not returned:
            self.ledger.confirm(index, now)
            return False
        if not ack:
            self.nacked += 1
        if not self.ledger.confirmed[index]:
            self.retry.append(index)
        return True

    def _connection_lost(self) -> None:
        self.ready = False
        for index, _attempt in self.inflight.values():
            if not self.ledger.confirmed[index]:
                self.retry.append(index)
        self.inflight.clear()
        self.returned.clear()

    def check_stall(self, now: float) -> None:
        """A real client's confirm timeout: publishes in flight and no confirm for a long
        time mean a broken connection; close it and publish them again elsewhere."""
        if self.ready and self.inflight and now - self.last_progress > CONFIRM_STALL_S:
            self.log.warning(
                "verify.confirm_stall",
                inflight=len(self.inflight),
                seconds=round(now - self.last_progress, 1),
            )
            self.last_progress = now
            if self.conn is not None and self.conn.is_open:
                with contextlib.suppress(Exception):
                    self.conn.close()


class Consumer(_Client):
    """Takes every message with manual acks; records each copy and its redelivered flag."""

    role = "consumer"

    def __init__(self, run: Run) -> None:
        super().__init__(run, 1)
        self.ledger = run.ledger
        self.subscribed = False
        self.resubscribe_pending = False
        self.waiting_for_purge = False
        self.cancels = 0
        self.foreign = 0
        self.last_delivery = 0.0
        self.subscriptions = 0  # consume-oks so far: which subscription took a copy

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancel)
        channel.basic_qos(prefetch_count=PREFETCH, callback=lambda _frame: self._subscribe())

    def _subscribe(self) -> None:
        self.resubscribe_pending = False
        if self.channel is None or not self.channel.is_open:
            return
        self.declare(self._on_declared)

    def _on_declared(self, _frame: Any) -> None:
        if self.channel is None:
            return
        if not self.run.publisher.purged:  # leftovers go in the purge, not to us
            self.waiting_for_purge = True
            return
        self.channel.basic_consume(
            self.run.settings.queue, self._on_message, auto_ack=False, callback=self._on_consume_ok
        )

    def subscribe_if_waiting(self) -> None:
        if self.waiting_for_purge:
            self.waiting_for_purge = False
            self._on_declared(None)

    def _on_consume_ok(self, _frame: Any) -> None:
        self.subscribed = True
        self.subscriptions += 1
        self.last_delivery = time.monotonic()  # the drain-idle clock starts again
        self.log.info("verify.subscribed", queue=self.run.settings.queue)

    def _on_cancel(self, _frame: Any) -> None:
        self.subscribed = False
        self.cancels += 1
        self.log.warning("verify.consumer_cancelled", queue=self.run.settings.queue)
        if not self.resubscribe_pending:
            self.resubscribe_pending = True
            self.run.ioloop.call_later(RESUBSCRIBE_S, self._subscribe)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.last_delivery = time.monotonic()
        message_id = properties.message_id
        if message_id is None:
            message_id = body.split(BODY_SEPARATOR, 1)[0].decode("ascii", "replace")
        key = parse_attempt_id(message_id, self.run.run_id)
        if key is None or key[0] >= self.ledger.count:
            self.foreign += 1
        else:
            unflagged = self.ledger.receive(
                key[0], key[1], bool(method.redelivered), time.time(), self.subscriptions
            )
            if unflagged is not None:
                self.log.warning(
                    "verify.unflagged_duplicate",
                    message_id=message_id,
                    url=safe_url(self.url),
                    **{k: v for k, v in unflagged.to_json().items() if k != "message"},
                )
        channel.basic_ack(method.delivery_tag)
        if key is not None:
            self.run.received()

    def _connection_lost(self) -> None:
        self.subscribed = False
        self.resubscribe_pending = False
        self.waiting_for_purge = False


@dataclass(frozen=True, slots=True)
class _Pika:
    """The parts of pika this module uses, imported when the command runs."""

    SelectConnection: Any
    IOLoop: Any
    URLParameters: Any
    BasicProperties: Any
    exceptions: Any
    spec: Any


def _load_pika() -> _Pika:
    import pika  # type: ignore[import-untyped]
    import pika.exceptions  # type: ignore[import-untyped]
    import pika.spec  # type: ignore[import-untyped]
    from pika.adapters.select_connection import (  # type: ignore[import-untyped]
        IOLoop,
        SelectConnection,
    )

    return _Pika(
        SelectConnection,
        IOLoop,
        pika.URLParameters,
        pika.BasicProperties,
        pika.exceptions,
        pika.spec,
    )


@dataclass
class _Outcome:
    """How the I/O thread ended."""

    reason: str | None = None
    fatal: str | None = None
    finished_at: float | None = None


class Run:
    """One verification: both clients, the ledger and the deadlines on one IOLoop."""

    def __init__(
        self, settings: Settings, log: EventLogger, api: _Pika, plan: ChaosPlan | None
    ) -> None:
        self.settings = settings
        self.pika = api
        self.run_id = uuid.uuid4().hex[:12]
        self.log = log.bind(run=self.run_id)
        self.chaos = Chaos(plan, self.log) if plan is not None else None
        self.ledger = Ledger(settings.count)
        self.ioloop = api.IOLoop()
        self.started = time.monotonic()
        self.deadline = self.started + settings.timeout
        self.stopping = False
        self.published_at: float | None = None
        self.outcome = _Outcome()
        self._parameters: dict[tuple[str, str], Any] = {}
        self.publisher = Publisher(self)
        self.consumer = Consumer(self)

    def parameters(self, url: str, role: str) -> Any:
        key = (url, role)
        if key not in self._parameters:
            params = self.pika.URLParameters(url)
            if "heartbeat" not in parse_qs(urlsplit(url).query):
                params.heartbeat = HEARTBEAT_S
            params.connection_attempts = 1
            params.retry_delay = 0
            params.socket_timeout = CONNECT_TIMEOUT_S
            params.stack_timeout = CONNECT_TIMEOUT_S
            params.client_properties = {"connection_name": f"warren-verify {role} {self.run_id}"}
            self._parameters[key] = params
        return self._parameters[key]

    # -- the I/O thread

    def main(self) -> None:
        try:
            self.log.info(
                "verify.start",
                count=self.settings.count,
                queue=self.settings.queue,
                queue_type=self.settings.queue_type,
                urls=",".join(safe_url(u) for u in self.settings.urls),
            )
            self.publisher.connect()
            self.consumer.connect()
            self.ioloop.call_later(PROGRESS_S, self._tick)
            self.ioloop.call_later(self.settings.timeout, lambda: self.finish("timeout"))
            self.ioloop.start()
        except Exception as exc:  # our own bug: report it, still print what we have
            self.log.exception("verify.crashed")
            self.outcome.fatal = self.outcome.fatal or f"internal error: {_describe(exc)}"
            self.outcome.reason = self.outcome.reason or "error"
        finally:
            with contextlib.suppress(Exception):
                self.ioloop.close()
            self.outcome.finished_at = self.outcome.finished_at or time.monotonic()

    def _tick(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        self._progress()
        if now >= self.deadline:
            self.finish("timeout")
            return
        if (
            self.published_at is not None
            and self.consumer.subscribed
            and now - max(self.published_at, self.consumer.last_delivery)
            >= self.settings.drain_idle
        ):
            self.finish("drain-idle")
            return
        self.publisher.check_stall(now)
        self.ioloop.call_later(PROGRESS_S, self._tick)

    def _progress(self, event: str = "verify.progress", **extra: object) -> None:
        ledger = self.ledger
        self.log.info(
            event,
            **extra,
            phase="publishing" if self.published_at is None else "draining",
            published=ledger.published,
            confirmed=ledger.confirmed_count,
            inflight=len(self.publisher.inflight),
            received=ledger.received_count,
            reconnects=self.publisher.reconnects + self.consumer.reconnects,
            chaos=self.chaos.events if self.chaos else 0,
        )

    def published_all(self) -> None:
        if self.published_at is not None:
            return
        self.published_at = time.monotonic()
        self.log.info(
            "verify.published",
            confirmed=self.ledger.confirmed_count,
            published=self.ledger.published,
            seconds=round(self.ledger.publish_seconds, 2),
        )
        if self.chaos is not None:
            self.chaos.stop()
        self.publisher.close()
        self.received()

    def received(self) -> None:
        ledger = self.ledger
        if self.published_at is not None and ledger.received_confirmed == ledger.confirmed_count:
            self.finish("drained")

    def fatal(self, message: str) -> None:
        if self.outcome.fatal is None:
            self.outcome.fatal = message
        self.finish("error")

    def finish(self, reason: str) -> None:
        """Stop: close both connections, then the loop (at once if nothing is open, else
        when both closed or after CLOSE_GRACE_S)."""
        if self.stopping:
            return
        self.stopping = True
        self.outcome.reason = reason
        self.outcome.finished_at = time.monotonic()
        self._progress("verify.done", reason=reason)
        if self.chaos is not None:
            self.chaos.stop()
        self.publisher.close()
        self.consumer.close()
        self.ioloop.call_later(CLOSE_GRACE_S, self.ioloop.stop)
        self.client_closed()

    def client_closed(self) -> None:
        if self.stopping and self.publisher.idle and self.consumer.idle:
            self.ioloop.stop()

    def request_stop(self, reason: str) -> None:
        """From another thread."""
        with contextlib.suppress(Exception):
            self.ioloop.add_callback_threadsafe(lambda: self.finish(reason))

    # -- the result

    def summary(self) -> Summary:
        tally: Tally | None = None
        for _ in range(5):  # the I/O thread may still be running after a backstop timeout
            try:
                tally = self.ledger.tally()
                break
            except RuntimeError:
                time.sleep(0.01)
        if tally is None:
            tally = account(self.settings.count, [], [], {})
        end = self.outcome.finished_at or time.monotonic()
        chaos = self.chaos
        return Summary(
            run_id=self.run_id,
            queue=self.settings.queue,
            queue_type=self.settings.queue_type,
            tally=tally,
            stopped=self.outcome.reason or "interrupted",
            publish_seconds=self.ledger.publish_seconds,
            elapsed_seconds=end - self.started,
            nacked=self.publisher.nacked,
            returned=self.publisher.returned_count,
            foreign=self.consumer.foreign,
            publisher_reconnects=self.publisher.reconnects,
            consumer_reconnects=self.consumer.reconnects,
            consumer_cancels=self.consumer.cancels,
            chaos_events=chaos.events if chaos else 0,
            restarts=chaos.restarts if chaos else 0,
            chaos_failures=chaos.failures if chaos else 0,
            unflagged_sample=tuple(self.ledger.unflagged),
        )

    @property
    def never_connected(self) -> bool:
        return not (self.publisher.ever_opened or self.consumer.ever_opened)

    def last_error(self) -> str:
        return self.publisher.last_error or self.consumer.last_error or "no answer"


# --- the command ----------------------------------------------------------------------------


def _fail(message: str) -> None:
    click.echo(f"warren verify: {message}", err=True)
    sys.exit(EXIT_USAGE)


class _OneLineErrors(click.Command):
    """Click's own argument errors as one line on stderr and exit code 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            click.echo(f"warren verify: {exc.format_message()}", err=True)
            ctx.exit(EXIT_USAGE)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C (KeyboardInterrupt in the main thread)."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(run: Run) -> None:
    """Run the I/O thread and wait for it, with a backstop deadline; Ctrl-C asks it to stop,
    a second Ctrl-C stops waiting. Then let a pending restart run so the cluster is whole."""
    io = threading.Thread(target=run.main, name="verify-io", daemon=True)
    io.start()
    chaos = run.chaos
    if chaos is not None:
        chaos.start()
    deadline = run.deadline + CLOSE_GRACE_S + JOIN_SLACK_S
    interrupted = False
    while io.is_alive():
        try:
            if time.monotonic() > deadline:
                run.log.error("verify.stuck", thread=io.name)
                break
            io.join(0.2)
        except KeyboardInterrupt:
            if interrupted:
                break
            interrupted = True
            run.log.warning("verify.interrupted")
            run.request_stop("interrupted")
            deadline = min(deadline, time.monotonic() + CLOSE_GRACE_S + 1.0)
    if chaos is None:
        return
    chaos.stop()
    if interrupted:
        chaos.hurry()
    try:
        if not chaos.join(0.1):
            run.log.info("verify.waiting_for_chaos", note="a pending restart still runs")
            if not chaos.join(chaos.longest_s):
                run.log.error("verify.stuck", thread="verify-chaos")
    except KeyboardInterrupt:
        chaos.hurry()
        chaos.join(CLOSE_GRACE_S)


@click.command("verify", cls=_OneLineErrors)
@click.option(
    "--url",
    "urls",
    multiple=True,
    help=f"AMQP URL of a node (repeatable; default {DEFAULT_URL}). The publisher starts on "
    "the first, the consumer on the second; each moves to the next when its connection drops.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Messages to publish.",
)
@click.option("--queue", default="warren-verify", show_default=True, help="Queue name.")
@click.option(
    "--queue-type",
    type=click.Choice(["quorum", "classic"]),
    default="quorum",
    show_default=True,
    help="x-queue-type of the durable queue.",
)
@click.option(
    "--size",
    type=click.IntRange(0, 2**27),
    default=64,
    show_default=True,
    help="Body size in bytes (never less than the message id).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Publish new messages for at most this many seconds; the run is then the "
    "messages started by then (at most --count), each confirmed and received or lost.",
)
@click.option(
    "--inflight",
    type=click.IntRange(1, 65535),
    default=256,
    show_default=True,
    help="Most unconfirmed publishes in flight.",
)
@click.option(
    "--chaos",
    default=None,
    metavar="'CMD {node}'",
    help="Shell command run every --chaos-every seconds; {node} is replaced by the "
    "next --chaos-nodes name.",
)
@click.option(
    "--chaos-nodes", default=None, metavar="A,B,C", help="Node names for {node}, taken round robin."
)
@click.option(
    "--chaos-every",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds from one chaos step (command, --down, restart) to the next; the first "
    "comes after one interval.",
)
@click.option(
    "--restart",
    default=None,
    metavar="'CMD {node}'",
    help="Shell command run --down seconds after each chaos command, same node.",
)
@click.option(
    "--down",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between a chaos command and its restart.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Overall limit in seconds.",
)
@click.option(
    "--drain-idle",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="After publishing, stop when nothing arrives for this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option(
    "--purge/--no-purge", default=True, show_default=True, help="Purge the queue before publishing."
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def verify_command(
    urls: tuple[str, ...],
    count: int,
    queue: str,
    queue_type: str,
    size: int,
    inflight: int,
    duration: float | None,
    chaos: str | None,
    chaos_nodes: str | None,
    chaos_every: float,
    restart: str | None,
    down: float,
    timeout: float,
    drain_idle: float,
    as_json: bool,
    purge: bool,
    log_level: str,
) -> None:
    """Failover test: publish confirmed persistent messages while --chaos kills nodes,
    consume them all, report confirmed / received / lost / duplicates; exit 1 on any loss."""
    urls = urls or (DEFAULT_URL,)
    try:
        for url in urls:
            check_url(url)
        plan = plan_chaos(chaos, restart, chaos_nodes, chaos_every, down)
    except ValueError as exc:
        _fail(str(exc))
    if not queue or len(queue.encode()) > 255:
        _fail("--queue: a name of 1 to 255 bytes")
    try:
        api = _load_pika()
    except ImportError:
        _fail("needs the pika package (pip install pika)")
    try:
        for url in urls:
            api.URLParameters(url)
    except Exception as exc:  # pika's word for a URL option it cannot use
        _fail(f"--url: {_describe(exc)}")
    configure(log_level)
    if log_level != "debug":  # pika logs every failed connection attempt; we log our own
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    settings = Settings(
        urls, count, queue, queue_type, size, inflight, timeout, drain_idle, purge, duration
    )
    run = Run(settings, EventLogger(logging.getLogger("warren.verify")), api, plan)
    with _sigterm_interrupts():
        _wait(run)
    summary = run.summary()
    if run.outcome.fatal is not None:
        if summary.tally.published:  # what happened before it, then why it stopped
            click.echo(json.dumps(summary.to_json()) if as_json else format_summary(summary))
        click.echo(f"warren verify: {run.outcome.fatal}", err=True)
        sys.exit(EXIT_FAILED)
    if run.never_connected:
        click.echo(
            f"warren verify: no broker reachable within {timeout:g} s ({run.last_error()})",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(summary.to_json()))
    else:
        click.echo(format_summary(summary))
    sys.exit(exit_status(summary))
