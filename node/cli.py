"""The `warren` command line.

Rules: every option is also a WARREN_* environment variable; bad input (a port in use, an
unwritable data dir, a malformed size) is one line on stderr and exit code 2, never a
traceback.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from node import __version__
from node.config import NodeConfig, User, default_watermark, parse_watermark
from node.logs import EventLogger, configure

if TYPE_CHECKING:
    from cluster.node import ClusterConfig

EXIT_USAGE = 2
GC_GEN0_THRESHOLD = 20_000  # Python's default is 700 allocations


def _fail(message: str) -> None:
    click.echo(f"warren: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _check_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _fail(f"data dir {str(path)!r} is not writable: {exc.strerror or exc}")


def _run_node(config: NodeConfig, log: EventLogger, cluster: ClusterConfig | None = None) -> None:
    import anyio

    from node.server import serve

    backend_options: dict[str, bool] = {}
    try:
        import uvloop  # noqa: F401

        backend_options["use_uvloop"] = True
    except ImportError:
        pass
    try:
        anyio.run(
            serve, config, log, None, cluster, backend="asyncio", backend_options=backend_options
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _fail(f"cannot listen on {config.host}:{config.port}: address already in use")
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            _fail(f"cannot listen on {config.host}:{config.port}: {exc.strerror}")
        raise


def _tune_gc() -> None:
    """Fewer, cheaper collections: freeze start-up objects out of the cyclic collector and
    collect the young generation less often. Messages are acyclic and short-lived, so this
    trades little memory for fewer millisecond pauses on the delivery path."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="warren")
def main() -> None:
    """Warren: a clustered, RabbitMQ-compatible AMQP 0-9-1 broker."""


