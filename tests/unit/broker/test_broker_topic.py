"""The topic matcher: RabbitMQ's edge cases, and a regex oracle under hypothesis."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.broker.exchange_type import BindingSpec
from node.broker.topic import CACHE_LIMIT, TopicTable, split_words


def table(*patterns: str) -> TopicTable:
    t = TopicTable()
    for p in patterns:
        t.add(BindingSpec(p, {}, p))
    return t


def matching(t: TopicTable, key: str) -> set[str]:
    return set(t.route(key, None))


# Observed on RabbitMQ 3.10 (patterns bound to a topic exchange, keys published to it).
PATTERNS = ["*", "#", "", "*.*", "#.#", "a.#", "#.a", ".", "*.", "a..b", "#.*"]
OBSERVED = {
    "": {"#", "", "#.#"},
    ".": {"#", "*.*", "#.#", ".", "*.", "#.*"},
    "a": {"*", "#", "#.#", "a.#", "#.a", "#.*"},
    "a.": {"#", "*.*", "#.#", "a.#", "*.", "#.*"},
    ".a": {"#", "*.*", "#.#", "#.a", "#.*"},
    "a..b": {"#", "#.#", "a.#", "a..b", "#.*"},
    "b": {"*", "#", "#.#", "#.*"},
}


@pytest.mark.parametrize("key", sorted(OBSERVED))
def test_matches_reference_broker(key: str) -> None:
    assert matching(table(*PATTERNS), key) == OBSERVED[key]


def test_split_words() -> None:
    assert split_words("") == []
    assert split_words(".") == ["", ""]
    assert split_words("a..b") == ["a", "", "b"]


def test_literal_wildcard_characters_in_the_key() -> None:
    t = table("*", "#", "a.*")
    assert matching(t, "*") == {"*", "#"}
    assert matching(t, "a.#") == {"#", "a.*"}


def test_many_hashes_stay_fast() -> None:
    t = table(".".join(["#"] * 30) + ".z")
    assert matching(t, ".".join(["a"] * 200)) == set()
    assert matching(t, ".".join(["a"] * 200) + ".z") == {".".join(["#"] * 30) + ".z"}


def test_same_destination_twice_and_removal() -> None:
    t = TopicTable()
    a1 = BindingSpec("a.*", {}, "q")
    a2 = BindingSpec("#", {}, "q")
    t.add(a1)
    t.add(a2)
    assert list(t.route("a.b", None)) == ["q", "q"]  # the broker deduplicates
    t.remove(a1)
    assert list(t.route("a.b", None)) == ["q"]
    t.remove(a2)
    assert list(t.route("a.b", None)) == []
    t.remove(a2)  # removing twice is harmless
    assert t._root.empty()


def test_cache_is_invalidated_and_bounded() -> None:
    t = table("a.*")
    assert matching(t, "a.b") == {"a.*"}
    t.add(BindingSpec("#.b", {}, "#.b"))
    assert matching(t, "a.b") == {"a.*", "#.b"}
    for i in range(CACHE_LIMIT + 10):
        t.route(f"k{i}", None)
    assert len(t._cache) <= CACHE_LIMIT


def oracle(pattern: str, key: str) -> bool:
    """Each key word is written as "." + word; "*" is one such unit, "#" any number."""
    parts = []
    for word in split_words(pattern):
        if word == "*":
            parts.append(r"\.[^.]*")
        elif word == "#":
            parts.append(r"(?:\.[^.]*)*")
        else:
            parts.append(r"\." + re.escape(word))
    subject = "".join("." + w for w in split_words(key))
    return re.fullmatch("".join(parts), subject) is not None


words = st.sampled_from(["a", "b", "", "*", "#", "ab"])
texts = st.lists(words, max_size=6).map(".".join)


@settings(max_examples=400, deadline=None)
@given(patterns=st.lists(texts, min_size=1, max_size=8, unique=True), key=texts)
def test_against_regex_oracle(patterns: list[str], key: str) -> None:
    assert matching(table(*patterns), key) == {p for p in patterns if oracle(p, key)}


@settings(max_examples=100, deadline=None)
@given(
    patterns=st.lists(texts, min_size=1, max_size=8, unique=True),
    removed=st.data(),
    key=texts,
)
def test_removal_against_regex_oracle(
    patterns: list[str], removed: st.DataObject, key: str
) -> None:
    t = table(*patterns)
    gone = removed.draw(st.sets(st.sampled_from(patterns)))
    for p in gone:
        t.remove(BindingSpec(p, {}, p))
    left = [p for p in patterns if p not in gone]
    assert matching(t, key) == {p for p in left if oracle(p, key)}
