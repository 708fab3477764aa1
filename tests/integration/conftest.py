"""Integration fixtures: a real `warren node` process, or any broker named by an env var.

Set WARREN_TEST_BROKER_URL (e.g. amqp://guest:guest@127.0.0.1:5682/) to run the same tests
against another broker, such as RabbitMQ, for comparison. Tests that need a node started
with particular options use `start_node` and are skipped in that mode.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

EXTERNAL_URL = os.environ.get("WARREN_TEST_BROKER_URL")
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes] | None
    data_dir: Path | None
    log_path: Path | None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _start(tmp: Path, *extra: str) -> Node:
    port = free_port()
    data_dir = tmp / f"node-{port}"
    log_path = tmp / f"node-{port}.log"
    cmd = [
        sys.executable, "-m", "node.cli", "node",
        "--host", "127.0.0.1", "--port", str(port),
        "--name", f"test-{port}", "--data-dir", str(data_dir),
        "--management-port", "0", "--metrics-port", "0",
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    node = Node(port, proc, data_dir, log_path)
    try:
        wait_for_port(port, proc, STARTUP_TIMEOUT_S)
    except RuntimeError as exc:
        node.stop()
        raise RuntimeError(f"{exc}\n--- node log ---\n{node.log()}") from exc
    return node


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start a dedicated node with extra CLI options: start_node("--heartbeat", "2")."""
    if EXTERNAL_URL:
        pytest.skip("needs a Warren node started with its own options")
    nodes: list[Node] = []

    def start(*extra: str) -> Node:
        node = _start(tmp_path, *extra)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if EXTERNAL_URL:
        from urllib.parse import urlparse

        yield Node(urlparse(EXTERNAL_URL).port or 5672, None, None, None)
        return
    node = _start(tmp_path_factory.mktemp("shared"))
    yield node
    node.stop()


@pytest.fixture
def broker_url(shared_node: Node) -> str:
    """URL of a running broker shared by the session (tests must use unique names)."""
    return EXTERNAL_URL or shared_node.url


# --- pika helpers for the broker-semantics tests (exchanges, queues, basic, confirms, tx) ---


@dataclass
class PikaEnv:
    """Connections, unique names and clean-up for one test, against `broker_url`.

    Every exchange and queue declared through `exchange()` / `queue()` is deleted after the
    test (the shared node persists across tests); every connection opened is closed.
    """

    url: str
    connections: list[Any] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    _default: Any = None
    _declarer: Any = None

    def connect(self) -> Any:
        """A new pika BlockingConnection, closed after the test."""
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.connections.append(conn)
        return conn

    def channel(self, *, confirm: bool = False) -> Any:
        """A new channel on the test's default connection (optionally in confirm mode)."""
        if self._default is None or not self._default.is_open:
            self._default = self.connect()
        ch = self._default.channel()
        if confirm:
            ch.confirm_delivery()
        return ch

    def _declaring_channel(self) -> Any:
        if self._declarer is None or not self._declarer.is_open:
            self._declarer = self.channel()
        return self._declarer

    @staticmethod
    def name(prefix: str) -> str:
        """A name no other test uses: prefix-<16 hex digits>."""
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    def exchange(self, kind: str, prefix: str = "x", **kwargs: Any) -> str:
        """Declare a uniquely named exchange of type `kind`; returns its name."""
        name = self.name(f"{prefix}-{kind}")
        self._declaring_channel().exchange_declare(name, kind, **kwargs)
        self.exchanges.append(name)
        return name

    def queue(self, prefix: str = "q", **kwargs: Any) -> str:
        """Declare a uniquely named queue; returns its name."""
        name = self.name(prefix)
        self._declaring_channel().queue_declare(name, **kwargs)
        self.queues.append(name)
        return name

    @staticmethod
    def drain(ch: Any, queue: str, *, auto_ack: bool = True) -> list[bytes]:
        """Bodies of every message basic.get returns from `queue` until get-empty."""
        bodies: list[bytes] = []
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=auto_ack)
            if method is None:
                return bodies
            bodies.append(body)

    @staticmethod
    @contextlib.contextmanager
    def closes_channel(code: int, text: str) -> Iterator[None]:
        """Expect the block to end with the broker closing the channel with (code, text)."""
        import pika.exceptions

        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            yield
        assert (info.value.reply_code, info.value.reply_text) == (code, text)

    @staticmethod
    @contextlib.contextmanager
    def closes_connection(code: int, text: str) -> Iterator[None]:
        """Expect the block to end with the broker closing the connection with (code, text)."""
        import pika.exceptions

        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
            yield
        assert (info.value.reply_code, info.value.reply_text) == (code, text)

    def close(self) -> None:
        """Close every connection, then delete the declared queues and exchanges."""
        import pika
        import pika.exceptions

        for conn in self.connections:
            if conn.is_open:
                with contextlib.suppress(Exception):
                    conn.close()
        if not (self.exchanges or self.queues):
            return
        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.url))
        except pika.exceptions.AMQPError:
            return
        ch = None
        for kind, name in [("q", q) for q in self.queues] + [("x", x) for x in self.exchanges]:
            try:
                if ch is None or not ch.is_open:
                    ch = conn.channel()
                if kind == "q":
                    ch.queue_delete(name)
                else:
                    ch.exchange_delete(name)
            except pika.exceptions.AMQPError:
                if not conn.is_open:
                    return
        with contextlib.suppress(pika.exceptions.AMQPError):
            conn.close()


