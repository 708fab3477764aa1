"""`warren verify` as a user runs it, a subprocess against the test broker.

These run against RabbitMQ too (WARREN_TEST_BROKER_URL): a clean run, the chaos plumbing
with a harmless command, argument errors and an unreachable broker. Killing and restarting
the broker needs a Warren node of the test's own (`start_node`), skipped in that mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

StartNode = Callable[..., Any]


def verify(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "verify", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.count("\n") == 1, result.stdout + result.stderr[-3000:]
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process that is not our child, then wait for it to go (SIGKILL if not)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_every_confirmed_message_is_received_once(
    broker_url: str, pika_env: Any, queue_type: str
) -> None:
    queue = pika_env.name("verify")
    pika_env.queues.append(queue)  # deleted after the test
    result = verify(
        "--url", broker_url, "--count", "2000", "--queue", queue,
        "--queue-type", queue_type, "--timeout", "45", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = summary_of(result)
    assert summary["confirmed"] == summary["received"] == 2000
    assert summary["lost"] == summary["duplicates"] == summary["republished"] == 0
    assert summary["stopped"] == "drained"
    assert summary["ok"] is True
    assert summary["publish_rate"] > 0
    assert "event=verify.done" in result.stderr


def test_a_duration_bounds_the_run_by_time(broker_url: str, pika_env: Any) -> None:
    queue = pika_env.name("verify")
    pika_env.queues.append(queue)
    started = time.monotonic()
    result = verify(
        "--url", broker_url, "--count", "100000000", "--duration", "1.5", "--queue", queue,
        "--timeout", "45", "--json",
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = summary_of(result)
    assert 0 < summary["count"] < 100_000_000
    assert summary["confirmed"] == summary["received"] == summary["count"]
    assert summary["lost"] == summary["duplicates"] == 0
    assert summary["complete"] is True
    assert summary["ok"] is True
    assert 1.5 <= summary["publish_seconds"] < 10
    assert took < 30
    assert "event=verify.duration_reached" in result.stderr


def test_the_table_says_ok(broker_url: str, pika_env: Any) -> None:
    queue = pika_env.name("verify")
    pika_env.queues.append(queue)
    result = verify("--url", broker_url, "--count", "300", "--queue", queue, "--timeout", "45")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("warren verify: run ")
    assert any(line.split() == ["confirmed", "300", "of", "300"] for line in lines)
    assert lines[-1].split() == ["result", "OK"]


def test_leftovers_are_purged_and_other_runs_ignored(broker_url: str, pika_env: Any) -> None:
    queue = pika_env.name("verify")
    ch = pika_env.channel()
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "classic"})
    pika_env.queues.append(queue)
    for _ in range(5):
        ch.basic_publish("", queue, b"old")
    purged = summary_of(
        verify("--url", broker_url, "--count", "100", "--queue", queue,
               "--queue-type", "classic", "--json", "--timeout", "45")
    )  # fmt: skip
    assert (purged["received"], purged["foreign"]) == (100, 0)
    for i in range(5):
        ch.basic_publish("", queue, f"0123456789ab:{i}:1|".encode())
    kept = verify("--url", broker_url, "--count", "100", "--queue", queue, "--no-purge",
                  "--queue-type", "classic", "--json", "--timeout", "45")  # fmt: skip
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert (summary_of(kept)["received"], summary_of(kept)["foreign"]) == (100, 5)


def test_chaos_and_restart_commands_take_the_nodes_round_robin(
    broker_url: str, pika_env: Any, tmp_path: Path
) -> None:
    queue = pika_env.name("verify")
    pika_env.queues.append(queue)
    record = tmp_path / "chaos.txt"
    result = verify(
        "--url", broker_url, "--count", "10000000", "--duration", "1.5", "--queue", queue,
        "--json", "--timeout", "45",
        "--chaos", f"echo {{node}} >> {record}", "--chaos-nodes", "a, b,c",
        "--chaos-every", "0.1",
        "--restart", f"echo up-{{node}} >> {record}", "--down", "0.05",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = summary_of(result)
    lines = record.read_text().split()
    kills = lines[0::2]
    assert len(kills) >= 2, lines
    assert kills == ["abc"[k % 3] for k in range(len(kills))]
    assert lines[1::2] == [f"up-{node}" for node in kills]  # every kill got its restart
    assert summary["chaos_events"] == summary["restarts"] == len(kills)
    assert summary["chaos_failures"] == 0
    assert "event=verify.chaos" in result.stderr
    assert "event=verify.restart" in result.stderr


def test_a_failing_chaos_command_is_logged_not_fatal(broker_url: str, pika_env: Any) -> None:
    queue = pika_env.name("verify")
    pika_env.queues.append(queue)
    result = verify(
        "--url", broker_url, "--count", "10000000", "--duration", "1", "--queue", queue,
        "--json", "--timeout", "45", "--chaos", "echo broken; exit 3", "--chaos-every", "0.1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = summary_of(result)
    assert summary["chaos_failures"] == summary["chaos_events"] >= 1
    assert "status=3" in result.stderr
    assert "output=broken" in result.stderr


def test_the_consumer_resubscribes_after_a_cancel_notification(
    broker_url: str, pika_env: Any
) -> None:
    """Deleting the queue cancels its consumer (basic.cancel from the broker, as when a
    queue's leader moves): the consumer declares it again and resubscribes, the publisher's
    returned messages go out again. What the deleted queue held is gone, and reported."""
    queue = pika_env.name("verify")
    pika_env.queues.append(queue)
    delete = (
        f"import pika; c = pika.BlockingConnection(pika.URLParameters({broker_url!r}));"
        f" c.channel().queue_delete({queue!r}); c.close()"
    )
    result = verify(
        "--url", broker_url, "--count", "10000000", "--duration", "2.5", "--queue", queue,
        "--queue-type", "classic", "--json", "--timeout", "45", "--drain-idle", "2",
        "--chaos", f"{sys.executable} -c {shlex.quote(delete)}", "--chaos-every", "0.4",
    )  # fmt: skip
    summary = summary_of(result)
    assert summary["chaos_events"] >= 1, result.stderr[-3000:]
    assert summary["chaos_failures"] == 0, result.stderr[-3000:]
    assert summary["consumer_cancels"] >= 1, result.stderr[-3000:]
    assert "event=verify.consumer_cancelled" in result.stderr
    assert summary["complete"] is True
    assert summary["received"] + summary["lost"] >= summary["confirmed"] == summary["count"]
    assert result.returncode == (1 if summary["lost"] else 0)


@pytest.mark.timeout(60)
def test_both_clients_reconnect_through_kills_and_restarts_of_the_node(
    start_node: StartNode, tmp_path: Path
) -> None:
    """SIGKILL the only node while publishing; the restart command starts it again on the
    same port and data dir, and both clients come back. A single Warren node keeps messages
    in memory only (README, "Not yet"), so what was still queued at a kill is gone: the
    verdict must say so (exit 1 exactly when something confirmed was lost)."""
    node = start_node()
    pid_file = tmp_path / "node.pid"
    pid_file.write_text(str(node.proc.pid))
    argv = " ".join([
        sys.executable, "-m", "node.cli", "node", "--host", "127.0.0.1",
        "--port", str(node.port), "--name", f"test-{node.port}",
        "--data-dir", str(node.data_dir), "--management-port", "0", "--metrics-port", "0",
    ])  # fmt: skip
    log = tmp_path / "restarted.log"
    restart = f"cd {ROOT} && {{ {argv} >> {log} 2>&1 & echo $! > {pid_file}; }}"
    try:
        result = verify(
            "--url", node.url, "--url", node.url, "--count", "10000000", "--duration", "5",
            "--json",
            "--timeout", "90", "--drain-idle", "2",
            "--chaos", f"kill -9 $(cat {pid_file})", "--chaos-every", "2",
            "--restart", restart, "--down", "0.3", timeout=150,
        )  # fmt: skip
    finally:
        pid = int(pid_file.read_text())
        if pid != node.proc.pid:
            stop_pid(pid)
    summary = summary_of(result)
    assert summary["complete"] is True, result.stderr[-4000:]
    assert 0 < summary["confirmed"] == summary["count"] < 10_000_000
    assert summary["chaos_events"] == summary["restarts"] >= 1
    assert summary["chaos_failures"] == 0
    assert summary["publisher_reconnects"] >= 1
    assert summary["consumer_reconnects"] >= 1
    assert summary["received"] + summary["lost"] >= summary["confirmed"]
    assert summary["duplicates_unflagged"] == 0
    assert result.returncode == (1 if summary["lost"] else 0), result.stderr[-4000:]
    assert summary["ok"] is (summary["lost"] == 0)


def test_a_queue_of_another_type_is_one_clear_line_and_exit_1(
    broker_url: str, pika_env: Any
) -> None:
    queue = pika_env.queue("verify", durable=True, arguments={"x-queue-type": "classic"})
    result = verify("--url", broker_url, "--queue", queue, "--queue-type", "quorum", timeout=20)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"warren verify: queue {queue!r}: 406 PRECONDITION_FAILED - inequivalent arg"
        f" 'x-queue-type' for queue {queue!r} in vhost '/': received 'quorum' but current"
        " is 'classic'"
    )


def test_bad_arguments_are_one_line_and_exit_2() -> None:
    for args in (
        ["--count", "0"],
        ["--restart", "true"],
        ["--chaos", "kill {node}"],
        ["--chaos", "kill {node}", "--chaos-nodes", "a;b"],
        ["--url", "http://127.0.0.1:5672/"],
        ["--queue-type", "stream"],
        ["--no-such-option"],
    ):
        result = verify(*args, timeout=20)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("warren verify: "), result.stderr


def test_unreachable_broker_is_one_clear_line_and_exit_1() -> None:
    port = free_port()
    started = time.monotonic()
    result = verify("--url", f"amqp://guest:guest@127.0.0.1:{port}/%2F", "--timeout", "3")
    assert time.monotonic() - started < 8
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("warren verify: no broker reachable within 3 s"), last
    assert f"127.0.0.1:{port}" in last
    assert "connection refused" in last
    assert "Traceback" not in result.stderr
