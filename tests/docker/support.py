"""The three-node compose cluster of docker-compose.yml, run for real: the engine check,
the image build (a locally imported base image, a wheelhouse, deploy/Dockerfile), the
compose project, its containers and published ports, and `warren verify` against them.

Tests import from here (`from tests.docker.support import ...`), never from conftest.
Every command and wait is bounded; network traffic goes only to loopback (the published
ports) and to the containers and networks these tests create.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.support import http_get, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
BASE_IMAGE = os.environ.get("WARREN_TEST_BASE_IMAGE", "warren-base:bookworm")
IMAGE = os.environ.get("WARREN_TEST_IMAGE", "warren:test")
NODES = ("node1", "node2", "node3")
HEALTHY_TIMEOUT_S = 120.0  # compose up to all three healthy (measured: ~10 s)
SETTLE_TIMEOUT_S = 60.0  # after chaos: every member reachable from every node again
BASE_BUILD_TIMEOUT_S = 600.0  # debootstrap (about a minute on CI's kind of machine)
# What the run measured (image size, time to healthy, failover counts): conftest prints
# these lines in pytest's terminal summary, so a passing CI run shows them too.
NOTES: list[str] = []


def note(line: str) -> None:
    NOTES.append(line)
    print(line)


class CommandFailed(AssertionError):
    pass


def run(
    cmd: Sequence[str], timeout: float = 60.0, *, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; CommandFailed (with its output) when it fails."""
    try:
        done = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{shlex.join(cmd)}: still running after {timeout:g} s") from exc
    if check and done.returncode != 0:
        raise CommandFailed(
            f"{shlex.join(cmd)}: exit {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done


def engine_problem() -> str | None:
    """None when a Docker engine answers, else why not (one line)."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        done = run(["docker", "info", "--format", "{{.ServerVersion}}"], 20, check=False)
    except CommandFailed as exc:
        return str(exc)
    if done.returncode != 0 or not done.stdout.strip():
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"docker info: exit {done.returncode}"
    return None


def compose_v1() -> list[str] | None:
    """Compose v1 (Debian's docker-compose 1.29), if installed."""
    return ["docker-compose"] if shutil.which("docker-compose") else None


def compose_v2() -> list[str] | None:
    """Compose v2 (the docker CLI plugin), if installed."""
    if shutil.which("docker") is None:
        return None
    done = run(["docker", "compose", "version"], 20, check=False)
    return ["docker", "compose"] if done.returncode == 0 else None


def compose_command() -> list[str]:
    """The compose the cluster runs with: v2 where installed, else v1."""
    found = compose_v2() or compose_v1()
    if found is None:
        raise CommandFailed("neither `docker compose` (v2) nor `docker-compose` (v1) found")
    return found


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now, below the kernel's ephemeral range: a published port
    from that range can be taken by any client's outgoing connection in the meantime
    (docker then fails to start the container: "address already in use")."""
    low, _high = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    found: list[int] = []
    while len(found) < count:
        port = rng.randrange(20000, max(low, 20001))
        if port in found:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
    return found


# --- the image -----------------------------------------------------------------------------


def ensure_base_image(name: str = BASE_IMAGE) -> float:
    """The base image (python3 3.11 + venv), built with debootstrap unless present;
    the seconds it took (0 when it was there)."""
    if run(["docker", "image", "inspect", name], 30, check=False).returncode == 0:
        return 0.0
    started = time.monotonic()
    run(
        ["bash", str(REPO_ROOT / "deploy/docker/build-base-image.sh"), name],
        BASE_BUILD_TIMEOUT_S,
    )
    return time.monotonic() - started


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "warren-tests"


def stage_context(dest: Path) -> Path:
    """A build context with what .dockerignore lets through, plus a wheelhouse: the
    dependencies' wheels (cached across runs by the hash of pyproject.toml) and a fresh
    warrenmq wheel built from this checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for name in ("node", "cluster"):
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    (dest / "deploy").mkdir()
    shutil.copy2(REPO_ROOT / "deploy/Dockerfile", dest / "deploy/Dockerfile")
    wheels = dest / "deploy/docker/wheels"
    wheels.mkdir(parents=True)
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    deps = _cache_dir() / f"wheels-{hashlib.sha256(pyproject).hexdigest()[:16]}"
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
    if not any(deps.glob("*.whl")):
        partial = deps.with_name(deps.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        # (from the staged copy: setuptools writes build/ and egg-info beside the source)
        run([*pip, "-w", str(partial), str(dest)], 600)
        for built in partial.glob("warrenmq-*.whl"):
            built.unlink()
        shutil.rmtree(deps, ignore_errors=True)
        partial.rename(deps)
    for wheel in deps.glob("*.whl"):
        shutil.copy2(wheel, wheels / wheel.name)
    run([*pip, "--no-deps", "-w", str(wheels), str(dest)], 300)
    for leftover in ("build", "warrenmq.egg-info"):
        shutil.rmtree(dest / leftover, ignore_errors=True)
    return dest


def build_image(context: Path, tag: str = IMAGE, base: str = BASE_IMAGE) -> float:
    """deploy/Dockerfile built from `context`; the seconds it took. The image this tag
    named before is removed when the build replaced it (no dangling images pile up)."""
    old = run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], 30, check=False)
    started = time.monotonic()
    cmd = [
        "docker", "build", "-q", "-f", str(context / "deploy/Dockerfile"),
        "--build-arg", f"BASE={base}", "-t", tag, str(context),
    ]  # fmt: skip
    # (the classic builder: Debian's docker.io has no buildx; the Dockerfile needs none)
    run(cmd, 600, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    took = time.monotonic() - started
    old_id = old.stdout.strip()
    if old.returncode == 0 and old_id and old_id != image_id(tag):
        run(["docker", "image", "rm", old_id], 60, check=False)
    # The build stages left untagged (one per source change: ~50 MB each, on CI's machine
    # run after run). Only dangling images with the Dockerfile's build-stage label go.
    prune = ["docker", "image", "prune", "-f", "--filter", "label=org.warrenmq.stage=build"]
    run(prune, 120, check=False)
    return took


def image_id(tag: str) -> str:
    return run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], 30).stdout.strip()


