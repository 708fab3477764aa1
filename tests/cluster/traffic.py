"""A confirmed persistent stream through a cluster while nodes fail, and its accounting.

`Stream` runs a publisher thread (confirms, one publish in flight, republishing a message
whose confirm did not come as a new attempt, moving to the next node when its connection
fails) and a consumer thread (prefetch, acks, re-subscribing on a consumer-cancel and
reconnecting to the next node), like real clients. `Stream.result()` counts what the
durability promise is about: every confirmed message received at least once, and every
extra copy of one attempt flagged redelivered.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from tests.cluster.support import Cluster

# pika's errors a client survives by reconnecting elsewhere
RECOVERABLE = (
    pika.exceptions.AMQPError,
    OSError,
    AttributeError,  # pika, on a socket closed under a blocking call
    AssertionError,  # pika's internal state checks after a lost connection
)


@dataclass
class StreamResult:
    confirmed: int
    received: int  # distinct messages received
    lost: list[int]
    duplicates: int  # extra copies of one attempt
    unflagged: list[str]  # extra copies that were not flagged redelivered
    out_of_order: int  # first receipts of confirmed messages out of publish order
    publisher_reconnects: int
    consumer_reconnects: int

    def summary(self) -> str:
        return (
            f"confirmed={self.confirmed} received={self.received} lost={len(self.lost)} "
            f"duplicates={self.duplicates} unflagged={len(self.unflagged)} "
            f"out_of_order={self.out_of_order} reconnects(pub={self.publisher_reconnects}, "
            f"con={self.consumer_reconnects})"
        )


@dataclass
class Stream:
    cluster: Cluster
    queue: str
    publish_on: Sequence[int]  # node indexes, tried in turn
    consume_on: Sequence[int]
    count: int = 10**9  # stop publishing after this many confirmed
    prefetch: int = 50
    consume: bool = True
    confirmed: list[int] = field(default_factory=list)
    copies: dict[str, list[bool]] = field(default_factory=dict)  # attempt -> redelivered flags
    first_seen: list[int] = field(default_factory=list)
    publisher_reconnects: int = 0
    consumer_reconnects: int = 0
    nacks: int = 0  # publishes nacked or returned (each published again as a new attempt)
    errors: list[str] = field(default_factory=list)
    _stop_publishing: threading.Event = field(default_factory=threading.Event)
    _stop_consuming: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Stream:
        self._threads = [threading.Thread(target=self._publish, daemon=True)]
        if self.consume:
            self._threads.append(threading.Thread(target=self._consume, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def wait_confirmed(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.confirmed) < n:
            if time.monotonic() > deadline:
                got = len(self.confirmed)
                raise AssertionError(
                    f"only {got} of {n} confirmed after {timeout}s: {self.errors[-3:]}"
                )
            time.sleep(0.05)

    def stop_publishing(self, timeout: float = 30.0) -> None:
        self._stop_publishing.set()
        self._threads[0].join(timeout)
        assert not self._threads[0].is_alive(), "the publisher did not stop"

    def drain(self, timeout: float = 60.0, idle: float = 5.0) -> None:
        """Until every confirmed message was received (or nothing came for `idle` s)."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                missing = set(self.confirmed) - set(self._received_ids())
                seen = len(self.first_seen)
            if not missing:
                break
            if seen != last:
                last, last_change = seen, time.monotonic()
            elif time.monotonic() - last_change > idle:
                break
            time.sleep(0.1)
        time.sleep(0.3)  # late redeliveries show up as duplicates, not as nothing
        self._stop_consuming.set()
        for thread in self._threads[1:]:
            thread.join(10)

    def result(self) -> StreamResult:
        with self._lock:
            received = self._received_ids()
            lost = sorted(set(self.confirmed) - set(received))
            duplicates = sum(len(flags) - 1 for flags in self.copies.values())
            unflagged = [
                attempt
                for attempt, flags in self.copies.items()
                if any(not flag for flag in flags[1:])
            ]
            confirmed = set(self.confirmed)
            order = [i for i in self.first_seen if i in confirmed]
        out_of_order = sum(1 for a, b in itertools.pairwise(order) if b < a)
        return StreamResult(
            len(self.confirmed),
            len(set(received)),
            lost,
            duplicates,
            unflagged,
            out_of_order,
            self.publisher_reconnects,
            self.consumer_reconnects,
        )

    def _received_ids(self) -> list[int]:
        return [int(attempt.split(":")[0]) for attempt in self.copies]

    # ---- the clients -------------------------------------------------------------------

    def _connect(self, nodes: Sequence[int], turn: int) -> Any:
        node = self.cluster[nodes[turn % len(nodes)]]
        return node.connect(socket_timeout=3, blocked_connection_timeout=5)

    def _publish(self) -> None:
        turn, i, attempt = 0, 0, 0
        while not self._stop_publishing.is_set() and len(self.confirmed) < self.count:
            conn = None
            try:
                conn = self._connect(self.publish_on, turn)
                ch = conn.channel()
                ch.confirm_delivery()
                props = pika.BasicProperties(delivery_mode=2)
                while not self._stop_publishing.is_set() and len(self.confirmed) < self.count:
                    attempt += 1
                    body = f"{i}:{attempt}".encode()
                    try:
                        ch.basic_publish("", self.queue, body, props, mandatory=True)
                    except (pika.exceptions.NackError, pika.exceptions.UnroutableError):
                        self.nacks += 1
                        time.sleep(0.05)
                        continue  # not taken: the same message again, a new attempt
                    self.confirmed.append(i)
                    i += 1
            except RECOVERABLE as exc:
                self.errors.append(f"publisher: {exc!r}")
                self.publisher_reconnects += 1
                turn += 1
                time.sleep(0.2)
            finally:
                _close(conn)

    def _consume(self) -> None:
        turn = 0
        while not self._stop_consuming.is_set():
            conn = None
            try:
                conn = self._connect(self.consume_on, turn)
                ch = conn.channel()
                ch.basic_qos(prefetch_count=self.prefetch)
                cancelled = threading.Event()

                def on_message(ch: Any, method: Any, _props: Any, body: bytes) -> None:
                    self._record(body.decode(), bool(method.redelivered))
                    ch.basic_ack(method.delivery_tag)

                ch.add_on_cancel_callback(lambda _frame, done=cancelled: done.set())
                ch.basic_consume(self.queue, on_message)
                while not self._stop_consuming.is_set() and not cancelled.is_set():
                    conn.process_data_events(time_limit=0.2)
                if cancelled.is_set():
                    self.consumer_reconnects += 1
                    time.sleep(0.2)
            except RECOVERABLE as exc:
                self.errors.append(f"consumer: {exc!r}")
                self.consumer_reconnects += 1
                turn += 1
                time.sleep(0.2)
            finally:
                _close(conn)

    def _record(self, attempt: str, redelivered: bool) -> None:
        with self._lock:
            flags = self.copies.setdefault(attempt, [])
            if not flags:
                self.first_seen.append(int(attempt.split(":")[0]))
            flags.append(redelivered)


def _close(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def run_stream(
    cluster: Cluster,
    queue: str,
    *,
    publish_on: Sequence[int],
    consume_on: Sequence[int],
    before: int,
    fault: Callable[[], None],
    after: int,
    timeout: float = 60.0,
) -> StreamResult:
    """Publish and consume; `fault()` once `before` messages are confirmed; stop once
    `after` more are; drain; the accounting."""
    stream = Stream(cluster, queue, publish_on, consume_on).start()
    try:
        stream.wait_confirmed(before, timeout)
        fault()
        stream.wait_confirmed(before + after, timeout)
        stream.stop_publishing()
        stream.drain()
    finally:
        stream._stop_publishing.set()
        stream._stop_consuming.set()
    return stream.result()