@main.command()
@click.option(
    "--host",
    envvar="WARREN_HOST",
    default="0.0.0.0",
    show_default=True,
    help="Address to listen on for AMQP clients.",
)
@click.option(
    "--port",
    envvar="WARREN_PORT",
    type=click.IntRange(0, 65535),
    default=5672,
    show_default=True,
    help="AMQP port.",
)
@click.option(
    "--name", envvar="WARREN_NAME", default=None, help="Node name (default: warren@HOSTNAME)."
)
@click.option(
    "--data-dir",
    envvar="WARREN_DATA_DIR",
    type=click.Path(path_type=Path),
    default=Path("./data"),
    show_default=True,
    help="Where the node keeps its state.",
)
@click.option(
    "--user",
    envvar="WARREN_USER",
    default="guest",
    show_default=True,
    help="The default user's name.",
)
@click.option(
    "--password",
    envvar="WARREN_PASSWORD",
    default="guest",
    show_default=True,
    help="The default user's password.",
)
@click.option(
    "--loopback-users",
    envvar="WARREN_LOOPBACK_USERS",
    default="guest",
    show_default=True,
    help="Comma-separated users allowed to log in only from loopback addresses.",
)
@click.option(
    "--heartbeat",
    envvar="WARREN_HEARTBEAT",
    type=click.IntRange(0, 65535),
    default=60,
    show_default=True,
    help="Heartbeat interval proposed to clients (s).",
)
@click.option(
    "--frame-max",
    envvar="WARREN_FRAME_MAX",
    type=click.IntRange(4096, 2**31 - 1),
    default=131072,
    show_default=True,
    help="Largest frame, in bytes.",
)
@click.option(
    "--channel-max",
    envvar="WARREN_CHANNEL_MAX",
    type=click.IntRange(1, 65535),
    default=2047,
    show_default=True,
    help="Most channels per connection.",
)
@click.option(
    "--memory-high-watermark",
    envvar="WARREN_MEMORY_HIGH_WATERMARK",
    default="0.4",
    show_default=True,
    help="Block publishers above this many bytes of queued messages: a fraction of "
    "RAM (0.4) or a size (512MB).",
)
@click.option(
    "--log-level",
    envvar="WARREN_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--peer",
    "peers",
    envvar="WARREN_PEERS",
    multiple=True,
    help="Another cluster member as NAME=HOST:RAFTPORT (repeatable; WARREN_PEERS takes "
    "them space-separated). Without peers the node runs alone, without Raft.",
)
@click.option(
    "--raft-port",
    envvar="WARREN_RAFT_PORT",
    type=click.IntRange(1, 65535),
    default=4321,
    show_default=True,
    help="Raft port (cluster only).",
)
@click.option(
    "--link-port",
    envvar="WARREN_LINK_PORT",
    type=click.IntRange(0, 65535),
    default=4322,
    show_default=True,
    help="Node link port: forwarded publishes, remote consumers (cluster only).",
)
@click.option(
    "--advertise-host",
    envvar="WARREN_ADVERTISE_HOST",
    default=None,
    help="Host other nodes reach this one at (default: --host, or the host name when "
    "--host is 0.0.0.0).",
)
@click.option(
    "--cluster-secret",
    envvar="WARREN_CLUSTER_SECRET",
    default=None,
    help="Shared secret of the cluster's Raft and link ports (default: generated once into "
    "DATA_DIR/raft.secret; every member needs the same one).",
)
@click.option("--cluster-name", envvar="WARREN_CLUSTER_NAME", default="warren", show_default=True)
@click.option(
    "--queue-leader-locator",
    envvar="WARREN_QUEUE_LEADER_LOCATOR",
    type=click.Choice(["client-local", "balanced"]),
    default="client-local",
    show_default=True,
    help="Where new queues are led (x-queue-leader-locator overrides it per queue).",
)
@click.option(
    "--durability",
    envvar="WARREN_DURABILITY",
    type=click.Choice(["fsync", "os-cache"]),
    default="fsync",
    show_default=True,
    help="When a persistent message's confirm is sent (cluster): fsync = once its log entry "
    "is fsynced on a majority; os-cache = once it is in the page cache of a majority "
    "(survives the kill of every node, not a power loss of a majority).",
)
@click.option(
    "--raft-compaction-entries",
    envvar="WARREN_RAFT_COMPACTION_ENTRIES",
    type=click.IntRange(100, None),
    default=5000,
    show_default=True,
    help="Raft log entries after which a node snapshots its state and compacts its "
    "journal (cluster; also every 5 minutes).",
)
@click.option(
    "--raft-leader-follows-load/--no-raft-leader-follows-load",
    envvar="WARREN_RAFT_LEADER_FOLLOWS_LOAD",
    default=True,
    show_default=True,
    help="Hand Raft leadership to the node whose durable queues write the most (cluster; "
    "saves a hop per persistent message, see the README's design section).",
)
@click.option(
    "--management-host", envvar="WARREN_MANAGEMENT_HOST", default=None,
    help="Address of the management HTTP API (default: --host).",
)  # fmt: skip
@click.option(
    "--management-port",
    envvar="WARREN_MANAGEMENT_PORT",
    type=click.IntRange(0, 65535),
    default=15672,
    show_default=True,
    help="Management HTTP API port (0: off).",
)
@click.option(
    "--metrics-port",
    envvar="WARREN_METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=15692,
    show_default=True,
    help="Prometheus port (0: off).",
)
def node(
    host: str,
    port: int,
    name: str | None,
    data_dir: Path,
    user: str,
    password: str,
    loopback_users: str,
    heartbeat: int,
    frame_max: int,
    channel_max: int,
    memory_high_watermark: str,
    log_level: str,
    peers: tuple[str, ...],
    raft_port: int,
    link_port: int,
    advertise_host: str | None,
    cluster_secret: str | None,
    cluster_name: str,
    queue_leader_locator: str,
    durability: str,
    raft_compaction_entries: int,
    raft_leader_follows_load: bool,
    management_host: str | None,
    management_port: int,
    metrics_port: int,
) -> None:
    """Run one broker node in the foreground (Ctrl-C or SIGTERM stops it)."""
    configure(log_level)
    try:
        watermark = parse_watermark(memory_high_watermark)
    except ValueError as exc:
        _fail(f"--memory-high-watermark: {exc}")
    if watermark <= 0:
        watermark = default_watermark()
    _check_data_dir(data_dir)
    node_name = name or f"warren@{os.uname().nodename}"
    config = NodeConfig(
        name=node_name,
        host=host,
        port=port,
        data_dir=data_dir,
        users=(User(user, password),),
        loopback_users=frozenset(u.strip() for u in loopback_users.split(",") if u.strip()),
        heartbeat=heartbeat,
        frame_max=frame_max,
        channel_max=channel_max,
        memory_high_watermark_bytes=watermark,
        cluster_name=cluster_name,
        management_host=management_host or host,
        management_port=management_port or None,
        metrics_port=metrics_port or None,
    )
    log = EventLogger(logging.getLogger("warren"), node=node_name)
    cluster = None
    if peers:
        advertise = advertise_host or (
            host if host not in ("0.0.0.0", "::") else socket.gethostname()
        )
        parsed = _parse_peers(peers, node_name)
        for what, port_ in (("raft", raft_port), ("link", link_port)):
            problem = _port_problem(host, port_)
            if problem:
                _fail(f"cannot listen on {host}:{port_} ({what}): {problem}")
        from cluster.node import ClusterConfig
        from cluster.raft import load_or_create_secret

        secret = cluster_secret or load_or_create_secret(data_dir)
        cluster = ClusterConfig(
            name=node_name,
            data_dir=data_dir,
            raft_host=host,
            raft_port=raft_port,
            link_host=host,
            link_port=link_port,
            advertise_host=advertise,
            peers=parsed,
            secret=secret,
            amqp_address=f"{advertise}:{port}",
            management_address=f"{advertise}:{management_port}" if management_port else "",
            queue_leader_locator=queue_leader_locator,
            durability=durability,
            compaction_entries=raft_compaction_entries,
            leader_follows_load=raft_leader_follows_load,
        )
    for what, port_ in (("management", management_port), ("metrics", metrics_port)):
        problem = _port_problem(config.management_host, port_) if port_ else None
        if problem:
            _fail(f"cannot listen on {config.management_host}:{port_} ({what}): {problem}")
    _tune_gc()
    _run_node(config, log, cluster)
    sys.exit(0)


def _parse_peers(values: tuple[str, ...], self_name: str) -> tuple[tuple[str, str, int], ...]:
    """NAME=HOST:PORT values (also several in one, space-separated, from WARREN_PEERS)."""
    found: list[tuple[str, str, int]] = []
    for value in values:
        for item in value.split():
            name, sep, address = item.partition("=")
            host, _, port_text = address.rpartition(":")
            host = host.strip("[]")
            if not sep or not name or not host or not port_text.isdigit():
                _fail(f"--peer {item!r}: expected NAME=HOST:PORT")
            port = int(port_text)
            if not 0 < port < 65536:
                _fail(f"--peer {item!r}: port out of range")
            if name != self_name:
                found.append((name, host, port))
    return tuple(found)


def _port_problem(host: str, port: int) -> str | None:
    """Why `port` cannot be bound on `host`, or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return "address already in use" if exc.errno == errno.EADDRINUSE else str(exc.strerror)
    return None


from node.ctl import ctl_group  # noqa: E402
from node.health import healthcheck_command  # noqa: E402
from node.up import up_command  # noqa: E402
from node.verify import verify_command  # noqa: E402

main.add_command(up_command)
main.add_command(ctl_group)
main.add_command(verify_command)
main.add_command(healthcheck_command)


if __name__ == "__main__":
    main()
