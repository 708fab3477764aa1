"""Fixtures for the container tests: the image and a running compose cluster.

Tests marked `docker` need a Docker engine. Without one they are skipped with one line
saying why ("docker: no engine reachable (...)"); nothing else skips them: a failed
image build or a cluster that does not come up is an error. tests/docker/ci_setup.sh
makes an engine reachable on CI (Debian's docker.io, dockerd, a debootstrapped base).

`image` builds deploy/Dockerfile once per session (the base image is built with
debootstrap when missing and kept by name; the dependency wheels are cached by the hash
of pyproject.toml). `compose_cluster` starts node1..node3 of docker-compose.yml once per
session on free host ports and removes containers, network and volumes at the end.
When a test fails, the tail of each container's log is attached to its report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.docker.support import (
    BASE_IMAGE,
    IMAGE,
    NOTES,
    ComposeCluster,
    build_image,
    engine_problem,
    ensure_base_image,
    image_info,
    note,
    stage_context,
)

_engine: list[str | None] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs a Docker engine (tests/docker)")


def _engine_problem() -> str | None:
    if not _engine:
        _engine.append(engine_problem())
    return _engine[0]


def pytest_report_header(config: pytest.Config) -> str:
    problem = _engine_problem()
    return "docker: " + (f"no engine reachable ({problem})" if problem else "engine reachable")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    docker_items = [item for item in items if item.get_closest_marker("docker")]
    if not docker_items:
        return
    problem = _engine_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"docker: no engine reachable ({problem})")
    for item in docker_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """deploy/Dockerfile built on the local base image, from a wheelhouse (offline)."""
    base_s = ensure_base_image(BASE_IMAGE)
    context = stage_context(tmp_path_factory.mktemp("docker-context") / "ctx")
    build_s = build_image(context, IMAGE, BASE_IMAGE)
    size_mb = int(image_info(IMAGE)["Size"]) / 1e6
    note(
        f"docker: image {IMAGE} on {BASE_IMAGE}: {size_mb:.0f} MB, built in {build_s:.1f} s"
        + (f" (base image built in {base_s:.0f} s)" if base_s else " (base image cached)")
    )
    return IMAGE


@pytest.fixture(scope="session")
def compose_cluster(image: str) -> Iterator[ComposeCluster]:
    """node1..node3 of docker-compose.yml, healthy; `down -v` at the end."""
    cluster = ComposeCluster.create(f"warrentest{os.getpid()}", image)
    try:
        cluster.up()
        note(
            f"docker: compose ({' '.join(cluster.compose)}) cluster healthy "
            f"{cluster.healthy_after_s:.1f} s after `up`; AMQP on 127.0.0.1:"
            + ",".join(map(str, cluster.amqp_ports))
        )
        yield cluster
    except BaseException:
        if cluster.containers:
            print(cluster.logs())
        raise
    finally:
        cluster.down()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    cluster = getattr(item, "funcargs", {}).get("compose_cluster")
    if isinstance(cluster, ComposeCluster):
        report.sections.append(("compose cluster container logs", cluster.logs()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if NOTES:
        terminalreporter.section("docker: image, start-up and failover counts")
        for line in NOTES:
            terminalreporter.write_line(line)
