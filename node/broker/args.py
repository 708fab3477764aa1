"""Optional arguments ("x-..." field tables): AMQP type names, equivalence and validation.

Rules (RabbitMQ 3.10, checked against the reference broker):
- Decoded field values have lost their wire type; we name them as pika and py-amqp encode
  them (int: 'signedint' when it fits 32 bits, else 'long'; str: 'longstr').
- Redeclaring compares only the arguments RabbitMQ compares (QUEUE_EQUIVALENT / EXCHANGE_
  EQUIVALENT), in that order; the others are ignored. Present on both sides: "received 'V'
  but current is 'V'"; missing on one side: "none" versus "the value 'V' of type 'T'".
- A new queue's arguments are validated; invalid ones are refused with RabbitMQ's texts.
  An existing queue's are not (RabbitMQ only checks equivalence then).
- Booleans are not numbers and strings are not bytes when values are compared.
- Queue types: classic and quorum are served (both with classic-queue semantics); a quorum
  queue refuses the classic-only arguments and, after the arguments, auto-delete,
  exclusive and non-durable (in that order) with RabbitMQ's "invalid property" texts;
  stream is refused with a 406 naming it. Unknown x- arguments are stored, never compared.
- Deliberate difference: x-delivery-limit is accepted on classic queues too (RabbitMQ only
  knows it for quorum queues); like RabbitMQ's quorum queues we do not validate it (a value
  that is not a non-negative integer means no limit).
Pure functions only; imports nothing from anyio, pysyncobj or sockets.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from node.broker.types import FieldTable

QUEUE_EQUIVALENT = (
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-master-locator",
    "x-queue-type",
    "x-delivery-limit",
)
QUEUE_DEFAULTS: Mapping[str, Any] = {"x-queue-type": "classic"}
EXCHANGE_EQUIVALENT = ("alternate-exchange",)

# Arguments RabbitMQ accepts only for other queue types (quorum, stream).
_NOT_FOR_CLASSIC = frozenset(
    {
        "x-max-in-memory-length",
        "x-max-in-memory-bytes",
        "x-quorum-initial-group-size",
        "x-dead-letter-strategy",
        "x-initial-cluster-size",
        "x-max-age",
        # x-queue-leader-locator: 3.10 refuses it on classic queues, current RabbitMQ and
        # Warren's cluster take it (cluster/placement.py).
        "x-stream-max-segment-size-bytes",
    }
)
# Arguments RabbitMQ 3.10 refuses for quorum queues (checked on the reference broker).
_NOT_FOR_QUORUM = frozenset(
    {
        "x-max-priority",
        "x-queue-mode",
        "x-queue-master-locator",
        "x-queue-version",
        "x-initial-cluster-size",
        "x-max-age",
        "x-stream-max-segment-size-bytes",
    }
)
OVERFLOW_MODES = frozenset({"drop-head", "reject-publish", "reject-publish-dlx"})
QUEUE_MODES = frozenset({"default", "lazy"})
# Queue types we serve (all with classic-queue semantics), and those we know but refuse.
QUEUE_TYPES = frozenset({"classic", "quorum"})
REFUSED_QUEUE_TYPES = frozenset({"stream"})
MAX_PRIORITY = 255

_INT32 = 2**31


def type_name(value: Any) -> str:
    """The AMQP field type RabbitMQ would name for a decoded value."""
    if value is None:
        return "void"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "signedint" if -_INT32 <= value < _INT32 else "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, Decimal):
        return "decimal"
    if isinstance(value, str | bytes | bytearray):
        return "longstr"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, datetime.datetime):
        return "timestamp"
    return type(value).__name__


def show(value: Any) -> str:
    """A value as RabbitMQ prints it inside quotes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def same_value(a: Any, b: Any) -> bool:
    """AMQP value equality: numbers by value, bool only with bool, str only with str."""
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except TypeError:
        return False


