"""`warren healthcheck`: is the node on this host in its cluster and serving AMQP?

The container image's HEALTHCHECK. Two probes, both against this host:

1. `GET /api/healthz` on the management port answers 200 (it answers 503 until a
   clustered node has caught up with the Raft log and announced itself);
2. the AMQP port answers the protocol header with `connection.start` (the first frame
   of the handshake: method frame, channel 0, class 10 method 10, frame-end 0xCE).
   The probe then closes its socket; it never logs in.

Exit 0 with one line on stdout when both pass, else 1 with one line on stderr saying
which probe failed and why. The ports and addresses come from the same WARREN_*
variables as `warren node`'s, so inside the container the check needs no arguments.

Rules: standard library and click only (it runs every few seconds: it must start fast);
it imports nothing else from the broker. Every socket operation has a timeout.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import sys
import time

import click

EXIT_OK = 0
EXIT_UNHEALTHY = 1
DEFAULT_TIMEOUT_S = 3.0  # for each probe; Docker's own HEALTHCHECK timeout is longer
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD = 1
FRAME_END = 0xCE
CONNECTION_START = (10, 10)  # (class id, method id)
_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def probe_address(host: str | None) -> str:
    """Where to reach a port bound to `host` from this host: loopback for a wildcard."""
    if host is None or host in WILDCARDS:
        return "127.0.0.1"
    return host.strip("[]")


def check_start_frame(data: bytes) -> str | None:
    """None if `data` begins with a connection.start frame, else what it is instead."""
    if data.startswith(b"AMQP"):
        return f"the server refused the protocol header (it offers {data[:8]!r})"
    if len(data) < _FRAME_HEADER.size + 4:
        return f"a short answer to the protocol header ({len(data)} bytes)"
    kind, channel, size = _FRAME_HEADER.unpack_from(data)
    if kind != FRAME_METHOD or channel != 0:
        return f"frame type {kind} on channel {channel}, not a method frame on channel 0"
    class_id, method_id = struct.unpack_from(">HH", data, _FRAME_HEADER.size)
    if (class_id, method_id) != CONNECTION_START:
        return f"method {class_id}.{method_id}, not connection.start"
    end = _FRAME_HEADER.size + size
    if len(data) > end and data[end] != FRAME_END:
        return "a frame without its end byte"
    return None


def probe_management(host: str, port: int, timeout: float) -> str | None:
    """None if GET /api/healthz answers 200, else why not."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/api/healthz")
        response = conn.getresponse()
        body = response.read(4096)
    except OSError as exc:
        return f"management http://{host}:{port}/api/healthz: {exc.strerror or exc}"
    except http.client.HTTPException as exc:
        return f"management http://{host}:{port}/api/healthz: bad answer ({exc!r})"
    finally:
        conn.close()
    if response.status == 200:
        return None
    try:
        reason = str(json.loads(body).get("reason", ""))
    except (ValueError, AttributeError):
        reason = ""
    return f"management /api/healthz answered {response.status}" + (
        f" ({reason})" if reason else ""
    )


def probe_amqp(host: str, port: int, timeout: float) -> str | None:
    """None if the AMQP port answers the protocol header with connection.start."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(AMQP_HEADER)
            data = b""
            # connection.start carries the server properties: read until its frame is
            # whole (or the server closes, or time runs out).
            while len(data) < _FRAME_HEADER.size + 4 or len(data) < _frame_length(data):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return f"AMQP {host}:{port}: no connection.start within {timeout:g} s"
    except OSError as exc:
        return f"AMQP {host}:{port}: {exc.strerror or exc}"
    problem = check_start_frame(data)
    return None if problem is None else f"AMQP {host}:{port}: {problem}"


def _frame_length(data: bytes) -> int:
    """Bytes of the whole first frame (header, payload, end byte)."""
    size: int = _FRAME_HEADER.unpack_from(data)[2]
    return _FRAME_HEADER.size + size + 1


@click.command("healthcheck")
@click.option(
    "--host",
    envvar="WARREN_HOST",
    default=None,
    help="The node's AMQP listen address (a wildcard is probed on 127.0.0.1).",
)
@click.option("--port", envvar="WARREN_PORT", type=click.IntRange(1, 65535), default=5672)
@click.option(
    "--management-host",
    envvar="WARREN_MANAGEMENT_HOST",
    default=None,
    help="The management listen address (default: --host).",
)
@click.option(
    "--management-port",
    envvar="WARREN_MANAGEMENT_PORT",
    type=click.IntRange(0, 65535),
    default=15672,
    help="Management port (0: skip the cluster probe, check AMQP only).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds for each probe.",
)
def healthcheck_command(
    host: str | None,
    port: int,
    management_host: str | None,
    management_port: int,
    timeout: float,
) -> None:
    """Exit 0 if the local node is in its cluster (management /api/healthz) and answers
    AMQP 0-9-1 on its port, else 1; one line either way (the image's HEALTHCHECK)."""
    amqp_host = probe_address(host)
    problem = None
    if management_port:
        problem = probe_management(probe_address(management_host or host), management_port, timeout)
    if problem is None:
        problem = probe_amqp(amqp_host, port, timeout)
    if problem is not None:
        click.echo(f"warren healthcheck: unhealthy: {problem}", err=True)
        sys.exit(EXIT_UNHEALTHY)
    what = "ready, " if management_port else ""
    click.echo(f"warren healthcheck: ok ({what}AMQP 0-9-1 on {amqp_host}:{port})")