@pytest.fixture
def pika_env(broker_url: str) -> Iterator[PikaEnv]:
    """A PikaEnv on the test broker; cleans up its connections, exchanges and queues."""
    env = PikaEnv(broker_url)
    yield env
    env.close()


# --- raw AMQP sockets and CLI runs for the connection-level tests ---------------------------
# (test_connection.py, test_errors.py, test_cli.py, test_backpressure.py)

# Tests reach these through the fixture's objects (RawAmqp.BODY, client.encode_frame(...)),
# never by importing conftest.
AMQP_0091_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE


def encode_frame(kind: int, channel: int, payload: bytes, end: int = FRAME_END) -> bytes:
    """One frame as raw bytes; `end` lets a test send a bad frame-end octet."""
    import struct

    return struct.pack(">BHI", kind, channel, len(payload)) + payload + bytes([end])


@dataclass(frozen=True, slots=True)
class RawFrame:
    """A frame as it came off the wire (payload without the 7-byte header and end octet)."""

    kind: int
    channel: int
    payload: bytes

    @property
    def wire_size(self) -> int:
        return 7 + len(self.payload) + 1

    def decode(self) -> Any:
        """The pamqp object for this frame (method, content header, body or heartbeat)."""
        from pamqp import frame as pamqp_frame

        return pamqp_frame.unmarshal(encode_frame(self.kind, self.channel, self.payload))[2]


