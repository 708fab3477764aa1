"""node.broker.deadletter: the headers and cycle decisions RabbitMQ 3.10 was seen to make
(the scenarios and tables are those recorded in docs/dead-lettering.md)."""

from __future__ import annotations

import copy
import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.broker.deadletter import (
    DeadLetterTarget,
    amqp_timestamp,
    dead_letter_target,
    death_routing_keys,
    drops_as_cycle,
    is_death_cycle,
    routing_key_replaced,
    x_death_headers,
)

T0 = 1_795_515_803_250  # ms


def ts(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms // 1000, tz=datetime.UTC)


def die(
    headers: dict[str, Any] | None,
    queue: str,
    reason: str = "rejected",
    *,
    exchange: str = "",
    routing_key: str | None = None,
    now_ms: int = T0,
    expiration: str | None = None,
    drop_cc: bool = False,
) -> dict[str, Any]:
    return x_death_headers(
        headers,
        queue=queue,
        reason=reason,
        exchange=exchange,
        routing_keys=death_routing_keys(queue if routing_key is None else routing_key, headers),
        now_ms=now_ms,
        original_expiration=expiration,
        drop_cc=drop_cc,
    )


def order(headers: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(d["queue"], d["reason"], d["count"]) for d in headers["x-death"]]


# ---- first and repeated deaths ---------------------------------------------------------------


def test_first_death_headers_exactly() -> None:
    published = {"user": "u", "CC": ["kcc"]}
    headers = die(published, "A", exchange="src", routing_key="k1", now_ms=T0, expiration="600000")
    assert list(headers) == [
        "CC",
        "user",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    ]
    assert headers["x-first-death-exchange"] == "src"
    assert headers["x-first-death-queue"] == "A"
    assert headers["x-first-death-reason"] == "rejected"
    assert headers["CC"] == ["kcc"]
    (entry,) = headers["x-death"]
    assert list(entry.items()) == [
        ("count", 1),
        ("reason", "rejected"),
        ("queue", "A"),
        ("time", ts(T0)),
        ("exchange", "src"),
        ("routing-keys", ["k1", "kcc"]),
        ("original-expiration", "600000"),
    ]
    assert entry["time"] == datetime.datetime(2026, 11, 24, 10, 23, 23, tzinfo=datetime.UTC)
    assert published == {"user": "u", "CC": ["kcc"]}  # not mutated


def test_repeated_deaths_between_two_queues() -> None:
    # A (dlx "dlx", no key) -> B (dlx "", key "A") -> A -> B -> A, all by rejection.
    first = die(
        {"user": "u", "CC": ["kcc"]},
        "A",
        exchange="src",
        routing_key="k1",
        now_ms=T0,
        expiration="600000",
    )
    second = die(first, "B", exchange="dlx", routing_key="k1", now_ms=T0 + 3000, drop_cc=True)
    assert "CC" not in second
    assert list(second) == [
        "user",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    ]
    new, old = second["x-death"]
    # A table added to an existing x-death is written sorted by key.
    assert list(new.items()) == [
        ("count", 1),
        ("exchange", "dlx"),
        ("queue", "B"),
        ("reason", "rejected"),
        ("routing-keys", ["k1", "kcc"]),  # CC is recorded, then dropped
        ("time", ts(T0 + 3000)),
    ]
    assert old == first["x-death"][0]
    assert list(old) == list(first["x-death"][0])  # untouched, unsorted

    third = die(second, "A", exchange="dlx", routing_key="A", now_ms=T0 + 9000)
    again, b = third["x-death"]
    # Count +1, moved to the front, sorted; time, exchange and keys stay the first ones.
    assert list(again.items()) == [
        ("count", 2),
        ("exchange", "src"),
        ("original-expiration", "600000"),
        ("queue", "A"),
        ("reason", "rejected"),
        ("routing-keys", ["k1", "kcc"]),
        ("time", ts(T0)),
    ]
    assert b == new
    fourth = die(third, "B", exchange="", routing_key="A", now_ms=T0 + 12000)
    assert order(fourth) == [("B", "rejected", 2), ("A", "rejected", 2)]
    assert fourth["x-death"][0]["time"] == ts(T0 + 3000)
    for headers in (second, third, fourth):
        assert headers["x-first-death-exchange"] == "src"
        assert headers["x-first-death-queue"] == "A"
        assert headers["x-first-death-reason"] == "rejected"


def test_three_queue_loop_keeps_rabbitmq_310_order() -> None:
    # Observed on 3.10: A -> B -> C -> A ... by rejection. Behind the front table, the older
    # ones come out reversed each time there were two or more.
    expected = [
        [("A", 1)],
        [("B", 1), ("A", 1)],
        [("C", 1), ("A", 1), ("B", 1)],
        [("A", 2), ("B", 1), ("C", 1)],
        [("B", 2), ("C", 1), ("A", 2)],
        [("C", 2), ("A", 2), ("B", 2)],
    ]
    headers: dict[str, Any] | None = None
    for step, queue in enumerate("ABCABC"):
        headers = die(headers, queue, now_ms=T0 + step * 1000)
        assert [(q, n) for q, _, n in order(headers)] == expected[step]


def test_reasons_and_original_expiration() -> None:
    expired = die({"h": 1}, "E", "expired", expiration="100")
    assert list(expired["x-death"][0].items()) == [
        ("count", 1),
        ("reason", "expired"),
        ("queue", "E"),
        ("time", ts(T0)),
        ("exchange", ""),
        ("routing-keys", ["E"]),
        ("original-expiration", "100"),
    ]
    assert expired["h"] == 1
    queue_ttl = die(None, "T", "expired")
    assert "original-expiration" not in queue_ttl["x-death"][0]
    assert queue_ttl["x-first-death-reason"] == "expired"
    assert die(None, "M", "maxlen")["x-death"][0]["reason"] == "maxlen"
    limit = die(None, "QQ", "delivery_limit")
    assert limit["x-first-death-reason"] == "delivery_limit"
    with pytest.raises(ValueError, match="unknown dead-letter reason"):
        die(None, "Q", "nope")


def test_same_queue_different_reasons_are_separate_tables() -> None:
    headers = die(None, "Q", "expired")
    headers = die(headers, "Q", "rejected")
    headers = die(headers, "Q", "expired")
    assert order(headers) == [("Q", "expired", 2), ("Q", "rejected", 1)]


def test_time_is_whole_seconds() -> None:
    assert amqp_timestamp(1999) == datetime.datetime(1970, 1, 1, 0, 0, 1, tzinfo=datetime.UTC)


# ---- headers a client wrote -------------------------------------------------------------------


def test_x_death_that_is_not_an_array_is_reset_without_first_death_headers() -> None:
    headers = die({"x-death": "junk", "a": 1}, "R", routing_key="R")
    assert list(headers) == ["a", "x-death"]
    assert order(headers) == [("R", "rejected", 1)]
    assert list(headers["x-death"][0]) == [
        "count",
        "reason",
        "queue",
        "time",
        "exchange",
        "routing-keys",
    ]


def test_first_death_headers_are_overwritten_when_there_is_no_x_death() -> None:
    headers = die({"x-first-death-queue": "fake", "zz": "z"}, "R")
    assert headers["x-first-death-queue"] == "R"
    assert list(headers)[-1] == "zz"


def test_first_death_headers_are_never_added_later() -> None:
    headers = die({"x-death": [{"queue": "Z", "reason": "expired", "count": 1}]}, "R")
    assert not any(key.startswith("x-first-death") for key in headers)


def test_duplicate_tables_are_merged_and_counted() -> None:
    old = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    headers = die(
        {
            "x-death": [
                {"queue": "R", "reason": "rejected", "time": old, "note": "first"},
                {"queue": "other", "reason": "expired", "count": 5},
                {"queue": "R", "reason": "rejected", "note": "second"},
            ]
        },
        "R",
    )
    assert headers["x-death"] == [
        {"count": 3, "note": "first", "queue": "R", "reason": "rejected", "time": old},
        {"queue": "other", "reason": "expired", "count": 5},
    ]
    assert list(headers["x-death"][1]) == ["queue", "reason", "count"]  # untouched
    headers = die(
        {
            "x-death": [
                {"queue": "Z", "reason": "expired"},
                {"queue": "Z", "reason": "expired"},
                {"queue": "R", "reason": "rejected", "count": 7, "exchange": "old"},
            ]
        },
        "R",
    )
    assert headers["x-death"] == [
        {"count": 8, "exchange": "old", "queue": "R", "reason": "rejected"},
        {"count": 2, "queue": "Z", "reason": "expired"},
    ]


def test_older_tables_come_out_reversed_as_in_310() -> None:
    deaths = [{"queue": q, "reason": "expired", "count": 1} for q in "CBA"]
    headers = die({"x-death": deaths}, "R")
    assert order(headers) == [("R", "rejected", 1)] + [(q, "expired", 1) for q in "ABC"]
    deaths.insert(2, {"queue": "R", "reason": "rejected", "count": 1})
    headers = die({"x-death": deaths}, "R")
    assert order(headers) == [("R", "rejected", 2)] + [(q, "expired", 1) for q in "ABC"]
    # A single table without a count is counted from 1.
    headers = die({"x-death": [{"queue": "R", "reason": "rejected"}]}, "R")
    assert headers["x-death"] == [{"count": 1, "queue": "R", "reason": "rejected"}]


def test_items_that_are_not_tables_are_kept() -> None:
    headers = die({"x-death": ["str", {"queue": "Z", "reason": "maxlen", "count": 1}]}, "R")
    assert headers["x-death"][0]["queue"] == "R"
    assert sorted(map(str, headers["x-death"][1:])) == sorted(
        ["str", str({"queue": "Z", "reason": "maxlen", "count": 1})]
    )


def test_input_is_not_mutated() -> None:
    headers = die(die(None, "A"), "B", "expired")
    snapshot = copy.deepcopy(headers)
    die(headers, "A")
    die(headers, "B", "expired")
    assert headers == snapshot


# ---- routing ---------------------------------------------------------------------------------


def test_dead_letter_target() -> None:
    assert dead_letter_target({}, "rk") is None
    assert dead_letter_target({"x-message-ttl": 5}, "rk") is None
    assert dead_letter_target({"x-dead-letter-exchange": "dlx"}, "rk") == ("dlx", "rk")
    target = dead_letter_target(
        {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "other"}, "rk"
    )
    assert target == DeadLetterTarget(exchange="", routing_key="other")
    assert not routing_key_replaced({"x-dead-letter-exchange": "dlx"})
    assert routing_key_replaced({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "k"})


def test_death_routing_keys() -> None:
    assert death_routing_keys("k1", None) == ["k1"]
    assert death_routing_keys("k1", {"CC": ["a", "b"], "BCC": ["c"]}) == ["k1", "a", "b"]
    assert death_routing_keys("R", {"CC": ["R", 5]}) == ["R", "R"]
    assert death_routing_keys("k1", {"CC": "a"}) == ["k1"]


# ---- cycles ----------------------------------------------------------------------------------


def test_a_queue_expiring_into_itself_drops_the_message() -> None:
    headers = die(None, "S", "expired")
    assert is_death_cycle("S", headers)
    assert drops_as_cycle("expired", "S", headers)
    assert not drops_as_cycle("expired", "other", headers)


def test_two_queues_expiring_into_each_other_drop_it_back_at_the_first() -> None:
    headers = die(None, "X", "expired")
    assert not drops_as_cycle("expired", "Y", headers)
    headers = die(headers, "Y", "expired")
    assert drops_as_cycle("expired", "X", headers)


def test_maxlen_cycles_count_like_expiry() -> None:
    headers = die(die(None, "X", "maxlen"), "Y", "expired")
    assert drops_as_cycle("expired", "X", headers)


def test_a_rejection_never_drops_and_breaks_the_cycle() -> None:
    headers = die(None, "S2", "rejected")
    assert not drops_as_cycle("rejected", "S2", headers)
    assert not is_death_cycle("S2", headers)
    # rejected in T1, expired in T2 and T3, back to T1: the rejection is in the cycle.
    headers = die(None, "T1", "rejected")
    headers = die(headers, "T2", "expired")
    headers = die(headers, "T3", "expired")
    assert not drops_as_cycle("expired", "T1", headers)
    assert order(headers) == [("T3", "expired", 1), ("T1", "rejected", 1), ("T2", "expired", 1)]


def test_second_round_of_a_mixed_cycle_drops_it_as_310_does() -> None:
    # Observed: T1 (rejected) -> T2 (ttl) -> T3 (ttl) -> T1; a second round never reaches T1
    # again: 3.10's reordering puts T3's death behind T2's before the T1 rejection.
    headers = die(None, "T1", "rejected")
    headers = die(headers, "T2", "expired")
    headers = die(headers, "T3", "expired")
    headers = die(headers, "T1", "rejected")
    assert not drops_as_cycle("expired", "T2", headers)
    headers = die(headers, "T2", "expired")
    assert order(headers) == [("T2", "expired", 2), ("T3", "expired", 1), ("T1", "rejected", 2)]
    assert drops_as_cycle("expired", "T3", headers)


def test_no_deaths_or_foreign_items_are_no_cycle() -> None:
    assert not is_death_cycle("Q", None)
    assert not is_death_cycle("Q", {})
    assert not is_death_cycle("Q", {"x-death": "junk"})
    assert not is_death_cycle("Q", {"x-death": ["junk", {"queue": "Q", "reason": "expired"}]})
    assert is_death_cycle(
        "Q", {"x-death": [{"queue": "P", "reason": "maxlen"}, {"queue": "Q", "reason": "expired"}]}
    )
    assert not is_death_cycle("Q", {"x-death": [{"queue": "Q", "reason": "rejected"}]})


def test_imports_no_protocol_or_io() -> None:
    code = (
        "import sys, node.broker.deadletter\n"
        "bad = [m for m in sys.modules if m.startswith(('node.protocol', 'pamqp', 'anyio',"
        " 'asyncio', 'socket', 'pysyncobj'))]\n"
        "print(','.join(bad))\n"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.strip() == ""
