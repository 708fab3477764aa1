"""Integration fixtures: a real `warren node` process, or any broker named by an env var.

Set WARREN_TEST_BROKER_URL (e.g. amqp://guest:guest@127.0.0.1:5682/) to run the same tests
against another broker, such as RabbitMQ, for comparison. Tests that need a node started
with particular options use `start_node` and are skipped in that mode.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

EXTERNAL_URL = os.environ.get("WARREN_TEST_BROKER_URL")
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes] | None
    data_dir: Path | None
    log_path: Path | None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _start(tmp: Path, *extra: str) -> Node:
    port = free_port()
    data_dir = tmp / f"node-{port}"
    log_path = tmp / f"node-{port}.log"
    cmd = [
        sys.executable, "-m", "node.cli", "node",
        "--host", "127.0.0.1", "--port", str(port),
        "--name", f"test-{port}", "--data-dir", str(data_dir),
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    node = Node(port, proc, data_dir, log_path)
    try:
        wait_for_port(port, proc, STARTUP_TIMEOUT_S)
    except RuntimeError as exc:
        node.stop()
        raise RuntimeError(f"{exc}\n--- node log ---\n{node.log()}") from exc
    return node


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start a dedicated node with extra CLI options: start_node("--heartbeat", "2")."""
    if EXTERNAL_URL:
        pytest.skip("needs a Warren node started with its own options")
    nodes: list[Node] = []

    def start(*extra: str) -> Node:
        node = _start(tmp_path, *extra)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if EXTERNAL_URL:
        from urllib.parse import urlparse

        yield Node(urlparse(EXTERNAL_URL).port or 5672, None, None, None)
        return
    node = _start(tmp_path_factory.mktemp("shared"))
    yield node
    node.stop()


@pytest.fixture
def broker_url(shared_node: Node) -> str:
    """URL of a running broker shared by the session (tests must use unique names)."""
    return EXTERNAL_URL or shared_node.url


# --- pika helpers for the broker-semantics tests (exchanges, queues, basic, confirms, tx) ---


@dataclass
class PikaEnv:
    """Connections, unique names and clean-up for one test, against `broker_url`.

    Every exchange and queue declared through `exchange()` / `queue()` is deleted after the
    test (the shared node persists across tests); every connection opened is closed.
    """

    url: str
    connections: list[Any] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    _default: Any = None
    _declarer: Any = None

    def connect(self) -> Any:
        """A new pika BlockingConnection, closed after the test."""
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.connections.append(conn)
        return conn

    def channel(self, *, confirm: bool = False) -> Any:
        """A new channel on the test's default connection (optionally in confirm mode)."""
        if self._default is None or not self._default.is_open:
            self._default = self.connect()
        ch = self._default.channel()
        if confirm:
            ch.confirm_delivery()
        return ch

    def _declaring_channel(self) -> Any:
        if self._declarer is None or not self._declarer.is_open:
            self._declarer = self.channel()
        return self._declarer

    @staticmethod
    def name(prefix: str) -> str:
        """A name no other test uses: prefix-<16 hex digits>."""
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    def exchange(self, kind: str, prefix: str = "x", **kwargs: Any) -> str:
        """Declare a uniquely named exchange of type `kind`; returns its name."""
        name = self.name(f"{prefix}-{kind}")
        self._declaring_channel().exchange_declare(name, kind, **kwargs)
        self.exchanges.append(name)
        return name

    def queue(self, prefix: str = "q", **kwargs: Any) -> str:
        """Declare a uniquely named queue; returns its name."""
        name = self.name(prefix)
        self._declaring_channel().queue_declare(name, **kwargs)
        self.queues.append(name)
        return name

    @staticmethod
    def drain(ch: Any, queue: str, *, auto_ack: bool = True) -> list[bytes]:
        """Bodies of every message basic.get returns from `queue` until get-empty."""
        bodies: list[bytes] = []
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=auto_ack)
            if method is None:
                return bodies
            bodies.append(body)

    @staticmethod
    @contextlib.contextmanager
    def closes_channel(code: int, text: str) -> Iterator[None]:
        """Expect the block to end with the broker closing the channel with (code, text)."""
        import pika.exceptions

        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            yield
        assert (info.value.reply_code, info.value.reply_text) == (code, text)

    @staticmethod
    @contextlib.contextmanager
    def closes_connection(code: int, text: str) -> Iterator[None]:
        """Expect the block to end with the broker closing the connection with (code, text)."""
        import pika.exceptions

        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
            yield
        assert (info.value.reply_code, info.value.reply_text) == (code, text)

    def close(self) -> None:
        """Close every connection, then delete the declared queues and exchanges."""
        import pika
        import pika.exceptions

        for conn in self.connections:
            if conn.is_open:
                with contextlib.suppress(Exception):
                    conn.close()
        if not (self.exchanges or self.queues):
            return
        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.url))
        except pika.exceptions.AMQPError:
            return
        ch = None
        for kind, name in [("q", q) for q in self.queues] + [("x", x) for x in self.exchanges]:
            try:
                if ch is None or not ch.is_open:
                    ch = conn.channel()
                if kind == "q":
                    ch.queue_delete(name)
                else:
                    ch.exchange_delete(name)
            except pika.exceptions.AMQPError:
                if not conn.is_open:
                    return
        with contextlib.suppress(pika.exceptions.AMQPError):
            conn.close()


@pytest.fixture
def pika_env(broker_url: str) -> Iterator[PikaEnv]:
    """A PikaEnv on the test broker; cleans up its connections, exchanges and queues."""
    env = PikaEnv(broker_url)
    yield env
    env.close()