class RawAmqp:
    """A blocking AMQP 0-9-1 client on a bare socket, for what pika cannot or will not send.

    Frames are read with our own length-prefixed buffer (pamqp only decodes whole frames).
    A peer reset counts as end of stream: `recv_raw()` returns None once the socket is closed.
    """

    PROTOCOL_HEADER = AMQP_0091_HEADER
    METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8  # frame types
    encode_frame = staticmethod(encode_frame)

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_method(self, method: Any, channel: int = 0) -> None:
        """Send a pamqp method, content header or body object on `channel`."""
        from pamqp import frame as pamqp_frame

        self.send(pamqp_frame.marshal(method, channel))

    def _read(self, n: int, deadline: float) -> bytes | None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame within {self.timeout}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv_raw(self, timeout: float | None = None) -> RawFrame | None:
        """The next frame, or None when the server closed the socket; TimeoutError if none."""
        import struct

        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        head = self._read(7, deadline)
        if head is None:
            return None
        kind, channel, size = struct.unpack(">BHI", head)
        rest = self._read(size + 1, deadline)
        if rest is None:
            return None
        assert rest[-1] == FRAME_END, f"server sent frame end {rest[-1]:#x}"
        return RawFrame(kind, channel, rest[:-1])

    def recv(self, timeout: float | None = None, *, skip_heartbeats: bool = True) -> Any:
        """The next decoded frame (heartbeats skipped), or None when the socket closed."""
        while True:
            raw = self.recv_raw(timeout)
            if raw is None:
                return None
            if skip_heartbeats and raw.kind == self.HEARTBEAT:
                continue
            return raw.decode()

    def read_until_closed(self, timeout: float = 5.0) -> bytes:
        """Every byte until the server closes the socket (TimeoutError if it does not)."""
        deadline = time.monotonic() + timeout
        data, self._buf = self._buf, b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"socket still open after {timeout}s; got {data[:200]!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk

    def expect_connection_close(self, timeout: float | None = None, *, eof: bool = True) -> Any:
        """Wait for connection.close (skipping other frames), answer close-ok, wait for EOF.

        eof=False skips the wait: after a broken frame boundary the server cannot read our
        close-ok and only drops the socket after its close-ok timeout.
        """
        from pamqp import commands

        while True:
            frame = self.recv(timeout)
            assert frame is not None, "socket closed without connection.close"
            if isinstance(frame, commands.Connection.Close):
                self.send_method(commands.Connection.CloseOk())
                if eof:
                    assert self.read_until_closed() == b""
                return frame

    def handshake(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        *,
        mechanism: str = "PLAIN",
        channel_max: int | None = None,
        frame_max: int | None = None,
        heartbeat: int = 0,
    ) -> tuple[Any, Any, Any]:
        """Header, start-ok, tune-ok, open; returns (start, tune, reply to open).

        channel_max/frame_max default to the server's proposal; heartbeat defaults to off.
        The reply is None if the server closed the socket instead of answering.
        """
        from pamqp import commands, encode

        self.send(AMQP_0091_HEADER)
        start = self.recv()
        assert isinstance(start, commands.Connection.Start), start
        if mechanism == "AMQPLAIN":
            table = encode.field_table({"LOGIN": user, "PASSWORD": password})
            response = table[4:].decode()  # the table without its length prefix
        else:
            response = f"\0{user}\0{password}"
        self.send_method(
            commands.Connection.StartOk(
                client_properties={
                    "product": "warren-tests",
                    "capabilities": {"authentication_failure_close": True},
                },
                mechanism=mechanism,
                response=response,
            )
        )
        tune = self.recv()
        if not isinstance(tune, commands.Connection.Tune):
            return start, tune, None
        self.send_method(
            commands.Connection.TuneOk(
                channel_max=tune.channel_max if channel_max is None else channel_max,
                frame_max=tune.frame_max if frame_max is None else frame_max,
                heartbeat=heartbeat,
            )
        )
        self.send_method(commands.Connection.Open(virtual_host=vhost))
        return start, tune, self.recv()

    def open_channel(self, channel: int) -> None:
        from pamqp import commands

        self.send_method(commands.Channel.Open(), channel)
        reply = self.recv()
        assert isinstance(reply, commands.Channel.OpenOk), reply


@pytest.fixture
def raw_amqp(broker_url: str) -> Iterator[Callable[..., RawAmqp]]:
    """Factory of RawAmqp sockets: raw_amqp() to the test broker, raw_amqp(url) elsewhere."""
    from urllib.parse import urlparse

    opened: list[RawAmqp] = []

    def connect(url: str | None = None, timeout: float = 5.0) -> RawAmqp:
        parsed = urlparse(url or broker_url)
        client = RawAmqp(parsed.hostname or "127.0.0.1", parsed.port or 5672, timeout)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m node.cli <args>` from the repo root to completion, output captured;
    `env` adds environment variables.

    Skipped against an external broker, like `start_node`.
    """
    if EXTERNAL_URL:
        pytest.skip("runs the warren CLI itself")

    def run(
        *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).resolve().parents[2],
            # No management or metrics port unless a test asks: the defaults (15672,
            # 15692) may be taken on this machine.
            env={
                **os.environ,
                "WARREN_MANAGEMENT_PORT": "0",
                "WARREN_METRICS_PORT": "0",
                **(env or {}),
            },
        )

    return run
