"""`warren healthcheck` (the image's HEALTHCHECK) against real node processes on loopback:
ok for a serving node, unhealthy (exit 1, one line) for a clustered node that is not in
its cluster yet and for a port where nothing answers AMQP. No Docker needed.

(A clustered node opens its management port only once it is in the cluster, so before
that the probe finds the port closed; /api/healthz's 503 covers the moment in between.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.health import check_start_frame, probe_address
from tests.docker.support import REPO_ROOT, wait_until

# type 1, channel 0, size 10; class 10 method 10 (connection.start), 6 more bytes; 0xCE
START_FRAME = bytes.fromhex("01 0000 0000000a 000a 000a 0009 00000000 ce")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "healthcheck", "--timeout", "2", *args],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT, check=False,
    )  # fmt: skip


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> tuple[int, int]:
        amqp, management = _free_port(), _free_port()
        cmd = [
            sys.executable, "-m", "node.cli", "node", "--host", "127.0.0.1",
            "--port", str(amqp), "--management-port", str(management), "--metrics-port", "0",
            "--data-dir", str(tmp_path / f"data{len(procs)}"), *extra,
        ]  # fmt: skip
        env = {**os.environ, "WARREN_CLUSTER_SECRET": "healthcheck-test"}
        log = (tmp_path / f"node{len(procs)}.log").open("wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO_ROOT, env=env))
        return amqp, management

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_start_frame_check() -> None:
    assert check_start_frame(START_FRAME) is None
    assert "protocol header" in str(check_start_frame(b"AMQP\x00\x00\x09\x01"))
    assert "short" in str(check_start_frame(b"\x01\x00"))
    assert "not connection.start" in str(check_start_frame(START_FRAME[:7] + b"\x00\x0a\x00\x0b"))
    assert "not a method frame" in str(check_start_frame(b"\x08" + START_FRAME[1:]))
    assert probe_address(None) == probe_address("0.0.0.0") == "127.0.0.1"
    assert probe_address("[::1]") == "::1"


def test_ok_for_a_serving_node(start_node: object) -> None:
    amqp, management = start_node()  # type: ignore[operator]
    args = ("--port", str(amqp), "--management-port", str(management))
    done = wait_until(lambda: (d := _healthcheck(*args)).returncode == 0 and d, 20, "healthy")
    assert done.stdout.strip() == f"warren healthcheck: ok (ready, AMQP 0-9-1 on 127.0.0.1:{amqp})"
    assert done.stderr == ""


def test_unhealthy_until_the_node_is_in_its_cluster(start_node: object) -> None:
    # its only peer does not exist: the node never catches up with a Raft leader
    amqp, management = start_node("--raft-port", str(_free_port()), "--link-port", "0",
                                  "--peer", f"ghost=127.0.0.1:{_free_port()}")  # type: ignore[operator]  # fmt: skip
    args = ("--port", str(amqp), "--management-port", str(management))
    for _ in range(3):  # (the management port opens once the node is in; until then: 503)
        time.sleep(1.0)
        done = _healthcheck(*args)
        assert done.returncode == 1
        assert done.stderr.startswith("warren healthcheck: unhealthy: management "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert done.stdout == ""


def test_unhealthy_when_nothing_answers_amqp() -> None:
    port = _free_port()
    done = _healthcheck("--port", str(port), "--management-port", "0")
    assert done.returncode == 1
    assert done.stderr.startswith(f"warren healthcheck: unhealthy: AMQP 127.0.0.1:{port}: ")
    assert len(done.stderr.strip().splitlines()) == 1
