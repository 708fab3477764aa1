"""Node configuration: one frozen value built by the CLI, passed down explicitly.

Rules: no module-level state; several nodes in one process each get their own config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MEMORY_FRACTION = 0.4  # RabbitMQ's vm_memory_high_watermark default


@dataclass(frozen=True, slots=True)
class User:
    name: str
    password: str


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = "warren"
    host: str = "0.0.0.0"
    port: int = 5672
    data_dir: Path = Path("./data")
    users: tuple[User, ...] = (User("guest", "guest"),)
    loopback_users: frozenset[str] = frozenset({"guest"})
    vhosts: tuple[str, ...] = ("/",)
    heartbeat: int = 60
    frame_max: int = 131072
    channel_max: int = 2047
    memory_high_watermark_bytes: int = 0  # 0: computed from DEFAULT_MEMORY_FRACTION
    max_message_size: int = 134217728  # RabbitMQ 3.x default max_message_size
    cluster_name: str = "warren"
    management_host: str = "0.0.0.0"
    management_port: int | None = None  # None: no management HTTP API
    metrics_port: int | None = None  # None: no Prometheus endpoint
    extra: dict[str, str] = field(default_factory=dict)

    def user(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)


def total_memory_bytes() -> int:
    """Physical memory, from /proc/meminfo (Linux); a conservative 1 GiB elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20, "mi": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40,
}  # fmt: skip


def parse_watermark(text: str, total: int | None = None) -> int:
    """`0.4` (a fraction of RAM, as RabbitMQ's relative watermark) or `512MB` / `2GiB` /
    `1048576` (absolute bytes). Raises ValueError with a readable message."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if 0.0 < value < 1.0 or text in ("1", "1.0"):
        return int((total if total is not None else total_memory_bytes()) * value)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a fraction or a size: {text!r}")
    unit = (match.group(2) or "").lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def default_watermark() -> int:
    return int(total_memory_bytes() * DEFAULT_MEMORY_FRACTION)


def env_default(name: str, default: str) -> str:
    return os.environ.get(name, default)
