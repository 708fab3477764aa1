"""The management API's pure parts: RabbitMQ-shaped JSON builders, request parsing, the
peers' answer parser. No sockets."""

from __future__ import annotations

import base64
import datetime

import pytest
from pamqp import commands as spec

from node import mgmt_views as views
from node.broker.views import BindingView, QueueView
from node.mgmt_peers import parse_answer


def test_password_hash_is_rabbitmqs_sha256() -> None:
    # guest's hash as a real RabbitMQ 3.10 exported it: 4-byte salt, then sha256.
    exported = "MbBtE9V+iYFGpBfu54k3uHxMSxfg3DAg82+LvRM0ckcC1wdv"
    salt = base64.b64decode(exported)[:4]
    assert views.password_hash("guest", salt) == exported


def test_message_stats_sum_counters_under_rabbitmqs_names() -> None:
    counts = views.sum_counters(
        [
            {"received": 3, "delivered_get_auto_ack": 1, "delivered_consume_manual_ack": 2},
            {"received": 2, "acknowledged": 2, "unroutable_dropped": 1},
        ]
    )
    stats = views.message_stats(counts, {"received": 1.25})
    assert (stats["publish"], stats["publish_details"]) == (5, {"rate": 1.2})
    assert (stats["deliver"], stats["get_no_ack"], stats["deliver_get"]) == (2, 1, 3)
    assert (stats["ack"], stats["drop_unroutable"], stats["confirm"]) == (2, 1, 0)
    assert stats["ack_details"] == {"rate": 0.0}
    assert set(stats) >= {"redeliver", "redeliver_details", "return_unroutable", "get_empty"}


def test_basic_properties_as_rabbitmq_shows_them() -> None:
    assert views.basic_properties(spec.Basic.Properties()) == []
    props = spec.Basic.Properties(
        content_type="text/plain",
        headers={"b": b"raw", "n": 1},
        delivery_mode=2,
        message_type="kind",
        timestamp=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
    )
    assert views.basic_properties(props) == {
        "content_type": "text/plain",
        "headers": {"b": "raw", "n": 1},
        "delivery_mode": 2,
        "timestamp": 1704153600,
        "type": "kind",
    }


def test_payload_encoding_and_truncation() -> None:
    assert views.encode_payload(b"hello", "auto", None) == ("hello", "string")
    assert views.encode_payload(b"hello", "auto", 2) == ("he", "string")
    assert views.encode_payload(b"\xff", "auto", None) == ("/w==", "base64")
    assert views.encode_payload(b"hi", "base64", None) == ("aGk=", "base64")
    assert views.decode_payload("aGk=", "base64") == b"hi"
    with pytest.raises(views.BadRequest):
        views.decode_payload("!!", "base64")
    with pytest.raises(views.BadRequest):
        views.decode_payload("x", "rot13")


def test_publish_properties_are_checked() -> None:
    assert views.properties_arguments({"type": "t", "priority": 3}) == {
        "message_type": "t",
        "priority": 3,
    }
    assert views.properties_arguments([]) == {}
    for bad in ({"priority": 300}, {"nope": 1}, {"headers": []}, {"reply_to": 1}):
        with pytest.raises(views.BadRequest):
            views.properties_arguments(bad)


def test_queue_row_without_its_leaders_counts_is_down() -> None:
    view = QueueView("/", "q", True, False, False, None, {"x-queue-type": "quorum"}, 2, 1, 0, 30,
                     20, 10, "w2", None, 1_700_000_000_123)  # fmt: skip
    counts = views.queue_counts(view)
    assert (counts["messages"], counts["message_bytes_ready"], counts["idle_since"]) == (
        3,
        20,
        "2023-11-14T22:13:20.123+00:00",
    )
    up = views.queue_row(view, "w2", counts)
    assert (up["type"], up["node"], up["state"], up["messages_unacknowledged"]) == (
        "quorum",
        "w2",
        "running",
        1,
    )
    down = views.queue_row(view, "w2", None)
    assert down["state"] == "down"
    assert "messages" not in down


def test_binding_properties_key() -> None:
    assert views.properties_key("rk", {}) == "rk"
    assert views.properties_key("", {}) == "~"
    with_args = views.properties_key("rk", {"x-match": "any"})
    assert with_args.startswith("rk~")
    assert with_args == views.properties_key("rk", {"x-match": "any"})
    row = views.binding_row(BindingView("/", "x", "q", "queue", "rk", {}))
    assert row["properties_key"] == "rk"


def test_definitions_are_checked_and_defaulted() -> None:
    exchanges, queues, bindings = views.parse_definitions(
        {
            "exchanges": [{"name": "x", "vhost": "/", "type": "fanout"}],
            "queues": [{"name": "q", "vhost": "/"}],
            "bindings": [{"source": "x", "destination": "q", "vhost": "/"}],
        }
    )
    assert exchanges[0]["durable"] is True
    assert (queues[0]["durable"], queues[0]["arguments"]) == (True, {})
    assert (bindings[0]["destination_type"], bindings[0]["routing_key"]) == ("queue", "")
    for bad in ([], {"queues": [{"vhost": "/"}]}, {"queues": "q"},
                {"bindings": [{"source": "x", "destination": "q", "vhost": "/",
                               "destination_type": "topic"}]}):  # fmt: skip
        with pytest.raises(views.BadRequest):
            views.parse_definitions(bad)


def test_select_sorts_and_keeps_columns() -> None:
    rows = [{"name": "b", "n": 2, "q": {"name": "x", "v": 1}}, {"name": "a", "n": 10, "q": {}}]
    assert [r["name"] for r in views.select(rows, {"sort": "n"})] == ["b", "a"]
    assert [r["name"] for r in views.select(rows, {"sort": "name"})] == ["a", "b"]
    assert [r["name"] for r in views.select(rows, {"sort": "name", "sort_reverse": "true"})] == [
        "b",
        "a",
    ]
    assert views.select(rows, {"columns": "name,q.name"}) == [
        {"name": "b", "q": {"name": "x"}},
        {"name": "a"},
    ]


def test_peer_answers_parse() -> None:
    raw = b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{"a":1}'
    assert parse_answer(raw) == (200, {"a": 1})
    assert parse_answer(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, None)
    assert parse_answer(b"garbage") is None
    assert parse_answer(b"HTTP/1.1 200 OK\r\n\r\n<html>") is None
