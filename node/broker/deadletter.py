"""Dead-lettering rules, as RabbitMQ 3.10 applies them: where a dead message goes, the
headers it carries there, and which dead-letter cycles drop it.

Rules:
- Pure functions of their arguments: no clock (`now_ms` is given), no I/O, no state. They
  never mutate the tables they are given; they return new ones.
- Headers are field tables as the codec decodes them (str keys, `datetime` timestamps,
  lists for arrays, dicts for tables). Integers are plain `int`: the property re-encoder
  injected into the model (`HeaderRewriter`, implemented by
  `node.protocol.properties.with_headers`) keeps the bytes of every value that did not
  change and writes new integers (x-death `count`) as signed 64-bit, as RabbitMQ does.
- What RabbitMQ 3.10 was seen to do is the specification (docs/dead-lettering.md has the
  observed tables): x-death is a list of tables, most recent first, one per
  (queue, reason); a recurring death increments that table's `count` and moves it to the
  front without refreshing its other fields; when there were two tables or more, the
  tables behind the front one come out in reverse order (a 3.10 quirk, kept); the
  headers table and every table RabbitMQ rewrites come out sorted by key;
  x-first-death-* are written only with the first x-death; there are no x-last-death-*
  headers (3.13 added them).
- Deliberate difference: an x-death array holding something other than tables makes
  RabbitMQ 3.10 lose the message (its dead-lettering crashes); here such items are kept
  where they are and the death is recorded as usual.
Imports only the standard library and node.broker.types. Never imports the protocol
package: the model is handed a `HeaderRewriter`.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from node.broker.types import FieldTable

Reason = Literal["rejected", "expired", "maxlen", "delivery_limit"]
REASONS: frozenset[str] = frozenset(("rejected", "expired", "maxlen", "delivery_limit"))

DLX_ARG = "x-dead-letter-exchange"
DLRK_ARG = "x-dead-letter-routing-key"
X_DEATH = "x-death"
FIRST_DEATH_REASON = "x-first-death-reason"
FIRST_DEATH_QUEUE = "x-first-death-queue"
FIRST_DEATH_EXCHANGE = "x-first-death-exchange"


class HeaderRewriter(Protocol):
    """Re-encodes a raw basic property block with its headers table replaced (None: no
    headers property) and, when asked, its expiration property removed. Everything else in
    the block keeps its bytes. `node.protocol.properties.with_headers` is the one we use."""

    def __call__(
        self, raw: bytes, headers: FieldTable | None, /, *, without_expiration: bool = False
    ) -> bytes: ...


class DeadLetterTarget(NamedTuple):
    """Where a queue sends its dead messages: the exchange to publish them to and the
    routing key to publish them with."""

    exchange: str
    routing_key: str


def dead_letter_target(queue_args: FieldTable, message_routing_key: str) -> DeadLetterTarget | None:
    """The queue's dead-letter exchange and the key to route with (x-dead-letter-routing-key,
    else the message's own routing key), or None when the queue has no dead-letter exchange
    (its dead messages are discarded). The exchange may not exist: then, as in RabbitMQ, the
    message is discarded too, which is for the caller to find out."""
    exchange = queue_args.get(DLX_ARG)
    if not isinstance(exchange, str):
        return None
    key = queue_args.get(DLRK_ARG)
    return DeadLetterTarget(exchange, key if isinstance(key, str) else message_routing_key)


def routing_key_replaced(queue_args: FieldTable) -> bool:
    """True when the queue sets x-dead-letter-routing-key: the dead message is then routed
    with that key alone and loses its CC header (`x_death_headers(drop_cc=True)`)."""
    return isinstance(queue_args.get(DLX_ARG), str) and isinstance(queue_args.get(DLRK_ARG), str)


def death_routing_keys(routing_key: str, headers: FieldTable | None) -> list[str]:
    """The x-death `routing-keys` RabbitMQ records: the key the message was published with,
    then its CC keys (BCC never reaches a queue: RabbitMQ strips it at publish)."""
    keys = [routing_key]
    if headers is not None:
        cc = headers.get("CC")
        if isinstance(cc, list):
            keys.extend(key for key in cc if isinstance(key, str))
    return keys


def amqp_timestamp(now_ms: int) -> datetime.datetime:
    """An AMQP timestamp (whole seconds, UTC) as the codec decodes one."""
    return datetime.datetime.fromtimestamp(now_ms // 1000, tz=datetime.UTC)


def x_death_headers(
    headers: FieldTable | None,
    *,
    queue: str,
    reason: str,
    exchange: str,
    routing_keys: Sequence[str],
    now_ms: int,
    original_expiration: str | None,
    drop_cc: bool = False,
) -> dict[str, Any]:
    """The headers a message carries once dead-lettered out of `queue` for `reason`.

    `exchange` and `routing_keys` describe how the message was last published (for a
    message that already died once: the dead-letter exchange and the keys it was
    dead-lettered with; see `death_routing_keys`); `original_expiration` is its expiration
    property, if it has one. `drop_cc` removes the CC header (when the queue sets
    x-dead-letter-routing-key). The result is sorted by key, as RabbitMQ sorts it."""
    if reason not in REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}")
    # A new death's table, in the order RabbitMQ writes it (count first, then unsorted).
    fresh: dict[str, Any] = {
        "count": 1,
        "reason": reason,
        "queue": queue,
        "time": amqp_timestamp(now_ms),
        "exchange": exchange,
        "routing-keys": list(routing_keys),
    }
    if original_expiration is not None:
        fresh["original-expiration"] = original_expiration
    result: dict[str, Any] = dict(headers) if headers is not None else {}
    deaths = result.get(X_DEATH)
    if X_DEATH not in result:
        result[FIRST_DEATH_REASON] = reason
        result[FIRST_DEATH_QUEUE] = queue
        result[FIRST_DEATH_EXCHANGE] = exchange
        result[X_DEATH] = [fresh]
    elif not isinstance(deaths, list):
        # Not an array (a client republished it with its own idea of x-death): reset it,
        # leaving the x-first-death-* headers as they are.
        result[X_DEATH] = [fresh]
    else:
        result[X_DEATH] = _record(deaths, queue, reason, fresh)
    if drop_cc:
        result.pop("CC", None)
    return _sorted(result)


def _record(deaths: list[Any], queue: str, reason: str, fresh: dict[str, Any]) -> list[Any]:
    """Record one more death in an x-death array: the (queue, reason) table, counted once
    more (or the fresh one), goes to the front; the others keep their content and follow
    in the order `_grouped` leaves them."""
    grouped = _grouped(deaths)
    match: Mapping[str, Any] | None = None
    others: list[Any] = []
    for item in grouped:
        if match is None and _is_death_of(item, queue, reason):
            match = item
        else:
            others.append(item)
    if match is None:
        front = _sorted(fresh)
    else:
        count = match.get("count")
        bumped = dict(match)
        bumped["count"] = count + 1 if isinstance(count, int) and not isinstance(count, bool) else 1
        front = _sorted(bumped)
    return [front, *others]


def _grouped(deaths: list[Any]) -> list[Any]:
    """Merge tables for the same (queue, reason), which messages dead-lettered by very old
    RabbitMQ versions (or rewritten by clients) may carry: the first one stays, and gets a
    count of how many there were if it has none. A single table is left as it is.

    Quirk kept from RabbitMQ 3.10 (observed, see docs/dead-lettering.md): whenever there
    are two tables or more, the merged list comes out in reverse order, so the older
    deaths behind the front one are not strictly most recent first."""
    if len(deaths) < 2:
        return list(deaths)
    kept: list[Any] = []
    seen: list[tuple[Any, Any]] = []
    for item in deaths:
        if not isinstance(item, Mapping):
            kept.append(item)
            continue
        key = (item.get("queue"), item.get("reason"))
        if key in seen:
            continue
        seen.append(key)
        if "count" in item:
            kept.append(item)
        else:
            same = sum(
                1
                for other in deaths
                if isinstance(other, Mapping) and (other.get("queue"), other.get("reason")) == key
            )
            kept.append({"count": same, **item})
    kept.reverse()
    return kept


def _is_death_of(item: Any, queue: str, reason: str) -> bool:
    return (
        isinstance(item, Mapping)
        and _is_str(item.get("queue"), queue)
        and _is_str(item.get("reason"), reason)
    )


def _is_str(value: Any, expected: str) -> bool:
    return isinstance(value, str) and value == expected


def _sorted(table: Mapping[str, Any]) -> dict[str, Any]:
    """A table sorted by key the way RabbitMQ sorts one (bytewise on the UTF-8 keys)."""
    return {key: table[key] for key in sorted(table, key=lambda k: k.encode("utf-8"))}


def is_death_cycle(queue: str, headers: FieldTable | None) -> bool:
    """True when delivering a dead message to `queue` would close a fully automatic cycle.

    `headers` are the message's headers with the current death already recorded
    (`x_death_headers`). Reading x-death in its order (most recent first, 3.10's reversal
    quirk aside) up to the first death in `queue`: it is a cycle when there is such a
    death and none of those deaths, that one included, is a rejection (a rejection means a
    client took part, so the loop may end). Anything in x-death that is not a table also
    counts as a client's hand."""
    if headers is None:
        return False
    deaths = headers.get(X_DEATH)
    if not isinstance(deaths, list):
        return False
    automatic = True
    for item in deaths:
        if not isinstance(item, Mapping):
            automatic = False
            continue
        if _is_str(item.get("reason"), "rejected"):
            automatic = False
        if _is_str(item.get("queue"), queue):
            return automatic
    return False


def drops_as_cycle(reason: str, queue: str, headers: FieldTable | None) -> bool:
    """Whether a message dead-lettered for `reason` must not be delivered to `queue`
    (RabbitMQ drops it there and logs the cycle once). A rejection never makes a cycle."""
    return reason != "rejected" and is_death_cycle(queue, headers)
