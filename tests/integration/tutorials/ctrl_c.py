"""Ctrl+C for the tutorial consumers: stop consuming cleanly, then close.

RabbitMQ's tutorials let KeyboardInterrupt fly out of `start_consuming`. Raised in the
middle of pika's own I/O it can leave the connection unable to close (the program hangs),
and exiting without a close can drop an ack that was not yet written. Here SIGINT only asks
pika's loop to stop, so pending acks are flushed and the close handshake completes.
"""

from __future__ import annotations

import signal
from typing import Any


def consume_until_interrupted(connection: Any, channel: Any) -> None:
    def on_sigint(_signum: int, _frame: Any) -> None:
        connection.add_callback_threadsafe(channel.stop_consuming)

    signal.signal(signal.SIGINT, on_sigint)
    channel.start_consuming()
    print(" [*] Interrupted", flush=True)
    connection.close()
