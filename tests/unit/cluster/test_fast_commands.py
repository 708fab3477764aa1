"""The hot path's fast constructors build exactly what the keyword constructors build."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from cluster import commands as cmd
from node.broker.types import ChannelRef, Properties, new_properties


def test_fast_constructors_cover_every_field() -> None:
    assert tuple(f.name for f in dataclasses.fields(cmd.Publish)) == cmd.PUBLISH_FIELDS
    assert tuple(f.name for f in dataclasses.fields(cmd.Ack)) == cmd.ACK_FIELDS
    assert tuple(f.name for f in dataclasses.fields(cmd.Persist)) == cmd.PERSIST_FIELDS
    assert tuple(f.name for f in dataclasses.fields(Properties)) == (
        "delivery_mode",
        "priority",
        "expiration",
        "headers",
    )


@given(
    now=st.integers(0, 2**63),
    tag=st.integers(1, 2**64 - 1),
    flag=st.booleans(),
    name=st.text(max_size=20),
    raw=st.binary(max_size=20),
    mode=st.integers(1, 2),
    priority=st.none() | st.integers(0, 255),
    expiration=st.none() | st.text(max_size=5),
    headers=st.none() | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
def test_fast_constructors_equal_keyword_ones(
    now: int,
    tag: int,
    flag: bool,
    name: str,
    raw: bytes,
    mode: int,
    priority: int | None,
    expiration: str | None,
    headers: dict[str, int] | None,
) -> None:
    ref = ChannelRef(3, 7)
    props = new_properties(mode, priority, expiration, headers)
    assert props == Properties(mode, priority, expiration, headers)
    fast = cmd.new_publish(now, ref, "/", name, name[::-1], flag, raw, props, raw * 2)
    slow = cmd.Publish(
        now_ms=now,
        channel=ref,
        vhost="/",
        exchange=name,
        routing_key=name[::-1],
        mandatory=flag,
        properties=raw,
        props=props,
        body=raw * 2,
    )
    assert fast == slow
    assert cmd.new_ack(now, ref, tag, flag) == cmd.Ack(
        now_ms=now, channel=ref, delivery_tag=tag, multiple=flag
    )
    assert cmd.new_persist(
        now, "/", name, name[::-1], name, raw, props, raw * 2, flag, tag
    ) == cmd.Persist(
        now_ms=now,
        vhost="/",
        queue=name,
        exchange=name[::-1],
        routing_key=name,
        properties=raw,
        props=props,
        body=raw * 2,
        redelivered=flag,
        delivery_count=tag,
    )
