"""`warren up`: the README's run command starts a working local cluster and stops it."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pika
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_run(count: int) -> int:
    """A base port with `count` consecutive free ports after it."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.timeout(90)
def test_warren_up_starts_three_nodes_that_form_one_broker(tmp_path: Path) -> None:
    if os.environ.get("WARREN_TEST_BROKER_URL"):
        pytest.skip("runs the warren CLI itself")
    bases = {name: _free_run(3) for name in ("amqp", "raft", "link", "mgmt", "metrics")}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "node.cli", "up",
            "--data-dir", str(tmp_path / "data"),
            "--base-port", str(bases["amqp"]),
            "--raft-base-port", str(bases["raft"]),
            "--link-base-port", str(bases["link"]),
            "--management-base-port", str(bases["mgmt"]),
            "--metrics-base-port", str(bases["metrics"]),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while not all(_healthy(bases["mgmt"] + i) for i in range(3)):
            assert proc.poll() is None, "warren up exited early"
            assert time.monotonic() < deadline, "cluster not healthy after 40 s"
            time.sleep(0.2)
        second = pika.BlockingConnection(
            pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{bases['amqp'] + 1}/%2F")
        )
        third = pika.BlockingConnection(
            pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{bases['amqp'] + 2}/%2F")
        )
        second.channel().queue_declare("up-q")
        ok = third.channel().queue_declare("up-q", passive=True)
        assert ok.method.queue == "up-q"
        second.close()
        third.close()
        request = urllib.request.Request(
            f"http://127.0.0.1:{bases['mgmt']}/api/warren/cluster",
            headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            status = json.load(r)
        assert [m["name"] for m in status["members"]] == ["warren-1", "warren-2", "warren-3"]
        assert all(m["alive"] and m["reachable"] for m in status["members"])
        with urllib.request.urlopen(f"http://127.0.0.1:{bases['metrics']}/metrics", timeout=5) as r:
            assert b"rabbitmq_identity_info" in r.read()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    for i in range(3):
        assert any(
            line.startswith(f"warren-{i + 1}")
            and f"amqp://guest:guest@127.0.0.1:{bases['amqp'] + i}/%2F" in line
            and f"http://127.0.0.1:{bases['metrics'] + i}/metrics" in line
            for line in lines
        ), out[:2000]
    assert any(line.startswith("warren-2 | ") and "cluster.ready" in line for line in lines)
