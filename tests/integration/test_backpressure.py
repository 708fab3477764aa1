"""Backpressure: publishers are blocked above the memory high watermark, memory stays bounded.

A node started with --memory-high-watermark 1MB sends connection.blocked to a publisher
once the queued bytes pass 1 MB and stops reading its socket; when a consumer drains the
queue it sends connection.unblocked and the publisher finishes. A fast publisher pushing
200 MB through a slow consumer never makes the node's resident memory grow past a bound.

Publisher, consumer and memory sampler run in threads, each with its own pika connection
(pika connections are not shared between threads). A BlockingConnection only runs its
blocked/unblocked callbacks inside process_data_events(), so the publisher calls it after
every publish; publishing itself just stalls once the node stops reading the socket.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

StartNode = Callable[..., Any]
MB = 1024 * 1024


def body_for(index: int, size: int) -> bytes:
    """A body that says which message it is, padded to `size`."""
    head = f"message {index:06d} ".encode()
    return head + bytes(size - len(head))


class Publisher(threading.Thread):
    """Publishes `count` bodies of `size` bytes to `queue`, recording blocked/unblocked."""

    def __init__(self, url: str, queue: str, count: int, size: int) -> None:
        super().__init__(name=f"publisher-{queue}", daemon=True)
        self.url, self.queue, self.count, self.size = url, queue, count, size
        self.events: list[tuple[str, float]] = []
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            params = pika.URLParameters(self.url)
            params.blocked_connection_timeout = 120
            conn = pika.BlockingConnection(params)
            conn.add_on_connection_blocked_callback(
                lambda _c, _m: self.events.append(("blocked", time.monotonic()))
            )
            conn.add_on_connection_unblocked_callback(
                lambda _c, _m: self.events.append(("unblocked", time.monotonic()))
            )
            ch = conn.channel()
            for i in range(self.count):
                ch.basic_publish("", self.queue, body_for(i, self.size))
                # BlockingConnection runs the blocked/unblocked callbacks only in here.
                conn.process_data_events(time_limit=0)
            # A synchronous method: returns only once the node has read every publish.
            ch.queue_declare(self.queue, passive=True)
            conn.process_data_events(time_limit=0)
            self.finished_at = time.monotonic()
            conn.close()
        except BaseException as exc:
            self.error = exc

    @property
    def blocked_seen(self) -> bool:
        return any(kind == "blocked" for kind, _ in self.events)


def consume(url: str, queue: str, count: int, *, prefetch: int, delay: float = 0.0) -> list[bytes]:
    """Consume and ack `count` messages (sleeping `delay` per message); return their heads."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    heads: list[bytes] = []
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        deadline = time.monotonic() + 90
        for method, _props, body in ch.consume(queue, inactivity_timeout=10):
            assert method is not None, f"no delivery for 10 s after {len(heads)} messages"
            heads.append(body[:14])
            if delay:
                time.sleep(delay)
            ch.basic_ack(method.delivery_tag)
            if len(heads) == count or time.monotonic() > deadline:
                break
        ch.cancel()
    finally:
        conn.close()
    return heads


def declare(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue, durable=False)
    finally:
        conn.close()


def message_count(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def status_kb(pid: int, key: str) -> int:
    """A VmRSS/VmHWM-style value from /proc/<pid>/status, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_publisher_is_blocked_above_watermark_and_unblocked_when_drained(
    start_node: StartNode,
) -> None:
    node = start_node("--memory-high-watermark", "1MB")
    queue = f"bp-{uuid.uuid4().hex[:12]}"
    declare(node.url, queue)
    count, size = 250, 20 * 1024  # 5 MB, five times the watermark
    publisher = Publisher(node.url, queue, count, size)
    publisher.start()

    deadline = time.monotonic() + 30
    while not publisher.blocked_seen and time.monotonic() < deadline:
        assert publisher.error is None, publisher.error
        time.sleep(0.05)
    assert publisher.blocked_seen, "no connection.blocked within 30 s"
    time.sleep(0.5)
    # Blocked means blocked: the publisher cannot get through, the queue stays small.
    assert publisher.finished_at is None
    queued = message_count(node.url, queue)
    assert queued < count
    assert queued * size <= 3 * MB, queued

    heads = consume(node.url, queue, count, prefetch=10)
    publisher.join(timeout=30)
    assert not publisher.is_alive()
    assert publisher.error is None, repr(publisher.error)
    assert publisher.finished_at is not None

    assert heads == [body_for(i, size)[:14] for i in range(count)]
    kinds = [kind for kind, _ in publisher.events]
    assert kinds[:2] == ["blocked", "unblocked"], kinds
    # They alternate, however many times the draining let the publisher through (the last
    # one may be a late "blocked": the node can block again after reading the last publish).
    assert all(a != b for a, b in itertools.pairwise(kinds)), kinds
    assert node.proc.poll() is None
    assert "Traceback" not in node.log()


def test_memory_stays_bounded_with_fast_publisher_and_slow_consumer(
    start_node: StartNode,
) -> None:
    node = start_node("--memory-high-watermark", "16MB")
    pid = node.proc.pid
    queue = f"bp-rss-{uuid.uuid4().hex[:12]}"
    declare(node.url, queue)
    count, size = 800, 256 * 1024  # 200 MB
    baseline_kb = status_kb(pid, "VmRSS")

    peak_kb = baseline_kb
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_kb
        while not stop.is_set():
            peak_kb = max(peak_kb, status_kb(pid, "VmRSS"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    publisher = Publisher(node.url, queue, count, size)
    began = time.monotonic()
    publisher.start()
    try:
        heads = consume(node.url, queue, count, prefetch=20, delay=0.005)
        publisher.join(timeout=60)
    finally:
        stop.set()
        sampler.join(timeout=5)
    elapsed = time.monotonic() - began
    high_water_kb = status_kb(pid, "VmHWM")

    assert publisher.error is None, repr(publisher.error)
    assert not publisher.is_alive()
    assert len(heads) == count
    assert heads == [body_for(i, size)[:14] for i in range(count)]
    peak_mb = max(peak_kb, high_water_kb) / 1024
    assert peak_mb < 200, (
        f"node RSS peaked at {peak_mb:.0f} MB (baseline {baseline_kb / 1024:.0f} MB) "
        f"moving 200 MB in {elapsed:.1f} s; publisher events {publisher.events}"
    )
    assert node.proc.poll() is None
    assert "Traceback" not in node.log()
