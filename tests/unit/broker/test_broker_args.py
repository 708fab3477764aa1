"""Argument type names, equivalence and freezing."""

from __future__ import annotations

import datetime
from decimal import Decimal

import pytest

from node.broker import args


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "void"),
        (True, "bool"),
        (10, "signedint"),
        (-(2**31), "signedint"),
        (2**31, "long"),
        (1.5, "double"),
        (Decimal("1.5"), "decimal"),
        ("s", "longstr"),
        (b"s", "longstr"),
        ({"a": 1}, "table"),
        ([1], "array"),
        (datetime.datetime(2024, 1, 1), "timestamp"),
    ],
)
def test_type_names(value: object, name: str) -> None:
    assert args.type_name(value) == name


def test_inequivalent_forms() -> None:
    keys = ("x-a", "x-b")
    assert args.inequivalent({"x-a": 1}, {"x-a": 1}, keys) is None
    assert args.inequivalent({"x-a": 1}, {"x-a": 2}, keys) == ("x-a", "'2'", "'1'")
    assert args.inequivalent({}, {"x-b": "v"}, keys) == (
        "x-b",
        "the value 'v' of type 'longstr'",
        "none",
    )
    assert args.inequivalent({"x-b": True}, {}, keys) == (
        "x-b",
        "none",
        "the value 'true' of type 'bool'",
    )
    assert args.inequivalent({"other": 1}, {"other": 2}, keys) is None
    assert args.inequivalent({}, {"x-a": "d"}, keys, {"x-a": "d"}) is None


def test_freeze_distinguishes_types_and_is_hashable() -> None:
    assert args.freeze({"a": 1}) != args.freeze({"a": True})
    assert args.freeze({"a": [1, {"b": b"x"}]}) == args.freeze({"a": [1, {"b": b"x"}]})
    hash(args.freeze({"a": [1, {"b": bytearray(b"x")}]}))


def test_consumer_priority() -> None:
    assert args.consumer_priority({}) == (0, None)
    assert args.consumer_priority({"x-priority": -3}) == (-3, None)
    assert args.consumer_priority({"x-priority": "x"})[1] == '"expected integer, got longstr"'
