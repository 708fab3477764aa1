"""cluster.placement: locator arguments, least-loaded choice (ties by name), the leader of
a new queue, and rebalance (every node ends with floor or ceil of the mean; only
overloaded nodes give queues away; queues of dead nodes are placed)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import placement
from cluster.placement import BALANCED, CLIENT_LOCAL

# ---- queue_locator ----------------------------------------------------------------------


@pytest.mark.parametrize("arg", placement.LOCATOR_ARGS)
@pytest.mark.parametrize(
    ("value", "locator"),
    [
        ("client-local", CLIENT_LOCAL),
        ("balanced", BALANCED),
        ("min-masters", BALANCED),
        ("random", BALANCED),
        (b"client-local", CLIENT_LOCAL),
        (b"min-masters", BALANCED),
    ],
)
def test_queue_locator_reads_either_argument(arg: str, value: object, locator: str) -> None:
    assert placement.queue_locator({arg: value}, CLIENT_LOCAL) == (locator, None)
    assert placement.queue_locator({arg: value}, BALANCED) == (locator, None)


@pytest.mark.parametrize("default", placement.LOCATORS)
def test_queue_locator_defaults(default: str) -> None:
    assert placement.queue_locator({}, default) == (default, None)
    assert placement.queue_locator({"x-other": "balanced"}, default) == (default, None)


def test_the_leader_locator_argument_wins_over_the_master_one() -> None:
    args = {"x-queue-master-locator": "client-local", "x-queue-leader-locator": "balanced"}
    assert placement.queue_locator(args, CLIENT_LOCAL) == (BALANCED, None)
    args = {"x-queue-leader-locator": "client-local", "x-queue-master-locator": "balanced"}
    assert placement.queue_locator(args, BALANCED) == (CLIENT_LOCAL, None)


@pytest.mark.parametrize("arg", placement.LOCATOR_ARGS)
@pytest.mark.parametrize("value", ["", "Balanced", "least-leaders", 1, True, 2.5, [], {}])
def test_invalid_locators_are_a_problem(arg: str, value: object) -> None:
    locator, problem = placement.queue_locator({arg: value}, CLIENT_LOCAL)
    assert locator == CLIENT_LOCAL
    assert problem is not None
    assert problem.startswith(f"invalid arg '{arg}'")
    assert repr(value) in problem
    assert "client-local, balanced" in problem


def test_invalid_utf8_locator_is_a_problem_not_an_exception() -> None:
    locator, problem = placement.queue_locator({"x-queue-leader-locator": b"\xff"}, BALANCED)
    assert locator == BALANCED
    assert problem is not None


def test_an_invalid_leader_locator_is_reported_even_with_a_valid_master_one() -> None:
    args = {"x-queue-leader-locator": "nope", "x-queue-master-locator": "balanced"}
    _, problem = placement.queue_locator(args, CLIENT_LOCAL)
    assert problem is not None
    assert "x-queue-leader-locator" in problem


def test_a_void_locator_argument_is_absent() -> None:
    args = {"x-queue-leader-locator": None, "x-queue-master-locator": "balanced"}
    assert placement.queue_locator(args, CLIENT_LOCAL) == (BALANCED, None)


# ---- least_loaded and choose ------------------------------------------------------------


def test_least_loaded() -> None:
    assert placement.least_loaded([], {"a": 0}) is None
    assert placement.least_loaded(["b", "a"], {}) == "a"
    assert placement.least_loaded(["a", "b", "c"], {"a": 2, "b": 1, "c": 1}) == "b"
    assert placement.least_loaded(["c", "b", "a"], {"a": 2, "b": 1, "c": 1}) == "b"
    assert placement.least_loaded(["a", "b"], {"a": 1}) == "b"  # missing counts as 0
    # Load of nodes that are not alive does not matter.
    assert placement.least_loaded(["b"], {"a": 0, "b": 9}) == "b"


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=3), st.integers(0, 5), min_size=1, max_size=6
    ).flatmap(lambda load: st.tuples(st.just(load), st.permutations(sorted(load))))
)
def test_least_loaded_is_the_minimum_by_load_then_name(
    case: tuple[dict[str, int], list[str]],
) -> None:
    load, alive = case
    chosen = placement.least_loaded(alive, load)
    assert chosen == min(alive, key=lambda n: (load[n], n))


def test_choose() -> None:
    load = {"a": 3, "b": 0, "c": 1}
    alive = ["a", "b", "c"]
    assert placement.choose(CLIENT_LOCAL, "a", alive, load) == "a"
    assert placement.choose(BALANCED, "a", alive, load) == "b"
    assert placement.choose(BALANCED, "b", alive, load) == "b"
    # The origin is always a candidate; one that is not alive keeps the queue itself
    # (SetLeader then falls back to the least loaded live node).
    assert placement.choose(BALANCED, "z", alive, load) == "z"
    assert placement.choose(BALANCED, "a", ["a"], load) == "a"
    assert placement.choose(BALANCED, "a", ["a", "c"], {"a": 1, "c": 1}) == "a"


# ---- rebalance --------------------------------------------------------------------------


def leaders_of(spec: dict[str, int]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for node, count in spec.items():
        out.extend(("/", f"{node}{i}", node) for i in range(count))
    return out


def apply_moves(
    leaders: list[tuple[str, str, str]], moves: list[tuple[str, str, str]]
) -> Counter[str]:
    where = {(v, q): n for v, q, n in leaders}
    for v, q, n in moves:
        where[(v, q)] = n
    return Counter(where.values())


def test_rebalance_nothing_to_do() -> None:
    assert placement.rebalance([], ["a", "b"]) == []
    assert placement.rebalance(leaders_of({"a": 1, "b": 1}), ["a", "b"]) == []
    assert placement.rebalance(leaders_of({"a": 2, "b": 1}), ["a", "b"]) == []
    assert placement.rebalance(leaders_of({"a": 2}), []) == []


def test_rebalance_moves_from_the_last_declared() -> None:
    leaders = leaders_of({"a": 4})
    moves = placement.rebalance(leaders, ["a", "b"])
    assert moves == [("/", "a3", "b"), ("/", "a2", "b")]


def test_rebalance_places_queues_of_dead_nodes() -> None:
    leaders = [("/", "q1", "dead"), ("/", "q2", "dead"), ("/", "q3", "a")]
    moves = placement.rebalance(leaders, ["a", "b"])
    counts = apply_moves(leaders, moves)
    assert sorted(counts.values()) == [1, 2]
    assert "dead" not in counts
    assert {q for _, q, _ in moves} == {"q1", "q2"}


def test_rebalance_places_unplaced_queues() -> None:
    leaders = [("/", "q1", ""), ("/", "q2", "a")]
    moves = placement.rebalance(leaders, ["a", "b"])
    assert moves == [("/", "q1", "b")]


def test_rebalance_gives_the_ceil_slots_to_the_most_loaded() -> None:
    # 5 queues on 2 nodes: a keeps 3 (it has them), b gets nothing new.
    assert placement.rebalance(leaders_of({"a": 3, "b": 2}), ["a", "b"]) == []
    moves = placement.rebalance(leaders_of({"a": 5, "b": 0, "c": 0}), ["a", "b", "c"])
    assert len(moves) == 3
    assert sorted(apply_moves(leaders_of({"a": 5}), moves).values()) == [1, 2, 2]


def test_rebalance_ignores_duplicate_alive_names_and_order() -> None:
    leaders = leaders_of({"a": 4, "b": 0})
    assert placement.rebalance(leaders, ["b", "a", "b"]) == placement.rebalance(leaders, ["a", "b"])


LOADS = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e", "dead", "gone"]),
    st.integers(0, 12),
    max_size=7,
)
ALIVE = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=5, unique=True)


@settings(max_examples=120, deadline=None)
@given(load=LOADS, alive=ALIVE, shuffle=st.randoms(use_true_random=False))
def test_rebalance_evens_out_with_few_moves(
    load: dict[str, int], alive: list[str], shuffle: random.Random
) -> None:
    leaders = leaders_of(load)
    shuffle.shuffle(leaders)
    moves = placement.rebalance(leaders, alive)
    before = Counter(n for _, _, n in leaders)
    after = apply_moves(leaders, moves)
    total = len(leaders)
    base, extra = divmod(total, len(alive))
    # Every queue ends on a live node, each with floor or ceil of the mean.
    assert set(after) <= set(alive)
    assert sum(after.values()) == total
    assert all(after[n] in (base, base + (1 if extra else 0)) for n in alive)
    assert sum(1 for n in alive if after[n] == base + 1) == extra
    # Each queue moves at most once, only to a live node.
    assert len({(v, q) for v, q, _ in moves}) == len(moves)
    assert all(n in alive for _, _, n in moves)
    # No move from a node that was not over its final count, none to a node that ends
    # above where it started unless it was under; homeless queues all move.
    old = {(v, q): n for v, q, n in leaders}
    for v, q, n in moves:
        source = old[(v, q)]
        assert source != n
        if source in alive:
            assert before[source] > after[source]
        assert before[n] < after[n]
    homeless = {(v, q) for v, q, n in leaders if n not in alive}
    assert homeless <= {(v, q) for v, q, _ in moves}
    # Minimal: exactly the surplus moves (queues over target plus homeless ones).
    surplus = sum(max(0, before[n] - after[n]) for n in alive) + len(homeless)
    assert len(moves) == surplus
    # Deterministic.
    assert placement.rebalance(leaders, list(reversed(alive))) == moves
