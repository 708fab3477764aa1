"""Users, passwords, vhosts and the loopback-only rule, as RabbitMQ enforces them.

RabbitMQ refuses a login with 403 ACCESS_REFUSED and the same text whether the user is
unknown, the password wrong, or a loopback-only user (guest) connects from elsewhere; an
unknown vhost is 530 NOT_ALLOWED after a successful login.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlparse

import pika
import pika.exceptions
import pytest

PLAIN_REFUSED = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
    "For details see the broker logfile."
)


def url_with(
    url: str, *, user: str, password: str, host: str | None = None, vhost: str = "/"
) -> str:
    parsed = urlparse(url)
    return (
        f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@"
        f"{host or parsed.hostname}:{parsed.port}/{quote(vhost, safe='')}"
    )


def round_trip(url: str) -> bytes:
    """Connect, publish to a private queue, get the message back; return its body."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.basic_publish("", queue, b"hello")
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        assert method is not None
        return body
    finally:
        conn.close()


def login_error(url: str) -> pika.exceptions.AMQPConnectionError:
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        pika.BlockingConnection(pika.URLParameters(url))
    return info.value


def assert_refused_403(url: str) -> None:
    error = login_error(url)
    assert isinstance(error, pika.exceptions.ProbableAuthenticationError)
    # pika wraps the broker's connection.close; its text names the code and the reason.
    (closed,) = error.args
    assert closed == f"ConnectionClosedByBroker: (403) {PLAIN_REFUSED!r}"


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than 127.x, or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for addr in out.stdout.split():
        if "." in addr and not addr.startswith("127."):
            return addr
    return None


def test_guest_from_loopback_is_accepted(broker_url: str) -> None:
    assert urlparse(broker_url).hostname == "127.0.0.1"
    assert round_trip(url_with(broker_url, user="guest", password="guest")) == b"hello"


def test_wrong_password_is_403(broker_url: str) -> None:
    assert_refused_403(url_with(broker_url, user="guest", password="guessed"))


def test_unknown_user_is_403(broker_url: str) -> None:
    assert_refused_403(url_with(broker_url, user="mallory", password="guest"))


def test_unknown_vhost_is_530(broker_url: str) -> None:
    error = login_error(url_with(broker_url, user="guest", password="guest", vhost="no-such"))
    assert isinstance(error, pika.exceptions.ProbableAccessDeniedError)
    (closed,) = error.args
    assert closed == "ConnectionClosedByBroker: (530) 'NOT_ALLOWED - vhost no-such not found'"


def test_configured_user_replaces_guest(start_node: Callable[..., Any]) -> None:
    node = start_node("--user", "alice", "--password", "s3cret")
    assert round_trip(url_with(node.url, user="alice", password="s3cret")) == b"hello"
    assert_refused_403(url_with(node.url, user="guest", password="guest"))
    assert_refused_403(url_with(node.url, user="alice", password="guest"))


def test_user_and_password_from_environment(
    start_node: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARREN_USER", "bob")
    monkeypatch.setenv("WARREN_PASSWORD", "hunter2")
    node = start_node()
    assert round_trip(url_with(node.url, user="bob", password="hunter2")) == b"hello"
    assert_refused_403(url_with(node.url, user="guest", password="guest"))


# --- the loopback-only rule ----------------------------------------------------------------
# The check uses this machine's own non-loopback address (the traffic never leaves the host):
# a client connecting to it is seen by the broker as coming from that address, not 127.0.0.1.


@pytest.fixture
def outside_address() -> str:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    return addr


def listening_everywhere(request: pytest.FixtureRequest, broker_url: str, *extra: str) -> str:
    """URL of a broker listening on all interfaces: the external one, or a new node."""
    if os.environ.get("WARREN_TEST_BROKER_URL"):
        if extra:
            pytest.skip("needs a Warren node started with its own options")
        return broker_url
    start_node = request.getfixturevalue("start_node")
    node = start_node("--host", "0.0.0.0", *extra)
    return str(node.url)


def test_guest_from_non_loopback_address_is_refused(
    request: pytest.FixtureRequest, broker_url: str, outside_address: str
) -> None:
    url = listening_everywhere(request, broker_url)
    assert_refused_403(url_with(url, user="guest", password="guest", host=outside_address))
    # ... while the same broker still takes guest over loopback.
    assert round_trip(url_with(url, user="guest", password="guest")) == b"hello"


def test_empty_loopback_users_lets_guest_in_from_anywhere(
    request: pytest.FixtureRequest, broker_url: str, outside_address: str
) -> None:
    url = listening_everywhere(request, broker_url, "--loopback-users", "")
    outside = url_with(url, user="guest", password="guest", host=outside_address)
    assert round_trip(outside) == b"hello"


def test_non_loopback_user_is_accepted_from_anywhere(
    request: pytest.FixtureRequest, broker_url: str, outside_address: str
) -> None:
    url = listening_everywhere(request, broker_url, "--user", "alice", "--password", "s3cret")
    outside = url_with(url, user="alice", password="s3cret", host=outside_address)
    assert round_trip(outside) == b"hello"