def image_info(tag: str = IMAGE) -> dict[str, Any]:
    return dict(json.loads(run(["docker", "image", "inspect", tag], 30).stdout)[0])


# --- the compose project -------------------------------------------------------------------


@dataclass
class ComposeCluster:
    """node1..node3 of docker-compose.yml as one compose project on free host ports."""

    project: str
    image: str
    compose: list[str]
    amqp_ports: list[int] = field(default_factory=list)
    management_ports: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)
    containers: dict[str, str] = field(default_factory=dict)  # service -> container id
    healthy_after_s: float = 0.0

    @classmethod
    def create(cls, project: str, image: str, compose: list[str] | None = None) -> ComposeCluster:
        ports = free_ports(9)
        return cls(project, image, compose or compose_command(), ports[0:3], ports[3:6], ports[6:9])

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "WARREN_IMAGE": self.image}
        for i in range(3):
            env[f"WARREN_AMQP_PORT_{i + 1}"] = str(self.amqp_ports[i])
            env[f"WARREN_MANAGEMENT_PORT_{i + 1}"] = str(self.management_ports[i])
            env[f"WARREN_METRICS_PORT_{i + 1}"] = str(self.metrics_ports[i])
        return env

    def compose_run(self, *args: str, timeout: float = 120.0) -> str:
        cmd = [*self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return run(cmd, timeout, env=self.env, cwd=REPO_ROOT).stdout

    # ---- lifecycle -----------------------------------------------------------------

    def up(self) -> None:
        started = time.monotonic()
        self.compose_run("up", "-d", "--no-build", *NODES, timeout=180)
        for service in NODES:
            cid = self.compose_run("ps", "-q", service).strip()
            assert cid, f"no container for {service}"
            self.containers[service] = cid
        self.wait_healthy(HEALTHY_TIMEOUT_S)
        self.healthy_after_s = time.monotonic() - started

    def down(self) -> None:
        with contextlib.suppress(CommandFailed):
            self.compose_run("down", "-v", "--remove-orphans", "-t", "10", timeout=180)

    def health(self) -> dict[str, str]:
        out = run(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", *self.containers.values()],
            30,
        ).stdout.split()
        return dict(zip(self.containers, out, strict=True))

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT_S) -> None:
        wait_until(
            lambda: all(s == "healthy" for s in self.health().values()),
            timeout,
            "all three containers healthy",
            interval=0.5,
        )

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Healthy, every node sees every member reachable and a quorum, and every node has
        applied what is committed (one that is still catching up after a partition may yet
        install a snapshot, which closes its clients' connections: 320, "resynchronised")."""
        self.wait_healthy(timeout)

        def settled() -> bool:
            statuses = [self.status(i) for i in range(3)]
            for status in statuses:
                if not status["raft"]["has_quorum"]:
                    return False
                if not all(m["reachable"] and m["alive"] for m in status["members"]):
                    return False
            committed = max(status["raft"]["commit_index"] for status in statuses)
            return all(status["raft"]["last_applied"] >= committed for status in statuses)

        wait_until(settled, timeout, "every member reachable from every node", interval=0.5)

    def logs(self, tail: int = 80) -> str:
        parts = []
        for service, cid in self.containers.items():
            done = run(["docker", "logs", "--tail", str(tail), cid], 30, check=False)
            parts.append(f"----- {service} ({cid[:12]}) last {tail} lines -----\n{done.stderr}")
        return "\n".join(parts)

    # ---- containers and network ----------------------------------------------------

    def container(self, i: int) -> str:
        return self.containers[NODES[i]]

    def inspect(self, i: int) -> dict[str, Any]:
        return dict(json.loads(run(["docker", "inspect", self.container(i)], 30).stdout)[0])

    def network(self) -> str:
        """The project's network (compose's `<project>_default`)."""
        networks = self.inspect(0)["NetworkSettings"]["Networks"]
        (name,) = networks
        return str(name)

    # ---- clients -------------------------------------------------------------------

    def amqp_url(self, i: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_ports[i]}/%2F"

    def management_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.management_ports[i]}"

    def connect(self, i: int) -> Any:
        import pika

        params = pika.URLParameters(self.amqp_url(i))
        params.socket_timeout = 5
        params.blocked_connection_timeout = 10
        params.connection_attempts = 1
        return pika.BlockingConnection(params)

    def status(self, i: int) -> dict[str, Any]:
        status, body = http_get(f"{self.management_url(i)}/api/warren/cluster", 3.0)
        assert status == 200, (status, body)
        return dict(body)

    def queue_leader(self, i: int, queue: str) -> str | None:
        status, body = http_get(f"{self.management_url(i)}/api/queues", 3.0)
        assert status == 200, (status, body)
        found = [q for q in body if q["name"] == queue]
        return str(found[0]["node"]) if found else None

    def raft_leader(self) -> int:
        """Index of the Raft leader all three agree on."""

        def agreed() -> int | None:
            leaders = {self.status(i)["raft"]["leader"] for i in range(3)}
            if len(leaders) == 1 and None not in leaders:
                return NODES.index(str(leaders.pop())) + 1
            return None

        return int(wait_until(agreed, 30, "an agreed Raft leader")) - 1


