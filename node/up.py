"""`warren up`: a local N-node cluster, each node a child process of this one.

Rules: building the nodes' command lines is pure (`node_commands`); checking ports and the
cluster secret touch only the local machine, before any child starts; supervision
(`Supervisor`) is plain subprocess plus one reader thread per child, stopped by a
`threading.Event`, so that tests drive it with harmless stand-in commands. Children run in
their own sessions: a terminal's Ctrl-C reaches only us, and we stop them with SIGTERM
(then SIGKILL after a grace period). A child that dies is reported and the others keep
running. Output is this command's own: `click.echo`, never print(). This module imports
nothing from the broker, the protocol or the cluster.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import click

EXIT_USAGE = 2
EXIT_ALL_DIED = 1
STOP_GRACE_S = 10.0  # SIGTERM, then this long for a node to close its clients, then SIGKILL
POLL_S = 0.2  # how often the supervisor looks for dead children
SECRET_FILE = "cluster.secret"
SECRET_ENV = "WARREN_CLUSTER_SECRET"
DEFAULT_USER = "guest"

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of the local cluster: its name, ports, data dir and command line."""

    name: str
    host: str
    amqp_port: int
    raft_port: int
    link_port: int
    management_port: int
    metrics_port: int
    data_dir: Path
    argv: tuple[str, ...]

    @property
    def amqp_url(self) -> str:
        return f"amqp://{DEFAULT_USER}:{DEFAULT_USER}@{_url_host(self.host)}:{self.amqp_port}/%2F"

    @property
    def management_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.management_port}/"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def ports(self) -> tuple[tuple[str, int], ...]:
        """(what, port) for every port this node listens on."""
        return (
            ("amqp", self.amqp_port),
            ("raft", self.raft_port),
            ("link", self.link_port),
            ("management", self.management_port),
            ("metrics", self.metrics_port),
        )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def node_name(index: int) -> str:
    """The name of node `index` (0-based): warren-1, warren-2, ..."""
    return f"warren-{index + 1}"


def node_commands(
    nodes: int,
    *,
    host: str,
    base_port: int,
    raft_base_port: int,
    link_base_port: int,
    management_base_port: int,
    metrics_base_port: int,
    data_dir: Path,
    log_level: str,
    python: str = sys.executable,
) -> list[NodeSpec]:
    """The nodes of a local cluster: node i (0-based) gets each base port + i. Raises
    ValueError when the numbers do not make a cluster (no nodes, a port out of range, two
    nodes' ports colliding)."""
    if nodes < 1:
        raise ValueError("--nodes must be at least 1")
    bases = {
        "--base-port": base_port,
        "--raft-base-port": raft_base_port,
        "--link-base-port": link_base_port,
        "--management-base-port": management_base_port,
        "--metrics-base-port": metrics_base_port,
    }
    for option, base in bases.items():
        if base < 1 or base + nodes - 1 > 65535:
            raise ValueError(f"{option} {base}: ports {base}..{base + nodes - 1} out of range")
    owners: dict[int, str] = {}
    for option, base in bases.items():
        for i in range(nodes):
            if (port := base + i) in owners:
                raise ValueError(f"port {port} is in both {owners[port]} and {option} ranges")
            owners[port] = option

    def raft_address(i: int) -> str:
        return f"{_url_host(host)}:{raft_base_port + i}"

    specs = []
    for i in range(nodes):
        name = node_name(i)
        node_dir = data_dir / name
        argv = [
            python,
            "-m",
            "node.cli",
            "node",
            "--name",
            name,
            "--host",
            host,
            "--port",
            str(base_port + i),
            "--advertise-host",
            host,
            "--raft-port",
            str(raft_base_port + i),
            "--link-port",
            str(link_base_port + i),
            "--management-port",
            str(management_base_port + i),
            "--metrics-port",
            str(metrics_base_port + i),
            "--data-dir",
            str(node_dir),
            "--log-level",
            log_level,
        ]
        for j in range(nodes):
            if j != i:
                argv += ["--peer", f"{node_name(j)}={raft_address(j)}"]
        specs.append(
            NodeSpec(
                name=name,
                host=host,
                amqp_port=base_port + i,
                raft_port=raft_base_port + i,
                link_port=link_base_port + i,
                management_port=management_base_port + i,
                metrics_port=metrics_base_port + i,
                data_dir=node_dir,
                argv=tuple(argv),
            )
        )
    return specs


