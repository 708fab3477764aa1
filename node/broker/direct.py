"""The direct exchange type: a binding matches when its key equals the routing key.

Rules: exact, case-sensitive string equality; no wildcards; arguments ignored for routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from node.broker.exchange_type import BindingSpec, KeyedTable
from node.broker.types import FieldTable


def _key(binding: BindingSpec) -> str:
    return binding.routing_key


class DirectTable(KeyedTable):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(_key)

    def route(self, routing_key: str, headers: FieldTable | None) -> Sequence[Any]:
        return self._by_key.get(routing_key, ())


class DirectType:
    name = "direct"

    def new_table(self) -> DirectTable:
        return DirectTable()

    def validate_binding(self, arguments: FieldTable) -> str | None:
        return None


DIRECT = DirectType()