@dataclass(frozen=True)
class VerifyRun:
    summary: dict[str, Any]
    returncode: int
    stderr: str
    seconds: float

    def line(self, scenario: str) -> str:
        s = self.summary
        return (
            f"docker failover [{scenario}]: confirmed={s.get('confirmed')} of {s.get('count')} "
            f"received={s.get('received')} lost={s.get('lost')} "
            f"duplicates={s.get('duplicates')} (unflagged {s.get('duplicates_unflagged')}) "
            f"republished={s.get('republished')} chaos={s.get('chaos_events')} "
            f"restarts={s.get('restarts')} chaos_failures={s.get('chaos_failures')} "
            f"in {self.seconds:.1f} s"
        )


def warren_verify(urls: Sequence[str], *args: str, timeout: float = 240.0) -> VerifyRun:
    """`warren verify` from this checkout on the host, against published ports; --json."""
    cmd = [sys.executable, "-m", "node.cli", "verify"]
    for url in urls:
        cmd += ["--url", url]
    cmd += [*args, "--json"]
    started = time.monotonic()
    done = run(cmd, timeout, check=False, cwd=REPO_ROOT)
    took = time.monotonic() - started
    try:
        summary = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        summary = {}
    return VerifyRun(summary, done.returncode, done.stderr, took)
