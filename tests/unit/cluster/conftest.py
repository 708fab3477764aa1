"""A small driver for `cluster.state.StateMachine` tests: builds commands, checks replies.

No sockets, no sleeping: time is the `now_ms` each command carries.
"""

from __future__ import annotations

from typing import Any

import pytest

from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import (
    AmqpError,
    CancelConsumer,
    ChannelRef,
    Deliver,
    Outcome,
    Properties,
    Reply,
)


class Driver:
    """One state machine plus helpers named after AMQP methods. `ch(conn, n)` names a
    channel; most helpers default to channel (1, 1) and vhost "/"."""

    def __init__(self, sm: StateMachine | None = None) -> None:
        self.sm = sm if sm is not None else StateMachine()
        self.log: list[Outcome] = []

    @staticmethod
    def ch(conn: int = 1, number: int = 1) -> ChannelRef:
        return ChannelRef(conn, number)

    def run(self, cmd: Any) -> Outcome:
        out = self.sm.apply(cmd)
        self.log.append(out)
        return out

    def ok(self, cmd: Any) -> Reply:
        out = self.run(cmd)
        assert not isinstance(out.reply, AmqpError), out.reply
        return out.reply

    def err(self, cmd: Any) -> AmqpError:
        out = self.run(cmd)
        assert isinstance(out.reply, AmqpError), out.reply
        assert out.effects == []
        return out.reply

    # ---- commands ----------------------------------------------------------------------

    def declare(self, name: str, conn: int = 1, **kw: Any) -> c.DeclareQueue:
        return c.DeclareQueue(vhost=kw.pop("vhost", "/"), queue=name, owner=conn, **kw)

    def xdeclare(self, name: str, type: str = "direct", **kw: Any) -> c.DeclareExchange:
        return c.DeclareExchange(vhost=kw.pop("vhost", "/"), exchange=name, type=type, **kw)

    def bind(
        self, queue: str, exchange: str, key: str = "", conn: int = 1, **kw: Any
    ) -> c.BindQueue:
        return c.BindQueue(
            vhost="/", queue=queue, exchange=exchange, routing_key=key, owner=conn, **kw
        )

    def unbind(
        self, queue: str, exchange: str, key: str = "", conn: int = 1, **kw: Any
    ) -> c.UnbindQueue:
        return c.UnbindQueue(
            vhost="/", queue=queue, exchange=exchange, routing_key=key, owner=conn, **kw
        )

    def publish(
        self,
        exchange: str,
        key: str,
        body: bytes = b"m",
        *,
        mandatory: bool = False,
        headers: dict[str, Any] | None = None,
        channel: ChannelRef | None = None,
        now_ms: int = 0,
    ) -> c.Publish:
        return c.Publish(
            channel=channel or self.ch(),
            vhost="/",
            exchange=exchange,
            routing_key=key,
            mandatory=mandatory,
            properties=b"\x00\x00",
            props=Properties(headers=headers),
            body=body,
            now_ms=now_ms,
        )

    def consume(
        self, queue: str, tag: str, channel: ChannelRef | None = None, **kw: Any
    ) -> c.Consume:
        return c.Consume(
            channel=channel or self.ch(), vhost="/", queue=queue, consumer_tag=tag, **kw
        )

    def get(self, queue: str, channel: ChannelRef | None = None, no_ack: bool = False) -> c.Get:
        return c.Get(channel=channel or self.ch(), vhost="/", queue=queue, no_ack=no_ack)

    def ack(self, tag: int, channel: ChannelRef | None = None, multiple: bool = False) -> c.Ack:
        return c.Ack(channel=channel or self.ch(), delivery_tag=tag, multiple=multiple)

    def nack(self, tag: int, channel: ChannelRef | None = None, **kw: Any) -> c.Nack:
        return c.Nack(channel=channel or self.ch(), delivery_tag=tag, **kw)

    def qos(self, count: int, channel: ChannelRef | None = None, global_: bool = False) -> c.Qos:
        return c.Qos(channel=channel or self.ch(), prefetch_count=count, global_=global_)

    # ---- observations ------------------------------------------------------------------

    @staticmethod
    def delivers(out: Outcome) -> list[Deliver]:
        return [e for e in out.effects if isinstance(e, Deliver)]

    @staticmethod
    def cancels(out: Outcome) -> list[CancelConsumer]:
        return [e for e in out.effects if isinstance(e, CancelConsumer)]

    @staticmethod
    def bodies(out: Outcome) -> list[bytes]:
        return [e.message.body for e in out.effects if isinstance(e, Deliver)]

    def queue(self, name: str) -> Any:
        for view in self.sm.queues("/"):
            if view.name == name:
                return view
        raise AssertionError(f"no queue {name!r}")

    def drain(self, queue: str, channel: ChannelRef | None = None) -> list[tuple[bytes, bool]]:
        """basic.get(no_ack) until empty: (body, redelivered) in queue order."""
        got = []
        while True:
            reply = self.ok(self.get(queue, channel, no_ack=True))
            if not hasattr(reply, "message"):
                return got
            got.append((reply.message.body, reply.redelivered))


@pytest.fixture
def d() -> Driver:
    return Driver()
