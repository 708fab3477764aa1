"""Property tests of the state machine (hypothesis).

- A rule-based test drives one queue with publish, consume, cancel, qos, get, ack, nack,
  reject, recover, purge, channel close and flow control against a simple model, checking
  conservation of messages, FIFO (by message id), redelivered flags, delivery tags, prefetch
  limits, and that the machine delivers whenever a consumer could take a message.
- Replicas applying the same random command list produce equal outcomes and snapshots.
- restore(snapshot()) keeps the observable state.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import (
    AmqpError,
    ChannelRef,
    Deliver,
    GetEmpty,
    GetOk,
    Ok,
    Outcome,
    Properties,
)

REFS = [ChannelRef(conn, n) for conn in (1, 2) for n in (1, 2)]
refs = st.sampled_from(REFS)


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sm = StateMachine()
        assert not isinstance(self._apply(c.DeclareQueue(vhost="/", queue="q", owner=1)), AmqpError)
        self.next_id = 1
        self.ready: dict[int, bool] = {}  # id -> redelivered
        self.requeued: set[int] = set()
        self.removed = 0
        # per channel: tag -> (message id, consumer tag or None)
        self.unacked: dict[ChannelRef, OrderedDict[int, tuple[int, str | None]]] = {}
        self.next_tag: dict[ChannelRef, int] = {}
        self.prefetch: dict[ChannelRef, int] = {}
        self.global_prefetch: dict[ChannelRef, int] = {}
        # RabbitMQ's channel limiter volume (see Broker.qos for its quirks).
        self.volume: dict[ChannelRef, int] = {}
        # consumer tag -> (channel, no_ack, prefetch)
        self.consumers: dict[str, tuple[ChannelRef, bool, int]] = {}
        self.writable = {1: True, 2: True}
        self.counter = 0

    # ---- plumbing ----------------------------------------------------------------------

    def _apply(self, cmd: Any) -> Any:
        out: Outcome = self.sm.apply(cmd)
        for effect in out.effects:
            assert isinstance(effect, Deliver)
            self._delivered(effect)
        return out.reply

    def _consumer_unacked(self, tag: str) -> int:
        ref = self.consumers[tag][0]
        return sum(1 for _, ctag in self.unacked.get(ref, {}).values() if ctag == tag)

    def _can_take(self, tag: str) -> bool:
        ref, no_ack, prefetch = self.consumers[tag]
        if not self.writable[ref.conn]:
            return False
        if no_ack:
            return True
        if prefetch and self._consumer_unacked(tag) >= prefetch:
            return False
        limit = self.global_prefetch.get(ref, 0)
        return not (limit and self.volume.get(ref, 0) >= limit)

    def _take_next(self, ref: ChannelRef, message_id: int, redelivered: bool, tag: int) -> None:
        assert self.ready, "delivered from an empty queue"
        assert message_id == min(self.ready), "not FIFO by message id"
        assert redelivered == (message_id in self.requeued)
        assert self.ready.pop(message_id) == redelivered
        assert tag == self.next_tag.get(ref, 1)
        self.next_tag[ref] = tag + 1

    def _delivered(self, effect: Deliver) -> None:
        ref, ctag = effect.channel, effect.consumer_tag
        assert ctag in self.consumers
        assert self.consumers[ctag][0] == ref
        assert self._can_take(ctag), "delivered beyond prefetch or to a blocked connection"
        self._take_next(ref, effect.message.id, effect.redelivered, effect.delivery_tag)
        assert effect.message.body == b"m%d" % effect.message.id
        if self.consumers[ctag][1]:
            self.removed += 1
        else:
            self.unacked.setdefault(ref, OrderedDict())[effect.delivery_tag] = (
                effect.message.id,
                ctag,
            )
            self.volume[ref] = self.volume.get(ref, 0) + 1

    def _give_back(
        self, ref: ChannelRef, entries: list[tuple[int, str | None]], requeue: bool
    ) -> None:
        for message_id, ctag in entries:
            if ctag is not None:
                self.volume[ref] -= 1
            if requeue:
                self.ready[message_id] = True
                self.requeued.add(message_id)
            else:
                self.removed += 1

    # ---- rules -------------------------------------------------------------------------

    @rule(ref=refs, n=st.integers(1, 3))
    def publish(self, ref: ChannelRef, n: int) -> None:
        for _ in range(n):
            message_id = self.next_id
            self.next_id += 1
            self.ready[message_id] = False
            cmd = c.Publish(
                channel=ref,
                vhost="/",
                exchange="",
                routing_key="q",
                mandatory=True,
                properties=b"",
                props=Properties(),
                body=b"m%d" % message_id,
            )
            reply = self._apply(cmd)
            assert reply.queues == 1

    @rule(ref=refs, no_ack=st.booleans())
    def consume(self, ref: ChannelRef, no_ack: bool) -> None:
        self.counter += 1
        tag = f"c{self.counter}"
        self.consumers[tag] = (ref, no_ack, self.prefetch.get(ref, 0))
        cmd = c.Consume(channel=ref, vhost="/", queue="q", consumer_tag=tag, no_ack=no_ack)
        assert not isinstance(self._apply(cmd), AmqpError)

    @precondition(lambda self: self.consumers)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        tag = data.draw(st.sampled_from(sorted(self.consumers)))
        ref = self.consumers[tag][0]
        # The model keeps the consumer until the cancel is applied (its unacked stay).
        assert self._apply(c.Cancel(channel=ref, consumer_tag=tag)) == Ok()
        del self.consumers[tag]

    @rule(ref=refs, count=st.integers(0, 3), global_=st.booleans())
    def qos(self, ref: ChannelRef, count: int, global_: bool) -> None:
        if global_:
            self.global_prefetch[ref] = count
            self.volume[ref] = len(self.unacked.get(ref, ()))
        else:
            self.prefetch[ref] = count
            self.global_prefetch[ref] = 0
        cmd = c.Qos(channel=ref, prefetch_count=count, global_=global_)
        assert self._apply(cmd) == Ok()

    @rule(ref=refs, no_ack=st.booleans())
    def get(self, ref: ChannelRef, no_ack: bool) -> None:
        reply = self._apply(c.Get(channel=ref, vhost="/", queue="q", no_ack=no_ack))
        if not self.ready:
            assert isinstance(reply, GetEmpty)
            return
        assert isinstance(reply, GetOk)
        self._take_next(ref, reply.message.id, reply.redelivered, reply.delivery_tag)
        assert reply.message_count == len(self.ready)
        if no_ack:
            self.removed += 1
        else:
            self.unacked.setdefault(ref, OrderedDict())[reply.delivery_tag] = (
                reply.message.id,
                None,
            )

    @rule(ref=refs, data=st.data(), kind=st.sampled_from(["ack", "nack", "reject"]),
          multiple=st.booleans(), requeue=st.booleans())  # fmt: skip
    def settle(
        self, ref: ChannelRef, data: st.DataObject, kind: str, multiple: bool, requeue: bool
    ) -> None:
        pending = self.unacked.get(ref, OrderedDict())
        choices = [*pending, 0, self.next_tag.get(ref, 1) + 5]
        tag = data.draw(st.sampled_from(choices))
        multiple = multiple and kind != "reject"
        if multiple and tag == 0:
            taken = list(pending)
        elif multiple:
            taken = [t for t in pending if t <= tag] if tag in pending else []
        else:
            taken = [tag] if tag in pending else []
        cmd: Any
        if kind == "ack":
            cmd = c.Ack(channel=ref, delivery_tag=tag, multiple=multiple)
        else:
            cmd = c.Nack(
                channel=ref,
                delivery_tag=tag,
                multiple=multiple,
                requeue=requeue,
                reject=kind == "reject",
            )
        known = bool(taken) or (multiple and tag == 0)
        # Model first (deliveries triggered by the settle see the updated model).
        entries = [pending.pop(t) for t in taken]
        self._give_back(ref, entries, requeue=kind != "ack" and requeue)
        reply = self._apply(cmd)
        if known:
            assert reply == Ok()
        else:
            assert isinstance(reply, AmqpError)
            assert reply.reply_text == f"PRECONDITION_FAILED - unknown delivery tag {tag}"

    @rule(ref=refs)
    def recover(self, ref: ChannelRef) -> None:
        pending = self.unacked.pop(ref, OrderedDict())
        self._give_back(ref, list(pending.values()), requeue=True)
        assert self._apply(c.Recover(channel=ref)) == Ok()

    @rule()
    def purge(self) -> None:
        count = len(self.ready)
        self.removed += count
        self.ready.clear()
        reply = self._apply(c.PurgeQueue(vhost="/", queue="q", owner=1))
        assert reply.message_count == count

    @rule(ref=refs)
    def close_channel(self, ref: ChannelRef) -> None:
        pending = self.unacked.pop(ref, OrderedDict())
        self._give_back(ref, list(pending.values()), requeue=True)
        self.volume.pop(ref, None)
        for tag in [t for t, (r, _, _) in self.consumers.items() if r == ref]:
            del self.consumers[tag]
        self.next_tag.pop(ref, None)
        self.prefetch.pop(ref, None)
        self.global_prefetch.pop(ref, None)
        assert self._apply(c.CloseChannel(channel=ref)) == Ok()

    @rule(conn=st.sampled_from([1, 2]), writable=st.booleans())
    def set_writable(self, conn: int, writable: bool) -> None:
        self.writable[conn] = writable
        assert self._apply(c.SetWritable(conn=conn, writable=writable)) == Ok()

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def counts_agree(self) -> None:
        (view,) = list(self.sm.queues("/"))
        unacked = sum(len(p) for p in self.unacked.values())
        assert view.messages == len(self.ready)
        assert view.unacked == unacked
        assert view.consumers == len(self.consumers)
        for ref in REFS:
            assert self.sm.channel_unacked(ref) == len(self.unacked.get(ref, ()))
        held = list(self.ready) + [m for p in self.unacked.values() for m, _ in p.values()]
        assert self.sm.total_message_bytes == sum(len(b"m%d" % m) for m in held)

    @invariant()
    def conservation(self) -> None:
        unacked = sum(len(p) for p in self.unacked.values())
        assert self.next_id - 1 == len(self.ready) + unacked + self.removed

    @invariant()
    def nothing_left_that_a_consumer_could_take(self) -> None:
        if self.ready:
            assert not any(self._can_take(tag) for tag in self.consumers)


QueueModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueModel = QueueModel.TestCase


# ---- random command lists: replicas and snapshots -----------------------------------------

QUEUES = ["q1", "q2", "amq.gen-x"]
EXCHANGES = ["x1", "x2"]
ARGS = st.sampled_from([{}, {"k": 1}, {"x-match": "any", "k": 1}])


def _publish(ch: ChannelRef, exchange: str, key: str, body: bytes, mandatory: bool) -> Any:
    return c.Publish(
        channel=ch,
        vhost="/",
        exchange=exchange,
        routing_key=key,
        mandatory=mandatory,
        properties=b"\x00",
        props=Properties(headers={"k": 1}),
        body=body,
    )


names = st.sampled_from(QUEUES)
xnames = st.sampled_from(EXCHANGES)
keys = st.sampled_from(["", "a", "a.b", "q1", "q2"])
commands = st.one_of(
    st.builds(
        lambda q, conn, durable, exclusive, auto_delete: c.DeclareQueue(
            vhost="/", queue=q, owner=conn, durable=durable, exclusive=exclusive,
            auto_delete=auto_delete, server_named=q.startswith("amq."),
        ),
        names, st.sampled_from([1, 2]), st.booleans(), st.booleans(), st.booleans(),
    ),
    st.builds(
        lambda x, t, ad: c.DeclareExchange(vhost="/", exchange=x, type=t, auto_delete=ad),
        xnames, st.sampled_from(["direct", "fanout", "topic", "headers"]), st.booleans(),
    ),
    st.builds(
        lambda q, x, k, a, conn: c.BindQueue(
            vhost="/", queue=q, exchange=x, routing_key=k, owner=conn, arguments=a
        ),
        names, st.sampled_from([*EXCHANGES, "amq.topic"]), keys, ARGS, st.sampled_from([1, 2]),
    ),
    st.builds(
        lambda q, x, k, a: c.UnbindQueue(
            vhost="/", queue=q, exchange=x, routing_key=k, owner=1, arguments=a
        ),
        names, st.sampled_from([*EXCHANGES, "amq.topic"]), keys, ARGS,
    ),
    st.builds(
        lambda dst, src, k: c.BindExchange(vhost="/", destination=dst, source=src, routing_key=k),
        xnames, xnames, keys,
    ),
    st.builds(
        lambda x, u: c.DeleteExchange(vhost="/", exchange=x, if_unused=u), xnames, st.booleans()
    ),
    st.builds(
        lambda q, conn, u, e: c.DeleteQueue(
            vhost="/", queue=q, owner=conn, if_unused=u, if_empty=e
        ),
        names, st.sampled_from([1, 2]), st.booleans(), st.booleans(),
    ),
    st.builds(lambda q: c.PurgeQueue(vhost="/", queue=q, owner=1), names),
    st.builds(
        _publish, refs, st.sampled_from(["", *EXCHANGES, "amq.topic"]), keys,
        st.binary(max_size=3), st.booleans(),
    ),
    st.builds(
        lambda ch, q, tag, no_ack, excl: c.Consume(
            channel=ch, vhost="/", queue=q, consumer_tag=tag, no_ack=no_ack, exclusive=excl
        ),
        refs, names, st.sampled_from(["t1", "t2"]), st.booleans(), st.booleans(),
    ),
    st.builds(lambda ch, tag: c.Cancel(channel=ch, consumer_tag=tag), refs,
              st.sampled_from(["t1", "t2"])),
    st.builds(lambda ch, q, no_ack: c.Get(channel=ch, vhost="/", queue=q, no_ack=no_ack),
              refs, names, st.booleans()),
    st.builds(lambda ch, n, g: c.Qos(channel=ch, prefetch_count=n, global_=g),
              refs, st.integers(0, 2), st.booleans()),
    st.builds(lambda ch, t, m: c.Ack(channel=ch, delivery_tag=t, multiple=m),
              refs, st.integers(0, 6), st.booleans()),
    st.builds(lambda ch, t, m, r: c.Nack(channel=ch, delivery_tag=t, multiple=m, requeue=r),
              refs, st.integers(0, 6), st.booleans(), st.booleans()),
    st.builds(lambda ch: c.Recover(channel=ch), refs),
    st.builds(lambda ch: c.CloseChannel(channel=ch), refs),
    st.builds(lambda conn: c.CloseConnection(conn=conn), st.sampled_from([1, 2])),
    st.builds(lambda t: c.Tick(now_ms=t), st.integers(0, 400)),
    st.builds(lambda conn, w: c.SetWritable(conn=conn, writable=w),
              st.sampled_from([1, 2]), st.sampled_from([True, True, False])),
)  # fmt: skip
# A topology to start from, so that random commands mostly meet things that exist.
PRELUDE: list[Any] = [
    c.DeclareQueue(vhost="/", queue="q1", owner=1, durable=True, arguments={"x-message-ttl": 50}),
    c.DeclareQueue(
        vhost="/",
        queue="q2",
        owner=2,
        auto_delete=True,
        arguments={"x-single-active-consumer": True, "x-max-length": 3},
    ),
    c.DeclareQueue(
        vhost="/",
        queue="amq.gen-x",
        owner=1,
        exclusive=True,
        server_named=True,
    ),
    c.DeclareExchange(vhost="/", exchange="x1", type="topic"),
    c.DeclareExchange(vhost="/", exchange="x2", type="fanout", auto_delete=True),
    c.BindQueue(vhost="/", queue="q1", exchange="x1", routing_key="a.*", owner=1),
    c.BindQueue(vhost="/", queue="q2", exchange="x2", routing_key="", owner=1),
    c.BindQueue(vhost="/", queue="amq.gen-x", exchange="amq.topic", routing_key="#", owner=1),
    c.BindExchange(vhost="/", destination="x2", source="x1", routing_key="#"),
]
busy = st.one_of(
    st.builds(_publish, refs, st.sampled_from(["", "x1", "amq.topic"]), keys,
              st.binary(max_size=3), st.booleans()),
    st.builds(lambda ch, q, no_ack: c.Consume(channel=ch, vhost="/", queue=q,
                                              consumer_tag=f"t{ch.channel}", no_ack=no_ack),
              refs, names, st.booleans()),
    st.builds(lambda ch, t, m: c.Ack(channel=ch, delivery_tag=t, multiple=m),
              refs, st.integers(1, 4), st.booleans()),
    st.builds(lambda ch, q: c.Get(channel=ch, vhost="/", queue=q), refs, names),
)  # fmt: skip
command_lists = st.lists(st.one_of(busy, commands), min_size=10, max_size=50).map(
    lambda cs: PRELUDE + cs
)


@settings(max_examples=150, deadline=None)
@given(command_lists)
def test_replicas_reach_the_same_state(cmds: list[Any]) -> None:
    a, b = StateMachine(), StateMachine()
    for cmd in cmds:
        assert a.apply(cmd) == b.apply(cmd)
    assert a.snapshot() == b.snapshot()
    assert list(a.queues("/")) == list(b.queues("/"))


def observe(sm: StateMachine) -> dict[str, Any]:
    """Topology, queues and their messages in order (drained through basic.get on a fresh
    channel, so this consumes the machine's messages)."""
    seen: dict[str, Any] = {
        "exchanges": list(sm.exchanges("/")),
        "bindings": list(sm.bindings("/")),
        "queues": [
            (v.name, v.durable, v.exclusive, v.auto_delete, v.owner, v.arguments)
            for v in sm.queues("/")
        ],
        "bytes": sm.total_message_bytes,
    }
    for view in list(sm.queues("/")):
        got = []
        while True:
            owner = view.owner if view.owner is not None else 99
            reply = sm.apply(c.Get(channel=ChannelRef(owner, 1), vhost="/", queue=view.name,
                                   no_ack=True)).reply  # fmt: skip
            if not isinstance(reply, GetOk):
                break
            m = reply.message
            got.append((m.id, m.exchange, m.routing_key, m.properties, m.props, m.body,
                        reply.redelivered))  # fmt: skip
        seen[view.name] = got
    return seen


@settings(max_examples=150, deadline=None)
@given(command_lists)
def test_restore_of_snapshot_keeps_observable_state(cmds: list[Any]) -> None:
    sm = StateMachine()
    for cmd in cmds:
        sm.apply(cmd)
    data = sm.snapshot()
    restored = StateMachine.restore(data)
    assert restored.snapshot() == data
    # What the snapshot promises: the state once every unacked message is back in its queue.
    for conn in (1, 2):
        sm.apply(c.SetWritable(conn=conn, writable=False))
    for ref in REFS:
        sm.apply(c.Recover(channel=ref))
    assert observe(restored) == observe(sm)
    # Both carry on identically (ids, routing).
    tail = [
        _publish(REFS[0], "", "q1", b"z", True),
        _publish(REFS[0], "amq.topic", "a", b"y", False),
    ]
    assert [restored.apply(x).reply for x in tail] == [sm.apply(x).reply for x in tail]
