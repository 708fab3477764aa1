"""`warren ctl`: operator commands over a node's management HTTP API.

Rules: HTTP through the standard library only (urllib, no proxies, Basic credentials sent
up front); every failure (unreachable node, 4xx/5xx, an answer that is not JSON or not the
expected shape) is one line on stderr starting "warren ctl: " and exit code 2, never a
traceback. Formatting is pure (`format_table`, `format_status`) so tests need no node.
Output is this command's own: `click.echo`, never print(). This module imports nothing from
the broker, the protocol or the cluster.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import click

from node import __version__

EXIT_ERROR = 2
DEFAULT_NODE = "http://127.0.0.1:15672"
MAX_ERROR_CHARS = 300  # an error line quotes at most this much of a node's answer

CLUSTER_PATH = "/api/warren/cluster"
MEMBERS_PATH = "/api/warren/members"
REBALANCE_PATH = "/api/warren/rebalance"
LIST_PATHS = {
    "queues": "/api/queues",
    "exchanges": "/api/exchanges",
    "bindings": "/api/bindings",
    "connections": "/api/connections",
    "channels": "/api/channels",
    "consumers": "/api/consumers",
}
# The columns `list` shows, in this order, when at least one row has them.
LIST_COLUMNS = {
    "queues": (
        "name",
        "vhost",
        "type",
        "durable",
        "auto_delete",
        "exclusive",
        "messages",
        "messages_ready",
        "messages_unacknowledged",
        "consumers",
        "node",
        "state",
    ),
    "exchanges": ("name", "vhost", "type", "durable", "auto_delete", "internal"),
    "bindings": (
        "source",
        "vhost",
        "destination",
        "destination_type",
        "routing_key",
        "arguments",
    ),
    "connections": (
        "name",
        "vhost",
        "user",
        "peer_host",
        "peer_port",
        "channels",
        "state",
        "node",
    ),
    "channels": (
        "name",
        "vhost",
        "user",
        "consumer_count",
        "prefetch_count",
        "messages_unacknowledged",
        "messages_unconfirmed",
        "confirm",
        "transactional",
        "state",
        "node",
    ),
    "consumers": (
        "consumer_tag",
        "queue.vhost",
        "queue.name",
        "channel_details.name",
        "ack_required",
        "prefetch_count",
        "exclusive",
        "active",
        "channel_details.node",
    ),
}
# Headers of nested columns ("queue.name"); the others are the key with "_" as " ".
COLUMN_HEADERS = {
    "queue.vhost": "vhost",
    "queue.name": "queue",
    "channel_details.name": "channel",
    "channel_details.node": "node",
}
MEMBER_COLUMNS = [
    "name", "raft_address", "amqp_address", "reachable", "serving", "alive", "queues_led"
]  # fmt: skip


class CtlError(Exception):
    """A failure to report as one line (without the "warren ctl: " prefix)."""


# --- formatting ---------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    text = str(value)
    return " ".join(text.split()) if any(c in text for c in "\r\n\t") else text


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _value(row: Mapping[str, object], column: str) -> object:
    """`row[column]`; a dotted column ("queue.name") looks into nested objects."""
    value: object = row
    for part in column.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """Plain aligned columns under a header (the keys, "_" as " "; a dotted key looks into
    nested objects); numeric columns are right-aligned; a missing or null value is "-", a
    boolean "yes"/"no"."""
    header = [COLUMN_HEADERS.get(c, c.replace("_", " ")) for c in columns]
    values = [[_value(row, c) for c in columns] for row in rows]
    cells = [[_cell(v) for v in row] for row in values]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [
        bool(present) and all(_is_number(v) for v in present)
        for present in ([r[i] for r in values if r[i] is not None] for i in range(len(columns)))
    ]

    def line(values: Sequence[str], align: bool) -> str:
        parts = [
            v.rjust(w) if align and right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header, False), *(line(r, True) for r in cells)])


def format_members(status: Mapping[str, Any]) -> str:
    members = status.get("members")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise CtlError("unexpected answer: no members list")
    return format_table(members, MEMBER_COLUMNS)


def format_status(status: Mapping[str, Any]) -> str:
    raft = status.get("raft")
    if not isinstance(raft, dict):
        raise CtlError("unexpected answer: no raft object")
    quorum = raft.get("has_quorum")
    fields = [
        ("Cluster", status.get("cluster_name")),
        ("This node", status.get("node")),
        ("Role", raft.get("role")),
        ("Raft leader", raft.get("leader") or "(none)"),
        ("Term", raft.get("term")),
        ("Commit index", f"{raft.get('commit_index')} (applied {raft.get('last_applied')})"),
        ("Quorum", _cell(quorum) if isinstance(quorum, bool) else "-"),
        ("Queues", status.get("queues")),
    ]
    width = max(len(k) for k, _ in fields) + 1
    header = "\n".join(f"{k + ':':<{width}} {_cell(v)}" for k, v in fields)
    return f"{header}\n\n{format_members(status)}"


def list_columns(kind: str, rows: Sequence[Mapping[str, object]]) -> list[str]:
    """The preferred columns for `kind` that some row has; failing that, the first row's
    keys with plain (non-nested) values."""
    columns = [
        c for c in LIST_COLUMNS.get(kind, ()) if any(_value(row, c) is not None for row in rows)
    ]
    if columns or not rows:
        return columns or ["name"]
    return [k for k, v in rows[0].items() if not isinstance(v, dict | list)]


# --- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Client:
    """One node's management API."""

    base_url: str
    user: str
    password: str
    timeout: float

    def request(self, method: str, path: str, body: object = None) -> object:
        """The decoded JSON answer (None for an empty one), or CtlError."""
        url = self.base_url + path
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        headers = {
            "Authorization": f"Basic {token}",
            "Accept": "application/json",
            "User-Agent": f"warren-ctl/{__version__}",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            with opener.open(request, timeout=self.timeout) as answer:
                status, raw = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise CtlError(_http_error(method, url, exc.code, exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CtlError(f"cannot reach {self.base_url}: {_reason(exc, self.timeout)}") from None
        except http.client.HTTPException as exc:
            raise CtlError(
                f"{method} {url}: not an HTTP answer ({type(exc).__name__});"
                " is this a Warren management port?"
            ) from None
        except ValueError as exc:  # urllib's word for a URL it cannot use
            raise CtlError(f"--node {self.base_url!r}: {_short(str(exc))}") from None
        if status == 204 or not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise CtlError(
                f"{method} {url}: the answer is not JSON (is this a Warren management port?)"
            ) from None


def _reason(exc: BaseException, timeout: float) -> str:
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return _short(str(reason)) or type(reason).__name__


def _http_error(method: str, url: str, code: int, raw: bytes) -> str:
    detail = ""
    try:
        value = json.loads(raw)
        if isinstance(value, dict):
            parts = [str(value[k]) for k in ("error", "reason") if value.get(k)]
            detail = ": ".join(dict.fromkeys(parts))
    except (UnicodeDecodeError, ValueError):
        detail = ""
    hint = " (check --user and --password)" if code == 401 else ""
    return _short(f"{method} {url}: {code} {detail or 'error'}{hint}")


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def normalize_url(node: str) -> str:
    node = node.strip().rstrip("/")
    return node if "://" in node else f"http://{node}"


# --- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    client: Client
    as_json: bool


class _CtlGroup(click.Group):
    """Reports a CtlError from any subcommand as one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CtlError as exc:
            click.echo(f"warren ctl: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def _expect_dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CtlError(f"unexpected answer from {what}: not a JSON object")
    return value


def _rows(value: object, what: str) -> list[dict[str, Any]]:
    if isinstance(value, dict) and isinstance(value.get("items"), list):
        value = value["items"]  # a paginated answer
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise CtlError(f"unexpected answer from {what}: not a list of objects")
    return value


@click.group("ctl", cls=_CtlGroup)
@click.option(
    "--node",
    envvar="WARREN_CTL_NODE",
    default=DEFAULT_NODE,
    show_default=True,
    help="The management API of any node of the cluster.",
)
@click.option("--user", envvar="WARREN_CTL_USER", default="guest", show_default=True)
@click.option("--password", envvar="WARREN_CTL_PASSWORD", default="guest", show_default=True)
@click.option(
    "--json", "as_json", envvar="WARREN_CTL_JSON", is_flag=True, help="Print the JSON answer."
)
@click.option(
    "--timeout",
    envvar="WARREN_CTL_TIMEOUT",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the node.",
)
@click.pass_context
def ctl_group(
    ctx: click.Context, node: str, user: str, password: str, as_json: bool, timeout: float
) -> None:
    """Operate a running cluster through a node's management API."""
    ctx.obj = Settings(Client(normalize_url(node), user, password, timeout), as_json)


@ctl_group.command()
@click.pass_obj
def status(settings: Settings) -> None:
    """The cluster as this node sees it: Raft state and members."""
    value = _expect_dict(settings.client.request("GET", CLUSTER_PATH), CLUSTER_PATH)
    if settings.as_json:
        _echo_json(value)
    else:
        click.echo(format_status(value))


@ctl_group.command()
@click.pass_obj
def members(settings: Settings) -> None:
    """The cluster's members."""
    value = _expect_dict(settings.client.request("GET", CLUSTER_PATH), CLUSTER_PATH)
    if settings.as_json:
        _echo_json(value.get("members"))
    else:
        click.echo(format_members(value))


def _raft_address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:4324")
    return value


@ctl_group.command("add-member")
@click.argument("name")
@click.argument("raft_address", metavar="RAFT_HOST:PORT", callback=_raft_address)
@click.pass_obj
def add_member(settings: Settings, name: str, raft_address: str) -> None:
    """Add node NAME, whose Raft port is RAFT_HOST:PORT, to the cluster."""
    body = {"name": name, "raft_address": raft_address}
    value = settings.client.request("POST", MEMBERS_PATH, body)
    if settings.as_json:
        _echo_json(value)
    else:
        click.echo(f"added member {name} (raft {raft_address})")


@ctl_group.command("remove-member")
@click.argument("name")
@click.pass_obj
def remove_member(settings: Settings, name: str) -> None:
    """Remove node NAME from the cluster."""
    value = settings.client.request("DELETE", f"{MEMBERS_PATH}/{quote(name, safe='')}")
    if settings.as_json:
        _echo_json(value)
    else:
        click.echo(f"removed member {name}")


@ctl_group.command()
@click.pass_obj
def rebalance(settings: Settings) -> None:
    """Spread queue leaders evenly over the members."""
    value = _expect_dict(settings.client.request("POST", REBALANCE_PATH, {}), REBALANCE_PATH)
    if settings.as_json:
        _echo_json(value)
        return
    leaders = value.get("leaders")
    if not isinstance(leaders, dict):
        raise CtlError(f"unexpected answer from {REBALANCE_PATH}: no leaders object")
    moved = value.get("moved")
    click.echo(f"moved {moved} queue leader{'' if moved == 1 else 's'}")
    rows = [{"node": node, "queues_led": count} for node, count in sorted(leaders.items())]
    click.echo(format_table(rows, ["node", "queues_led"]))


def _list(settings: Settings, kind: str, vhost: str | None) -> None:
    path = LIST_PATHS[kind]
    if vhost is not None:
        path += "/" + quote(vhost, safe="")
    value = settings.client.request("GET", path)
    if settings.as_json:
        _echo_json(value)
        return
    rows = _rows(value, path)
    if not rows:
        click.echo(f"no {kind}")
        return
    click.echo(format_table(rows, list_columns(kind, rows)))


_VHOST_KINDS = ("queues", "exchanges", "bindings", "consumers")


@ctl_group.command("list")
@click.argument("kind", type=click.Choice(sorted(LIST_PATHS)))
@click.option("--vhost", default=None, help="Only this vhost (queues, exchanges, bindings).")
@click.pass_obj
def list_command(settings: Settings, kind: str, vhost: str | None) -> None:
    """List queues, exchanges, bindings, connections, channels or consumers (of every
    node of the cluster; all vhosts unless --vhost)."""
    if vhost is not None and kind not in _VHOST_KINDS:
        raise click.BadParameter(f"--vhost does not apply to {kind}", param_hint="--vhost")
    _list(settings, kind, vhost)


def _listing_command(kind: str) -> None:
    """`warren ctl KIND` (the same as `warren ctl list KIND`)."""

    def command(settings: Settings, vhost: str | None = None) -> None:
        _list(settings, kind, vhost)

    command.__doc__ = f"List {kind} (the whole cluster's)."
    wrapped = click.pass_obj(command)
    if kind in _VHOST_KINDS:
        wrapped = click.option("--vhost", default=None, help="Only this vhost.")(wrapped)
    ctl_group.command(kind)(wrapped)


for _kind in LIST_PATHS:
    _listing_command(_kind)
