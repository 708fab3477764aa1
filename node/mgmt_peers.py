"""Asking the other members' management APIs: the cluster-wide half of the API.

Rules: each node knows only its own connections, channels, consumers and counters, and a
queue's counts live at its leader; a listing asked of any node is the union of what every
live member answers at its internal `/api/warren/local/...` endpoints. Members are asked
concurrently, each within PEER_TIMEOUT_S, with the caller's own Authorization header; a
member that is down, unreachable over the node link, without a management address, slow
or answering anything but 2xx JSON is left out (never a hang, never an exception). The
HTTP client is a minimal HTTP/1.1 one (one request per connection, Connection: close).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio

if TYPE_CHECKING:
    from node.server import BrokerNode

# A member's answer may take this long. It bounds how long a listing waits for a member
# that the node link still believes up but cannot answer (a silent partition): clients
# such as `warren ctl` and the tests give a whole listing a few seconds.
PEER_TIMEOUT_S = 1.0
# A member's answer larger than this is dropped (a listing of ~100k connections).
MAX_ANSWER_BYTES = 64 * 1024 * 1024
LOCAL_PREFIX = "/api/warren/local"


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    address: str  # "host:port" of its management API


def live_peers(node: BrokerNode) -> list[Peer]:
    """The other members that are alive, reachable over the node link, and have a
    management API."""
    cluster = node.cluster
    if cluster is None:
        return []
    return [
        Peer(m.name, m.management)
        for m in node.state.members.values()
        if m.name != cluster.name and m.alive and m.management and cluster.is_up(m.name)
    ]


def local_path(kind: str, *parts: str) -> str:
    return "/".join([LOCAL_PREFIX, kind, *(quote(p, safe="") for p in parts)])


async def request(
    peer: Peer,
    method: str,
    path: str,
    headers: Mapping[str, str],
) -> tuple[int, Any] | None:
    """(status, decoded JSON or None) of one request to `peer`, or None when it did not
    answer in time or not in HTTP."""
    host, _, port = peer.address.rpartition(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {peer.address}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items() if "\r" not in v and "\n" not in v]
    lines.append("Content-Length: 0")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    raw = bytearray()
    try:
        with anyio.fail_after(PEER_TIMEOUT_S):
            stream = await anyio.connect_tcp(host.strip("[]"), int(port))
            async with stream:
                await stream.send(data)
                while len(raw) <= MAX_ANSWER_BYTES:
                    try:
                        raw += await stream.receive()
                    except anyio.EndOfStream:
                        break
    except (OSError, TimeoutError, ValueError, anyio.BrokenResourceError):
        return None
    return parse_answer(bytes(raw))


def parse_answer(raw: bytes) -> tuple[int, Any] | None:
    """(status, JSON body or None) of a whole HTTP/1.1 answer; None if it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) < 2 or not status_line[1].isdigit():
        return None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            body = body[: int(value.strip())]
    try:
        decoded = json.loads(body) if body.strip() else None
    except (UnicodeDecodeError, ValueError):
        return None
    return int(status_line[1]), decoded


async def gather(
    peers: list[Peer], method: str, path: str, headers: Mapping[str, str]
) -> dict[str, tuple[int, Any]]:
    """Every peer's answer to the same request, concurrently, by peer name (the peers
    that did not answer are absent)."""
    answers: dict[str, tuple[int, Any]] = {}

    async def ask(peer: Peer) -> None:
        answer = await request(peer, method, path, headers)
        if answer is not None:
            answers[peer.name] = answer

    async with anyio.create_task_group() as tg:
        for peer in peers:
            tg.start_soon(ask, peer)
    return answers
