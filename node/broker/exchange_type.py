"""The exchange-type plug-in interface and the registry of built-in types.

Rules: an exchange type is a stateless object registered by name; all per-exchange routing
state lives in the `RoutingTable` it creates. A table stores opaque destinations (the model's
queue and exchange objects) and never inspects them. `route` is on the publish hot path: it
returns the table's own sequence (callers must not mutate it), may contain the same
destination several times (one per matching binding), and must be deterministic.
The broker never branches on a type's name: it looks the type up in `registry`.
This module imports nothing from anyio, pysyncobj or sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from node.broker.types import FieldTable


@dataclass(frozen=True, slots=True)
class BindingSpec:
    """What a routing table needs to know about one binding."""

    routing_key: str
    arguments: FieldTable
    destination: Any


class RoutingTable(Protocol):
    def add(self, binding: BindingSpec) -> None: ...

    def remove(self, binding: BindingSpec) -> None: ...

    def route(self, routing_key: str, headers: FieldTable | None) -> Sequence[Any]: ...


class ExchangeType(Protocol):
    name: str

    def new_table(self) -> RoutingTable: ...

    def validate_binding(self, arguments: FieldTable) -> str | None:
        """None if the binding arguments are acceptable, else the PRECONDITION_FAILED text."""
        ...


class KeyedTable:
    """Shared helper: one list of destinations per key, in binding order."""

    __slots__ = ("_by_key", "_key_of")

    def __init__(self, key_of: Callable[[BindingSpec], str]) -> None:
        self._by_key: dict[str, list[Any]] = {}
        self._key_of = key_of

    def add(self, binding: BindingSpec) -> None:
        self._by_key.setdefault(self._key_of(binding), []).append(binding.destination)

    def remove(self, binding: BindingSpec) -> None:
        key = self._key_of(binding)
        dests = self._by_key.get(key)
        if dests is None:
            return
        for i, dest in enumerate(dests):
            if dest is binding.destination:
                del dests[i]
                break
        if not dests:
            del self._by_key[key]

    def lookup(self, key: str) -> Sequence[Any]:
        return self._by_key.get(key, ())
