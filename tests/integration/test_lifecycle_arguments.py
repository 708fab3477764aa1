"""Issue 3, item 10: queue and exchange arguments — validation (406 with RabbitMQ's wording)
and equivalence on redeclare.

Every expectation was read from RabbitMQ 3.10 (WARREN_TEST_BROKER_URL). Rules:
- Only the arguments RabbitMQ knows are validated and compared; unknown `x-` keys (and
  unknown exchange arguments) are stored but never make a redeclare inequivalent.
- Comparison is by value and type; the text shows both values as RabbitMQ prints them,
  so an int against a string reads "received '5' but current is '5'" (a 3.10 quirk).
- On a quorum queue 3.10 does not validate x-delivery-limit (a quirk: -1 and "a" pass).
- Names are unique per test (`pika_env`), so the tests share one broker.
"""

from __future__ import annotations

from typing import Any

import pytest

# (arguments, the reason after "...in vhost '/': ") — one case per validation rule
INVALID = [
    ({"x-message-ttl": -1}, "x-message-ttl", "{value_negative,-1}"),
    ({"x-message-ttl": "abc"}, "x-message-ttl", '"expected integer, got longstr"'),
    ({"x-expires": 0}, "x-expires", "{value_zero,0}"),
    ({"x-expires": -5}, "x-expires", "{value_negative,-5}"),
    ({"x-max-length": -1}, "x-max-length", "{value_negative,-1}"),
    ({"x-max-length-bytes": "x"}, "x-max-length-bytes", '"expected integer, got longstr"'),
    ({"x-overflow": "foo"}, "x-overflow", "invalid_overflow"),
    ({"x-overflow": 1}, "x-overflow", "{unacceptable_type,signedint}"),
    ({"x-max-priority": 256}, "x-max-priority", "{max_value_exceeded,256}"),
    ({"x-max-priority": -1}, "x-max-priority", "{value_negative,-1}"),
    ({"x-max-priority": "a"}, "x-max-priority", '"expected integer, got longstr"'),
    (
        {"x-dead-letter-routing-key": "k"},
        "x-dead-letter-routing-key",
        "routing_key_but_no_dlx_defined",
    ),
    (
        {"x-single-active-consumer": "yes"},
        "x-single-active-consumer",
        "{unacceptable_type,longstr}",
    ),
]


@pytest.mark.parametrize(("arguments", "key", "reason"), INVALID)
def test_invalid_queue_argument_is_refused(
    pika_env: Any, arguments: dict[str, Any], key: str, reason: str
) -> None:
    name = pika_env.name("q")
    text = f"PRECONDITION_FAILED - invalid arg '{key}' for queue '{name}' in vhost '/': {reason}"
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(name, arguments=arguments)
    with pika_env.closes_channel(404, f"NOT_FOUND - no queue '{name}' in vhost '/'"):
        pika_env.channel().queue_declare(name, passive=True)


