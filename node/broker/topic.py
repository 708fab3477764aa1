"""The topic exchange type: dot-separated words, "*" matches one word, "#" zero or more.

Rules (RabbitMQ's, edge cases included):
- Keys and patterns split on "."; empty words are words ("a..b" has three); the empty key
  and the empty pattern have zero words, so "*" does not match "" but "#" does.
- A key word is compared literally: a key word "*" matches only a pattern word "*" by the
  wildcard rule, never a literal child.
- Patterns live in a trie; matching walks it once per (node, word index) pair, so any number
  of "#" stays polynomial. Results are cached per routing key until the next bind/unbind
  (bounded: the cache is dropped when it grows past CACHE_LIMIT keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from node.broker.exchange_type import BindingSpec
from node.broker.types import FieldTable

# Distinct routing keys remembered per topic exchange between two binding changes; past
# it the cache restarts empty (a publisher cycling through unique keys must not grow memory).
CACHE_LIMIT = 4096


def split_words(text: str) -> list[str]:
    """RabbitMQ's split: "" is zero words, otherwise every "."-separated piece."""
    return text.split(".") if text else []


class _Node:
    __slots__ = ("children", "dests", "hash", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.hash: _Node | None = None
        self.dests: list[Any] = []

    def empty(self) -> bool:
        return not (self.children or self.dests or self.star or self.hash)


def _child(node: _Node, word: str) -> _Node:
    if word == "*":
        if node.star is None:
            node.star = _Node()
        return node.star
    if word == "#":
        if node.hash is None:
            node.hash = _Node()
        return node.hash
    found = node.children.get(word)
    if found is None:
        found = node.children[word] = _Node()
    return found


class TopicTable:
    __slots__ = ("_cache", "_root")

    def __init__(self) -> None:
        self._root = _Node()
        self._cache: dict[str, tuple[Any, ...]] = {}

    def add(self, binding: BindingSpec) -> None:
        node = self._root
        for word in split_words(binding.routing_key):
            node = _child(node, word)
        node.dests.append(binding.destination)
        self._cache.clear()

    def remove(self, binding: BindingSpec) -> None:
        path: list[tuple[_Node, str]] = []
        node: _Node | None = self._root
        for word in split_words(binding.routing_key):
            assert node is not None
            path.append((node, word))
            if word == "*":
                node = node.star
            elif word == "#":
                node = node.hash
            else:
                node = node.children.get(word)
            if node is None:
                return
        assert node is not None
        for i, dest in enumerate(node.dests):
            if dest is binding.destination:
                del node.dests[i]
                break
        else:
            return
        self._cache.clear()
        # Prune the nodes this pattern leaves empty, deepest first.
        for parent, word in reversed(path):
            if not node.empty():
                break
            if word == "*":
                parent.star = None
            elif word == "#":
                parent.hash = None
            else:
                del parent.children[word]
            node = parent

    def route(self, routing_key: str, headers: FieldTable | None) -> Sequence[Any]:
        found = self._cache.get(routing_key)
        if found is None:
            found = tuple(match(self._root, split_words(routing_key)))
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[routing_key] = found
        return found


def match(root: _Node, words: list[str]) -> list[Any]:
    """Destinations of every pattern under `root` that matches `words`, in trie order."""
    out: list[Any] = []
    seen: set[tuple[int, int]] = set()
    last = len(words)

    def walk(node: _Node, i: int) -> None:
        key = (id(node), i)
        if key in seen:
            return
        seen.add(key)
        if i == last:
            out.extend(node.dests)
            if node.hash is not None:
                walk(node.hash, i)
            return
        child = node.children.get(words[i])
        if child is not None:
            walk(child, i + 1)
        if node.star is not None:
            walk(node.star, i + 1)
        if node.hash is not None:
            for j in range(i, last + 1):
                walk(node.hash, j)

    walk(root, 0)
    return out


class TopicType:
    name = "topic"

    def new_table(self) -> TopicTable:
        return TopicTable()

    def validate_binding(self, arguments: FieldTable) -> str | None:
        return None


TOPIC = TopicType()
