"""The headers exchange: a matrix observed on RabbitMQ 3.10, and binding validation."""

from __future__ import annotations

from typing import Any

import pytest

from node.broker.exchange_type import BindingSpec
from node.broker.headers import HEADERS, HeadersTable

BINDINGS: dict[str, dict[str, Any]] = {
    "all_empty": {"x-match": "all"},
    "noargs": {},
    "any_empty": {"x-match": "any"},
    "allx_empty": {"x-match": "all-with-x"},
    "a1": {"a": 1},
    "a1_any_b2": {"x-match": "any", "a": 1, "b": 2},
    "a1_all_b2": {"x-match": "all", "a": 1, "b": 2},
    "a_void": {"a": None},
    "xk_all": {"x-match": "all", "x-k": "v"},
    "xk_allx": {"x-match": "all-with-x", "x-k": "v"},
    "xk_anyx": {"x-match": "any-with-x", "x-k": "v", "a": 99},
    "xk_any": {"x-match": "any", "x-k": "v", "a": 99},
    "astr": {"a": "1"},
}
EVERYTHING = ["all_empty", "noargs", "allx_empty", "xk_all"]
OBSERVED: list[tuple[dict[str, Any] | None, list[str]]] = [
    (None, EVERYTHING),
    ({}, EVERYTHING),
    ({"a": 1}, [*EVERYTHING, "a1", "a1_any_b2", "a_void"]),
    ({"a": 1, "b": 2}, [*EVERYTHING, "a1", "a1_any_b2", "a1_all_b2", "a_void"]),
    ({"b": 2}, [*EVERYTHING, "a1_any_b2"]),
    ({"a": "1"}, [*EVERYTHING, "a_void", "astr"]),
    ({"a": None}, [*EVERYTHING, "a_void"]),
    ({"x-k": "v"}, [*EVERYTHING, "xk_allx", "xk_anyx"]),
    ({"x-k": "v", "a": 1}, [*EVERYTHING, "a1", "a1_any_b2", "a_void", "xk_allx", "xk_anyx"]),
    ({"a": 2}, [*EVERYTHING, "a_void"]),
    ({"a": True}, [*EVERYTHING, "a_void"]),
]


@pytest.fixture
def table() -> HeadersTable:
    t = HEADERS.new_table()
    for name, args in BINDINGS.items():
        t.add(BindingSpec("", args, name))
    return t


@pytest.mark.parametrize(("headers", "expected"), OBSERVED)
def test_matches_reference_broker(
    table: HeadersTable, headers: dict[str, Any] | None, expected: list[str]
) -> None:
    assert sorted(table.route("ignored", headers)) == sorted(expected)


def test_numbers_compare_by_value_not_width() -> None:
    t = HEADERS.new_table()
    t.add(BindingSpec("", {"n": 1}, "q"))
    assert list(t.route("", {"n": 1.0})) == ["q"]
    assert list(t.route("", {"n": True})) == []


def test_remove_takes_out_exactly_that_binding() -> None:
    t = HEADERS.new_table()
    one = BindingSpec("", {"a": 1}, "q")
    true = BindingSpec("", {"a": True}, "q")
    t.add(one)
    t.add(true)
    t.remove(true)
    assert list(t.route("", {"a": 1})) == ["q"]
    assert list(t.route("", {"a": True})) == []
    t.remove(one)
    assert list(t.route("", {"a": 1})) == []


def test_validation() -> None:
    assert HEADERS.validate_binding({}) is None
    assert HEADERS.validate_binding({"x-match": "any-with-x"}) is None
    assert HEADERS.validate_binding({"x-match": "foo"}) == (
        'PRECONDITION_FAILED - Invalid x-match field value <<"foo">>; expected all, any, '
        "all-with-x, or any-with-x"
    )
    assert HEADERS.validate_binding({"x-match": 5}) == (
        "PRECONDITION_FAILED - Invalid x-match field type signedint (value 5); expected longstr"
    )
