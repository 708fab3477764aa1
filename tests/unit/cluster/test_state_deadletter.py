"""Dead-lettering wired into the model: reject/nack, expiry, drop-head, reject-publish-dlx,
delivery-limit; x-death headers on the wire (through the real header re-encoder), CC rule,
missing DLX, cycles, and the new message entering its target queues. Time injected.
Expectations are RabbitMQ 3.10's (docs/dead-lettering.md)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from pamqp.commands import Basic

from cluster import commands as c
from cluster.state import StateMachine
from node.broker.types import Deliver, Properties, Routed, Ticked
from node.protocol import codec
from node.protocol.properties import with_headers
from tests.unit.cluster.conftest import Driver

NOW = 1_700_000_000_000


@pytest.fixture
def d() -> Driver:
    return Driver(StateMachine(rewrite_headers=with_headers))


def publish(
    d: Driver,
    queue: str,
    body: bytes = b"m",
    *,
    exchange: str = "",
    now: int = NOW,
    expiration: str | None = None,
    headers: dict[str, Any] | None = None,
    priority: int | None = None,
) -> Any:
    raw = codec.encode_properties(
        Basic.Properties(
            content_type="text/plain", expiration=expiration, headers=headers, priority=priority
        )
    )
    cmd = c.Publish(
        channel=d.ch(),
        vhost="/",
        exchange=exchange,
        routing_key=queue,
        mandatory=False,
        properties=raw,
        props=Properties(1, priority, expiration, headers),
        body=body,
        now_ms=now,
    )
    return d.run(cmd).reply


def wire(message: Any) -> Basic.Properties:
    """The properties a consumer of `message` receives."""
    return codec.decode_properties(message.properties)


def get(d: Driver, queue: str, now: int = NOW) -> Any:
    reply = d.ok(c.Get(channel=d.ch(), vhost="/", queue=queue, no_ack=True, now_ms=now))
    return getattr(reply, "message", None)


def ts(now_ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(now_ms // 1000, tz=datetime.UTC)


def setup_pair(d: Driver, source_args: dict[str, Any], **kw: Any) -> None:
    """`src` dead-letters to exchange `dlx` (direct), where `dead` is bound with `src`."""
    d.ok(d.xdeclare("dlx"))
    d.ok(d.declare("dead"))
    d.ok(d.bind("dead", "dlx", "src"))
    d.ok(d.declare("src", arguments={"x-dead-letter-exchange": "dlx", **source_args}, **kw))


def test_reject_without_requeue_dead_letters_with_x_death(d) -> None:
    setup_pair(d, {})
    publish(d, "src", b"a", expiration="600000", headers={"user": "u"})
    reply = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src", now_ms=NOW))
    d.ok(d.nack(reply.delivery_tag, requeue=False, reject=True))
    assert d.sm.total_message_bytes == 1  # the dead copy, in "dead"
    message = get(d, "dead", now=NOW + 10)
    assert message.exchange == "dlx"
    assert message.routing_key == "src"
    props = wire(message)
    assert props.expiration is None
    assert props.content_type == "text/plain"
    assert list(props.headers) == [
        "user",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    ]
    (death,) = props.headers["x-death"]
    assert death == {
        "count": 1,
        "reason": "rejected",
        "queue": "src",
        "time": ts(NOW),
        "exchange": "",
        "routing-keys": ["src"],
        "original-expiration": "600000",
    }
    assert props.headers["x-first-death-reason"] == "rejected"
    assert message.props.headers == props.headers
    assert message.props.expiration is None
    assert message.id > reply.message.id  # a new message


def test_ack_requeue_purge_and_delete_never_dead_letter(d) -> None:
    setup_pair(d, {})
    for body in (b"a", b"b", b"c"):
        publish(d, "src", body)
    t1 = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    t2 = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.ack(t1))
    d.ok(d.nack(t2, requeue=True))
    d.ok(c.PurgeQueue(vhost="/", queue="src", owner=1))
    publish(d, "src", b"d")
    d.ok(c.DeleteQueue(vhost="/", queue="src", owner=1))
    assert d.queue("dead").messages == 0


def test_nack_multiple_dead_letters_each_in_order_and_delivers_to_consumers(d) -> None:
    setup_pair(d, {})
    for body in (b"a", b"b", b"c"):
        publish(d, "src", body)
    d.ok(d.consume("dead", "dc", channel=d.ch(2, 1), no_ack=True))
    d.ok(d.consume("src", "sc"))
    out = d.run(d.nack(3, multiple=True, requeue=False))
    delivered = [e for e in out.effects if isinstance(e, Deliver)]
    assert [(e.consumer_tag, e.message.body) for e in delivered] == [
        ("dc", b"a"),
        ("dc", b"b"),
        ("dc", b"c"),
    ]
    assert d.sm.total_message_bytes == 0


def test_dead_letter_routing_key_replaces_key_and_drops_cc(d) -> None:
    d.ok(d.declare("dead"))
    d.ok(
        d.declare(
            "src", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}
        )
    )
    publish(d, "src", headers={"CC": ["other"], "h": 1})
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    message = get(d, "dead")
    assert (message.exchange, message.routing_key) == ("", "dead")
    headers = wire(message).headers
    assert "CC" not in headers
    assert headers["h"] == 1
    assert headers["x-death"][0]["routing-keys"] == ["src", "other"]


def test_cc_kept_without_dead_letter_routing_key(d) -> None:
    setup_pair(d, {})
    publish(d, "src", headers={"CC": ["kcc"]})
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    d.ok(d.declare("by-cc"))
    d.ok(d.bind("by-cc", "dlx", "kcc"))
    d.ok(d.bind("dead", "dlx", "kcc"))  # reached twice: one copy
    publish(d, "src", b"second", headers={"CC": ["kcc"]})
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    headers = wire(get(d, "dead")).headers
    assert headers["CC"] == ["kcc"]
    assert headers["x-death"][0]["routing-keys"] == ["src", "kcc"]
    assert [b for b, _ in d.drain("dead")] == [b"second"]
    assert [b for b, _ in d.drain("by-cc")] == [b"second"]


def test_missing_dlx_or_no_route_drops(d) -> None:
    d.ok(d.declare("src", arguments={"x-dead-letter-exchange": "nope"}))
    publish(d, "src")
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    assert d.sm.total_message_bytes == 0
    d.ok(d.xdeclare("empty"))
    d.ok(d.declare("src2", arguments={"x-dead-letter-exchange": "empty"}))
    publish(d, "src2")
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src2")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    assert d.sm.total_message_bytes == 0


def test_dlx_alternate_exchange_takes_unroutable_dead_messages(d) -> None:
    d.ok(d.xdeclare("ae", "fanout"))
    d.ok(d.declare("caught"))
    d.ok(d.bind("caught", "ae"))
    d.ok(d.xdeclare("dlx", arguments={"alternate-exchange": "ae"}))
    d.ok(d.declare("src", arguments={"x-dead-letter-exchange": "dlx"}))
    publish(d, "src")
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    message = get(d, "caught")
    assert message.exchange == "dlx"


def test_queue_ttl_expiry_dead_letters_without_original_expiration(d) -> None:
    setup_pair(d, {"x-message-ttl": 100})
    publish(d, "src", headers={"h": 1})
    assert d.ok(c.Tick(now_ms=NOW + 50)) == Ticked()
    assert d.queue("dead").messages == 0
    d.ok(c.Tick(now_ms=NOW + 101))
    message = get(d, "dead", now=NOW + 101)
    (death,) = wire(message).headers["x-death"]
    assert death["reason"] == "expired"
    assert death["time"] == ts(NOW + 101)
    assert "original-expiration" not in death
    assert message.expires_ms is None  # "dead" has no TTL


def test_per_message_expiry_records_original_expiration(d) -> None:
    setup_pair(d, {})
    publish(d, "src", expiration="100")
    d.ok(c.Tick(now_ms=NOW + 200))
    props = wire(get(d, "dead", now=NOW + 200))
    assert props.expiration is None
    assert props.headers["x-death"][0]["original-expiration"] == "100"


def test_drop_head_overflow_dead_letters_as_maxlen(d) -> None:
    setup_pair(d, {"x-max-length": 1})
    publish(d, "src", b"old")
    assert publish(d, "src", b"new") == Routed(1)
    message = get(d, "dead")
    assert message.body == b"old"
    assert wire(message).headers["x-death"][0]["reason"] == "maxlen"
    assert get(d, "src").body == b"new"


def test_reject_publish_dlx_nacks_and_dead_letters_the_refused_message(d) -> None:
    setup_pair(d, {"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    publish(d, "src", b"kept")
    assert publish(d, "src", b"refused") == Routed(1, rejected=True)
    message = get(d, "dead")
    assert message.body == b"refused"
    assert wire(message).headers["x-death"][0]["reason"] == "maxlen"
    assert get(d, "src").body == b"kept"


def test_reject_publish_does_not_dead_letter(d) -> None:
    setup_pair(d, {"x-max-length": 1, "x-overflow": "reject-publish"})
    publish(d, "src", b"kept")
    assert publish(d, "src", b"refused") == Routed(1, rejected=True)
    assert d.queue("dead").messages == 0


def test_reject_loop_counts_and_reorders_like_rabbitmq(d) -> None:
    # A -> B -> C -> A by rejection: x-death order after each death (3.10's reversal).
    for name, nxt in (("A", "B"), ("B", "C"), ("C", "A")):
        d.ok(
            d.declare(
                name, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": nxt}
            )
        )
    publish(d, "A")
    seen = []
    for name in ("A", "B", "C", "A", "B", "C"):
        tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue=name)).delivery_tag
        d.ok(d.nack(tag, requeue=False))
        (nxt,) = [q for q in ("A", "B", "C") if d.queue(q).messages]
        message = d.sm._broker.vhosts["/"].queues[nxt].head()
        seen.append([(t["queue"], t["count"]) for t in wire(message).headers["x-death"]])
    assert seen == [
        [("A", 1)],
        [("B", 1), ("A", 1)],
        [("C", 1), ("A", 1), ("B", 1)],
        [("A", 2), ("B", 1), ("C", 1)],
        [("B", 2), ("C", 1), ("A", 2)],
        [("C", 2), ("A", 2), ("B", 2)],
    ]


def test_expiry_cycle_to_itself_is_dropped(d) -> None:
    d.ok(
        d.declare(
            "S",
            arguments={
                "x-message-ttl": 50,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "S",
            },
        )
    )
    publish(d, "S")
    d.ok(c.Tick(now_ms=NOW + 60))
    assert d.queue("S").messages == 0
    assert d.sm.total_message_bytes == 0


def test_expiry_cycle_between_two_queues_is_dropped_on_reentry(d) -> None:
    d.ok(
        d.declare(
            "X",
            arguments={
                "x-message-ttl": 50,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "Y",
            },
        )
    )
    d.ok(
        d.declare(
            "Y",
            arguments={
                "x-message-ttl": 50,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "X",
            },
        )
    )
    publish(d, "X")
    d.ok(c.Tick(now_ms=NOW + 60))
    assert (d.queue("X").messages, d.queue("Y").messages) == (0, 1)
    d.ok(c.Tick(now_ms=NOW + 120))
    assert (d.queue("X").messages, d.queue("Y").messages) == (0, 0)


def test_rejection_to_itself_is_not_a_cycle(d) -> None:
    d.ok(
        d.declare("S2", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "S2"})
    )
    publish(d, "S2")
    for count in (1, 2, 3):
        tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="S2")).delivery_tag
        d.ok(d.nack(tag, requeue=False))
        head = d.sm._broker.vhosts["/"].queues["S2"].head()
        assert wire(head).headers["x-death"][0]["count"] == count


def test_dead_letter_into_a_drop_head_queue_cascades_without_recursion(d) -> None:
    # dead (max 1, drop-head, DLX -> final): each dead message pushes the older one on.
    d.ok(d.declare("final"))
    d.ok(
        d.declare(
            "dead",
            arguments={
                "x-max-length": 1,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "final",
            },
        )
    )
    d.ok(
        d.declare(
            "src", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}
        )
    )
    for body in (b"a", b"b", b"c"):
        publish(d, "src", body)
    for _ in range(3):
        d.ok(c.Get(channel=d.ch(), vhost="/", queue="src"))
    d.ok(d.nack(3, multiple=True, requeue=False))
    assert [m for m, _ in d.drain("final")] == [b"a", b"b"]
    message = get(d, "dead")
    assert message.body == b"c"
    final_reasons = [t["reason"] for t in wire(message).headers["x-death"]]
    assert final_reasons == ["rejected"]


def test_dead_lettered_message_takes_the_target_queue_ttl(d) -> None:
    d.ok(d.declare("dead", arguments={"x-message-ttl": 1000}))
    d.ok(
        d.declare(
            "src", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}
        )
    )
    publish(d, "src", expiration="5")
    d.ok(c.Tick(now_ms=NOW + 10))
    assert d.queue("dead").messages == 1
    d.ok(c.Tick(now_ms=NOW + 1009))
    assert d.queue("dead").messages == 1
    d.ok(c.Tick(now_ms=NOW + 1011))
    assert d.queue("dead").messages == 0


def test_close_channel_requeues_without_dead_lettering(d) -> None:
    setup_pair(d, {})
    publish(d, "src")
    d.ok(c.Get(channel=d.ch(), vhost="/", queue="src"))
    d.ok(c.CloseChannel(channel=d.ch()))
    assert (d.queue("src").messages, d.queue("dead").messages) == (1, 0)


def test_without_a_rewriter_the_model_still_dead_letters() -> None:
    d = Driver(StateMachine())
    setup_pair(d, {})
    publish(d, "src")
    tag = d.ok(c.Get(channel=d.ch(), vhost="/", queue="src")).delivery_tag
    d.ok(d.nack(tag, requeue=False))
    message = get(d, "dead")
    assert message.props.headers["x-death"][0]["reason"] == "rejected"
    assert wire(message).headers is None  # bytes unchanged: the shell must inject one


def test_replicas_dead_letter_identically() -> None:
    def script(d: Driver) -> list[Any]:
        setup_pair(d, {"x-message-ttl": 30, "x-max-length": 2})
        for i in range(5):
            publish(d, "src", bytes([i]), now=NOW + i)
        d.ok(c.Tick(now_ms=NOW + 100))
        return [
            (m.id, m.properties, m.body) for m in d.sm._broker.vhosts["/"].queues["dead"].messages()
        ]

    a = script(Driver(StateMachine(rewrite_headers=with_headers)))
    b = script(Driver(StateMachine(rewrite_headers=with_headers)))
    assert a == b
    assert len(a) == 5
