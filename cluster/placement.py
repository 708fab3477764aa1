"""Which node leads which queue: pure choices over names and counts.

Rules: deterministic (every replica computes the same answer from the same replicated
state, so ties break by node name), no I/O, no clock, no randomness. Imports nothing from
Warren but the broker's value types.

Locators, as RabbitMQ's `queue_leader_locator` / `x-queue-leader-locator`:
- `client-local`: the node the declaring client is connected to (RabbitMQ's default);
- `balanced`: the live node leading the fewest queues.
RabbitMQ 3.x's older names (`x-queue-master-locator`: `client-local`, `min-masters`,
`random`) are accepted too; `min-masters` and `random` mean `balanced` here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from node.broker.types import FieldTable

CLIENT_LOCAL = "client-local"
BALANCED = "balanced"
LOCATORS = (CLIENT_LOCAL, BALANCED)
LOCATOR_ARGS = ("x-queue-leader-locator", "x-queue-master-locator")
_ALIASES = {CLIENT_LOCAL: CLIENT_LOCAL, BALANCED: BALANCED, "min-masters": BALANCED,
            "random": BALANCED}  # fmt: skip


def queue_locator(arguments: FieldTable, default: str) -> tuple[str, str | None]:
    """(locator, problem): the locator a declare asks for, or the 406 text's reason."""
    for name in LOCATOR_ARGS:
        value = arguments.get(name)
        if value is None:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str) or value not in _ALIASES:
            return default, f"invalid arg '{name}': {value!r} is not one of {', '.join(LOCATORS)}"
        return _ALIASES[value], None
    return default, None


def least_loaded(alive: Iterable[str], load: Mapping[str, int]) -> str | None:
    """The live node leading the fewest queues (ties: the smallest name), None if none."""
    best: tuple[int, str] | None = None
    for node in alive:
        key = (load.get(node, 0), node)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def choose(locator: str, origin: str, alive: Sequence[str], load: Mapping[str, int]) -> str:
    """The leader of a new queue declared through `origin` (always a candidate)."""
    if locator == CLIENT_LOCAL or origin not in alive:
        return origin
    return least_loaded(alive, load) or origin


def rebalance(
    leaders: Sequence[tuple[str, str, str]], alive: Sequence[str]
) -> list[tuple[str, str, str]]:
    """Moves that spread `leaders` ((vhost, queue, leader) of the movable queues) evenly
    over `alive`: each node ends with floor or ceil of the mean. Returns (vhost, queue,
    new leader) for the queues to move, fewest moves first (queues of overloaded nodes
    move, from the last declared)."""
    nodes = sorted(set(alive))
    if not nodes:
        return []
    load = {node: 0 for node in nodes}
    owned: dict[str, list[tuple[str, str]]] = {node: [] for node in nodes}
    homeless: list[tuple[str, str]] = []
    for vhost, queue, leader in leaders:
        if leader in owned:
            owned[leader].append((vhost, queue))
            load[leader] += 1
        else:
            homeless.append((vhost, queue))
    total = len(leaders)
    base, extra = divmod(total, len(nodes))
    # The nodes already most loaded keep the `extra` ceil slots: fewer moves.
    ranked = sorted(nodes, key=lambda n: (-load[n], n))
    target = {node: base + (1 if i < extra else 0) for i, node in enumerate(ranked)}
    spare = list(homeless)
    for node in nodes:
        while load[node] > target[node]:
            spare.append(owned[node].pop())
            load[node] -= 1
    moves: list[tuple[str, str, str]] = []
    for node in nodes:
        while load[node] < target[node] and spare:
            vhost, queue = spare.pop(0)
            moves.append((vhost, queue, node))
            load[node] += 1
    return moves