def port_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port (a bind test), or None if it could."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As the servers do (anyio sets it): a port in TIME_WAIT is free, a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address already in use"
            return exc.strerror or str(exc)
    return None


def check_ports(specs: Sequence[NodeSpec]) -> str | None:
    """The first port that cannot be listened on, as one line, or None."""
    for spec in specs:
        for what, port in spec.ports:
            problem = port_problem(spec.host, port)
            if problem is not None:
                where = f"{_url_host(spec.host)}:{port}"
                return f"cannot listen on {where} ({spec.name} {what} port): {problem}"
    return None


def load_or_create_secret(path: Path) -> str:
    """The cluster secret in `path`, created (mode 0600) on first use and reused after."""
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secret + "\n")
    os.chmod(path, 0o600)  # also when the (empty) file existed with looser bits
    return secret


@dataclass(frozen=True, slots=True)
class Child:
    """A started node: its process and the thread copying its output."""

    spec: NodeSpec
    process: subprocess.Popen[bytes]
    reader: threading.Thread


class Supervisor:
    """Starts the nodes, copies their output line by line prefixed with their names, reports
    the ones that die, and on `stop` terminates them all. `echo(line, err)` writes one line
    and must be thread-safe (the default takes a lock around click.echo)."""

    def __init__(
        self,
        specs: Sequence[NodeSpec],
        *,
        env: Mapping[str, str],
        echo: Callable[[str, bool], None] | None = None,
        grace_s: float = STOP_GRACE_S,
        poll_s: float = POLL_S,
    ) -> None:
        self._specs = tuple(specs)
        self._env = dict(env)
        self._lock = threading.Lock()
        self._echo = echo or self._click_echo
        self._grace_s = grace_s
        self._poll_s = poll_s

    def _click_echo(self, line: str, err: bool) -> None:
        with self._lock:
            click.echo(line, err=err)

    def run(self, stop: threading.Event, force: threading.Event | None = None) -> int:
        """Run until `stop` is set (then 0) or every node has died (then 1). Setting `force`
        while stopping skips the grace period."""
        children: list[Child] = []
        try:
            for spec in self._specs:
                children.append(self._start(spec))
        except OSError as exc:
            self._echo(f"warren up: cannot start {spec.name}: {exc.strerror or exc}", True)
            self._terminate(children, force)
            return EXIT_USAGE
        reported: set[str] = set()
        while not stop.wait(self._poll_s):
            for child in children:
                code = child.process.poll()
                if code is not None and child.spec.name not in reported:
                    reported.add(child.spec.name)
                    child.reader.join(timeout=1.0)  # its last lines first
                    self._echo(f"warren up: {child.spec.name} exited with code {code}", True)
            if len(reported) == len(children):
                self._echo("warren up: every node has exited", True)
                return EXIT_ALL_DIED
        self._terminate(children, force)
        return 0

    def _start(self, spec: NodeSpec) -> Child:
        process = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
        )
        assert process.stdout is not None
        reader = threading.Thread(
            target=self._copy_output,
            args=(spec.name, process.stdout),
            name=f"warren-up-{spec.name}",
            daemon=True,
        )
        reader.start()
        return Child(spec, process, reader)

    def _copy_output(self, name: str, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self._echo(f"{name} | {line}", False)

    def _terminate(self, children: Sequence[Child], force: threading.Event | None) -> None:
        alive = [c for c in children if c.process.poll() is None]
        for child in alive:
            child.process.send_signal(signal.SIGTERM)  # a no-op once it has exited
        deadline = time.monotonic() + self._grace_s
        while alive and time.monotonic() < deadline and not (force and force.is_set()):
            time.sleep(min(0.05, self._poll_s))
            alive = [c for c in alive if c.process.poll() is None]
        for child in alive:
            self._echo(
                f"warren up: {child.spec.name} did not stop within {self._grace_s:g} s; killed",
                True,
            )
            child.process.send_signal(signal.SIGKILL)
        for child in children:
            child.process.wait()
            child.reader.join(timeout=2.0)


class _StopOnSignals:
    """SIGINT/SIGTERM set `stop`; a second one also sets `force`. Restores the previous
    handlers on exit. Main thread only."""

    def __init__(self, stop: threading.Event, force: threading.Event) -> None:
        self._stop = stop
        self._force = force
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def __enter__(self) -> _StopOnSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]