def test_dead_letter_exchange_of_the_wrong_type_is_refused(pika_env: Any) -> None:
    name = pika_env.name("q")
    text = (
        "PRECONDITION_FAILED - invalid type 'signedint' for arg 'x-dead-letter-exchange'"
        f" in queue '{name}' in vhost '/'"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(name, arguments={"x-dead-letter-exchange": 1})


@pytest.mark.parametrize(
    "arguments",
    [{"x-max-priority": 0}, {"x-max-priority": 255}, {"x-message-ttl": 0}, {"x-max-length": 0}],
)
def test_boundary_values_are_accepted(pika_env: Any, arguments: dict[str, Any]) -> None:
    name = pika_env.queue(arguments=arguments)
    assert pika_env.channel().queue_declare(name, arguments=arguments).method.queue == name


@pytest.mark.parametrize("limit", [-1, "a"])
def test_quorum_delivery_limit_is_not_validated(pika_env: Any, limit: Any) -> None:
    name = pika_env.queue(
        "qq", durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": limit}
    )
    assert pika_env.channel().queue_declare(name, passive=True).method.queue == name


# --- equivalence ---------------------------------------------------------------------------


def test_unknown_x_arguments_are_not_compared(pika_env: Any) -> None:
    name = pika_env.queue(arguments={"x-foo": 1, "x-bar": "keep"})
    ch = pika_env.channel()
    assert ch.queue_declare(name, arguments={"x-foo": 2}).method.queue == name
    assert ch.queue_declare(name).method.queue == name
    assert ch.queue_declare(name, arguments={"x-new": True}).method.queue == name


@pytest.mark.parametrize(
    ("first", "second", "key", "detail"),
    [
        (
            {"x-message-ttl": 100},
            {"x-message-ttl": 200},
            "x-message-ttl",
            "received '200' but current is '100'",
        ),
        (
            {"x-message-ttl": 100},
            {},
            "x-message-ttl",
            "received none but current is the value '100' of type 'signedint'",
        ),
        (
            {},
            {"x-message-ttl": 100},
            "x-message-ttl",
            "received the value '100' of type 'signedint' but current is none",
        ),
        (
            {"x-max-priority": 5},
            {"x-max-priority": 6},
            "x-max-priority",
            "received '6' but current is '5'",
        ),
        (
            {"x-dead-letter-exchange": "a"},
            {"x-dead-letter-exchange": "b"},
            "x-dead-letter-exchange",
            "received 'b' but current is 'a'",
        ),
        (
            {"x-overflow": "drop-head"},
            {"x-overflow": "reject-publish"},
            "x-overflow",
            "received 'reject-publish' but current is 'drop-head'",
        ),
        (
            {"x-single-active-consumer": True},
            {"x-single-active-consumer": False},
            "x-single-active-consumer",
            "received 'false' but current is 'true'",
        ),
        (
            {"x-max-length": 5},
            {"x-max-length": "5"},
            "x-max-length",
            "received '5' but current is '5'",
        ),
    ],
)
def test_known_argument_mismatch_is_inequivalent(
    pika_env: Any, first: dict[str, Any], second: dict[str, Any], key: str, detail: str
) -> None:
    name = pika_env.queue(arguments=first)
    text = (
        f"PRECONDITION_FAILED - inequivalent arg '{key}' for queue '{name}' in vhost '/': {detail}"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().queue_declare(name, arguments=second)


def test_same_known_arguments_in_another_order_are_equivalent(pika_env: Any) -> None:
    args = {"x-message-ttl": 100, "x-max-length": 3, "x-dead-letter-exchange": "dlx"}
    name = pika_env.queue(arguments=args)
    reordered = dict(reversed(list(args.items())))
    assert pika_env.channel().queue_declare(name, arguments=reordered).method.queue == name


# --- exchanges -----------------------------------------------------------------------------


def test_exchange_unknown_arguments_are_not_compared(pika_env: Any) -> None:
    name = pika_env.exchange("direct", arguments={"x-foo": 1})
    ch = pika_env.channel()
    ch.exchange_declare(name, "direct", arguments={"x-foo": 2})
    ch.exchange_declare(name, "direct")
    assert ch.is_open


@pytest.mark.parametrize(
    ("second", "detail"),
    [
        ({"alternate-exchange": "b"}, "received 'b' but current is 'a'"),
        ({}, "received none but current is the value 'a' of type 'longstr'"),
    ],
)
def test_exchange_alternate_exchange_is_compared(
    pika_env: Any, second: dict[str, Any], detail: str
) -> None:
    name = pika_env.exchange("direct", arguments={"alternate-exchange": "a"})
    text = (
        f"PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange '{name}'"
        f" in vhost '/': {detail}"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().exchange_declare(name, "direct", arguments=second)


def test_alternate_exchange_of_the_wrong_type_is_refused(pika_env: Any) -> None:
    name = pika_env.name("x")
    text = (
        "PRECONDITION_FAILED - invalid type 'signedint' for arg 'alternate-exchange'"
        f" in exchange '{name}' in vhost '/'"
    )
    with pika_env.closes_channel(406, text):
        pika_env.channel().exchange_declare(name, "direct", arguments={"alternate-exchange": 1})
