"""Cluster fixtures: three real `warren node` processes joined by Raft and the node link.

`cluster` is shared by the tests of one module (they use unique names and never stop a
node); `own_cluster` is a fresh cluster for one test that kills, stops or restarts nodes;
`start_cluster` starts clusters with options (e.g. inside network namespaces). Every wait
is bounded. When a test fails, the tail of each node's log is attached to its report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.netns import Netns, free_base
from tests.cluster.support import Cluster, ClusterFactory, running_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-node cluster shared by one module's tests: use unique names, stop no node."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def netns() -> Iterator[Netns]:
    """Three network namespaces for one cluster (tests/cluster/netns.py)."""
    env = Netns(tag=str(os.getpid() % 100000), base=free_base())
    try:
        env.setup()  # raises (the test errors) without the privileges for `ip netns`
        yield env
    finally:
        env.teardown()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh 3-node cluster for this test alone (it may kill and restart nodes)."""
    with running_cluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """A factory of clusters started with options; all are killed at teardown."""
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(autouse=True)
def _close_test_connections(request: pytest.FixtureRequest) -> Iterator[None]:
    """Connections a test opened through a shared cluster are closed after it."""
    yield
    for name in ("cluster", "own_cluster"):
        c = request.node.funcargs.get(name)
        if isinstance(c, Cluster):
            c.close_connections()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    clusters: list[Cluster] = []
    for value in funcargs.values():
        if isinstance(value, Cluster):
            clusters.append(value)
        elif isinstance(value, ClusterFactory):
            clusters += value.clusters
    for n, c in enumerate(clusters):
        report.sections.append((f"cluster {n} node logs", c.logs()))