def _fail(message: str) -> None:
    click.echo(f"warren up: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _port_option(name: str, env: str, default: int, what: str) -> Callable[[_F], _F]:
    return click.option(
        name,
        envvar=env,
        type=click.IntRange(1, 65535),
        default=default,
        show_default=True,
        help=f"{what} port of the first node; node i gets this + i.",
    )


@click.command("up")
@click.option(
    "--nodes",
    envvar="WARREN_UP_NODES",
    type=click.IntRange(1, 99),
    default=3,
    show_default=True,
    help="How many nodes.",
)
@click.option(
    "--host",
    envvar="WARREN_UP_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address every node listens on and advertises.",
)
@_port_option("--base-port", "WARREN_UP_BASE_PORT", 5672, "AMQP")
@_port_option("--raft-base-port", "WARREN_UP_RAFT_BASE_PORT", 4321, "Raft")
@_port_option("--link-base-port", "WARREN_UP_LINK_BASE_PORT", 4421, "Node link")
@_port_option("--management-base-port", "WARREN_UP_MANAGEMENT_BASE_PORT", 15672, "Management")
@_port_option("--metrics-base-port", "WARREN_UP_METRICS_BASE_PORT", 15692, "Metrics")
@click.option(
    "--data-dir",
    envvar="WARREN_UP_DATA_DIR",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("./data"),
    show_default=True,
    help="Node K keeps its state in DATA_DIR/warren-K; the cluster secret is DATA_DIR/"
    f"{SECRET_FILE}.",
)
@click.option(
    "--log-level",
    envvar="WARREN_UP_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def up_command(
    nodes: int,
    host: str,
    base_port: int,
    raft_base_port: int,
    link_base_port: int,
    management_base_port: int,
    metrics_base_port: int,
    data_dir: Path,
    log_level: str,
) -> None:
    """Run a local cluster (warren-1 .. warren-N) in the foreground; Ctrl-C stops it."""
    try:
        specs = node_commands(
            nodes,
            host=host,
            base_port=base_port,
            raft_base_port=raft_base_port,
            link_base_port=link_base_port,
            management_base_port=management_base_port,
            metrics_base_port=metrics_base_port,
            data_dir=data_dir,
            log_level=log_level,
        )
    except ValueError as exc:
        _fail(str(exc))
    problem = check_ports(specs)
    if problem is not None:
        _fail(problem)
    try:
        secret = load_or_create_secret(data_dir / SECRET_FILE)
    except OSError as exc:
        _fail(f"cluster secret {str(data_dir / SECRET_FILE)!r}: {exc.strerror or exc}")
    env = {**os.environ, SECRET_ENV: secret, "PYTHONUNBUFFERED": "1"}
    width = max(len(s.name) for s in specs)
    for spec in specs:
        click.echo(
            f"{spec.name:<{width}}  {spec.amqp_url}  management {spec.management_url}"
            f"  metrics {spec.metrics_url}"
        )
    stop, force = threading.Event(), threading.Event()
    with _StopOnSignals(stop, force):
        code = Supervisor(specs, env=env).run(stop, force)
    sys.exit(code)
