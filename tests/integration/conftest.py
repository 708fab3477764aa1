"""Integration fixtures: a real `warren node` process, or any broker named by an env var.

Set WARREN_TEST_BROKER_URL (e.g. amqp://guest:guest@127.0.0.1:5682/) to run the same tests
against another broker, such as RabbitMQ, for comparison. Tests that need a node started
with particular options use `start_node` and are skipped in that mode.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
