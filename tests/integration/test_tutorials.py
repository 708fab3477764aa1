"""RabbitMQ's six Python tutorials, run the way a user runs them: each program in
tests/integration/tutorials/ is a separate process given the broker URL, and the test reads
what it prints.

The programs are our own (same pika calls as the tutorials: a durable work queue with
persistent messages and prefetch 1; exclusive server-named queues bound to the fanout, direct
and topic exchanges "logs", "direct_logs", "topic_logs"; an RPC server and client using
reply_to and correlation_id). Long-running consumers are stopped with SIGINT (Ctrl+C) and must
exit 0. The tutorials use fixed names, so each test empties its fixed queue first.
"""

from __future__ import annotations

import queue as queue_module
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

TUTORIALS = Path(__file__).resolve().parent / "tutorials"
LINE_TIMEOUT_S = 15.0


class Program:
    """A running tutorial program whose stdout lines are read by a background thread."""

    def __init__(self, script: str, url: str, *args: str) -> None:
        self.name = script
        self.proc = subprocess.Popen(
            [sys.executable, str(TUTORIALS / script), url, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._unread: queue_module.Queue[str | None] = queue_module.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._unread.put(line.rstrip("\n"))
        self._unread.put(None)

    def expect(self, wanted: str, timeout: float = LINE_TIMEOUT_S) -> str:
        """Read lines until one starts with `wanted`; fail on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._unread.get(timeout=max(left, 0.001))
            except queue_module.Empty:
                pytest.fail(f"{self.name}: no line {wanted!r} in {timeout}s; got {self.lines}")
            if line is None:
                pytest.fail(f"{self.name} exited before {wanted!r}; got {self.lines}{self._err()}")
            self.lines.append(line)
            if line.startswith(wanted):
                return line

    def interrupt(self, timeout: float = 10.0) -> list[str]:
        """Ctrl+C: SIGINT, wait for exit 0, return every line it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name} ignored SIGINT; printed {self.lines}")
        self._reader.join(5)
        while True:
            try:
                line = self._unread.get_nowait()
            except queue_module.Empty:
                break
            if line is not None:
                self.lines.append(line)
        assert code == 0, f"{self.name} exited {code}{self._err()}"
        return self.lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _err(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return f"\n--- stderr ---\n{self.proc.stderr.read()}"


def run(script: str, url: str, *args: str, timeout: float = 30.0) -> list[str]:
    """Run a short-lived tutorial program to completion; its stdout lines."""
    done = subprocess.run(
        [sys.executable, str(TUTORIALS / script), url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}\n{done.stderr}"
    return done.stdout.splitlines()


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    """Long-running programs started by a test; killed if the test did not stop them."""
    started: list[Program] = []
    yield started
    for program in started:
        program.kill()


def start(programs: list[Program], script: str, url: str, *args: str) -> Program:
    program = Program(script, url, *args)
    programs.append(program)
    return program


def empty_queue(url: str, name: str, **declare: Any) -> None:
    """Declare the tutorial's fixed queue as the tutorial does, and purge what earlier runs left."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.queue_declare(name, **declare)
        ch.queue_purge(name)
    finally:
        conn.close()


def received(lines: list[str], prefix: str = " [x] ") -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


# --- 1. hello world -----------------------------------------------------------------------------


def test_hello_world(broker_url: str, programs: list[Program]) -> None:
    empty_queue(broker_url, "hello")
    # sent before anyone listens: the queue keeps it
    assert run("send.py", broker_url) == [" [x] Sent 'Hello World!'"]
    receiver = start(programs, "receive.py", broker_url)
    receiver.expect(" [*] Waiting for messages.")
    assert receiver.expect(" [x] Received") == " [x] Received 'Hello World!'"
    assert run("send.py", broker_url, "Hello", "again") == [" [x] Sent 'Hello again'"]
    assert receiver.expect(" [x] Received") == " [x] Received 'Hello again'"
    lines = receiver.interrupt()
    assert received(lines) == [" [x] Received 'Hello World!'", " [x] Received 'Hello again'"]


# --- 2. work queues -----------------------------------------------------------------------------


def test_work_queue_fair_dispatch_with_prefetch_one(
    broker_url: str, programs: list[Program]
) -> None:
    empty_queue(broker_url, "task_queue", durable=True)
    slow = "slow task" + "." * 25  # 2.5 s of work at 0.1 s per dot
    quick = [f"quick task {i}." for i in range(5)]
    for task in [slow, *quick]:
        assert run("new_task.py", broker_url, task) == [f" [x] Sent {task!r}"]

    first = start(programs, "worker.py", broker_url, "0.1")
    assert first.expect(" [x] Received") == f" [x] Received {slow!r}"
    # With prefetch 1 the busy worker holds one task only: the rest wait for a free worker.
    second = start(programs, "worker.py", broker_url, "0.1")
    for task in quick:
        assert second.expect(" [x] Received") == f" [x] Received {task!r}"
        assert second.expect(" [x] Done") == f" [x] Done {task!r}"
    first.expect(" [x] Done", timeout=10)
    first_lines = first.interrupt()
    second_lines = second.interrupt()
    assert received(first_lines) == [f" [x] Received {slow!r}", f" [x] Done {slow!r}"]
    assert received(second_lines) == [
        line for task in quick for line in (f" [x] Received {task!r}", f" [x] Done {task!r}")
    ]

    # Everything was acked, and the queue is the durable one the tutorial declares.
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ok = conn.channel().queue_declare("task_queue", durable=True).method
        assert (ok.message_count, ok.consumer_count) == (0, 0)
    finally:
        conn.close()


def test_work_queue_task_of_a_killed_worker_goes_to_another(
    broker_url: str, programs: list[Program]
) -> None:
    empty_queue(broker_url, "task_queue", durable=True)
    task = "unlucky task" + "." * 100  # 10 s: the worker dies in the middle of it
    doomed = start(programs, "worker.py", broker_url, "0.1")
    doomed.expect(" [*] Waiting for messages.")
    run("new_task.py", broker_url, task)
    doomed.expect(" [x] Received")
    doomed.kill()  # no ack was sent: the task is redelivered to the next worker
    rescuer = start(programs, "worker.py", broker_url, "0.001")
    assert rescuer.expect(" [x] Received") == f" [x] Received {task!r}"
    assert rescuer.expect(" [x] Done") == f" [x] Done {task!r}"
    rescuer.interrupt()


# --- 3. publish/subscribe -----------------------------------------------------------------------


def test_publish_subscribe(broker_url: str, programs: list[Program]) -> None:
    subscribers = [start(programs, "receive_logs.py", broker_url) for _ in range(2)]
    queues = []
    for subscriber in subscribers:
        line = subscriber.expect(" [*] Waiting for logs on ")
        queues.append(line.split(" on ")[1].split(".")[0:2])
    assert all(q[0] == "amq" and q[1].startswith("gen-") for q in queues), queues
    assert run("emit_log.py", broker_url, "info: first") == [" [x] Sent 'info: first'"]
    assert run("emit_log.py", broker_url) == [" [x] Sent 'info: Hello World!'"]
    for subscriber in subscribers:
        assert subscriber.expect(" [x] ") == " [x] info: first"
        assert subscriber.expect(" [x] ") == " [x] info: Hello World!"
    for subscriber in subscribers:
        assert received(subscriber.interrupt()) == [" [x] info: first", " [x] info: Hello World!"]


# --- 4. routing ---------------------------------------------------------------------------------


def test_routing_by_severity(broker_url: str, programs: list[Program]) -> None:
    errors_only = start(programs, "receive_logs_direct.py", broker_url, "error")
    everything = start(programs, "receive_logs_direct.py", broker_url, "info", "warning", "error")
    errors_only.expect(" [*] Waiting for logs.")
    everything.expect(" [*] Waiting for logs.")
    sent = [("info", "all good"), ("warning", "disk 80%"), ("error", "disk full"), ("debug", "x")]
    for severity, message in sent:
        assert run("emit_log_direct.py", broker_url, severity, message) == [
            f" [x] Sent {severity}:{message}"
        ]
    assert errors_only.expect(" [x] ") == " [x] error:disk full"
    for wanted in ["info:all good", "warning:disk 80%", "error:disk full"]:
        assert everything.expect(" [x] ") == f" [x] {wanted}"
    # run a last message through both so nothing else can be in flight, then stop them
    run("emit_log_direct.py", broker_url, "error", "last")
    errors_only.expect(" [x] error:last")
    everything.expect(" [x] error:last")
    assert received(errors_only.interrupt()) == [" [x] error:disk full", " [x] error:last"]
    assert received(everything.interrupt()) == [
        " [x] info:all good",
        " [x] warning:disk 80%",
        " [x] error:disk full",
        " [x] error:last",
    ]


def test_routing_receiver_needs_a_severity(broker_url: str) -> None:
    done = subprocess.run(
        [sys.executable, str(TUTORIALS / "receive_logs_direct.py"), broker_url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Usage: ")


# --- 5. topics ----------------------------------------------------------------------------------


def test_topics(broker_url: str, programs: list[Program]) -> None:
    bindings = {
        "all": ["#"],
        "kern": ["kern.*"],
        "critical": ["*.critical"],
        "kern_or_critical": ["kern.*", "*.critical"],
        "deep_kern": ["kern.#"],
    }
    receivers = {
        label: start(programs, "receive_logs_topic.py", broker_url, *keys)
        for label, keys in bindings.items()
    }
    for receiver in receivers.values():
        receiver.expect(" [*] Waiting for logs.")
    keys = ["kern.critical", "kern.info", "cron.critical", "cron.info", "kern.disk.full", "kern"]
    for key in keys:
        run("emit_log_topic.py", broker_url, key, f"msg {key}")
    run("emit_log_topic.py", broker_url, "end.critical.kern", "end")  # reaches "all" only ...
    run("emit_log_topic.py", broker_url, "kern.critical", "end")  # ... this reaches them all
    expected = {
        "all": [*keys, "end.critical.kern", "kern.critical"],
        "kern": ["kern.critical", "kern.info", "kern.critical"],
        "critical": ["kern.critical", "cron.critical", "kern.critical"],
        "kern_or_critical": ["kern.critical", "kern.info", "cron.critical", "kern.critical"],
        "deep_kern": ["kern.critical", "kern.info", "kern.disk.full", "kern", "kern.critical"],
    }
    for label, receiver in receivers.items():
        while not receiver.lines or receiver.lines[-1] != " [x] kern.critical:end":
            receiver.expect(" [x] ")
        got = [line.split(":")[0].removeprefix(" [x] ") for line in received(receiver.interrupt())]
        assert got == expected[label], label


# --- 6. RPC -------------------------------------------------------------------------------------


def test_rpc(broker_url: str, programs: list[Program]) -> None:
    empty_queue(broker_url, "rpc_queue")
    server = start(programs, "rpc_server.py", broker_url)
    server.expect(" [x] Awaiting RPC requests")
    assert run("rpc_client.py", broker_url, "30", "0", "1", "10") == [
        " [x] Requesting fib(30)",
        " [.] Got 832040",
        " [x] Requesting fib(0)",
        " [.] Got 0",
        " [x] Requesting fib(1)",
        " [.] Got 1",
        " [x] Requesting fib(10)",
        " [.] Got 55",
    ]
    # two clients at once: each gets its own answers back through its own callback queue
    clients = [
        subprocess.Popen(
            [sys.executable, str(TUTORIALS / "rpc_client.py"), broker_url, *numbers],
            stdout=subprocess.PIPE,
            text=True,
        )
        for numbers in (["20", "21", "22"], ["40", "41", "42"])
    ]
    outputs = [client.communicate(timeout=30)[0].splitlines() for client in clients]
    assert [client.returncode for client in clients] == [0, 0]
    assert [line for line in outputs[0] if line.startswith(" [.]")] == [
        " [.] Got 6765",
        " [.] Got 10946",
        " [.] Got 17711",
    ]
    assert [line for line in outputs[1] if line.startswith(" [.]")] == [
        " [.] Got 102334155",
        " [.] Got 165580141",
        " [.] Got 267914296",
    ]
    requests = received(server.interrupt(), " [.] ")
    assert requests[:4] == [" [.] fib(30)", " [.] fib(0)", " [.] fib(1)", " [.] fib(10)"]
    assert sorted(requests[4:]) == sorted(f" [.] fib({n})" for n in (20, 21, 22, 40, 41, 42))
