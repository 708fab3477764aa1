"""Network namespaces for partition tests: each node in a namespace of its own, joined to
the root namespace (where the test's clients run) by a veth pair; blackhole routes cut one
node off from the other two while the test still reaches all three; iptables rules in a
node's namespace cut only its Raft traffic. Needs root."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any


def _ip(*args: str, ns: str | None = None) -> None:
    _run(["ip", *(("netns", "exec", ns, "ip") if ns else ()), *args])


def _iptables(ns: str, *args: str) -> None:
    _run(["ip", "netns", "exec", ns, "iptables", "-w", "5", *args])


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


@dataclass
class Netns:
    """Three namespaces wnp<pid>-<i>; node i at 10.77.<base+i>.2, root side .1."""

    tag: str
    base: int
    names: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    blackholes: list[tuple[str, str]] = field(default_factory=list)  # (ns, address)
    filters: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (ns, rule)
    forward_rule: tuple[str, ...] = ()  # the iptables FORWARD rule added, if any

    def host(self, i: int) -> str:
        return f"10.77.{self.base + i}.2"

    def setup(self) -> None:
        for i in range(3):
            ns = f"wnp{self.tag}-{i}"
            root_if, ns_if = f"wv{self.tag}r{i}", f"wv{self.tag}n{i}"
            _ip("netns", "add", ns)
            self.names.append(ns)
            _ip("link", "add", root_if, "type", "veth", "peer", "name", ns_if)
            self.links.append(root_if)
            _ip("link", "set", ns_if, "netns", ns)
            _ip("addr", "add", f"10.77.{self.base + i}.1/24", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{self.host(i)}/24", "dev", ns_if, ns=ns)
            _ip("link", "set", ns_if, "up", ns=ns)
            _ip("route", "add", "default", "via", f"10.77.{self.base + i}.1", ns=ns)
        # Forward between the root-side veths only (IPv4 forwarding is decided by the
        # interface a packet comes in on): the machine's global ip_forward is left alone.
        for link in self.links:
            with open(f"/proc/sys/net/ipv4/conf/{link}/forwarding", "w") as f:
                f.write("1")
        # A Docker engine on the machine sets the FORWARD policy to DROP: accept what goes
        # between these veths (first rule), and only that.
        if shutil.which("iptables"):
            veths = f"wv{self.tag}r+"
            rule = ("FORWARD", "-i", veths, "-o", veths, "-j", "ACCEPT")
            done = subprocess.run(
                ["iptables", "-w", "5", "-I", *rule], capture_output=True, text=True, timeout=10
            )
            if done.returncode == 0:
                self.forward_rule = rule

    def cluster_options(self) -> dict[str, Any]:
        """`start_cluster` options for a cluster with node i in namespace i."""
        return {
            "hosts": [self.host(i) for i in range(3)],
            "prefixes": [self.prefix(i) for i in range(3)],
            "extra": ("--loopback-users", ""),  # clients come from the root namespace
        }

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[i])

    def isolate(self, i: int) -> None:
        """Node i can reach neither other node, nor they it (the root still reaches all)."""
        for j in range(3):
            if j != i:
                self._blackhole(self.names[i], self.host(j))
                self._blackhole(self.names[j], self.host(i))

    def _blackhole(self, ns: str, address: str) -> None:
        _ip("route", "add", "blackhole", address, ns=ns)
        self.blackholes.append((ns, address))

    def cut_raft(self, i: int, raft_ports: list[int]) -> None:
        """Node i's Raft traffic is dropped (both ways; `raft_ports[j]` is node j's Raft
        port) while its node link, AMQP and HTTP ports still work: a node that cannot catch
        up with the Raft log, its link to the others up."""
        ns = self.names[i]
        self._filter(ns, ("INPUT", "-p", "tcp", "--dport", str(raft_ports[i]), "-j", "DROP"))
        for j, port in enumerate(raft_ports):
            if j != i:
                rule = ("OUTPUT", "-p", "tcp", "-d", self.host(j), "--dport", str(port))
                self._filter(ns, (*rule, "-j", "DROP"))

    def _filter(self, ns: str, rule: tuple[str, ...]) -> None:
        _iptables(ns, "-A", *rule)
        self.filters.append((ns, rule))

    def heal(self) -> None:
        while self.blackholes:
            ns, address = self.blackholes.pop()
            _ip("route", "del", "blackhole", address, ns=ns)
        while self.filters:
            ns, rule = self.filters.pop()
            _iptables(ns, "-D", *rule)

    def teardown(self) -> None:
        for ns in self.names:
            # the nodes are started by this test; end any still running in its namespaces
            done = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10
            )
            for pid in done.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for link in self.links:  # gone with its peer's namespace, normally
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        if self.forward_rule:
            subprocess.run(
                ["iptables", "-w", "5", "-D", *self.forward_rule], capture_output=True, timeout=10
            )


def free_base() -> int:
    """A 10.77.x.0/24 block of three no interface or route here uses yet."""
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=10
    ).stdout
    start = (os.getpid() % 80) * 3
    for k in range(84):
        base = (start + 3 * k) % 252
        if not any(f"10.77.{base + i}." in routes for i in range(3)):
            return base
    raise RuntimeError("no free 10.77.x.0/24 blocks")
