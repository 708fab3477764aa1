"""The fanout exchange type: every binding matches every message.

Rules: routing key and arguments are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from node.broker.exchange_type import BindingSpec, KeyedTable
from node.broker.types import FieldTable


def _key(binding: BindingSpec) -> str:
    return ""


class FanoutTable(KeyedTable):
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(_key)

    def route(self, routing_key: str, headers: FieldTable | None) -> Sequence[Any]:
        return self._by_key.get("", ())


class FanoutType:
    name = "fanout"

    def new_table(self) -> FanoutTable:
        return FanoutTable()

    def validate_binding(self, arguments: FieldTable) -> str | None:
        return None


FANOUT = FanoutType()
