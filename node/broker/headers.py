"""The headers exchange type: bindings match on message headers, not the routing key.

Rules (RabbitMQ 3.10):
- "x-match" is "all" (the default), "any", "all-with-x" or "any-with-x"; anything else is
  refused at bind time with RabbitMQ's PRECONDITION_FAILED text.
- Binding keys starting with "x-" take no part in matching unless the mode ends in
  "-with-x"; "x-match" itself never does.
- "all" with no keys left matches every message; "any" with none matches nothing.
- A binding value of void (None) matches the key's presence, whatever its value.
- Values compare as AMQP values: numbers by value, booleans only with booleans, strings only
  with strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.broker.args import same_value, type_name
from node.broker.exchange_type import BindingSpec
from node.broker.types import FieldTable

MODES = {"all": (True, False), "any": (False, False), "all-with-x": (True, True),
         "any-with-x": (False, True)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Matcher:
    match_all: bool
    pairs: tuple[tuple[str, Any], ...]

    def matches(self, headers: FieldTable | None) -> bool:
        if not self.pairs:
            return self.match_all
        if not headers:
            return False
        if self.match_all:
            for key, want in self.pairs:
                if key not in headers:
                    return False
                if want is not None and not same_value(want, headers[key]):
                    return False
            return True
        for key, want in self.pairs:
            if key in headers and (want is None or same_value(want, headers[key])):
                return True
        return False


def compile_binding(arguments: FieldTable) -> _Matcher:
    mode = arguments.get("x-match", "all")
    match_all, with_x = MODES.get(mode, (True, False)) if isinstance(mode, str) else (True, False)
    pairs = tuple(
        (key, value)
        for key, value in arguments.items()
        if key != "x-match" and (with_x or not key.startswith("x-"))
    )
    return _Matcher(match_all, pairs)


class HeadersTable:
    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: list[tuple[_Matcher, Any, BindingSpec]] = []

    def add(self, binding: BindingSpec) -> None:
        entry = (compile_binding(binding.arguments), binding.destination, binding)
        self._entries.append(entry)

    def remove(self, binding: BindingSpec) -> None:
        """Removes the entry added with this very `binding` object (or an equal one)."""
        for i, (_, _, spec) in enumerate(self._entries):
            if spec is binding:
                del self._entries[i]
                return
        for i, (_, dest, spec) in enumerate(self._entries):
            if dest is binding.destination and spec == binding:
                del self._entries[i]
                return

    def route(self, routing_key: str, headers: FieldTable | None) -> Sequence[Any]:
        return [dest for matcher, dest, _ in self._entries if matcher.matches(headers)]


class HeadersType:
    name = "headers"

    def new_table(self) -> HeadersTable:
        return HeadersTable()

    def validate_binding(self, arguments: FieldTable) -> str | None:
        if "x-match" not in arguments:
            return None
        mode = arguments["x-match"]
        if not isinstance(mode, str):
            return (
                f"PRECONDITION_FAILED - Invalid x-match field type {type_name(mode)} "
                f"(value {mode}); expected longstr"
            )
        if mode not in MODES:
            return (
                f'PRECONDITION_FAILED - Invalid x-match field value <<"{mode}">>; '
                "expected all, any, all-with-x, or any-with-x"
            )
        return None


HEADERS = HeadersType()
