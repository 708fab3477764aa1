"""pika's asynchronous SelectConnection: callbacks all the way, with publisher confirms.

One ioloop drives the whole script: open, confirm.select, declare, consume, publish (one
extra mandatory message that cannot be routed), ack every delivery, check the queue is
empty, close. The script records what happened and the test asserts on the record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.frame
from pika.adapters.select_connection import SelectConnection

COUNT = 25


@dataclass
class Record:
    delivered: list[bytes] = field(default_factory=list)
    redelivered: list[bool] = field(default_factory=list)
    acked_tags: set[int] = field(default_factory=set)
    nacked_tags: set[int] = field(default_factory=set)
    returned: list[tuple[int, str, bytes]] = field(default_factory=list)
    final_counts: tuple[int, int] | None = None
    closed_reason: BaseException | None = None
    timed_out: bool = False


class RoundTrip:
    """The callback chain; each method is one step."""

    def __init__(self, url: str) -> None:
        self.record = Record()
        self.queue = f"select-{uuid.uuid4().hex[:12]}"
        self.published = 0
        self.channel: Any = None
        self.conn = SelectConnection(
            pika.URLParameters(url),
            on_open_callback=self.on_open,
            on_open_error_callback=self.on_open_error,
            on_close_callback=self.on_closed,
        )

    def run(self) -> Record:
        self.conn.ioloop.call_later(20, self.on_timeout)
        self.conn.ioloop.start()
        return self.record

    def on_timeout(self) -> None:
        self.record.timed_out = True
        self.conn.close()

    def on_open_error(self, _conn: Any, error: BaseException) -> None:
        self.record.closed_reason = error
        self.conn.ioloop.stop()

    def on_closed(self, _conn: Any, reason: BaseException) -> None:
        self.record.closed_reason = reason
        self.conn.ioloop.stop()

    def on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self.on_channel)

    def on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_return_callback(self.on_return)
        channel.confirm_delivery(self.on_confirm, callback=self.on_confirm_mode)

    def on_confirm_mode(self, _frame: pika.frame.Method) -> None:
        self.channel.queue_declare(self.queue, exclusive=True, callback=self.on_declared)

    def on_declared(self, frame: pika.frame.Method) -> None:
        assert frame.method.queue == self.queue
        self.channel.basic_qos(prefetch_count=5, callback=self.on_qos)

    def on_qos(self, _frame: pika.frame.Method) -> None:
        self.channel.basic_consume(self.queue, self.on_message, callback=self.on_consuming)

    def on_consuming(self, _frame: pika.frame.Method) -> None:
        props = pika.BasicProperties(content_type="text/plain", delivery_mode=2)
        for i in range(COUNT):
            self.channel.basic_publish("", self.queue, f"msg-{i}".encode(), props)
            self.published += 1
        # Unroutable and mandatory: returned, then still confirmed (RabbitMQ acks it).
        self.channel.basic_publish("", f"{self.queue}-nowhere", b"lost", mandatory=True)
        self.published += 1

    def on_return(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        self.record.returned.append((method.reply_code, method.reply_text, body))

    def on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tags = set(range(1, method.delivery_tag + 1)) if method.multiple else {method.delivery_tag}
        if isinstance(method, pika.spec.Basic.Ack):
            self.record.acked_tags |= tags
        else:
            self.record.nacked_tags |= tags
        self.maybe_finish()

    def on_message(self, channel: Any, method: Any, _props: Any, body: bytes) -> None:
        self.record.delivered.append(body)
        self.record.redelivered.append(method.redelivered)
        channel.basic_ack(method.delivery_tag)
        self.maybe_finish()

    def maybe_finish(self) -> None:
        done = len(self.record.delivered) == COUNT and len(self.record.acked_tags) == COUNT + 1
        if done and self.record.final_counts is None:
            self.record.final_counts = (-1, -1)
            self.channel.queue_declare(self.queue, passive=True, callback=self.on_final_count)

    def on_final_count(self, frame: pika.frame.Method) -> None:
        self.record.final_counts = (frame.method.message_count, frame.method.consumer_count)
        self.conn.close()


def test_select_connection_publish_consume_ack_with_confirms(broker_url: str) -> None:
    record = RoundTrip(broker_url).run()

    assert not record.timed_out, record
    assert isinstance(record.closed_reason, pika.exceptions.ConnectionClosedByClient)
    assert record.delivered == [f"msg-{i}".encode() for i in range(COUNT)]
    assert record.redelivered == [False] * COUNT
    assert record.acked_tags == set(range(1, COUNT + 2))
    assert record.nacked_tags == set()
    assert record.returned == [(312, "NO_ROUTE", b"lost")]
    assert record.final_counts == (0, 1)
