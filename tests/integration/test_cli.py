"""`warren node` as an operator sees it: signals, start-up failures, log lines.

SIGTERM and SIGINT close every client with 320 CONNECTION_FORCED (RabbitMQ's text for a
broker shutdown) and exit 0. A port in use or an unwritable data dir is one line on stderr
and exit code 2, never a traceback. Logs are one `key=value` line per event.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands

SHUTDOWN = (320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'")
# logfmt: key=value pairs separated by single spaces; values are bare or double-quoted.
LOGFMT_PAIR = re.compile(r'[A-Za-z_][\w.\-]*=(?:"(?:[^"\\]|\\.)*"|[^\s"]*)')

StartNode = Callable[..., Any]
RunCli = Callable[..., Any]


def wait_closed_by_broker(conn: Any, timeout: float = 10.0) -> pika.exceptions.AMQPError:
    """Pump a BlockingConnection until the broker closes it; return the exception."""
    deadline = time.monotonic() + timeout
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:  # noqa: PT012
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
    return info.value


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_clients_with_320_then_exits_0(
    start_node: StartNode, raw_amqp: Callable[..., Any], signum: signal.Signals
) -> None:
    node = start_node()
    idle = pika.BlockingConnection(pika.URLParameters(node.url))
    busy = pika.BlockingConnection(pika.URLParameters(node.url))
    ch = busy.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_consume(queue, lambda *args: None)
    raw = raw_amqp(node.url, timeout=10)
    raw.handshake()
    raw.open_channel(1)

    node.proc.send_signal(signum)

    close = raw.recv()
    assert isinstance(close, commands.Connection.Close)
    assert (close.reply_code, close.reply_text) == SHUTDOWN
    assert (close.class_id, close.method_id) == (0, 0)
    with contextlib.suppress(OSError):  # a broker may drop the socket without waiting
        raw.send_method(commands.Connection.CloseOk())
    for conn in (idle, busy):
        error = wait_closed_by_broker(conn)
        assert isinstance(error, pika.exceptions.ConnectionClosedByBroker)
        assert (error.reply_code, error.reply_text) == SHUTDOWN
    assert node.proc.wait(timeout=10) == 0
    log = node.log()
    assert "Traceback" not in log, log


def test_signal_with_no_clients_exits_0_promptly(start_node: StartNode) -> None:
    node = start_node()
    began = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=10) == 0
    assert time.monotonic() - began < 5
    assert "Traceback" not in node.log()


def assert_one_line_failure(result: Any, *mentions: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for mention in mentions:
        assert mention in lines[0], lines[0]
    return str(lines[0])


def test_port_in_use_is_one_line_and_exit_2(run_cli: RunCli, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "node", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(tmp_path / "data"),
        )  # fmt: skip
    assert_one_line_failure(result, str(port))


def test_port_from_environment_is_used(run_cli: RunCli, tmp_path: Path) -> None:
    """WARREN_HOST / WARREN_PORT / WARREN_DATA_DIR stand in for the options."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "node",
            env={
                "WARREN_HOST": "127.0.0.1",
                "WARREN_PORT": str(port),
                "WARREN_DATA_DIR": str(tmp_path / "data"),
            },
        )
    assert_one_line_failure(result, str(port))


def test_unwritable_data_dir_is_one_line_and_exit_2(run_cli: RunCli, tmp_path: Path) -> None:
    # A path under a regular file cannot be created, even by root.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir = blocker / "data"
    result = run_cli(
        "node", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)
    )
    assert_one_line_failure(result, str(data_dir))
    # It failed before listening: nothing is bound to the port.
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_log_lines_are_key_value(start_node: StartNode) -> None:
    node = start_node()
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    ch = conn.channel()
    ch.queue_declare("", exclusive=True)
    conn.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(node.url.replace("guest:guest", "guest:wrong")))
    assert node.stop() == 0
    lines = [line for line in node.log().splitlines() if line.strip()]
    assert lines, "the node logged nothing"
    for line in lines:
        pairs = LOGFMT_PAIR.findall(line)
        assert " ".join(pairs) == line, f"not key=value: {line!r}"
        assert len(pairs) >= 2, line
    assert "Traceback" not in node.log()