def freeze(value: Any) -> Any:
    """A hashable, type-tagged image of a field value (binding identity)."""
    if isinstance(value, Mapping):
        return ("T", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("A", tuple(freeze(v) for v in value))
    if isinstance(value, bytearray):
        return ("b", bytes(value))
    return (type_name(value), value)


def _describe(present: bool, value: Any) -> str:
    if not present:
        return "none"
    return f"the value '{show(value)}' of type '{type_name(value)}'"


def inequivalent(
    current: FieldTable,
    received: FieldTable,
    keys: tuple[str, ...],
    defaults: Mapping[str, Any] | None = None,
) -> tuple[str, str, str] | None:
    """(key, received text, current text) for the first argument that differs, else None."""
    for key in keys:
        cur_here = key in current
        new_here = key in received
        cur = current.get(key)
        new = received.get(key)
        if defaults and key in defaults and (cur_here or new_here):
            # A missing value equals the default, but is reported as missing (RabbitMQ:
            # {} vs classic is fine; {} vs quorum is "none" versus 'quorum').
            default = defaults[key]
            if same_value(cur if cur_here else default, new if new_here else default):
                continue
        if cur_here and new_here:
            if not same_value(cur, new):
                return key, f"'{show(new)}'", f"'{show(cur)}'"
        elif cur_here or new_here:
            return key, _describe(new_here, new), _describe(cur_here, cur)
    return None


# ---- validation of a new queue's arguments --------------------------------------------

_Check = Callable[[Any, FieldTable], str | None]


def _integer(minimum: int, *, zero_ok: bool = True, maximum: int | None = None) -> _Check:
    def check(value: Any, _: FieldTable) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f'"expected integer, got {_short_type(value)}"'
        if value < 0 and value < minimum:
            return f"{{value_negative,{value}}}"
        if value == 0 and not zero_ok:
            return f"{{value_zero,{value}}}"
        if maximum is not None and value > maximum:
            return f"{{max_value_exceeded,{value}}}"
        return None

    return check


def _short_type(value: Any) -> str:
    if isinstance(value, float):
        return "float"
    return type_name(value)


def _overflow(value: Any, _: FieldTable) -> str | None:
    if not isinstance(value, str):
        return f"{{unacceptable_type,{type_name(value)}}}"
    return None if value in OVERFLOW_MODES else "invalid_overflow"


def _queue_mode(value: Any, _: FieldTable) -> str | None:
    if not isinstance(value, str):
        return f"{{unacceptable_type,{type_name(value)}}}"
    return None if value in QUEUE_MODES else f"\"unsupported queue mode '{value}'\""


def _queue_type(value: Any, _: FieldTable) -> str | None:
    if not isinstance(value, str):
        return f"{{unacceptable_type,{type_name(value)}}}"
    if value in QUEUE_TYPES:
        return None
    if value in REFUSED_QUEUE_TYPES:
        return f"\"queue type '{value}' is not supported by Warren\""
    return f"\"unsupported queue type '{value}'\""


def _boolean(value: Any, _: FieldTable) -> str | None:
    return None if isinstance(value, bool) else f"{{unacceptable_type,{type_name(value)}}}"


def _dlx_routing_key(value: Any, arguments: FieldTable) -> str | None:
    return None if "x-dead-letter-exchange" in arguments else "routing_key_but_no_dlx_defined"


_QUEUE_CHECKS: Mapping[str, _Check] = {
    "x-expires": _integer(0, zero_ok=False),
    "x-message-ttl": _integer(0),
    "x-max-length": _integer(0),
    "x-max-length-bytes": _integer(0),
    "x-max-priority": _integer(0, maximum=MAX_PRIORITY),
    "x-overflow": _overflow,
    "x-queue-mode": _queue_mode,
    "x-queue-type": _queue_type,
    "x-single-active-consumer": _boolean,
    "x-dead-letter-routing-key": _dlx_routing_key,
}
_STRING_ARGS = ("x-dead-letter-exchange", "x-dead-letter-routing-key")


def invalid_queue_args(arguments: FieldTable, queue: str, vhost: str) -> str | None:
    """RabbitMQ's PRECONDITION_FAILED text for the first invalid argument, else None."""
    for key in _STRING_ARGS:
        if key in arguments and not isinstance(arguments[key], str):
            return (
                f"PRECONDITION_FAILED - invalid type '{type_name(arguments[key])}' for arg "
                f"'{key}' in queue '{queue}' in vhost '{vhost}'"
            )
    quorum = arguments.get("x-queue-type") == "quorum"
    refused, type_module = (
        (_NOT_FOR_QUORUM, "rabbit_quorum_queue") if quorum else (_NOT_FOR_CLASSIC, None)
    )
    for key, value in arguments.items():
        if key in refused:
            return (
                f"PRECONDITION_FAILED - invalid arg '{key}' for queue '{queue}' in vhost "
                f"'{vhost}' of queue type {type_module or 'rabbit_classic_queue'}"
            )
        check = _QUEUE_CHECKS.get(key)
        detail = check(value, arguments) if check is not None else None
        if detail is not None:
            return (
                f"PRECONDITION_FAILED - invalid arg '{key}' for queue '{queue}' in vhost "
                f"'{vhost}': {detail}"
            )
    return None


def invalid_exchange_args(arguments: FieldTable, exchange: str, vhost: str) -> str | None:
    """RabbitMQ's PRECONDITION_FAILED text for a new exchange's invalid argument, else None."""
    value = arguments.get("alternate-exchange")
    if "alternate-exchange" in arguments and not isinstance(value, str):
        return (
            f"PRECONDITION_FAILED - invalid type '{type_name(value)}' for arg "
            f"'alternate-exchange' in exchange '{exchange}' in vhost '{vhost}'"
        )
    return None


def invalid_queue_properties(
    arguments: FieldTable,
    queue: str,
    vhost: str,
    *,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
) -> str | None:
    """RabbitMQ's PRECONDITION_FAILED text for a quorum queue declared auto-delete,
    exclusive or non-durable (checked in that order, after the arguments), else None."""
    if arguments.get("x-queue-type") != "quorum":
        return None
    if auto_delete:
        bad = "auto-delete"
    elif exclusive:
        bad = "exclusive-owner"
    elif not durable:
        bad = "non-durable"
    else:
        return None
    return f"PRECONDITION_FAILED - invalid property '{bad}' for queue '{queue}' in vhost '{vhost}'"


def delivery_limit(arguments: FieldTable) -> int | None:
    """x-delivery-limit when it is a non-negative integer, else None (no limit)."""
    value = int_arg(arguments, "x-delivery-limit")
    return value if value is not None and value >= 0 else None


def consumer_priority(arguments: FieldTable) -> tuple[int, str | None]:
    """The x-priority consumer argument (default 0), or the error detail for a bad one."""
    value = arguments.get("x-priority", 0)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0, f'"expected integer, got {_short_type(value)}"'
    return value, None


def int_arg(arguments: FieldTable, key: str) -> int | None:
    """An integer argument already validated at declare time, or None when absent."""
    value = arguments.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


# ---- the expiration property -----------------------------------------------------------

# RabbitMQ refuses per-message TTLs above ten years.
MAX_EXPIRATION_MS = 315_360_000_000
_LEADING_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_expiration(text: str | None) -> tuple[int | None, str | None]:
    """(TTL in ms or None, None) for a valid expiration property, else (None, the error
    detail RabbitMQ prints after "invalid expiration '...': ")."""
    if text is None:
        return None, None  # absent ('' is present, and refused like RabbitMQ: no_integer)
    found = _LEADING_INTEGER.match(text)
    if found is None:
        return None, "no_integer"
    rest = text[found.end() :]
    if rest:
        return None, f'{{leftover_string,"{rest}"}}'
    value = int(found.group())
    if value < 0:
        return None, f"{{value_negative,{value}}}"
    if value > MAX_EXPIRATION_MS:
        return None, f"{{value_too_large,{value}}}"
    return value, None
