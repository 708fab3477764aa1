"""The Grafana dashboards against a real Prometheus scraping a real three-node cluster.

Prometheus runs with deploy/prometheus/prometheus.yml, only its targets replaced by the test
cluster's nodes and its intervals shortened to one second. While pika traffic runs through
every node, every query of every panel of every dashboard in deploy/grafana/dashboards is
sent to Prometheus's HTTP API with the template variables substituted as Grafana does; a
panel whose query returns no data (or only NaN over the whole range) fails the test. The
results over the test's time range are plotted as PNG files, one per dashboard row, in
$WARREN_TEST_ARTIFACTS/dashboards (or the test's tmp_path): there is no Grafana here to
take screenshots with.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from tests.cluster.support import REPO_ROOT, Cluster, free_port, unique, wait_until
from tests.cluster.test_metrics import metrics_cluster

PROMETHEUS = Path("/usr/bin/prometheus")
CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"
SCRAPE_S = 1  # the test's scrape interval
# Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval).
RATE_INTERVAL = f"{max(SCRAPE_S + SCRAPE_S, 4 * SCRAPE_S)}s"
TRAFFIC_S = 14.0  # traffic before the queries (several rate windows, a few snapshots)
PAUSE_S = 3.0  # the Raft leader is stopped this long (its election timeout: 0.4-1.4 s)
PERSISTENT = pika.BasicProperties(delivery_mode=2)

needs_prometheus = pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK), reason=f"{PROMETHEUS} is not installed"
)


# ---- Prometheus ------------------------------------------------------------------------


def prometheus_config(targets: list[str]) -> str:
    """deploy/prometheus/prometheus.yml with the test's targets and 1 s intervals; the job
    and everything else as they are (a textual edit: the test extra has no YAML parser)."""
    text = CONFIG.read_text()
    target_line = re.compile(r"^(\s*)- node\d+:15692\s*$", re.MULTILINE)
    found = target_line.findall(text)
    assert len(found) == 3, f"{CONFIG}: expected the three node targets, found {found}"
    indent = found[0]
    first = target_line.search(text)
    assert first is not None
    text = target_line.sub("", text)
    replacement = "".join(f"{indent}- {t}\n" for t in targets)
    text = text[: first.start()] + replacement + text[first.start() :].lstrip("\n")
    for key in ("scrape_interval", "scrape_timeout", "evaluation_interval"):
        text, count = re.subn(rf"^(\s*{key}:) \S+", rf"\1 {SCRAPE_S}s", text, flags=re.MULTILINE)
        assert count == 1, f"{CONFIG}: no single {key}"
    assert "job_name: warren" in text
    return text


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with Prometheus's error
            with exc:
                raise AssertionError(f"{path} {params}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, target: Target, variables: dict[str, str], **params: Any) -> Any:
        path = "/api/v1/query_range" if "step" in params else "/api/v1/query"
        try:
            return self.get(path, query=substitute(target.expr, variables), **params)
        except AssertionError as exc:
            raise AssertionError(f"{target.where}: {exc}") from None

    def targets_up(self, count: int) -> bool:
        active = self.get("/api/v1/targets")["activeTargets"]
        return len(active) == count and all(t["health"] == "up" for t in active)


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str]) -> Iterator[Prometheus]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    config.write_text(prometheus_config(targets))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- traffic -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Queues:
    durable: str  # consumed, persistent messages
    transient: str  # consumed, transient messages
    backlog: str  # never consumed: its ready count grows


class Traffic(threading.Thread):
    """One node's clients: publishes (with confirms; persistent and transient), consumes,
    acks and nacks with requeue, sends unroutable messages (returned and dropped), opens
    and closes connections and queues, until stopped. Its own connections on its own thread
    (pika is not thread-safe); it reconnects when the node closes or loses them."""

    def __init__(self, cluster: Cluster, index: int, queues: Queues) -> None:
        super().__init__(name=f"traffic-{index}", daemon=True)
        self.node = cluster.nodes[index]
        self.index = index
        self.queues = queues
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.published = 0
        self.reconnects = 0
        self._conn: Any = None
        self._publisher: Any = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self._drop()

    def _connect(self) -> None:
        conn = self.node.connect()
        publisher = conn.channel()
        publisher.confirm_delivery()
        consumer = conn.channel()
        consumer.basic_qos(prefetch_count=20)
        seen: set[bytes] = set()

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            if body.endswith(b"0") and body not in seen:  # one in ten: nack, requeue
                seen.add(body)
                ch.basic_nack(method.delivery_tag, requeue=True)
            else:
                ch.basic_ack(method.delivery_tag)

        queue = self.queues.transient if self.index == 1 else self.queues.durable
        consumer.basic_consume(queue, on_message)
        self._conn, self._publisher = conn, publisher

    def _drop(self) -> None:
        conn, self._conn, self._publisher = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _run(self) -> None:
        last_churn = time.monotonic() + self.index * 0.4
        n = 0
        while not self.stopping.is_set():
            try:
                if self._conn is None:
                    self._connect()
                n += 1
                self._publish(n)
                self._conn.process_data_events(0)
                if time.monotonic() - last_churn > 1.2:
                    last_churn = time.monotonic()
                    self._churn()
            except (pika.exceptions.AMQPError, OSError):
                self._drop()  # e.g. the node resynchronised and closed its clients
                self.reconnects += 1
                self.stopping.wait(0.2)
                continue
            self.stopping.wait(0.01)

    def _publish(self, n: int) -> None:
        ch, q = self._publisher, self.queues
        with contextlib.suppress(pika.exceptions.NackError):  # a leader was cut off
            ch.basic_publish("", q.durable, b"d%d-%d" % (self.index, n), PERSISTENT)
            ch.basic_publish("", q.transient, b"t%d-%d" % (self.index, n))
            self.published += 2
            if n % 5 == 0:
                ch.basic_publish("", q.backlog, b"b%d" % n, PERSISTENT)
                self.published += 1
        if n % 7 == 0:
            with contextlib.suppress(pika.exceptions.UnroutableError):
                ch.basic_publish("", "nowhere", b"r", mandatory=True)
            ch.basic_publish("", "nowhere", b"x")

    def _churn(self) -> None:
        with contextlib.closing(self.node.connect()) as conn:
            ch = conn.channel()
            name = unique("churn")
            ch.queue_declare(name)
            ch.basic_get(name)  # get-empty
            ch.queue_delete(name)


@contextlib.contextmanager
def traffic(cluster: Cluster, queues: Queues) -> Iterator[list[Traffic]]:
    threads = [Traffic(cluster, i, queues) for i in range(len(cluster.nodes))]
    for t in threads:
        t.start()
    try:
        yield threads
    finally:
        for t in threads:
            t.stopping.set()
        for t in threads:
            t.join(15)
    for t in threads:
        assert t.error is None, f"{t.name} failed: {t.error!r}"
        assert t.published > 0, f"{t.name} published nothing"


@contextlib.contextmanager
def paused(node: Any) -> Iterator[None]:
    """SIGSTOP the node's process (a long pause: GC, VM steal), SIGCONT after the block."""
    assert node.proc is not None
    node.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        node.proc.send_signal(signal.SIGCONT)


