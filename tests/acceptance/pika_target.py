"""pytest plugin that aims pika's own acceptance tests at the broker in PIKA_TARGET_URL.

pika's acceptance tests hard-code their broker: `localhost:5672` in the async tests,
`127.0.0.1:5672` in the blocking ones, some of them computed when the module is imported.
Rather than edit pika's files, `run_pika_acceptance.sh` loads this module with
`-p pika_target`, before any test module is imported, and it wraps the `host` and `port`
setters of `pika.connection.Parameters` (the base of ConnectionParameters and
URLParameters):

- port 5672 (pika's DEFAULT_PORT) becomes the target's port;
- host "localhost" becomes the target's host.

Every other value passes through untouched, so the TCP forwarders and refused-port sockets
that some tests open on ephemeral 127.0.0.1 ports keep working. The target host must be a
loopback address, because the blocking tests spell their broker as 127.0.0.1.

Rules: import nothing from Warren; change nothing but those two setters.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import pytest

PIKA_DEFAULT_PORT = 5672
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_TARGET_KEY = pytest.StashKey[str]()


def _target() -> tuple[str, int]:
    url = os.environ.get("PIKA_TARGET_URL", f"amqp://guest:guest@127.0.0.1:{PIKA_DEFAULT_PORT}/")
    parts = urlparse(url)
    host = parts.hostname or "127.0.0.1"
    if host not in LOOPBACK_HOSTS:
        raise pytest.UsageError(f"PIKA_TARGET_URL host must be loopback, got {host!r}")
    if (parts.username, parts.password) not in ((None, None), ("guest", "guest")):
        raise pytest.UsageError("pika's acceptance tests log in as guest/guest only")
    return host, parts.port or PIKA_DEFAULT_PORT


def pytest_configure(config: pytest.Config) -> None:
    import pika.connection  # type: ignore[import-untyped]

    host, port = _target()
    params = pika.connection.Parameters
    host_prop: property = params.host
    port_prop: property = params.port
    assert host_prop.fset is not None
    assert port_prop.fset is not None
    set_host, set_port = host_prop.fset, port_prop.fset

    def retarget_host(self: Any, value: str) -> None:
        set_host(self, host if value == "localhost" else value)

    def retarget_port(self: Any, value: int) -> None:
        set_port(self, port if value == PIKA_DEFAULT_PORT else value)

    params.host = host_prop.setter(retarget_host)
    params.port = port_prop.setter(retarget_port)
    config.stash[_TARGET_KEY] = f"{host}:{port}"


def pytest_report_header(config: pytest.Config) -> str:
    return f"pika acceptance target: {config.stash.get(_TARGET_KEY, '?')}"
