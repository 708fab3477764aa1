"""reply_to_of / with_reply_to against pamqp's property codec."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic

from node.protocol.codec import decode_properties, encode_properties
from node.protocol.properties import reply_to_of, with_reply_to

text = st.text(min_size=1, max_size=30)
maybe = st.none() | text


@settings(max_examples=300)
@given(
    content_type=maybe,
    correlation_id=maybe,
    reply_to=maybe,
    message_id=maybe,
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    app_id=maybe,
    headers=st.none() | st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 9)),
    new=text,
)
def test_reply_to_is_read_and_replaced_leaving_the_rest(
    content_type: str | None,
    correlation_id: str | None,
    reply_to: str | None,
    message_id: str | None,
    delivery_mode: int | None,
    app_id: str | None,
    headers: dict[str, int] | None,
    new: str,
) -> None:
    props = Basic.Properties(
        content_type=content_type,
        correlation_id=correlation_id,
        reply_to=reply_to,
        message_id=message_id,
        delivery_mode=delivery_mode,
        app_id=app_id,
        headers=headers or None,
    )
    raw = encode_properties(props)
    assert reply_to_of(raw) == reply_to
    out = decode_properties(with_reply_to(raw, new))
    assert out.reply_to == new
    for name in ("content_type", "correlation_id", "message_id", "delivery_mode", "app_id"):
        assert getattr(out, name) == getattr(props, name)
    assert (out.headers or None) == (headers or None)


def test_empty_block() -> None:
    assert reply_to_of(b"\x00\x00") is None
    out = decode_properties(with_reply_to(b"\x00\x00", "amq.rabbitmq.reply-to.abc"))
    assert out.reply_to == "amq.rabbitmq.reply-to.abc"