# ---- Grafana's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    dashboard: str
    row: str
    panel_id: int
    panel: str
    kind: str
    unit: str
    expr: str
    legend: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.row} / {self.panel}"


def dashboards() -> list[dict[str, Any]]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return [json.loads(f.read_text()) for f in files]


def targets_of(board: dict[str, Any]) -> list[Target]:
    out = []
    row = ""
    panels = []
    for panel in board["panels"]:  # rows may be collapsed (their panels inside them)
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    for panel in panels:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        for t in panel.get("targets", []):
            out.append(
                Target(
                    board["title"],
                    row,
                    panel["id"],
                    panel["title"],
                    panel["type"],
                    unit,
                    t["expr"],
                    t.get("legendFormat", ""),
                )
            )
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    """$name, ${name} and [[name]] replaced as Grafana does (longest names first)."""
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        expr = expr.replace("${" + name + "}", value).replace("[[" + name + "]]", value)
        pattern = re.compile(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])")
        expr = pattern.sub(value.replace("\\", "\\\\"), expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


# ---- the test --------------------------------------------------------------------------------


def artifacts_dir(tmp_path: Path) -> Path:
    base = os.environ.get("WARREN_TEST_ARTIFACTS")
    out = (Path(base) if base else tmp_path) / "dashboards"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_dashboards_are_templated_by_cluster_and_node() -> None:
    """What Grafana needs to load them, and what makes every panel follow the variables."""
    for board in dashboards():
        assert board["schemaVersion"] >= 38
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert "label_values(rabbitmq_identity_info, rabbitmq_cluster)" in json.dumps(
            variables["rabbitmq_cluster"]["query"]
        )
        node = variables["rabbitmq_node"]
        assert (node["multi"], node["includeAll"], node["allValue"]) == (True, True, ".*")
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{board['title']}: duplicate panel ids"
        for t in targets_of(board):
            assert 'rabbitmq_cluster="$rabbitmq_cluster"' in t.expr, t.where
            assert 'rabbitmq_node=~"$rabbitmq_node"' in t.expr, t.where
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
                assert all(t["datasource"]["uid"] == "prometheus" for t in panel["targets"])


@needs_prometheus
def test_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        [str(PROMETHEUS.with_name("promtool")), "check", "config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
def test_every_panel_query_returns_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = artifacts_dir(tmp_path)
    with capsys.disabled():
        print(f"\ndashboard plots: {out}")
    boards = dashboards()
    targets = [t for board in boards for t in targets_of(board)]
    assert targets
    extra = ("--raft-compaction-entries", "100")  # a few snapshots during the test
    with (
        metrics_cluster(tmp_path / "cluster", *extra) as (cluster, ports),
        prometheus(tmp_path / "prometheus", [f"127.0.0.1:{p}" for p in ports]) as prom,
    ):
        wait_until(lambda: prom.targets_up(3), 30, "all three targets up in Prometheus")
        leader = cluster.raft_leader()
        a, b = (i for i in range(3) if i != leader)  # the queues' leaders: not the Raft leader
        queues = Queues(unique("dash-durable"), unique("dash-transient"), unique("dash-backlog"))
        cluster.channel(a).queue_declare(queues.durable, durable=True)
        cluster.channel(b).queue_declare(queues.transient)
        cluster.channel(b).queue_declare(queues.backlog, durable=True)
        cluster.close_connections()
        started = time.time()
        with traffic(cluster, queues):
            time.sleep(TRAFFIC_S / 2)
            # Asked again: Raft leadership may have followed the durable load to `a`.
            leader = cluster.raft_leader()
            term = cluster.status(next(i for i in range(3) if i != leader))["raft"]["term"]
            with paused(cluster.nodes[leader]):  # the others elect a new leader
                time.sleep(PAUSE_S)
            time.sleep(TRAFFIC_S / 2)
            now = time.time()
            variables = {
                "rabbitmq_cluster": "warren",
                "rabbitmq_node": ".*",  # "All" (allValue)
                "__rate_interval": RATE_INTERVAL,
                "__interval": f"{SCRAPE_S}s",
                "__interval_ms": str(SCRAPE_S * 1000),
                "__range": f"{int(now - started)}s",
                "__range_s": str(int(now - started)),
                "__range_ms": str(int((now - started) * 1000)),
            }
            check_variables(prom)
            instant = {t: prom.query(t, variables, time=now) for t in targets}
            ranges = {
                t: prom.query(t, variables, start=started, end=now, step=SCRAPE_S) for t in targets
            }
            elected = prom.get("/api/v1/query", query="max(rabbitmq_raft_term_total)", time=now)
            changes = prom.get(
                "/api/v1/query",
                query=f"sum(increase(warren_raft_leader_changes_total[{variables['__range']}]))",
                time=now,
            )
    written = plot(boards, ranges, started, out)
    with capsys.disabled():
        print(f"dashboard plots written: {', '.join(p.name for p in written)}")

    empty = [t.where + f"  [{t.expr}]" for t, data in instant.items() if not data["result"]]
    assert not empty, "panels whose query returns no data:\n" + "\n".join(empty)
    nan_only = [t.where for t, data in ranges.items() if not _finite(data)]
    assert not nan_only, "panels with no number over the whole range:\n" + "\n".join(nan_only)
    # The pause of the Raft leader shows on the Raft dashboard as an election.
    assert float(elected["result"][0]["value"][1]) > term
    assert float(changes["result"][0]["value"][1]) >= 1


def check_variables(prom: Prometheus) -> None:
    """The template variables' queries: label_values(rabbitmq_identity_info, ...)."""
    clusters = prom.get(
        "/api/v1/label/rabbitmq_cluster/values", **{"match[]": "rabbitmq_identity_info"}
    )
    assert clusters == ["warren"]
    nodes = prom.get(
        "/api/v1/label/rabbitmq_node/values",
        **{"match[]": 'rabbitmq_identity_info{rabbitmq_cluster="warren"}'},
    )
    assert nodes == ["w1", "w2", "w3"]


def _finite(data: dict[str, Any]) -> bool:
    return any(
        math.isfinite(float(v)) for series in data["result"] for _t, v in series.get("values", [])
    )


# ---- the plots ----------------------------------------------------------------------------------


def plot(
    boards: list[dict[str, Any]], ranges: dict[Target, Any], started: float, out: Path
) -> list[Path]:
    """One PNG per dashboard row: every panel's series over the test's range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for board in boards:
        rows: dict[str, dict[int, list[Target]]] = {}
        for t in targets_of(board):
            rows.setdefault(t.row, {}).setdefault(t.panel_id, []).append(t)
        for index, (row, panels) in enumerate(rows.items(), start=1):
            cols = 3
            count = len(panels)
            nrows = math.ceil(count / cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.2 * nrows), squeeze=False)
            for ax in axes.flat[count:]:
                ax.set_visible(False)
            for ax, panel_targets in zip(axes.flat, panels.values(), strict=False):
                _plot_panel(ax, panel_targets, ranges, started)
            fig.suptitle(f"{board['title']} — {row}", fontsize=14)
            fig.tight_layout()
            slug = re.sub(r"[^a-z0-9]+", "-", f"{board['uid']}-{index}-{row}".lower()).strip("-")
            path = out / f"{slug}.png"
            fig.savefig(path, dpi=70)
            plt.close(fig)
            written.append(path)
    return written


def _plot_panel(ax: Any, targets: list[Target], ranges: dict[Target, Any], started: float) -> None:
    title, kind, unit = targets[0].panel, targets[0].kind, targets[0].unit
    if kind == "table":
        shown = ("rabbitmq_node", "instance", "product_version", "python_version")
        rows = [
            "  ".join(f"{k}={series['metric'].get(k, '')}" for k in shown)
            for t in targets
            for series in ranges[t]["result"]
        ]
        ax.axis("off")
        text = "\n".join(rows) or "(no rows)"
        ax.text(0, 1, text, va="top", family="monospace", fontsize=7, clip_on=True)
        ax.set_title(f"{title} [table]", fontsize=9)
        return
    last_values = []
    for t in targets:
        for series in ranges[t]["result"]:
            points = [(float(ts) - started, float(v)) for ts, v in series["values"]]
            xs = [p[0] for p in points]
            ys = [p[1] for p in points]
            name = legend(t.legend, series["metric"])
            ax.plot(xs, ys, label=name, linewidth=1.2)
            finite = [y for y in ys if math.isfinite(y)]
            if finite:
                last_values.append(
                    f"{name}: {finite[-1]:.4g}" if name != "value" else f"{finite[-1]:.4g}"
                )
    suffix = f" [{kind}: {'; '.join(last_values)[:60]}]" if kind == "stat" else ""
    ax.set_title(f"{title}{suffix}", fontsize=9)
    ax.set_xlabel("seconds", fontsize=7)
    ax.set_ylabel(unit, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines and len(ax.lines) <= 12:
        ax.legend(fontsize=6, loc="upper left")
