"""Exchange types by name: the four built-in AMQP types, plus any extra plug-ins.

Rules: the registry is an immutable mapping built per broker (no module-level mutable
state), so several brokers in one process never share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from node.broker.direct import DIRECT
from node.broker.exchange_type import ExchangeType
from node.broker.fanout import FANOUT
from node.broker.headers import HEADERS
from node.broker.topic import TOPIC


def exchange_types(*extra: ExchangeType) -> Mapping[str, ExchangeType]:
    """direct, fanout, topic and headers, plus `extra` (an extra may replace a built-in)."""
    builtin: tuple[ExchangeType, ...] = (DIRECT, FANOUT, TOPIC, HEADERS)
    found: dict[str, ExchangeType] = {}
    for xtype in (*builtin, *extra):
        found[xtype.name] = xtype
    return MappingProxyType(found)
